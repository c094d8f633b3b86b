"""The bench's reporting: what it computes from the runs (not the runs: `scripts/bench`)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def sample(bench: ModuleType, dataset: str, contender: str, wall: float, cpu: float, size: int) -> object:
    return bench.Sample(contender, dataset, 1, wall, cpu, 100.0, 0.0, size, size, 1.0)


def test_the_fixed_cost_is_taken_off_each_contender_before_the_ratio(bench: ModuleType) -> None:
    gib, tiny = 1 << 30, 1024
    rows = bench.summarise(
        [
            sample(bench, "model 1 GiB", "ours", 4.2, 3.3, gib),
            sample(bench, "model 1 GiB", "s5cmd-cp", 3.2, 2.5, gib),
            sample(bench, bench.STARTUP, "ours", 0.8, 0.7, tiny),
            sample(bench, bench.STARTUP, "s5cmd-cp", 0.1, 0.1, tiny),
        ]
    )
    lines = bench.net_of_startup(rows)
    # (4.2 - 0.8) / (3.2 - 0.1) = 1.10; (3.3 - 0.7) CPU-s over 1 GiB = 2.60
    assert "| model 1 GiB | 1.10 | 2.60 |" in lines
    assert any("ours 0.8 s and 0.7 CPU-s" in line for line in lines)
    # A 1 KiB input has no meaningful per-GiB figure.
    assert next(r for r in rows if r["dataset"] == bench.STARTUP)["cpu_s_per_gib"] is None
    startup_line = next(line for line in bench.dataset_table(rows) if line.startswith(f"| {bench.STARTUP} "))
    assert "| 0.7 |  | " in startup_line  # CPU s, then no CPU s per GiB
    # The checks stay on the whole figures: 4.2 / 3.2 is over 1.15.
    checks = bench.dataset_checks(rows, ["model 1 GiB", bench.STARTUP])
    ratio = next(c for c in checks if c["check"] == "model 1 GiB: ours / s5cmd cp of the archive")
    assert (ratio["value"], ratio["ok"]) == (1.31, False)


def test_without_the_start_up_runs_there_is_no_net_table(bench: ModuleType) -> None:
    rows = bench.summarise([sample(bench, "model 1 GiB", "ours", 4.2, 3.3, 1 << 30)])
    assert bench.net_of_startup(rows) == []


def test_the_order_turns_each_run_so_no_contender_always_follows_the_same_one(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    order: list[tuple[int, str]] = []

    class FakeServer:
        def __init__(self, *_: object) -> None:
            pass

        def __enter__(self) -> FakeServer:
            return self

        def __exit__(self, *_: object) -> None:
            pass

    def run_contender(server: object, dataset: object, contender: str, path: Path, run: int, tools: object) -> str:
        order.append((run, contender))
        return contender

    monkeypatch.setattr(bench, "Server", FakeServer)
    monkeypatch.setattr(bench, "run_contender", run_contender)
    monkeypatch.setattr(bench, "tree_size", lambda _: 1)
    dataset = bench.Dataset("model 1 GiB", tmp_path, tmp_path, ["ours", "s5cmd-cp", "original"])
    bench.run_datasets([dataset], 3, "juicefs", tmp_path, {"pigz": None})
    runs = [[c for r, c in order if r == run] for run in (1, 2, 3)]
    assert runs == [
        ["ours", "s5cmd-cp", "original"],
        ["s5cmd-cp", "original", "ours"],
        ["original", "ours", "s5cmd-cp"],
    ]


def test_ours_and_its_variants_checked_differently_is_a_missed_check(bench: ModuleType) -> None:
    """A variant whose upload the server checked less (once: `size-only`, from a key the
    capability probe mis-read) is no fair comparison: the report says so, and each row
    names what the server checked."""
    gib = 1 << 30

    def checked(contender: str, wall: float, integrity: str) -> object:
        return bench.Sample(contender, "model 1 GiB", 1, wall, 2.0, 150.0, 0.0, gib, gib, 3.0, integrity)

    alike = [checked("ours", 3.1, "sigv4-payload"), checked("ours@REGISTRAR_PART_SIZE=24MiB", 3.0, "sigv4-payload")]
    rows = bench.summarise([*alike, bench.Sample("s5cmd-cp", "model 1 GiB", 1, 2.5, 2.0, 20.0, 0.0, gib, gib, 3.0)])
    assert not [c for c in bench.dataset_checks(rows, ["model 1 GiB"]) if "checked alike" in c["check"]]
    assert any("checked by sigv4-payload" in line for line in bench.dataset_table(rows))
    assert not any("s5cmd" in line and "checked by" in line for line in bench.dataset_table(rows))

    rows = bench.summarise([alike[0], checked("ours@REGISTRAR_PART_SIZE=24MiB", 2.6, "size-only")])
    (missed,) = [c for c in bench.dataset_checks(rows, ["model 1 GiB"]) if "checked alike" in c["check"]]
    assert (missed["value"], missed["ok"]) == ("sigv4-payload / size-only", False)


def test_ours_is_also_compared_with_s5cmd_sending_the_same_bytes(bench: ModuleType, tmp_path: Path) -> None:
    """`s5cmd cp` of the archive ours makes sends what ours sends: the line beside the checks
    tells the client's cost apart from the bytes' (the check stays on the prebuilt archive)."""
    gib = 1 << 30
    samples = [
        sample(bench, "model 1 GiB", "ours", 3.3, 2.4, gib),
        sample(bench, "model 1 GiB", "s5cmd-cp", 2.6, 2.0, gib),
        sample(bench, "model 1 GiB", "s5cmd-cp-ours", 3.0, 2.1, gib),
    ]
    rows = bench.summarise(samples)
    (line,) = [line for line in bench.same_bytes(rows) if line]
    assert "ours / `s5cmd cp` of the same 1024 MiB ours sends: 1.10x" in line
    assert "`s5cmd cp` of the 1024 MiB prebuilt archive: 1.15x" in line
    checks = bench.dataset_checks(rows, ["model 1 GiB"])
    assert next(c for c in checks if c["check"] == "model 1 GiB: ours / s5cmd cp of the archive")["value"] == 1.27
    tools = {"s5cmd": "/bin/s5cmd"}
    command = bench.commands("s5cmd-cp-ours", tmp_path, "k", tools, "http://127.0.0.1:1")
    assert command == [
        "/bin/s5cmd",
        "--endpoint-url",
        "http://127.0.0.1:1",
        "cp",
        f"{tmp_path}/model.tar.gz",
        "s3://bench/k",
    ]
    assert bench.same_bytes(bench.summarise(samples[:2])) == []


async def test_the_archive_ours_makes_for_s5cmd_is_the_one_ours_uploads(bench: ModuleType, tmp_path: Path) -> None:
    """The bench's copy of ours's archive has the size and sha256 of the one ours uploads."""
    import hashlib
    import os

    from async_registrar import Settings
    from async_registrar._artifacts import inspect_artifact
    from async_registrar._upload import digest_artifact

    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.f32").write_bytes(os.urandom(300_000))
    (model / "config.json").write_text('{"layers": 2}')
    made = bench.ours_archive(model, tmp_path / "out", str(Path(sys.executable).parent / "async-registrar"))
    data = (made / "model.tar.gz").read_bytes()
    settings = Settings.from_env(s3_bucket="bench", registry=False)
    expected = await digest_artifact(inspect_artifact(model, role="upload"), settings)
    assert (len(data), hashlib.sha256(data).hexdigest()) == expected
