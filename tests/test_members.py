"""Member safety: tarfile's data filter where it exists, the same rules by hand where not."""

from __future__ import annotations

import tarfile

import pytest

from async_registrar._members import _by_hand, member_problem


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


CASES = [
    (member("weights.bin"), None),
    (member("code", tarfile.DIRTYPE), None),
    (member("code/link", tarfile.SYMTYPE, "../weights.bin"), None),
    (member("../escape.txt"), "outside"),
    (member("a/../../escape.txt"), "outside"),
    (member("link", tarfile.SYMTYPE, "/etc/passwd"), "absolute"),
    (member("link", tarfile.SYMTYPE, "../../etc"), "outside"),
    (member("hard", tarfile.LNKTYPE, "../x"), "outside"),
    (member("fifo", tarfile.FIFOTYPE), "special"),
    (member("dev", tarfile.CHRTYPE), "special"),
]


@pytest.mark.parametrize(("info", "problem"), CASES)
def test_rules_by_hand(info: tarfile.TarInfo, problem: str | None) -> None:
    """The hand-written rules (used on Pythons without data_filter) accept and refuse alike."""
    found = _by_hand(info)
    assert (found is None) == (problem is None), found
    if problem is not None:
        assert problem in str(found)


@pytest.mark.parametrize(("info", "problem"), CASES)
def test_member_problem_agrees(info: tarfile.TarInfo, problem: str | None) -> None:
    """On this Python (with or without data_filter) the verdict is the same."""
    assert (member_problem(info) is None) == (problem is None)


def test_absolute_names_are_refused() -> None:
    """The filter would strip the slash; the registrar refuses the member instead."""
    assert "absolute path" in (member_problem(member("/etc/cron.d/job")) or "")
