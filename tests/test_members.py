"""Member safety: tarfile's data filter where it exists, the same rules by hand where not."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_registrar._members import MemberCheck, _by_hand, member_problem, members


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


def _archive(entries: list[tuple[str, str, str]]) -> bytes:
    """A tar (not gzipped) of (name, kind, link target) entries: kind is file, dir, sym or hard."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, target in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, target
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, target
            if kind == "file":
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _our_verdict(data: bytes) -> str | None:
    check = MemberCheck()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in members(tar):
            problem = check.problem(member)
            if problem is not None:
                return problem
    return None


def test_a_chain_of_links_through_earlier_members_is_refused(tmp_path: Path) -> None:
    """`d -> .`, `d/e -> ..`, `d/e/escaped.txt`: each passes the filter on its own; extraction with
    filter="data" refuses the last (it follows the links on disk), and so does the check."""
    data = _archive([("d", "sym", "."), ("d/e", "sym", ".."), ("d/e/escaped.txt", "file", "")])
    with tarfile.open(fileobj=io.BytesIO(data)) as each:
        assert all(member_problem(m) is None for m in each.getmembers())
    problem = _our_verdict(data)
    assert problem is not None
    assert "through a link before it" in problem
    with pytest.raises(tarfile.FilterError), tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path / "out", filter="data")


def test_members_keeps_no_list(tmp_path: Path) -> None:
    """50,000 members walked with `members()`: tarfile's list stays empty, memory stays flat."""
    data = _archive([(f"m{i:05d}", "file", "") for i in range(50_000)])
    tracemalloc.start()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            count = sum(1 for _ in members(tar))
            assert tar.members == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 50_000
    assert peak < 5 * 1024 * 1024, peak


_NAMES = ["a", "b", "a/b", "a/c", "b/c", "a/b/c", "c"]
_TARGETS = [".", "..", "a", "b", "../x", "a/..", "../..", "c", "b/../.."]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from(["file", "dir", "sym"]), st.sampled_from(_TARGETS)),
        min_size=1,
        max_size=6,
    )
)
def test_what_the_check_lets_through_extracts_inside_the_destination(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[str, str, str]]
) -> None:
    """Against the real thing: an archive the check accepts extracts with filter="data" without a
    FilterError, and writes nothing outside the destination."""
    data = _archive(entries)
    if _our_verdict(data) is not None:
        return
    root = tmp_path_factory.mktemp("extract")
    destination = root / "dest"
    destination.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        try:
            tar.extractall(destination, filter="data")
        except tarfile.FilterError as exc:
            raise AssertionError(f"the check let through what extraction refuses: {entries}: {exc}") from None
        except (OSError, tarfile.ExtractError, KeyError, RecursionError):
            pass  # a file and a directory of one name, a dangling or looping link: not a safety question
    outside = [p for p in root.rglob("*") if not (p == destination or destination in p.parents)]
    assert outside == [], entries
