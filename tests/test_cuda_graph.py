"""CudaGraphStep: the captured training step equals the eager one (GPU), and falls back in one line where
capture is impossible (CPU, an optimiser without `capturable`, other shapes).

The GPU tests skip without CUDA; ``benchmarks/gpu_check.sh`` runs them on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metasgd_lightning import InnerLoopDivergedError, MetaSGD
from metasgd_lightning.methods.models import ConvNet4
from metasgd_lightning.training.cuda_graph import CudaGraphStep

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CUDA graphs); benchmarks/gpu_check.sh runs it on a GPU")


def _batches(count, tasks=4, ways=5, shots=1, queries=3, size=28, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g)
        qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g)
        sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
        qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
        out.append(tuple(t.to(device) for t in (sx, sy, qx, qy)))
    return out


def _learner(device, **kwargs):
    torch.manual_seed(0)
    model = ConvNet4(out_features=5, hidden_channels=16)
    meta = MetaSGD(model, init_lr=0.1, **kwargs).to(device)
    return meta, torch.optim.Adam(meta.parameters(), lr=1e-3)


def _train(device, batches, enabled, messages=None, **kwargs):
    meta, optimizer = _learner(device, **{k: v for k, v in kwargs.items() if k in ("first_order", "inner_steps",
                                                                                     "per_step_lr", "line_search")})
    step = CudaGraphStep(meta, optimizer, F.cross_entropy, enabled=enabled, warmup_steps=2,
                         gradient_clip_val=kwargs.get("gradient_clip_val"),
                         log=(messages.append if messages is not None else print))
    losses = [float(step(batch).query_loss.detach().mean()) for batch in batches]
    return meta, step, losses


def _assert_same_weights(a: MetaSGD, b: MetaSGD, **tolerance) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tolerance)


# -- on any machine -------------------------------------------------------------------------------------


def test_on_cpu_the_step_runs_eagerly_with_one_line_saying_why():
    batches = _batches(4)
    messages: list[str] = []
    meta, step, _ = _train("cpu", batches, enabled=True, messages=messages)
    assert messages == ["CUDA graph: the training step runs eagerly: CUDA graphs need a CUDA device; the step runs on cpu."]
    assert not step.captured and step.calls == 4
    # the eager steps are plain Meta-SGD steps: adapt (vmap), mean query loss, backward, Adam
    reference, optimizer = _learner("cpu")
    for batch in batches:
        optimizer.zero_grad()
        reference.adapt_tasks(*batch, F.cross_entropy, vectorize="vmap").query_loss.mean().backward()
        optimizer.step()
    _assert_same_weights(meta, reference, rtol=0, atol=0)


def test_without_an_optimizer_the_call_leaves_the_gradients_for_the_callers_step():
    batch = _batches(1)[0]
    meta, _ = _learner("cpu")
    messages: list[str] = []
    step = CudaGraphStep(meta, None, F.cross_entropy, log=messages.append)
    before = [p.detach().clone() for p in meta.parameters()]
    step(batch)
    assert all(torch.equal(p, b) for p, b in zip(meta.parameters(), before))  # no update
    reference, _ = _learner("cpu")
    reference.adapt_tasks(*batch, F.cross_entropy, vectorize="vmap").query_loss.mean().backward()
    for p, q in zip(meta.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        CudaGraphStep(meta, None, F.cross_entropy, gradient_clip_val=1.0)


def test_an_optimizer_without_capturable_is_named():
    meta = MetaSGD(ConvNet4(out_features=5, hidden_channels=4), init_lr=0.1)
    messages: list[str] = []
    step = CudaGraphStep(meta, torch.optim.SGD(meta.parameters(), lr=0.1), F.cross_entropy, log=messages.append)
    assert not step.captured and len(messages) == 1 and "runs eagerly" in messages[0]
    assert "CUDA device" in messages[0] or "capturable" in messages[0]


# -- on a GPU -----------------------------------------------------------------------------------------------


CASES = {
    "second-order": dict(),
    "first-order": dict(first_order=True),
    "3-steps-line-search-per-step-lr-clip": dict(inner_steps=3, line_search="backtracking", per_step_lr=True,
                                                 gradient_clip_val=1.0),
}


@NEEDS_CUDA
@pytest.mark.parametrize("case", sorted(CASES))
def test_captured_step_equals_eager_step(case):
    batches = _batches(6, device="cuda")
    messages: list[str] = []
    eager, _, eager_losses = _train("cuda", batches, enabled=False, **CASES[case])
    graphed, step, graph_losses = _train("cuda", batches, enabled=True, messages=messages, **CASES[case])
    assert step.captured, messages
    assert messages == []
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    _assert_same_weights(graphed, eager, rtol=1e-5, atol=1e-6)  # θ and α after 4 replays
    moved = max(float((p - q).abs().max()) for p, q in zip(graphed.parameters(), _learner("cuda")[0].parameters()))
    assert moved > 1e-4, "the steps did not move the weights: the comparison would have no teeth"


@NEEDS_CUDA
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_captured_gradients_with_the_callers_optimizer_step_equal_eager(first_order):
    """optimizer=None, as a LightningModule would use it: the graph gives the gradients, Adam steps eagerly."""
    batches = _batches(6, device="cuda")
    runs = {}
    for enabled in (False, True):
        meta, optimizer = _learner("cuda", first_order=first_order)
        step = CudaGraphStep(meta, None, F.cross_entropy, warmup_steps=2, enabled=enabled)
        for batch in batches:
            optimizer.zero_grad()  # set_to_none: the replay puts its gradients back
            step(batch)
            optimizer.step()
        assert step.captured == enabled
        runs[enabled] = meta
    _assert_same_weights(runs[True], runs[False], rtol=1e-5, atol=1e-6)


@NEEDS_CUDA
def test_other_shapes_run_eagerly_with_one_line():
    messages: list[str] = []
    meta, optimizer = _learner("cuda")
    step = CudaGraphStep(meta, optimizer, F.cross_entropy, warmup_steps=1, log=messages.append)
    for batch in _batches(3, device="cuda"):
        step(batch)
    assert step.captured
    odd = _batches(2, tasks=3, device="cuda")
    for batch in odd:
        step(batch)
    assert len(messages) == 1 and "differs from the captured" in messages[0] and "run eagerly" in messages[0]


@NEEDS_CUDA
def test_a_diverged_replay_leaves_the_weights_and_raises():
    meta, optimizer = _learner("cuda")
    step = CudaGraphStep(meta, optimizer, F.cross_entropy, warmup_steps=1)
    for batch in _batches(3, device="cuda"):
        step(batch)
    assert step.captured
    before = copy.deepcopy(meta.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    bad = _batches(1, device="cuda", seed=1)[0]
    bad[0][2, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InnerLoopDivergedError, match="task 2"):
        step(bad)
    for key, value in meta.state_dict().items():
        assert torch.equal(value, before[key]), key
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_before[index][key]), (index, key)
