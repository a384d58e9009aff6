"""Omniglot's original one-shot challenge (Lake et al. 2015): 20 runs of 20-way one-shot classification."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .preprocessing import ImageTransform
from .sampling import FixedTaskSampler

__all__ = ["OmniglotOneShotDataModule", "PUBLISHED_ERROR_RATES"]

#: Mean error rates over the 20 runs, as published (Lake et al. 2015, Science, Fig. 2).
PUBLISHED_ERROR_RATES = {"humans": 4.5, "Bayesian program learning": 3.3, "modified Hausdorff distance": 38.8}

LAYOUT = ("runNN/training/classNN.png (20 one-shot examples), runNN/test/itemNN.png (20 test images), and "
          "runNN/class_labels.txt with lines 'runNN/test/itemNN.png runNN/training/classMM.png'")


class _Run:
    """One run: 20 training images (one per class, labels 0..19 in file order) and 20 labelled test images."""

    def __init__(self, folder: Path, root: Path) -> None:
        self.name = folder.name
        labels_file = folder / "class_labels.txt"
        if not labels_file.is_file():
            raise FileNotFoundError(f"{labels_file} is missing: each run folder needs it. Expected layout: {LAYOUT}.")
        self.support = sorted((folder / "training").glob("class*.png"))
        if not self.support:
            raise FileNotFoundError(f"No training/class*.png images in {folder}. Expected layout: {LAYOUT}.")
        class_of = {path.resolve(): label for label, path in enumerate(self.support)}
        self.query: list[tuple[Path, int]] = []
        for number, line in enumerate(labels_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{labels_file}, line {number}: expected 'test_image training_image'; got {line!r}.")
            test_image, training_image = (self._resolve(part, folder, root) for part in parts)
            if training_image.resolve() not in class_of:
                raise ValueError(f"{labels_file}, line {number}: {parts[1]} is not one of the run's training images.")
            self.query.append((test_image, class_of[training_image.resolve()]))
        if not self.query:
            raise ValueError(f"{labels_file} lists no test images. Expected layout: {LAYOUT}.")

    @staticmethod
    def _resolve(relative: str, folder: Path, root: Path) -> Path:
        # The official file names paths from the folder that holds the runs; accept paths from the run too.
        for base in (root, folder, folder.parent):
            if (base / relative).is_file():
                return base / relative
        raise FileNotFoundError(f"{relative} (named in {folder / 'class_labels.txt'}) does not exist under {root}.")


class _Runs(Dataset):
    def __init__(self, runs: list[_Run], transform: ImageTransform) -> None:
        self.runs, self.transform = runs, transform

    def __len__(self) -> int:
        return len(self.runs)

    def _load(self, path: Path) -> Tensor:
        try:
            with Image.open(path) as image:
                return self.transform(image)
        except (OSError, UnidentifiedImageError) as error:
            raise OSError(f"Cannot read the image {path}: {error}") from error

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        run = self.runs[index]
        support_x = torch.stack([self._load(path) for path in run.support])
        query_x = torch.stack([self._load(path) for path, _ in run.query])
        return (support_x, torch.arange(len(run.support)), query_x,
                torch.tensor([label for _, label in run.query]))


class OmniglotOneShotDataModule(L.LightningDataModule):
    """Omniglot's one-shot classification challenge (Lake et al. 2015), in its official ``all_runs`` layout.

    Each of the 20 runs is one 20-way, one-shot task within an alphabet: 20 training images, one per
    class, and 20 test images to classify. ``metasgd test`` adapts a 20-way checkpoint on each run's
    training images and reports the error rate per run and the mean, the figure of published tables
    (humans 4.5%, Bayesian program learning 3.3%, modified Hausdorff distance 38.8%). Images get the
    preprocessing of :class:`~datamodules.OmniglotDataModule` (resize to ``image_size`` with Lanczos, then
    ``1 - x`` so that strokes are 1).

    Args:
        root: the folder that holds ``run01`` ... ``run20`` (layout: ``runNN/training/classNN.png``,
            ``runNN/test/itemNN.png``, ``runNN/class_labels.txt``).
        image_size: height and width the model was trained on (28 in MAML and Meta-SGD).
        invert: ``1 - x``, as in training.
        meta_batch_size: runs per batch.
        num_workers: DataLoader worker processes.

    Example:
        metasgd test --config configs/omniglot_lake_oneshot.yaml --data.root all_runs --ckpt_path 20way.ckpt
    """

    task = "classification"
    ways = 20
    published_error_rates = PUBLISHED_ERROR_RATES

    def __init__(self, root: str, image_size: int = 28, invert: bool = True, meta_batch_size: int = 1,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.root, self.image_size, self.invert = Path(root), image_size, invert
        self.meta_batch_size, self.num_workers = meta_batch_size, num_workers
        self.runs: list[_Run] = []

    @property
    def task_names(self) -> list[str]:
        """The run names, in the order of the test tasks."""
        return [run.name for run in self.runs]

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"No folder at {self.root} (`root`). It must hold the runs of the one-shot "
                                    f"challenge: {LAYOUT}. They come with the Omniglot repository (all_runs.zip).")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("run"))
        if not folders:
            raise FileNotFoundError(f"No run folders (run01 ... run20) in {self.root}. Expected layout: {LAYOUT}.")
        self.runs = [_Run(folder, self.root) for folder in folders]
        for run in self.runs:
            if len(run.support) != self.ways:
                raise ValueError(f"{run.name} has {len(run.support)} training images; the challenge is {self.ways}-way.")

    def test_dataloader(self) -> DataLoader:
        from PIL.Image import Resampling

        transform = ImageTransform(self.image_size, channels=1, invert=self.invert, resample=Resampling.LANCZOS)
        # Under DDP each run is scored on exactly one device (Lightning's sampler would pad by repeating runs).
        return DataLoader(_Runs(self.runs, transform), batch_size=self.meta_batch_size, num_workers=self.num_workers,
                          sampler=FixedTaskSampler(len(self.runs)))

    predict_dataloader = test_dataloader
