"""The registrar: one whole registration, from local checks to cleanup.

    validate locally -> upload model and payload concurrently -> submit to MIMS
    -> wait until SUCCEEDED / FAILED / timeout -> delete the temporary objects

`Registrar` owns (or borrows) one S3 client and one HTTP client and shares them
across registrations.  Each registration's temporary objects live under a
prefix of their own, emptied by `TemporaryPrefix` on every way out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import httpx
from aiobotocore.session import AioSession
from botocore.credentials import ReadOnlyCredentials

from ._artifacts import ArtifactSource, DirectorySource, inspect_artifact
from ._concurrency import first_error
from ._config import RegistrationConfig, load_config
from ._errors import ConfigurationError
from ._metadata import load_performance_metadata
from ._mims_client import MimsClient
from ._mims_contract import ArtifactRef, Registration, RegistrationSubmission
from ._progress import ProgressCallback, RegistrationStatusChanged, RegistrationSubmitted
from ._s3 import S3Client, S3Location, make_session, open_s3_client
from ._settings import JobInputs, Settings
from ._sigv4 import SigV4
from ._temporary import TemporaryPrefix
from ._upload import UploadedArtifact, upload_artifact

__all__ = ["Registrar", "RegistrationRequest", "RegistrationResult"]

log = logging.getLogger("async_registrar")


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """What to register: the configuration and where the inputs are.

    `payload_path` and `metadata_path` are optional: a path that does not exist means
    no payload or no metadata.  `performance_metadata_uri`, when set, takes precedence
    over `metadata_path`.
    """

    config: RegistrationConfig
    model_path: Path
    payload_path: Path | None = None
    metadata_path: Path | None = None
    performance_metadata_uri: str | None = None
    workflow_execution_id: str | None = None
    #: Sent with every submission attempt.  When neither this nor `workflow_execution_id`
    #: is set, each registration gets a fresh key (see `run_identity`).
    idempotency_key: str | None = None

    @classmethod
    async def from_job(cls, inputs: JobInputs) -> RegistrationRequest:
        """Build the request of a registration job: read and validate its configuration file."""
        return cls(
            config=await load_config(inputs.config_path),
            model_path=inputs.model_path,
            payload_path=inputs.payload_path,
            metadata_path=inputs.metadata_path,
            performance_metadata_uri=inputs.performance_metadata_uri,
            workflow_execution_id=inputs.workflow_execution_id,
            idempotency_key=inputs.idempotency_key,
        )


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    """A finished registration: what MIMS registered and what was uploaded for it."""

    registration_id: str
    model_id: str
    workflow_execution_arn: str
    model_artifact: UploadedArtifact
    payload_artifact: UploadedArtifact | None
    #: Seconds spent in each phase: "validate", "upload", "register", "total".
    timings: dict[str, float] = field(default_factory=dict)


class Registrar:
    """Registers models with MIMS; an async context manager that owns its clients.

    Pass `s3_client` or `http_client` to share clients the caller already has; the
    registrar then leaves them open when it exits.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        s3_client: S3Client | None = None,
        http_client: httpx.AsyncClient | None = None,
        session: AioSession | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.settings = settings
        self._session = session or make_session(
            settings.aws_access_key_id, settings.aws_secret_access_key, settings.aws_session_token
        )
        self._s3: S3Client | None = s3_client
        self._http = http_client
        self._on_progress = on_progress
        self._stack: contextlib.AsyncExitStack | None = None
        self._entered = False

    async def __aenter__(self) -> Registrar:
        if self._entered:
            raise RuntimeError("a Registrar can be entered only once")
        self._entered = True
        async with contextlib.AsyncExitStack() as stack:
            if self._s3 is None:
                self._s3 = await stack.enter_async_context(
                    open_s3_client(
                        self._session,
                        region=self.settings.aws_region,
                        endpoint_url=self.settings.s3_endpoint_url,
                        checksums=self.settings.s3_checksums,
                        pool_size=max(10, 4 * self.settings.upload_concurrency),
                    )
                )
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
        if self._stack is not None:
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()

    async def register(self, request: RegistrationRequest) -> RegistrationResult:
        """Run one registration to the end; raise a `RegistrarError` subclass if it fails.

        Cancelling it stops the uploads and the wait, and still removes its temporary objects.
        """
        s3, http = self._clients()
        settings = self.settings
        started = time.monotonic()
        timings: dict[str, float] = {}

        model_source, payload_source = await self._inspect(request)
        metadata = await load_performance_metadata(
            s3, local=request.metadata_path, uri=request.performance_metadata_uri
        )
        timings["validate"] = time.monotonic() - started

        run_id, idempotency_key = run_identity(request, model_source, payload_source, metadata)
        prefix = f"{settings.s3_prefix}{run_id}/"
        region = request.config.model_registration_region
        auth = SigV4(self._credentials, region=region, service=settings.mims_service_name)
        mims = MimsClient(http, settings.mims_endpoint, settings, auth=auth)
        log.info("run %s: temporary prefix s3://%s/%s", run_id, settings.s3_bucket, prefix)

        async with TemporaryPrefix(
            s3, settings.s3_bucket, prefix, timeout=settings.cleanup_timeout, on_progress=self._on_progress
        ) as temporary:
            uploaded: dict[str, UploadedArtifact] = {}

            async def upload(name: str, source: ArtifactSource) -> None:
                location = S3Location(settings.s3_bucket, temporary.key(f"{name}.tar.gz"))
                uploaded[name] = await upload_artifact(
                    s3, source, location, settings, artifact=name, on_progress=self._on_progress
                )

            mark = time.monotonic()
            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(upload, "model", model_source)
                    if payload_source is not None:
                        tg.start_soon(upload, "payload", payload_source)
            timings["upload"] = time.monotonic() - mark

            mark = time.monotonic()
            submission = RegistrationSubmission.model_validate(
                {
                    **request.config.to_wire(),
                    "model_artifact": _ref(uploaded["model"]),
                    "payload_artifact": _ref(uploaded["payload"]) if "payload" in uploaded else None,
                    "performance_metadata": metadata,
                    "workflow_execution_id": request.workflow_execution_id,
                }
            )
            accepted = await mims.submit(submission, idempotency_key=idempotency_key)
            self._emit(
                RegistrationSubmitted(accepted.registration_id, accepted.model_id, accepted.workflow_execution_arn)
            )
            final = await mims.wait(
                accepted.registration_id, max_wait=settings.wait_timeout, on_status=self._status_changed
            )
            timings["register"] = time.monotonic() - mark

        timings["total"] = time.monotonic() - started
        return RegistrationResult(
            registration_id=final.registration_id,
            model_id=final.model_id or accepted.model_id,
            workflow_execution_arn=final.workflow_execution_arn or accepted.workflow_execution_arn,
            model_artifact=uploaded["model"],
            payload_artifact=uploaded.get("payload"),
            timings=timings,
        )

    async def _inspect(self, request: RegistrationRequest) -> tuple[ArtifactSource, ArtifactSource | None]:
        """Scan the inputs (in a worker thread: trees can be large)."""
        model = await anyio.to_thread.run_sync(lambda: inspect_artifact(request.model_path, role="model"))
        payload = None
        if request.payload_path is not None and await anyio.Path(request.payload_path).exists():
            path = request.payload_path
            payload = await anyio.to_thread.run_sync(lambda: inspect_artifact(path, role="payload"))
        return model, payload

    async def _credentials(self) -> ReadOnlyCredentials:
        credentials = await self._session.get_credentials()
        if credentials is None:
            raise ConfigurationError(
                "no AWS credentials found to sign the MIMS requests; run with an IAM role or set "
                "the standard AWS credential variables"
            )
        frozen: ReadOnlyCredentials = await credentials.get_frozen_credentials()
        return frozen

    def _status_changed(self, registration: Registration) -> None:
        self._emit(
            RegistrationStatusChanged(registration.registration_id, registration.status, registration.failure_reason)
        )

    def _emit(self, event: Any) -> None:
        if self._on_progress is not None:
            self._on_progress(event)

    def _clients(self) -> tuple[S3Client, httpx.AsyncClient]:
        if self._s3 is None or self._http is None:
            raise RuntimeError("use the Registrar as an async context manager: async with Registrar(...) as r")
        return self._s3, self._http


