"""The registrar: whole registrations, from local checks to cleanup.

    validate locally -> upload model and payload concurrently (to every region at once)
    -> submit to MIMS (per region) -> wait until SUCCEEDED / FAILED / timeout
    -> delete the temporary objects

`Registrar` owns (or borrows) its S3 and HTTP clients and shares them across
registrations.  `submit()` returns a `RegistrationHandle` once MIMS accepted the
registration; `wait()` on it for the end.  Each registration's temporary objects
live under prefixes of their own, emptied by `TemporaryPrefix` on every way out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType

import aioboto3
import anyio
import anyio.to_thread
import httpx
from botocore.credentials import ReadOnlyCredentials

from ._artifacts import ArtifactSource, inspect_artifact
from ._concurrency import first_error, run_all
from ._errors import ConfigurationError
from ._metadata import load_performance_metadata
from ._mims_client import MimsClient
from ._mims_contract import ArtifactRef, Registration, RegistrationSubmission
from ._progress import ProgressCallback, ProgressEvent, RegistrationStatusChanged, RegistrationSubmitted
from ._request import RegistrationRequest, run_identity
from ._s3 import S3Client, S3Location, make_session, open_s3_client
from ._settings import Settings
from ._sigv4 import SigV4
from ._temporary import TemporaryPrefix
from ._upload import UploadedArtifact, upload_to_all

__all__ = ["RegionRegistration", "Registrar", "RegistrationHandle", "RegistrationResult"]

log = logging.getLogger("async_registrar")


@dataclass(frozen=True, slots=True)
class RegionRegistration:
    """The registration in one region: what MIMS registered and what was uploaded for it."""

    region: str
    registration_id: str
    model_id: str
    workflow_execution_arn: str
    model_artifact: UploadedArtifact
    payload_artifact: UploadedArtifact | None


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    """A finished registration, one entry per region (usually one).

    The shortcuts (`model_id`, `workflow_execution_arn`, ...) are the first region's.
    """

    registrations: tuple[RegionRegistration, ...]
    #: Seconds spent in each phase: "validate", "upload", "register", "total".
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def registration_id(self) -> str:
        """The (first region's) registration id."""
        return self.registrations[0].registration_id

    @property
    def model_id(self) -> str:
        """The (first region's) model id."""
        return self.registrations[0].model_id

    @property
    def workflow_execution_arn(self) -> str:
        """The (first region's) workflow execution ARN."""
        return self.registrations[0].workflow_execution_arn

    @property
    def model_artifact(self) -> UploadedArtifact:
        """The (first region's) uploaded model archive."""
        return self.registrations[0].model_artifact

    @property
    def payload_artifact(self) -> UploadedArtifact | None:
        """The (first region's) uploaded payload archive, if any."""
        return self.registrations[0].payload_artifact


@dataclass(frozen=True, slots=True)
class _Region:
    """One region's share of a registration in flight."""

    region: str
    s3: S3Client
    temporary: TemporaryPrefix
    mims: MimsClient


class RegistrationHandle:
    """A submitted registration: uploaded, accepted by MIMS, not yet finished.

    `await handle.wait()` waits for the end and removes the temporary objects; until
    then they stay (the registry reads them).  A handle that is never waited for is
    closed (its objects removed) when the registrar exits, or by `aclose()`.
    """

    def __init__(
        self,
        registrar: Registrar,
        regions: list[_Region],
        accepted: list[Registration],
        uploaded: list[dict[str, UploadedArtifact]],
        stack: contextlib.AsyncExitStack,
        timings: dict[str, float],
        started: float,
        emit: ProgressCallback,
    ) -> None:
        self._registrar = registrar
        self._emit = emit
        self._regions = regions
        self.accepted: tuple[Registration, ...] = tuple(accepted)
        self._uploaded = uploaded
        self._stack: contextlib.AsyncExitStack | None = stack
        self._timings = timings
        self._started = started

    async def wait(self) -> RegistrationResult:
        """Wait until every region's registration finished; then remove the temporary objects.

        Raises `RegistrationFailed`, `RegistrationTimeout` or another `RegistrarError` (the
        temporary objects are removed then too).
        """
        if self._stack is None:
            raise RuntimeError("this registration was already waited for or closed")
        settings = self._registrar.settings
        mark = time.monotonic()
        finals: list[Registration | None] = [None] * len(self._regions)

        async def wait_one(index: int) -> None:
            part = self._regions[index]

            def changed(registration: Registration) -> None:
                self._emit(
                    RegistrationStatusChanged(
                        registration.registration_id, registration.status, registration.failure_reason, part.region
                    )
                )

            finals[index] = await part.mims.wait(
                self.accepted[index].registration_id, max_wait=settings.wait_timeout, on_status=changed
            )

        try:
            await run_all(functools.partial(wait_one, index) for index in range(len(self._regions)))
        except BaseException as exc:
            await self._close(exc)
            raise
        await self._close(None)
        self._timings["register"] = self._timings.get("submit", 0.0) + time.monotonic() - mark
        self._timings.pop("submit", None)
        self._timings["total"] = time.monotonic() - self._started
        registrations = []
        for part, accepted, final, uploaded in zip(self._regions, self.accepted, finals, self._uploaded, strict=True):
            assert final is not None
            registrations.append(
                RegionRegistration(
                    region=part.region,
                    registration_id=final.registration_id,
                    model_id=final.model_id or accepted.model_id,
                    workflow_execution_arn=final.workflow_execution_arn or accepted.workflow_execution_arn,
                    model_artifact=uploaded["model"],
                    payload_artifact=uploaded.get("payload"),
                )
            )
        return RegistrationResult(tuple(registrations), dict(self._timings))

    async def aclose(self) -> None:
        """Remove the temporary objects without waiting (the registry may then fail them)."""
        await self._close(None)

    async def _close(self, exc: BaseException | None) -> None:
        stack, self._stack = self._stack, None
        self._registrar._forget(self)
        if stack is not None:
            with anyio.CancelScope(shield=True):
                await stack.__aexit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)


