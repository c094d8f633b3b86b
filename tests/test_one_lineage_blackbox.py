"""Two processes, one lineage: what orchestrators do (a retried step while the first attempt may
still run, a `sweep` from a laptop while a job runs), held against the README's promises.

Written black-box from README.md and docs/faults.md: the command in subprocesses, moto's S3
server and the reference MIMS over real HTTP, behind `FaultProxy` where a request must be held.
Every wait is on an event (a stderr line, a request count at a proxy, the registry's own count);
the registries hold every registration unfinished (`late_registry`) until the test lets it
finish, and read the artifacts only then, so a run that removed what a registration still
needed is caught by a FAILED.

The promises: with one lineage id (`MODS_WORKFLOW_EXECUTION_ID`) and the same inputs there is at
most one registration ("one Idempotency-Key per logical registration"; a 409 naming the key's
holder is followed when it registered these very archives); no run removes what an accepted,
unfinished registration reads; once the registration is final nothing is left, or a `sweep`
removes what a SIGKILL left ("a second sweep once it is final removes it"); other inputs under
the same lineage id are another registration, "neither touches the other's artifacts".
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import environment, final_status, late_registry, leftovers, make_job
from .fault_proxy import FaultProxy, Hold, Stall
from .test_cli import run
from .test_kill_rerun import BOUND, HOLD, Cli, attempt_prefix, until

REGISTRATIONS = "/v1/registrations"
MANIFEST = "/registration.json"
#: What a run says once it has a registration: made, followed (a 409 for its key), or resumed.
HAS_ONE = ("submitted: registration", "found: registration", "resuming registration", "error:")


def is_post(method: str, target: str) -> bool:
    return method == "POST" and target.rstrip("/").endswith(REGISTRATIONS)


def job_env(tmp_path: Path, stack: LocalStack, settings: Settings, endpoint: str, **extra: str) -> dict[str, str]:
    """The example job's environment, with a lineage id of its own, against `endpoint`."""
    lineage = f"wf-one-{secrets.token_hex(3)}"
    job = make_job(tmp_path)
    return environment(
        stack, settings, job, REGISTRAR_MIMS_ENDPOINT=endpoint, MODS_WORKFLOW_EXECUTION_ID=lineage, **extra
    )


def registration_of(stdout: str) -> str:
    """The registration id of the two lines a run printed."""
    (registration_id,) = re.findall(r"\breg-\w+", stdout.splitlines()[0])
    return registration_id


def sweep(env: dict[str, str]) -> str:
    """`sweep --older-than 0s` (exit 0); its stdout."""
    swept = run(env, "sweep", "--older-than", "0s", timeout=BOUND)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    return swept.stdout


async def started_together(env: dict[str, str], s3_proxy: FaultProxy, release: threading.Event) -> tuple[Cli, Cli]:
    """Two runs of one job started at once, neither seeing the other's manifest (`s3_proxy` holds
    every manifest PUT until `release`, which is set once both runs have sent theirs): (leader,
    follower), the leader being the run whose POST made the registration, the follower the one
    the registry answered 409 for the same key."""
    first, second = Cli(env), Cli(env)
    try:
        await until(lambda: s3_proxy.count("PUT", MANIFEST) >= 2, "both manifests held")
    finally:
        release.set()
    said = {
        cli: cli.wait_for("submitted: registration", "found: registration", "error:") or "" for cli in (first, second)
    }
    leaders = [cli for cli, line in said.items() if "submitted: registration" in line]
    followers = [cli for cli, line in said.items() if "found: registration" in line]
    assert len(leaders) == len(followers) == 1, (first.stderr, second.stderr)
    return leaders[0], followers[0]


def holding_manifests(release: threading.Event) -> Any:
    """An S3-proxy rule: every run manifest PUT held until `release`."""

    def rule(method: str, target: str) -> object:
        return Hold(release) if method == "PUT" and MANIFEST in target.split("?")[0] else None

    return rule


@contextlib.contextmanager
def two_runs(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> Iterator[tuple[ThreadedMimsServer, dict[str, str], Any]]:
    """A held registry, a job's environment whose S3 goes through a proxy holding the manifests, and
    the coroutine function starting two runs of it at once (see `started_together`)."""
    release = threading.Event()
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, holding_manifests(release)) as s3_proxy:
        env = job_env(tmp_path, stack, settings, registry.endpoint, AWS_ENDPOINT_URL_S3=s3_proxy.endpoint)
        try:
            yield registry, env, functools.partial(started_together, env, s3_proxy, release)
        finally:
            release.set()


def holding_posts(release: threading.Event) -> Any:
    """A registry-proxy rule: every registration POST held until `release`."""

    def rule(method: str, target: str) -> object:
        return Hold(release) if is_post(method, target) else None

    return rule


