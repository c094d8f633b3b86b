"""SIGKILL at chosen points, then the same job run again: a black-box matrix of the resume promise.

Written from README.md and docs/faults.md alone (nothing of `async_registrar/` read): a run the
kernel kills has no chance to clean up; a re-run with the same lineage id
(`MODS_WORKFLOW_EXECUTION_ID`) and the same inputs must finish the job with exactly one
registration at the registry, print the two lines, and leave nothing under the temporary
prefix once the registration is final ("SIGKILL ... during the upload, after the registry
accepted, or during the cleanup ... `sweep` removes the open uploads and objects of every run
the registry no longer needs").  Without a re-run, `sweep --older-than 0s` keeps what an
unfinished registration reads and removes it once the registration is final.

Real parts only: the command in a subprocess, moto's S3 server (behind `FaultProxy` where a
request must be held), the reference MIMS over HTTP (behind a proxy that holds its answer
where the kill must fall between the registry's acceptance and the command's reading of it).
Every wait is on an event: a line on the command's stderr, a request count at a proxy or the
registry's own count of registrations; the registries hold every registration unfinished
(`late_registry`) until the test lets it finish, and read the artifacts only then, so a re-run
that removed what the registration still needed is caught by a FAILED.
"""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import MiB, environment, final_status, late_registry, leftovers, make_job, remove_all
from .fault_proxy import FaultProxy, Hold, Late, Stall
from .test_cli import expected_archive, run

#: Long enough to outlast any test: a held request is never forwarded (the proxy cancels it when it closes).
HOLD = 600.0
#: Bound on every wait for an event and on every subprocess: CI machines are loaded.
BOUND = 60.0
ARN_LINE = "Workflow execution arn for model registration process: arn:aws:states:us-west-2:"
MODEL_LINE = "Model id for model being registered: model-"


# --- helpers -------------------------------------------------------------------------------------


