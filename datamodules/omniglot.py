"""Omniglot: 1623 handwritten characters of 50 alphabets, 20 drawings each (Lake et al. 2015)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from PIL import Image

from .checks import check_fractions
from .class_folders import read_class_folders, split_classes, visible
from .downloads import cleanup_on_failure
from .episodic import EpisodicDataModule
from .images import ImageSource, file_images
from .learn2learn_import import import_learn2learn

__all__ = ["OmniglotDataModule", "official_characters"]

#: learn2learn's Omniglot benchmark split of the 1623 characters: 1100 train, 100 validation, 423 test.
BENCHMARK_SPLIT = (1100, 100, 423)
BENCHMARK_FRACTIONS = tuple(n / sum(BENCHMARK_SPLIT) for n in BENCHMARK_SPLIT)
BACKGROUND, EVALUATION = "images_background", "images_evaluation"
CHARACTER = re.compile(r"character\d+")


def _subfolders(folder: Path) -> list[Path]:
    """The visible subfolders of ``folder`` (see :func:`~datamodules.class_folders.visible`), sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and visible(p.name)), key=lambda p: p.name)


def _drawings(character: Path) -> list[Path]:
    """The visible .png files of a character folder, sorted by name."""
    return sorted((p for p in character.iterdir() if p.suffix == ".png" and p.is_file() and visible(p.name)),
                  key=lambda p: p.name)


def _has_character_folder(root: Path, depth: int = 3) -> bool:
    """Whether a ``characterNN`` folder of .png files lies at most ``depth`` levels below ``root``."""
    try:
        folders = _subfolders(root)
    except OSError:
        return False
    for folder in folders:
        if CHARACTER.fullmatch(folder.name) and _drawings(folder):
            return True
    return depth > 1 and any(_has_character_folder(folder, depth - 1) for folder in folders)


