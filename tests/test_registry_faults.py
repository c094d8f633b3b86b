"""Registry faults end to end: exactly one registration, the right error, nothing left in S3."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from async_registrar import (
    Registrar,
    RegistrationConfig,
    RegistrationRejected,
    RegistrationRequest,
    RegistryError,
    RegistryUnavailable,
    Settings,
)
from async_registrar._artifacts import inspect_artifact
from async_registrar._local import ACCESS_KEY, LocalStack
from async_registrar._request import run_identity

from .conftest import (
    ForwardingTransport,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    registration_config,
    remove_all,
    request_for,
)
from .fault_proxy import RESET, FaultProxy


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


async def test_an_unreachable_registry_fails_the_preflight(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Nothing listens at the endpoint: RegistryUnavailable after the preflight's bound, naming the
    endpoint, before anything is uploaded (nothing to clean)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = settings.model_copy(update={"mims_endpoint": f"http://127.0.0.1:{port}", "preflight_timeout": 1.0})
    async with Registrar(closed) as registrar:
        with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port} did not answer within the preflight's 1 s"):
            await registrar.register(request_for(make_job(tmp_path)))
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_connection_resets_on_the_first_polls_are_ridden_out(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A load balancer in front of the registry resets the connection on the first three polls of
    the registration (and on the preflight's first GET): one registration, SUCCEEDED."""
    resets = {"polls": 0, "preflight": 0}

    def rule(method: str, target: str) -> object | None:
        kind = "preflight" if "/preflight-" in target else "polls" if "/v1/registrations/" in target else None
        if method == "GET" and kind is not None and resets[kind] < (1 if kind == "preflight" else 3):
            resets[kind] += 1
            return RESET
        return None

    with mims_server(stack) as registry, FaultProxy(registry.endpoint, rule) as proxy:
        async with Registrar(settings.model_copy(update={"mims_endpoint": proxy.endpoint})) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path)))
        assert registry.registration_count == 1
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert resets == {"polls": 3, "preflight": 1}
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


class _FailingPosts(ForwardingTransport):
    """Real HTTP to the registry, but the first POSTs fail as a network can make them fail:
    the answer lost after the request arrived (ReadError), the request broken on its way
    (WriteError), no connection free in time (PoolTimeout).  No server produces these on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and len(self.faults) < 3:
            fault = ["ReadError", "WriteError", "PoolTimeout"][len(self.faults)]
            self.faults.append(fault)
            if fault == "ReadError":  # it arrived: the registry registered it; the answer is lost
                response = await self._real.handle_async_request(request)
                await response.aclose()
                raise httpx.ReadError("connection reset by peer", request=request)
            if fault == "WriteError":
                raise httpx.WriteError("broken pipe", request=request)
            raise httpx.PoolTimeout("no connection available", request=request)
        return await self._real.handle_async_request(request)


async def test_a_post_failing_with_read_write_and_pool_errors_makes_one_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """ReadError (after the registry took it), WriteError and PoolTimeout, once each: retried with
    the same Idempotency-Key, one registration only, SUCCEEDED."""
    transport = _FailingPosts()
    with mims_server(stack) as registry:
        async with httpx.AsyncClient(transport=transport) as http:
            on_it = settings.model_copy(update={"mims_endpoint": registry.endpoint})
            async with Registrar(on_it, http_client=http) as registrar:
                result = await registrar.register(request_for(make_job(tmp_path)))
        assert registry.registration_count == 1
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert transport.faults == ["ReadError", "WriteError", "PoolTimeout"]
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


class _UnknownStatusOnPost(ForwardingTransport):
    """Real HTTP to the registry; the POST's 2xx answer comes back with a status this client does
    not know (a registry that added `QUEUED`, or a gateway that rewrote the body).  The registry
    has accepted the registration all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._real.handle_async_request(request)
        if request.method != "POST":
            return response
        body = await response.aread()
        await response.aclose()
        if response.status_code < 300:
            data = json.loads(body)
            data["status"] = "QUEUED"
            body = json.dumps(data).encode()
            self.rewritten += 1
        headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
        return httpx.Response(response.status_code, headers=headers, content=body, request=request)


async def test_an_accepted_post_with_an_unreadable_answer_keeps_the_artifacts(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The registry answered the POST 2xx (it accepted) with a body this client cannot read (a
    status it does not know): the run fails, but the artifacts the registration reads are kept."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-adv-unknown-status")
    transport = _UnknownStatusOnPost()
    with late_registry(stack) as registry:
        async with (
            httpx.AsyncClient(transport=transport) as http,
            Registrar(on(settings, registry), http_client=http) as registrar,
        ):
            with pytest.raises(RegistryError, match="not a registration"):
                await registrar.register(request)
        assert transport.rewritten == 1
        assert registry.registration_count == 1  # the registry has it: the point of no return is passed
        (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    # What the accepted registration reads must have been kept: it was deleted, so it ends FAILED.
    assert left, "the artifacts of an accepted registration were deleted"
    assert status == "SUCCEEDED", status
