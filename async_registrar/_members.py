"""Which tar members are safe to extract: tarfile's `data` filter, or the same rules by hand.

`tarfile.data_filter` exists from Python 3.11.4 (and 3.12); Debian bookworm's 3.11.2 lacks
it, so the same rules are applied here where it is missing.  The one rule added on top:
absolute member names are refused (the filter would silently strip their slash).
"""

from __future__ import annotations

import posixpath
import tarfile

__all__ = ["member_problem"]

_DESTINATION = "/extract-here"


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` would be unsafe, or None if it is fine."""
    if member.name.startswith("/"):
        return f"member {member.name!r} has an absolute path"
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, _DESTINATION)
        except tarfile.FilterError as exc:
            return f"member {member.name!r}: {exc}"
        return None
    return _by_hand(member)


def _by_hand(member: tarfile.TarInfo) -> str | None:
    if _outside(member.name):
        return f"member {member.name!r} would be extracted outside the destination"
    if member.isfile() or member.isdir():
        return None
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            return f"member {member.name!r} links to an absolute path"
        resolved = posixpath.join(posixpath.dirname(member.name), target) if member.issym() else target
        if _outside(resolved):
            return f"member {member.name!r} links outside the destination"
        return None
    return f"member {member.name!r} is a special file"


def _outside(name: str) -> bool:
    normal = posixpath.normpath(posixpath.join(_DESTINATION, name))
    return not (normal == _DESTINATION or normal.startswith(_DESTINATION + "/"))
