"""Which tar members are safe to extract: tarfile's `data` filter, or the same rules by hand.

`tarfile.data_filter` exists from Python 3.11.4 (and 3.12); Debian bookworm's 3.11.2 lacks
it, so the same rules are applied here where it is missing.  The one rule added on top:
absolute member names are refused (the filter would silently strip their slash).

The filter judges each member on its own; extraction also follows the links that earlier
members made on disk (`d -> .`, then `d/e -> ..`, then `d/e/escaped.txt` lands outside), and
`extractall(filter="data")` refuses that too.  `MemberCheck` does the same while streaming:
it remembers the symbolic links seen so far (nothing else: no member list) and resolves
every member's path, and every link's target, through them.  `members()` walks a
stream-mode archive without letting `tarfile` keep its list of every `TarInfo`.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

__all__ = ["MemberCheck", "member_problem", "members"]

#: Links followed in one resolution before it counts as a loop (as the kernel's limit).
MAX_LINK_DEPTH = 40


def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a stream-mode archive, in constant memory (`tarfile` appends every
    member to `tar.members`; 400,000 members cost about 200 MiB)."""
    while (member := tar.next()) is not None:
        # `members` is a plain list that the stubs do not declare.
        tar.members.clear()  # type: ignore[attr-defined]
        yield member


class MemberCheck:
    """Checks the members of one archive in order, as extraction would meet them."""

    def __init__(self) -> None:
        self._links: dict[str, str] = {}  # symbolic links so far: resolved name -> target
        self._dirs: set[str] = set()  # directories so far (resolved), made or implied

    def problem(self, member: tarfile.TarInfo) -> str | None:
        """Why extracting `member` (after the members before it) would be unsafe, or None."""
        own = member_problem(member)
        if own is not None:
            return own
        name = posixpath.normpath(member.name).lstrip("/")
        parent = self._resolve(posixpath.dirname(name))
        # Extraction resolves the member's own path too: an earlier link of that very name is
        # followed by the filter's check before it is replaced.
        if parent is None or self._resolve(name) is None:
            return f"member {member.name!r} would be extracted outside the destination through a link before it"
        here = posixpath.join(parent, posixpath.basename(name))
        while parent and parent not in self._dirs:  # the directories extraction makes on the way
            self._dirs.add(parent)
            parent = posixpath.dirname(parent)
        if member.isdir():
            self._dirs.add(here)
        if member.issym():
            if here in self._dirs:  # extraction could not replace the directory: refuse the confusion
                return f"member {member.name!r} is a link where the archive has a directory"
            if self._resolve(posixpath.join(posixpath.dirname(here), member.linkname)) is None:
                return f"member {member.name!r} links outside the destination through a link before it"
            self._links[here] = member.linkname
        elif member.islnk():
            if self._resolve(member.linkname) is None:
                return f"member {member.name!r} links outside the destination through a link before it"
            self._links.pop(here, None)  # extraction unlinks what was there first
        # A directory or a file of a link's name does not replace the link: extraction keeps it
        # (an existing directory) or writes through it.
        return None

    def _resolve(self, path: str, depth: int = 0) -> str | None:
        """`path` (relative to the destination) with every known link followed; None if it
        leaves the destination or loops."""
        resolved: list[str] = []
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    return None
                resolved.pop()
                continue
            candidate = "/".join([*resolved, part])
            target = self._links.get(candidate)
            if target is None:
                resolved.append(part)
                continue
            if depth >= MAX_LINK_DEPTH or target.startswith("/"):
                return None
            followed = self._resolve(posixpath.join("/".join(resolved), target), depth + 1)
            if followed is None:
                return None
            resolved = followed.split("/") if followed else []
        return "/".join(resolved)


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
