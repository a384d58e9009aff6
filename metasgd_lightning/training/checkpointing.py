"""Checkpoints that survive a crash: atomic writes, intact-or-named loading, and the stop of a preempted run.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the checkpoint's own
  folder, flushes it to disk and renames it over the old one (``os.replace``, atomic on POSIX): a
  crash or kill while writing leaves the previous checkpoint as it was. The ``metasgd`` command uses
  it by default; in Python, ``L.Trainer(plugins=[AtomicCheckpointIO()])``.
- A checkpoint that is truncated or corrupt (a file written by something else, a full disk) is refused
  with :class:`CheckpointCorruptError`, which names the file and the newest intact checkpoint beside it.
- :func:`resolve_resume_path` turns ``--ckpt_path last`` into the newest ``last*.ckpt`` of a folder,
  or into a fresh start (said in one line) when there is none yet.
- :class:`Preempted` is how a run stopped by a signal (SIGTERM, SIGUSR1, Ctrl-C) ends once its
  checkpoint is saved: a ``SystemExit`` with the shell's code for that signal (128 + its number).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

#: A file or folder path, as a string or a path object.
PathLike = str | os.PathLike

__all__ = ["AtomicCheckpointIO", "CheckpointCorruptError", "Preempted", "best_checkpoint", "checkpoint_is_intact",
           "foreign_format", "missing_checkpoint", "newest_intact_checkpoint", "resolve_resume_path"]

_LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")  # ModelCheckpoint's last.ckpt and its versions (last-v1.ckpt)


#: The first bytes of files that are given as checkpoints by mistake, and what they are.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"\x93NUMPY", "a NumPy array file"),
          (b"<", "a text file (HTML or XML)"), (b"{", "a text file (JSON)"))


def foreign_format(path: PathLike) -> str | None:
    """What ``path`` is if it is plainly not a PyTorch checkpoint (e.g. ``"a PNG image"``), else None.

    ``torch.save`` writes a zip archive (``PK``), or a pickle (``0x80``) in its legacy format; other files
    are named by their first bytes where they are common, else called "not a zip archive or a pickle".
    """
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError:
        return None
    if head[:2] == b"PK" or head[:1] == b"\x80" or not head:  # a checkpoint, perhaps truncated; or an empty file
        return None
    for magic, what in _MAGIC:
        if head.lstrip()[: len(magic)] == magic:
            return what
    return "neither a zip archive nor a pickle, the formats torch.save writes"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file that is truncated or corrupt; the message names it and the newest intact one beside it.

    A file that is plainly something else (an image, a text file) is called not a PyTorch checkpoint instead.
    """

    def __init__(self, path: PathLike, cause: BaseException | None = None) -> None:
        path = Path(path)
        self.path, self.intact = path, newest_intact_checkpoint(path.parent, exclude=path)
        reason = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
        advice = (f"The newest intact checkpoint beside it is {self.intact}: resume with --ckpt_path {self.intact}."
                  if self.intact else f"There is no intact checkpoint beside it in {path.parent}.")
        other = foreign_format(path)
        if other:
            super().__init__(f"{path} is not a PyTorch checkpoint: it is {other}. Give a .ckpt file written by "
                             f"`metasgd fit`. {advice}")
        else:
            super().__init__(f"Checkpoint {path} is truncated or corrupt{reason}. {advice}")


