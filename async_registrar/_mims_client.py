"""The MIMS client: check the endpoint, submit a registration and wait for it, patiently.

One `httpx.AsyncClient` is shared (created or injected by the registrar); it
never follows redirects, so a signed request is never replayed to another host.
One retry policy covers every request: every transport failure (a refused or
reset connection, a DNS failure, any timeout, a peer that broke the protocol)
and the answers 429, 500, 502, 503 and 504 are retried by stamina with
exponential backoff and full jitter under the request's deadline, honouring
`Retry-After`.  No wait reaches past the deadline: when the server asks for
longer than the time left, the client gives up at once with the last answer.
Every attempt is signed afresh by the auth, and a submission carries the same
`Idempotency-Key` on every attempt, so a POST retried after it reached the
registry never creates a second registration.  While waiting for a
registration, a poll that fails is retried until the wait's own deadline: a
registry that stays unreachable is a wait timeout (the registration may well
go on), never a failure of its own.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import math
import random
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import stamina
from botocore.exceptions import BotoCoreError
from pydantic import ValidationError

from ._credentials import credential_problem, is_credential_failure
from ._errors import (
    IdempotencyConflict,
    RegistrationFailed,
    RegistrationRejected,
    RegistrationTimeout,
    RegistryError,
    RegistryUnavailable,
    redact,
)
from ._mims_contract import (
    IDEMPOTENCY_HEADER,
    REGISTRATIONS_PATH,
    TERMINAL_STATUSES,
    ErrorBody,
    Registration,
    RegistrationSubmission,
)
from ._settings import PROXY_ENVIRONMENT, Settings, http_client_environment

__all__ = ["MimsClient"]

log = logging.getLogger("async_registrar.mims")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
#: The 5xx answers that say the request was not processed: not implemented, unavailable (as
#: 429 is), an HTTP version refused.  Any other 5xx, a gateway's own codes too (a CDN's 520
#: to 524: the origin took the request and did not answer in time), may follow a request
#: the registry processed.
NOT_PROCESSED_5XX = frozenset({501, 503, 505})
#: Failures after the whole request may have reached the server: no answer in time, a broken
#: connection, or an answer whose body could not be decoded (it came, so the request arrived).
_MAYBE_ARRIVED = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError, httpx.DecodingError)


class _NotSigned(httpx.TransportError):
    """A request not sent: the AWS credentials to sign it could not be had (they may come back:
    a container credentials endpoint that failed once), so it is retried as a transport error."""


@dataclass
class Delivery:
    """Whether a request, retried, may have reached the registry: an attempt on its way (its
    answer not in), or one that got no answer or an answer that does not rule it out."""

    in_flight: bool = False
    arrived: bool = False

    @property
    def may_have_arrived(self) -> bool:
        return self.in_flight or self.arrived


def may_have_processed(status: int) -> bool:
    """Whether a request answered `status` (an error) may have been processed all the same."""
    return status >= 500 and status not in NOT_PROCESSED_5XX


#: The longest `Retry-After` honoured; a server asking for more is waited on for this long.
MAX_RETRY_AFTER = 60.0
#: The longest wait between two attempts (without Retry-After).
RETRY_CAP = 10.0
#: How long a registration may be unknown (404) right after its submission.
NOT_FOUND_GRACE = 30.0


class _Retryable(Exception):
    """A transient answer: retried, and reported as `RegistryUnavailable` if it persists."""

    def __init__(self, response: httpx.Response, retry_after: float | None) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase}")
        self.status_code = response.status_code
        self.retry_after = retry_after


#: Every transport failure: timeouts (connect, read, write, pool), network errors (refused,
#: reset, broken pipe, DNS), a peer that broke the protocol (closed without answering), a
#: proxy that failed; and an answer whose body could not be decoded (garbled on its way, a
#: `Content-Encoding` it does not have).  All may pass; a request sent twice is harmless (a
#: submission carries an Idempotency-Key).  The endpoint's scheme is checked by the settings.
_TRANSIENT_FAILURES = (httpx.TransportError, httpx.DecodingError)


class _Backoff:
    """stamina's backoff hook for one request: which failures to retry, and how long to wait.

    Exponential backoff with full jitter (a uniform wait between 0 and the exponential
    bound, which spreads out clients that failed together), unless the server said how
    long in `Retry-After`.  stamina keeps the attempts; no wait reaches past `deadline`
    (on anyio's clock): a failure with no time left to retry, or whose `Retry-After` asks
    for longer than the time left, is given up at once.
    """

    def __init__(self, initial: float, cap: float, deadline: float, *, request: str = "") -> None:
        self._initial = initial
        self._cap = cap
        self._deadline = deadline
        self._failures = 0
        self._request = request
        #: The Retry-After (seconds) that reached past the deadline, if that ended the retries.
        self.asked_past_deadline: float | None = None

    def __call__(self, exc: Exception) -> bool | float:
        if not isinstance(exc, (_Retryable, *_TRANSIENT_FAILURES)):
            return False
        remaining = self._deadline - anyio.current_time()
        if remaining <= 0:
            return False
        self._failures += 1
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            # Waiting less than the server asked for would only earn the same answer.
            if exc.retry_after >= remaining:
                self.asked_past_deadline = exc.retry_after
                return False
            delay = exc.retry_after
        else:
            bound = min(self._cap, self._initial * 2 ** (self._failures - 1))
            delay = min(random.uniform(0, bound), remaining)  # noqa: S311  (jitter, not cryptography)
        if self._request:  # one line per retry, with what failed and when the next attempt goes
            log.info(
                "%s: %s; retrying in %.2f s (attempt %d)",
                self._request,
                _describe_failure(exc),
                delay,
                self._failures + 1,
            )
        return delay


class MimsClient:
    """Talks to one MIMS endpoint over a shared `httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient, endpoint: str, settings: Settings, *, auth: httpx.Auth | None) -> None:
        self._http = http
        self._endpoint = endpoint.rstrip("/")
        self._settings = settings
        self._auth = auth

    @property
    def endpoint(self) -> str:
        """The registry's base URL."""
        return self._endpoint

    async def submit(
        self, submission: RegistrationSubmission, *, idempotency_key: str, delivery: Delivery | None = None
    ) -> Registration:
        """Submit a registration; return the registry's answer once it accepted it.  `delivery`,
        if given, says meanwhile whether a POST may have reached the registry (for a caller
        cancelled before an answer: its artifacts are kept only then)."""
        url = self._endpoint + REGISTRATIONS_PATH
        body = submission.model_dump_json(exclude_none=False).encode()
        headers = {"content-type": "application/json", IDEMPOTENCY_HEADER: idempotency_key}
        response = await self._request(
            "POST", url, content=body, headers=headers, deadline=self._settings.submit_timeout, delivery=delivery
        )
        try:
            registration = self._parse(response, url)
        except RegistryError as exc:
            # A 2xx whose body we cannot read is an acceptance all the same: the registry
            # reads the artifacts from now on, so they must be kept (and the key re-sent).
            exc.may_have_arrived = True
            raise
        log.info("registration %s submitted (model id %s)", registration.registration_id, registration.model_id)
        return registration

    async def get(
        self, registration_id: str, *, deadline: float, failures: list[str] | None = None
    ) -> Registration | None:
        """The registration's current state, or None if the registry does not know it (yet).

        Each failed attempt is described in `failures`, if given.  `deadline` (seconds) bounds
        the retries."""
        if registration_id in ("", ".", ".."):  # a path segment the URL would lose: another URL asked
            raise RegistryError(f"{registration_id!r} is not a registration id; nothing asked of the registry")
        url = f"{self._endpoint}{REGISTRATIONS_PATH}/{urllib.parse.quote(registration_id, safe='')}"
        response = await self._request("GET", url, deadline=deadline, allow_not_found=True, failures=failures)
        if response.status_code == 404:
            if not _is_error_body(response):  # a web server's or an ingress's page: not the registry's word
                raise RegistryError(
                    f'{redact(url)} answered 404 without a MIMS error body (a JSON object with a "message"): '
                    "not the registry's answer (an ingress or proxy whose service is down?)",
                    url=redact(url),
                )
            return None
        registration = self._parse(response, url)
        if registration.registration_id != registration_id:  # a proxy's or a cache's mix-up
            raise RegistryError(
                f"{redact(url)} answered with registration {registration.registration_id}, not the one asked "
                "for; is something between this host and the registry (a cache, a proxy) answering for it?",
                url=redact(url),
            )
        return registration

    async def look_up(
        self, registration_id: str, *, accepted_at: dt.datetime | None, deadline: float
    ) -> Registration | None:
        """The registration's state, or None if the registry does not know it.

        A registry may not know a registration for a short while after accepting it (at
        `accepted_at`, if it did): a 404 is an answer only `NOT_FOUND_GRACE` seconds after that,
        as in `wait`.  `deadline` bounds each request's retries.
        """
        delay = self._settings.poll_initial
        while True:
            current = await self.get(registration_id, deadline=deadline)
            age = (dt.datetime.now(dt.UTC) - accepted_at).total_seconds() if accepted_at else NOT_FOUND_GRACE
            if current is not None or age >= NOT_FOUND_GRACE:
                return current
            await anyio.sleep(min(delay, NOT_FOUND_GRACE - age))
            delay = min(delay * 2, self._settings.poll_max)

    def _unreachable_fix(self) -> str:
        """What to check when the registry did not answer: its endpoint, the network, and the
        proxies httpx sends through (NO_PROXY may exempt the host) when it trusts the environment."""
        fix = "check --mims-endpoint / REGISTRAR_MIMS_ENDPOINT and the network"
        if self._http.trust_env and (proxies := http_client_environment(PROXY_ENVIRONMENT)):
            proxies += http_client_environment(("NO_PROXY", "no_proxy"))
            fix += f", and the proxy the client goes through unless NO_PROXY covers the host ({', '.join(proxies)})"
        return fix

    async def probe(self, *, region: str, within: float) -> None:
        """Prove, before anything is uploaded, that the endpoint is a registry that accepts our
        signature: a signed GET of a registration that cannot exist must answer 404.

        Transport failures and transient answers are retried for at most `within` seconds
        (then `RegistryUnavailable`); a 401 or 403 is `RegistrationRejected` at once, naming
        what to check; any other answer is `RegistrationRejected` too (not a MIMS endpoint).
        """
        registration_id = f"preflight-{secrets.token_hex(12)}"
        url = f"{self._endpoint}{REGISTRATIONS_PATH}/{registration_id}"
        shown = redact(self._endpoint)
        failures: list[str] = []
        with anyio.move_on_after(within) as scope:  # also cuts an attempt still in flight
            try:
                response = await self._request("GET", url, deadline=within, allow_not_found=True, failures=failures)
            except RegistryUnavailable as exc:
                raise RegistryUnavailable(
                    f"the registry at {shown} did not answer within the preflight's {within:g} s "
                    f"({_last(failures)}); {self._unreachable_fix()} "
                    "(REGISTRAR_PREFLIGHT_TIMEOUT sets how long to try)",
                    url=shown,
                ) from exc
            except RegistrationRejected as exc:
                if exc.status_code in (401, 403):
                    raise RegistrationRejected(
                        f"the registry at {shown} refused our signed request ({exc.status_code}: "
                        f"{exc.message.partition(': ')[2] or exc.message}); check the AWS credentials the job runs "
                        f"with, that the registry signs for the region '{region}' (model_registration_region), "
                        f"and its signing name (REGISTRAR_MIMS_SERVICE_NAME, now '{self._settings.mims_service_name}')",
                        url=shown,
                        status_code=exc.status_code,
                        errors=exc.errors,
                    ) from None
                raise _not_a_registry(shown, exc.status_code) from None
        if scope.cancelled_caught:
            raise RegistryUnavailable(
                f"the registry at {shown} did not answer within the preflight's {within:g} s "
                f"({_last(failures) if failures else 'an attempt was still waiting for its answer'}); "
                f"{self._unreachable_fix()} "
                "(REGISTRAR_PREFLIGHT_TIMEOUT sets how long to try)",
                url=shown,
            )
        if response.status_code != 404:
            raise _not_a_registry(shown, response.status_code)
        if not _is_error_body(response):  # any web server answers 404 to a path it does not have
            raise _not_a_registry(shown, 404, 'without a MIMS error body (a JSON object with a "message")')
        log.debug("%s answers and accepts our signature", shown)

    async def wait(
        self,
        registration_id: str,
        *,
        max_wait: float,
        on_status: Callable[[Registration], None] | None = None,
        known: Registration | None = None,
    ) -> Registration:
        """Poll until SUCCEEDED (returned), FAILED (raised) or `max_wait` seconds (raised).

        `known` is the registration as last seen (the submission's answer, say): its status
        counts as the last one, if no poll answers."""
        delay = self._settings.poll_initial
        last: Registration | None = known
        deadline = anyio.current_time() + max_wait
        missing_since: float | None = None
        failures: list[str] = []  # of the polls since the last answer
        with anyio.move_on_after(max_wait):
            while True:
                # The first poll comes soon (registries that finish fast should not cost a
                # second), then the wait doubles, with jitter so that clients spread out.
                await anyio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311  (jitter)
                delay = min(delay * 2, self._settings.poll_max)
                remaining = max(deadline - anyio.current_time(), 0.001)
                try:
                    current = await self.get(registration_id, deadline=remaining, failures=failures)
                except RegistryUnavailable:
                    # Transient failures only (the rest raise otherwise), retried until the time
                    # left ran out or the registry asked for a longer pause than that.
                    break
                failures.clear()
                now = anyio.current_time()
                if current is None:
                    missing_since = missing_since or now
                    if now - missing_since > NOT_FOUND_GRACE:
                        raise RegistrationRejected(
                            f"the registry does not know registration {registration_id} "
                            f"({NOT_FOUND_GRACE:g} s after it accepted it)",
                            url=redact(self._endpoint),
                            status_code=404,
                        )
                else:
                    missing_since = None
                    if last is None or current.status != last.status:
                        log.info("registration %s is %s", registration_id, current.status)
                        if on_status is not None:
                            on_status(current)
                    last = current
                    if current.status in TERMINAL_STATUSES:
                        return self._finish(current)
        why = (
            f"the registry stayed unreachable until then ({len(failures)} failed attempt(s), "
            f"{_last(failures)}); the registration may well go on"
            if failures
            else "raise --wait-timeout / REGISTRAR_WAIT_TIMEOUT, or check the registry"
        )
        raise RegistrationTimeout(
            f"registration {registration_id} did not finish within {max_wait:g} s (last status: "
            f"{last.status if last else 'unknown'}); {why}",
            registration_id=registration_id,
            last_status=last.status if last else None,
            url=redact(self._endpoint),
        )

    def _finish(self, registration: Registration) -> Registration:
        if registration.status == "FAILED":
            reason = registration.failure_reason or "no reason given"
            raise RegistrationFailed(
                f"registration {registration.registration_id} FAILED: {reason}; fix what the registry names "
                "and run again (with the same lineage id, a new registration is made)",
                registration_id=registration.registration_id,
                failure_reason=registration.failure_reason,
                url=redact(self._endpoint),
            )
        return registration

    async def _attempt(self, method: str, url: str, deadline: float, **kwargs: Any) -> httpx.Response:
        """One request, whole answer included, within REGISTRAR_MIMS_REQUEST_TIMEOUT (and not much
        past `deadline`, the caller's, on anyio's clock).  httpx's timeouts bound each read: an
        answer trickled a byte at a time would never end."""
        limit = min(self._settings.mims_request_timeout, max(deadline - anyio.current_time(), 1.0))
        try:
            with anyio.fail_after(limit):
                return await self._http.request(method, url, auth=self._auth, follow_redirects=False, **kwargs)
        except (RuntimeError, ValueError, BotoCoreError) as exc:  # from signing it: the credentials
            if not is_credential_failure(exc):
                raise
            raise _NotSigned(credential_problem(exc).message) from exc
        except TimeoutError:
            # May have reached the registry: taken as a read timeout (a POST's artifacts are kept).
            raise httpx.ReadTimeout(
                f"no whole answer within {limit:g} s (REGISTRAR_MIMS_REQUEST_TIMEOUT is "
                f"{self._settings.mims_request_timeout:g} s)"
            ) from None

    async def _request(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        allow_not_found: bool = False,
        failures: list[str] | None = None,
        delivery: Delivery | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        shown = redact(url)
        ends_at = anyio.current_time() + deadline
        backoff = _Backoff(
            initial=min(0.5, self._settings.poll_initial),
            cap=RETRY_CAP,
            deadline=ends_at,
            request=f"{method} {shown}",
        )
        # Whether some attempt may have reached the registry unanswered; kept in `delivery`, if
        # given, as it goes, for a caller cancelled meanwhile.
        delivery = delivery if delivery is not None else Delivery()
        try:
            # The backoff keeps the deadline (stamina's own timeout would not cap a Retry-After).
            async for attempt in stamina.retry_context(on=backoff, attempts=None, timeout=None):
                with attempt:
                    delivery.in_flight = True  # stays so if cancelled: it may have arrived
                    try:
                        # Never followed, whoever made the client: a signed request (its session
                        # token, its body) goes to the registry's host and no other.
                        try:
                            response = await self._attempt(method, url, ends_at, **kwargs)
                        except RuntimeError as closed:  # httpx: "Cannot send a request, as the client has been closed"
                            if not self._http.is_closed:
                                raise
                            raise RegistryError(
                                f"{method} {shown} was not sent: the HTTP client was closed (by whoever owns it) "
                                "while the registrar still used it; close it only after the registrar",
                                url=shown,
                            ) from closed
                        delivery.in_flight = False
                        delivery.arrived = delivery.arrived or may_have_processed(response.status_code)
                        return self._check(response, shown, allow_not_found=allow_not_found)
                    except Exception as exc:
                        delivery.in_flight = False
                        delivery.arrived = delivery.arrived or isinstance(exc, _MAYBE_ARRIVED)
                        if failures is not None:
                            failures.append(_describe_failure(exc))
                        raise
        except _Retryable as exc:
            until = (
                f"and asked to be retried in {backoff.asked_past_deadline:g} s, past the deadline ({deadline:g} s)"
                if backoff.asked_past_deadline is not None
                else f"until the deadline ({deadline:g} s)"
            )
            if failures is not None and backoff.asked_past_deadline is not None:
                failures.append(f"{exc}, retry asked for in {backoff.asked_past_deadline:g} s, past the deadline")
            raise RegistryUnavailable(
                f"{method} {shown} kept answering {exc} {until}; the registry is throttling or failing, retry later",
                url=shown,
                may_have_arrived=delivery.arrived,
            ) from None
        except _NotSigned as exc:  # never sent: the credentials to sign it could not be had
            raise RegistryUnavailable(
                f"{method} {shown} was not sent until the deadline ({deadline:g} s): {exc}",
                url=shown,
                may_have_arrived=delivery.arrived,
            ) from None
        except _TRANSIENT_FAILURES as exc:
            raise RegistryUnavailable(
                f"{method} {shown} failed: {type(exc).__name__}; check --mims-endpoint / "
                "REGISTRAR_MIMS_ENDPOINT and the network",
                url=shown,
                may_have_arrived=delivery.arrived,
            ) from None
        except RegistryError as exc:  # a definite answer to this attempt, not to the earlier ones
            exc.may_have_arrived = exc.may_have_arrived or delivery.arrived
            raise
        raise AssertionError("unreachable: stamina retries until it returns or raises")

    def _check(self, response: httpx.Response, shown: str, *, allow_not_found: bool) -> httpx.Response:
        status = response.status_code
        if status < 300 or (status == 404 and allow_not_found):
            return response
        if status in RETRYABLE_STATUS:
            raise _Retryable(response, _retry_after(response.headers.get("retry-after")))
        message, errors, holder = _error_details(response)
        if status == 409:
            raise IdempotencyConflict(
                f"{response.request.method} {shown} was rejected with 409: {message}",
                url=shown,
                errors=errors,
                holder=holder,
            )
        hint = ""
        if status == 404 and response.request.method == "POST":  # no registrations at that URL
            hint = (
                "; is --mims-endpoint / REGISTRAR_MIMS_ENDPOINT the registry's base URL (the one "
                f"{REGISTRATIONS_PATH} is under)?"
            )
        raise RegistrationRejected(
            f"{response.request.method} {shown} was rejected with {status}: {message}{hint}",
            url=shown,
            status_code=status,
            errors=errors,
        )

    def _parse(self, response: httpx.Response, url: str) -> Registration:
        try:
            return Registration.model_validate_json(response.content)
        except ValidationError as exc:
            raise RegistryError(
                f"{redact(url)} answered {response.status_code} with a body that is not a registration "
                f"({exc.error_count()} problem(s)); is --mims-endpoint a MIMS endpoint?",
                url=redact(url),
            ) from None


def _describe_failure(exc: Exception) -> str:
    """One failed attempt, for a message: the answer's status, or the exception and its text."""
    if isinstance(exc, _Retryable):
        return str(exc)
    text = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _last(failures: list[str]) -> str:
    return f"the last: {failures[-1]}" if failures else "no attempt finished"


def _not_a_registry(shown: str, status: int | None, how: str = "") -> RegistrationRejected:
    return RegistrationRejected(
        f"GET {shown}{REGISTRATIONS_PATH}/<an id that cannot exist> answered {status}{' ' + how if how else ''}, "
        "where a MIMS registry answers 404 with its error body; is --mims-endpoint / REGISTRAR_MIMS_ENDPOINT "
        "a MIMS endpoint, its base URL (the one /v1/registrations is under)? (REGISTRAR_PREFLIGHT=false skips "
        "this check)",
        url=shown,
        status_code=status,
    )


def _is_error_body(response: httpx.Response) -> bool:
    """Whether `response` carries the contract's error body, a JSON object with a `message`
    string (a web server's own 404 page, text or HTML, does not)."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("message"), str)


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (a number or an HTTP date), capped; None if absent, unreadable,
    not finite, or not in the future."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    # "nan" would sleep forever; 0, a negative number or a date already past (a registry whose
    # clock lags ours) would retry at once, again and again: the backoff's own delay applies.
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def _error_details(response: httpx.Response) -> tuple[str, list[str], str | None]:
    """The message, the problems and (with a 409) the holder of the key, of an error answer."""
    try:
        body = ErrorBody.model_validate_json(response.content)
        return body.message, body.errors, body.registration_id
    except ValidationError:
        text = response.text.strip().replace("\n", " ")
        return (text[:300] or response.reason_phrase), [], None
