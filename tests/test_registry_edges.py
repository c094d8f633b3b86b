"""The registry as an adversary: answers that are late, cut off, refused, redirected or wrong.

What must hold whatever the registry does (README, "The point of no return"): a registration it
accepted is never lost (its artifacts are kept and named until it is final, and a re-run with the
same lineage id follows it), polling survives transient faults until its deadline, and nothing is
left in S3 once a registration is final.  The reference MIMS runs over real HTTP on the session's
moto S3; a `FaultProxy` in front of it makes the faults it cannot make itself, and an httpx
transport that wraps the real one is used only to change one header of a real answer, or to send a
redirect (the reference MIMS never redirects).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr

from async_registrar import (
    Registrar,
    RegistrationInterrupted,
    RegistrationRejected,
    RegistrationSubmitted,
    RegistrationTimeout,
    RegistryUnavailable,
    Settings,
)
from async_registrar._cli import EXIT_TIMEOUT, exit_code
from async_registrar._local import LocalStack

from .conftest import (
    ForwardingTransport,
    Recorder,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    names_under,
    on,
    release_when_submitted,
    remove_all,
    request_for,
)
from .fault_proxy import Cut, FaultProxy, Reply, Stall

#: What a run keeps for an accepted, unfinished registration: everything the registry reads.
KEPT = ["model.tar.gz", "payload.tar.gz", "registration.json"]


def _is_poll(method: str, target: str) -> bool:
    """A poll of a registration (not the preflight's probe of an id that cannot exist)."""
    return method == "GET" and target.startswith("/v1/registrations/reg-")


def _json_reply(status: int, body: dict[str, Any], reason: str = "Error") -> Reply:
    return Reply(status, json.dumps(body).encode(), reason)


class _RewrittenRetryAfter(ForwardingTransport):
    """Real HTTP to the registry; the `Retry-After` of its 503 answers is replaced with `value` (a
    gateway or another registry implementation writing what the reference MIMS never does)."""

    def __init__(self, value: str) -> None:
        super().__init__()
        self._value = value
        self.rewritten = 0
        self.posts = 0
        #: When the first POST was sent and the last one answered (anyio's clock).
        self.first_post_sent: float | None = None
        self.last_post_answered: float | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.posts += request.method == "POST"
        if request.method == "POST" and self.first_post_sent is None:
            self.first_post_sent = anyio.current_time()
        response = await self._real.handle_async_request(request)
        if request.method == "POST":
            self.last_post_answered = anyio.current_time()
        if response.status_code != 503:
            return response
        body = await response.aread()
        await response.aclose()
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("retry-after", "content-length")]
        self.rewritten += 1
        return httpx.Response(503, headers=[*headers, ("Retry-After", self._value)], content=body, request=request)


