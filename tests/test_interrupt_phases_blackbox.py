"""Interruption at every phase, twice: signals to the command and cancellations of the library.

Written black-box from README.md ("What a run does", the exit-code table, "As a library") and
docs/faults.md: the command is run as a subprocess and stopped during the preflight, the scan of
a big directory, the upload, between the upload and the POST, with the POST in flight, during
the wait (also after a resume), and during the cleanup, by SIGTERM, SIGINT, two signals at once
and signals during the cleanup.  The promises checked each time:

- 130 / 143 for SIGINT / SIGTERM "before the registration succeeded (after cleanup)", 0 when the
  signal comes during the cleanup after SUCCEEDED; "A first SIGTERM or SIGINT stops the work and
  cleans up; further signals during cleanup are logged, not obeyed";
- before the point of no return the prefix is emptied (no object, no open multipart upload);
  after it the artifacts are kept, named, and the registration (held unfinished by a
  `late_registry`, which reads the artifacts only when it finishes) reaches SUCCEEDED on them;
- a re-run with the same lineage id resumes and then leaves nothing, with one registration.

The library: `Registrar.register` cancelled by `anyio.fail_after`, `asyncio.wait_for`, a host
task group, and cancelled a second time during its shielded cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import (
    Registrar,
    RegistrationFailed,
    RegistrationKept,
    RegistrationSubmitted,
    RegistrationSucceeded,
    Settings,
)
from async_registrar._local import LocalStack

from .conftest import (
    MiB,
    Recorder,
    environment,
    final_status,
    kept_by_a_timeout,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    release_when_submitted,
    remove_all,
    request_for,
)
from .fault_proxy import FaultProxy, Hold, Late, Stall
from .test_kill_rerun import Cli, until
from .test_one_lineage_blackbox import two_runs

HOLD = 600.0
KEPT = ["model.tar.gz", "payload.tar.gz", "registration.json"]


# --- helpers -------------------------------------------------------------------------------------


class SilentServer:
    """A TCP server that accepts connections and never answers (a registry that hangs)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._held.append(conn)
            self.accepted += 1

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()


def lineage(name: str) -> str:
    return f"wf-int-{name}-{secrets.token_hex(3)}"


def stalled_parts(method: str, target: str) -> object:
    return Stall(HOLD) if method == "PUT" and "partNumber=" in target else None


def is_delete(method: str, target: str) -> bool:
    """A delete of a run's objects or an abort (not of the probe's `.capabilities-*` objects)."""
    return (method == "DELETE" and ".capabilities-" not in target) or (method == "POST" and target.endswith("?delete"))


async def names_left(s3: Any, settings: Settings) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in await leftovers(s3, settings.s3_bucket, settings.s3_prefix))


def registration_named(stderr: str) -> str:
    found: set[str] = set(re.findall(r"\breg-[0-9a-f]+", stderr))
    assert len(found) == 1, stderr
    return found.pop()


def rerun_and_release(env: dict[str, str], registry: Any) -> tuple[int, str, str]:
    """The same job again; the registry lets its registrations finish once the re-run found one."""
    cli = Cli(env)
    try:
        cli.wait_for("resuming registration", "submitted:", "found: registration")
    finally:
        registry.finish_processing()
    return cli.finish()


def assert_clean_exit(code: int, expected: int, stderr: str) -> None:
    assert code == expected, stderr
    assert "Traceback" not in stderr, stderr


# --- the command: before the point of no return ----------------------------------------------------


