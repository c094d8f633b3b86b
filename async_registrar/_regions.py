"""AWS region names: a misspelt one is caught before anything is uploaded.

A region name that fits the pattern (`us-wst-2`) used to go through end to end.
The names botocore knows (its partition data, offline) are the reference:

- a known name passes;
- a name whose words are not a region's (a geography any partition has, compass
  words such as `west` or `southeast`, a number) is refused with the closest known
  name: it is a typo;
- a well-formed name botocore does not know yet (a region newer than this botocore)
  passes with a warning naming the closest known one.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from typing import Any

import botocore.loaders

__all__ = ["check_region", "known_regions", "region_pattern"]

log = logging.getLogger("async_registrar")

#: The words between a region's geography and its number (`us-gov-west-1`, `eu-isoe-west-1`).
_WORDS = frozenset(
    {"east", "west", "north", "south", "central"}
    | {"northeast", "northwest", "southeast", "southwest"}
    | {"gov", "iso", "isob", "isoe", "isof", "de"}
)


@functools.cache
def _partitions() -> list[dict[str, Any]]:
    """botocore's partition data (offline), loaded once for the names and the pattern.

    Read by a loader of its own, not through a session: a session reads the AWS profile and
    config file first, so an unknown AWS_PROFILE or a config file that is not INI made the
    validation of a region name fail with a traceback; they are the registrar's session's to
    report, as a `ConfigurationError` (see `_credentials`)."""
    partitions: list[dict[str, Any]] = botocore.loaders.create_loader().load_data("endpoints")["partitions"]
    return partitions


@functools.cache
def known_regions() -> tuple[frozenset[str], tuple[re.Pattern[str], ...]]:
    """The region names of every partition botocore knows, and the partitions' name patterns."""
    names = frozenset(region for partition in _partitions() for region in partition["regions"])
    patterns = tuple(re.compile(partition["regionRegex"]) for partition in _partitions())
    return names, patterns


def check_region(name: str) -> str:
    """`name`, if it is (or may be) a region; else `ValueError` naming the closest known one."""
    names, patterns = known_regions()
    if name in names:
        return name
    closest = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    hint = f"; did you mean {closest[0]}?" if closest else ""
    parts = name.split("-")
    words_ok = len(parts) >= 3 and parts[-1].isdigit() and all(word in _WORDS for word in parts[1:-1])
    if not words_ok or not any(pattern.fullmatch(name) for pattern in patterns):
        raise ValueError(f"{name!r} is not an AWS region name{hint}")
    _warn_unknown(name, closest[0] if closest else None)
    return name


@functools.cache
def _warn_unknown(name: str, closest: str | None) -> None:
    """Once per name and process (a service validates the same name on every request)."""
    nearest = f"; the closest known is {closest}" if closest else ""
    log.warning("region %s is not one this botocore knows (a region newer than it?%s); going on", name, nearest)


@functools.cache
def region_pattern() -> str:
    """One regular expression for exactly the names `check_region` lets through (with the
    `Region` type's form): each partition's names, its middle words those of a region.

    The reference registry's OpenAPI document declares it, so that a client (or a fuzzer)
    can tell from the schema alone which names the service takes.
    """
    words = "|".join(sorted(_WORDS))
    forms = []
    for partition in _partitions():
        # Each is `^<geography>\-\w+\-\d+$`.
        match = re.fullmatch(r"\^(.+?)\\-\\w\+\\-\\d\+\$", partition["regionRegex"])
        if match is None:
            continue
        geography = match.group(1).replace("\\-", "-")
        if not re.fullmatch(r"[a-z()|-]+", geography):  # a form this function does not know
            continue
        forms.append(f"{geography}-({words})")  # `\w+` is one word
    return "^(" + "|".join(forms) + ")-[0-9]{1,2}$"
