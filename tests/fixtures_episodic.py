"""Tiny data sets in the exact on-disk formats that learn2learn and the official releases use.

Every image is random noise from a seeded generator, so no two images are equal and a test can tell
which stored image (and class) a task's image came from by its pixels.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_MODES = {"train": "train", "val": "validation", "test": "test"}


def _noise(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    shape = (size, size) if channels == 1 else (size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def omniglot_folder(root: Path, alphabets: int = 3, characters: int = 8, drawings: int = 4, size: int = 12,
                    seed: int = 0, start: int = 0) -> Path:
    """``root/Alphabet_i/characterNN/NNNN_MM.png``: 1-bit drawings, like the official Omniglot release."""
    rng = np.random.default_rng(seed)
    for a in range(alphabets):
        for c in range(characters):
            folder = root / f"Alphabet_{start + a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(drawings):
                bits = rng.random((size, size)) < 0.2  # sparse "strokes"
                Image.fromarray(~bits).convert("1").save(folder / f"{start + a:02d}{c:02d}_{d + 1:02d}.png")
    return root


def support_and_queries(root: Path, folder: Path, classes: int = 3, queries: int = 2) -> tuple[Path, Path]:
    """From an :func:`omniglot_folder` ``root``: ``folder/support/<character>/`` with the first drawing of each of
    ``classes`` characters of ``Alphabet_0``, and ``folder/queries/`` with the next ``queries`` drawings of each."""
    for character in sorted(root.glob("Alphabet_0/character0*"))[:classes]:
        drawings = sorted(character.glob("*.png"))
        (folder / "support" / character.name).mkdir(parents=True)
        shutil.copy(drawings[0], folder / "support" / character.name / drawings[0].name)
        (folder / "queries").mkdir(exist_ok=True)
        for drawing in drawings[1:1 + queries]:
            shutil.copy(drawing, folder / "queries" / drawing.name)
    return folder / "support", folder / "queries"


def image_folder(root: Path, classes: int = 12, per_class: int = 4, size: int = 8, channels: int = 3,
                 nested: bool = True, seed: int = 0) -> Path:
    """``root/group_g/class_c/i.png`` (``nested``) or ``root/class_c/i.png``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"group_{c % 3}" / f"class_{c:02d}" if nested else root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_noise(rng, size, channels)).save(folder / f"{i}.png")
    return root


def mini_imagenet(root: Path, classes: dict[str, int] | None = None, per_class: int = 5, size: int = 8,
                  seed: int = 0) -> Path:
    """``root/mini-imagenet-cache-{train,validation,test}.pkl``: dicts with ``image_data`` and ``class_dict``."""
    classes = classes or {"train": 6, "val": 5, "test": 5}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in classes.items():
        images = np.stack([_noise(rng, size, 3) for _ in range(n * per_class)])
        class_dict = {f"n{split}{c:05d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(n)}
        with open(root / f"mini-imagenet-cache-{SPLIT_MODES[split]}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return root


def tiered_imagenet(root: Path, classes: dict[str, int] | None = None, per_class: int = 5, size: int = 8,
                    seed: int = 0) -> Path:
    """``root/tiered-imagenet/{split}_images_png.pkl`` (PNG bytes) and ``{split}_labels.pkl``."""
    classes = classes or {"train": 6, "val": 5, "test": 5}
    rng = np.random.default_rng(seed)
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in classes.items():
        encoded = []
        for _ in range(n * per_class):
            buffer = io.BytesIO()
            Image.fromarray(_noise(rng, size, 3)).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        labels = np.repeat(np.arange(n), per_class)
        with open(folder / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(encoded, f)
        with open(folder / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": labels, "label_general": labels // 2,
                         "label_specific_str": [f"{split}_class_{c}" for c in range(n)]}, f)
    return root


def cifarfs_raw(root: Path, classes: dict[str, int] | None = None, per_class: int = 5, size: int = 8,
                seed: int = 0) -> Path:
    """``root/cifarfs/cifar100/data/<class>/*.png`` and ``splits/bertinetto/{train,val,test}.txt``."""
    classes = classes or {"train": 6, "val": 5, "test": 5}
    rng = np.random.default_rng(seed)
    raw = root / "cifarfs" / "cifar100"
    (raw / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
    for split, n in classes.items():
        names = [f"{split}_class_{c}" for c in range(n)]
        (raw / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            (raw / "data" / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(_noise(rng, size, 3)).save(raw / "data" / name / f"{name}_{i}.png")
    return root


def fc100(root: Path, classes: dict[str, int] | None = None, per_class: int = 5, size: int = 8,
          seed: int = 0) -> Path:
    """``root/FC100_{train,val,test}.pickle``: dicts with ``data`` (uint8 [n, H, W, 3]) and ``labels``."""
    classes = classes or {"train": 6, "val": 5, "test": 5}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    offset = 0
    for split, n in classes.items():
        data = np.stack([_noise(rng, size, 3) for _ in range(n * per_class)])
        labels = [offset + c for c in range(n) for _ in range(per_class)]
        offset += n
        with open(root / f"FC100_{split}.pickle", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    return root