async def test_sigterm_during_the_preflight_stops_at_once_and_writes_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A registry that takes the probe's connection and never answers: the preflight retries for
    30 s.  SIGTERM then: 143, promptly, no traceback, nothing under the prefix."""
    job = make_job(tmp_path)
    with SilentServer() as silent:
        cli = Cli(environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=silent.endpoint))
        await until(lambda: silent.accepted >= 1, "the preflight's probe reached the registry")
        sent = time.monotonic()
        cli.process.send_signal(signal.SIGTERM)
        code, stdout, stderr = cli.finish(timeout=20)
        took = time.monotonic() - sent
    assert_clean_exit(code, 143, stderr)
    assert took < 10, stderr
    assert stdout == ""
    assert "error: terminated by SIGTERM" in stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigint_during_the_scan_of_a_big_directory(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A model of 4,000 small files; SIGINT as soon as the process has the model directory open
    (its scan): 130, no traceback, nothing under the prefix."""
    job = make_job(tmp_path)
    many = job["model"] / "shards"
    for d in range(4):
        sub = many / f"d{d:02}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / f"f{i:04}.bin").write_bytes(b"x")
    cli = Cli(environment(stack, settings, job))
    model = str(job["model"])

    def scanning() -> bool:
        try:
            for fd in os.listdir(f"/proc/{cli.process.pid}/fd"):
                with_target = os.readlink(f"/proc/{cli.process.pid}/fd/{fd}")
                if with_target.startswith(model):
                    return True
        except OSError:
            pass
        return False

    deadline = time.monotonic() + 30
    while not scanning():
        assert cli.process.poll() is None, cli.stderr
        assert time.monotonic() < deadline, cli.stderr
        time.sleep(0.001)
    cli.process.send_signal(signal.SIGINT)
    code, stdout, stderr = cli.finish(timeout=30)
    assert_clean_exit(code, 130, stderr)
    assert stdout == ""
    assert "interrupted by SIGINT" in stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [(signal.SIGINT, signal.SIGTERM, 130)],
    ids=["int-term"],
)
async def test_two_signals_in_quick_succession_mid_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, first: int, second: int, code: int
) -> None:
    """Parts stuck on the wire; a signal, and another once the first was taken.  The first decides the exit code, the
    second is logged, not obeyed: the uploads are aborted, nothing is left."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    slow = {"on": False}

    def rule(method: str, target: str) -> object:
        if slow["on"] and is_delete(method, target):
            return Stall(0.5)  # a cleanup long enough for the second signal to land in it
        return stalled_parts(method, target)

    with FaultProxy(stack.s3_endpoint, rule) as proxy:
        cli = Cli(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint))
        await until(lambda: proxy.count("PUT", "partNumber=") >= 1, "a part on its way")
        slow["on"] = True
        cli.process.send_signal(first)
        cli.expect(f"{signal.Signals(first).name} received")
        cli.process.send_signal(second)
        result, stdout, stderr = cli.finish(timeout=30)
    assert_clean_exit(result, code, stderr)
    assert stdout == ""
    first_name, second_name = signal.Signals(first).name, signal.Signals(second).name
    assert f"{first_name} received: stopping and cleaning up" in stderr
    assert f"{second_name} received again: still cleaning up" in stderr
    assert "no temporary object was left behind" in stderr, stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_signals_during_the_cleanup_of_an_interrupted_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGTERM mid-upload, the cleanup's aborts and deletes slow (0.5 s each); SIGINT and SIGTERM
    during that cleanup: still 143, the cleanup finishes, nothing left."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    slow = {"on": False}

    def rule(method: str, target: str) -> object:
        if slow["on"] and is_delete(method, target):
            return Stall(0.5)
        return stalled_parts(method, target)

    with FaultProxy(stack.s3_endpoint, rule) as proxy:
        cli = Cli(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint))
        await until(lambda: proxy.count("PUT", "partNumber=") >= 1, "a part on its way")
        slow["on"] = True
        cli.process.send_signal(signal.SIGTERM)
        cli.expect("SIGTERM received")
        await until(lambda: any(is_delete(m, t) for m, t in proxy.seen), "a delete of the cleanup")
        cli.process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        cli.process.send_signal(signal.SIGTERM)
        code, _, stderr = cli.finish(timeout=40)
    assert_clean_exit(code, 143, stderr)
    assert "SIGINT received again: still cleaning up" in stderr
    assert "no temporary object was left behind" in stderr, stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_between_the_upload_and_the_post_leaves_nothing_and_registers_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The artifacts are up, the run manifest's PUT (written before the POST) is stuck: SIGTERM.
    The registry was never asked, so nothing is kept: 143, nothing left, no registration."""
    job = make_job(tmp_path)
    release = threading.Event()
    rule = lambda method, target: Hold(release) if method == "PUT" and "registration.json" in target else None  # noqa: E731
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            MODS_WORKFLOW_EXECUTION_ID=lineage("between"),
        )
        cli = Cli(env)
        await until(lambda: proxy.count("PUT", "registration.json") >= 1, "the manifest's PUT")
        cli.process.send_signal(signal.SIGTERM)
        code, _, stderr = cli.finish(timeout=30)
        assert registry.registration_count == 0
    assert_clean_exit(code, 143, stderr)
    assert "no temporary object was left behind" in stderr, stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- the command: after the point of no return -----------------------------------------------------


