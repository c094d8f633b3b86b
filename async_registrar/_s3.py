"""S3 plumbing: one session, one client, locations, and errors in our own terms."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aioboto3
import botocore
import botocore.auth
import botocore.handlers
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from ._credentials import credential_errors, credential_problem, is_credential_failure
from ._errors import ConfigurationError, InputError, StorageError, redact
from ._lookups import Resolver

__all__ = [
    "S3Client",
    "S3Location",
    "checksums_in_headers",
    "content_md5_where_required",
    "drop_request_checksum",
    "error_code",
    "get_object",
    "load_s3_models",
    "log_failed_attempts",
    "make_session",
    "open_s3_client",
    "refuses_checksum_headers",
    "sign_known_payloads",
    "storage_errors",
    "without_checksum_mode",
]

#: aiobotocore's clients are untyped; this alias marks where one is expected.
S3Client = Any

log = logging.getLogger("async_registrar.s3")

#: Seconds to connect to S3, and to look its name up (see `_lookups.Resolver`).
CONNECT_TIMEOUT = 10


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and key."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """The `s3://bucket/key` form."""
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str, *, what: str = "S3 URI") -> S3Location:
        """Parse `s3://bucket/key`; raise `InputError` naming `what` otherwise."""
        match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)", uri)
        if not match:
            named = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
            if named:  # the form is right: the bucket's name is not one
                raise InputError(
                    f"{what} {uri!r}: {named.group(1)!r} is not an S3 bucket name (3 to 63 lowercase letters, "
                    "digits, dots and hyphens, beginning and ending with a letter or digit)",
                    [uri],
                )
            raise InputError(
                f"{what} {uri!r} is not of the form s3://bucket/key; give one such as s3://my-bucket/models/model.tar.gz",
                [uri],
            )
        return cls(match.group(1), match.group(2))

    @classmethod
    def parse_object(cls, uri: str, *, what: str = "S3 URI") -> S3Location:
        """Parse the `s3://bucket/key` of an object to write: a key ending in `/` names a folder
        (S3 would make an object of that name, which no tool shows as a file): `InputError`."""
        location = cls.parse(uri, what=what)
        if location.key.endswith("/"):
            raise InputError(
                f"{what} {uri!r} ends with '/', a folder; name the object, such as {uri}model.tar.gz",
                [uri],
            )
        return location

    def __str__(self) -> str:
        return self.uri


def make_session(
    access_key_id: SecretStr | None = None,
    secret_access_key: SecretStr | None = None,
    session_token: SecretStr | None = None,
) -> aioboto3.Session:
    """One session for all clients: explicit credentials if given, else the standard AWS chain.

    Make clients from one `aioboto3.Session` only: a second one over the same botocore
    session injects aioboto3's client methods twice and fails.  An unknown `AWS_PROFILE` or an
    AWS config file that cannot be parsed is a `ConfigurationError` (the session reads them).
    """
    session = AioSession()
    # The clients botocore makes for itself (STS for an assumed role or a web identity, SSO) take
    # the session's default config: their host names are looked up on the library's threads too.
    session.set_default_client_config(AioConfig(connector_args={"resolver": Resolver(timeout=CONNECT_TIMEOUT)}))
    if access_key_id and secret_access_key:
        session.set_credentials(
            access_key_id.get_secret_value(),
            secret_access_key.get_secret_value(),
            session_token.get_secret_value() if session_token else None,
        )
    with credential_errors():
        return _Session(botocore_session=session)


def load_s3_models(session: aioboto3.Session) -> None:
    """Load the data files botocore reads to make an S3 client (the service model, its endpoint
    rules, the partitions and defaults) into `session`'s loader, which keeps them: blocking file
    reads and JSON parsing, ~40 ms, for a worker thread.  Made on the event loop without them,
    every S3 client of a new session stalled the loop that long (a service that opens a
    `Registrar` per request); what is left on the loop is a few milliseconds."""
    botocore_session = session._session
    loader = botocore_session.get_component("data_loader")
    loader.load_service_model("s3", "service-2")
    loader.load_service_model("s3", "endpoint-rule-set-1")
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        loader.load_data(name)


class _Session(aioboto3.Session):  # type: ignore[misc]  # aioboto3 has no type hints
    """An `aioboto3.Session` without the S3 transfer and resource methods aioboto3 adds to
    its clients (`upload_fileobj` and the like): this project drives its multipart uploads
    itself (see `_multipart`), and adding them imports s3transfer and multiprocessing, about
    17 ms of every start."""

    def _register_default_handlers(self) -> None:
        pass


@contextlib.asynccontextmanager
async def open_s3_client(
    session: aioboto3.Session,
    *,
    region: str | None,
    endpoint_url: str | None,
    checksums: str = "when_supported",
    pool_size: int = 10,
) -> AsyncIterator[S3Client]:
    """An S3 client, open for the block.

    `checksums="when_required"` sends no checksum header of any kind where S3 does not
    require one (some S3-compatible servers reject them: Backblaze B2 answers 400
    "Unsupported header 'x-amz-checksum-crc32'"); where it does (DeleteObjects, a lifecycle
    configuration), the classic Content-MD5, which those servers take, instead of the CRC32
    header botocore has sent since 1.36.
    """
    config = AioConfig(
        # With per-part checksums that S3 verifies, hashing each body again for the
        # signature is redundant work (botocore already skips it over HTTPS).
        s3={"payload_signing_enabled": checksums != "when_supported"},
        max_pool_connections=pool_size,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=120,
        retries={"mode": "standard", "max_attempts": 5},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
        # No connector_args: the session's default config (`make_session`) supplies them, with
        # the resolver on the library's threads; merged with this one, its own win.
    )
    async with contextlib.AsyncExitStack() as stack:
        # botocore resolves the credentials as it makes the client: a half-set pair of
        # variables fails here, before any request (only the making is mapped, not the block).
        with credential_errors(_profile_of(session)):
            _check_ca_bundle(session)
            client = await stack.enter_async_context(
                session.client(
                    "s3",
                    region_name=region or session.region_name or "us-east-1",
                    endpoint_url=endpoint_url,
                    config=config,
                )
            )
        if checksums == "when_required":
            content_md5_where_required(client)
        checksums_in_headers(client)
        # After botocore's handler, which sits on the bare event name (one on
        # "before-parameter-build.s3.GetObject" would run before it).
        client.meta.events.register_last(
            "before-parameter-build", _checksum_mode_unless_refused, unique_id="async-registrar-mode"
        )
        sign_known_payloads(client)
        log_failed_attempts(client)
        yield client


def _check_ca_bundle(session: aioboto3.Session) -> None:
    """Refuse a CA bundle botocore was given (AWS_CA_BUNDLE, or the profile's `ca_bundle`) that is
    not a file: every request would fail on it, retried until the preflight's deadline, as
    though S3 did not answer (even over http://: the TLS context is made for the session)."""
    bundle = session._session.get_config_variable("ca_bundle")  # botocore's own resolution
    if bundle and not os.path.isfile(bundle):
        raise ConfigurationError(
            f"AWS_CA_BUNDLE (or ca_bundle in the AWS profile) names {bundle}, which is not a file; "
            "point it at the PEM bundle of the CA that signed the S3 endpoint's certificate, or unset it"
        )


#: Set for a GetObject that must not ask for the object's checksum (see `without_checksum_mode`).
_NO_CHECKSUM_MODE: ContextVar[bool] = ContextVar("async_registrar_no_checksum_mode", default=False)


@contextlib.contextmanager
def without_checksum_mode() -> Iterator[None]:
    """The GetObjects of the block (in this task) ask for no checksum: with the default
    `when_supported`, botocore adds `x-amz-checksum-mode: ENABLED` to every GetObject, which a
    server refusing the flexible-checksum headers (Backblaze B2: 400 InvalidArgument) refuses;
    a re-run or a sweep could then read no run manifest, and left the kept runs there."""
    token = _NO_CHECKSUM_MODE.set(True)
    try:
        yield
    finally:
        _NO_CHECKSUM_MODE.reset(token)


async def get_object(s3: S3Client, **params: Any) -> dict[str, Any]:
    """GetObject, asked again without the checksum mode if the server refuses it (B2 answers
    400 InvalidArgument to the `x-amz-checksum-mode` botocore adds with `when_supported`):
    the object is then read unchecked, as `when_required` would read it."""
    try:
        answer: dict[str, Any] = await s3.get_object(**params)
    except ClientError as exc:
        if not refuses_checksum_headers(exc):
            raise
        with without_checksum_mode():
            answer = await s3.get_object(**params)
    return answer


def _checksum_mode_unless_refused(params: dict[str, Any], **_: Any) -> None:
    if _NO_CHECKSUM_MODE.get():
        params.pop("ChecksumMode", None)


def checksums_in_headers(client: S3Client) -> None:
    """Make `client` send the CRC botocore computes itself for a PutObject or an UploadPart (a
    run manifest, a probe object: where no value was given) as an x-amz-checksum-* header, as
    the parts' own CRCs go, not in an aws-chunked trailer, where botocore puts it over HTTPS.
    The capability probe checks the header form only: a server that takes and checks the
    header but refuses the trailer (400 "Unsupported header 'x-amz-trailer'", as S3-compatible
    servers older than the trailers do) was found to check CRCs, and then every registration
    over HTTPS failed at its manifest.  The bodies are small or already in memory, so hashing
    one before it is sent costs nothing.  Registered once per client."""
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(
            f"before-call.s3.{operation}", _checksum_in_header, unique_id=f"async-registrar-checksum-header-{operation}"
        )


def _checksum_in_header(params: dict[str, Any], **_: Any) -> None:
    algorithm = params.get("context", {}).get("checksum", {}).get("request_algorithm")
    if isinstance(algorithm, dict) and algorithm.get("in") == "trailer":
        algorithm["in"] = "header"


#: The signature version of the uploads whose body knows its own sha256 (see `sign_known_payloads`).
KNOWN_PAYLOAD_SIGNER = "async-registrar-s3v4"


def sign_known_payloads(client: S3Client) -> None:
    """Make `client` sign the payload of an upload whose body carries its sha256 already
    (`PartBody.payload_sha256`, computed by the part cutter while the bytes were in the
    cache) with that value, instead of reading the whole part again to hash it (botocore's
    S3 signers always do; the CRT's copies the part into itself first). A body without one
    is signed as botocore would. Registered once per client; adds one signature version to
    botocore's table, changing none."""
    if client.meta.config.signature_version is botocore.UNSIGNED:
        return  # an anonymous client signs nothing
    if KNOWN_PAYLOAD_SIGNER not in botocore.auth.AUTH_TYPE_MAPS:
        botocore.auth.AUTH_TYPE_MAPS[KNOWN_PAYLOAD_SIGNER] = _known_payload_auth(botocore.auth.AUTH_TYPE_MAPS["s3v4"])
    for operation in ("UploadPart", "PutObject"):
        client.meta.events.register(
            f"choose-signer.s3.{operation}", _choose_known_payload_signer, unique_id=f"async-registrar-{operation}"
        )


def _choose_known_payload_signer(signature_version: str, context: dict[str, Any], **kwargs: Any) -> str | None:
    """Where botocore would sign a request with "s3v4", the same signer trusting a body's known
    sha256; presigned URLs and forms (whose signature versions carry a suffix) are left alone."""
    if context.get("is_presign_request"):
        return None
    chosen = botocore.handlers.set_operation_specific_signer(context=context, **kwargs) or signature_version
    return KNOWN_PAYLOAD_SIGNER if chosen == "s3v4" else None


def _known_payload_auth(base: type[Any]) -> type[Any]:
    """`base` (botocore's S3 SigV4 signer, or the CRT's where installed), taking a body's
    `payload_sha256` as its payload hash where it signs the payload."""

    class KnownPayloadS3SigV4Auth(base):  # type: ignore[misc]
        def payload(self, request: Any) -> str:  # botocore's signer
            known = getattr(request.body, "payload_sha256", None)
            if known is None or self._is_streaming_checksum_payload(request):
                return str(super().payload(request))
            return known if self._should_sha256_sign_payload(request) else str(super().payload(request))

        def _get_existing_sha256(self, request: Any) -> str | None:  # the CRT's (it hashes when None)
            return getattr(request.body, "payload_sha256", None)

    return KnownPayloadS3SigV4Auth


def log_failed_attempts(client: S3Client) -> None:
    """A WARNING for each attempt of a request of `client` that failed and that botocore sends
    again (no answer in time, a broken connection, a 5xx or a throttling answer): the operation,
    the object, the part and the attempt.  botocore retries quietly (5 retries, each waiting up
    to the 120 s read timeout), so without it a stalled or failing server shows only when
    botocore gives up, up to 12 minutes later.  Registered once per client.

    The failure is noted when it happens (`needs-retry`) and said when botocore builds the next
    attempt (`request-created`): the line is written only when botocore did decide to retry,
    whatever its rules and its retry quota say.  A failure it does not retry is raised, and
    the last allowed attempt is said at once ("no attempts left")."""
    retries = client.meta.config.retries or {}
    attempts = retries.get("total_max_attempts") or retries.get("max_attempts")
    client.meta.events.register(
        "needs-retry.s3",
        functools.partial(_note_failed_attempt, most=attempts),
        unique_id="async-registrar-failed-attempts",
    )
    client.meta.events.register(
        "request-created.s3",
        functools.partial(_say_retried_attempt, most=attempts),
        unique_id="async-registrar-retried-attempts",
    )


#: Where the last failed attempt of a request waits to be said (in botocore's per-call context).
_FAILED_ATTEMPT = "async_registrar_failed_attempt"


@dataclass(frozen=True, slots=True)
class _FailedAttempt:
    operation: str
    where: str
    part: Any
    attempt: int
    problem: str

    def say(self, most: int | None, outcome: str) -> None:
        fields = {
            "event": "s3_attempt_failed",
            "operation": self.operation,
            "part": self.part,
            "attempt": self.attempt,
            "attempts": most,
        }
        log.warning(
            "S3 %s %s%s: attempt %d%s failed: %s; %s",
            self.operation,
            self.where,
            f" (part {self.part})" if self.part else "",
            self.attempt,
            f" of {most}" if most else "",
            redact(self.problem),
            outcome,
            extra={"fields": {k: v for k, v in fields.items() if v is not None}},
        )


def _note_failed_attempt(
    *,
    most: int | None,
    response: Any,
    operation: Any,
    attempts: int,
    caught_exception: BaseException | None,
    request_dict: dict[str, Any],
    **_: Any,
) -> None:
    """A `needs-retry` handler that decides nothing (it returns None): it notes what failed."""
    if caught_exception is not None:
        problem = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None:
        http, parsed = response
        status = int(getattr(http, "status_code", 0) or 0)
        code = str(parsed.get("Error", {}).get("Code", "")) if isinstance(parsed, dict) else ""
        if status < 500 and status != 429 and code not in _TRANSIENT_CODES:
            return  # an answer: a success, or a refusal raised as it is
        problem = f"{status} {code}".strip()
    else:
        return
    failed = _FailedAttempt(
        operation=getattr(operation, "name", "request"),
        where=str(request_dict.get("url", "")).split("?", 1)[0],
        part=(request_dict.get("query_string") or {}).get("partNumber"),
        attempt=attempts,
        problem=problem,
    )
    if most and attempts >= most:
        failed.say(most, "no attempts left")
    else:
        request_dict.setdefault("context", {})[_FAILED_ATTEMPT] = failed


def _say_retried_attempt(*, most: int | None, request: Any, **_: Any) -> None:
    """A `request-created` handler: botocore is sending a request again; say why."""
    context = getattr(request, "context", None)
    failed = context.pop(_FAILED_ATTEMPT, None) if isinstance(context, dict) else None
    if failed is not None:
        failed.say(most, f"sending it again (attempt {failed.attempt + 1})")


#: Error codes botocore's standard retry mode retries although their status is below 500
#: (noted as failures; whether botocore retries them is its own decision).
_TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException"})


def content_md5_where_required(client: S3Client) -> None:
    """Make `client` send Content-MD5, not an x-amz-checksum-* header, where S3 requires a
    checksum (registered once per client)."""
    for operation in _CHECKSUM_REQUIRED:
        client.meta.events.register(
            f"before-call.s3.{operation}", _content_md5_instead, unique_id=f"async-registrar-content-md5-{operation}"
        )


#: The operations S3 refuses without a checksum of the body (of those this project calls).
_CHECKSUM_REQUIRED = ("DeleteObjects", "PutBucketLifecycleConfiguration")


def drop_request_checksum(params: dict[str, Any]) -> None:
    """Undo botocore's choice of a request checksum for a request (a `before-call` handler's
    `params`; botocore chose it just before)."""
    checksum = params.get("context", {}).get("checksum", {})
    checksum.pop("request_algorithm", None)
    checksum.pop("request_algorithm_header", None)


def _content_md5_instead(params: dict[str, Any], **_: Any) -> None:
    """Send Content-MD5, not an x-amz-checksum-* header, with an operation that requires a
    checksum (botocore would add its CRC32; the body is a small XML document)."""
    drop_request_checksum(params)
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode()
    digest = hashlib.md5(body).digest()  # noqa: S324 (S3's Content-MD5, not security)
    params["headers"]["Content-MD5"] = base64.b64encode(digest).decode()


_HINTS = {
    "AccessDenied": "check that the job's role may read and write there",
    "AllAccessDisabled": "check that the job's role may read and write there",
    "NoSuchBucket": "create the bucket or fix --bucket / REGISTRAR_S3_BUCKET",
    "InvalidAccessKeyId": "check the AWS credentials the job runs with",
    "SignatureDoesNotMatch": "check the AWS credentials the job runs with",
    "ExpiredToken": "refresh the AWS credentials the job runs with",
    "SlowDown": "S3 is throttling; retry later or lower REGISTRAR_UPLOAD_CONCURRENCY",
}


#: The IAM permission each S3 operation needs, for the message when it is denied.
_PERMISSIONS = {
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListObjectsV2": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
}


#: Error codes with which servers refuse a header they do not know.
_HEADER_CODES = ("InvalidArgument", "NotImplemented", "InvalidRequest", "XAmzContentSHA256Mismatch", "BadRequest")


def _about_checksums(code: str, detail: str) -> bool:
    """Whether an error is a server refusing the checksum headers (Backblaze B2 answers 400
    InvalidArgument "Unsupported header 'x-amz-checksum-crc32'"; others NotImplemented)."""
    text = detail.lower()
    if code == "XAmzContentSHA256Mismatch":
        return True
    return code in _HEADER_CODES and ("checksum" in text or "trailer" in text)


def refuses_checksum_headers(exc: ClientError) -> bool:
    """Whether `exc` is a server refusing S3's checksum headers (see `_about_checksums`)."""
    return _about_checksums(error_code(exc), str(exc.response.get("Error", {}).get("Message") or ""))


def error_code(exc: ClientError) -> str:
    """S3's error code of a botocore `ClientError` (its HTTP status when there is none, as for HEAD)."""
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))


