"""Edges of the registration path found by an adversarial review: a run whose POST never arrived
beside a re-run that took its prefix over, a wait begun while the registrar closes, a gateway's 5xx
after the POST arrived, a key that cannot be sent, a garbled poll."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from async_registrar import (
    ConfigurationError,
    JobInputs,
    Registrar,
    RegistrationKept,
    RegistryError,
    RegistryUnavailable,
    Settings,
)
from async_registrar._local import LocalStack

from .conftest import (
    ForwardingTransport,
    Recorder,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    remove_all,
    request_for,
)


class _GatedPost(ForwardingTransport):
    """A real transport, except that the first POST is held until `go` is set and then answered 503
    with a Retry-After past the submission's deadline: it never reached the registry."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = anyio.Event()
        self.go = anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.arrived.set()
            await self.go.wait()
            return httpx.Response(
                503, headers={"retry-after": "60"}, json={"message": "busy", "errors": []}, request=request
            )
        return await self._real.handle_async_request(request)


async def test_a_run_whose_post_never_arrived_does_not_remove_a_concurrent_takeover(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two runs of one lineage: A wrote its `submitting` manifest and its POST is in flight; B starts,
    takes A's prefix over (an unanswered POST) and gets its registration accepted, reading A's prefix.
    A's POST then ends without having reached the registry (503, Retry-After past the deadline) and A
    removes its prefix: the artifacts B's accepted, unfinished registration reads must stay."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-review-takeover-race")
    gate = _GatedPost()
    outcome: list[BaseException] = []
    with late_registry(stack) as registry:
        async with (
            httpx.AsyncClient(transport=gate) as http,
            Registrar(on(settings, registry, submit_timeout=5), http_client=http) as a,
        ):

            async def a_registers() -> None:
                try:
                    await a.register(request)
                except Exception as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(a_registers)
                with anyio.fail_after(30):
                    await gate.arrived.wait()  # A's manifest says `submitting`; its POST is held
                async with Registrar(on(settings, registry)) as b:
                    b_handle = await b.submit(request)
                    (accepted,) = b_handle.accepted
                    gate.go.set()  # A's POST: 503, never reached the registry; A cleans up
                    with anyio.fail_after(30):
                        while not outcome:
                            await anyio.sleep(0.02)
                    await b_handle.aclose()  # kept: unfinished
        assert isinstance(outcome[0], RegistryUnavailable), outcome
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, accepted.registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert registry.registration_count == 1
    assert status == "SUCCEEDED", (status, left)


async def test_a_wait_begun_while_the_registrar_closes_still_names_what_it_keeps(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A service leaves the registrar's block while a wait is in flight; meanwhile another task calls
    `wait()` on a handle still open.  That wait is refused (the registrar is closing), but the handle
    must still be closed by the registrar's exit: its accepted, unfinished registration named
    (RegistrationKept), as the class promises."""
    seen = Recorder()
    with late_registry(stack) as registry:
        registrar = Registrar(on(settings, registry), on_progress=seen)
        await registrar.__aenter__()
        first = await registrar.submit(request_for(make_job(tmp_path / "a")))
        second = await registrar.submit(request_for(make_job(tmp_path / "b")))
        (accepted,) = first.accepted
        refused: list[BaseException] = []

        async def quietly_wait() -> None:
            with contextlib.suppress(RuntimeError):  # the registrar's exit stops it, as documented
                await second.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(quietly_wait)
            with anyio.fail_after(10):
                while not registrar._working:
                    await anyio.sleep(0.01)
            tg.start_soon(registrar.__aexit__, None, None, None)
            with anyio.fail_after(10):
                while not registrar._closing:
                    await anyio.sleep(0)
            try:
                await first.wait()
            except RuntimeError as exc:
                refused.append(exc)
        named = {r.registration_id for event in seen.of(RegistrationKept) for r in event.registrations}
        registry.finish_processing()
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert refused, "the wait was expected to be refused while the registrar closes"
    assert accepted.registration_id in named, (accepted.registration_id, named)


class _GatewayTimeoutAfterForwarding(ForwardingTransport):
    """Real HTTP to the registry; the POST reaches it (and is accepted), but a CDN in front answers
    524 "A timeout occurred" (Cloudflare: the origin took the request and did not answer in time)."""

    def __init__(self) -> None:
        super().__init__()
        self.forwarded = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._real.handle_async_request(request)
        if request.method != "POST":
            return response
        await response.aread()
        await response.aclose()
        self.forwarded += 1
        return httpx.Response(524, text="<html>A timeout occurred</html>", request=request)


async def test_a_5xx_from_a_gateway_after_the_post_reached_the_registry_keeps_the_artifacts(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A 5xx other than 503 says nothing about whether the registry took the POST: a gateway's 524
    comes after the origin got it.  The registration exists; what it reads must be kept (and named)."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-review-524")
    transport = _GatewayTimeoutAfterForwarding()
    with late_registry(stack) as registry:
        async with (
            httpx.AsyncClient(transport=transport) as http,
            Registrar(on(settings, registry), http_client=http) as registrar,
        ):
            try:
                await registrar.register(request)
            except RegistryError as exc:
                error = exc
        assert "524" in str(error)
        assert registry.registration_count == 1  # the registry has it
        (registration_id,) = registry.app.state.registry.records  # type: ignore[union-attr]
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert left, "the artifacts of a registration the registry took were deleted"
    assert status == "SUCCEEDED", status


def test_a_key_that_cannot_be_sent_is_refused_before_anything_is_uploaded(tmp_path: Path) -> None:
    """A caller-chosen Idempotency-Key that is not visible ASCII cannot go in an HTTP header: it was
    accepted, the inputs uploaded, and the POST failed to build (UnicodeEncodeError) after all of
    it, keeping everything "for a registry that may have accepted it".  It is a configuration
    error now, from the library's request and from the environment alike, before any upload."""
    job = make_job(tmp_path)
    for key in ("modèle-clé", "two words", "x" * 257):
        with pytest.raises(ConfigurationError, match="visible ASCII"):
            request_for(job, idempotency_key=key)
        with pytest.raises(ConfigurationError, match="REGISTRAR_IDEMPOTENCY_KEY: must be 1 to 256 visible ASCII"):
            JobInputs.from_env({"REGISTRAR_IDEMPOTENCY_KEY": key})
    assert request_for(job, idempotency_key="job-42/retry_1:ok").idempotency_key == "job-42/retry_1:ok"


class _OnePollGarbled(ForwardingTransport):
    """Real HTTP to the registry; the first poll of a registration comes back `Content-Encoding: gzip`
    with a body that is not gzip (a proxy that mangled it): a malformed answer."""

    def __init__(self) -> None:
        super().__init__()
        self.garbled = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._real.handle_async_request(request)
        if request.method != "GET" or "/preflight-" in request.url.path or self.garbled:
            return response
        await response.aread()
        await response.aclose()
        self.garbled += 1
        return httpx.Response(
            200,
            headers={"content-encoding": "gzip", "content-type": "application/json"},
            content=b"{not gzip",
            request=request,
        )


async def test_one_poll_with_a_garbled_encoding_is_ridden_out(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """One poll answered with a body that cannot be decoded: the wait rides it out like any failed
    poll (or at worst ends with the package's own error, naming what it kept), never a raw httpx error."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-review-garbled")
    transport = _OnePollGarbled()
    with mims_server(stack) as registry:
        async with (
            httpx.AsyncClient(transport=transport) as http,
            Registrar(on(settings, registry), http_client=http) as registrar,
        ):
            try:
                await registrar.register(request)
                error: BaseException | None = None
            except Exception as exc:
                error = exc
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert transport.garbled == 1
    assert error is None, repr(error)  # one garbled poll is ridden out like any failed poll