def run_identity(
    request: RegistrationRequest,
    model: ArtifactSource,
    payload: ArtifactSource | None,
    metadata: dict[str, Any] | None,
) -> tuple[str, str]:
    """The run id (the temporary prefix's name) and the Idempotency-Key of a registration.

    With a lineage id (MODS_WORKFLOW_EXECUTION_ID) or an explicit key, both are derived
    from what the job registers: the lineage, the configuration, the metadata and the
    inputs' names and sizes.  A retried container therefore uploads to the same keys and,
    since archives are deterministic, submits the same body with the same key: the
    registry answers with the registration it already has instead of making a second.
    Without either, each run is its own registration: a fresh id and key.
    """
    if not (request.idempotency_key or request.workflow_execution_id):
        run_id = new_run_id()
        return run_id, f"registrar-{run_id}"
    identity = {
        "key": request.idempotency_key,
        "workflow_execution_id": request.workflow_execution_id,
        "config": request.config.to_wire(),
        "metadata": metadata,
        "performance_metadata_uri": request.performance_metadata_uri,
        "model": _listing(model),
        "payload": _listing(payload),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"run-{digest[:24]}", request.idempotency_key or f"registrar-{digest}"


def _listing(source: ArtifactSource | None) -> list[tuple[str, int, bool]] | None:
    if source is None:
        return None
    if isinstance(source, DirectorySource):
        return [(e.name, e.size, e.executable) for e in source.entries]
    return [(source.path.name, source.size, False)]


def new_run_id() -> str:
    """A run id that sorts by time and is unique: `20261126T065650Z-3f2a9c1b7d4e`."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(6)


def _ref(artifact: UploadedArtifact) -> ArtifactRef:
    return ArtifactRef(s3_uri=artifact.uri, size_bytes=artifact.size, sha256=artifact.sha256)
