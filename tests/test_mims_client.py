"""The MIMS client on exact fault sequences (httpx.MockTransport)."""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from botocore.credentials import ReadOnlyCredentials

from async_registrar import (
    RegistrationFailed,
    RegistrationRejected,
    RegistrationTimeout,
    RegistryError,
    RegistryUnavailable,
    Settings,
)
from async_registrar._mims_client import MimsClient, _retry_after
from async_registrar._mims_contract import ArtifactRef, Registration, RegistrationSubmission
from async_registrar._sigv4 import SigV4

from .conftest import registration_config

ENDPOINT = "https://mims.test"
SETTINGS = Settings(s3_bucket="b-1", mims_endpoint=ENDPOINT, poll_initial=0.01, poll_max=0.02, submit_timeout=5)
SUBMISSION = RegistrationSubmission.model_validate(
    {
        **registration_config(),
        "model_artifact": ArtifactRef(s3_uri="s3://b-1/p/model.tar.gz", size_bytes=10, sha256="0" * 64),
    }
)


def registration(status: str = "PENDING", reason: str | None = None) -> dict[str, Any]:
    return {
        "registration_id": "reg-1",
        "model_id": "model-1",
        "workflow_execution_arn": "arn:aws:states:us-west-2:1:execution:w:reg-1",
        "status": status,
        "failure_reason": reason,
    }


class Script:
    """Answers requests in order from a list of responses or exceptions; records the requests."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.signings = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    async def credentials(self) -> ReadOnlyCredentials:
        self.signings += 1
        return ReadOnlyCredentials("AKIDTEST", "secret", None)

    def client(self, settings: Settings = SETTINGS) -> tuple[MimsClient, httpx.AsyncClient]:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self), follow_redirects=False)
        auth = SigV4(self.credentials, region="us-west-2", service="mims")
        return MimsClient(http, ENDPOINT, settings, auth=auth), http


async def test_submission_is_retried_with_one_idempotency_key(no_backoff: None) -> None:
    """503, a read timeout, then 202: one logical submission, one key, every attempt signed afresh."""
    script = Script(
        httpx.Response(503, json={"message": "busy"}, headers={"Retry-After": "0"}),
        httpx.ReadTimeout("slow"),
        httpx.Response(202, json=registration()),
    )
    client, http = script.client()
    async with http:
        accepted = await client.submit(SUBMISSION, idempotency_key="key-1")
    assert accepted.registration_id == "reg-1"
    assert len(script.requests) == 3
    assert {r.headers["idempotency-key"] for r in script.requests} == {"key-1"}
    assert script.signings == 3
    assert all(r.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/") for r in script.requests)
    body = json.loads(script.requests[0].content)
    assert body["model_artifact"]["s3_uri"] == "s3://b-1/p/model.tar.gz"
    assert body["source_model_inference_output_variable_list"] == [["risk_score", "NUMERIC"]]


async def test_a_400_is_not_retried_and_its_message_reaches_the_user(no_backoff: None) -> None:
    """Client errors fail at once, with the server's message and errors."""
    script = Script(
        httpx.Response(400, json={"message": "model_owner unknown", "errors": ["model_owner: no such team"]})
    )
    client, http = script.client()
    async with http:
        with pytest.raises(RegistrationRejected) as caught:
            await client.submit(SUBMISSION, idempotency_key="k")
    assert len(script.requests) == 1
    assert caught.value.status_code == 400
    assert "rejected with 400: model_owner unknown" in str(caught.value)
    assert "model_owner: no such team" in str(caught.value)


async def test_redirects_are_not_followed(no_backoff: None) -> None:
    """A signed request is never replayed to another host."""
    script = Script(httpx.Response(307, headers={"Location": "https://elsewhere.test/v1/registrations"}))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistrationRejected, match="307"):
            await client.submit(SUBMISSION, idempotency_key="k")
    assert [r.url.host for r in script.requests] == ["mims.test"]


async def test_throttling_past_the_deadline_is_unavailable(no_backoff: None) -> None:
    """429 on every attempt ends as RegistryUnavailable, naming the URL."""
    script = Script(httpx.Response(429, json={"message": "slow down"}))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistryUnavailable, match=r"POST https://mims.test/v1/registrations kept answering 429"):
            await client.submit(SUBMISSION, idempotency_key="k")
    assert len(script.requests) == 10


