"""The sine-regression task stream: the protocol's ranges, shapes, determinism."""

import gc
import math

import pytest
import torch

from datamodules import SineDataModule


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_shapes_and_protocol_ranges():
    dm = SineDataModule(shots=10, queries=7, meta_batch_size=3, train_tasks_per_epoch=30)
    sx, sy, qx, qy = next(iter(dm.train_dataloader()))
    assert [t.shape for t in (sx, sy, qx, qy)] == [(3, 10, 1), (3, 10, 1), (3, 7, 1), (3, 7, 1)]
    assert all(t.dtype == torch.float32 for t in (sx, sy, qx, qy))
    tasks = dm.tasks("train", 2000)
    xs, ys = zip(*[(torch.cat([t[0], t[2]]), torch.cat([t[1], t[3]])) for t in (tasks[i] for i in range(2000))])
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5.0
    # Recover each task's amplitude from many points of it: it must lie in [0.1, 5.0] and cover the range.
    dense = SineDataModule(shots=400, queries=1, seed=3).tasks("train", 200)
    amplitudes = torch.stack([dense[i][1].abs().max() for i in range(200)])
    assert amplitudes.min() >= 0.1 - 1e-4 and amplitudes.max() <= 5.0 + 1e-4
    assert amplitudes.min() < 0.6 and amplitudes.max() > 4.5


def test_a_task_is_a_sine_with_phase_in_range():
    # y = A sin(x - φ): fit A and φ by least squares on a dense task and check them against the protocol.
    task = SineDataModule(shots=200, queries=1, seed=7).tasks("val", 5)
    for i in range(5):
        x, y = task[i][0][:, 0].double(), task[i][1][:, 0].double()
        design = torch.stack([torch.sin(x), torch.cos(x)], dim=1)  # A sin(x-φ) = A cosφ sin x - A sinφ cos x
        a_cos, minus_a_sin = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
        amplitude, phase = math.hypot(a_cos, minus_a_sin), math.atan2(-minus_a_sin, a_cos)
        assert 0.1 - 1e-6 <= amplitude <= 5.0 + 1e-6
        assert -1e-6 <= phase <= math.pi + 1e-6
        torch.testing.assert_close(design @ torch.tensor([a_cos, minus_a_sin], dtype=torch.float64), y, atol=1e-5, rtol=1e-5)


def test_validation_and_test_sets_are_fixed_and_distinct():
    a, b = SineDataModule(seed=1, meta_batch_size=4, val_tasks=8), SineDataModule(seed=1, meta_batch_size=4, val_tasks=8)
    for x, y in zip(_batches(a.val_dataloader(), 2), _batches(b.val_dataloader(), 2)):
        assert all(torch.equal(s, t) for s, t in zip(x, y))
    val, test = next(iter(a.val_dataloader())), next(iter(a.test_dataloader()))
    assert not torch.equal(val[0], test[0])
    other_seed = next(iter(SineDataModule(seed=2, meta_batch_size=4).val_dataloader()))
    assert not torch.equal(val[0], other_seed[0])


def test_training_stream_is_independent_of_workers_and_new_each_epoch():
    kwargs = dict(seed=5, meta_batch_size=4, train_tasks_per_epoch=16)
    serial = SineDataModule(num_workers=0, **kwargs).train_dataloader()
    parallel = SineDataModule(num_workers=2, **kwargs).train_dataloader()
    for x, y in zip(_batches(serial, 4), _batches(parallel, 4)):
        assert all(torch.equal(s, t) for s, t in zip(x, y))
    first_epoch = _batches(serial, 4)
    serial.sampler.set_epoch(1)
    second_epoch = _batches(serial, 4)
    assert not any(torch.equal(a[0], b[0]) for a in first_epoch for b in second_epoch)
    # The two worker processes end here: left to a later garbage collection (the loaders sit in reference cycles),
    # they ended in some other test's set-up, after 5 s per worker (torch's join timeout) in a full run.
    del serial, parallel
    gc.collect()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shots=0), "`shots` must be an integer >= 1; got 0"),
        (dict(meta_batch_size=-1), "`meta_batch_size` must be an integer >= 1; got -1"),
        (dict(num_workers=-1), "`num_workers` must be an integer >= 0; got -1"),
        (dict(amplitude=(5.0, 0.1)), "`amplitude` must be a finite"),
        (dict(x_range=(float("nan"), 1.0)), "`x_range` must be a finite"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SineDataModule(**kwargs)