class Cli:
    """`python -m async_registrar register` in a subprocess, its stderr read line by line by a thread
    (so that the test can wait for a line with a bound, and kill the process at that moment)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "register"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="cli-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, *needles: str, timeout: float = BOUND) -> str | None:
        """The first stderr line holding one of `needles`; None if the process ended without one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if any(needle in line for needle in needles):
                        return line
                if self._eof:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"none of {needles!r} within {timeout} s:\n{''.join(self.lines)}")
                self._changed.wait(left)

    def expect(self, needle: str) -> str:
        line = self.wait_for(needle)
        assert line is not None, f"{needle!r} never appeared:\n{self.stderr}"
        return line

    def submitted(self) -> str:
        """Wait until the run says the registry accepted; the registration's id."""
        line = self.expect("submitted: registration")
        (registration_id,) = re.findall(r"submitted: registration (reg-\w+)", line)
        return registration_id

    def kill(self) -> str:
        """SIGKILL, as the kernel's OOM killer or a node failure does; what it had printed on stdout."""
        self.process.send_signal(signal.SIGKILL)
        return self.finish()[1]

    def finish(self, timeout: float = BOUND) -> tuple[int, str, str]:
        """Wait for the end; (exit code, stdout, stderr)."""
        assert self.process.stdout is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"still running after {timeout} s:\n{self.stderr}") from None
        stdout = self.process.stdout.read()
        self.process.stdout.close()
        self._reader.join(10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return self.process.returncode, stdout, self.stderr


async def until(condition: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    """Wait (polling a counter, not a clock) until `condition()` holds."""
    try:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@dataclass
class Job:
    """One registration job: its inputs, its environment (lineage id included) and its registry."""

    job: dict[str, Path]
    env: dict[str, str]
    registry: ThreadedMimsServer
    settings: Settings
    lineage: str


def a_job(
    tmp_path: Path,
    stack: LocalStack,
    settings: Settings,
    registry: ThreadedMimsServer,
    name: str,
    *,
    model_bytes: int = 0,
    **extra: str,
) -> Job:
    job = make_job(tmp_path, model_bytes=model_bytes)
    lineage = f"wf-kill-{name}-{secrets.token_hex(3)}"
    env = environment(
        stack,
        settings,
        job,
        REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
        MODS_WORKFLOW_EXECUTION_ID=lineage,
        **extra,
    )
    return Job(job, env, registry, settings, lineage)


def rerun(job: Job) -> tuple[int, str, str]:
    """The same job again (same environment, same lineage id).  The registry, holding every
    registration unfinished, lets it finish once the re-run has submitted or found its
    registration (or, failing that, once the re-run has ended: then nothing is held)."""
    cli = Cli(job.env)
    try:
        cli.wait_for("resuming registration", "submitted:")
    except BaseException:
        cli.process.kill()
        raise
    finally:
        job.registry.finish_processing()
    return cli.finish()


def attempt_prefix(stderr: str, settings: Settings) -> str:
    """The key prefix of the attempt a run's log names ("us-west-2 prefix s3://bucket/.../")."""
    found = re.findall(rf"us-west-2 prefix s3://{settings.s3_bucket}/(\S+/)", stderr)
    assert len(found) == 1, stderr
    return str(found[0])


async def names_left(s3: Any, settings: Settings) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in await leftovers(s3, settings.s3_bucket, settings.s3_prefix))


async def assert_one_registration_and_nothing_left(
    job: Job, result: tuple[int, str, str], s3: Any, stack: LocalStack, *, registration_id: str | None = None
) -> None:
    """The promise after a re-run: exit 0, the two lines, exactly one registration at the registry
    for the lineage, SUCCEEDED, holding the job's bytes, and nothing under the temporary prefix
    (no object, no open multipart upload)."""
    code, stdout, stderr = result
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    assert lines[0].startswith(ARN_LINE), lines
    assert lines[1].startswith(MODEL_LINE), lines
    assert job.registry.registration_count == 1, (job.registry.registration_count, stderr)
    printed = re.findall(r"\breg-\w+", lines[0])
    assert len(printed) == 1, lines[0]
    (found,) = printed
    if registration_id is not None:
        assert found == registration_id, (found, registration_id, stderr)
    registration = job.registry.registration(found)
    assert registration is not None, (found, stderr)
    assert await final_status(job.registry, found) == "SUCCEEDED"
    model_id = lines[1].rsplit(" ", 1)[1]
    assert registration.model_id == model_id, (registration.model_id, lines)
    for name in ("model", "payload"):  # the registry's copies are the job's deterministic archives
        obj = await s3.get_object(Bucket=stack.registry_bucket, Key=f"models/{model_id}/{name}.tar.gz")
        async with obj["Body"] as body:
            assert await body.read() == expected_archive(job.job[name]), name
    assert await leftovers(s3, job.settings.s3_bucket, job.settings.s3_prefix) == [], stderr


# --- (a) killed during the upload ---------------------------------------------------------------


async def test_killed_during_the_upload_then_rerun(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGKILL while parts are in flight (held by a slow link): nothing was submitted, so the re-run
    makes the one registration, exits 0 and removes its own attempt.

    What the killed attempt left (an open multipart upload, and the payload if it was done) had no
    manifest and no registration.  The README gives it to `sweep`, not to a re-run ("What a
    SIGKILL leaves: `sweep` and a lifecycle rule"; the resume rules speak only of runs with a
    manifest), and today the re-run leaves it untouched although it lists the lineage's group (a
    re-run that removed it would do no harm): only what lies under the killed attempt may stay,
    then `sweep --older-than 0s` must remove it, and nothing is left."""
    holding = [True]

    def slow_parts(method: str, target: str) -> object:
        return Stall(HOLD) if holding[0] and method == "PUT" and "partNumber=" in target else None

    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, slow_parts) as proxy:
        job = a_job(tmp_path, stack, settings, registry, "upload", model_bytes=12 * MiB)
        job.env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        killed = Cli(job.env)
        await until(lambda: proxy.count("PUT", "partNumber=") >= 2, "two parts in flight")
        killed.kill()
        assert registry.registration_count == 0
        orphaned = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert any(k.startswith("upload:") for k in orphaned), orphaned
        assert not any(k.endswith("registration.json") for k in orphaned), orphaned

        holding[0] = False  # the link is well again (the killed run's parts stay held, never delivered)
        result = rerun(job)
        # The re-run's own attempt is gone; all that may be left is the killed attempt's orphan.
        killed_attempt = attempt_prefix(killed.stderr, settings)
        assert attempt_prefix(result[2], settings) != killed_attempt
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert all(k.removeprefix("upload:").startswith(killed_attempt) for k in left), (killed_attempt, left)

        swept = run(job.env, "sweep", "--older-than", "0s", timeout=BOUND)
        assert swept.returncode == 0, swept.stderr
        if left:
            assert "1 run(s) seen, 1 removed, 0 spared" in swept.stdout, swept.stdout
        await assert_one_registration_and_nothing_left(job, result, s3, stack)


# --- (b) killed after the registry took the POST, before its answer reached the run -------------


async def test_killed_while_the_registrys_answer_is_on_its_way_then_rerun(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The registry has made the registration (its count says so) but its 2xx is held on the way
    back: the run is killed before it learns it was accepted.  A POST that may have reached the
    registry counts as accepted: the re-run sends the same key again, the registry answers with
    the registration it has; one registration, which succeeds on the kept artifacts."""
    with late_registry(stack) as registry:
        held = [0]

        def late_answer(method: str, target: str) -> object:
            if method == "POST" and target.rstrip("/").endswith("/v1/registrations") and held[0] == 0:
                held[0] += 1
                return Late(HOLD)  # forwarded whole; its answer held back
            return None

        with FaultProxy(registry.endpoint, late_answer) as proxy:
            job = a_job(tmp_path, stack, settings, registry, "answer")
            job.env["REGISTRAR_MIMS_ENDPOINT"] = proxy.endpoint
            killed = Cli(job.env)
            await until(lambda: held[0] == 1 and registry.registration_count == 1, "the POST taken, its answer held")
            killed.kill()
            assert "submitted:" not in killed.stderr, killed.stderr
            (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
            assert "model.tar.gz" in await names_left(s3, settings)

            result = rerun(job)
            await assert_one_registration_and_nothing_left(job, result, s3, stack, registration_id=registration_id)
            assert proxy.count("POST", "/v1/registrations") == 2  # the same key sent again, once
            assert "uploading model" not in result[2], result[2]  # from the earlier run's prefix


async def test_killed_while_the_post_is_on_its_way_then_rerun(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The POST is held before it reaches the registry (the registry knows nothing) when the run is
    killed: the manifest says it was being submitted.  The re-run sends it (the registry makes
    the registration): one registration, nothing left."""
    with late_registry(stack) as registry:
        holding = [True]

        def held_post(method: str, target: str) -> object:
            if holding[0] and method == "POST" and target.rstrip("/").endswith("/v1/registrations"):
                return Stall(HOLD)  # never forwarded: the proxy cancels it when it closes
            return None

        with FaultProxy(registry.endpoint, held_post) as proxy:
            job = a_job(tmp_path, stack, settings, registry, "post")
            job.env["REGISTRAR_MIMS_ENDPOINT"] = proxy.endpoint
            killed = Cli(job.env)
            await until(lambda: proxy.count("POST", "/v1/registrations") == 1, "the POST held")
            killed.kill()
            assert registry.registration_count == 0

            holding[0] = False
            result = rerun(job)
            await assert_one_registration_and_nothing_left(job, result, s3, stack)
            assert "uploading model" not in result[2], result[2]  # from the earlier run's prefix


# --- (c) killed during the wait -----------------------------------------------------------------


async def test_killed_during_the_wait_then_rerun(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The registry accepted (the run said so) and holds the registration unfinished: SIGKILL.
    The re-run follows that registration (no second one, nothing uploaded again) to SUCCEEDED,
    then removes everything."""
    with late_registry(stack) as registry:
        job = a_job(tmp_path, stack, settings, registry, "wait")
        killed = Cli(job.env)
        registration_id = killed.submitted()
        killed.kill()
        assert await names_left(s3, settings) == ["model.tar.gz", "payload.tar.gz", "registration.json"]

        result = rerun(job)
        await assert_one_registration_and_nothing_left(job, result, s3, stack, registration_id=registration_id)
        assert f"resuming registration {registration_id}" in result[2], result[2]
        assert "uploading model" not in result[2], result[2]


# --- (d) killed during the cleanup after SUCCEEDED ----------------------------------------------


class DeletesHeld:
    """A `FaultProxy` rule for S3: once `holding`, every delete (DeleteObject, AbortMultipartUpload,
    DeleteObjects) is held and never forwarded (the proxy cancels it when it closes)."""

    def __init__(self) -> None:
        self.holding = False
        self.held = 0

    def __call__(self, method: str, target: str) -> object:
        if self.holding and (method == "DELETE" or (method == "POST" and target.endswith("?delete"))):
            self.held += 1
            return Stall(HOLD)
        return None


async def killed_in_the_cleanup(job: Job, deletes: DeletesHeld, s3: Any) -> tuple[str, str]:
    """Run `job` (its S3 through a proxy with `deletes`); once the registry accepted, hold the deletes
    and let the registration finish; SIGKILL once the cleanup's first delete is held.  The
    registration id, and what the run had written on stdout."""
    killed = Cli(job.env)
    registration_id = killed.submitted()
    deletes.holding = True  # from here on, the only deletes are the cleanup's
    job.registry.finish_processing()
    killed.expect("cleaning up the temporary objects")
    await until(lambda: deletes.held >= 1, "a delete of the cleanup held")
    stdout = killed.kill()
    assert job.registry.registration(registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert await leftovers(s3, job.settings.s3_bucket, job.settings.s3_prefix) != []
    deletes.holding = False
    return registration_id, stdout


async def test_killed_during_the_cleanup_after_success_then_rerun(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SUCCEEDED, then the cleanup's deletes stall and the run is killed.  The README's resume table:
    a re-run that finds the registration SUCCEEDED "prints its two lines and removes what was
    kept" (and docs/faults.md: "a re-run of a job that already succeeded ... its two lines, no
    second registration").  So: the same registration reported, nothing uploaded, none made,
    nothing left."""
    deletes = DeletesHeld()
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, deletes) as proxy:
        job = a_job(tmp_path, stack, settings, registry, "cleanup", AWS_ENDPOINT_URL_S3=proxy.endpoint)
        registration_id, _ = await killed_in_the_cleanup(job, deletes, s3)

        result = rerun(job)
        await assert_one_registration_and_nothing_left(job, result, s3, stack, registration_id=registration_id)
        assert "uploading model" not in result[2], result[2]


async def test_the_two_lines_are_out_before_the_cleanup(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """README, What a run does: "wait with backoff until SUCCEEDED ...; print; delete the temporary
    objects".  So once the cleanup has started (its deletes held), the registration's two lines are
    on stdout already, and a kill during a slow cleanup does not take the job's result with it.
    (They came only after the cleanup: a run killed in a stalled cleanup had printed nothing.)"""
    deletes = DeletesHeld()
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, deletes) as proxy:
        job = a_job(tmp_path, stack, settings, registry, "printed", AWS_ENDPOINT_URL_S3=proxy.endpoint)
        try:
            registration_id, stdout = await killed_in_the_cleanup(job, deletes, s3)
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    assert lines[0].startswith(ARN_LINE)
    assert lines[0].endswith(registration_id)


class DeletesHeldUntil(DeletesHeld):
    """`DeletesHeld`, the deletes held until the test sets `release` (then forwarded)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def __call__(self, method: str, target: str) -> object:
        if super().__call__(method, target) is None:
            return None
        return Hold(self.release)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_during_the_cleanup_after_success_is_a_success(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, signum: int
) -> None:
    """SUCCEEDED, the two lines out, then SIGTERM (a SageMaker stop) or SIGINT while the cleanup's
    deletes are slow: the cleanup runs to its end, shielded.  The run exited 143 and said "no
    temporary object was left behind, run again to register" beside the lines saying it had
    registered; registered stands (as after a cleanup that cannot delete): exit 0, a warning."""
    deletes = DeletesHeldUntil()
    name = signal.Signals(signum).name
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, deletes) as proxy:
        job = a_job(tmp_path, stack, settings, registry, f"signal-{name}", AWS_ENDPOINT_URL_S3=proxy.endpoint)
        try:
            cli = Cli(job.env)
            cli.expect("submitted: registration")
            deletes.holding = True
            job.registry.finish_processing()
            cli.expect("cleaning up the temporary objects")
            await until(lambda: deletes.held >= 1, "a delete of the cleanup held")
            cli.process.send_signal(signum)
            cli.expect(f"{name} received")
            deletes.release.set()
            code, stdout, stderr = cli.finish()
        finally:
            deletes.release.set()
        assert code == 0, stderr
        assert len(stdout.splitlines()) == 2, stdout
        assert "run again to register" not in stderr
        assert "received once the registration had succeeded" in stderr
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- no re-run: sweep ---------------------------------------------------------------------------


async def test_killed_during_the_wait_then_swept_not_rerun(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGKILL during the wait, and no re-run: `sweep --older-than 0s` keeps the run while its
    registration is unfinished (naming it), the registration succeeds on those very artifacts,
    and the next sweep, the registration final, removes the run."""
    with late_registry(stack) as registry:
        job = a_job(tmp_path, stack, settings, registry, "sweep")
        killed = Cli(job.env)
        registration_id = killed.submitted()
        killed.kill()
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert sorted(k.rsplit("/", 1)[1] for k in kept) == ["model.tar.gz", "payload.tar.gz", "registration.json"]

        first = run(job.env, "sweep", "--older-than", "0s", timeout=BOUND)
        assert first.returncode == 0, first.stderr
        assert "1 run(s) seen, 0 removed, 1 spared" in first.stdout, first.stdout
        assert registration_id in first.stdout, first.stdout
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == sorted(kept)

        registry.finish_processing()
        assert await final_status(registry, registration_id, timeout=BOUND) == "SUCCEEDED"
        second = run(job.env, "sweep", "--older-than", "0s", timeout=BOUND)
        assert second.returncode == 0, second.stderr
        assert "1 run(s) seen, 1 removed, 0 spared" in second.stdout, second.stdout
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