async def test_an_unreachable_registry_is_unavailable(no_backoff: None) -> None:
    """Connection failures on every attempt end as RegistryUnavailable."""
    script = Script(httpx.ConnectError("refused"))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistryUnavailable, match="ConnectError; check --mims-endpoint"):
            await client.submit(SUBMISSION, idempotency_key="k")


async def test_retry_after_is_honoured() -> None:
    """A 503 asking for 0.3 s is waited on at least that long (no testing mode here)."""
    script = Script(
        httpx.Response(503, headers={"Retry-After": "0.3"}),
        httpx.Response(202, json=registration()),
    )
    client, http = script.client()
    started = time.monotonic()
    async with http:
        await client.submit(SUBMISSION, idempotency_key="k")
    assert time.monotonic() - started >= 0.3


def test_retry_after_parsing() -> None:
    """Seconds or an HTTP date, capped at a minute; garbage, "nan", zero, negative numbers and dates
    already past are ignored (the backoff's own delay applies: never an endless sleep, never a
    retry at once, again and again)."""
    assert _retry_after("2") == 2.0
    assert _retry_after("86400") == 60.0
    assert _retry_after("soon") is None
    assert _retry_after(None) is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (_retry_after(in_ten) or 0) <= 10
    assert _retry_after(email.utils.formatdate(time.time() - 10, usegmt=True)) is None
    for ignored in ("nan", "inf", "-inf", "0", "-5"):
        assert _retry_after(ignored) is None, ignored


async def test_wait_reports_each_status_until_succeeded(no_backoff: None) -> None:
    """A brief 404, then PENDING, IN_PROGRESS, SUCCEEDED: each change reported once."""
    script = Script(
        httpx.Response(404, json={"message": "unknown"}),
        httpx.Response(200, json=registration("PENDING")),
        httpx.Response(200, json=registration("PENDING")),
        httpx.Response(503),
        httpx.Response(200, json=registration("IN_PROGRESS")),
        httpx.Response(200, json=registration("SUCCEEDED")),
    )
    seen: list[str] = []
    client, http = script.client()
    async with http:
        final = await client.wait("reg-1", max_wait=5, on_status=lambda r: seen.append(r.status))
    assert final.status == "SUCCEEDED"
    assert seen == ["PENDING", "IN_PROGRESS", "SUCCEEDED"]
    assert all(r.method == "GET" and r.url.path == "/v1/registrations/reg-1" for r in script.requests)


async def test_failed_surfaces_the_reason(no_backoff: None) -> None:
    """FAILED raises RegistrationFailed carrying the registry's reason."""
    script = Script(httpx.Response(200, json=registration("FAILED", "sha256 mismatch")))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistrationFailed, match="reg-1 FAILED: sha256 mismatch") as caught:
            await client.wait("reg-1", max_wait=5)
    assert caught.value.failure_reason == "sha256 mismatch"


