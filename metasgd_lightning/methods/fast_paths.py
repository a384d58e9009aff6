"""CPU fast paths for any network a method is given: channels-last images, and batch norm whose double backward is fused.

Every :class:`~metasgd_lightning.methods.contract.MetaLearner` applies them to its model at construction
(both on by default; ``channels_last=False`` / ``fast_batch_norm=False`` turn them off):

- :func:`use_task_batch_norm`: each ``nn.BatchNorm2d(track_running_stats=False)`` of the model becomes a
  :class:`TaskBatchNorm2d` holding the same weight and bias: the same values and gradients of every
  order, a double backward in a few fused passes on CPU, and correct second-order gradients under
  ``torch.func.vmap`` (where torch's own batch norm gives wrong ones);
- :class:`ChannelsLastImages`: on CPU, a model with 2-d convolutions is given its 4-d inputs in
  channels-last memory format, so that oneDNN's convolutions and the pooling, batch-norm and ReLU
  kernels after them run channels-last.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internals.torch_internals import functorch_transform_active

__all__ = ["ChannelsLastImages", "TaskBatchNorm2d", "channels_last_on_cpu", "use_task_batch_norm"]


class TaskBatchNorm2d(nn.Module):
    """BatchNorm over the batch it is given, with a learned scale and shift, and no running statistics.

    Numerically ``nn.BatchNorm2d(track_running_stats=False)``. Under torch.func transforms (the
    vectorised inner loop) it is written with plain tensor ops: torch 2.14's native batch-norm kernel
    gives wrong second-order gradients under ``torch.func.vmap``, while these ops are correct there too
    (``tests/test_metasgd.py``). Elsewhere it calls the native kernel, which is right there and faster.
    On CPU its backward is itself a function with a hand-written backward (:class:`_BatchNormBackward`):
    the second-order meta-gradient runs the batch norm's double backward once per layer and task, and
    torch's generic formula for it runs ~50 element-wise ops per layer where this one runs ~10 (a
    second-order ConvNet4 step on the 2-core CPU: 15.51 against 14.95 tasks/s, ``benchmarks/throughput.py``).

    Args:
        num_features: channels.
        eps: added to the variance.
    """

    #: On CPU, the native kernels with the hand-written double backward (``False``: torch's own, for comparison).
    fused_double_backward = True

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if not functorch_transform_active():
            # Outside torch.func (the loop inner loop, evaluation, plain use) torch's fused kernel gives the
            # same values and correct gradients of every order, and ~25% faster meta-training steps on CPU.
            if x.device.type == "cpu" and self.fused_double_backward:
                return _BatchNormFunction.apply(x, self.weight, self.bias, self.eps)
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


class _BatchNormFunction(torch.autograd.Function):
    """Batch norm with the batch's statistics, whose backward is :class:`_BatchNormBackward` (twice differentiable)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        # mean and invstd are functions of x that the double backward differentiates through itself.
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(grad_y, x, weight, mean, invstd, ctx.eps)
        return grad_x, grad_weight, grad_bias, None


class _BatchNormBackward(torch.autograd.Function):
    """Batch norm's backward (torch's kernel) with a double backward in a few fused passes.

    Per channel, over the m entries of the batch: x̂ = (x − μ)·r, r = (σ² + ε)^-½, and for an upstream
    gradient g the backward gives ∂β = Σg, ∂γ = Σg·x̂, ∂x = γr(g − Σg/m − x̂·Σg·x̂/m). Its backward takes
    cotangents (a, b, c) of (∂x, ∂γ, ∂β) to

    - g: γr(a − Σa/m − x̂·Σa·x̂/m) + b·x̂ + c (torch's batch-norm backward kernel applied to a, plus two terms),
    - γ: r·J, with J = Σa·g − (Σa·Σg + Σa·x̂·Σg·x̂)/m,
    - x: r(u − mean(u) − x̂·mean(u·x̂)) − r²γJ·x̂/m, with u = (b − γr·Σa·x̂/m)·g − (γr·Σg·x̂/m)·a, whose
      means follow from the sums above; so x's cotangent is p·g + q·a + s·x̂ + t with per-channel p, q, s, t.

    A Meta-SGD meta-gradient, of any number of inner steps, differentiates each backward once. Where
    this double backward must itself be differentiable (``create_graph=True`` through it: third-order
    derivatives), it runs torch's own formula instead, so that every order is as with torch's batch norm.
    """

    @staticmethod
    def forward(ctx, grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float):
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad_y, x, weight, mean, invstd, grad_weight, grad_bias)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, a: Tensor | None, b: Tensor | None, c: Tensor | None):
        g, x, weight, mean, invstd, sum_g_xhat, sum_g = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _BatchNormBackward._differentiable_backward(ctx, (g, x, weight, mean, invstd), (a, b, c))
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        m = x.numel() // x.shape[1]
        zeros = torch.zeros_like(sum_g)
        xhat = None
        if need_x or (need_g and b is not None):
            xhat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        grad_g = None
        if a is not None:
            grad_g, sum_a_xhat, sum_a = torch.ops.aten.native_batch_norm_backward(
                a, x, weight, None, None, mean, invstd, True, ctx.eps, [need_g, True, True])
            reduce = [d for d in range(x.dim()) if d != 1]
            sum_a_g = (a * g).sum(dim=reduce) if (need_x or need_w) else zeros
        else:
            sum_a_xhat = sum_a = sum_a_g = zeros
        out_g = out_x = out_w = None
        if need_g:
            out_g = grad_g if grad_g is not None else torch.zeros_like(g)
            if b is not None:
                out_g = out_g + _per_channel(b, x) * xhat
            if c is not None:
                out_g = out_g + _per_channel(c, x)
        j = sum_a_g - (sum_a * sum_g + sum_a_xhat * sum_g_xhat) / m
        if need_w:
            out_w = invstd * j
        if need_x:
            b = zeros if b is None else b
            gamma_r = weight * invstd
            mean_u = (b * sum_g - gamma_r * (sum_g_xhat * sum_a + sum_a_xhat * sum_g) / m) / m
            mean_u_xhat = (b * sum_g_xhat - 2 * gamma_r * sum_g_xhat * sum_a_xhat / m) / m
            p = invstd * (b - gamma_r * sum_a_xhat / m)
            s = -invstd * (mean_u_xhat + invstd * weight * j / m)
            out_x = _per_channel(p, x) * g + _per_channel(s, x) * xhat - _per_channel(invstd * mean_u, x)
            if a is not None:
                out_x = out_x - _per_channel(invstd * gamma_r * sum_g_xhat / m, x) * a
        return out_g, out_x, out_w, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, saved, cotangents):
        """This backward through torch's kernel and its autograd formula, with a graph (higher orders)."""
        g, x, weight, mean, invstd = saved
        with torch.enable_grad():
            inputs = [t if t.requires_grad else t.detach().requires_grad_() for t in (g, x, weight)]
            outputs = torch.ops.aten.native_batch_norm_backward(
                *inputs, None, None, mean, invstd, True, ctx.eps, [True, True, True])
            used = [(out, cot) for out, cot in zip(outputs, cotangents) if cot is not None]
            if not used:
                return None, None, None, None, None, None
            grads = torch.autograd.grad([out for out, _ in used], inputs, [cot for _, cot in used],
                                        create_graph=True, allow_unused=True)
        return *grads, None, None, None


