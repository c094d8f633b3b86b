"""The reference MIMS service: a real implementation of the contract, as an ASGI app.

It keeps registrations in memory, processes each in a task of the app's task
group (see `_processing`), and can be told to misbehave (see the fault knobs of
`ReferenceMimsSettings`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from botocore.exceptions import ClientError
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._config import describe_validation_errors
from .._errors import StorageError
from .._mims_contract import (
    IDEMPOTENCY_HEADER,
    REGISTRATIONS_PATH,
    Registration,
    RegistrationSubmission,
    unsafe_key,
)
from .._s3 import S3Client, S3Location, make_session, open_s3_client, storage_errors
from .._sigv4 import AuthorizationHeader, verify_request
from ._openapi import openapi_document
from ._processing import ArtifactProblem, copy_object, verify_artifact
from ._settings import ReferenceMimsSettings

__all__ = ["create_app"]

log = logging.getLogger("async_registrar.reference_mims")


@dataclass
class _Record:
    registration: Registration
    submission: RegistrationSubmission
    body_hash: str
    registry_uris: dict[str, str] = field(default_factory=dict)


@dataclass
class _State:
    settings: ReferenceMimsSettings
    s3: S3Client | None = None
    tasks: anyio.abc.TaskGroup | None = None
    records: dict[str, _Record] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    submissions_seen: int = 0
    accepted: int = 0
    polls_seen: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    #: Set (from any thread) to end every processing delay at once: see
    #: `ThreadedMimsServer.finish_processing`.
    released: threading.Event = field(default_factory=threading.Event)


def create_app(settings: ReferenceMimsSettings, *, s3_client: S3Client | None = None) -> Starlette:
    """The ASGI app.  It opens its own S3 client unless `s3_client` is given."""
    state = _State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if s3_client is not None:
                state.s3 = s3_client
            else:
                session = make_session(settings.aws_access_key_id, settings.aws_secret_access_key)
                state.s3 = await stack.enter_async_context(
                    open_s3_client(session, region=settings.aws_region, endpoint_url=settings.s3_endpoint_url)
                )
            await _ensure_bucket(state.s3, settings.registry_bucket, settings.aws_region)
            if settings.allowed_buckets is None:
                log.warning(
                    "MIMS_ALLOWED_BUCKETS is not set: artifacts are read from any bucket this service's "
                    "credentials can read; set it to the registrars' temporary bucket(s)"
                )
            async with anyio.create_task_group() as tasks:
                state.tasks = tasks
                yield
                tasks.cancel_scope.cancel()

    async def submit(request: Request) -> Response:
        async with state.lock:
            state.submissions_seen += 1
            failing = state.submissions_seen <= settings.fail_submissions
        if failing:
            return _error(503, "the registry is busy (injected fault); retry later", retry_after=settings.retry_after)
        body = await _read_body(request, settings.max_body_bytes)
        if body is None:
            return _error(413, f"the body is larger than {settings.max_body_bytes} bytes")
        denied = _authenticate(request, body, settings)
        if denied:
            return denied
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if not key or len(key) > 256:
            return _error(400, f"the {IDEMPOTENCY_HEADER} header is required (at most 256 characters)")
        try:
            data = _parse_json(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return _error(400, f"the body is not acceptable JSON: {exc}")
        if not isinstance(data, dict):
            return _error(400, "the body must be a JSON object")
        if isinstance(data.get("model_registration_region"), list):
            return _error(
                400,
                "model_registration_region must be one region name (a string): a registration is in one "
                "region; submit one registration per region",
                ["model_registration_region: must be a string such as 'us-west-2', got a list"],
            )
        try:
            submission = RegistrationSubmission.model_validate(data)
        except ValidationError as exc:
            problems = describe_validation_errors(exc, known=list(RegistrationSubmission.model_fields), data=data)
            return _error(422, "the registration is invalid", problems)
        wrong_scope = _scope_problem(request, submission.model_registration_region)
        if wrong_scope:
            return _error(403, f"request signature rejected: {wrong_scope}")
        bad_keys = [
            f"{name}.s3_uri: {ref.s3_uri}: a key with an empty, '.' or '..' segment"
            for name, ref in (
                ("model_artifact", submission.model_artifact),
                ("payload_artifact", submission.payload_artifact),
            )
            if ref is not None and _unsafe_key(ref.s3_uri)
        ]
        if bad_keys:
            return _error(400, "an artifact's key is not a plain S3 key", bad_keys)
        if settings.allowed_buckets is not None:
            outside = sorted(
                {
                    ref.s3_uri.split("/")[2]
                    for ref in (submission.model_artifact, submission.payload_artifact)
                    if ref is not None and ref.s3_uri.split("/")[2] not in settings.allowed_buckets
                }
            )
            if outside:
                return _error(
                    403,
                    f"the registry does not read artifacts from bucket(s) {', '.join(outside)} (it reads from "
                    f"{', '.join(settings.allowed_buckets) or 'none'}: MIMS_ALLOWED_BUCKETS)",
                )
        if submission.model_registration_region in settings.reject_regions:
            region = submission.model_registration_region
            return _error(
                422,
                f"registrations in {region} are not accepted (injected fault)",
                [f"model_registration_region: {region} is not accepted here"],
            )
        body_hash = hashlib.sha256(submission.model_dump_json().encode()).hexdigest()
        async with state.lock:
            existing = state.by_key.get(key)
            if existing is not None:
                record = state.records[existing]
                if record.body_hash != body_hash:
                    return _error(
                        409,
                        f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different registration ({existing})",
                        registration_id=existing,
                    )
                return _json(200, record.registration)
            record = _new_record(submission, body_hash, settings)
            state.records[record.registration.registration_id] = record
            state.by_key[key] = record.registration.registration_id
            state.accepted += 1
            stalling = state.accepted <= settings.stall_submissions
        assert state.tasks is not None
        state.tasks.start_soon(_process, state, record)
        log.info("accepted %s (%s)", record.registration.registration_id, record.registration.model_id)
        if stalling:  # the registration exists; the answer comes too late for the client
            await anyio.sleep(settings.stall_seconds)
        return _json(202, record.registration)

    async def status(request: Request) -> Response:
        async with state.lock:
            state.polls_seen += 1
            throttled = state.polls_seen <= settings.throttle_polls
        if throttled:
            return _error(429, "too many requests (injected fault)", retry_after=settings.retry_after)
        if settings.stall_poll:
            await anyio.sleep(settings.stall_poll)
        body = await _read_body(request, settings.max_body_bytes)
        if body is None:
            return _error(413, f"the body is larger than {settings.max_body_bytes} bytes")
        denied = _authenticate(request, body, settings)
        if denied:
            return denied
        record = state.records.get(request.path_params["registration_id"])
        if record is None:
            return _error(404, f"no registration {request.path_params['registration_id']!r}")
        wrong_scope = _scope_problem(request, record.submission.model_registration_region)
        if wrong_scope:
            return _error(403, f"request signature rejected: {wrong_scope}")
        return _json(200, record.registration, registry_uris=record.registry_uris or None)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return _error(500, "internal error in the reference MIMS service (a bug: see its log)")

    app = Starlette(
        exception_handlers={Exception: internal_error},
        routes=[
            Route(REGISTRATIONS_PATH, submit, methods=["POST"]),
            Route(REGISTRATIONS_PATH + "/{registration_id}", status, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.registry = state  # for tests and demos that inspect what the registry holds
    return app


def _new_record(submission: RegistrationSubmission, body_hash: str, settings: ReferenceMimsSettings) -> _Record:
    registration_id = "reg-" + secrets.token_hex(8)
    region = submission.model_registration_region
    registration = Registration(
        registration_id=registration_id,
        model_id="model-" + secrets.token_hex(4),
        workflow_execution_arn=(
            f"arn:aws:states:{region}:{settings.account_id}:execution:mims-registration-workflow:{registration_id}"
        ),
        status="PENDING",
        model_artifact=submission.model_artifact,
        payload_artifact=submission.payload_artifact,
    )
    return _Record(registration, submission, body_hash)


async def _processing(state: _State) -> None:
    """A registration's processing time: `processing_delay`, or less once `released` is set."""
    with anyio.move_on_after(state.settings.processing_delay):
        # `released` is a threading.Event (set from the test's thread): polled, not awaited.
        while not state.released.is_set():  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def _process(state: _State, record: _Record) -> None:
    """PENDING -> IN_PROGRESS -> (verify, copy) -> SUCCEEDED or FAILED."""
    settings = state.settings
    s3 = state.s3
    registration_id = record.registration.registration_id

    def move(status: str, reason: str | None = None) -> None:
        record.registration = record.registration.model_copy(update={"status": status, "failure_reason": reason})
        log.info("%s is %s%s", registration_id, status, f": {reason}" if reason else "")

    await anyio.sleep(settings.pending_delay)
    move("IN_PROGRESS")
    artifacts = {"model": record.submission.model_artifact}
    if record.submission.payload_artifact is not None:
        artifacts["payload"] = record.submission.payload_artifact
    region = record.submission.model_registration_region
    try:
        if settings.read_artifacts == "at_finish":  # as an asynchronous workflow does: late
            await _processing(state)
        verified = {name: await verify_artifact(s3, ref, name) for name, ref in artifacts.items()}
        if settings.read_artifacts == "on_accept":
            await _processing(state)
        if settings.fail_registrations:
            raise ArtifactProblem(settings.fail_registrations)
        if region in settings.fail_regions:
            raise ArtifactProblem(f"registrations in {region} are failing (injected fault)")
        for name, source in verified.items():
            target = S3Location(settings.registry_bucket, f"models/{record.registration.model_id}/{name}.tar.gz")
            with storage_errors("CopyObject", target.bucket, target.key):
                await copy_object(s3, source, target, artifacts[name].size_bytes)
            record.registry_uris[name] = target.uri
    except ArtifactProblem as exc:
        move("FAILED", str(exc))
        return
    except Exception as exc:  # a registry that breaks says so; it does not die
        log.exception("processing %s failed", registration_id)
        move("FAILED", f"internal error while processing: {type(exc).__name__}: {exc}")
        return
    move("SUCCEEDED")