async def test_the_wait_stops_at_its_deadline(no_backoff: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration stuck IN_PROGRESS times out with the last status; polling backed off."""
    pauses: list[float] = []  # each pause the wait asked for (and took: the real clock's deadline applies)
    real_sleep = anyio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(anyio, "sleep", sleep)
    script = Script(httpx.Response(200, json=registration("IN_PROGRESS")))
    client, http = script.client(SETTINGS.model_copy(update={"poll_initial": 0.01, "poll_max": 0.08}))
    started = anyio.current_time()
    async with http:
        with pytest.raises(
            RegistrationTimeout, match=r"did not finish within 0.3 s \(last status: IN_PROGRESS\)"
        ) as caught:
            await client.wait("reg-1", max_wait=0.3)
    # A hang guard (a wait that ignored its deadline would poll on forever), generous for a loaded
    # machine; how many polls fit in 0.3 s depends on the machine, what each waited for does not.
    assert anyio.current_time() - started < 5.0
    assert caught.value.last_status == "IN_PROGRESS"
    # 0.01, 0.02, 0.04, 0.08, 0.08 ... (20 % jitter): far fewer polls than a fixed 10 ms interval.
    nominal = [min(0.01 * 2**n, 0.08) for n in range(len(pauses))]
    assert pauses, "the wait never paused"
    assert all(0.8 * n <= p <= 1.2 * n for p, n in zip(pauses, nominal, strict=True)), pauses
    # One poll after each pause, but the one the deadline cut short (if it did).
    assert len(pauses) - 1 <= len(script.requests) <= len(pauses), (pauses, len(script.requests))
    assert len(script.requests) <= 8


async def test_a_body_that_is_not_a_registration_is_an_error(no_backoff: None) -> None:
    """A 2xx from something that is not MIMS is named, not trusted."""
    script = Script(httpx.Response(200, text="<html>login</html>"))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistryError, match="not a registration"):
            await client.submit(SUBMISSION, idempotency_key="k")


def test_registration_ignores_unknown_fields() -> None:
    """Newer registries may add fields; the client keeps working."""
    assert Registration.model_validate({**registration(), "new_field": 1}).status == "PENDING"


async def test_backoff_has_full_jitter_and_honours_retry_after() -> None:
    """Waits are uniform in [0, bound] with the bound doubling to the cap; Retry-After wins."""
    from async_registrar._mims_client import RETRY_CAP, _Backoff, _Retryable

    hook = _Backoff(initial=0.5, cap=RETRY_CAP, deadline=anyio.current_time() + 100)
    waits = [hook(httpx.ConnectError("refused")) for _ in range(8)]
    bounds = [min(RETRY_CAP, 0.5 * 2**n) for n in range(8)]
    assert all(0 <= w <= b for w, b in zip(waits, bounds, strict=True))
    assert len({round(float(w), 6) for w in waits}) > 1
    busy = httpx.Response(503, headers={"Retry-After": "7"}, request=httpx.Request("GET", ENDPOINT))
    assert hook(_Retryable(busy, 7.0)) == 7.0
    assert hook(ValueError("not transient")) is False


async def test_no_wait_reaches_past_the_deadline() -> None:
    """A Retry-After longer than the time left is not waited on at all: the client gives up at
    once; a shorter one is honoured; with no time left, no retry."""
    from async_registrar._mims_client import RETRY_CAP, _Backoff, _Retryable

    busy = httpx.Response(503, headers={"Retry-After": "20"}, request=httpx.Request("GET", ENDPOINT))
    hook = _Backoff(initial=0.5, cap=RETRY_CAP, deadline=anyio.current_time() + 2)
    assert hook(_Retryable(busy, 20.0)) is False
    assert hook(_Retryable(busy, 1.5)) == 1.5
    assert 0 <= float(hook(httpx.ConnectError("refused"))) <= 2
    spent = _Backoff(initial=0.5, cap=RETRY_CAP, deadline=anyio.current_time() - 0.1)
    assert spent(_Retryable(busy, 20.0)) is False
    assert spent(httpx.ReadError("reset")) is False


async def test_a_retry_after_past_the_deadline_gives_up_at_once_with_the_last_answer() -> None:
    """Deadline 2 s, `Retry-After: 20`: RegistryUnavailable naming the 503 well within 2.5 s (it
    used to sleep the 20 s)."""
    script = Script(httpx.Response(503, headers={"Retry-After": "20"}, json={"message": "busy"}))
    client, http = script.client(SETTINGS.model_copy(update={"submit_timeout": 2.0}))
    started = time.monotonic()
    async with http:
        with pytest.raises(RegistryUnavailable, match="kept answering 503"):
            await client.submit(SUBMISSION, idempotency_key="k")
    assert time.monotonic() - started < 2.5
    assert len(script.requests) == 1


async def test_a_poll_asking_for_more_than_the_wait_has_left_is_a_wait_timeout() -> None:
    """While waiting, a 503 with a Retry-After past the wait's deadline ends the wait as a timeout
    (exit 6, the registration may go on), at once, not as an error of its own."""
    script = Script(httpx.Response(503, headers={"Retry-After": "30"}, json={"message": "busy"}))
    client, http = script.client()
    started = time.monotonic()
    async with http:
        with pytest.raises(RegistrationTimeout, match="503"):
            await client.wait("reg-1", max_wait=2)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "fault",
    [
        httpx.ReadError("reset"),
        httpx.WriteError("broken pipe"),
        httpx.WriteTimeout("slow"),
        httpx.PoolTimeout("pool"),
        httpx.ConnectError("[Errno -2] Name or service not known"),
        httpx.RemoteProtocolError("closed"),
        httpx.ProxyError("proxy"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_every_transport_error_is_retried_for_a_post(fault: Exception, no_backoff: None) -> None:
    """The POST carries an Idempotency-Key, so any transport failure is retried with the same key."""
    script = Script(fault, httpx.Response(202, json=registration()))
    client, http = script.client()
    async with http:
        answer = await client.submit(SUBMISSION, idempotency_key="k")
    assert answer.registration_id == "reg-1"
    assert [r.headers["Idempotency-Key"] for r in script.requests] == ["k", "k"]


async def test_polls_start_soon_and_double_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first poll comes about `poll_initial` after the call; then the pauses double to the cap,
    each within 20 % of its nominal value."""
    pauses: list[float] = []
    real_sleep = anyio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(anyio, "sleep", sleep)
    script = Script(
        *[httpx.Response(200, json=registration("IN_PROGRESS"))] * 6,
        httpx.Response(200, json=registration("SUCCEEDED")),
    )
    client, http = script.client(SETTINGS.model_copy(update={"poll_initial": 0.25, "poll_max": 2.0}))
    async with http:
        await client.wait("reg-1", max_wait=60)
    nominal = [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert len(pauses) == len(nominal)
    assert all(0.8 * n <= p <= 1.2 * n for p, n in zip(pauses, nominal, strict=True))
    assert len(set(pauses)) > 3  # jittered, not the nominal values


async def test_the_probe_takes_a_404_as_proof() -> None:
    """A signed GET of an id that cannot exist: 404 is the answer that proves endpoint and signature."""
    script = Script(httpx.Response(404, json={"message": "no registration"}))
    client, http = script.client()
    async with http:
        await client.probe(region="us-west-2", within=5)
    (request,) = script.requests
    assert request.method == "GET"
    assert request.url.path.startswith("/v1/registrations/preflight-")
    assert "Signature=" in request.headers["authorization"]


@pytest.mark.parametrize(
    "page",
    [
        httpx.Response(404, text="Not Found"),
        httpx.Response(404, html="<html><body>404 Not Found</body></html>"),
        httpx.Response(404, json={"detail": "Not Found"}),
    ],
)
async def test_the_probe_does_not_take_a_web_servers_own_404_for_a_registrys(page: httpx.Response) -> None:
    """A path with a typo on a registry's host (or any web server) answers 404 to everything: only
    a 404 with the contract's error body proves a registry; otherwise a whole upload would go before
    the POST found out."""
    script = Script(page)
    client, http = script.client()
    async with http:
        with pytest.raises(RegistrationRejected, match=r"without a MIMS error body.*base URL"):
            await client.probe(region="us-west-2", within=5)


@pytest.mark.parametrize("status", [401, 403])
async def test_the_probe_names_what_to_check_when_the_signature_is_refused(status: int, no_backoff: None) -> None:
    script = Script(httpx.Response(status, json={"message": "unknown access key"}))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistrationRejected) as caught:
            await client.probe(region="us-west-2", within=5)
    message = caught.value.message
    assert f"refused our signed request ({status}: unknown access key)" in message
    assert "AWS credentials" in message
    assert "'us-west-2' (model_registration_region)" in message
    assert "REGISTRAR_MIMS_SERVICE_NAME, now 'mims'" in message
    assert len(script.requests) == 1


@pytest.mark.parametrize("status", [200, 400, 405])
async def test_the_probe_refuses_an_endpoint_that_is_not_a_registry(status: int, no_backoff: None) -> None:
    script = Script(httpx.Response(status, text="<html>hello</html>"))
    client, http = script.client()
    async with http:
        with pytest.raises(RegistrationRejected, match=f"answered {status}, where a MIMS registry answers 404"):
            await client.probe(region="us-west-2", within=5)


async def test_the_probe_retries_transient_failures_within_its_bound() -> None:
    """Refused, then 503, then 404: passes.  Refused throughout: RegistryUnavailable naming the
    endpoint and the last failure, after `within` seconds, not later."""
    script = Script(httpx.ConnectError("refused"), httpx.Response(503), httpx.Response(404, json={"message": "no"}))
    client, http = script.client()
    async with http:
        await client.probe(region="us-west-2", within=5)
    assert len(script.requests) == 3

    refused = Script(httpx.ConnectError("[Errno 111] Connection refused"))
    client, http = refused.client()
    started = time.monotonic()
    async with http:
        with pytest.raises(
            RegistryUnavailable, match=r"https://mims.test did not answer within the preflight's 1 s"
        ) as caught:
            await client.probe(region="us-west-2", within=1)
    assert time.monotonic() - started < 1.5
    assert "ConnectError: [Errno 111] Connection refused" in caught.value.message
    assert len(refused.requests) > 1


async def test_the_probe_does_not_wait_past_its_bound_for_an_answer() -> None:
    """An endpoint that accepts the connection and never answers: cut at `within`."""

    async def never(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)
        raise AssertionError("unreachable")

    http = httpx.AsyncClient(transport=httpx.MockTransport(never))
    client = MimsClient(http, ENDPOINT, SETTINGS, auth=None)
    started = time.monotonic()
    async with http:
        with pytest.raises(RegistryUnavailable, match="an attempt was still waiting for its answer"):
            await client.probe(region="us-west-2", within=0.5)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "fault",
    [httpx.ReadError("connection reset"), httpx.WriteError("broken pipe"), httpx.PoolTimeout("pool")],
    ids=["read-reset", "write-error", "pool-timeout"],
)
async def test_a_poll_that_fails_once_is_retried(fault: Exception, no_backoff: None) -> None:
    """One connection reset (as load balancers do) or another transient failure does not end the wait."""
    script = Script(fault, httpx.Response(200, json=registration("SUCCEEDED")))
    client, http = script.client()
    async with http:
        final = await client.wait("reg-1", max_wait=5)
    assert final.status == "SUCCEEDED"
    assert len(script.requests) == 2


