"""Omniglot split by alphabet (test alphabets never seen in training) and tasks drawn within one alphabet."""

from pathlib import Path

import pytest
import torch

import fixtures_episodic as fx
from datamodules import OmniglotDataModule
from datamodules.sampling import seeded_global_rngs, task_seed

SMALL = dict(image_size=8, shots=1, queries=1, meta_batch_size=4, num_workers=0, val_tasks=8, test_tasks=8)


@pytest.fixture
def five_alphabets(tmp_path):
    # Alphabet_0..Alphabet_4 with 6, 6, 8, 8, 8 characters: uneven, as Omniglot's alphabets are.
    root = tmp_path / "images_background"
    fx.omniglot_folder(root, alphabets=2, characters=6, drawings=2, size=8, seed=1)
    fx.omniglot_folder(root, alphabets=3, characters=8, drawings=2, size=8, seed=2, start=2)
    return root


def _alphabets(dm: OmniglotDataModule, split: str) -> set[str]:
    return {Path(path).parent.parent.name for path in dm.sources[split].keys}


def test_named_alphabets_make_the_validation_and_test_splits(five_alphabets):
    dm = OmniglotDataModule(root=str(five_alphabets), split_by="alphabet", val_alphabets=["Alphabet_1"],
                            test_alphabets=["Alphabet_4"], ways=3, **SMALL)
    dm.setup("fit"), dm.setup("test")
    assert _alphabets(dm, "val") == {"Alphabet_1"} and _alphabets(dm, "test") == {"Alphabet_4"}
    assert _alphabets(dm, "train") == {"Alphabet_0", "Alphabet_2", "Alphabet_3"}
    # Every character of an alphabet goes with it: 6 + 8 + 8 training characters, each in 4 rotations.
    assert len(set(dm.sources["train"].labels)) == 4 * 22 and len(set(dm.sources["test"].labels)) == 8


@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_fractions_split_alphabets_and_no_alphabet_is_in_two_splits(five_alphabets, split_seed):
    dm = OmniglotDataModule(root=str(five_alphabets), split_by="alphabet", fractions=(0.6, 0.2, 0.2),
                            split_seed=split_seed, ways=3, **SMALL)
    dm.setup("fit"), dm.setup("test")
    splits = {split: _alphabets(dm, split) for split in ("train", "val", "test")}
    assert [len(a) for a in splits.values()] == [3, 1, 1]
    assert set.union(*splits.values()) == {f"Alphabet_{i}" for i in range(5)}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])


def test_the_character_split_mixes_alphabets(five_alphabets):
    # The default protocol, for contrast: new characters of alphabets seen in training.
    dm = OmniglotDataModule(root=str(five_alphabets), fractions=(0.6, 0.2, 0.2), ways=3, **SMALL)
    dm.setup("fit"), dm.setup("test")
    assert _alphabets(dm, "test") & _alphabets(dm, "train")


@pytest.mark.parametrize("split", ["train", "test"])
def test_within_alphabet_tasks_draw_every_class_from_one_alphabet(five_alphabets, split):
    dm = OmniglotDataModule(root=str(five_alphabets), split_by="alphabet", val_alphabets=["Alphabet_0"],
                            test_alphabets=["Alphabet_3", "Alphabet_4"], within_alphabet=True, ways=6, **SMALL)
    dm.setup("fit"), dm.setup("test")
    tasks, groups = dm.tasks(split, 40), dm.sources[split].class_groups
    seen = set()
    for index in range(40):
        with seeded_global_rngs(task_seed(dm.seed, split, index)):
            description = tasks.taskset.sample_task_description()
        labels = {tasks.dataset.indices_to_labels[d.index] for d in description}
        assert len(labels) == 6
        alphabets = {groups[label] for label in labels}
        assert len(alphabets) == 1, f"task {index} mixes alphabets {alphabets}"
        seen |= alphabets
    assert len(seen) >= 2  # more than one alphabet is drawn over the tasks
    # Without the option, 6-way tasks over two alphabets of 8 characters mix them.
    mixed = OmniglotDataModule(root=str(five_alphabets), split_by="alphabet", val_alphabets=["Alphabet_0"],
                               test_alphabets=["Alphabet_3", "Alphabet_4"], ways=6, **SMALL)
    mixed.setup("test")
    tasks = mixed.tasks("test", 10)
    mixes = 0
    for index in range(10):
        with seeded_global_rngs(task_seed(dm.seed, "test", index)):
            description = tasks.taskset.sample_task_description()
        mixes += len({mixed.sources["test"].class_groups[tasks.dataset.indices_to_labels[d.index]] for d in description}) > 1
    assert mixes > 0


