"""AWS Signature Version 4 for httpx requests, and its verification.

The client signs every attempt afresh (retries happen above the auth, so each
one gets a new date and signature) with credentials fetched per request, which
keeps refreshable credentials fresh.  The reference service uses `verify` to
check a request the way the real registry's IAM front door would.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass

import httpx
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials

__all__ = ["AuthorizationHeader", "SigV4", "sign_request", "verify_request"]

#: The headers signed besides the ones botocore adds (host, x-amz-date, x-amz-security-token).
_SIGNED = ("content-type", "idempotency-key")

CredentialsProvider = Callable[[], Awaitable[ReadOnlyCredentials]]


class SigV4(httpx.Auth):
    """An httpx auth that signs each request with SigV4 for `service` in `region`."""

    requires_request_body = True

    def __init__(self, credentials: CredentialsProvider, *, region: str, service: str) -> None:
        self._credentials = credentials
        self._region = region
        self._service = service

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("SigV4 signs asynchronous requests only; use httpx.AsyncClient")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        sign_request(request, await self._credentials(), region=self._region, service=self._service)
        yield request


def sign_request(request: httpx.Request, credentials: ReadOnlyCredentials, *, region: str, service: str) -> None:
    """Add the SigV4 headers to `request` (its body must have been read)."""
    headers = {name: request.headers[name] for name in _SIGNED if name in request.headers}
    aws = AWSRequest(method=request.method, url=str(request.url), data=request.content, headers=headers)
    SigV4Auth(Credentials(credentials.access_key, credentials.secret_key, credentials.token), service, region).add_auth(
        aws
    )
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
        if name in aws.headers:
            request.headers[name] = aws.headers[name]


_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[A-Za-z0-9]{1,128})/(?P<date>\d{8})/(?P<region>[a-z0-9-]{1,32})/"
    r"(?P<service>[a-z0-9-]{1,64})/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9-]+(;[a-z0-9-]+)*), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass(frozen=True, slots=True)
class AuthorizationHeader:
    """The parts of a SigV4 `Authorization` header."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @classmethod
    def parse(cls, value: str) -> AuthorizationHeader | None:
        """The parsed header, or None if it is not a well-formed SigV4 header."""
        match = _AUTHORIZATION.fullmatch(value.strip())
        if not match:
            return None
        return cls(
            match["key"],
            match["date"],
            match["region"],
            match["service"],
            tuple(match["signed"].split(";")),
            match["signature"],
        )


def verify_request(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    service: str,
    secrets: Mapping[str, str] | None,
    max_skew: dt.timedelta = dt.timedelta(minutes=15),
    now: dt.datetime | None = None,
    signed_if_present: tuple[str, ...] = ("idempotency-key",),
) -> str | None:
    """Check a request's SigV4 signature; return what is wrong, or None if it is good.

    Without `secrets` (access key id -> secret key) only the form is checked: a
    well-formed header for `service`, signing host and x-amz-date, dated recently, covering
    the headers of `signed_if_present` the request has; an `x-amz-content-sha256` header must
    be the body's sha256 (no `UNSIGNED-PAYLOAD`: the signature covers it instead of the body).
    """
    header = AuthorizationHeader.parse(headers.get("authorization", ""))
    if header is None:
        return "missing or malformed SigV4 Authorization header"
    if header.service != service:
        return f"signed for service {header.service!r}, expected {service!r}"
    if not {"host", "x-amz-date"} <= set(header.signed_headers):
        return "the signature must cover the host and x-amz-date headers"
    unsigned = [name for name in signed_if_present if name in headers and name not in header.signed_headers]
    if unsigned:
        names = ", ".join(unsigned)
        return f"the signature must cover the {names} header (a captured request could be replayed under another)"
    claimed = headers.get("x-amz-content-sha256")
    if claimed is not None and claimed != hashlib.sha256(body).hexdigest():
        if claimed.upper().startswith(("UNSIGNED-PAYLOAD", "STREAMING-")):
            return "unsigned payloads are not accepted: sign the body (x-amz-content-sha256 must be its sha256)"
        return "the x-amz-content-sha256 header is not the body's sha256"
    amz_date = headers.get("x-amz-date", "")
    try:
        when = dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
    except ValueError:
        return "missing or malformed X-Amz-Date header"
    if not amz_date.startswith(header.date):
        return "X-Amz-Date does not match the credential scope's date"
    current = now or dt.datetime.now(dt.UTC)
    if abs(current - when) > max_skew:
        return "the request is too old or dated in the future (check the clock)"
    if secrets is None:
        return None
    secret = secrets.get(header.access_key)
    if secret is None:
        return "unknown access key"
    missing = [h for h in header.signed_headers if h not in headers]
    if missing:
        return f"signed headers are missing from the request: {', '.join(missing)}"
    aws = AWSRequest(method=method, url=url, data=body, headers={h: headers[h] for h in header.signed_headers})
    aws.context["timestamp"] = amz_date
    auth = SigV4Auth(Credentials(header.access_key, secret), header.service, header.region)
    expected = auth.signature(auth.string_to_sign(aws, auth.canonical_request(aws)), aws)
    if not hmac.compare_digest(expected, header.signature):
        return "the signature does not match"
    return None