def _authenticate(request: Request, body: bytes, settings: ReferenceMimsSettings) -> Response | None:
    """None if the request's signature holds; else the answer: 401 without any credentials
    (an Authorization header), 403 with ones that do not hold."""
    if "authorization" not in request.headers:
        answer = _error(
            401, "no Authorization header: sign the request with AWS SigV4 (service 'mims', the registration's region)"
        )
        answer.headers["WWW-Authenticate"] = "AWS4-HMAC-SHA256"
        return answer
    secrets_map = (
        {k: v.get_secret_value() for k, v in settings.signing_secrets.items()}
        if settings.signing_secrets is not None
        else None
    )
    # The path as sent (`%3A` stays `%3A`): the signer canonicalized that one, not the decoded one.
    raw_path = request.scope.get("raw_path")
    url = request.url if raw_path is None else request.url.replace(path=raw_path.decode("latin-1"))
    problem = verify_request(
        method=request.method,
        url=str(url),
        headers=request.headers,
        body=body,
        service=settings.service_name,
        secrets=secrets_map,
    )
    if problem is None:
        return None
    return _error(403, f"request signature rejected: {problem}")


#: Limits on what a JSON body may hold: far above any real registration, far below what
#: could exhaust the parser or the validator.
MAX_INTEGER_DIGITS = 30
MAX_DEPTH = 64