async def test_a_retry_after_that_is_not_a_number_does_not_hang_the_submission(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The first POST gets 503 with `Retry-After: nan` (valid for float(), not for HTTP): an
    unreadable Retry-After is ignored (as `test_retry_after_parsing` has it for other garbage),
    the POST is retried with its backoff and the registration made, well within the deadline."""
    transport = _RewrittenRetryAfter("nan")
    request = request_for(make_job(tmp_path))
    with mims_server(stack, fail_submissions=1, retry_after=0.1) as registry:
        async with (
            httpx.AsyncClient(transport=transport) as http,
            Registrar(on(settings, registry, submit_timeout=2.0), http_client=http) as registrar,
        ):
            try:
                # A hang guard only (a Retry-After of nan slept on never ends), generous for the
                # whole run on a loaded machine: the submission itself is timed below.
                with anyio.fail_after(30):  # the whole run takes ~1 s
                    result = await registrar.register(request)
            finally:
                await remove_all(s3, settings.s3_bucket, settings.s3_prefix)  # kept while the POST hung
        assert transport.rewritten == 1
        assert (transport.posts, registry.registration_count) == (2, 1)
        # The submission, from the first POST to the retry's answer: retried after the backoff's
        # own ~0.02 s, well within the submit deadline (2 s), however slow the upload before it was.
        assert transport.first_post_sent is not None
        assert transport.last_post_answered is not None
        submitting = transport.last_post_answered - transport.first_post_sent
        assert submitting < 2.0, f"the submission took {submitting:.2f} s"
    assert result.registration_id.startswith("reg-")


async def test_a_retry_after_dated_in_the_past_does_not_turn_the_backoff_off(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Every POST gets 503 with a `Retry-After` HTTP date in the past (the registry's clock lags
    ours): the client still backs off (exponential, from 0.02 s here) rather than retrying at once;
    after the submit deadline (2 s) it is RegistryUnavailable (exit 5) with nothing left."""
    transport = _RewrittenRetryAfter("Wed, 21 Oct 2015 07:28:00 GMT")
    with mims_server(stack, fail_submissions=1_000_000) as registry:
        async with (
            httpx.AsyncClient(transport=transport) as http,
            Registrar(on(settings, registry, submit_timeout=2.0), http_client=http) as registrar,
        ):
            with pytest.raises(RegistryUnavailable, match="kept answering 503"):
                await registrar.register(request_for(make_job(tmp_path)))
        assert registry.registration_count == 0
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    # Exponential backoff with full jitter from 0.02 s makes about a dozen attempts in 2 s.
    assert transport.posts <= 30, f"{transport.posts} POSTs in the 2 s submit deadline"


class _RedirectFirstPost(ForwardingTransport):
    """Real HTTP, except that the first POST is answered `307` to `location` (a misconfigured load
    balancer, or a compromised front end, pointing the registrar at another host)."""

    def __init__(self, location: str) -> None:
        super().__init__()
        self._location = location
        self.redirected = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and not self.redirected:
            self.redirected += 1
            return httpx.Response(307, headers={"Location": self._location}, request=request)
        return await self._real.handle_async_request(request)


async def test_an_injected_client_that_follows_redirects_sends_nothing_to_another_host(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A service shares its own httpx client (follow_redirects=True) with the registrar; the registry
    answers the POST 307 to another host.  The registrar must not follow: the other host gets
    nothing (least of all the session token), the run fails naming the 307, nothing is left."""
    with_token = settings.model_copy(update={"aws_session_token": SecretStr("session-token-must-not-leak")})
    with mims_server(stack) as registry, FaultProxy(registry.endpoint, lambda method, target: None) as elsewhere:
        transport = _RedirectFirstPost(f"{elsewhere.endpoint}/v1/registrations")
        async with (
            httpx.AsyncClient(transport=transport, follow_redirects=True) as http,
            Registrar(on(with_token, registry), http_client=http) as registrar,
        ):
            with pytest.raises(RegistrationRejected) as caught:
                await registrar.register(request_for(make_job(tmp_path)))
        assert transport.redirected == 1
        leaked = [h.get("x-amz-security-token") for h in elsewhere.headers]
        assert elsewhere.seen == [], f"the other host received {elsewhere.seen} (session tokens: {leaked})"
        assert registry.registration_count == 0
    assert "307" in caught.value.message
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_poll_answered_for_another_registration_is_not_taken_for_ours(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A cache or gateway in front of the registry answers our polls with another registration's
    state (valid JSON, a valid registration, SUCCEEDED, but not the id asked for).  Ours is not
    final: its artifacts must stay (the run stops, keeping them, or waits on), and it ends SUCCEEDED."""
    other = {
        "registration_id": "reg-someone-else",
        "model_id": "model-someone-else",
        "workflow_execution_arn": "arn:aws:states:us-west-2:1:execution:w:reg-someone-else",
        "status": "SUCCEEDED",
    }

    def rule(method: str, target: str) -> Reply | None:
        return _json_reply(200, other, "OK") if _is_poll(method, target) else None

    recorder = Recorder()
    outcome: Any = None
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, rule) as proxy:
        async with Registrar(on(settings, registry, mims_endpoint=proxy.endpoint, wait_timeout=1.0)) as registrar:
            try:
                outcome = await registrar.register(request_for(make_job(tmp_path)), on_progress=recorder)
            except RegistrationInterrupted as exc:
                outcome = exc
        (submitted,) = recorder.of(RegistrationSubmitted)
        kept = await names_under(s3, settings)
        registry.finish_processing()
        status = await final_status(registry, submitted.registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    observed = {
        "another registration taken for ours": getattr(outcome, "registration_id", None) == other["registration_id"],
        "kept": kept,
        "our registration": status,
    }
    assert observed == {"another registration taken for ours": False, "kept": KEPT, "our registration": "SUCCEEDED"}


async def test_a_post_answer_broken_off_mid_body_and_polls_cut_alike_make_one_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The registry accepts the POST and its `202` head arrives, then the connection is reset in the
    middle of the body (a proxy or load balancer dying); the first two polls are cut the same way.
    The POST is sent again with the same key (the registry replays its registration), the polls are
    retried: one registration, SUCCEEDED, nothing left.  (faults.md lists resets before an answer;
    this is one after the answer began.)"""
    cut = {"POST": 0, "poll": 0}

    def rule(method: str, target: str) -> Cut | None:
        kind = "POST" if method == "POST" else "poll" if _is_poll(method, target) else None
        if kind is not None and cut[kind] < (1 if kind == "POST" else 2):
            cut[kind] += 1
            return Cut(after=10)
        return None

    with mims_server(stack) as registry, FaultProxy(registry.endpoint, rule) as proxy:
        async with Registrar(on(settings, registry, mims_endpoint=proxy.endpoint)) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="wf-edge-cut"))
        assert registry.registration_count == 1
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
        assert proxy.count("POST", "/v1/registrations") == 2
    assert cut == {"POST": 1, "poll": 2}
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_poll_that_never_answers_is_cut_at_the_wait_deadline_and_the_artifacts_kept(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Every poll reaches a registry that takes it and never answers (far past the wait timeout; the
    request timeout is 30 s): the wait still ends at `--wait-timeout` (exit 6), naming the
    registration and its last status, and keeps what the registry reads."""

    def rule(method: str, target: str) -> Stall | None:
        return Stall(60) if _is_poll(method, target) else None

    with late_registry(stack) as registry, FaultProxy(registry.endpoint, rule) as proxy:
        async with Registrar(on(settings, registry, mims_endpoint=proxy.endpoint, wait_timeout=1.0)) as registrar:
            started = time.monotonic()
            with pytest.raises(RegistrationTimeout) as caught:
                await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="wf-edge-silent"))
            took = time.monotonic() - started
        assert proxy.count("GET", "/v1/registrations/reg-") >= 1
        assert registry.registration_count == 1
        kept = await names_under(s3, settings)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    error = caught.value
    assert exit_code(error) == EXIT_TIMEOUT
    assert "did not finish within 1 s (last status: PENDING)" in error.message
    assert took < 15  # the upload and the submission, then 1 s of waiting: never the 30 s request timeout
    (registration,) = error.kept
    assert registration.registration_id == error.registration_id
    assert kept == KEPT