@contextlib.contextmanager
def storage_errors(operation: str, bucket: str, key: str | None = None) -> Iterator[None]:
    """Turn botocore's exceptions raised inside the block into a `StorageError`."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        detail = redact(str(exc.response.get("Error", {}).get("Message") or ""))
        hint = _HINTS.get(code, "see the S3 error code")
        if refuses_checksum_headers(exc):
            hint = (
                "the server does not take S3's checksum headers: set REGISTRAR_S3_CHECKSUMS=when_required "
                "(no checksum header is then sent; see the README's 'Tested S3 servers')"
            )
        elif code in ("AccessDenied", "403") and operation in _PERMISSIONS:
            hint = f"the job's role needs {_PERMISSIONS[operation]} on {where} (see docs/containers.md)"
        raise StorageError(
            f"S3 {operation} failed for {where}: {code}{f' ({detail})' if detail else ''}; {hint}",
            operation=operation,
            bucket=bucket,
            key=key,
            code=code,
        ) from exc
    except (RuntimeError, json.JSONDecodeError, BotoCoreError) as exc:  # aiobotocore's, refreshing the credentials
        if not is_credential_failure(exc):
            if isinstance(exc, BotoCoreError):
                raise _botocore_failure(exc, operation, bucket, key, where) from exc
            raise
        raise StorageError(
            f"S3 {operation} failed for {where}: {credential_problem(exc).message}",
            operation=operation,
            bucket=bucket,
            key=key,
            code=type(exc).__name__ if isinstance(exc, BotoCoreError) else "Credentials",
        ) from exc


def _botocore_failure(exc: BotoCoreError, operation: str, bucket: str, key: str | None, where: str) -> StorageError:
    return StorageError(
        f"S3 {operation} failed for {where}: {type(exc).__name__}: {redact(str(exc))}",
        operation=operation,
        bucket=bucket,
        key=key,
        code=type(exc).__name__,
    )


def _profile_of(session: aioboto3.Session) -> str | None:
    """The profile `session` uses, if one is named (for messages)."""
    try:
        return session.profile_name if session.available_profiles else None
    except Exception:  # a config file botocore cannot read: the client's making says so
        return None
