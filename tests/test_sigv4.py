"""SigV4: what the client signs, the reference service verifies."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
from botocore.credentials import ReadOnlyCredentials

from async_registrar._sigv4 import AuthorizationHeader, sign_request, verify_request

CREDENTIALS = ReadOnlyCredentials("AKIDEXAMPLE", "secret-example", None)
SECRETS = {"AKIDEXAMPLE": "secret-example"}


def signed(body: bytes = b'{"a": 1}', *, token: str | None = None, service: str = "mims") -> httpx.Request:
    request = httpx.Request(
        "POST",
        "http://127.0.0.1:8080/v1/registrations",
        content=body,
        headers={"content-type": "application/json", "Idempotency-Key": "run-1"},
    )
    credentials = ReadOnlyCredentials(CREDENTIALS.access_key, CREDENTIALS.secret_key, token)
    sign_request(request, credentials, region="us-west-2", service=service)
    return request


def verify(request: httpx.Request, **kwargs: object) -> str | None:
    options: dict[str, object] = {"service": "mims", "secrets": SECRETS, **kwargs}
    return verify_request(
        method=request.method,
        url=str(request.url),
        headers=request.headers,
        body=request.content,
        **options,  # type: ignore[arg-type]
    )


def test_a_signed_request_verifies() -> None:
    """A request signed by the client passes the service's check."""
    request = signed()
    header = AuthorizationHeader.parse(request.headers["authorization"])
    assert header is not None
    assert (header.region, header.service) == ("us-west-2", "mims")
    assert {"host", "x-amz-date", "content-type", "idempotency-key"} <= set(header.signed_headers)
    assert verify(request) is None


def test_session_tokens_are_signed() -> None:
    """Temporary credentials send and sign the security token."""
    request = signed(token="token-123")
    assert request.headers["x-amz-security-token"] == "token-123"
    assert "x-amz-security-token" in request.headers["authorization"]
    assert verify(request) is None


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda r: r.headers.__setitem__("idempotency-key", "run-2"), "does not match"),
        (lambda r: r.headers.__setitem__("authorization", "Bearer x"), "malformed"),
        (lambda r: r.headers.pop("authorization"), "missing or malformed"),
        (lambda r: r.headers.__setitem__("x-amz-date", "yesterday"), "X-Amz-Date"),
    ],
)
def test_tampering_is_caught(tamper: object, problem: str) -> None:
    """A changed signed header, or a broken Authorization or date, is rejected with the reason."""
    request = signed()
    tamper(request)  # type: ignore[operator]
    result = verify(request)
    assert result is not None
    assert problem in result


def test_a_changed_body_or_key_is_caught() -> None:
    """The body is covered by the signature; an unknown key or wrong secret fails."""
    request = signed()
    assert (
        verify_request(
            method="POST",
            url=str(request.url),
            headers=request.headers,
            body=b'{"a": 2}',
            service="mims",
            secrets=SECRETS,
        )
        == "the signature does not match"
    )
    assert verify(request, secrets={"OTHER": "x"}) == "unknown access key"
    assert verify(request, secrets={"AKIDEXAMPLE": "wrong"}) == "the signature does not match"


def test_form_only_without_secrets() -> None:
    """Without configured secrets, a well-formed recent signature for the service is accepted."""
    assert verify(signed(), secrets=None) is None
    assert "service 's3'" in (verify(signed(service="s3"), secrets=None) or "")


def test_old_requests_are_refused() -> None:
    """A signature dated far from now (a replay, or a bad clock) is refused."""
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert "too old" in (verify(signed(), now=later) or "")
