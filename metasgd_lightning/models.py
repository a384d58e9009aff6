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

from .metasgd import check_positive_int

__all__ = ["SineMLP", "ConvNet4", "TaskBatchNorm2d", "functorch_transform_active"]


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running; ``True`` if torch cannot say.

    torch has no public way to ask this. This function is the one place that uses torch's private
    ``torch._C._are_functorch_transforms_active``; ``tests/test_third_party_internals.py`` fails if a
    torch release removes or changes it. Without it, :class:`TaskBatchNorm2d` takes its plain-ops path
    everywhere: still correct, a little slower.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


class TaskBatchNorm2d(nn.Module):
    """BatchNorm over the batch it is given, with a learned scale and shift, and no running statistics.

    Numerically ``nn.BatchNorm2d(track_running_stats=False)``. Under torch.func transforms (the
    vectorised inner loop) it is written with plain tensor ops: torch 2.14's native batch-norm kernel
    gives wrong second-order gradients under ``torch.func.vmap``, while these ops are correct there too
    (``tests/test_metasgd.py``). Elsewhere it calls the native kernel, which is right there and faster.

    Args:
        num_features: channels.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not functorch_transform_active():
            # Outside torch.func (the loop inner loop, evaluation, plain use) torch's fused kernel gives the
            # same values and correct gradients of every order, and ~25% faster meta-training steps on CPU.
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


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
        return self.classifier(self.features(x).flatten(1))