async def test_polls_failing_until_the_deadline_are_a_wait_timeout() -> None:
    """A registry unreachable for the whole wait: RegistrationTimeout (exit 6) that says so, on time."""
    script = Script(httpx.ConnectError("refused"))
    client, http = script.client()
    started = anyio.current_time()
    async with http:
        with pytest.raises(RegistrationTimeout, match="the registry stayed unreachable until then") as caught:
            await client.wait("reg-1", max_wait=0.5)
    assert anyio.current_time() - started < 1.5
    assert caught.value.registration_id == "reg-1"
    assert len(script.requests) > 1


async def test_a_reused_key_names_the_registration_that_holds_it(no_backoff: None) -> None:
    """409 is an IdempotencyConflict that carries the holder's registration id; not retried."""
    from async_registrar import IdempotencyConflict

    script = Script(httpx.Response(409, json={"message": "key used", "errors": [], "registration_id": "reg-9"}))
    client, http = script.client()
    async with http:
        with pytest.raises(IdempotencyConflict, match="409: key used") as caught:
            await client.submit(SUBMISSION, idempotency_key="k")
    assert caught.value.holder == "reg-9"
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("answers", "arrived"),
    [
        ([httpx.ConnectError("refused")], False),
        ([httpx.Response(503, json={"message": "busy"})], False),
        ([httpx.ReadTimeout("no answer"), httpx.ConnectError("refused")], True),
        ([httpx.Response(502, json={"message": "bad gateway"}), httpx.ConnectError("refused")], True),
    ],
    ids=["refused", "503", "read-timeout-then-refused", "502-then-refused"],
)
async def test_an_unavailable_registry_says_whether_the_post_may_have_arrived(
    answers: list[Any], arrived: bool, no_backoff: None
) -> None:
    """Only a request that may have reached the registry unanswered can have registered something."""
    script = Script(*answers)
    client, http = script.client()
    async with http:
        with pytest.raises(RegistryUnavailable) as caught:
            await client.submit(SUBMISSION, idempotency_key="k")
    assert caught.value.may_have_arrived is arrived