async def assert_one_success_and_nothing_left(
    registry: ThreadedMimsServer, results: list[tuple[int, str, str]], s3: Any, settings: Settings
) -> str:
    """Every run exited 0 printing the same registration, the registry's only one, SUCCEEDED; nothing
    is left under the prefix.  The registration's id."""
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert len(stdout.splitlines()) == 2, stdout
    ids = {registration_of(stdout) for _, stdout, _ in results}
    assert len(ids) == 1, ids
    (registration_id,) = ids
    assert registry.registration_count == 1, [r[2] for r in results]
    assert await final_status(registry, registration_id, timeout=BOUND) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [], [r[2] for r in results]
    return registration_id


async def both_rerun(env: dict[str, str], registry: ThreadedMimsServer) -> list[tuple[int, str, str]]:
    """The same job run twice at once (a retried step and a person's re-run); the registry lets the
    registration finish once both have one."""
    reruns = [Cli(env), Cli(env)]
    try:
        for cli in reruns:
            cli.wait_for(*HAS_ONE)
    finally:
        registry.finish_processing()
    return [cli.finish() for cli in reruns]


# --- two runs at once ----------------------------------------------------------------------------


async def test_two_runs_started_together_make_one_registration_and_leave_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Two runs of one job started at once (neither saw the other): one registration, both print it, nothing left."""
    with two_runs(tmp_path, stack, settings) as (registry, _env, start_two):
        leader, follower = await start_two()
        registry.finish_processing()
        results = [leader.finish(), follower.finish()]
        await assert_one_success_and_nothing_left(registry, results, s3, settings)


async def test_two_reruns_after_a_kill_during_the_wait_follow_the_one_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGKILL once the JSON log says registration_submitted, then two re-runs at once: both follow it, nothing left."""
    with late_registry(stack) as registry:
        env = job_env(tmp_path, stack, settings, registry.endpoint, REGISTRAR_LOG_FORMAT="json")
        killed = Cli(env)
        line = killed.expect('"event": "registration_submitted"')
        (registration_id,) = re.findall(r'"registration_id": "(reg-\w+)"', line)
        killed.kill()
        results = await both_rerun(env, registry)
        assert await assert_one_success_and_nothing_left(registry, results, s3, settings) == registration_id
        for _, _, stderr in results:
            assert '"phase": "upload"' not in stderr, stderr  # nothing uploaded again


async def test_two_reruns_after_a_kill_with_the_post_in_flight_make_one_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGKILL with the POST held before the registry, then two re-runs at once: one registration."""
    with late_registry(stack) as registry:
        holding = [True]

        def first_post_held(method: str, target: str) -> object:
            return Stall(HOLD) if holding[0] and is_post(method, target) else None

        with FaultProxy(registry.endpoint, first_post_held) as proxy:
            env = job_env(tmp_path, stack, settings, proxy.endpoint)
            killed = Cli(env)
            await until(lambda: proxy.count("POST", REGISTRATIONS) == 1, "the POST held")
            killed.kill()
            assert registry.registration_count == 0
            holding[0] = False
            results = await both_rerun(env, registry)
            await assert_one_success_and_nothing_left(registry, results, s3, settings)


async def test_two_reruns_after_a_failed_registration_make_one_new_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A kept registration ends FAILED, then two re-runs at once: one new registration between them."""
    with late_registry(stack) as registry:
        env = job_env(tmp_path, stack, settings, registry.endpoint)
        killed = Cli(env)
        failed = killed.submitted()
        killed.kill()
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        (model,) = [k for k in kept if k.endswith("/model.tar.gz")]
        await s3.delete_object(Bucket=settings.s3_bucket, Key=model)
        registry.finish_processing()
        assert (await final_status(registry, failed, timeout=BOUND)).startswith("FAILED")
        registry.hold_processing()

        results = await both_rerun(env, registry)
        for code, _, stderr in results:
            assert code == 0, stderr
        ids = {registration_of(stdout) for _, stdout, _ in results}
        assert len(ids) == 1, ids
        (retried,) = ids
        assert retried != failed
        assert registry.registration_count == 2, [r[2] for r in results]  # the FAILED one and its one retry
        assert await final_status(registry, retried, timeout=BOUND) == "SUCCEEDED"
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [], [r[2] for r in results]


@pytest.mark.parametrize("first_run", ["answered-late", "sigterm"])
async def test_a_rerun_that_takes_over_a_live_runs_unanswered_post_makes_one_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, first_run: str
) -> None:
    """A live run's POST is held; a re-run takes its prefix over; the first answered or stopped: one registration."""
    release = threading.Event()
    posts = [0]

    def first_post_held(method: str, target: str) -> object:
        if is_post(method, target):
            posts[0] += 1
            return Hold(release) if posts[0] == 1 else None
        return None

    with late_registry(stack) as registry, FaultProxy(registry.endpoint, first_post_held) as proxy:
        env = job_env(tmp_path, stack, settings, proxy.endpoint)
        first = Cli(env)
        try:
            await until(lambda: posts[0] == 1, "the first run's POST held")
            rerun = Cli(env)
            rerun.expect("never heard back")  # the first run's manifest says `submitting`: taken over
            registration_id = rerun.submitted()
            if first_run == "sigterm":
                first.process.send_signal(signal.SIGTERM)
                first.expect("SIGTERM received")
        finally:
            release.set()  # the first run's POST goes on to the registry (the same key and body)
        if first_run == "sigterm":  # a POST that may have reached the registry counts as accepted: kept
            code, _, stderr = first.finish()
            assert code == 143, stderr
            assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3, stderr
            registry.finish_processing()
            results = [rerun.finish()]
        else:  # the registry answers it with the registration the re-run made
            said = first.wait_for(*HAS_ONE) or ""
            assert registration_id in said, first.stderr
            registry.finish_processing()
            results = [first.finish(), rerun.finish()]
        await assert_one_success_and_nothing_left(registry, results, s3, settings)


