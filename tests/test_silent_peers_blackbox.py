"""Black-box tests: peers that answer late, trickle, or never.

Written from the README and docs/faults.md alone.  A small loopback proxy of this file's own
(`SilentPeer`) stands in front of the real moto S3 server or the reference MIMS and, for the
requests a rule picks, misbehaves after accepting the connection:

- `MUTE`: the request is forwarded (the server acts on it), its answer is never sent, the
  connection stays open;
- `BLACKHOLE`: the request is read and never forwarded nor answered;
- `SWALLOW`: the request is forwarded, the answer read and dropped, the connection closed with
  no answer at all;
- `HEAD_ONLY`: the answer's head is sent, its body never (half-open);
- `TRICKLE`: the answer is sent one byte every `TRICKLE_GAP` seconds, so that no per-read
  timeout ever fires (a slow-loris answer).

Each run is the CLI in a subprocess with short documented timeouts (`REGISTRAR_*`), and a
subprocess `timeout=` so that a hang is a failure, not a stuck suite.  What is checked: the
run ends in bounded time with the documented exit code, a message naming the peer, and the
cleanup holds (nothing left under the prefix, objects and open multipart uploads, except what
an accepted registration still reads, which must then be kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack

from .conftest import (
    HELD,
    MiB,
    environment,
    final_status,
    kept_by_a_timeout,
    leftovers,
    make_job,
    mims_server,
    remove_all,
    request_for,
)

MUTE = "mute"
BLACKHOLE = "blackhole"
SWALLOW = "swallow"
HEAD_ONLY = "head-only"
TRICKLE = "trickle"
#: Seconds between two bytes of a trickled answer: an S3 or MIMS answer head is some hundred bytes,
#: so a trickled answer takes minutes, far past every bound of these tests, yet no read waits long.
TRICKLE_GAP = 0.25

PeerRule = Callable[[str, str], "str | None"]

#: What a CLI run may take on top of the documented timeouts: the interpreter's start-up and
#: imports, the job's inspection, the upload of the small example (a loaded 2-core machine).
SLACK = 8.0
#: The bound on a run a strict xfail test shows hanging (killed then: the test fails rather than
#: hangs): what a run that kept its deadline would take, a CLI start-up and a small upload more.
HANG = 6.0


class SilentPeer:
    """Forwards 127.0.0.1:<port> to `upstream`, one request per connection; `rule(method, target)`
    picks a misbehaviour (see the module's doc) or None (forwarded, answered)."""

    def __init__(self, upstream: str, rule: PeerRule) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.rule = rule
        self.seen: list[tuple[str, str, str | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.endpoint = ""

    def __enter__(self) -> SilentPeer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def picked(self, mode: str) -> list[tuple[str, str]]:
        return [(m, t) for m, t, a in self.seen if a == mode]

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        async with server:
            await self._stop.wait()
        # asyncio.run cancels the handlers still misbehaving

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target = (part.decode() for part in head.split(b" ", 2)[:2])
        action = self.rule(method, target)
        self.seen.append((method, target, action))
        if action == BLACKHOLE:
            while await reader.read(65536):
                pass
            await asyncio.sleep(3600)
            return
        answer = await self._forward(method, head, reader, writer)
        if action is None:
            writer.write(answer)
            await writer.drain()
        elif action == SWALLOW:
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.shutdown(1)  # FIN: no answer, and no more
            await asyncio.sleep(0.5)
        elif action == MUTE:
            await asyncio.sleep(3600)
        elif action == HEAD_ONLY:
            writer.write(answer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(3600)
        elif action == TRICKLE:
            for i in range(len(answer)):
                writer.write(answer[i : i + 1])
                await writer.drain()
                await asyncio.sleep(TRICKLE_GAP)
        else:  # pragma: no cover
            raise AssertionError(action)

    async def _forward(
        self, method: str, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        """Send the request on (Connection: close), pass 100 Continue through; the whole answer."""
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            up_writer.write(b"\r\n".join(lines[:-2]) + b"\r\nConnection: close\r\n\r\n")

            async def pump() -> None:
                with contextlib.suppress(ConnectionError):
                    await up_writer.drain()
                    while data := await reader.read(65536):
                        up_writer.write(data)
                        await up_writer.drain()

            pumping = asyncio.ensure_future(pump())
            try:
                while True:
                    response = await up_reader.readuntil(b"\r\n\r\n")
                    if response.startswith(b"HTTP/1.1 100"):
                        writer.write(response)
                        await writer.drain()
                        continue
                    break
                length = _content_length(response)
                if method == "HEAD" or response[9:12] in (b"204", b"304"):
                    length = 0
                body = await up_reader.read() if length is None else await up_reader.readexactly(length)
            finally:
                pumping.cancel()
        finally:
            up_writer.close()
        kept = [line for line in response.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join(kept[:-2]) + b"\r\nConnection: close\r\n\r\n" + body


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


# --- helpers --------------------------------------------------------------------------------------


def cli(env: dict[str, str], *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """`async-registrar *args` in a subprocess; the result and its wall time. A run that does not end
    within `timeout` fails the test (pytest's TimeoutExpired) instead of hanging the suite."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "async_registrar", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as hung:  # killed by subprocess.run: what it said until then
        said = hung.stderr.decode(errors="replace") if isinstance(hung.stderr, bytes) else hung.stderr
        raise AssertionError(f"`{' '.join(args)}` did not end within {timeout:g} s; its stderr:\n{said}") from None
    return done, time.monotonic() - started


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


def error_lines(stderr: str) -> str:
    """The `error:` message and what follows it (the run's last word), for a readable assertion."""
    index = stderr.find("error:")
    return stderr[index:] if index >= 0 else stderr[-2000:]


def is_post(method: str, target: str) -> bool:
    return method == "POST" and target.split("?")[0].rstrip("/").endswith("/v1/registrations")


def is_poll(method: str, target: str) -> bool:
    """A GET of a registration's state (not the preflight's probe of an id that cannot exist)."""
    return method == "GET" and "/v1/registrations/" in target and "preflight-" not in target


def is_head_bucket(bucket: str, method: str, target: str) -> bool:
    return method == "HEAD" and target.split("?", 1)[0].strip("/") == bucket


# --- 1. the preflight: S3 and the registry silent or trickling ---------------------------------------

PREFLIGHT = 2.0


@pytest.mark.parametrize("mode", [TRICKLE])
async def test_a_bucket_that_does_not_answer_headbucket_fails_the_preflight_in_time(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, mode: str
) -> None:
    """HeadBucket taken and never (or only byte by byte) answered: the preflight checks each bucket
    "within REGISTRAR_PREFLIGHT_TIMEOUT", then exit 4 naming the bucket, before any upload."""
    bucket = settings.s3_bucket
    job = make_job(tmp_path)
    with SilentPeer(stack.s3_endpoint, lambda m, t: mode if is_head_bucket(bucket, m, t) else None) as peer:
        env = environment(
            stack, settings, job, AWS_ENDPOINT_URL_S3=peer.endpoint, REGISTRAR_PREFLIGHT_TIMEOUT=str(PREFLIGHT)
        )
        done, took = cli(env, "register", timeout=PREFLIGHT + SLACK + 20)
    assert peer.picked(mode), peer.seen
    assert done.returncode == 4, done.stderr
    assert took < PREFLIGHT + SLACK, (took, error_lines(done.stderr))
    assert bucket in error_lines(done.stderr), done.stderr
    no_traceback(done.stderr)
    assert [(m, t) for m, t, _ in peer.seen if m in ("PUT", "POST", "DELETE")] == []
    assert await leftovers(s3, bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("mode", [TRICKLE])
async def test_a_registry_that_trickles_or_drops_the_probe_fails_the_preflight_in_time(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, mode: str
) -> None:
    """The registry's probe answered byte by byte, head only, or not at all (closed): retried until
    REGISTRAR_PREFLIGHT_TIMEOUT, then exit 5 naming the endpoint; nothing uploaded, nothing left."""
    job = make_job(tmp_path)
    with SilentPeer(stack.mims_endpoint, lambda m, t: mode) as peer:
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=peer.endpoint,
            REGISTRAR_PREFLIGHT_TIMEOUT=str(PREFLIGHT),
            REGISTRAR_MIMS_REQUEST_TIMEOUT="1",
        )
        done, took = cli(env, "register", timeout=PREFLIGHT + SLACK + 20)
    assert done.returncode == 5, done.stderr
    assert took < PREFLIGHT + SLACK, (took, error_lines(done.stderr))
    assert peer.endpoint in error_lines(done.stderr), done.stderr
    no_traceback(done.stderr)
    assert "uploading" not in done.stderr
    assert [m for m, t, _ in peer.seen if m == "POST"] == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- 2. the submission: a POST the registry took but never answered usably ----------------------------


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(
            TRICKLE,
        ),
        SWALLOW,
    ],
)
async def test_a_post_taken_and_never_answered_keeps_what_the_registration_reads(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, mode: str
) -> None:
    """Every POST reaches the registry (a registration exists) and its answer never arrives whole:
    trickled, dropped with the connection, never sent, or its body never sent.  The run ends by
    REGISTRAR_SUBMIT_TIMEOUT with a registry error (5) or an accepted-but-unfinished one (6); since
    the POST may have been processed, the artifacts are kept and named, and the registration the
    registry made from them does not end FAILED for lack of them.  One registration only."""
    job = make_job(tmp_path)
    submit = 2.0
    with (
        mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as registry,
        SilentPeer(registry.endpoint, lambda m, t: mode if is_post(m, t) else None) as peer,
    ):
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=peer.endpoint,
            REGISTRAR_MIMS_REQUEST_TIMEOUT="1",
            REGISTRAR_SUBMIT_TIMEOUT=str(submit),
            REGISTRAR_WAIT_TIMEOUT="1",  # should an answer get through after all: kept at once
            REGISTRAR_CLEANUP_TIMEOUT="5",
            MODS_WORKFLOW_EXECUTION_ID=f"wf-silent-{mode}",
        )
        done, took = cli(env, "register", timeout=submit + HANG)
        assert peer.picked(mode), peer.seen
        assert registry.registration_count == 1, done.stderr
        assert done.returncode in (5, 6), done.stderr
        assert took < submit + HANG, (took, error_lines(done.stderr))
        no_traceback(done.stderr)
        message = error_lines(done.stderr)
        assert peer.endpoint in message or "registr" in message, message
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert sorted(k.rsplit("/", 1)[1] for k in kept) == ["model.tar.gz", "payload.tar.gz", "registration.json"]
        (prefix,) = {k.rsplit("/", 1)[0] for k in kept}
        assert f"s3://{settings.s3_bucket}/{prefix}/" in message, message
        assert "MODS_WORKFLOW_EXECUTION_ID" in message, message
        # The registration reads its artifacts when it finishes: they are there.
        registry.finish_processing()
        (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_sigterm_while_the_post_answer_trickles_keeps_the_artifacts_and_says_so(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The POST reached the registry and its answer trickles; SIGTERM then.  A signal while the POST
    is in flight counts as accepted: exit 143 within REGISTRAR_CLEANUP_TIMEOUT, the artifacts kept
    (the registration made from them ends SUCCEEDED), the prefix named."""
    job = make_job(tmp_path)
    with (
        mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as registry,
        SilentPeer(registry.endpoint, lambda m, t: TRICKLE if is_post(m, t) else None) as peer,
    ):
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=peer.endpoint,
            REGISTRAR_CLEANUP_TIMEOUT="3",
            MODS_WORKFLOW_EXECUTION_ID="wf-silent-sigterm-post",
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "register"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while registry.registration_count == 0 and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            assert registry.registration_count == 1
            time.sleep(0.3)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=3 + SLACK)
            took = time.monotonic() - signalled
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert peer.picked(TRICKLE), peer.seen
        assert process.returncode == 143, stderr
        assert took < 3 + 3, (took, error_lines(stderr))
        no_traceback(stderr)
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert sorted(k.rsplit("/", 1)[1] for k in kept) == ["model.tar.gz", "payload.tar.gz", "registration.json"]
        (prefix,) = {k.rsplit("/", 1)[0] for k in kept}
        assert f"s3://{settings.s3_bucket}/{prefix}/" in error_lines(stderr), stderr
        registry.finish_processing()
        (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_post_whose_first_answer_stops_after_its_head_is_sent_again_and_registers_once(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Half-open once: the first POST's answer head arrives, its body never.  Cut by
    REGISTRAR_MIMS_REQUEST_TIMEOUT, sent again with the same key, the replay answered: exit 0, one
    registration, nothing left."""
    job = make_job(tmp_path)
    posts = [0]

    def first_post_half_open(method: str, target: str) -> str | None:
        if is_post(method, target):
            posts[0] += 1
            return HEAD_ONLY if posts[0] == 1 else None
        return None

    with (
        mims_server(stack) as registry,
        SilentPeer(registry.endpoint, first_post_half_open) as peer,
    ):
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=peer.endpoint,
            REGISTRAR_MIMS_REQUEST_TIMEOUT="1",
            REGISTRAR_SUBMIT_TIMEOUT="20",
        )
        done, took = cli(env, "register", timeout=SLACK + 40)
        assert done.returncode == 0, done.stderr
        assert posts[0] >= 2
        assert registry.registration_count == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[1].startswith("Model id for model being registered: model-"), done.stdout
    assert took < 1 + SLACK, took
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- 3. the wait: polls trickled, half-open, never answered -----------------------------------------


@pytest.mark.parametrize("mode", [TRICKLE])
async def test_polls_that_never_complete_end_at_the_wait_timeout_and_keep(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, mode: str
) -> None:
    """The POST is answered; every poll then trickles, stops after its head, or is never answered.
    The wait ends at --wait-timeout all the same: exit 6, the registration named, its artifacts
    kept (it is unfinished), how to resume."""
    job = make_job(tmp_path)
    wait = 2.0
    with (
        mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as registry,
        SilentPeer(registry.endpoint, lambda m, t: mode if is_poll(m, t) else None) as peer,
    ):
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=peer.endpoint,
            REGISTRAR_MIMS_REQUEST_TIMEOUT="1",
            REGISTRAR_WAIT_TIMEOUT=str(wait),
            MODS_WORKFLOW_EXECUTION_ID=f"wf-silent-poll-{mode}",
        )
        done, took = cli(env, "register", timeout=wait + SLACK + 60)
        assert peer.picked(mode), peer.seen
        assert done.returncode == 6, done.stderr
        assert took < wait + SLACK, (took, error_lines(done.stderr))
        no_traceback(done.stderr)
        (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
        message = error_lines(done.stderr)
        assert registration_id in message, message
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert len(kept) == 3, kept
        (prefix,) = {k.rsplit("/", 1)[0] for k in kept}
        assert f"s3://{settings.s3_bucket}/{prefix}/" in message, message
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- 4. S3 silent mid-run, and during the cleanup ----------------------------------------------------


async def test_sigterm_while_createmultipartupload_is_unanswered_leaves_no_open_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """CreateMultipartUpload reaches S3 (an upload is opened) and its answer never comes back; SIGTERM
    then: exit 143 within REGISTRAR_CLEANUP_TIMEOUT, and no open upload nor object is left."""
    job = make_job(tmp_path, model_bytes=6 * 1024 * 1024)
    with SilentPeer(stack.s3_endpoint, lambda m, t: MUTE if m == "POST" and t.endswith("?uploads") else None) as peer:
        env = environment(stack, settings, job, AWS_ENDPOINT_URL_S3=peer.endpoint, REGISTRAR_CLEANUP_TIMEOUT="4")
        deadline = time.monotonic() + 30
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "register"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while not peer.picked(MUTE) and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.05)
            assert peer.picked(MUTE), peer.seen
            time.sleep(0.3)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
            took = time.monotonic() - signalled
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 143, stderr
    assert took < 4 + 3, (took, error_lines(stderr))
    no_traceback(stderr)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("mode", [TRICKLE])
async def test_a_failing_run_whose_cleanup_meets_a_silent_s3_is_bounded_and_names_what_is_left(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, mode: str
) -> None:
    """The registry refuses the submission (exit 5: nothing accepted, everything must go); S3 then
    answers every delete, abort and listing byte by byte, or never.  The cleanup is bounded as a whole
    by REGISTRAR_CLEANUP_TIMEOUT: the run exits 5 soon after, and the message names what is left."""
    job = make_job(tmp_path)
    cleanup = 3.0
    silent = [False]

    def rule(method: str, target: str) -> str | None:
        return mode if silent[0] and method in ("DELETE", "GET", "POST") and "registration.json" not in target else None

    def on_post(method: str, target: str) -> str | None:
        if is_post(method, target):
            silent[0] = True  # S3 falls silent as the registry takes the submission (and refuses it)
        return None

    with (
        mims_server(stack, reject_regions=["us-west-2"]) as rejecting,
        SilentPeer(rejecting.endpoint, on_post) as registry,
        SilentPeer(stack.s3_endpoint, rule) as peer,
    ):
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=peer.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            REGISTRAR_CLEANUP_TIMEOUT=str(cleanup),
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "register"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while not silent[0] and process.poll() is None:
                time.sleep(0.02)
            started = time.monotonic()
            _, stderr = process.communicate(timeout=cleanup + SLACK + 30)
            took = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert peer.picked(mode), (peer.seen, stderr)
    assert process.returncode == 5, stderr
    assert took < cleanup + 6, (took, error_lines(stderr))
    no_traceback(stderr)
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    message = error_lines(stderr)
    assert left, "the silent S3 removed nothing, yet nothing is left?"
    (prefix,) = {k.removeprefix("upload:").rsplit("/", 1)[0] for k in left}
    assert prefix in message, message
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- 5. a kept registration asked about while the registry trickles ---------------------------------


async def kept_through(
    peer: SilentPeer, stack: LocalStack, settings: Settings, job: dict[str, Path], lineage: str
) -> dict[str, str]:
    """A registration made through `peer` (passing everything for now) and kept by a short wait
    timeout (the registry holds it unfinished), in-process to save a CLI start-up: the CLI
    environment of the same job and lineage, pointed at `peer`."""
    through = settings.model_copy(update={"mims_endpoint": peer.endpoint, "part_size": 5 * MiB})
    await kept_by_a_timeout(through, request_for(job, workflow_execution_id=lineage))
    return environment(
        stack,
        settings,
        job,
        REGISTRAR_MIMS_ENDPOINT=peer.endpoint,
        REGISTRAR_MIMS_REQUEST_TIMEOUT="1",
        MODS_WORKFLOW_EXECUTION_ID=lineage,
    )


async def test_a_rerun_following_a_kept_registration_through_a_trickling_registry_ends_at_the_wait_timeout(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A re-run finds the kept registration and asks the registry about it; every answer trickles.
    The README: it "follows it even while the registry is away, until --wait-timeout": exit 6 at
    the wait timeout, the registration still kept (nothing removed, nothing registered again)."""
    job = make_job(tmp_path)
    trickling = [False]
    with (
        mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as registry,
        SilentPeer(registry.endpoint, lambda m, t: TRICKLE if trickling[0] and m == "GET" else None) as peer,
    ):
        env = await kept_through(peer, stack, settings, job, "wf-silent-rerun")
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert len(kept) == 3, kept
        trickling[0] = True
        wait = 1.0
        done, took = cli(env, "register", "--wait-timeout", str(wait), timeout=wait + HANG)
        assert peer.picked(TRICKLE), peer.seen
        assert done.returncode == 6, done.stderr
        assert took < wait + HANG, (took, error_lines(done.stderr))
        assert registry.registration_count == 1
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == sorted(kept)
        registry.finish_processing()
        (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_sweep_asking_a_trickling_registry_about_a_kept_run_ends_and_spares_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`sweep --older-than 0s` finds a kept run and asks the registry about its registration; the
    answer trickles.  A run whose registry cannot be asked is spared (until --max-age): the sweep
    ends in bounded time, exit 0, and the kept run's objects are all still there."""
    job = make_job(tmp_path)
    trickling = [False]
    with (
        mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as registry,
        SilentPeer(registry.endpoint, lambda m, t: TRICKLE if trickling[0] and m == "GET" else None) as peer,
    ):
        env = await kept_through(peer, stack, settings, job, "wf-silent-sweep")
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert len(kept) == 3, kept
        trickling[0] = True
        done, took = cli(env, "sweep", "--older-than", "0s", timeout=HANG)
        assert peer.picked(TRICKLE), peer.seen
        assert done.returncode == 0, done.stderr
        assert took < HANG, took
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == sorted(kept)
        registry.finish_processing()
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
