"""The CPU speed paths of the models: exact against the plain ones.

- ``TaskBatchNorm2d`` on CPU: its backward has a hand-written double backward (``_BatchNormBackward``);
  first and second derivatives against finite differences and against torch's own double backward,
  for every combination of the backward's outputs that a loss may use, in both memory formats.
- ``ConvNet4`` on CPU runs on a channels-last copy of its input: same outputs and (second-order)
  meta-gradients as in NCHW, and left alone under ``vmap``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from metasgd_lightning import MetaSGD
from metasgd_lightning.methods.fast_paths import TaskBatchNorm2d, _BatchNormFunction, channels_last_on_cpu
from metasgd_lightning.methods.models import ConvNet4


def _native(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)


def _fused(x, w, b):
    return _BatchNormFunction.apply(x, w, b, 1e-5)


def _inputs(memory_format, shape=(5, 3, 4, 4)):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.rand(shape[1], dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_fused_batch_norm_gradgradcheck(memory_format):
    x, w, b = _inputs(memory_format)
    assert torch.autograd.gradcheck(_fused, (x, w, b))
    assert torch.autograd.gradgradcheck(_fused, (x, w, b))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("used", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)],
                         ids=lambda u: "dx" * u[0] + "dw" * u[1] + "db" * u[2])
def test_fused_double_backward_equals_torchs(memory_format, used):
    """A loss of some of (∂x, ∂γ, ∂β) of the backward (the others unused: None cotangents), differentiated
    with respect to x, γ and the upstream gradient, as a second-order meta-gradient does."""
    x, w, b = _inputs(memory_format)
    results = []
    for bn in (_fused, _native):
        torch.manual_seed(1)
        grad_y = torch.randn_like(x).requires_grad_()
        gx, gw, gb = torch.autograd.grad(bn(x, w, b), (x, w, b), grad_y, create_graph=True)
        loss = sum(u * (t * torch.randn_like(t)).sum() for u, t in zip(used, (gx, gw, gb)) if u)
        results.append(torch.autograd.grad(loss, (x, w, grad_y), allow_unused=True, materialize_grads=True))
    for name, ours, torchs in zip(("x", "weight", "grad_y"), *results):
        torch.testing.assert_close(ours, torchs, msg=f"cotangent of {name}")


@pytest.mark.parametrize("bn", [_fused, _native], ids=["fused", "torch"])
def test_third_order_is_refused_as_by_torch(bn):
    """With a graph of the double backward (create_graph=True through it) the fused path runs torch's own
    formula, so third derivatives behave as with torch's batch norm: refused, never silently wrong."""
    x, w, b = _inputs(torch.contiguous_format)
    gx, gw, _ = torch.autograd.grad(bn(x, w, b).pow(3).sum(), (x, w, b), create_graph=True)
    hx, hw = torch.autograd.grad((gx * gx).sum() + gw.pow(2).sum(), (x, w), create_graph=True)
    with pytest.raises(RuntimeError, match="does not support 3rd"):
        torch.autograd.grad(hx.pow(2).sum() + hw.sum(), (x, w))


def _second_order_grads(model, batch, **options):
    meta = MetaSGD(copy.deepcopy(model), init_lr=0.3, inner_steps=2, line_search="off", **options)
    result = meta.adapt_tasks(*batch, F.cross_entropy, vectorize="loop")
    result.query_loss.mean().backward()
    return result.query_loss.detach(), [p.grad.clone() for p in meta.parameters()]


def _image_batch(tasks=2, ways=3, shots=2, queries=3, size=16, channels=1):
    torch.manual_seed(2)
    sx = torch.randn(tasks, ways * shots, channels, size, size, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, channels, size, size, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone()
    return sx, sy, qx, qy


@pytest.mark.parametrize("channels", [1, 3])
def test_cpu_speed_paths_give_the_plain_meta_gradient(channels, monkeypatch):
    """Second-order, two-step meta-gradients with the CPU paths (channels-last, fused double backward)
    equal those of NCHW with torch's batch-norm double backward."""
    torch.manual_seed(0)
    model = ConvNet4(out_features=3, in_channels=channels, hidden_channels=4, image_size=16).double()
    batch = _image_batch(channels=channels)
    fast_loss, fast_grads = _second_order_grads(model, batch)
    monkeypatch.setattr(TaskBatchNorm2d, "fused_double_backward", False)
    monkeypatch.setattr("metasgd_lightning.methods.models.channels_last_on_cpu", lambda x: x)
    plain_loss, plain_grads = _second_order_grads(model, batch, channels_last=False)
    torch.testing.assert_close(fast_loss, plain_loss)
    for fast, plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast, plain)


def test_channels_last_on_cpu_strides_and_vmap():
    one = torch.randn(4, 1, 6, 6)  # contiguous in both formats: given explicit channels-last strides
    assert channels_last_on_cpu(one).stride() == (36, 1, 6, 1)
    once = channels_last_on_cpu(one)
    assert channels_last_on_cpu(once) is once  # a 1-channel image already converted: no second copy
    three = torch.randn(4, 3, 6, 6)
    converted = channels_last_on_cpu(three)
    assert converted.is_contiguous(memory_format=torch.channels_last) and torch.equal(converted, three)
    assert channels_last_on_cpu(converted) is converted  # already channels-last: no copy
    model = ConvNet4(out_features=2, hidden_channels=4, image_size=16)
    x = torch.randn(3, 2, 1, 16, 16)
    torch.testing.assert_close(torch.func.vmap(model)(x), torch.stack([model(t) for t in x]))