def _parse_json(body: bytes) -> Any:
    """`body` as JSON, refusing (ValueError) integers of more than `MAX_INTEGER_DIGITS` digits,
    nesting deeper than `MAX_DEPTH`, and strings that are not Unicode text (lone surrogates)."""

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
            raise ValueError(f"an integer of more than {MAX_INTEGER_DIGITS} digits")
        return int(text)

    data = json.loads(body, parse_int=integer)
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string that is not Unicode text (a lone surrogate escape)") from None
    return data


def _unsafe_key(uri: str) -> bool:
    """Whether the key of an s3:// URI has an empty, `.` or `..` segment."""
    return unsafe_key(uri.split("/", 3)[3] if uri.count("/") >= 3 else "")


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None as soon as it is known to exceed `limit` bytes (by its
    Content-Length, or while it streams in): a large body is never held in memory."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _scope_problem(request: Request, region: str) -> str | None:
    """What is wrong with the credential scope's region for a registration in `region`."""
    header = AuthorizationHeader.parse(request.headers.get("authorization", ""))
    if header is not None and header.region != region:
        return f"signed for region {header.region!r}, but the registration is in {region!r}"
    return None


def _json(status: int, registration: Registration, **extra: Any) -> Response:
    body = registration.model_dump(mode="json")
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status)


def _error(
    status: int,
    message: str,
    errors: list[str] | None = None,
    *,
    retry_after: float | None = None,
    registration_id: str | None = None,
) -> Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    body: dict[str, Any] = {"message": message, "errors": errors or []}
    if registration_id is not None:
        body["registration_id"] = registration_id
    return JSONResponse(body, status_code=status, headers=headers)


async def _ensure_bucket(s3: S3Client, bucket: str, region: str) -> None:
    try:
        await s3.head_bucket(Bucket=bucket)
    except ClientError:
        location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            with storage_errors("CreateBucket", bucket):
                await s3.create_bucket(Bucket=bucket, **location)
        except StorageError as exc:
            # Another instance starting at the same time created it first.
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            log.info("the registry bucket s3://%s was created meanwhile (%s)", bucket, exc.code)
            return
        log.info("created the registry bucket s3://%s", bucket)