def checkpoint_is_intact(path: PathLike) -> bool:
    """Whether ``path`` is a complete ``torch.save`` archive whose every record matches its checksum.

    ``torch.save`` writes a zip archive (its table of contents at the end, a CRC-32 per record), so a
    truncated file has no table of contents and a damaged one fails a checksum. Reads the whole file.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def missing_checkpoint(path: PathLike) -> FileNotFoundError:
    """The error for a checkpoint ``path`` that is not a file: a folder names the run's ``last.ckpt`` in it, if any.

    Example::

        if not Path(path).is_file():
            raise missing_checkpoint(path)
    """
    path = Path(path)
    give = "Give the path of a .ckpt file written by `metasgd fit` (by default under runs/<config name>/checkpoints/)."
    if not path.is_dir():
        return FileNotFoundError(f"No checkpoint at {path}. {give}")
    found = last_checkpoint(path) or last_checkpoint(path / "checkpoints")
    if found is not None:
        return FileNotFoundError(f"{path} is a folder, not a checkpoint file: did you mean {found}?")
    return FileNotFoundError(f"{path} is a folder, not a checkpoint file. {give}")


def best_checkpoint(folder: PathLike) -> Path | None:
    """The run's best checkpoint in ``folder``: the one its newest ``last*.ckpt`` ranks best by the monitored
    metric, if a file of that name is in ``folder`` and intact; None otherwise (no run yet, or none ranked).

    Example::

        best = best_checkpoint("runs/sine_5shot/checkpoints")  # e.g. .../best-step=2000.ckpt
    """
    last = last_checkpoint(folder)
    if last is None or not checkpoint_is_intact(last):
        return None
    try:
        states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    except Exception:  # noqa: BLE001 - e.g. a callback state that only a full unpickling reads: no best known
        return None
    for state in states.values():
        recorded = state.get("best_model_path") if isinstance(state, dict) else None
        if recorded:
            path = Path(folder) / Path(recorded).name  # by name: the folder may have been moved or copied since
            return path if path.is_file() and checkpoint_is_intact(path) else None
    return None


def newest_intact_checkpoint(folder: PathLike, exclude: PathLike | None = None) -> Path | None:
    """The most recently written intact ``*.ckpt`` in ``folder`` (``exclude`` left out), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    excluded = Path(exclude).resolve() if exclude is not None else None
    candidates = [p for p in folder.glob("*.ckpt") if p.is_file() and p.resolve() != excluded]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_is_intact(path):
            return path
    return None


def last_checkpoint(folder: PathLike) -> Path | None:
    """The most recently written ``last.ckpt`` (or ``last-vN.ckpt``) in ``folder``, intact or not; None if none."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if _LAST.match(p.name) and p.is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_resume_path(ckpt_path: PathLike | None, folder: PathLike | None) -> PathLike | None:
    """The checkpoint ``fit`` should resume from, checked to be intact.

    ``"last"`` with a known checkpoint ``folder`` becomes the newest ``last*.ckpt`` there, or ``None``
    (a fresh start, said in one line) when the folder has none yet. A file path must be an intact
    checkpoint, else :class:`CheckpointCorruptError`. Other values (``None``, ``"hpc"``, a ``"last"``
    without a known folder, remote paths) are Lightning's to resolve and are returned as given; the
    commands resolve ``"best"`` themselves (:func:`best_checkpoint`).
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        if folder is None:
            return ckpt_path
        path = last_checkpoint(folder)
        if path is None:
            rank_zero_info(f"--ckpt_path last: no checkpoint in {folder} yet, so training starts from scratch.")
            return None
    elif str(ckpt_path) in ("best", "hpc") or "://" in str(ckpt_path):
        return ckpt_path
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            return ckpt_path  # Lightning names a missing file
    if not checkpoint_is_intact(path):
        raise CheckpointCorruptError(path)
    return str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written checkpoint where a good one was.

    Saving writes to ``.<name>.<random>.tmp`` in the destination folder, flushes and ``fsync``s it,
    then renames it over ``<name>`` (``os.replace``: readers see the old file or the new one, never a
    mix) and ``fsync``s the folder. A crash or ``SIGKILL`` in the middle leaves the old checkpoint and
    a stray temporary file, which the next save of that name removes; Lightning's own ``--ckpt_path
    last`` search ignores it. (Lightning's default writes through fsspec to a file in the system's
    temporary folder and moves it, which is a copy, not atomic, when that folder is another file system.)

    Loading refuses a truncated or corrupt file with :class:`CheckpointCorruptError`, naming the newest
    intact checkpoint beside it. Remote paths (``s3://`` and the like) are left to ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_folder(path.parent)
        for stray in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a save that was killed
            with contextlib.suppress(OSError):
                stray.unlink()

    def load_checkpoint(self, path: PathLike, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:
            if "://" not in str(path) and Path(path).is_file() and not checkpoint_is_intact(path):
                raise CheckpointCorruptError(path, error) from error
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class Preempted(SIGTERMException):
    """The end of a run stopped by a signal after its checkpoint was saved: exits with code 128 + the signal's number.

    A ``SystemExit`` (no traceback), and Lightning's ``SIGTERMException``, which callbacks can react to
    in ``on_exception``. The exit code follows the shell's convention for a process ended by a signal
    (143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT), so job schedulers see an interrupted run, not
    a finished one.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(128 + int(signum))
        self.signum, self.message = int(signum), message

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return self.message or f"stopped by {self.signal_name}"
