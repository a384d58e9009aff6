"""The networks of the Meta-SGD and MAML papers.

BatchNorm here keeps no running statistics (:class:`TaskBatchNorm2d`): it normalises with the
statistics of the batch it sees, in the inner loop and at evaluation alike. This is the standard
transductive setting of MAML and Meta-SGD: each task's support set and query set are normalised
with their own statistics, and no statistics leak from one task into another.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._internals.torch_internals import functorch_transform_active
from .contract import check_positive_int
from .fast_paths import TaskBatchNorm2d, channels_last_on_cpu

__all__ = ["SineMLP", "ConvNet4", "TaskBatchNorm2d", "channels_last_on_cpu", "functorch_transform_active"]


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
