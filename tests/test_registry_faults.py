"""Registry faults end to end: exactly one registration, the right error, nothing left in S3."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from async_registrar import (
    Registrar,
    RegistrationConfig,
    RegistrationRejected,
    RegistrationRequest,
    RegistryUnavailable,
    Settings,
)
from async_registrar._artifacts import inspect_artifact
from async_registrar._local import ACCESS_KEY, LocalStack
from async_registrar._request import run_identity

from .conftest import leftovers, make_job, mims_server, registration_config, request_for


async def test_a_timeout_after_the_request_left_makes_one_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The first answer comes after the client gave up; the retry, same key, gets the same registration."""
    with mims_server(stack, stall_submissions=1, stall_seconds=3) as slow:
        quick = settings.model_copy(update={"mims_endpoint": slow.endpoint, "mims_request_timeout": 0.5})
        async with Registrar(quick) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path)))
        assert slow.registration_count == 1
    assert result.model_id.startswith("model-")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_503s_are_retried_and_every_attempt_is_signed_afresh(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two 503s with Retry-After, then the service verifies the third attempt's signature."""
    with mims_server(stack, fail_submissions=2, retry_after=0.1) as busy:
        async with Registrar(settings.model_copy(update={"mims_endpoint": busy.endpoint})) as registrar:
            await registrar.register(request_for(make_job(tmp_path)))
        assert busy.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_throttled_and_stalled_polls_are_waited_out(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """429s on the first polls (with Retry-After) and slow polls still end SUCCEEDED."""
    with mims_server(stack, throttle_polls=3, retry_after=0.05, stall_poll=0.1) as throttling:
        async with Registrar(settings.model_copy(update={"mims_endpoint": throttling.endpoint})) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path)))
        assert throttling.registration_count == 1
    assert result.registration_id.startswith("reg-")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rejected_signature_is_not_retried(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A 403 (the registry knows another secret) fails at once with its message; S3 is cleaned."""
    with mims_server(stack, signing_secrets={ACCESS_KEY: SecretStr("another-secret")}) as strict:
        async with Registrar(settings.model_copy(update={"mims_endpoint": strict.endpoint})) as registrar:
            with pytest.raises(RegistrationRejected, match="403: request signature rejected") as caught:
                await registrar.register(request_for(make_job(tmp_path)))
        assert strict.registration_count == 0
    assert caught.value.status_code == 403
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_unreachable_registry_is_unavailable(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Nothing listens at the endpoint: RegistryUnavailable at the deadline; S3 is cleaned."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = settings.model_copy(update={"mims_endpoint": f"http://127.0.0.1:{port}", "submit_timeout": 1.0})
    async with Registrar(closed) as registrar:
        with pytest.raises(RegistryUnavailable, match="ConnectError"):
            await registrar.register(request_for(make_job(tmp_path)))
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_retried_job_gets_the_registration_it_already_has(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Same lineage id, same inputs, after a success: the registry names its registration for the key
    (409 with the holder), and the run reports that one instead of making a second."""
    job = make_job(tmp_path)
    with mims_server(stack) as registry:
        async with Registrar(settings.model_copy(update={"mims_endpoint": registry.endpoint})) as registrar:
            first = await registrar.register(request_for(job, workflow_execution_id="wf-retry"))
            again = await registrar.register(request_for(job, workflow_execution_id="wf-retry"))
        assert registry.registration_count == 1
    assert (again.registration_id, again.model_id) == (first.registration_id, first.model_id)
    assert again.model_artifact.sha256 == first.model_artifact.sha256
    assert (first.registrations[0].resumed, again.registrations[0].resumed) == (False, True)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def test_run_identity(tmp_path: Path, settings: Settings) -> None:
    """Derived from lineage, config, inputs and archive settings when there is a lineage id; fresh
    otherwise.  The key also depends on the archives' contents."""
    job = make_job(tmp_path)
    model = inspect_artifact(job["model"], role="model")
    base = request_for(job, workflow_execution_id="wf-1")
    same = run_identity(base, model, None, None, settings)
    assert same == run_identity(request_for(job, workflow_execution_id="wf-1"), model, None, None, settings)
    assert same.group.startswith("run-")
    assert same.resumable
    assert same != run_identity(request_for(job, workflow_execution_id="wf-2"), model, None, None, settings)
    other_config = RegistrationRequest(
        config=RegistrationConfig.from_mapping(registration_config(model_owner="other-team")),
        model_path=job["model"],
        workflow_execution_id="wf-1",
    )
    assert same != run_identity(other_config, model, None, None, settings)
    assert same != run_identity(base, model, None, {"auc": 0.9}, settings)
    level_2 = settings.model_copy(update={"compression_level": 2})
    assert same.group != run_identity(base, model, None, None, level_2).group
    fresh = [run_identity(request_for(job), model, None, None, settings) for _ in range(2)]
    assert fresh[0].group != fresh[1].group
    assert not fresh[0].resumable

    key = same.idempotency_key({"model": "a" * 64})
    assert key == same.idempotency_key({"model": "a" * 64})
    assert key != same.idempotency_key({"model": "b" * 64})  # other contents, other key
    assert same.idempotency_key({"model": "a" * 64}, region="eu-west-1") == key + "-eu-west-1"
    assert same.idempotency_key({"model": "a" * 64}, generation=2) == key + "-g2"
    mine = run_identity(request_for(job, idempotency_key="mine"), model, None, None, settings)
    assert mine.idempotency_key({"model": "a" * 64}) == "mine"
    assert mine.idempotency_key({"model": "a" * 64}, generation=3) == "mine-g3"
