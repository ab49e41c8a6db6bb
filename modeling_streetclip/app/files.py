"""Writing a file or a folder whole or not at all, the one way the application replaces what it has written
(hand-written: no maintained library renames both files and folders into place with fsync); where a folder can go."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


TEMPORARY_SUFFIX = ".tmp"
# A folder cannot be renamed over a folder that holds files: the old one moves aside under this suffix first.
REPLACED_SUFFIX = ".old"


def file_in_the_way(folder: Path) -> Path | None:
    """The file at `folder`, or at a folder above it, that keeps `folder` from being a folder; None if none does."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    return None if existing.is_dir() else existing


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (`path` + ".tmp") to write a file or a folder to; when the block ends
    without an error, fsync it and rename it over `path` (readers and a kill see the old `path` or the new one); on an
    error the temporary is removed. A killed writer's temporary is removed first, so writers of one `path` take turns.
    """
    path = Path(path)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    remove(temporary)
    try:
        yield temporary
        # Every file under a folder, then each folder (a folder's own entries last), or the one file.
        walk = os.walk(temporary, topdown=False) if temporary.is_dir() else [(temporary, None, [])]
        for root, _, names in walk:
            for name in names:
                _sync(Path(root, name))
            _sync(Path(root))
        if path.is_dir() and not path.is_symlink():
            replaced = path.with_name(path.name + REPLACED_SUFFIX)
            remove(replaced)
            os.replace(path, replaced)
            os.replace(temporary, path)
            shutil.rmtree(replaced)
        else:
            os.replace(temporary, path)
        _sync(path.parent)
    except BaseException:
        remove(temporary)
        raise


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write `value` to `path` as standard JSON (NaN and infinities refused), whole or not at all."""
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _sync(path: Path) -> None:
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):
        return  # Windows: a folder cannot be opened to fsync, and its entries are written through
    # Windows fsyncs only what it may write.
    flags = os.O_RDONLY | os.O_DIRECTORY if path.is_dir() else os.O_RDWR if os.name == "nt" else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a folder, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


__all__ = ["atomic_write", "remove", "write_json"]
