"""JSON as RFC 8259 defines it, for the files a user writes (the registration configuration and
the performance metadata).

Python's `json.loads` also takes `NaN` and `Infinity` (which pydantic then sends to the registry
as `null`), keeps the last of a key given twice in one object, and fails on an integer of more
than 4300 digits with a `ValueError` that advises `sys.set_int_max_str_digits`.  Here each of
them is a `ValueError` that says what is wrong, so the caller can name the file.
"""

from __future__ import annotations

import json
from typing import Any

#: The longest integer taken (Python's own limit for converting a string is 4300 digits).
MAX_INTEGER_DIGITS = 4000


def loads(text: str | bytes) -> Any:
    """Parse `text`; `ValueError` (a `JSONDecodeError`, `UnicodeDecodeError` or one naming the
    value or key) or `RecursionError` where it is not strict JSON."""
    return json.loads(text, parse_constant=_no_constant, parse_int=_integer, object_pairs_hook=_unique_keys)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity): write a number, or null")


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"a number of {len(digits.lstrip('-'))} digits is too large (at most {MAX_INTEGER_DIGITS})")
    return int(digits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key {key!r} is given twice in one object: keep the one you mean")
        found[key] = value
    return found
