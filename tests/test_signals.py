"""Signals: SIGTERM and SIGINT during the upload and during the cleanup, as a user sends them."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack

from .conftest import MiB, leftovers, make_job, mims_server, remove_all
from .fault_proxy import FaultProxy, Stall
from .test_cli import environment


def start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "async_registrar", "register"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(process: subprocess.Popen[str], needle: str, seen: list[str]) -> None:
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)}")


async def test_sigterm_during_the_upload(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """Parts held back by a slow link; SIGTERM: parts cancelled, upload aborted, exit 143, promptly."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    slow_parts = lambda method, target: Stall(30) if method == "PUT" and "partNumber=" in target else None  # noqa: E731
    with FaultProxy(stack.s3_endpoint, slow_parts) as proxy:
        process = start(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint))
        seen: list[str] = []
        wait_for(process, "uploading model", seen)
        time.sleep(0.5)  # the parts are on their way (and stuck)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - sent
    assert process.returncode == 143, "".join(seen) + stderr
    assert took < 10
    assert "SIGTERM received: stopping and cleaning up" in stderr
    assert "error: terminated by SIGTERM; no temporary object was left behind, run again to register" in stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_during_an_upload_command_says_what_an_upload_leaves(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`upload` stopped by SIGTERM: its message speaks of its multipart upload, not of a
    registration's temporary objects and a re-run "to register"."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    slow_parts = lambda method, target: Stall(30) if method == "PUT" and "partNumber=" in target else None  # noqa: E731
    target = f"s3://{settings.s3_bucket}/{settings.s3_prefix}up.tar.gz"
    with FaultProxy(stack.s3_endpoint, slow_parts) as proxy:
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "upload", str(job["model"]), target],
            env=environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen: list[str] = []
        wait_for(process, "uploading", seen)
        time.sleep(0.5)  # the parts are on their way (and stuck)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, "".join(seen) + stderr
    assert "error: terminated by SIGTERM; the multipart upload was aborted" in stderr
    assert "to register" not in stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_signals_during_the_cleanup_do_not_stop_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGINT while deletes are slow, then again: the cleanup finishes; the exit code says SIGINT."""
    job = make_job(tmp_path)
    slow_deletes = lambda method, target: Stall(2) if method == "DELETE" and "uploadId" not in target else None  # noqa: E731
    with (
        FaultProxy(stack.s3_endpoint, slow_deletes) as proxy,
        mims_server(stack, fail_registrations="rejected for the test") as registry,
    ):
        env = environment(
            stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint, REGISTRAR_MIMS_ENDPOINT=registry.endpoint
        )
        process = start(env)
        seen: list[str] = []
        wait_for(process, "cleaning up the temporary objects", seen)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(seen) + stderr
    assert "SIGINT received again: still cleaning up" in stderr
    assert "removed the temporary objects" in stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_as_pid_1(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """As PID 1 (a container's entrypoint), SIGTERM is handled, not ignored: exit 143, and the
    registration the registry accepted keeps its artifacts, named."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, check=False).returncode
    ):
        pytest.skip("needs unshare and the right to make a PID namespace (root)")
    job = make_job(tmp_path)
    with mims_server(stack, pending_delay=60) as slow:
        env = environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=slow.endpoint)
        process = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                sys.executable,
                "-c",
                "import os, sys; assert os.getpid() == 1, os.getpid(); from async_registrar._cli import main; "
                "sys.exit(main(['register']))",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen: list[str] = []
        wait_for(process, "submitted:", seen)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=True)
        pid_1 = int(children.stdout.split()[0])
        subprocess.run(["kill", "-TERM", str(pid_1)], check=True)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, "".join(seen) + stderr
    assert "SIGTERM received: stopping and cleaning up" in stderr
    assert "error: terminated by SIGTERM:" in stderr
    assert "is PENDING; its artifacts are kept under s3://" in stderr
    assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