def test_within_alphabet_tasks_are_a_function_of_the_task_index_and_load(five_alphabets):
    kwargs = dict(root=str(five_alphabets), split_by="alphabet", val_alphabets=["Alphabet_0"],
                  test_alphabets=["Alphabet_4"], within_alphabet=True, ways=5, **SMALL)
    first, second = OmniglotDataModule(**kwargs), OmniglotDataModule(**{**kwargs, "num_workers": 1})
    for dm in (first, second):
        dm.setup("fit")
    a, b = next(iter(first.train_dataloader())), next(iter(second.train_dataloader()))
    assert [tuple(t.shape) for t in a] == [(4, 5, 1, 8, 8), (4, 5), (4, 5, 1, 8, 8), (4, 5)]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split_by="alphabets"), "`split_by` must be 'character' or 'alphabet'; got 'alphabets'"),
        (dict(test_alphabets=["Alphabet_1"], val_alphabets=["Alphabet_2"]), "needs split_by='alphabet'"),
        (dict(split_by="alphabet", test_alphabets=["Alphabet_1"]), "needs both `val_alphabets` and `test_alphabets`"),
        (dict(split_by="alphabet", val_alphabets=["Alphabet_1"], test_alphabets=["Alphabet_1"]),
         r"alphabets \['Alphabet_1'\] are in both"),
    ],
)
def test_bad_alphabet_options_are_named(five_alphabets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        OmniglotDataModule(root=str(five_alphabets), ways=3, **SMALL, **kwargs)


def test_an_unknown_alphabet_lists_the_ones_there(five_alphabets):
    dm = OmniglotDataModule(root=str(five_alphabets), split_by="alphabet", val_alphabets=["Greek"],
                            test_alphabets=["Alphabet_4"], ways=3, **SMALL)
    with pytest.raises(ValueError, match=r"no alphabet \['Greek'\] .* its alphabets are \['Alphabet_0', .*'Alphabet_4'\]"):
        dm.setup("fit")


def test_within_alphabet_needs_an_alphabet_with_enough_characters(five_alphabets):
    # The validation split has 12 characters, enough for 7-way tasks, but in two alphabets of 6.
    dm = OmniglotDataModule(root=str(five_alphabets), split_by="alphabet", val_alphabets=["Alphabet_0", "Alphabet_1"],
                            test_alphabets=["Alphabet_4"], within_alphabet=True, ways=7, **SMALL)
    with pytest.raises(ValueError, match="split 'val': within_alphabet=True needs an alphabet with at least ways=7 "
                                         "characters, but the largest, 'Alphabet_0', has 6"):
        dm.setup("fit")


def test_the_options_parse_from_a_config(five_alphabets, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from metasgd_lightning.training import MetaSGDLightningModule

    config = tmp_path / "alphabets.yaml"
    config.write_text(
        "model:\n  model: {class_path: metasgd_lightning.methods.models.ConvNet4, init_args: {out_features: 3, "
        "image_size: 8, hidden_channels: 4, downsample: stride}}\n"
        "data:\n  class_path: datamodules.OmniglotDataModule\n  init_args:\n"
        f"    root: {five_alphabets}\n    split_by: alphabet\n    val_alphabets: [Alphabet_0]\n"
        "    test_alphabets: [Alphabet_4]\n    within_alphabet: true\n    ways: 3\n    image_size: 8\n")
    monkeypatch.setattr("sys.argv", ["metasgd"])  # the args below are the command line, not pytest's
    cli = LightningCLI(MetaSGDLightningModule, subclass_mode_data=True, run=False,
                       args=["--config", str(config), "--trainer.logger", "false", "--seed_everything", "0"],
                       save_config_callback=None)
    assert cli.datamodule.split_by == "alphabet" and cli.datamodule.within_alphabet
    assert cli.datamodule.split_alphabets == {"val": ["Alphabet_0"], "test": ["Alphabet_4"]}