async def test_each_retry_is_one_log_line_with_the_url_the_reason_and_the_next_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.Response(503, headers={"Retry-After": "0.01"}),
        httpx.Response(202, json=registration()),
    )
    client, http = script.client()
    with caplog.at_level(logging.INFO, logger="async_registrar.mims"):
        async with http:
            await client.submit(SUBMISSION, idempotency_key="k")
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2
    assert retries[0].startswith(
        "POST https://mims.test/v1/registrations: ConnectError: [Errno 111] Connection refused;"
    )
    assert retries[0].endswith("(attempt 2)")
    assert (
        retries[1] == "POST https://mims.test/v1/registrations: 503 Service Unavailable; retrying in 0.01 s (attempt 3)"
    )


async def test_giving_up_on_a_long_retry_after_says_so() -> None:
    """The early give-up names the Retry-After that reached past the deadline, not a deadline it never
    reached."""
    script = Script(httpx.Response(503, headers={"Retry-After": "20"}, json={"message": "busy"}))
    client, http = script.client(SETTINGS.model_copy(update={"submit_timeout": 2.0}))
    async with http:
        with pytest.raises(RegistryUnavailable, match=r"asked to be retried in 20 s, past the deadline \(2 s\)"):
            await client.submit(SUBMISSION, idempotency_key="k")
    polls = Script(httpx.Response(503, headers={"Retry-After": "30"}, json={"message": "busy"}))
    client, http = polls.client()
    async with http:
        with pytest.raises(RegistrationTimeout, match=r"retry asked for in 30 s, past the deadline"):
            await client.wait("reg-1", max_wait=2)
