"""Omniglot: 1623 handwritten characters of 50 alphabets, 20 drawings each (Lake et al. 2015)."""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Literal

from PIL import Image

from .checks import check_fractions
from .class_folders import read_class_folders, split_classes, visible
from .downloads import cleanup_on_failure
from .episodic import EpisodicDataModule
from .images import ImageSource, file_images
from .learn2learn_import import import_learn2learn

__all__ = ["OmniglotDataModule", "alphabet_of", "official_characters"]

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


def alphabet_of(drawings: list[Path]) -> str:
    """The alphabet of a character: the folder above its own, in the layout ``<Alphabet>/characterNN/*.png``."""
    return Path(drawings[0]).parent.parent.name


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

    How the characters are split (``split_by``):

    * ``"character"`` (default): characters are shuffled and cut by ``fractions``: test characters are new,
      their alphabets are not (the MAML and Meta-SGD protocol).
    * ``"alphabet"``: whole alphabets go to one split, so test tasks come from alphabets never seen in
      training. ``val_alphabets`` and ``test_alphabets`` name them (the rest train), or, if both are
      ``None``, the alphabets are shuffled with ``split_seed`` and cut by ``fractions``.

    With ``within_alphabet`` every task draws its ``ways`` characters from one alphabet (chosen uniformly
    among those with at least ``ways`` characters), as in the 20 runs of Lake et al.'s one-shot
    challenge: harder than tasks that mix alphabets, whose characters tend to differ more.

    Args:
        root: the data folder (see ``layout``).
        layout: ``"auto"``, ``"learn2learn"`` or ``"folder"``.
        train_dir: official-layout folder of the training characters (with ``val_dir``, ``test_dir``).
        val_dir: folder of the validation characters.
        test_dir: folder of the test characters.
        fractions: (train, val, test) shares of the characters; ``None``: 1100/100/423 of 1623.
        split_seed: seed of the character (or alphabet) split.
        split_by: ``"character"`` or ``"alphabet"`` (see above).
        val_alphabets: with ``split_by="alphabet"``, the validation alphabets' folder names.
        test_alphabets: with ``split_by="alphabet"``, the test alphabets' folder names.
        within_alphabet: draw each task's characters from one alphabet.
        image_size: height and width of the images (28 in MAML and Meta-SGD).
        rotations: rotated training characters as new classes (x4 training classes).
        invert: strokes 1 on 0 (``True``), or 0 on 1 as stored.
        ways: characters per task (N).
        shots: support drawings per character (K).
        queries: query drawings per character (Q; MAML trains Omniglot with Q = K).
        train_queries: query drawings per character in training tasks (``None``: ``queries``; Reptile's
            paper trains on 10 drawings per character: ``shots + train_queries = 10``).
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
        split_by: Literal["character", "alphabet"] = "character",
        val_alphabets: list[str] | None = None,
        test_alphabets: list[str] | None = None,
        within_alphabet: bool = False,
        image_size: int = 28,
        rotations: bool = True,
        invert: bool = True,
        ways: int = 5,
        shots: int = 1,
        queries: int = 1,
        train_queries: int | None = None,
        meta_batch_size: int = 32,
        train_tasks_per_epoch: int = 32_000,
        val_tasks: int = 600,
        test_tasks: int = 600,
        download: bool = False,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, train_queries=train_queries,
                         meta_batch_size=meta_batch_size,
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
        if split_by not in ("character", "alphabet"):
            raise ValueError(f"{owner} `split_by` must be 'character' or 'alphabet'; got {split_by!r}.")
        if split_by == "character" and (val_alphabets or test_alphabets):
            raise ValueError(f"{owner} `val_alphabets`/`test_alphabets` name whole alphabets per split, which needs "
                             f"split_by='alphabet'; got split_by='character'.")
        if (val_alphabets is None) != (test_alphabets is None):
            raise ValueError(f"{owner} needs both `val_alphabets` and `test_alphabets` (the rest train), or neither "
                             f"(then `fractions` split the alphabets); got val_alphabets={val_alphabets!r}, "
                             f"test_alphabets={test_alphabets!r}.")
        both = set(val_alphabets or ()) & set(test_alphabets or ())
        if both:
            raise ValueError(f"{owner}: alphabets {sorted(both)} are in both `val_alphabets` and `test_alphabets`; "
                             "an alphabet belongs to one split.")
        self.split_by, self.within_alphabet = split_by, within_alphabet
        self.split_alphabets = None if val_alphabets is None else {"val": list(val_alphabets), "test": list(test_alphabets)}
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
        # A root that does not exist yet is named first (often a typo in --data.root); if the download fails, the
        # folders it created for it go too.
        created = [path for path in (self.root, *self.root.parents) if not path.exists()]
        if created:
            print(f"{type(self).__name__}: the data folder {self.root} does not exist; downloading Omniglot (15 MB) "
                  "into it.", file=sys.stderr, flush=True)
        artifacts = [folder / f"{name}{ext}" for name in (BACKGROUND, EVALUATION) for ext in (".zip", "")] + [folder]
        artifacts += created[-1:]  # the outermost folder the download creates
        missing = (f" The data folder {self.root} did not exist before this run: check `root` (--data.root) for a typo."
                   if created else "")
        with cleanup_on_failure(f"Downloading Omniglot to {folder}", artifacts,
                                "Check the connection and run again, or use layout='folder' with the official "
                                f"release from https://github.com/brendenlake/omniglot.{missing}"):
            l2l.vision.datasets.FullOmniglot(root=str(self.root), download=True)

    def _l2l_characters(self) -> dict[str, list[Path]]:
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
        return {f"{part}/{name}": drawings for part in (BACKGROUND, EVALUATION)
                for name, drawings in official_characters(self.l2l_folder / part).items()}

    def split_class_folders(self) -> dict[str, dict[str, list[Path]] | None]:
        """Character name -> drawing files, per split."""
        if self._classes is None:
            layout = self.resolved_layout()
            if layout == "dirs":
                if self.split_by == "alphabet":
                    raise ValueError(f"{type(self).__name__}: `train_dir`/`val_dir`/`test_dir` already are the splits; "
                                     "split_by='alphabet' splits one folder. Use one or the other.")
                self._classes = read_class_folders(self, None, self.split_dirs, self.fractions, self.split_seed)
            else:
                if layout == "learn2learn":
                    characters = self._l2l_characters()
                else:  # every character of the folder, unsplit
                    characters = read_class_folders(self, self.root, {}, (1.0, 0.0, 0.0), self.split_seed)["train"]
                self._classes = self._split(characters)
        return self._classes

    def _split(self, characters: dict[str, list[Path]]) -> dict[str, dict[str, list[Path]]]:
        """Cut the characters into train/val/test: by character, or by whole alphabets."""
        if self.split_by == "character":
            names = split_classes(list(characters), self.fractions, self.split_seed)
            return {split: {name: characters[name] for name in names[split]} for split in names}
        by_alphabet: dict[str, list[str]] = {}
        for name, drawings in characters.items():
            by_alphabet.setdefault(alphabet_of(drawings), []).append(name)
        if self.split_alphabets is None:
            alphabets = split_classes(list(by_alphabet), self.fractions, self.split_seed)
        else:
            unknown = sorted(set(self.split_alphabets["val"] + self.split_alphabets["test"]) - set(by_alphabet))
            if unknown:
                raise ValueError(f"{type(self).__name__}: no alphabet {unknown} under {self.root}; its alphabets are "
                                 f"{sorted(by_alphabet)}. Check `val_alphabets` and `test_alphabets`.")
            held_out = set(self.split_alphabets["val"]) | set(self.split_alphabets["test"])
            alphabets = {"train": sorted(set(by_alphabet) - held_out), **self.split_alphabets}
        empty = [split for split, names in alphabets.items() if not names]
        if empty:
            raise ValueError(f"{type(self).__name__}: split_by='alphabet' leaves the {' and '.join(empty)} split without "
                             f"an alphabet ({len(by_alphabet)} alphabets: {sorted(by_alphabet)}). Name the alphabets "
                             "with `val_alphabets`/`test_alphabets`, or change `fractions`.")
        return {split: {name: characters[name] for alphabet in names for name in by_alphabet[alphabet]}
                for split, names in alphabets.items()}

    # -- the splits -------------------------------------------------------------------------------

    def load_split(self, split: str) -> ImageSource:
        classes = self.split_class_folders()[split]
        if classes is None:
            raise ValueError(f"{type(self).__name__} needs the {split} split here, but `{split}_dir` is not set.")
        source = file_images(classes, self.transform(split))
        source.class_groups = {label: alphabet_of(classes[name]) for label, name in enumerate(classes)}
        return source.with_rotations() if self.rotations and split == "train" else source

    def task_groups(self, split: str) -> dict[int, str] | None:
        """With ``within_alphabet``, the alphabet of every class of ``split`` (after :meth:`setup`)."""
        return self.sources[split].class_groups if self.within_alphabet else None

    def check_split(self, split: str, source: ImageSource) -> None:
        super().check_split(split, source)
        if self.within_alphabet:
            sizes = Counter(source.class_groups.values())
            if max(sizes.values()) < self.ways:
                largest = max(sizes, key=sizes.get)
                raise ValueError(f"{self.name} split '{split}': within_alphabet=True needs an alphabet with at least "
                                 f"ways={self.ways} characters, but the largest, '{largest}', has {sizes[largest]}. "
                                 "Lower `ways`, or set within_alphabet=False.")
