"""Training tasks sized apart from validation and test tasks: the data modules' ``train_queries``."""

from __future__ import annotations

import pytest
import torch

import fixtures_episodic as fx
from datamodules import OmniglotDataModule, SineDataModule


def _omniglot(root, **kwargs) -> OmniglotDataModule:
    settings = dict(root=str(root), layout="folder", fractions=(0.5, 0.25, 0.25), ways=3, shots=1, queries=1,
                    meta_batch_size=2, val_tasks=4, test_tasks=4, num_workers=0, rotations=False)
    return OmniglotDataModule(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    return fx.omniglot_folder(tmp_path_factory.mktemp("omni") / "omni", alphabets=2, characters=8, drawings=6)


def test_training_tasks_take_train_queries_and_evaluation_tasks_keep_queries(omniglot_root):
    dm = _omniglot(omniglot_root, train_queries=4)
    dm.setup(None)
    train = next(iter(dm.train_dataloader()))
    assert [tuple(t.shape[:2]) for t in train] == [(2, 3), (2, 3), (2, 12), (2, 12)]  # 1 + 4 drawings per class
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert [tuple(t.shape[:2]) for t in next(iter(loader))] == [(2, 3), (2, 3), (2, 3), (2, 3)]
    assert dm.queries_of("train") == 4 and dm.queries_of("val") == dm.queries_of("test") == 1
    # Without it, every split has `queries`; evaluation tasks are the same with or without it.
    plain = _omniglot(omniglot_root)
    plain.setup(None)
    assert plain.queries_of("train") == 1
    for split in ("val", "test"):
        for got, expected in zip(dm.tasks(split, 4)[3], plain.tasks(split, 4)[3]):
            assert torch.equal(got, expected)


def test_a_training_task_is_a_pure_function_of_seed_split_and_index(omniglot_root):
    first, again = _omniglot(omniglot_root, train_queries=3), _omniglot(omniglot_root, train_queries=3, num_workers=1)
    first.setup("fit"), again.setup("fit")
    for index in (0, 5, 17):
        for got, expected in zip(again.tasks("train", 20)[index], first.tasks("train", 20)[index]):
            assert torch.equal(got, expected)
    # Through the loaders (task indices from the samplers, images decoded in a worker or not): the same batch.
    for got, expected in zip(next(iter(again.train_dataloader())), next(iter(first.train_dataloader()))):
        assert torch.equal(got, expected)


def test_the_class_size_check_asks_the_training_split_for_train_queries(omniglot_root):
    dm = _omniglot(omniglot_root, train_queries=6)  # 1 + 6 > 6 drawings per character
    with pytest.raises(ValueError, match=r"split 'train'.*shots \+ train_queries = 1 \+ 6 = 7"):
        dm.setup("fit")
    _omniglot(omniglot_root, queries=1, train_queries=5).setup(None)  # 1 + 5 = 6 fits
    with pytest.raises(ValueError, match="train_queries"):
        _omniglot(omniglot_root, train_queries=0)


def test_sine_training_tasks_take_train_queries():
    dm = SineDataModule(shots=5, queries=10, train_queries=45, meta_batch_size=3, val_tasks=4, test_tasks=4)
    plain = SineDataModule(shots=5, queries=10, meta_batch_size=3, val_tasks=4, test_tasks=4)
    dm.setup("fit")
    assert [tuple(t.shape) for t in next(iter(dm.train_dataloader()))] == [(3, 5, 1), (3, 5, 1), (3, 45, 1), (3, 45, 1)]
    assert [tuple(t.shape) for t in next(iter(dm.val_dataloader()))] == [(3, 5, 1), (3, 5, 1), (3, 10, 1), (3, 10, 1)]
    for split in ("val", "test"):  # evaluation tasks are unchanged
        for got, expected in zip(dm.tasks(split, 4)[2], plain.tasks(split, 4)[2]):
            assert torch.equal(got, expected)
    # A training task's curve is a function of (seed, split, index) alone; its size only adds points.
    assert dm.tasks("train", 10).curve(7) == plain.tasks("train", 10).curve(7)
    assert all(torch.equal(a, b) for a, b in zip(dm.tasks("train", 10)[7], dm.tasks("train", 10)[7]))
    with pytest.raises(ValueError, match="train_queries"):
        SineDataModule(train_queries=0)


@pytest.mark.parametrize("name", ["ImageFolderDataModule", "MiniImageNetDataModule", "CIFARFSDataModule"])
def test_every_image_data_module_takes_a_training_task_size(name, tmp_path):
    import datamodules

    data = getattr(datamodules, name)(root=str(tmp_path), shots=1, queries=1, train_queries=9)
    assert (data.queries_of("train"), data.queries_of("val"), data.queries_of("test")) == (9, 1, 1)
    assert data.hparams["train_queries"] == 9  # stored, so checkpoints rebuild the same data module
