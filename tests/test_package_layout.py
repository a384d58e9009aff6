"""The packages' structure: imports run one way, and names keep working where they were imported from before."""

import ast
import subprocess
import sys

import pytest

from conftest import REPO


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", sorted((REPO / "datamodules").glob("*.py")), ids=lambda p: p.name)
def test_no_data_module_imports_metasgd_lightning(path):
    # metasgd_lightning imports datamodules (the CLI, inference), so the arrow must not run back.
    assert not [m for m in _imported_modules(path) if m.split(".")[0] == "metasgd_lightning"]


@pytest.mark.cost(5)  # seconds, for the order of the parallel run (conftest.py)
def test_importing_every_data_module_leaves_metasgd_lightning_unimported():
    names = sorted(f"datamodules.{p.stem}" for p in (REPO / "datamodules").glob("*.py") if p.stem != "__init__")
    code = (f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "assert not [m for m in sys.modules if m.startswith('metasgd_lightning')], 'metasgd_lightning imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


# Every public name of the modules that the split moved, where it could be imported from before.
OLD_IMPORTS = {
    "datamodules.episodic": ["ArrayImages", "DatasetImages", "DownloadError", "EpisodicDataModule", "EpisodicTasks",
                             "ImageReadError", "ImageSource", "ImageTransform", "STAGE_SPLITS", "check_fractions",
                             "check_int", "check_normalisation", "cleanup_on_failure", "describe_bad_file",
                             "seeded_global_rngs", "split_support_query", "standard_augmentation"],
    "datamodules.image_folder": ["FileImages", "IMAGE_EXTENSIONS", "ImageFolderDataModule", "file_images",
                                 "find_class_folders", "read_class_folders", "split_classes", "visible"],
    "datamodules.imagenet": ["MODES", "ZENODO", "MiniImageNetDataModule", "TieredImageNetDataModule"],
    "datamodules.cifar": ["CIFARFSDataModule", "FC100DataModule"],
    "datamodules.omniglot": ["BENCHMARK_FRACTIONS", "BENCHMARK_SPLIT", "OmniglotDataModule"],
    "datamodules.sampling": ["SPLITS", "FixedTaskSampler", "TaskIndexSampler", "TaskLoaders", "task_generator",
                             "task_seed"],
    "datamodules.lake_oneshot": ["OmniglotOneShotDataModule", "PUBLISHED_ERROR_RATES"],
    "metasgd_lightning._quiet": ["import_learn2learn", "silence_lightning_noise"],
    # The paths of before the split into methods/, training/ and commands/ (saved configs name them).
    "metasgd_lightning.metasgd": ["InnerLoopDivergedError", "MetaSGD", "TaskBatchResult", "check_positive_int",
                                  "check_task_batch", "multi_step_loss_weights"],
    "metasgd_lightning.reptile": ["Reptile", "ReptileStep", "adam_step", "minibatch_indices", "sgd_step"],
    "metasgd_lightning.models": ["ConvNet4", "SineMLP", "TaskBatchNorm2d"],
    "metasgd_lightning.module": ["MetaLearningModule", "MetaSGDLightningModule", "ReptileLightningModule"],
    "metasgd_lightning.metrics": ["TaskMeanCI", "task_accuracy"],
    "metasgd_lightning.callbacks": ["LearnedRateMonitor", "MetaSGDCheckpoint"],
    "metasgd_lightning.checkpointing": ["AtomicCheckpointIO", "checkpoint_is_intact"],
    "metasgd_lightning.inference": ["adapt", "adapt_to_folder", "checkpoint_transform", "load_meta_learner"],
    "metasgd_lightning.cli": ["main"],
    "metasgd_lightning.plotting": ["plot_learned_rates"],
    "metasgd_lightning.task_plots": ["plot_sine", "plot_tasks"],
    "datamodules": ["CIFARFSDataModule", "EpisodicDataModule", "FC100DataModule", "ImageFolderDataModule",
                    "MiniImageNetDataModule", "OmniglotDataModule", "OmniglotOneShotDataModule", "SineDataModule",
                    "TieredImageNetDataModule"],
}


@pytest.mark.parametrize("module", sorted(OLD_IMPORTS))
def test_names_are_still_importable_from_where_they_were(module):
    import importlib

    imported = importlib.import_module(module)
    assert [name for name in OLD_IMPORTS[module] if not hasattr(imported, name)] == []


def test_moved_names_are_the_same_objects_as_in_their_new_homes():
    from datamodules import class_folders, downloads, episodic, image_folder, images, preprocessing, tasks

    assert episodic.ImageTransform is preprocessing.ImageTransform and episodic.ImageSource is images.ImageSource
    assert episodic.EpisodicTasks is tasks.EpisodicTasks and episodic.DownloadError is downloads.DownloadError
    assert image_folder.visible is class_folders.visible and image_folder.FileImages is images.FileImages


def test_the_four_learn2learn_benchmarks_share_one_base():
    from datamodules import CIFARFSDataModule, FC100DataModule, MiniImageNetDataModule, TieredImageNetDataModule
    from datamodules.learn2learn_benchmark import Learn2LearnBenchmark

    for cls in (MiniImageNetDataModule, TieredImageNetDataModule, CIFARFSDataModule, FC100DataModule):
        assert issubclass(cls, Learn2LearnBenchmark) and "load_split" not in vars(cls)
    # The stored image size is each set's default, shown by the CLI and recorded in checkpoints.
    assert MiniImageNetDataModule(root=None).hparams["image_size"] == 84
    assert FC100DataModule(root=None, ways=3).hparams == {**FC100DataModule(root=None).hparams, "ways": 3}
    assert CIFARFSDataModule(root=None).image_size == 32 and CIFARFSDataModule(root=None).padding == 4


LAYERS = ("methods", "training", "commands")  # each may import only those before it


@pytest.mark.parametrize("layer", LAYERS)
def test_the_layers_import_one_way(layer):
    allowed = LAYERS[: LAYERS.index(layer) + 1]
    package = REPO / "metasgd_lightning" / layer
    wrong = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                target = node.module.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("metasgd_lightning."):
                target = node.module.split(".")[1]
            else:
                continue
            if target in LAYERS and target not in allowed:
                wrong.append(f"{path.name} imports {target}")
    assert wrong == []


def test_no_method_file_imports_another_methods_private_name():
    for path in (REPO / "metasgd_lightning" / "methods").glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        private = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for alias in node.names if alias.name.startswith("_")]
        assert private == [], f"{path.name} imports {private}"


def test_an_old_path_is_the_new_module_itself():
    import metasgd_lightning.models as old
    from metasgd_lightning.module import MetaSGDLightningModule

    import metasgd_lightning.methods.models as new
    from metasgd_lightning.training.metasgd_module import MetaSGDLightningModule as moved

    assert old is new and MetaSGDLightningModule is moved


def test_a_method_must_implement_the_contract():
    import torch

    from metasgd_lightning.methods.contract import MetaLearner

    class Incomplete(MetaLearner):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(torch.nn.Linear(1, 1), inner_steps=1)