async def test_sigint_during_the_wait_keeps_what_the_registration_reads(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Accepted and held unfinished; SIGINT: 130, the three objects kept
    and the registration named; released, it reaches SUCCEEDED reading them; a re-run follows it
    to the end: exit 0, one registration, nothing left."""
    job = make_job(tmp_path)
    with late_registry(stack) as registry:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=registry.endpoint, MODS_WORKFLOW_EXECUTION_ID=lineage("wait")
        )
        cli = Cli(env)
        registration_id = cli.submitted()
        cli.process.send_signal(signal.SIGINT)
        code, stdout, stderr = cli.finish(timeout=30)
        assert_clean_exit(code, 130, stderr)
        assert "error: interrupted by SIGINT" in stderr
        assert registration_id in stderr
        assert "its artifacts are kept under s3://" in stderr
        assert await names_left(s3, settings) == KEPT
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        code, stdout, stderr = rerun_and_release(env, registry)
        assert_clean_exit(code, 0, stderr)
        assert stdout.splitlines()[0].endswith(registration_id), stdout
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_twice_during_the_wait_after_a_resume_still_keeps(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Stopped during the wait, re-run: the re-run follows (resumes) the registration; SIGTERM
    twice during that wait: 143, the earlier artifacts still kept (the registration reads them
    when it finishes: SUCCEEDED), the registration named; a third run ends it and leaves nothing."""
    job = make_job(tmp_path)
    with late_registry(stack) as registry:
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            MODS_WORKFLOW_EXECUTION_ID=lineage("resume"),
        )
        first = Cli(env)
        registration_id = first.submitted()
        first.process.send_signal(signal.SIGTERM)
        code, _, stderr = first.finish(timeout=30)
        assert_clean_exit(code, 143, stderr)
        kept = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert sorted(k.rsplit("/", 1)[1] for k in kept) == KEPT

        follower = Cli(env)
        follower.expect("resuming registration")
        time.sleep(0.3)  # into its wait (polls every 0.05-0.2 s)
        follower.process.send_signal(signal.SIGTERM)
        follower.process.send_signal(signal.SIGTERM)
        code, stdout, stderr = follower.finish(timeout=30)
        assert_clean_exit(code, 143, stderr)
        assert stdout == ""
        assert registration_id in stderr
        assert "no temporary object was left behind, run again" not in stderr
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == kept
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"

        code, stdout, stderr = rerun_and_release(env, registry)
        assert_clean_exit(code, 0, stderr)
        assert stdout.splitlines()[0].endswith(registration_id), stdout
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_while_a_rerun_hashes_its_inputs_keeps_the_earlier_registrations_artifacts(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Kept by a SIGTERM during the wait; the re-run hashes its inputs to compare them with the
    earlier run's ("no upload") and is stopped right then: 143, the earlier prefix untouched (the
    registration reads it when it finishes: SUCCEEDED)."""
    job = make_job(tmp_path, model_bytes=8 * MiB)
    with late_registry(stack) as registry:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=registry.endpoint, MODS_WORKFLOW_EXECUTION_ID=lineage("hash")
        )
        first = Cli(env)
        registration_id = first.submitted()
        first.process.send_signal(signal.SIGTERM)
        assert_clean_exit(first.finish(timeout=30)[0], 143, first.stderr)
        kept = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert sorted(k.rsplit("/", 1)[1] for k in kept) == KEPT

        second = Cli(env)
        second.expect("hashing the model")
        second.process.send_signal(signal.SIGTERM)
        code, stdout, stderr = second.finish(timeout=30)
        assert_clean_exit(code, 143, stderr)
        assert stdout == ""
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == kept, stderr
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        assert registry.registration_count == 1
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_sigint_while_a_rerun_follows_a_registry_that_went_silent_keeps(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Kept by a SIGTERM during the wait; the re-run asks the registry about the earlier
    registration and the registry does not answer ("follows it even while the registry is away");
    SIGINT then: 130, the registration named, its artifacts untouched; the registry back, it
    succeeds on them, and a third run leaves nothing."""
    job = make_job(tmp_path)
    silent = {"on": False}
    rule = lambda method, target: Stall(HOLD) if silent["on"] and method == "GET" else None  # noqa: E731
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, rule) as mims:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=mims.endpoint, MODS_WORKFLOW_EXECUTION_ID=lineage("away")
        )
        first = Cli(env)
        registration_id = first.submitted()
        first.process.send_signal(signal.SIGTERM)
        assert_clean_exit(first.finish(timeout=30)[0], 143, first.stderr)
        kept = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert sorted(k.rsplit("/", 1)[1] for k in kept) == KEPT

        silent["on"] = True
        gets = mims.count("GET", registration_id)
        second = Cli(env)
        await until(lambda: mims.count("GET", registration_id) > gets, "the re-run asked about the registration")
        time.sleep(0.3)
        second.process.send_signal(signal.SIGINT)
        code, stdout, stderr = second.finish(timeout=30)
        assert_clean_exit(code, 130, stderr)
        assert stdout == ""
        assert registration_id in stderr
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == kept, stderr
        silent["on"] = False
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        code, stdout, stderr = rerun_and_release(env, registry)
        assert_clean_exit(code, 0, stderr)
        assert stdout.splitlines()[0].endswith(registration_id), stdout
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_while_the_registry_answers_503_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The POST answered 503 with Retry-After: 5 ("429 and 503 ... mean the registration was not
    accepted"); SIGTERM while the client waits to send it again, no POST in flight: nothing was
    accepted, so nothing is kept: 143, "no temporary object was left behind", nothing left."""
    job = make_job(tmp_path)
    with mims_server(stack, fail_submissions=100, retry_after=5) as registry:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=registry.endpoint, MODS_WORKFLOW_EXECUTION_ID=lineage("busy")
        )
        cli = Cli(env)
        cli.expect("503 Service Unavailable; retrying in")
        time.sleep(0.3)  # well inside the 5 s the registry asked for: no POST on its way
        cli.process.send_signal(signal.SIGTERM)
        code, _, stderr = cli.finish(timeout=30)
        assert registry.registration_count == 0
    try:
        assert_clean_exit(code, 143, stderr)
        assert stderr.count("/v1/registrations: 503") == 1, stderr
        assert "no temporary object was left behind" in stderr, stderr
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_sigterm_while_a_rerun_takes_over_an_unanswered_post_keeps_its_prefix(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Run 1's POST taken by the registry, its answer held: SIGTERM twice, 143, kept.  Run 2 takes that
    prefix over ("whose manifest the re-run first rewrites as its own") and is stopped by SIGTERM
    while that rewrite is on its way: the registry's registration (made by run 1's POST) still
    reads the prefix, so it must stay; released, the registration succeeds on it; run 3 finishes
    and leaves nothing."""
    job = make_job(tmp_path)
    holding = {"posts": True, "manifests": False}
    release = threading.Event()
    posts = lambda method, target: Late(HOLD) if holding["posts"] and method == "POST" else None  # noqa: E731

    def manifests(method: str, target: str) -> object:
        return Hold(release) if holding["manifests"] and method == "PUT" and "registration.json" in target else None

    try:
        with (
            late_registry(stack) as registry,
            FaultProxy(registry.endpoint, posts) as mims,
            FaultProxy(stack.s3_endpoint, manifests) as s3_proxy,
        ):
            env = environment(
                stack,
                settings,
                job,
                REGISTRAR_MIMS_ENDPOINT=mims.endpoint,
                AWS_ENDPOINT_URL_S3=s3_proxy.endpoint,
                MODS_WORKFLOW_EXECUTION_ID=lineage("takeover"),
            )
            first = Cli(env)
            await until(lambda: registry.registration_count == 1, "the registry took run 1's POST")
            first.process.send_signal(signal.SIGTERM)
            first.process.send_signal(signal.SIGTERM)
            code, stdout, stderr = first.finish(timeout=30)
            # "A POST that may have reached the registry without an answer ... counts as accepted"
            assert_clean_exit(code, 143, stderr)
            assert stdout == ""
            assert "no temporary object was left behind" not in stderr, stderr
            assert "kept s3://" in stderr, stderr
            kept = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
            assert sorted(k.rsplit("/", 1)[1] for k in kept) == KEPT
            assert registry.app is not None
            (registration,) = list(registry.app.state.registry.records)  # the one run 1's POST made

            holding["posts"], holding["manifests"] = False, True
            written = s3_proxy.count("PUT", "registration.json")
            second = Cli(env)
            await until(lambda: s3_proxy.count("PUT", "registration.json") > written, "run 2's manifest held")
            second.process.send_signal(signal.SIGTERM)
            code, stdout, stderr = second.finish(timeout=30)
            assert_clean_exit(code, 143, stderr)
            assert stdout == ""
            assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == kept, stderr
            release.set()
            holding["manifests"] = False
            registry.finish_processing()
            assert await final_status(registry, registration) == "SUCCEEDED"
            code, stdout, stderr = rerun_and_release(env, registry)
            assert_clean_exit(code, 0, stderr)
            assert stdout.splitlines()[0].endswith(registration), stdout
            assert registry.registration_count == 1
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    finally:
        release.set()
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_sigterm_while_the_capability_probe_writes_leaves_none_of_its_objects(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The probe of what S3 checks writes `.capabilities-*` objects under the run's prefix "just
    before the first upload"; one of its PUTs stuck, SIGTERM: 143, none of them left."""
    job = make_job(tmp_path)
    release = threading.Event()
    rule = lambda method, target: Hold(release) if method == "PUT" and "-md5-damaged" in target else None  # noqa: E731
    try:
        with FaultProxy(stack.s3_endpoint, rule) as proxy:
            cli = Cli(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint))
            await until(lambda: proxy.count("PUT", "-md5-damaged") >= 1, "the probe's PUT held")
            await until(lambda: proxy.count("PUT", ".capabilities-") >= 6, "the probe's other PUTs")
            cli.process.send_signal(signal.SIGTERM)
            code, _, stderr = cli.finish(timeout=30)
    finally:
        release.set()
    assert_clean_exit(code, 143, stderr)
    assert "no temporary object was left behind" in stderr, stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_signals_during_a_cleanup_after_success_that_outlasts_its_bound(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SUCCEEDED, the lines out, every delete of the cleanup stuck, REGISTRAR_CLEANUP_TIMEOUT=2;
    SIGTERM twice: the cleanup is bounded, the exit is still 0 and what is left is named."""
    job = make_job(tmp_path)
    stuck = {"on": False}
    rule = lambda method, target: Stall(HOLD) if stuck["on"] and is_delete(method, target) else None  # noqa: E731
    try:
        with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
            env = environment(
                stack,
                settings,
                job,
                AWS_ENDPOINT_URL_S3=proxy.endpoint,
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                REGISTRAR_CLEANUP_TIMEOUT="2",
                MODS_WORKFLOW_EXECUTION_ID=lineage("bound"),
            )
            cli = Cli(env)
            cli.submitted()
            stuck["on"] = True
            registry.finish_processing()
            cli.expect("cleaning up the temporary objects")
            await until(lambda: any(is_delete(m, t) for m, t in proxy.seen), "a delete of the cleanup")
            sent = time.monotonic()
            cli.process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            cli.process.send_signal(signal.SIGTERM)
            code, stdout, stderr = cli.finish(timeout=30)
            took = time.monotonic() - sent
        assert_clean_exit(code, 0, stderr)
        assert took < 8, (took, stderr)
        assert len(stdout.splitlines()) == 2, stdout
        # faults.md: a cleanup S3 stalls names each region's prefix as left ("cleanup timed out")
        after = stderr.split("cleaning up the temporary objects", 1)[1]
        assert f"s3://{settings.s3_bucket}/{settings.s3_prefix}" in after, stderr
        assert "cleanup timed out" in after, stderr
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_signals_to_a_leader_and_its_follower(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Two runs of one job at once: one made the registration, the other follows it (409).  SIGINT to
    the follower: 130, it leaves nothing of its own and names the registration;
    SIGTERM to the leader: 143, the artifacts kept; released, the registration succeeds on
    them; a re-run follows it to the end and leaves nothing."""
    with two_runs(tmp_path, stack, settings) as (registry, env, start_two):
        leader, follower = await start_two()
        follower.process.send_signal(signal.SIGINT)
        code, stdout, stderr = follower.finish(timeout=30)
        assert_clean_exit(code, 130, stderr)
        assert stdout == ""
        registration_id = registration_named(stderr.split("error:", 1)[1])
        assert "run again to register" not in stderr, stderr

        leader.process.send_signal(signal.SIGTERM)
        code, stdout, stderr = leader.finish(timeout=30)
        assert_clean_exit(code, 143, stderr)
        assert registration_id in stderr
        assert await names_left(s3, settings) == KEPT

        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        code, stdout, stderr = rerun_and_release(env, registry)
        assert_clean_exit(code, 0, stderr)
        assert stdout.splitlines()[0].endswith(registration_id), stdout
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- the library --------------------------------------------------------------------------------


async def test_fail_after_during_the_preflight_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`anyio.fail_after` around a register whose registry hangs: TimeoutError promptly."""
    job = make_job(tmp_path)
    with SilentServer() as silent:
        async with Registrar(settings.model_copy(update={"mims_endpoint": silent.endpoint})) as registrar:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                with anyio.fail_after(1.0):
                    await registrar.register(request_for(job))
            assert time.monotonic() - started < 5
        assert silent.accepted >= 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_wait_for_mid_upload_then_cancelled_again_during_the_cleanup(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """An asyncio task running register, parts stuck; cancelled, then cancelled again while its
    (slow, shielded) cleanup runs: CancelledError, and the cleanup still emptied the prefix."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    slow = {"on": False}

    def rule(method: str, target: str) -> object:
        if slow["on"] and is_delete(method, target):
            return Stall(0.5)
        return stalled_parts(method, target)

    with FaultProxy(stack.s3_endpoint, rule) as proxy:
        async with Registrar(settings.model_copy(update={"s3_endpoint_url": proxy.endpoint})) as registrar:
            task = asyncio.ensure_future(registrar.register(request_for(job)))
            await until(lambda: proxy.count("PUT", "partNumber=") >= 1, "a part on its way")
            slow["on"] = True
            task.cancel()
            await until(lambda: any(is_delete(m, t) for m, t in proxy.seen), "a delete of the cleanup")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cancelled_twice_during_the_wait_after_a_resume_keeps(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Kept by a wait timeout; the resumed run (a host task group's scope) cancelled during its
    wait, twice: RegistrationKept names it, the artifacts stay; released, SUCCEEDED on them; a
    third register returns it and leaves nothing."""
    job = make_job(tmp_path)
    request = request_for(job, workflow_execution_id=lineage("lib"))
    with late_registry(stack) as registry:
        timed_out = await kept_by_a_timeout(on(settings, registry), request)
        (kept,) = timed_out.kept
        before = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert sorted(k.rsplit("/", 1)[1] for k in before) == KEPT

        events = Recorder()
        async with Registrar(on(settings, registry), on_progress=events) as registrar:
            with anyio.CancelScope() as outer:
                with anyio.CancelScope() as inner:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(registrar.register, request)
                        await until(lambda: bool(events.of(RegistrationSubmitted)), "the resumed registration")
                        await anyio.sleep(0.2)
                        inner.cancel()
                        outer.cancel()
        assert events.of(RegistrationSubmitted)[0].resumed
        (kept_event,) = events.of(RegistrationKept)
        assert [r.registration_id for r in kept_event.registrations] == [kept.registration_id]
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == before
        registry.finish_processing()
        assert await final_status(registry, kept.registration_id) == "SUCCEEDED"
        async with Registrar(on(settings, registry)) as registrar:
            result = await registrar.register(request)
        assert result.registrations[0].registration_id == kept.registration_id
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cancelled_during_the_cleanup_after_success_still_cleans(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """RegistrationSucceeded arrives (sent before the cleanup); the host cancels while the slow,
    shielded cleanup runs, and again: the cleanup runs to its end, nothing is left."""
    job = make_job(tmp_path)
    slow = {"on": False}
    rule = lambda method, target: Stall(1.0) if slow["on"] and is_delete(method, target) else None  # noqa: E731
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
        events = Recorder()
        callback = release_when_submitted(registry, events)
        local = on(settings, registry, s3_endpoint_url=proxy.endpoint)
        async with Registrar(local) as registrar:
            task = asyncio.ensure_future(registrar.register(request_for(job), on_progress=callback))
            slow["on"] = True
            await until(lambda: bool(events.of(RegistrationSucceeded)), "the registration succeeded")
            await until(lambda: any(is_delete(m, t) for m, t in proxy.seen), "a delete of the cleanup")
            task.cancel()
            await anyio.sleep(0.1)
            task.cancel()
            # "the call then either raises the cancellation or returns the result"
            done, _ = await asyncio.wait({task}, timeout=30)
            assert done, "the cancelled registration never ended"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cancelled_twice_during_the_cleanup_after_failed_still_cleans(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The registration ends FAILED; the host cancels the call (a host task group's scope) while
    the slow, shielded cleanup runs, then again: the cleanup still ends within its bound, and
    nothing is left (a FAILED registration reads nothing)."""
    job = make_job(tmp_path)
    slow = {"on": False}
    rule = lambda method, target: Stall(1.0) if slow["on"] and is_delete(method, target) else None  # noqa: E731
    with (
        mims_server(stack, fail_registrations="refused for the test") as registry,
        FaultProxy(stack.s3_endpoint, rule) as proxy,
    ):
        async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint)) as registrar:
            started = time.monotonic()
            with anyio.fail_after(30), anyio.CancelScope() as outer:
                with anyio.CancelScope() as inner:
                    async with anyio.create_task_group() as tg:

                        async def register() -> None:
                            slow["on"] = True
                            # after the shielded cleanup, the call ends with the cancellation or
                            # with what it ended with (FAILED): either way, not with leftovers
                            with contextlib.suppress(RegistrationFailed):
                                await registrar.register(request_for(job))

                        tg.start_soon(register)
                        await until(lambda: any(is_delete(m, t) for m, t in proxy.seen), "a delete of the cleanup")
                        inner.cancel()
                        await anyio.sleep(0.1)
                        outer.cancel()
            assert time.monotonic() - started < settings.cleanup_timeout
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cancelled_while_the_registry_answers_503_keeps_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The library: the POST answered 503 with Retry-After: 5 (not accepted); `anyio.fail_after`
    ends the call while it waits to send it again: no RegistrationKept, nothing left."""
    job = make_job(tmp_path)
    events = Recorder()
    try:
        with mims_server(stack, fail_submissions=100, retry_after=5) as registry:
            async with Registrar(on(settings, registry), on_progress=events) as registrar:
                with pytest.raises(TimeoutError), anyio.fail_after(2.5):
                    await registrar.register(request_for(job, workflow_execution_id=lineage("lib503")))
            assert registry.registration_count == 0
        assert events.of(RegistrationKept) == []
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def keep_signalling(cli: Cli, signum: int) -> tuple[int, str, str]:
    """Send `signum` every millisecond until the process ends (a supervisor that insists); its end."""
    deadline = time.monotonic() + 30
    while cli.process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            cli.process.send_signal(signum)
        time.sleep(0.001)
    return cli.finish(timeout=30)


async def test_sigint_then_sigterms_until_the_end_still_exit_130(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGINT mid-upload, then SIGTERM every millisecond until the process ends ("further signals
    during cleanup are logged, not obeyed"): the first signal decides, 130, the error line, nothing
    left.  The process is killed by one of the SIGTERMs instead (returncode -15)."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    with FaultProxy(stack.s3_endpoint, stalled_parts) as proxy:
        cli = Cli(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint))
        await until(lambda: proxy.count("PUT", "partNumber=") >= 1, "a part on its way")
        cli.process.send_signal(signal.SIGINT)
        cli.expect("SIGINT received")
        code, _, stderr = keep_signalling(cli, signal.SIGTERM)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert_clean_exit(code, 130, stderr)
    assert "error: interrupted by SIGINT" in stderr, stderr


async def test_sigterms_until_the_end_of_the_cleanup_after_success_still_exit_0(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SUCCEEDED, the lines out, the cleanup's deletes slow; SIGTERM every millisecond until the
    process ends (a supervisor's stop, repeated): README says a signal during that cleanup is a
    warning and the exit is 0.  One of them kills the process once the cleanup is over."""
    job = make_job(tmp_path)
    slow = {"on": False}
    rule = lambda method, target: Stall(0.5) if slow["on"] and is_delete(method, target) else None  # noqa: E731
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            MODS_WORKFLOW_EXECUTION_ID=lineage("insist"),
        )
        cli = Cli(env)
        cli.submitted()
        slow["on"] = True
        registry.finish_processing()
        cli.expect("cleaning up the temporary objects")
        code, stdout, stderr = keep_signalling(cli, signal.SIGTERM)
    assert len(stdout.splitlines()) == 2, stdout
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert_clean_exit(code, 0, stderr)
