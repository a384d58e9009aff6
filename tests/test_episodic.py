"""Episodic image data modules: task format, determinism, class splits, data formats and errors.

The data sets are generated in tmp_path in the exact on-disk formats (tests/fixtures_episodic.py), so
learn2learn's real loading code runs with download=False. One test reads the shared real Omniglot
folder when it is there.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fixtures_episodic as fx
from datamodules import (
    CIFARFSDataModule,
    EpisodicDataModule,
    FC100DataModule,
    ImageFolderDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
    TieredImageNetDataModule,
)
from datamodules.episodic import DownloadError, ImageReadError
from datamodules.learn2learn_import import import_learn2learn
from datamodules.sampling import FixedTaskSampler, TaskIndexSampler

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared/data/omniglot"

SMALL = dict(ways=3, shots=1, queries=2, meta_batch_size=4, train_tasks_per_epoch=8, val_tasks=8, test_tasks=8,
             num_workers=0)


# -- helpers --------------------------------------------------------------------------------------


def image_index(dm: EpisodicDataModule, split: str) -> dict[bytes, int]:
    """Pixels of every image of ``split`` (as the data module transforms them) -> its true class label."""
    source = dm.sources[split]
    return {source[i][0].numpy().tobytes(): source.labels[i] for i in range(len(source))}


def check_batch(dm: EpisodicDataModule, split: str, batch, channels: int, size: int) -> None:
    """Shapes, dtypes, labels 0..N-1 with exactly K and Q per class, one true class per label, no shared image."""
    support_x, support_y, query_x, query_y = batch
    ways, shots, queries = dm.ways, dm.shots, dm.queries
    tasks = support_x.shape[0]
    assert support_x.shape == (tasks, ways * shots, channels, size, size) and support_x.dtype == torch.float32
    assert query_x.shape == (tasks, ways * queries, channels, size, size) and query_x.dtype == torch.float32
    assert support_y.shape == (tasks, ways * shots) and support_y.dtype == torch.int64
    assert query_y.shape == (tasks, ways * queries) and query_y.dtype == torch.int64
    index = image_index(dm, split)
    for t in range(tasks):
        assert torch.bincount(support_y[t], minlength=ways).tolist() == [shots] * ways
        assert torch.bincount(query_y[t], minlength=ways).tolist() == [queries] * ways
        keys = [x.numpy().tobytes() for x in torch.cat([support_x[t], query_x[t]])]
        assert len(set(keys)) == len(keys), "support and query share an image"
        labels = support_y[t].tolist() + query_y[t].tolist()
        true = {}
        for key, label in zip(keys, labels):
            true.setdefault(label, set()).add(index[key])  # KeyError: an image from another split
        assert all(len(classes) == 1 for classes in true.values())
        assert len({next(iter(classes)) for classes in true.values()}) == ways


def batches(loader, n: int = 2) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


def splits_disjoint(dm: EpisodicDataModule) -> None:
    names = {split: {name.split(" (rotated")[0] for name in dm.sources[split].class_names.values()}
             for split in ("train", "val", "test")}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    pixels = {split: set(image_index(dm, split)) for split in ("train", "val", "test")}
    assert not pixels["train"] & pixels["val"] and not pixels["train"] & pixels["test"]
    assert not pixels["val"] & pixels["test"]


@pytest.fixture
def omniglot_root(tmp_path):
    return fx.omniglot_folder(tmp_path / "images_background")


def omniglot(root, **kwargs) -> OmniglotDataModule:
    options = dict(SMALL, fractions=(0.5, 0.25, 0.25), image_size=8)
    options.update(kwargs)
    return OmniglotDataModule(root=str(root), **options)


# -- format ---------------------------------------------------------------------------------------


def test_omniglot_folder_layout_tasks(omniglot_root):
    dm = omniglot(omniglot_root)
    assert dm.resolved_layout() == "folder" and dm.task == "classification" and dm.ways == 3
    dm.setup(None)
    # 24 characters split 12/6/6; the training characters rotated as new classes (x4).
    assert [len(dm.sources[s].class_names) for s in ("train", "val", "test")] == [48, 6, 6]
    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader()}
    for split, loader in loaders.items():
        for batch in batches(loader):
            check_batch(dm, split, batch, channels=1, size=8)
    splits_disjoint(dm)
    # Inverted: strokes (20% of pixels, black in the files) are 1 on a 0 background.
    x = dm.sources["val"][0][0]
    assert 0.05 < float(x.mean()) < 0.5


def test_omniglot_rotations_are_classes(omniglot_root):
    dm = omniglot(omniglot_root, image_size=12)
    dm.setup("fit")
    source = dm.sources["train"]
    n = len(source) // 4
    base, turned = source[0], source[n]  # the same drawing, rotated by 90 degrees
    assert torch.equal(torch.rot90(base[0], 1, dims=(-2, -1)), turned[0]) and turned[1] == base[1] * 4 + 1
    no_rotations = omniglot(omniglot_root, image_size=12, rotations=False)
    no_rotations.setup("fit")
    assert len(no_rotations.sources["train"].class_names) == 12


def test_omniglot_learn2learn_layout(tmp_path, monkeypatch):
    # learn2learn's FullOmniglot over torchvision's layout; torchvision's MD5 check of the zips is the
    # only thing bypassed (the fixture cannot have the real zips' checksums).
    import torchvision.datasets.omniglot as tv_omniglot

    monkeypatch.setattr(tv_omniglot.Omniglot, "_check_integrity", lambda self: True)
    folder = tmp_path / "omniglot-py"
    fx.omniglot_folder(folder / "images_background", alphabets=2, characters=12, seed=1)
    fx.omniglot_folder(folder / "images_evaluation", alphabets=2, characters=8, seed=2, start=2)
    for name in ("images_background", "images_evaluation"):
        (folder / f"{name}.zip").write_bytes(b"")
    dm = OmniglotDataModule(root=str(tmp_path), image_size=8, **SMALL)
    assert dm.resolved_layout() == "learn2learn"
    dm.setup(None)
    # 40 characters in the proportions 1100/100/423 of learn2learn's benchmark: 27/3/10.
    assert [len(dm.sources[s].class_names) for s in ("train", "val", "test")] == [27 * 4, 3, 10]
    names = set(dm.sources["val"].class_names.values()) | set(dm.sources["test"].class_names.values())
    assert {n.split("/")[0] for n in names} <= {"images_background", "images_evaluation"}
    splits_disjoint(dm)
    check_batch(dm, "test", next(iter(dm.test_dataloader())), channels=1, size=8)


def test_omniglot_learn2learn_characters_are_learn2learns_in_a_fixed_order(tmp_path, monkeypatch):
    # The same characters and drawings as FullOmniglot (read through its public items: image, label), listed
    # by name rather than in the file system's order, so that the character split is the same on every machine.
    import numpy as np
    import torchvision.datasets.omniglot as tv_omniglot
    from PIL import Image

    from datamodules.omniglot import official_characters

    monkeypatch.setattr(tv_omniglot.Omniglot, "_check_integrity", lambda self: True)
    folder = tmp_path / "omniglot-py"
    fx.omniglot_folder(folder / "images_background", alphabets=3, characters=3, drawings=2, seed=1)
    fx.omniglot_folder(folder / "images_evaluation", alphabets=2, characters=3, drawings=2, seed=2, start=3)
    ours = {f"{part}/{name}": drawings for part in ("images_background", "images_evaluation")
            for name, drawings in official_characters(folder / part).items()}
    assert list(ours) == sorted(ours) and len(ours) == 15
    theirs: dict[int, set[bytes]] = {}
    for image, label in import_learn2learn().vision.datasets.FullOmniglot(root=str(tmp_path)):
        theirs.setdefault(label, set()).add(np.array(image).tobytes())
    mine = [{np.array(Image.open(path).convert("L")).tobytes() for path in drawings} for drawings in ours.values()]
    assert sorted(map(sorted, mine)) == sorted(map(sorted, theirs.values()))


def test_omniglot_skips_macos_and_hidden_folders(tmp_path):
    from datamodules.omniglot import official_characters

    # Only macOS's resource forks of an unzipped archive: not a folder of drawings.
    fork = tmp_path / "__MACOSX" / "Greek" / "character01"
    fork.mkdir(parents=True)
    (fork / "._0101_01.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert OmniglotDataModule(root=str(tmp_path), **SMALL).resolved_layout() == "learn2learn"
    root = fx.omniglot_folder(tmp_path / "images_background", alphabets=1, characters=2, drawings=2)
    (root / "__MACOSX" / "character01").mkdir(parents=True)
    (root / ".hidden" / "character01").mkdir(parents=True)
    (root / "Alphabet_0" / "character01" / "._0000_01.png").write_bytes(b"\x00\x05\x16\x07")
    characters = official_characters(root)
    assert list(characters) == ["Alphabet_0/character01", "Alphabet_0/character02"]
    assert [len(drawings) for drawings in characters.values()] == [2, 2]


def test_omniglot_split_dirs(tmp_path):
    dirs = {s: fx.omniglot_folder(tmp_path / s, alphabets=1, characters=4, seed=i)
            for i, s in enumerate(("a", "b", "c"))}
    dm = OmniglotDataModule(train_dir=str(dirs["a"]), val_dir=str(dirs["b"]), test_dir=str(dirs["c"]),
                            image_size=8, **SMALL)
    assert dm.resolved_layout() == "dirs"
    dm.setup(None)
    assert [len(dm.sources[s].class_names) for s in ("train", "val", "test")] == [16, 4, 4]
    check_batch(dm, "val", next(iter(dm.val_dataloader())), channels=1, size=8)


def test_mini_imagenet_pickles(tmp_path):
    dm = MiniImageNetDataModule(root=str(fx.mini_imagenet(tmp_path)), image_size=8, **SMALL)
    dm.setup(None)
    assert [len(dm.sources[s].class_names) for s in ("train", "val", "test")] == [6, 5, 5]
    assert dm.sources["val"].class_names[0] == "nval00000"
    for split, loader in (("train", dm.train_dataloader()), ("test", dm.test_dataloader())):
        check_batch(dm, split, next(iter(loader)), channels=3, size=8)
    splits_disjoint(dm)
    # Pixels scaled to [0, 1]; with mean/std they are normalised.
    assert 0.0 <= float(dm.sources["val"][0][0].min()) and float(dm.sources["val"][0][0].max()) <= 1.0
    normalised = MiniImageNetDataModule(root=str(tmp_path), image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                        **SMALL)
    normalised.setup("validate")
    assert torch.allclose(normalised.sources["val"][0][0], (dm.sources["val"][0][0] - 0.5) / 0.25)


def test_tiered_imagenet_pickles(tmp_path):
    dm = TieredImageNetDataModule(root=str(fx.tiered_imagenet(tmp_path)), image_size=8, **SMALL)
    dm.setup(None)
    assert dm.sources["test"].class_names[0] == "test_class_0"
    check_batch(dm, "train", next(iter(dm.train_dataloader())), channels=3, size=8)
    check_batch(dm, "val", next(iter(dm.val_dataloader())), channels=3, size=8)
    splits_disjoint(dm)


def test_cifarfs_folders_and_a_partial_copy(tmp_path):
    root = fx.cifarfs_raw(tmp_path)
    dm = CIFARFSDataModule(root=str(root), image_size=8, **SMALL)
    dm.prepare_data()  # learn2learn copies each split's classes to processed/
    dm.setup(None)
    assert sorted(dm.sources["val"].class_names.values()) == [f"val_class_{c}" for c in range(5)]
    check_batch(dm, "train", next(iter(dm.train_dataloader())), channels=3, size=8)
    splits_disjoint(dm)
    # An interrupted copy (a file missing) is detected and redone, not trusted.
    victim = next((root / "cifarfs/processed/test/test_class_2").iterdir())
    victim.unlink()
    again = CIFARFSDataModule(root=str(root), image_size=8, **SMALL)
    again.setup("test")
    assert victim.exists() and len(again.sources["test"]) == 25


def test_fc100_pickles(tmp_path):
    dm = FC100DataModule(root=str(fx.fc100(tmp_path)), image_size=8, **SMALL)
    dm.setup(None)
    check_batch(dm, "train", next(iter(dm.train_dataloader())), channels=3, size=8)
    check_batch(dm, "test", next(iter(dm.test_dataloader())), channels=3, size=8)
    splits_disjoint(dm)


def test_image_folder_nested_fractions_channels(tmp_path):
    root = fx.image_folder(tmp_path / "imgs", classes=12, nested=True)
    dm = ImageFolderDataModule(root=str(root), image_size=6, channels=1, fractions=(0.5, 0.25, 0.25),
                               mean=(0.5,), std=(0.5,), **SMALL)
    dm.setup(None)
    assert [len(dm.sources[s].class_names) for s in ("train", "val", "test")] == [6, 3, 3]
    assert all(name.startswith("group_") and "/class_" in name for name in dm.sources["train"].class_names.values())
    check_batch(dm, "val", next(iter(dm.val_dataloader())), channels=1, size=6)
    splits_disjoint(dm)
    assert float(dm.sources["val"][0][0].min()) < 0  # normalised
    # The class split is a function of split_seed only.
    other = ImageFolderDataModule(root=str(root), image_size=6, fractions=(0.5, 0.25, 0.25), **dict(SMALL, seed=5))
    other.setup("validate")
    assert set(other.sources["val"].class_names.values()) == set(dm.sources["val"].class_names.values())


def test_image_folder_split_dirs(tmp_path):
    train = fx.image_folder(tmp_path / "train", classes=4, nested=False)
    val = fx.image_folder(tmp_path / "val", classes=3, nested=False, seed=1)
    dm = ImageFolderDataModule(train_dir=str(train), val_dir=str(val), image_size=8, **SMALL)
    dm.setup("fit")
    check_batch(dm, "train", next(iter(dm.train_dataloader())), channels=3, size=8)
    with pytest.raises(ValueError, match="`test_dir` is not set"):
        dm.setup("test")


# -- determinism ----------------------------------------------------------------------------------


def test_val_and_test_tasks_identical_across_instances(omniglot_root):
    first, second = omniglot(omniglot_root), omniglot(omniglot_root)
    first.setup(None)
    second.setup(None)
    assert same(batches(first.val_dataloader()), batches(second.val_dataloader()))
    assert same(batches(first.test_dataloader()), batches(second.test_dataloader()))
    assert same(batches(first.train_dataloader()), batches(second.train_dataloader()))


def test_train_tasks_change_with_epoch_and_seed(omniglot_root):
    dm = omniglot(omniglot_root)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = batches(loader)
    loader.sampler.set_epoch(1)  # Lightning does this at every epoch start
    assert not same(epoch0, batches(loader))
    other = omniglot(omniglot_root, seed=1)
    other.setup("fit")
    assert not same(epoch0, batches(other.train_dataloader()))
    # Validation tasks are a different stream from training tasks.
    assert not same(batches(dm.val_dataloader(), 1), epoch0[:1])


def test_same_training_tasks_with_0_and_2_workers(tmp_path):
    # With augmentation on, so that torch's random generator is covered too.
    root = fx.image_folder(tmp_path, classes=12, size=10)
    options = dict(SMALL, image_size=8, fractions=(0.5, 0.25, 0.25), augment=True, train_tasks_per_epoch=16)
    loaders = []
    for workers in (0, 2):
        dm = ImageFolderDataModule(root=str(root), **dict(options, num_workers=workers))
        dm.setup("fit")
        loaders.append(dm.train_dataloader())
    inline, parallel = list(loaders[0]), list(loaders[1])
    assert len(inline) == 4 and same(inline, parallel)
    assert not torch.equal(inline[0][0][0], inline[1][0][0])


def test_sampling_leaves_global_random_state_alone(omniglot_root):
    dm = omniglot(omniglot_root)
    dm.setup("fit")
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    dm.tasks("train", 4)[2]
    assert random.random() == expected[0] and torch.equal(torch.rand(1), expected[1])


def test_two_ranks_draw_disjoint_tasks(omniglot_root):
    # Under DDP the samplers shard the global task indices themselves (they are DistributedSamplers, so
    # Lightning does not wrap them); rank r of W takes indices start + r, start + r + W, ...
    dm = omniglot(omniglot_root, train_tasks_per_epoch=16)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, TaskIndexSampler) and isinstance(val.sampler, FixedTaskSampler)
    indices, per_rank = [], []
    for rank in (0, 1):
        sampler = TaskIndexSampler(16, num_replicas=2, rank=rank)
        sampler.set_epoch(1)  # indices 16..31
        indices.append(list(sampler))
        per_rank.append(list(DataLoader(train.dataset, batch_size=dm.meta_batch_size, sampler=sampler)))
    assert not set(indices[0]) & set(indices[1])
    assert sorted(indices[0] + indices[1]) == list(range(16, 32))
    # Step s of the two ranks together covers the tasks of step s of one device with twice the meta-batch.
    for step in range(2):
        both = indices[0][4 * step:4 * step + 4] + indices[1][4 * step:4 * step + 4]
        assert sorted(both) == list(range(16 + 8 * step, 24 + 8 * step))
    # Rank r's j-th task is global task indices[r][j], the same task a single device would draw.
    tasks = dm.tasks("train", 32)
    for rank in (0, 1):
        expected = tasks[indices[rank][1]]
        assert all(torch.equal(per_rank[rank][0][k][1], expected[k]) for k in range(4))
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])
    # Validation: every fixed task on exactly one rank.
    shares = [list(FixedTaskSampler(dm.val_tasks, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(dm.val_tasks))


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, expected", [
    (lambda root: OmniglotDataModule(root=root, **SMALL), "omniglot-py"),
    (lambda root: OmniglotDataModule(root=root, layout="folder", **SMALL), "the folder"),
    (lambda root: MiniImageNetDataModule(root=root, **SMALL), "mini-imagenet-cache-train.pkl"),
    (lambda root: TieredImageNetDataModule(root=root, **SMALL), "train_images_png.pkl"),
    (lambda root: CIFARFSDataModule(root=root, **SMALL), "splits/bertinetto"),
    (lambda root: FC100DataModule(root=root, **SMALL), "FC100_train.pickle"),
    (lambda root: ImageFolderDataModule(root=root, **SMALL), "the folder"),
])
def test_missing_data_names_path_and_layout(tmp_path, make, expected):
    root = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="data not found") as error:
        make(root).setup("fit")
    message = str(error.value)
    assert expected in message and root in message and "Layout:" in message
    assert not (tmp_path / "nothing_here").exists()  # nothing created with download=False


def _l2l_module(name: str):
    import_learn2learn()
    return sys.modules[name]


def test_mini_imagenet_download_of_html_page_is_deleted(tmp_path, monkeypatch):
    module = _l2l_module("learn2learn.vision.datasets.mini_imagenet")

    def html(*args):  # what learn2learn's downloads have returned: a web page saved under the data's name
        Path(args[-1]).write_text("<!DOCTYPE html><html><body>Quota exceeded</body></html>")

    monkeypatch.setattr(module, "download_file", html)
    monkeypatch.setattr(module, "download_file_from_google_drive", html)
    dm = MiniImageNetDataModule(root=str(tmp_path), download=True, **SMALL)
    with pytest.raises(DownloadError, match="HTML page") as error:
        dm.prepare_data()
    assert "mini-imagenet-cache-train.pkl" in str(error.value)
    assert not (tmp_path / "mini-imagenet-cache-train.pkl").exists()


def test_mini_imagenet_failed_download_leaves_nothing(tmp_path, monkeypatch):
    module = _l2l_module("learn2learn.vision.datasets.mini_imagenet")

    def broken(source, destination, *args):
        Path(destination).write_bytes(b"\x80\x04partial")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(module, "download_file", broken)
    monkeypatch.setattr(module, "download_file_from_google_drive", broken)
    # learn2learn retries on the partial file and fails to unpickle it; either way nothing may remain.
    with pytest.raises(DownloadError, match=r"Downloading mini-ImageNet \(train\).*Removed what it left behind"):
        MiniImageNetDataModule(root=str(tmp_path), download=True, **SMALL).setup("fit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, write, bad, name", [
    (MiniImageNetDataModule, fx.mini_imagenet, ["mini-imagenet-cache-validation.pkl"], "mini-ImageNet"),
    (TieredImageNetDataModule, fx.tiered_imagenet,
     ["tiered-imagenet/val_images_png.pkl", "tiered-imagenet/val_labels.pkl"], "tiered-ImageNet"),
    (FC100DataModule, fx.fc100, ["FC100_val.pickle"], "FC100"),
])
def test_corrupt_data_is_reported_and_deleted_only_when_downloading(tmp_path, make, write, bad, name):
    # The same rule for every learn2learn benchmark: name the files; delete them only with download=True.
    write(tmp_path)
    (tmp_path / bad[0]).write_text("<html>Not Found</html>")
    with pytest.raises(RuntimeError, match=f"cannot be read as {name} data.*HTML page.*probably a failed") as error:
        make(root=str(tmp_path), **SMALL).setup("validate")
    assert all(str(tmp_path / b) in str(error.value) for b in bad) and (tmp_path / bad[0]).exists()
    with pytest.raises(RuntimeError, match="HTML page.*deleted, so that the next run downloads"):
        make(root=str(tmp_path), download=True, **SMALL).setup("validate")
    assert not any((tmp_path / b).exists() for b in bad)


def test_omniglot_failed_download_leaves_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.omniglot as tv_omniglot

    def broken(url, download_root, filename=None, md5=None, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        Path(download_root, filename).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_omniglot, "download_and_extract_archive", broken)
    with pytest.raises(DownloadError, match="Downloading Omniglot.*network unreachable"):
        OmniglotDataModule(root=str(tmp_path), download=True, **SMALL).prepare_data()
    assert not (tmp_path / "omniglot-py").exists()


def test_more_ways_than_classes(omniglot_root):
    with pytest.raises(ValueError, match=r"split 'val' has 6 classes, fewer than ways=7"):
        omniglot(omniglot_root, ways=7).setup("fit")


def test_more_shots_and_queries_than_images(tmp_path):
    root = fx.image_folder(tmp_path, classes=6, per_class=4, nested=False)
    (root / "class_03" / "0.png").unlink()
    dm = ImageFolderDataModule(root=str(root), fractions=(1.0, 0.0, 0.0), image_size=8, **dict(SMALL, shots=2))
    expected = r"split 'train': class 'class_03' has 3 images.*shots \+ queries = 2 \+ 2 = 4"
    with pytest.raises(ValueError, match=expected):
        dm.setup("fit")


def test_unreadable_image_names_the_file(tmp_path):
    root = fx.image_folder(tmp_path, classes=6, per_class=3, nested=False)
    broken = root / "class_01" / "1.png"
    broken.write_bytes(b"\x89PNG not really")
    dm = ImageFolderDataModule(root=str(root), fractions=(0.5, 0.5, 0.0), image_size=8, **SMALL)
    dm.setup("fit")  # finds the files, decodes none
    with pytest.raises(ImageReadError, match=f"Cannot read image {broken}"):
        for loader in (dm.train_dataloader(), dm.val_dataloader()):  # every task holds every image of its split
            list(loader)


# -- preprocessing --------------------------------------------------------------------------------

NORMALISED = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))


@pytest.mark.parametrize("make, channels, invert, padding, mean", [
    (lambda r: OmniglotDataModule(root=r, image_size=12), 1, True, None, None),
    (lambda r: ImageFolderDataModule(root=r, image_size=16, channels=1, augment=True), 1, False, 2, None),
    (lambda r: MiniImageNetDataModule(root=r, augment=True, **NORMALISED), 3, False, 8, NORMALISED["mean"]),
    (lambda r: TieredImageNetDataModule(root=r, augment=True, **NORMALISED), 3, False, 8, NORMALISED["mean"]),
    (lambda r: CIFARFSDataModule(root=r, augment=True), 3, False, 4, None),
    (lambda r: FC100DataModule(root=r, **NORMALISED), 3, False, None, NORMALISED["mean"]),
])
def test_every_image_data_module_gives_its_preprocessing_per_split(tmp_path, make, channels, invert, padding, mean):
    dm = make(str(tmp_path))
    for split in ("train", "val", "test"):
        transform = dm.transform(split)
        assert (transform.image_size, transform.channels, transform.invert) == (dm.image_size, channels, invert)
        assert (None if transform.mean is None else tuple(transform.mean.flatten().tolist())) == pytest.approx(mean)
        # Only training images are augmented: a trained model is evaluated, and used, on the plain ones.
        augmented = split == "train" and padding is not None
        assert (transform.augment is not None) == augmented
        if augmented:
            assert transform.augment.transforms[0].padding == [padding] * 4
    with pytest.raises(ValueError, match="unknown split 'validation'; expected one of"):
        dm.transform("validation")


def test_loaded_images_are_preprocessed_by_the_modules_transform(tmp_path, omniglot_root):
    from PIL import Image

    modules = [omniglot(omniglot_root, image_size=12),
               ImageFolderDataModule(root=str(fx.image_folder(tmp_path / "folder")), image_size=6, channels=1,
                                     fractions=(0.5, 0.25, 0.25), **SMALL),
               MiniImageNetDataModule(root=str(fx.mini_imagenet(tmp_path / "mini")), image_size=8, **SMALL)]
    for dm in modules:
        dm.setup("test")
        source = dm.sources["test"]
        assert torch.equal(source[1][0], dm.transform("test")(source.read(source.keys[1]))), type(dm).__name__
    # Omniglot's, written out: grey, Lanczos resize, scaled to [0, 1], inverted.
    path = modules[0].sources["test"].keys[0]
    resized = Image.open(path).convert("L").resize((12, 12), Image.Resampling.LANCZOS)
    pixels = 1.0 - torch.tensor(np.asarray(resized), dtype=torch.float32).view(1, 12, 12) / 255.0
    torch.testing.assert_close(modules[0].transform("test")(Image.open(path)), pixels)


def test_a_data_module_that_does_not_describe_its_preprocessing_is_named():
    class Plain(EpisodicDataModule):
        def load_split(self, split):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="Plain does not describe its preprocessing: call "
                                        r"self.set_image_options\(...\) in __init__"):
        Plain(root=None).transform("test")


@pytest.mark.parametrize("make, message", [
    (lambda r: OmniglotDataModule(root=r, ways=1), "`ways` must be an integer >= 2; got 1"),
    (lambda r: OmniglotDataModule(root=r, shots=0), "`shots` must be an integer >= 1; got 0"),
    (lambda r: OmniglotDataModule(root=r, num_workers=-1), "`num_workers` must be an integer >= 0"),
    (lambda r: OmniglotDataModule(root=r, layout="zip"), "`layout` must be 'auto', 'learn2learn' or 'folder'"),
    (lambda r: OmniglotDataModule(root=r, fractions=(0.5, 0.5, 0.5)), "`fractions` must be three numbers"),
    (lambda r: ImageFolderDataModule(root=r, channels=2), "`channels` must be 1 or 3; got 2"),
    (lambda r: ImageFolderDataModule(root=r, mean=(0.5, 0.5, 0.5)), "both `mean` and `std`"),
    (lambda r: ImageFolderDataModule(root=r, mean=(0.5,), std=(1.0,)), "one value per channel \\(3\\)"),
    (lambda r: ImageFolderDataModule(), "needs either `root`"),
    (lambda r: MiniImageNetDataModule(root=r, image_size=0), "`image_size` must be an integer >= 1"),
    (lambda r: OmniglotDataModule(root=r, image_size=0), "OmniglotDataModule `image_size` must be an integer >= 1"),
    (lambda r: CIFARFSDataModule(root=r, mean=(0.5,), std=(1.0,)), "CIFARFSDataModule `mean` and `std` must have one"),
])
def test_argument_errors(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make(str(tmp_path))


# -- integration ----------------------------------------------------------------------------------


@pytest.mark.cost(9)  # seconds, for the order of the parallel run (conftest.py)
def test_import_and_loading_are_silent_and_lazy(tmp_path):
    fx.image_folder(tmp_path, classes=6, nested=False)
    code = (
        "import sys, datamodules\n"
        "assert 'learn2learn' not in sys.modules, 'import datamodules imported learn2learn'\n"
        f"dm = datamodules.ImageFolderDataModule(root={str(tmp_path)!r}, fractions=(0.5, 0.5, 0.0), image_size=8, "
        "ways=2, shots=1, queries=1, meta_batch_size=2, num_workers=1)\n"
        "dm.setup('fit')\n"
        "next(iter(dm.train_dataloader()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)


def test_fit_and_validate_end_to_end(omniglot_root):
    from metasgd_lightning import ConvNet4, MetaSGDLightningModule

    dm = omniglot(omniglot_root, image_size=28)
    model = ConvNet4(out_features=dm.ways, in_channels=1, hidden_channels=8, image_size=28, downsample="stride")
    module = MetaSGDLightningModule(model, task=dm.task, init_lr=(0.005, 0.1))
    trainer = L.Trainer(max_steps=2, inference_mode=False, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    result = trainer.validate(module, dm, verbose=False)[0]
    assert 0.0 <= result["val/acc"] <= 1.0


CONFIGS = ["omniglot_5way_1shot.yaml", "omniglot_5way_5shot.yaml", "omniglot_20way_1shot.yaml",
           "omniglot_20way_5shot.yaml", "miniimagenet_5way_1shot.yaml", "miniimagenet_5way_5shot.yaml",
           "cifarfs_5way_1shot.yaml", "fc100_5way_1shot.yaml", "image_folder_template.yaml"]


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_instantiate_with_linked_ways(config, tmp_path, monkeypatch):
    from lightning.pytorch import LightningDataModule

    from metasgd_lightning import MetaSGDLightningModule
    from metasgd_lightning.commands.cli import MetaSGDCLI

    monkeypatch.chdir(tmp_path)  # the configs' run folders are relative
    monkeypatch.setattr(sys, "argv", ["metasgd"])  # LightningCLI warns when pytest's arguments are there too
    cli = MetaSGDCLI(MetaSGDLightningModule, LightningDataModule, subclass_mode_data=True, run=False,
                     trainer_defaults={"inference_mode": False}, args=["--config", str(REPO / "configs" / config)])
    dm = cli.datamodule
    assert isinstance(dm, EpisodicDataModule) and cli.model.task == "classification"
    assert cli.model.model.classifier.out_features == dm.ways
    assert cli.model.model.image_size == dm.image_size


def test_shared_real_omniglot_folder(tmp_path):
    archive = SHARED_OMNIGLOT / "images_background_small1.zip"
    if not archive.is_file():
        pytest.skip(f"the real Omniglot archive {archive} is not on this machine (see shared/data/omniglot/README.md)")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path)
    dm = OmniglotDataModule(root=str(tmp_path), ways=5, shots=1, queries=1, meta_batch_size=4, val_tasks=4,
                            num_workers=0)
    assert dm.resolved_layout() == "folder"  # found below root: <root>/images_background_small1/<Alphabet>/characterNN
    dm.setup(None)
    characters = [len(dm.sources[s].class_names) for s in ("train", "val", "test")]
    assert characters[0] // 4 + characters[1] + characters[2] == 136
    batch = next(iter(dm.val_dataloader()))
    assert batch[0].shape == (4, 5, 1, 28, 28) and batch[2].shape == (4, 5, 1, 28, 28)
    assert 0.0 < float(batch[0].mean()) < 0.3  # inverted: few stroke pixels are 1
