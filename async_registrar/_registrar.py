"""The registrar: registrations, as a library.

`Registrar` owns (or borrows) its S3 and HTTP clients and shares them across
registrations.  Each registration is one run (`_run.Run`: prepare, upload,
submit, wait, finalize); `submit()` returns a `RegistrationHandle` once the
registry accepted it, and `wait()` on the handle follows it to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aioboto3
import anyio
import httpx
from botocore.credentials import ReadOnlyCredentials

from ._artifacts import inspect_artifact
from ._budget import MemoryBudget
from ._capabilities import Integrity, adapt_uploads
from ._concurrency import outcomes, require_asyncio
from ._credentials import credential_problem, is_credential_failure
from ._errors import REMOVE_BY_HAND, CleanupError, ConfigurationError, RegistrarError
from ._lifecycle import install_lifecycle
from ._log_fields import log_fields
from ._lookups import use_own_lookups
from ._mims_client import MimsClient
from ._mims_contract import Registration
from ._plan import RegistrationPlan
from ._preflight import NO_CREDENTIALS, check_bucket, check_credentials
from ._progress import ProgressCallback, check_callback, notify_all
from ._request import RegistrationRequest
from ._results import RegionRegistration, RegistrationResult
from ._run import Run
from ._s3 import S3Client, S3Location, load_s3_models, make_session, open_s3_client
from ._settings import Settings, http_client_environment
from ._sigv4 import SigV4
from ._sweep import SweepReport, sweep
from ._threads import Workers
from ._tracing import annotate, span
from ._upload import UploadedArtifact, upload_artifact

__all__ = [
    "RegionRegistration",
    "Registrar",
    "RegistrationHandle",
    "RegistrationPlan",
    "RegistrationResult",
    "SweepReport",
]

#: Runs older than this are swept before the first registration (`sweep_on_start`).
SWEEP_ON_START_AGE = 24 * 3600.0
#: A run whose registry cannot be asked is spared until it is this old.
SWEEP_MAX_AGE = 7 * 24 * 3600.0

log = logging.getLogger("async_registrar")

#: How long closing the registrar's own clients may take.
CLOSE_TIMEOUT = 10.0


class RegistrationHandle:
    """A submitted registration: uploaded, accepted by MIMS, not yet finished.

    `await handle.wait()` follows it to the end and then removes the temporary objects;
    until then they stay (the registry reads them).  `aclose()` on a handle nobody waits on
    (or the registrar's exit) stops following it: its objects are removed if it is final by
    then, and otherwise kept for the registry and named (a re-run with the same lineage id
    resumes it).  Once `wait()` has begun, the wait owns the registration and `aclose()` does
    nothing: cancel the task that waits (or leave the registrar) to stop it.
    """

    def __init__(self, registrar: Registrar, run: Run) -> None:
        self._registrar = registrar
        self._run: Run | None = run
        #: The registry's answer for each region, in order.
        self.accepted: tuple[Registration, ...] = run.accepted

    async def wait(self) -> RegistrationResult:
        """Wait until every region's registration is final; then remove the temporary objects.

        Raises `RegistrationFailed`, `RegistrationTimeout` (its artifacts are kept: see
        `RegistrationInterrupted`) or another `RegistrarError`.
        """
        if self._run is None:
            self._take()  # raises: already waited for or closed
        # Refused while the registrar closes before the run is taken: the handle stays with the
        # registrar, whose exit closes it (and names what it keeps).
        with self._registrar._work():
            run = self._take()
            return await run.finish()

    async def aclose(self) -> None:
        """Stop following the registration (see the class; nothing once `wait()` has begun); raise
        `CleanupError` if objects that nothing needs could not be removed."""
        if self._run is None:
            return
        leftovers = await self._take().close()
        if leftovers:
            raise CleanupError(f"could not remove everything; {REMOVE_BY_HAND}", leftovers)

    def _take(self) -> Run:
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("this registration was already waited for or closed")
        self._registrar._forget(self)
        return run


class _Work:
    """A registrar's work in flight: a cancel scope its exit cancels (then waits for the work to
    clean up), which turns that cancellation into a `RuntimeError` for the caller.

    A credential failure no narrower handler mapped (botocore's credential errors, and
    aiobotocore's RuntimeError for refreshed keys that are still expired, met by a best-effort
    S3 call such as the capability probe) leaves as the `ConfigurationError` naming the
    source, as the command's boundary does it."""

    def __init__(self, registrar: Registrar) -> None:
        self._registrar = registrar
        self._scope = anyio.CancelScope()

    def __enter__(self) -> None:
        self._scope.__enter__()
        self._registrar._working.add(self._scope)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            stopped = self._scope.__exit__(exc_type, exc, tb)
        finally:
            self._registrar._working.discard(self._scope)
            self._registrar._work_ended.set()
        if stopped:
            raise RuntimeError(
                "the Registrar was closed while this ran: leave its async with block only once the work "
                "in it has ended; what a registration still reads was kept and named (RegistrationKept)"
            )
        # Not a JSONDecodeError (a ValueError): raised anywhere in the work, it is not known to be
        # the credential_process's output (inside an S3 call, `storage_errors` takes it as that).
        if not isinstance(exc, Exception) or isinstance(exc, (RegistrarError, ValueError)):
            return
        if is_credential_failure(exc):
            raise credential_problem(exc) from None


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
        #: The registrar's own thread tokens (never anyio's process-wide 40: see `_threads`).
        self._workers = Workers.for_settings(settings)
        #: One pool of part-buffer memory for all of this registrar's uploads.
        self._budget = MemoryBudget(settings.memory_limit)
        self._http = http_client
        if on_progress is not None:
            check_callback(on_progress)
        self._on_progress = on_progress
        self._stack: contextlib.AsyncExitStack | None = None
        self._handles: set[RegistrationHandle] = set()
        self._entered = False
        self._closed = False
        #: Work in flight on this registrar, in its callers' tasks (a submission, a wait, an
        #: upload, a sweep): its exit cancels it and waits for its cleanup, clients still open.
        self._working: set[anyio.CancelScope] = set()
        self._work_ended = anyio.Event()
        self._closing = False
        self._swept_on_start = False
        #: The event loop it was entered on: its clients' connections belong to that loop.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Registrar:
        if self._entered:
            raise RuntimeError("a Registrar can be entered only once")
        require_asyncio("async-registrar's Registrar")
        self._entered = True
        self._loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            if self._s3 is None:
                # botocore's data files are read in a thread, not on the caller's event loop.
                await self._workers.compute(functools.partial(load_s3_models, self._session))
                self._s3 = await stack.enter_async_context(self._open_s3(self.settings.aws_region))
            # The HTTP client for the registry is opened when a registry is first used (an
            # upload alone needs none: its TLS setup and imports cost ~40 ms of every start).
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close every handle never waited for (each on its own), then the clients; then raise
        what went wrong closing them (or, when leaving with an error, add it to that error)."""
        errors: list[Exception] = []
        with anyio.CancelScope(shield=True):
            # What still runs on the registrar in other tasks is stopped, and cleans up (or keeps
            # what a registration reads) while the clients still work.
            self._closing = True
            await self._stop_work()
            # Every handle gets closed (at once: each within its own cleanup deadline), and the
            # clients too, whatever fails on the way.
            errors += [e for e in await outcomes(h.aclose for h in list(self._handles)) if e is not None]
            # From here on nothing opens a client: it would land on a stack already closed.
            self._closed = True
            if self._stack is not None:
                with anyio.move_on_after(CLOSE_TIMEOUT) as scope:  # closing connections: quick, or never
                    try:
                        await self._stack.aclose()
                    except Exception as failure:
                        errors.append(failure)
                if scope.cancelled_caught:
                    log.warning(
                        "closing the registrar's clients took longer than %g s; left to the runtime", CLOSE_TIMEOUT
                    )
        if not errors:
            return
        if exc is not None:
            for error in errors:
                log.error("while closing the registrar: %s", error)
                exc.add_note(f"while closing the registrar: {error}")
            return
        if len(errors) == 1:
            raise errors[0]
        raise ExceptionGroup("closing the registrar failed in several ways", errors)

    async def register(
        self, request: RegistrationRequest, *, on_progress: ProgressCallback | None = None
    ) -> RegistrationResult:
        """Run one registration to the end; raise a `RegistrarError` subclass if it fails.

        `on_progress` receives this registration's events (besides the registrar's own
        callback).  Cancelling it stops the uploads and the wait; its temporary objects are
        removed, except those of a registration the registry accepted and has not finished
        (they are kept and named, see `RegistrationKept`).
        """
        with span("register", lineage_id=request.workflow_execution_id):
            handle = await self.submit(request, on_progress=on_progress)
            result = await handle.wait()
            annotate(
                status="SUCCEEDED",
                registration_id=",".join(r.registration_id for r in result.registrations),
                model_id=",".join(r.model_id for r in result.registrations),
            )
            return result

    async def submit(
        self, request: RegistrationRequest, *, on_progress: ProgressCallback | None = None
    ) -> RegistrationHandle:
        """Check the inputs, upload them and submit; return once MIMS accepted the registration.

        With a lineage id, what an earlier run left for the same inputs is resumed first (a
        registration followed instead of made again, artifacts not uploaded again).  With
        several regions, the archives are built once and uploaded to every region's bucket at
        once, and one registration is submitted per region.  If anything fails (or the call
        is cancelled) before the registry accepted, the temporary objects are removed.
        """
        self.settings.require_registry()
        with self._work():
            if self.settings.sweep_on_start and not self._swept_on_start:
                self._swept_on_start = True
                await self._sweep_on_start(request.config.regions)
            run = self._run(request, on_progress)
            await run.start()
            handle = RegistrationHandle(self, run)
            self._handles.add(handle)
        return handle

    async def check(self, request: RegistrationRequest) -> RegistrationPlan:
        """Check the inputs and run the preflight (credentials, every bucket, every registry
        endpoint), upload nothing, and return what a registration would do.

        Raises what `register` would raise for the same problem, before any upload."""
        self.settings.require_registry()
        with self._work():
            return await self._run(request, None).plan()

    async def sweep(
        self,
        *,
        older_than: float = SWEEP_ON_START_AGE,
        max_age: float = SWEEP_MAX_AGE,
        dry_run: bool = False,
        regions: Sequence[str] = (),
    ) -> SweepReport:
        """Remove what runs that could not clean up (SIGKILL, OOM) left under the prefix.

        A run older than `older_than` seconds (by its youngest evidence: its newest object or
        open upload, or the start time in its attempt's name) is removed,
        unless the configured registry reports its registration PENDING or IN_PROGRESS (or cannot
        be asked, or a POST may have gone unanswered: then it is spared until `max_age`).
        With a bucket name holding `{region}`, `regions` names the buckets to sweep.  Raises
        `StorageError` if a bucket cannot be listed; what could not be removed is in the report's
        `leftovers`.
        """
        self.settings.require_registry()  # it asks the registry about kept registrations
        template = "{region}" in self.settings.s3_bucket
        if template and not regions:
            raise ConfigurationError(
                "the bucket name holds {region}: name the regions whose buckets to sweep (--region)"
            )
        with self._work():
            # As a registration's preflight does: missing or broken credentials are a
            # configuration error (exit 2) here, not a failed listing (exit 4).
            await check_credentials(self._credentials, within=self.settings.preflight_timeout)
            names = list(regions) if template else [self.settings.aws_region or "us-east-1"]
            reports = []
            for region in names:
                s3, _ = await self._region_clients(region, several=template)
                reports.append(
                    await sweep(
                        s3,
                        self.settings.bucket_for(region),
                        self.settings.s3_prefix,
                        registry_for=self._registry_for,
                        endpoint_for=self.settings.endpoint_for,
                        older_than=older_than,
                        max_age=max_age,
                        dry_run=dry_run,
                        # Sparing is the safe side: one request's time per kept run, not retries.
                        lookup_deadline=min(30.0, self.settings.submit_timeout, self.settings.mims_request_timeout),
                    )
                )
            if len(reports) == 1:
                return reports[0]
            first = reports[0]
            return SweepReport(
                buckets=tuple(b for r in reports for b in r.buckets),
                prefix=first.prefix,
                dry_run=dry_run,
                runs=tuple(run for r in reports for run in r.runs),
                not_runs=tuple(k for r in reports for k in r.not_runs),
                leftovers=tuple(k for r in reports for k in r.leftovers),
                seconds=sum(r.seconds for r in reports),
            )

    async def upload(
        self, path: str | os.PathLike[str], uri: str, *, on_progress: ProgressCallback | None = None
    ) -> UploadedArtifact:
        """Stream a directory (or the one `.tar.gz` in it) to `uri` (`s3://bucket/key`) as a
        deterministic tar.gz: the upload engine alone, as the `upload` command; no registry.

        The same guarantees as a registration's uploads: the input is checked before anything
        is sent (exit-3 problems are an `InputError`), credentials and the bucket are checked
        first (the preflight's storage half), the multipart upload is aborted on any failure or
        cancellation, and the object is read back (size and checksum) before it is returned.
        It counts against `max_parallel_uploads` and runs on the registrar's own threads.
        """
        callbacks = notify_all([c for c in (self._on_progress, on_progress) if c is not None])
        with self._work():
            s3 = self._s3_client()
            target = S3Location.parse_object(uri, what="upload target")
            source = Path(path)
            follow = self.settings.dereference
            scanned = await self._workers.stream(lambda: inspect_artifact(source, role="upload", dereference=follow))
            within = self.settings.preflight_timeout
            await check_credentials(self._credentials, within=within)
            await check_bucket(s3, target.bucket, target.key, within=within, fix="fix the s3://bucket/key target")
            integrity: Integrity | None = None
            if self.settings.preflight:
                capabilities = await adapt_uploads(
                    s3,
                    target.bucket,
                    target.key,
                    self.settings,
                    where=target.uri,
                    removal_timeout=self.settings.cleanup_timeout,
                )
                integrity = capabilities.integrity
            async with self._uploads:
                with log_fields(phase="upload", artifact=source.name or "upload"):
                    return await upload_artifact(
                        s3,
                        scanned,
                        target,
                        self.settings,
                        artifact=source.name or "upload",
                        on_progress=callbacks,
                        workers=self._workers,
                        budget=self._budget,
                        integrity=integrity,
                    )

    async def install_lifecycle(
        self,
        *,
        abort_after_days: int = 1,
        expire_after_days: int = 7,
        region: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Add (or replace) the bucket lifecycle rule for the prefix, keeping the bucket's other
        rules: incomplete multipart uploads aborted, objects expired, after so many days.
        Returns the rule.  With `dry_run`, nothing is written: the rule it would add (and the
        one it would replace) is logged and returned."""
        name = region or self.settings.aws_region or "us-east-1"
        await check_credentials(self._credentials, within=self.settings.preflight_timeout)
        s3 = await self._region_s3(name, several="{region}" in self.settings.s3_bucket)
        return await install_lifecycle(
            s3,
            self.settings.bucket_for(name),
            self.settings.s3_prefix,
            abort_after_days=abort_after_days,
            expire_after_days=expire_after_days,
            dry_run=dry_run,
        )

    async def _registry_for(self, region: str) -> MimsClient:
        _, mims = await self._region_clients(region, several=False)
        return mims

    async def _sweep_on_start(self, regions: Sequence[str]) -> None:
        """The sweep before the first registration: its failures are warnings, never the registration's."""
        try:
            report = await self.sweep(older_than=SWEEP_ON_START_AGE, regions=regions)
        except RegistrarError as exc:
            log.warning("the sweep before the first registration failed: %s", exc.message.splitlines()[0])
            return
        log.info(
            "swept stale runs: %d removed, %d spared, %d left behind",
            len(report.removed),
            len(report.spared),
            len(report.leftovers),
        )

    def _run(self, request: RegistrationRequest, on_progress: ProgressCallback | None) -> Run:
        s3 = self._s3_client()
        callbacks = [c for c in (self._on_progress, on_progress) if c is not None]
        return Run(
            self.settings,
            request,
            s3=s3,
            region_clients=lambda region: self._region_clients(region, several=len(request.config.regions) > 1),
            credentials=self._credentials,
            uploads=self._uploads,
            emit=notify_all(callbacks),
            workers=self._workers,
            budget=self._budget,
        )

    def _forget(self, handle: RegistrationHandle) -> None:
        self._handles.discard(handle)

    async def _region_clients(self, region: str, *, several: bool) -> tuple[S3Client, MimsClient]:
        """The S3 client (the shared one, or one of that region's, opened once) and a MIMS client."""
        s3, http = await self._region_s3(region, several=several), await self._http_client()
        auth = SigV4(self._credentials, region=region, service=self.settings.mims_service_name)
        return s3, MimsClient(http, self.settings.endpoint_for(region), self.settings, auth=auth)

    async def _region_s3(self, region: str, *, several: bool) -> S3Client:
        """The S3 client for `region`: the shared one, or one of that region's, opened once."""
        s3 = self._s3_client()
        if not (self._shared_s3 or not several):
            async with self._client_lock:
                if region not in self._regional_s3:
                    self._regional_s3[region] = await self._open_stack().enter_async_context(self._open_s3(region))
                s3 = self._regional_s3[region]
        return s3

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
            raise ConfigurationError(f"no usable AWS credentials (for S3 and the registry); {NO_CREDENTIALS}")
        frozen: ReadOnlyCredentials = await credentials.get_frozen_credentials()
        return frozen

    def _work(self) -> _Work:
        """One piece of work on the registrar (in the caller's task), which its exit may stop."""
        self._check_loop()
        if self._closing:
            self._open_stack()  # before entry, or closed: the same usage errors
            raise RuntimeError("this Registrar is closing (its async with block has ended); open a new one")
        return _Work(self)

    async def _stop_work(self) -> None:
        """Cancel the work in flight and wait until it has cleaned up: each run's cleanup is
        shielded and bounded by its own deadline, so this ends too."""
        for scope in list(self._working):
            scope.cancel()
        with anyio.move_on_after(self.settings.cleanup_timeout + CLOSE_TIMEOUT):
            while self._working:
                self._work_ended = anyio.Event()
                await self._work_ended.wait()

    def _open_stack(self) -> contextlib.AsyncExitStack:
        """Where the registrar's clients are closed at exit; a usage error before entry and
        after exit (a client opened then would never be closed)."""
        if self._stack is None:
            raise RuntimeError("use the Registrar as an async context manager: async with Registrar(...) as r")
        if self._closed:
            raise RuntimeError("this Registrar is closed (its async with block has ended); open a new one")
        self._check_loop()
        return self._stack

    def _check_loop(self) -> None:
        """A usage error on another event loop than the one it was entered on (another thread's
        `asyncio.run`): its clients' pooled connections belong to the first, and using them from
        another would break them for both."""
        if self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError(
                "this Registrar was entered on another event loop; use it only on that loop (hand calls "
                "from other threads over with anyio.from_thread or asyncio.run_coroutine_threadsafe), or "
                "open a Registrar per event loop"
            )

    def _s3_client(self) -> S3Client:
        self._open_stack()
        assert self._s3 is not None
        return self._s3

    async def _http_client(self) -> httpx.AsyncClient:
        """The caller's HTTP client, or the registrar's own, opened on first use."""
        async with self._client_lock:
            stack = self._open_stack()  # checked under the lock: the registrar may close meanwhile
            if self._http is None:
                try:
                    client = httpx.AsyncClient(
                        follow_redirects=False,
                        timeout=httpx.Timeout(self.settings.mims_request_timeout, connect=10.0),
                    )
                except (ImportError, ValueError, OSError) as exc:
                    # httpx builds its proxies and TLS context from the environment here: a
                    # socks5:// proxy without socksio, a scheme it has no transport for, a
                    # SSL_CERT_FILE that is not there.  Not a bug of ours: the job's settings.
                    raise ConfigurationError(
                        f"the registry client cannot be made from this environment ({type(exc).__name__}: {exc}); "
                        "fix or unset the variable at fault",
                        http_client_environment() or ["(none of the proxy or CA bundle variables is set)"],
                    ) from exc
                use_own_lookups(client)
                self._http = await stack.enter_async_context(client)
        return self._http
