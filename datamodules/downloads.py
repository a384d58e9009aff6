"""Downloads that clean up after themselves, and errors that say what a bad data file holds instead.

learn2learn checks only that a data file exists: a half-written archive or an HTML error page saved
under the data's name would be trusted by the next run. :func:`cleanup_on_failure` deletes what a
failed download created; :func:`unreadable` words the error for a file that is there but does not load.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["DownloadError", "cleanup_on_failure", "describe_bad_file", "remove", "unreadable"]


class DownloadError(RuntimeError):
    """A download that failed or gave something other than the data."""


def describe_bad_file(path: Path) -> str:
    """A hint on what a file that should hold data holds instead (empty, or an HTML page)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    if not head:
        return " (the file is empty)"
    if head.lstrip()[:1] == b"<":
        return " (the file is an HTML page, not the data: the server sent a web page instead of the file)"
    return ""


def remove(path: Path) -> None:
    """Delete a file or a folder with everything in it; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def cleanup_on_failure(what: str, artifacts: Sequence[Path], hint: str) -> Iterator[None]:
    """Run a download; if it fails, delete what it created among ``artifacts`` and say so.

    Raises:
        DownloadError: the download failed, naming ``what``, the error, what was removed and ``hint``.
    """
    existed = {path: path.exists() for path in artifacts}
    try:
        yield
    except BaseException as error:
        created = [path for path in artifacts if path.exists() and not existed[path]]
        notes = "".join(describe_bad_file(path) for path in created if path.is_file())
        for path in created:
            remove(path)
        if not isinstance(error, Exception):  # KeyboardInterrupt: clean up, then let it through
            raise
        removed = f" Removed what it left behind: {', '.join(map(str, created))}." if created else ""
        raise DownloadError(f"{what} failed: {type(error).__name__}: {error}{notes}.{removed} {hint}") from error


def unreadable(paths: Sequence[Path], what: str, error: Exception, deleted: bool) -> RuntimeError:
    """The error for data files that exist but do not load as ``what`` (say whether they were deleted)."""
    names = " and ".join(map(str, paths))
    notes = "".join(describe_bad_file(path) for path in paths if path.is_file())
    them = "it" if len(paths) == 1 else "them"
    action = (f"{them.capitalize()} {'was' if len(paths) == 1 else 'were'} deleted, so that the next run downloads "
              f"{them} again." if deleted else
              f"{'It is' if len(paths) == 1 else 'They are'} probably a failed or partial download: delete {them} and "
              f"run with download=True, or replace {them}.")
    return RuntimeError(f"{names} cannot be read as {what} ({type(error).__name__}: {error}){notes}. {action}")