def official_characters(folder: Path) -> dict[str, list[Path]]:
    """``Alphabet/characterNN`` -> its drawings, for one folder of the official layout (e.g. ``images_background``).

    The characters and drawings that torchvision's ``Omniglot`` (under learn2learn's ``FullOmniglot``)
    reads, in a fixed order: alphabets by name, then each alphabet's characters by name; drawings by
    name. torchvision lists them in the file system's order, which differs between machines; sorted,
    the character split (``split_seed``) is the same everywhere. Hidden files and folders (and macOS's
    ``__MACOSX``) are skipped.
    """
    return {f"{alphabet.name}/{character.name}": _drawings(character)
            for alphabet in _subfolders(folder) for character in _subfolders(alphabet)}


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot few-shot tasks (Lake et al. 2015), in the protocol of MAML and Meta-SGD.

    Images are resized to ``image_size`` (28, Lanczos, as learn2learn and MAML) and inverted, ``1 - x``,
    so that strokes are 1 on a 0 background as in MAML (the files draw black strokes on white). With
    ``rotations`` (MAML, Meta-SGD; Santoro et al. 2016) each training character rotated by 0, 90, 180
    and 270 degrees is a class of its own; validation and test characters are not rotated.

    Where the data comes from (``layout``):

    * ``"learn2learn"``: learn2learn's ``FullOmniglot`` under ``root`` (``root/omniglot-py/images_background``
      and ``images_evaluation`` with their .zip files; ``download=True`` fetches them, 15 MB). The 1623
      characters are shuffled with ``split_seed`` and split 1100/100/423 as in learn2learn's benchmark.
    * ``"folder"``: any folder in the official layout ``<Alphabet>/characterNN/*.png`` under ``root``, e.g.
      the official ``images_background_small1`` release unzipped, or both official folders side by side.
      Each ``Alphabet/characterNN`` is a class; characters are split by ``fractions`` with ``split_seed``.
    * ``"auto"`` (default): ``"learn2learn"`` if ``root/omniglot-py`` exists, else ``"folder"`` if a
      ``characterNN`` folder of .png files lies at most 3 levels below ``root``, else ``"learn2learn"``
      (downloading if ``download``).
    * ``train_dir``/``val_dir``/``test_dir``: one official-layout folder per split (overrides ``layout``).

    Args:
        root: the data folder (see ``layout``).
        layout: ``"auto"``, ``"learn2learn"`` or ``"folder"``.
        train_dir: official-layout folder of the training characters (with ``val_dir``, ``test_dir``).
        val_dir: folder of the validation characters.
        test_dir: folder of the test characters.
        fractions: (train, val, test) shares of the characters; ``None``: 1100/100/423 of 1623.
        split_seed: seed of the character split.
        image_size: height and width of the images (28 in MAML and Meta-SGD).
        rotations: rotated training characters as new classes (x4 training classes).
        invert: strokes 1 on 0 (``True``), or 0 on 1 as stored.
        ways: characters per task (N).
        shots: support drawings per character (K).
        queries: query drawings per character (Q; MAML trains Omniglot with Q = K).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        download: fetch the learn2learn layout if missing.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Reference:
        Lake, Salakhutdinov and Tenenbaum (2015). Human-level concept learning through probabilistic
        program induction. Science. Finn, Abbeel and Levine (2017). Model-Agnostic Meta-Learning.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())  # a folder in the official layout: <Alphabet>/characterNN/*.png
        >>> for alphabet in ("Greek", "Latin"):
        ...     for c in range(1, 11):
        ...         (root / alphabet / f"character{c:02d}").mkdir(parents=True)
        ...         for d in range(3):
        ...             Image.new("1", (105, 105), 1).save(root / alphabet / f"character{c:02d}" / f"{d}.png")
        >>> dm = OmniglotDataModule(root=str(root), fractions=(0.5, 0.25, 0.25), ways=5, shots=1, queries=1,
        ...                         meta_batch_size=8, num_workers=0)
        >>> dm.resolved_layout()
        'folder'
        >>> dm.setup("fit")
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))]
        [(8, 5, 1, 28, 28), (8, 5), (8, 5, 1, 28, 28), (8, 5)]
    """

    name = "Omniglot"

    def __init__(
        self,
        root: str = "~/data",
        layout: Literal["auto", "learn2learn", "folder"] = "auto",
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        fractions: tuple[float, float, float] | None = None,
        split_seed: int = 0,
        image_size: int = 28,
        rotations: bool = True,
        invert: bool = True,
        ways: int = 5,
        shots: int = 1,
        queries: int = 1,
        meta_batch_size: int = 32,
        train_tasks_per_epoch: int = 32_000,
        val_tasks: int = 600,
        test_tasks: int = 600,
        download: bool = False,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
                         train_tasks_per_epoch=train_tasks_per_epoch, val_tasks=val_tasks, test_tasks=test_tasks,
                         root=root, download=download, seed=seed, num_workers=num_workers)
        owner = type(self).__name__
        if layout not in ("auto", "learn2learn", "folder"):
            raise ValueError(f"{owner} `layout` must be 'auto', 'learn2learn' or 'folder'; got {layout!r}.")
        # Lanczos, as learn2learn's and MAML's Omniglot; no pixel augmentation (rotations are new classes).
        self.set_image_options(image_size, channels=1, invert=invert, resample=Image.Resampling.LANCZOS)
        self.layout = layout
        self.split_dirs = {split: None if d is None else Path(os.path.expanduser(d))
                           for split, d in (("train", train_dir), ("val", val_dir), ("test", test_dir))}
        self.fractions = BENCHMARK_FRACTIONS if fractions is None else check_fractions(owner, fractions)
        self.split_seed, self.rotations = split_seed, rotations
        self._classes: dict[str, dict[str, list[Path]] | None] | None = None

    # -- where the data is ------------------------------------------------------------------------

    @property
    def l2l_folder(self) -> Path:
        return self.root / "omniglot-py"

    def resolved_layout(self) -> str:
        """``"dirs"``, ``"learn2learn"`` or ``"folder"``."""
        if any(d is not None for d in self.split_dirs.values()):
            return "dirs"
        if self.layout != "auto":
            return self.layout
        if self.l2l_folder.is_dir():
            return "learn2learn"
        return "folder" if _has_character_folder(self.root) else "learn2learn"

    def _l2l_present(self) -> bool:
        return all((self.l2l_folder / name).is_dir() and (self.l2l_folder / f"{name}.zip").is_file()
                   for name in (BACKGROUND, EVALUATION))

    def prepare_data(self) -> None:
        if self.download and self.resolved_layout() == "learn2learn" and not self._l2l_present():
            self.fetch()

    def fetch(self) -> None:
        """Download learn2learn's Omniglot (torchvision's ``images_background``/``images_evaluation``)."""
        l2l = import_learn2learn()
        folder = self.l2l_folder
        artifacts = [folder / f"{name}{ext}" for name in (BACKGROUND, EVALUATION) for ext in (".zip", "")] + [folder]
        with cleanup_on_failure(f"Downloading Omniglot to {folder}", artifacts,
                                "Check the connection and run again, or use layout='folder' with the official "
                                "release from https://github.com/brendenlake/omniglot."):
            l2l.vision.datasets.FullOmniglot(root=str(self.root), download=True)

    def _l2l_classes(self) -> dict[str, dict[str, list[Path]]]:
        if not self._l2l_present():
            if not self.download:
                raise self.missing_data(
                    f"{self.l2l_folder}/{BACKGROUND}/ and {EVALUATION}/ with their .zip files (learn2learn's layout)",
                    "<Alphabet>/characterNN/*.png in each folder",
                    "Set download=True to fetch them (15 MB), or point `root` at a folder in the official layout "
                    "(e.g. images_background_small1 unzipped) with layout='folder'.")
            self.fetch()
        l2l = import_learn2learn()
        try:
            l2l.vision.datasets.FullOmniglot(root=str(self.root), download=False)
        except RuntimeError as error:  # torchvision checks the zips' MD5
            raise RuntimeError(f"Omniglot under {self.l2l_folder} is incomplete or corrupted ({error}). Delete "
                               f"{self.l2l_folder} and run with download=True.") from error
        # Every character, background then evaluation as in FullOmniglot, by name: no image decoded.
        classes = {f"{part}/{name}": drawings for part in (BACKGROUND, EVALUATION)
                   for name, drawings in official_characters(self.l2l_folder / part).items()}
        labels = list(range(len(classes)))
        names = list(classes)
        split = split_classes(labels, self.fractions, self.split_seed)
        return {s: {names[label]: classes[names[label]] for label in split[s]} for s in split}

    def split_class_folders(self) -> dict[str, dict[str, list[Path]] | None]:
        """Character name -> drawing files, per split."""
        if self._classes is None:
            layout = self.resolved_layout()
            if layout == "learn2learn":
                self._classes = self._l2l_classes()
            elif layout == "folder":
                self._classes = read_class_folders(self, self.root, {}, self.fractions, self.split_seed)
            else:
                self._classes = read_class_folders(self, None, self.split_dirs, self.fractions, self.split_seed)
        return self._classes

    # -- the splits -------------------------------------------------------------------------------

    def load_split(self, split: str) -> ImageSource:
        classes = self.split_class_folders()[split]
        if classes is None:
            raise ValueError(f"{type(self).__name__} needs the {split} split here, but `{split}_dir` is not set.")
        source = file_images(classes, self.transform(split))
        return source.with_rotations() if self.rotations and split == "train" else source