class Registrar:
    """Registers models with MIMS; an async context manager that owns its clients.

    Pass `s3_client` or `http_client` to share clients the caller already has; the
    registrar then leaves them open when it exits (and uses that S3 client for every
    region).  Otherwise it opens one S3 client per region it registers in.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        s3_client: S3Client | None = None,
        http_client: httpx.AsyncClient | None = None,
        session: aioboto3.Session | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.settings = settings
        self._session = session or make_session(
            settings.aws_access_key_id, settings.aws_secret_access_key, settings.aws_session_token
        )
        self._s3: S3Client | None = s3_client
        self._shared_s3 = s3_client is not None
        self._regional_s3: dict[str, S3Client] = {}
        self._client_lock = anyio.Lock()
        self._uploads = anyio.CapacityLimiter(settings.max_parallel_uploads)
        self._http = http_client
        self._on_progress = on_progress
        self._stack: contextlib.AsyncExitStack | None = None
        self._handles: set[RegistrationHandle] = set()
        self._entered = False

    async def __aenter__(self) -> Registrar:
        if self._entered:
            raise RuntimeError("a Registrar can be entered only once")
        self._entered = True
        async with contextlib.AsyncExitStack() as stack:
            if self._s3 is None:
                self._s3 = await stack.enter_async_context(self._open_s3(self.settings.aws_region))
            if self._http is None:
                self._http = await stack.enter_async_context(
                    httpx.AsyncClient(
                        follow_redirects=False,
                        timeout=httpx.Timeout(self.settings.mims_request_timeout, connect=10.0),
                    )
                )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            for handle in list(self._handles):  # submitted, never waited for: clean up
                await handle.aclose()
            if self._stack is not None:
                await self._stack.aclose()

    async def register(
        self, request: RegistrationRequest, *, on_progress: ProgressCallback | None = None
    ) -> RegistrationResult:
        """Run one registration to the end; raise a `RegistrarError` subclass if it fails.

        `on_progress` receives this registration's events (besides the registrar's own
        callback).  Cancelling it stops the uploads and the wait, and still removes its
        temporary objects.
        """
        handle = await self.submit(request, on_progress=on_progress)
        return await handle.wait()

    async def submit(
        self, request: RegistrationRequest, *, on_progress: ProgressCallback | None = None
    ) -> RegistrationHandle:
        """Check the inputs, upload them and submit; return once MIMS accepted the registration.

        With several regions, the archives are built once and uploaded to every region's
        bucket at once, and one registration is submitted per region.  If anything fails
        (or the call is cancelled), every region's temporary objects are removed.
        """
        s3, http = self._clients()
        settings = self.settings
        emit = self._emitter(on_progress)
        started = time.monotonic()
        timings: dict[str, float] = {}
        model_source, payload_source = await self._inspect(request)
        metadata = await load_performance_metadata(
            s3, local=request.metadata_path, uri=request.performance_metadata_uri
        )
        timings["validate"] = time.monotonic() - started

        regions = request.config.regions
        run_id, key = run_identity(request, model_source, payload_source, metadata)
        stack = contextlib.AsyncExitStack()
        try:
            parts = []
            for region in regions:
                bucket = settings.bucket_for(region)
                prefix = f"{settings.s3_prefix}{run_id}/" + (f"{region}/" if len(regions) > 1 else "")
                regional = await self._s3_for(region, several=len(regions) > 1)
                temporary = await stack.enter_async_context(
                    TemporaryPrefix(regional, bucket, prefix, timeout=settings.cleanup_timeout, on_progress=emit)
                )
                auth = SigV4(self._credentials, region=region, service=settings.mims_service_name)
                parts.append(
                    _Region(
                        region,
                        regional,
                        temporary,
                        MimsClient(http, settings.endpoint_for(region), settings, auth=auth),
                    )
                )
                log.info("run %s: temporary prefix %s", run_id, temporary.uri)

            mark = time.monotonic()
            uploaded: list[dict[str, UploadedArtifact]] = [{} for _ in parts]

            async def upload(name: str, source: ArtifactSource) -> None:
                targets = [(p.s3, S3Location(p.temporary.bucket, p.temporary.key(f"{name}.tar.gz"))) for p in parts]
                async with self._uploads:
                    results = await upload_to_all(source, targets, settings, artifact=name, on_progress=emit)
                for index, result in enumerate(results):
                    uploaded[index][name] = result

            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(upload, "model", model_source)
                    if payload_source is not None:
                        tg.start_soon(upload, "payload", payload_source)
            timings["upload"] = time.monotonic() - mark

            mark = time.monotonic()
            accepted: list[Registration | None] = [None] * len(parts)

            async def submit_one(index: int) -> None:
                part, artifacts = parts[index], uploaded[index]
                submission = RegistrationSubmission.model_validate(
                    {
                        **request.config.to_wire(part.region),
                        "model_artifact": _ref(artifacts["model"]),
                        "payload_artifact": _ref(artifacts["payload"]) if "payload" in artifacts else None,
                        "performance_metadata": metadata,
                        "workflow_execution_id": request.workflow_execution_id,
                    }
                )
                region_key = key if len(parts) == 1 else f"{key}-{part.region}"
                answer = await part.mims.submit(submission, idempotency_key=region_key)
                accepted[index] = answer
                emit(
                    RegistrationSubmitted(
                        answer.registration_id, answer.model_id, answer.workflow_execution_arn, part.region
                    )
                )

            await run_all(functools.partial(submit_one, index) for index in range(len(parts)))
            timings["submit"] = time.monotonic() - mark
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        handle = RegistrationHandle(
            self, parts, [a for a in accepted if a is not None], uploaded, stack, timings, started, emit
        )
        self._handles.add(handle)
        return handle

    def _emitter(self, extra: ProgressCallback | None) -> ProgressCallback:
        """The callback for one registration's events: the registrar's, then the call's own."""
        callbacks = [c for c in (self._on_progress, extra) if c is not None]

        def emit(event: ProgressEvent) -> None:
            for callback in callbacks:
                callback(event)

        return emit

    def _forget(self, handle: RegistrationHandle) -> None:
        self._handles.discard(handle)

    async def _inspect(self, request: RegistrationRequest) -> tuple[ArtifactSource, ArtifactSource | None]:
        """Scan the inputs (in a worker thread: trees can be large)."""
        model = await anyio.to_thread.run_sync(lambda: inspect_artifact(request.model_path, role="model"))
        payload = None
        if request.payload_path is not None and await anyio.Path(request.payload_path).exists():
            path = request.payload_path
            payload = await anyio.to_thread.run_sync(lambda: inspect_artifact(path, role="payload"))
        return model, payload

    async def _s3_for(self, region: str, *, several: bool) -> S3Client:
        """The S3 client for `region`: the shared one, or one of that region's (opened once)."""
        s3, _ = self._clients()
        if self._shared_s3 or not several:
            return s3
        async with self._client_lock:
            if region not in self._regional_s3:
                assert self._stack is not None
                self._regional_s3[region] = await self._stack.enter_async_context(self._open_s3(region))
            return self._regional_s3[region]

    def _open_s3(self, region: str | None) -> contextlib.AbstractAsyncContextManager[S3Client]:
        return open_s3_client(
            self._session,
            region=region,
            endpoint_url=self.settings.s3_endpoint_url,
            checksums=self.settings.s3_checksums,
            pool_size=max(10, 4 * self.settings.upload_concurrency),
        )

    async def _credentials(self) -> ReadOnlyCredentials:
        credentials = await self._session.get_credentials()
        if credentials is None:
            raise ConfigurationError(
                "no AWS credentials found to sign the MIMS requests; run with an IAM role or set "
                "the standard AWS credential variables"
            )
        frozen: ReadOnlyCredentials = await credentials.get_frozen_credentials()
        return frozen

    def _clients(self) -> tuple[S3Client, httpx.AsyncClient]:
        if self._s3 is None or self._http is None:
            raise RuntimeError("use the Registrar as an async context manager: async with Registrar(...) as r")
        return self._s3, self._http


def _ref(artifact: UploadedArtifact) -> ArtifactRef:
    return ArtifactRef(s3_uri=artifact.uri, size_bytes=artifact.size, sha256=artifact.sha256)
