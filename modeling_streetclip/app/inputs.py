"""What `streetclip locate` is asked to read: image paths from files, folders, patterns and standard input, views
grouped by place, and the --countries file; problems are `UsageError`s, found before a model loads."""

import glob
import logging
import os
import re
from functools import cache
from pathlib import Path
from typing import TextIO

from . import UsageError


logger = logging.getLogger(__name__)


@cache
def _readable_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _folder_images(folder: str, recursive: bool) -> list[str]:
    """The files of `folder` (and with `recursive` its subfolders) Pillow reads, sorted; unreadable subfolders warn."""

    def unreadable(error: OSError) -> None:
        if error.filename == folder:
            raise error
        logger.warning(f"streetclip locate: skipping the folder {error.filename!r}: {error.strerror}.")

    try:
        if recursive:
            walk = os.walk(folder, onerror=unreadable)
            files = [os.path.join(root, name) for root, _, names in walk for name in names]
        else:
            files = [entry.path for entry in os.scandir(folder) if entry.is_file()]
    except OSError as error:
        raise UsageError(f"cannot read the folder {folder!r}: {error.strerror or error}.") from None
    return sorted(path for path in files if os.path.splitext(path)[1].lower() in _readable_extensions())


def expand_inputs(arguments: list[str], recursive: bool, stdin: TextIO) -> list[str]:
    """Absolute paths (symlinks kept: resume matches records by them) of the images that files, folders, glob
    patterns and '-' (paths on `stdin`) name, each once, in order of first mention. A named file, a URL and a missing
    path from `stdin` are inputs whose records say what is wrong; a missing path in `arguments` is a usage error."""
    from ..images import looks_like_url

    paths: dict[str, None] = {}
    for argument in arguments:
        if argument == "-":
            named = [line.rstrip("\r\n") for line in stdin if line.strip()]
        elif not os.path.lexists(argument) and not looks_like_url(argument) and any(c in argument for c in "*?["):
            if not (named := sorted(glob.glob(argument, recursive=recursive))):
                logger.warning(f"streetclip locate: the pattern {argument!r} matches no file.")
        else:
            try:  # a named path that does not exist stops the run; one that cannot be looked up stays an input
                if not looks_like_url(argument):
                    os.lstat(argument)
            except FileNotFoundError:
                raise UsageError(
                    f"no such file or folder: {argument!r}; give image files, folders or glob patterns, or '-' to read "
                    "paths from standard input."
                ) from None
            except OSError:
                pass
            named = [argument]
        for name in named:
            if os.path.isdir(name):
                if not (images := _folder_images(name, recursive)):
                    hint = "" if recursive else " (--recursive descends into subfolders)"
                    logger.warning(f"streetclip locate: the folder {name!r} holds no image file{hint}.")
                paths.update(dict.fromkeys(map(os.path.abspath, images)))
            elif looks_like_url(name) and not os.path.lexists(name):
                paths.setdefault(name, None)
            else:
                paths.setdefault(os.path.abspath(name), None)
    return list(paths)


def group_pattern(regex: str) -> re.Pattern:
    """The compiled --group_by `regex`, which must have a capture group."""
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise UsageError(f"--group_by {regex!r} is not a valid regular expression: {error}.") from None
    if pattern.groups < 1:
        raise UsageError(f"--group_by {regex!r} has no capture group; put the part naming the place in (...).")
    return pattern


def group_views(paths: list[str], pattern: re.Pattern) -> list[tuple[str, list[str]]]:
    """`(key, member paths)` per place, in order of first appearance: the key is capture group 1 of `pattern`
    searched in the path; a path it does not match is a group of its own, keyed by the path."""
    keys = [(match := pattern.search(path)) and match.group(1) for path in paths]
    groups: dict[str, list[str]] = {}
    for path, key in zip(paths, keys, strict=True):
        groups.setdefault(path if key is None else key, []).append(path)
    if unmatched := [path for path, key in zip(paths, keys, strict=True) if key is None]:
        logger.warning(
            f"streetclip locate: --group_by {pattern.pattern!r} does not match {len(unmatched)} of {len(paths)} "
            f"inputs (e.g. {unmatched[0]!r}); each of them is a group of its own."
        )
    return list(groups.items())


def read_countries(path: Path) -> list[str]:
    """The countries of a --countries file, read by `countries.read_country_list`, whose errors name the option."""
    from ..countries import read_country_list

    try:
        return read_country_list(path)
    except OSError as error:
        raise UsageError(f"cannot read --countries {str(path)!r}: {error.strerror or error}.") from None
    except ValueError as error:  # its message begins with the quoted path
        raise UsageError(f"--countries {error}") from None
