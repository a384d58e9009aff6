"""Image preprocessing: a PIL image becomes the float tensor a model takes, with optional augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["ImageTransform", "standard_augmentation"]


class ImageTransform:
    """PIL image -> float tensor ``[channels, image_size, image_size]`` in [0, 1], then optional steps.

    Args:
        image_size: output height and width (``None``: keep the image's size).
        channels: 1 (grey) or 3 (RGB).
        invert: ``1 - x`` (Omniglot: strokes become 1 on a 0 background).
        mean: per-channel mean to subtract (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        augment: a callable on uint8 ``[C, H, W]`` tensors (torchvision v2 transforms), or ``None``.
        resample: PIL resampling filter of the resize.
    """

    def __init__(self, image_size: int | None, channels: int = 3, invert: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: Callable[[Tensor], Tensor] | None = None,
                 resample: int = Image.Resampling.BILINEAR) -> None:
        self.image_size, self.channels, self.invert, self.augment, self.resample = (
            image_size, channels, invert, augment, resample)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __repr__(self) -> str:
        # Only what differs from the defaults, so that two printed transforms are easy to compare.
        parts = [f"image_size={self.image_size}", f"channels={self.channels}"]
        if self.invert:
            parts.append("invert=True")
        if self.mean is not None:
            parts.append(f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}")
        if self.augment is not None:
            parts.append(f"augment={self.augment!r}")
        if self.resample != Image.Resampling.BILINEAR:
            parts.append(f"resample={Image.Resampling(self.resample).name}")
        return f"ImageTransform({', '.join(parts)})"

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        size = self.image_size
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), resample=self.resample)
        x = torch.from_numpy(np.array(image, dtype=np.uint8))
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
        if self.augment is not None:
            x = self.augment(x)
        x = x.to(torch.float32).div_(255.0)
        if self.invert:
            x = 1.0 - x
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


def standard_augmentation(image_size: int, padding: int, color: bool) -> Callable[[Tensor], Tensor]:
    """Random crop with zero padding, horizontal flip and (colour) jitter: the usual few-shot augmentation.

    The setting of Lee et al. 2019 (MetaOptNet) that learn2learn's ``data_augmentation='lee2019'`` uses.
    """
    from torchvision.transforms import v2  # lazy: keeps `import datamodules` fast

    steps: list[Any] = [v2.RandomCrop(image_size, padding=padding)]
    if color:
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)