# --- one of the two stopped ----------------------------------------------------------------------


async def test_a_leader_killed_during_the_wait_is_swept_once_its_follower_saw_the_registration_final(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Two runs at once, the registering one SIGKILLed: the other follows it to SUCCEEDED; a sweep leaves nothing."""
    with two_runs(tmp_path, stack, settings) as (registry, env, start_two):
        leader, follower = await start_two()
        leader.kill()
        registry.finish_processing()
        code, stdout, stderr = follower.finish()
        assert code == 0, stderr
        registration_id = registration_of(stdout)
        assert await final_status(registry, registration_id, timeout=BOUND) == "SUCCEEDED"
        assert registry.registration_count == 1
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        leader_prefix = attempt_prefix(leader.stderr, settings)
        assert all(k.startswith(leader_prefix) for k in left), left  # only what the SIGKILL left
        swept = sweep(env)
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [], swept


async def test_a_follower_killed_during_the_wait_is_swept_once_the_registration_is_final(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Two runs at once, the following one SIGKILLed: once the registration is final, a sweep leaves nothing."""
    with two_runs(tmp_path, stack, settings) as (registry, env, start_two):
        leader, follower = await start_two()
        follower.kill()
        registry.finish_processing()
        results = [leader.finish()]
        registration_id = registration_of(results[0][1])
        assert await final_status(registry, registration_id, timeout=BOUND) == "SUCCEEDED"
        assert registry.registration_count == 1
        swept = sweep(env)
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [], swept


async def test_a_follower_stopped_by_sigterm_names_the_registration_it_followed(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Two runs at once, SIGTERM to the following one: exit 143, and the error names the registration."""
    with two_runs(tmp_path, stack, settings) as (registry, _env, start_two):
        leader, follower = await start_two()
        follower.process.send_signal(signal.SIGTERM)
        code, _, stderr = follower.finish()
        registry.finish_processing()
        leader_result = leader.finish()
        registration_id = registration_of(leader_result[1])
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []  # what holds: nothing left
        assert code == 143, stderr
        assert "error: terminated by SIGTERM" in stderr
        assert "run again to register" not in stderr, stderr
        assert f"registration {registration_id}" in stderr.split("error:", 1)[1], stderr


# --- sweep while a run is live -------------------------------------------------------------------


async def test_a_sweep_during_a_live_run_spares_it_while_it_submits_and_waits(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`sweep --older-than 0s` while a run's POST is in flight, then while it waits: spared; nothing left."""
    release = threading.Event()
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, holding_posts(release)) as proxy:
        env = job_env(tmp_path, stack, settings, proxy.endpoint)
        live = Cli(env)
        try:
            await until(lambda: proxy.count("POST", REGISTRATIONS) == 1, "the POST held")
            before = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
            submitting = sweep(env)
            assert "0 removed, 1 spared" in submitting, submitting
            assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == before
        finally:
            release.set()
        registration_id = live.submitted()
        waiting = sweep(env)
        assert "0 removed, 1 spared" in waiting, waiting
        assert registration_id in waiting, waiting
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == before
        registry.finish_processing()
        await assert_one_success_and_nothing_left(registry, [live.finish()], s3, settings)


# --- another model under the same lineage id -----------------------------------------------------


async def test_another_model_under_the_lineage_is_another_registration_and_leaves_the_first_alone(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A run waits; another model of the same shapes under its lineage: a second registration, the first untouched."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with late_registry(stack) as registry:
        lineage = f"wf-one-{secrets.token_hex(3)}"
        envs = [
            environment(
                stack,
                settings,
                make_job(tmp_path / name, model_bytes=1024 * 1024),  # same names and sizes, other bytes
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                MODS_WORKFLOW_EXECUTION_ID=lineage,
            )
            for name in ("a", "b")
        ]
        first = Cli(envs[0])
        first_id = first.submitted()
        first_objects = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert len(first_objects) == 3, first_objects
        second = Cli(envs[1])
        second_id = second.submitted()  # a new registration, not one found or resumed
        assert second_id != first_id
        assert registry.registration_count == 2
        now = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert set(first_objects) <= set(now), (first_objects, now)
        registry.finish_processing()
        results = [first.finish(), second.finish()]
        for code, _, stderr in results:
            assert code == 0, stderr
        assert [registration_of(r[1]) for r in results] == [first_id, second_id]
        for registration_id in (first_id, second_id):
            assert await final_status(registry, registration_id, timeout=BOUND) == "SUCCEEDED"
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