#: Answers to every poll that are not transient by the client's rules (no 429/5xx, no transport
#: error): each ends the wait at once.  Whatever the answer, the accepted registration is kept.
_POLL_REFUSALS: dict[str, Callable[[str], Reply]] = {
    "clock-skew-403": lambda rid: _json_reply(
        403, {"message": "request signature rejected: the request is too old or dated in the future (check the clock)"}
    ),
    "expired-token-401": lambda rid: _json_reply(
        401, {"message": "ExpiredToken: the security token included in the request is expired"}
    ),
    "redirect-302": lambda rid: Reply(302, b"", "Found"),
    "unknown-status": lambda rid: _json_reply(
        200,
        {
            "registration_id": rid,
            "model_id": "model-x",
            "workflow_execution_arn": f"arn:aws:states:us-west-2:1:execution:w:{rid}",
            "status": "RUNNING",
        },
        "OK",
    ),
    "gone-404-past-the-grace": lambda rid: _json_reply(404, {"message": f"no registration {rid!r}"}),
}


@pytest.mark.parametrize("answer", sorted(_POLL_REFUSALS))
async def test_a_poll_the_client_cannot_use_keeps_the_registration_and_a_rerun_follows_it(
    answer: str, tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry accepted; then every poll is refused (a clock skewed past SigV4's 15 minutes,
    an expired session token), redirected, answered with a status the client does not know, or 404
    past the 30 s grace (shortened here).  The run stops with `RegistrationInterrupted` (a registry
    exit code), naming the registration, keeping its artifacts and saying how to resume; a re-run
    with the same lineage id (the registry reachable again) follows it to SUCCEEDED, makes no
    second registration and leaves nothing.  (faults.md has no row for these.)"""
    monkeypatch.setattr("async_registrar._mims_client.NOT_FOUND_GRACE", 0.3)
    make = _POLL_REFUSALS[answer]

    def rule(method: str, target: str) -> Reply | None:
        return make(target.rsplit("/", 1)[1]) if _is_poll(method, target) else None

    request = request_for(make_job(tmp_path), workflow_execution_id=f"wf-edge-{answer}")
    with late_registry(stack) as registry:
        with FaultProxy(registry.endpoint, rule) as proxy:
            async with Registrar(on(settings, registry, mims_endpoint=proxy.endpoint)) as registrar:
                with pytest.raises(RegistrationInterrupted) as caught:
                    await registrar.register(request)
        kept = await names_under(s3, settings)
        async with Registrar(on(settings, registry)) as registrar:
            again = await registrar.register(request, on_progress=release_when_submitted(registry))
        assert registry.registration_count == 1
    error = caught.value
    assert not isinstance(error, RegistrationTimeout)  # it stopped at once, not at the wait timeout
    assert exit_code(error) == EXIT_TIMEOUT  # accepted and kept: not a rejection
    (registration,) = error.kept
    assert f"registration {registration.registration_id} was accepted, but following it failed" in error.message
    assert registration.kept_prefix is not None
    assert registration.kept_prefix.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}")
    assert error.resume_hint is not None
    assert f"MODS_WORKFLOW_EXECUTION_ID=wf-edge-{answer}" in error.resume_hint
    assert kept == KEPT
    assert (again.registration_id, again.registrations[0].resumed) == (registration.registration_id, True)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