def channels_last_on_cpu(x: Tensor) -> Tensor:
    """``x`` in channels-last memory format on CPU (outside ``torch.func`` transforms), else ``x`` as it is.

    Given a channels-last input, oneDNN's convolutions return channels-last outputs, and the max-pooling,
    batch-norm and ReLU kernels that follow run on channels-last tensors: on the 2-core CPU, ConvNet4's
    forward+backward at Omniglot's query batch runs at 96 against 69 GFLOP/s (1.4x), a second-order
    Meta-SGD step at 15.6 against 13.1 tasks/s (1.19x) (``benchmarks/throughput.py``). The weights stay
    as they are. A one-channel image is contiguous in both formats, and torch then keeps its strides,
    which oneDNN reads as NCHW: ``clone`` with an explicit format gives it channels-last strides (a copy
    of the input only).
    Under ``vmap`` a 4-d image is a 5-d tensor, which has no channels-last format: left as it is.
    """
    if x.device.type != "cpu" or functorch_transform_active():
        return x
    if x.is_contiguous(memory_format=torch.channels_last) and (x.stride(1) == 1 or not x.is_contiguous()):
        return x  # already channels-last (a 1-channel image is contiguous both ways: its channel stride says which)
    return x.clone(memory_format=torch.channels_last)


def use_task_batch_norm(model: nn.Module) -> list[str]:
    """Replace, in ``model``, every ``nn.BatchNorm2d`` without running statistics by a :class:`TaskBatchNorm2d`.

    The new layer holds the old one's ``weight`` and ``bias`` (the same ``nn.Parameter`` objects, so an
    optimiser or a reference to them still sees them) and its ``eps``, and computes the same function
    with the same gradients of every order. Layers that keep running statistics, or have no affine
    weights, or are subclasses of ``nn.BatchNorm2d``, are left as they are.

    Returns:
        The names of the layers replaced.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
        >>> use_task_batch_norm(net)
        ['1']
        >>> net[1]
        TaskBatchNorm2d(4, eps=1e-05)
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d or child.track_running_stats or not child.affine:
                continue
            layer = TaskBatchNorm2d(child.num_features, eps=child.eps)
            layer.weight, layer.bias = child.weight, child.bias
            layer.train(child.training)
            setattr(parent, name, layer)
            replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


class ChannelsLastImages:
    """Runs a model with 2-d convolutions on channels-last images on CPU; turns itself off where the model cannot.

    A model may reshape its features with ``.view``, which fails on channels-last tensors: the first
    call that fails on channels-last images and runs on the images as given switches the fast path off
    for this model, with a warning that names the fix.

    Args:
        model: the network.
        enabled: ``False``: always the images as given.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
        >>> ChannelsLastImages(net)(net, torch.zeros(2, 1, 5, 5)).shape
        torch.Size([2, 36])
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.active = bool(enabled) and any(isinstance(m, nn.Conv2d) for m in model.modules())
        self._proven = False  # whether a channels-last call has succeeded

    def __call__(self, run: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if not self.active or x.dim() != 4 or x.device.type != "cpu" or functorch_transform_active():
            return run(x)
        if self._proven:
            return run(channels_last_on_cpu(x))
        try:
            out = run(channels_last_on_cpu(x))
        except RuntimeError as error:
            out = run(x)  # if the model fails on the images as given too, that error is the one to see
            self.active = False
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"The model fails on channels-last images ({first_line}), so it runs on the images as "
                          "given, more slowly on CPU. Use `.reshape`/`.flatten` instead of `.view` in its forward to "
                          "get the fast path, or pass channels_last=False to silence this.", stacklevel=3)
            return out
        self._proven = True
        return out
