"""The networks of the Meta-SGD and MAML papers.

BatchNorm here keeps no running statistics (:class:`TaskBatchNorm2d`): it normalises with the
statistics of the batch it sees, in the inner loop and at evaluation alike. This is the standard
transductive setting of MAML and Meta-SGD: each task's support set and query set are normalised
with their own statistics, and no statistics leak from one task into another.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internals.torch_internals import functorch_transform_active
from .contract import check_positive_int

__all__ = ["SineMLP", "ConvNet4", "TaskBatchNorm2d", "channels_last_on_cpu", "functorch_transform_active"]


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
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

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


class SineMLP(nn.Sequential):
    """The sine-regression network of MAML and Meta-SGD: 1-40-40-1 with ReLU.

    Args:
        hidden: width of the two hidden layers.
        in_features: input size.
        out_features: output size.

    Example:
        >>> SineMLP()(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(self, hidden: int = 40, in_features: int = 1, out_features: int = 1) -> None:
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )
        # Recorded so that a checkpoint stores the model as a config, not as a pickled object.
        self.init_args = dict(hidden=hidden, in_features=in_features, out_features=out_features)


class ConvNet4(nn.Module):
    """The 4-block convolutional network of MAML and Meta-SGD for few-shot image classification.

    Each block is a 3x3 convolution, BatchNorm (batch statistics, see the module docstring), ReLU,
    then either 2x2 max-pooling (``downsample="maxpool"``, the mini-ImageNet setting) or a stride of 2
    in the convolution (``downsample="stride"``, MAML's Omniglot setting). A linear layer maps the
    flattened features to the classes.

    Args:
        out_features: number of classes (the N of N-way).
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet).
        hidden_channels: channels of every block (64 for Omniglot, 32 for mini-ImageNet).
        image_size: input height and width (28 for Omniglot, 84 for mini-ImageNet).
        downsample: ``"maxpool"`` or ``"stride"``.

    Example:
        >>> ConvNet4(out_features=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        out_features: int = 5,
        in_channels: int = 1,
        hidden_channels: int = 64,
        image_size: int = 28,
        downsample: Literal["maxpool", "stride"] = "maxpool",
    ) -> None:
        super().__init__()
        if downsample not in ("maxpool", "stride"):
            raise ValueError(f"`downsample` must be 'maxpool' or 'stride'; got {downsample!r}.")
        for name, value in (("out_features", out_features), ("in_channels", in_channels),
                            ("hidden_channels", hidden_channels), ("image_size", image_size)):
            check_positive_int(name, value)
        if downsample == "maxpool" and image_size < 16:
            raise ValueError(f"ConvNet4 with 4 max-pooling blocks needs `image_size` >= 16; got {image_size}. "
                             "Use larger images or downsample='stride'.")
        self.in_channels, self.image_size = in_channels, image_size
        self.init_args = dict(out_features=out_features, in_channels=in_channels, hidden_channels=hidden_channels,
                              image_size=image_size, downsample=downsample)
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            stride = 2 if downsample == "stride" else 1
            blocks += [
                nn.Conv2d(channels, hidden_channels, 3, stride=stride, padding=1),
                TaskBatchNorm2d(hidden_channels),
                nn.ReLU(),
            ]
            if downsample == "maxpool":
                blocks.append(nn.MaxPool2d(2))
            channels = hidden_channels
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            feature_size = self.features(torch.zeros(2, in_channels, image_size, image_size)).flatten(1).shape[1]
        self.classifier = nn.Linear(feature_size, out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"ConvNet4 expects images of shape [batch, {self.in_channels}, {self.image_size}, {self.image_size}]; "
                f"got {tuple(x.shape)}. Set `in_channels`/`image_size` to match the data."
            )
        return self.classifier(self.features(channels_last_on_cpu(x)).flatten(1))


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
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x
    return x.clone(memory_format=torch.channels_last)
