"""One registration run: its phases, its state, and the line it must not cross back over.

    prepare -> upload -> submit -> wait -> finalize

`_Run` holds one state for every region it registers in and runs the phases
over it.  Each region has a point of no return: the registry's 2xx answer to
its POST.  From then on the registry reads the artifacts on its own time, so
every exit asks which side of that line a region is on:

- before it, an exit (error, cancellation, signal) aborts the region's
  multipart uploads and deletes its objects;
- after it, SUCCEEDED or FAILED removes them, and any other exit (the wait's
  timeout, a cancellation, a failed poll) keeps them, names them, and leaves the
  run manifest (`_manifest`) that a re-run with the same lineage id resumes from.

A POST that may have reached the registry without an answer (a cancellation
while it is in flight, a timeout after the request left) counts as accepted for
this purpose: its artifacts are kept, and a re-run submits the same key again
to learn the answer.  Every exit's cleanup runs under one deadline
(`CleanupDeadline`), regions at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import anyio

from ._artifacts import (
    ArtifactSource,
    DirectorySource,
    PrebuiltArchive,
    S3Archive,
    choose_part_size,
    inspect_artifact,
    is_s3_uri,
)
from ._budget import MemoryBudget
from ._capabilities import S3Capabilities, adapt_uploads, known_capabilities
from ._concurrency import CleanupDeadline, outcomes, run_all
from ._errors import (
    REMOVE_BY_HAND,
    AcceptedRegistration,
    CleanupError,
    IdempotencyConflict,
    RegistrarError,
    RegistrationFailed,
    RegistrationInterrupted,
    RegistrationRejected,
    RegistryError,
    StorageError,
    redact,
)
from ._log_fields import log_fields
from ._manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestArtifact,
    ManifestRegistration,
    find_manifests,
    read_manifest,
    write_manifest,
)
from ._metadata import load_performance_metadata
from ._mims_client import Delivery, MimsClient
from ._mims_contract import TERMINAL_STATUSES, ArtifactRef, Registration, RegistrationSubmission
from ._multipart import OpenUploads
from ._plan import ArtifactPlan, RegionPlan, RegistrationPlan
from ._preflight import CredentialsCheck, PreflightTarget, check_registries, check_storage
from ._progress import (
    ProgressCallback,
    RegistrationKept,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    RegistrationSucceeded,
)
from ._ranged_read import read_bound
from ._request import RegistrationRequest, RunIdentity, new_run_id, run_identity
from ._results import RegionRegistration, RegistrationResult
from ._s3 import S3Client, S3Location
from ._s3_source import copy_inside, copy_to_all, digest_s3_archive, inspect_s3_archive, local_copy_of
from ._settings import MAX_PARTS, Settings
from ._temporary import TemporaryPrefix
from ._threads import Workers
from ._tracing import annotate, span
from ._upload import UploadedArtifact, assumed_integrity, buffer_bound, digest_artifact, upload_to_all

__all__ = ["RegionClients", "Run"]

#: How long a run waits for the capability probe's objects to be deleted before it uploads.
PROBE_REMOVAL_WAIT = 2.0

log = logging.getLogger("async_registrar")

#: The highest key generation: after this many registrations of the same inputs ended
#: FAILED, a run gives up.
MAX_GENERATIONS = 20
#: How long recording an accepted registration in the run manifest may hold up a cancellation.
MANIFEST_TIMEOUT = 10.0

#: Opens (or reuses) the S3 client and the MIMS client of a region.
RegionClients = Callable[[str], Awaitable[tuple[S3Client, MimsClient]]]


@dataclass(eq=False)
class _Region:
    """One region's share of a run: its clients, its prefix, and how far it got."""

    region: str
    s3: S3Client
    bucket: str
    mims: MimsClient
    #: The attempt prefix this region's artifacts live under (its own, or an earlier run's).
    prefix: TemporaryPrefix | None = None
    attempt: str = ""
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    artifacts: dict[str, UploadedArtifact] = field(default_factory=dict)
    to_upload: set[str] = field(default_factory=set)
    #: The key to submit with, when it comes from an earlier run's manifest.
    key: str | None = None
    generation: int = 1
    #: What this region's S3 checks (probed before its first upload; None until then, or
    #: with the preflight off).
    capabilities: S3Capabilities | None = None
    #: The registration the registry accepted (or one found for the same inputs).
    accepted: Registration | None = None
    #: Whether `accepted` reads this region's prefix (not so for one the registry named
    #: as the holder of the key: it reads another run's).
    reads_prefix: bool = False
    #: A POST of this prefix's artifacts may have reached the registry unanswered (this
    #: run's own, or, `earlier_unanswered`, an earlier run's found in its manifest).
    unanswered: bool = False
    earlier_unanswered: bool = False
    status: str | None = None
    final: Registration | None = None
    resumed: bool = False
    #: Artifacts of an earlier run whose registration is not alive, still whole in its
    #: prefix: copied inside S3 into this region's own prefix instead of uploaded again.
    carried: dict[str, ManifestArtifact] = field(default_factory=dict)
    #: Whether this run wrote the prefix's manifest (a POST of it followed, or was about to).
    wrote_manifest: bool = False
    #: That earlier run's prefix, removed at the end when its registration ended FAILED.
    superseded: TemporaryPrefix | None = None

    @property
    def past_point_of_no_return(self) -> bool:
        """Whether the registry may still read this region's prefix: a registration that reads
        it was accepted (or may have been) and is not final.  Such a prefix is never removed."""
        if self.status in TERMINAL_STATUSES:
            return False
        if self.accepted is not None:
            return self.reads_prefix
        return self.unanswered or self.earlier_unanswered

    def accepted_view(self, *, kept: bool) -> AcceptedRegistration | None:
        if self.accepted is None:
            return None
        prefix = self.prefix.uri if kept and self.prefix is not None else None
        return AcceptedRegistration(
            region=self.region,
            registration_id=self.accepted.registration_id,
            model_id=self.accepted.model_id,
            workflow_execution_arn=self.accepted.workflow_execution_arn,
            status=self.status or self.accepted.status,
            kept_prefix=prefix,
            manifest_uri=f"{prefix}{MANIFEST_NAME}" if prefix else None,
        )


_P = ParamSpec("_P")
_T = TypeVar("_T")
_Step = Callable[Concatenate["Run", _P], Coroutine[Any, Any, _T]]


def _phase(name: str) -> Callable[[_Step[_P, _T]], _Step[_P, _T]]:
    """Log lines written during the method carry the run id, the phase `name` and, for a
    region's step, its region and registration id (see `_log_fields`); the method runs in an
    OpenTelemetry span of that name with the same attributes (see `_tracing`)."""

    def decorate(method: _Step[_P, _T]) -> _Step[_P, _T]:
        @functools.wraps(method)
        async def in_phase(self: Run, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            region = next((a for a in args if isinstance(a, _Region)), None)
            fields = {
                "run_id": self.run_id,
                "attempt": self.attempt,
                "region": region.region if region is not None else None,
                "registration_id": region.accepted.registration_id if region is not None and region.accepted else None,
            }
            with log_fields(phase=name, **fields), span(name, **fields):
                return await method(self, *args, **kwargs)

        return in_phase

    return decorate


class Run:
    """One registration, from local checks to its final status and the cleanup.

    `start()` runs prepare, upload and submit, and returns once every region's
    registration was accepted (or found); `finish()` waits for them and finalizes;
    `close()` finalizes without waiting.  Every way out goes through `_finalize`.
    """

    def __init__(
        self,
        settings: Settings,
        request: RegistrationRequest,
        *,
        s3: S3Client,
        region_clients: RegionClients,
        credentials: CredentialsCheck,
        uploads: anyio.CapacityLimiter,
        emit: ProgressCallback,
        workers: Workers | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.settings = settings
        self.request = request
        self._s3 = s3
        self._region_clients = region_clients
        self._credentials = credentials
        self._uploads = uploads
        self._workers = workers or Workers.for_settings(settings)
        self._budget = budget or MemoryBudget(settings.memory_limit)
        self._emit = emit
        self._cleanup = CleanupDeadline(settings.cleanup_timeout)
        #: The multipart uploads this run opened and has not closed: if a prefix's uploads
        #: cannot be listed at cleanup, whether any can be open there.
        self._ledger = OpenUploads()
        self._started = anyio.current_time()
        self.timings: dict[str, float] = {}
        self.regions: list[_Region] = []
        self.identity: RunIdentity | None = None
        self._sources: dict[str, ArtifactSource | S3Archive] = {}
        #: Local copies of sources in S3 (`model_local_copy`), read for their sha256.
        self._local_copies: dict[str, PrebuiltArchive] = {}
        self._metadata: dict[str, Any] | None = None
        self._submitted_at: float | None = None
        self._finalized = False
        self._several = len(request.config.regions) > 1
        #: This attempt's id (`20261126T065650Z-3f2a9c1b7d4e`), once the preflight passed.
        self.attempt: str | None = None

    @property
    def run_id(self) -> str | None:
        """The run's id (`run-...`, the folder every attempt of it shares), once the inputs
        were read; on the log lines that follow."""
        return self.identity.group if self.identity is not None else None

    # --- the phases ------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare, upload and submit; return once every region's registration was accepted.

        If a region's submission fails, the regions already accepted are waited for first
        (the registry reads their artifacts), then the failure is raised, naming them.
        """
        try:
            await self._prepare()
            await self._upload()
            errors = await self._submit()
            if errors:
                errors += await self._wait()
                raise self._chosen(errors)
        except BaseException as exc:
            await self._finalize(exc)
            raise

    async def finish(self) -> RegistrationResult:
        """Wait until every region's registration is final; finalize; return the result."""
        try:
            errors = await self._wait()
            if errors:
                raise self._chosen(errors)
            # Before the cleanup, which may be cut short: the result is known.
            self._emit(RegistrationSucceeded(self._result(()).registrations))
        except BaseException as exc:
            await self._finalize(exc)
            raise
        leftovers = await self._finalize(None)
        return self._result(leftovers)

    async def close(self) -> tuple[str, ...]:
        """Finalize without waiting: registrations found final are cleaned up, the others kept.

        Returns what could not be removed."""
        if self._finalized:
            return ()
        with self._cleanup.shield():  # one status check each, within the exit's deadline

            async def refresh(region: _Region) -> None:
                assert region.accepted is not None
                current = await region.mims.get(region.accepted.registration_id, deadline=self.settings.cleanup_timeout)
                if current is not None:
                    region.status = current.status

            await outcomes(functools.partial(refresh, r) for r in self.regions if r.accepted and not self._final(r))
        return await self._finalize(None, reason="closed before it was waited for")

    @_phase("preflight")
    async def plan(self) -> RegistrationPlan:
        """Check the inputs, run the preflight and describe what a registration would do.

        Nothing is written: no prefix is created, so there is nothing to clean up."""
        await self._check()
        assert self.identity is not None
        found = await self._earlier_runs() if self.identity.resumable else []
        await self._probe(self.regions)  # every registry: a person asked whether it answers
        settings = self.settings
        artifacts = []
        for name, source in self._sources.items():
            part_size = choose_part_size(source.size_bound, settings.part_size)
            parts = min(MAX_PARTS, max(1, -(-source.size_bound // part_size)))
            kind: Literal["directory", "prebuilt", "s3"]
            path: Path | str
            reads = 0
            if isinstance(source, DirectorySource):
                path, kind = source.root, "directory"
                files, content = sum(1 for e in source.entries if not e.is_dir), source.content_bytes
            elif isinstance(source, S3Archive):
                path, kind, files, content = source.path, "s3", 1, source.size
                # its ranged GETs, and where it is streamed to another region an upload's
                # buffers besides: at most both
                reads = read_bound(settings)
            else:
                path, kind, files, content = source.path, "prebuilt", 1, source.size
            artifacts.append(
                ArtifactPlan(
                    name="model" if name == "model" else "payload",
                    path=path,
                    kind=kind,
                    files=files,
                    content_bytes=content,
                    size_bound=source.size_bound,
                    part_size=part_size,
                    parts=parts,
                    memory_bytes=buffer_bound(parts, part_size, settings) + reads,
                )
            )
        regions = tuple(
            RegionPlan(
                region=r.region,
                bucket=r.bucket,
                prefix=f"s3://{r.bucket}/{settings.s3_prefix}{self.identity.group}/",
                endpoint=redact(r.mims.endpoint),
                s3_checks=known.describe() if (known := known_capabilities(r.s3, settings)) else None,
                integrity=known.integrity if known else None,
            )
            for r in self.regions
        )
        return RegistrationPlan(
            artifacts=tuple(artifacts),
            regions=regions,
            lineage_id=self.request.workflow_execution_id,
            resumable=self.identity.resumable,
            earlier_runs=len({m.attempt for manifests in found for _, m in manifests}),
            parallel_uploads=settings.max_parallel_uploads,
            timings=dict(self.timings),
        )

    async def _check(self) -> None:
        """Check the inputs and the metadata, and run the preflight; nothing is written."""
        model, payload = await self._inspect()
        self._sources = {"model": model} | ({"payload": payload} if payload is not None else {})
        request = self.request
        for name in request.config.regions:
            s3, mims = await self._region_clients(name)
            self.regions.append(_Region(name, s3, self.settings.bucket_for(name), mims))
        if request.performance_metadata_uri is None:  # a local file: checked before the network is
            self._metadata = await load_performance_metadata(self._s3, local=request.metadata_path, uri=None)
        self.timings["validate"] = anyio.current_time() - self._started
        if self.settings.preflight:
            with self._preflight_timing():
                await check_storage(
                    self._targets(self.regions), credentials=self._credentials, within=self.settings.preflight_timeout
                )
        if request.performance_metadata_uri is not None:
            self._metadata = await load_performance_metadata(
                self._s3, local=request.metadata_path, uri=request.performance_metadata_uri
            )
        self.identity = run_identity(request, model, payload, self._metadata, self.settings)

    async def _capabilities(self, region: _Region) -> None:
        """What the region's S3 checks (once per endpoint and process; probed under the run's
        own prefix, whose cleanup covers it), and the uploads made to carry it; one WARNING
        when it checks nothing.  Probed just before the first upload, after the whole
        preflight passed: the preflight (and `check`) writes nothing."""
        region.capabilities = await adapt_uploads(
            region.s3,
            region.bucket,
            _prefix(region).prefix,
            self.settings,
            where=f"s3://{region.bucket}",
            # Not waited on for long: the run's cleanup removes whatever is left under its prefix.
            removal_timeout=min(self.settings.cleanup_timeout, PROBE_REMOVAL_WAIT),
            covered=True,
        )

    async def _probe(self, regions: list[_Region]) -> None:
        """The preflight's registry half: every region's registry answers and accepts our signature."""
        if self.settings.preflight and regions:
            with self._preflight_timing():
                await check_registries(self._targets(regions), within=self.settings.preflight_timeout)
            log.info(
                "preflight passed in %.2f s: %s",
                self.timings["preflight"],
                "; ".join(
                    f"{f'{r.region}: ' if self._several else ''}bucket {r.bucket} reachable, registry "
                    f"{redact(r.mims.endpoint)} accepts our signature"
                    for r in regions
                ),
            )

    @contextlib.contextmanager
    def _preflight_timing(self) -> Iterator[None]:
        mark = anyio.current_time()
        try:
            yield
        finally:
            self.timings["preflight"] = self.timings.get("preflight", 0.0) + anyio.current_time() - mark

    def _targets(self, regions: list[_Region]) -> list[PreflightTarget]:
        return [PreflightTarget(r.region, r.s3, r.bucket, self.settings.s3_prefix, r.mims) for r in regions]

    async def _earlier_runs(self) -> list[list[tuple[S3Location, Manifest]]]:
        """Each region's manifests of earlier runs of this lineage (for that region)."""
        assert self.identity is not None
        group = f"{self.settings.s3_prefix}{self.identity.group}/"
        found: list[list[tuple[S3Location, Manifest]]] = [[] for _ in self.regions]

        async def look(index: int) -> None:
            region = self.regions[index]
            manifests = await find_manifests(region.s3, region.bucket, group)
            found[index] = [(where, m) for where, m in manifests if m.region == region.region]

        await run_all(functools.partial(look, index) for index in range(len(self.regions)))
        return found

    @_phase("preflight")
    async def _prepare(self) -> None:
        """Check the inputs, the metadata and the preflight; find what earlier runs left for the
        same inputs."""
        await self._check()
        identity = self.identity
        assert identity is not None
        attempt = new_run_id()
        self.attempt = attempt
        found = await self._earlier_runs() if identity.resumable else [[] for _ in self.regions]
        # A region with an earlier run of this lineage asks its registry about that run's
        # registration first (and follows it even while the registry is away) ...
        await self._probe([r for r, manifests in zip(self.regions, found, strict=True) if not manifests])
        if any(found):
            mark = anyio.current_time()
            archives = await self._digest()
            self.timings["digest"] = anyio.current_time() - mark
            await run_all(
                functools.partial(self._resume, region, manifests, archives)
                for region, manifests in zip(self.regions, found, strict=True)
                if manifests
            )
            # ... and is probed only if it has nothing to follow, before it uploads and submits.
            await self._probe(
                [r for r, manifests in zip(self.regions, found, strict=True) if manifests and not r.accepted]
            )
        for region in self.regions:
            if region.prefix is None:  # nothing to resume: a fresh attempt
                suffix = f"{region.region}/" if self._several else ""
                self._use(region, f"{self.settings.s3_prefix}{identity.group}/{attempt}/{suffix}", attempt, own=True)
                region.to_upload = set(self._sources) - set(region.carried)

    @_phase("resume")
    async def _resume(
        self, region: _Region, manifests: list[tuple[S3Location, Manifest]], archives: dict[str, str]
    ) -> None:
        """Take over what an earlier run left for these very inputs, if anything.

        A registration it made that this registry reports and is not FAILED is followed (not
        made again); one whose POST was never answered is submitted again with the same key;
        after FAILED ones, a new registration is made (a new key generation), reusing their
        artifacts if whole.  Runs of other inputs are not touched, nor the prefix of a run that
        went to another registry endpoint (unless this registry knows its registration).
        """
        same = [(where, m) for where, m in manifests if m.sha256s() == archives]
        if not same:
            log.info("%s: the earlier run(s) of this lineage registered other inputs", region.region)
            return
        here = redact(region.mims.endpoint)
        ended_failed: set[str] = set()  # the manifests whose registration the registry reports FAILED
        foreign: set[str] = set()  # the manifests naming a registration of other inputs
        for where, manifest in same:
            if manifest.registration is None:
                continue
            # Followed from the start, before anything is awaited: whatever stops the run while it
            # asks the registry, this prefix is the registration's and is kept (and named).
            self._adopt(region, where, manifest, manifest.registration.as_registration())
            registration_id = manifest.registration.registration_id
            # A registry may not know what it accepted a moment ago; another registry never will.
            since = manifest.updated_at if manifest.endpoint == here else None
            try:
                current = await self._look_up(region, registration_id, since=since)
            except RegistryError as exc:  # the wait asks again, until its own deadline
                log.warning(
                    "%s: the registry cannot say how registration %s is (%s); following it",
                    region.region,
                    registration_id,
                    exc.message.splitlines()[0],
                )
                current = region.accepted
            if current is not None and current.status == "FAILED":
                ended_failed.add(where.key)
            if current is None or current.status == "FAILED":
                log.info(
                    "%s: registration %s of an earlier run %s",
                    region.region,
                    registration_id,
                    "ended FAILED" if current else "is unknown to the registry",
                )
                self._release(region)
                continue
            if current.registration_id != registration_id or not self._same_contents(current, archives):
                # The manifest is data in a bucket: one edited, or a registry's mix-up, may name a
                # registration of another model.  Not followed nor reported as this one; and the
                # prefix is left alone, not taken over: the registration that does read it is not
                # known.  A fresh attempt's POST (the same key) finds the one that has these inputs.
                log.warning(
                    "%s: %s names registration %s, which the registry reports for other artifacts; not "
                    "following it, and not touching that prefix",
                    region.region,
                    where.uri,
                    registration_id,
                )
                foreign.add(where.key)
                self._release(region)
                continue
            region.accepted, region.status = current, current.status
            if self._final(region):
                region.final = current
            else:
                await self._check_artifacts(region, manifest)
            log.info(
                "%s: resuming registration %s (%s) of an earlier run, from %s",
                region.region,
                current.registration_id,
                current.status,
                where,
            )
            self._emit(
                RegistrationSubmitted(
                    current.registration_id, current.model_id, current.workflow_execution_arn, region.region, True
                )
            )
            return
        # What is left is not alive at this registry.  An earlier run's prefix is taken over only
        # if it went to this same endpoint: one of another registry (or under another name) may
        # still be read by a registration there.
        elsewhere = [where for where, m in same if m.endpoint != here]
        if elsewhere:
            log.info(
                "%s: %d earlier run(s) went to another registry endpoint; not touched", region.region, len(elsewhere)
            )
        same = [(where, m) for where, m in same if m.endpoint == here and where.key not in foreign]
        if not same:
            return
        unanswered = next(((w, m) for w, m in same if m.registration is None), None)
        if unanswered is not None:
            where, manifest = unanswered
            region.key, region.generation = manifest.idempotency_key, manifest.generation
            region.earlier_unanswered = True  # before any await: the registry may have it
            await self._take_over(region, where, manifest)
            log.info(
                "%s: an earlier run submitted these inputs and never heard back (%s); submitting the same key again",
                region.region,
                where,
            )
        else:
            where, manifest = same[0]
            region.generation = max(m.generation for _, m in same) + 1
            await self._carry_over(region, where, manifest, superseded=where.key in ended_failed)
            log.info(
                "%s: no earlier registration of these inputs is alive; a new one (key generation %d)",
                region.region,
                region.generation,
            )

    async def _take_over(self, region: _Region, where: S3Location, manifest: Manifest) -> None:
        """Work in an earlier run's prefix: its artifacts stand unless they are gone or changed.

        The manifest is written again first, as this run's: if the earlier run is still alive and
        its POST turns out never to have reached the registry, it finds the prefix taken over
        and leaves it (see `_taken_over`), instead of removing what this run's POST will have
        the registry read."""
        self._enter(region, where, manifest)
        await self._write_manifest(region, "submitting")
        await self._check_artifacts(region, manifest)

    async def _carry_over(self, region: _Region, where: S3Location, manifest: Manifest, *, superseded: bool) -> None:
        """A new registration of inputs an earlier run uploaded, from a prefix of this run's own:
        the artifacts still whole in the earlier prefix are copied inside S3 (see `_copy_carried`),
        the others uploaded.  The earlier prefix is never written to nor used in place: its run
        may still be alive, and remove it once its registration is final (as may a sweep).  This
        run removes it at the end if its registration ended FAILED (not if the registry merely
        did not know it: one it does know after all may still read it)."""
        # Before any await: a run cancelled while it checks the artifacts still removes it.
        if superseded:
            prefix = where.key.removesuffix(MANIFEST_NAME)
            region.superseded = TemporaryPrefix(
                region.s3, region.bucket, prefix, cleanup=self._cleanup, on_progress=self._emit
            )
        for name, problem in (await self._artifact_problems(region, manifest)).items():
            if problem is None:
                region.carried[name] = manifest.artifacts[name]
            else:
                log.warning(
                    "%s: %s is not whole (%s): uploading it again",
                    region.region,
                    manifest.artifacts[name].s3_uri,
                    problem,
                )

    async def _copy_carried(self, region: _Region) -> None:
        """Copy the carried artifacts into the region's own prefix, inside S3 (no byte through
        this process); one that cannot be copied (its earlier run removed it meanwhile, say) is
        uploaded instead."""

        async def copy(name: str, artifact: ManifestArtifact) -> None:
            earlier = artifact.uploaded()
            source = S3Archive(earlier.location, earlier.size, earlier.etag)
            target = S3Location(region.bucket, _prefix(region).key(f"{name}.tar.gz"))
            try:
                parts, stored = await copy_inside(
                    region.s3, source, target, self.settings, cleanup=self._cleanup, ledger=self._ledger
                )
            except StorageError as exc:
                await self._cleanup.recovered()  # its abort was no exit: the run's gets its whole time
                log.warning(
                    "%s: %s could not be copied from %s (%s): uploading it again",
                    region.region,
                    name,
                    source.location,
                    exc.message.splitlines()[0],
                )
                region.to_upload.add(name)
                return
            log.info("%s: %s copied from %s to %s inside S3", region.region, name, source.location, target)
            region.artifacts[name] = UploadedArtifact(
                target,
                source.size,
                artifact.sha256,
                parts,
                etag=stored.etag if stored else None,
                integrity="server-copy",
            )

        await run_all(functools.partial(copy, name, artifact) for name, artifact in region.carried.items())

    def _enter(self, region: _Region, where: S3Location, manifest: Manifest) -> None:
        """Make an earlier run's prefix (and the artifacts its manifest lists) this region's."""
        self._use(region, where.key.removesuffix(MANIFEST_NAME), manifest.attempt)
        region.created_at = manifest.created_at
        region.artifacts = {name: artifact.uploaded() for name, artifact in manifest.artifacts.items()}

    def _adopt(self, region: _Region, where: S3Location, manifest: Manifest, registration: Registration) -> None:
        """Follow the registration of an earlier run's manifest, in that run's prefix (no await)."""
        self._enter(region, where, manifest)
        region.accepted, region.status, region.reads_prefix, region.resumed = (
            registration,
            registration.status,
            True,
            True,
        )

    def _release(self, region: _Region) -> None:
        """Let go of an adopted registration that turned out not to be alive (nothing removed)."""
        region.prefix, region.attempt, region.artifacts = None, "", {}
        region.accepted, region.status, region.final = None, None, None
        region.reads_prefix = region.resumed = False

    async def _check_artifacts(self, region: _Region, manifest: Manifest) -> None:
        """Mark for upload the artifacts of the manifest that are gone or changed."""
        for name, problem in (await self._artifact_problems(region, manifest)).items():
            if problem is not None:
                log.warning(
                    "%s: %s is not whole (%s): uploading it again", region.region, artifact_uri(region, name), problem
                )
                region.to_upload.add(name)
        if not region.to_upload:
            log.info("%s: the artifacts under %s are whole: nothing to upload", region.region, _prefix(region).uri)

    @staticmethod
    async def _artifact_problems(region: _Region, manifest: Manifest) -> dict[str, str | None]:
        """Why each artifact of the manifest is not the one uploaded (see `problem`), or None;
        all asked at once."""
        problems: dict[str, str | None] = {}

        async def inspect(name: str, artifact: ManifestArtifact) -> None:
            problems[name] = await artifact.problem(region.s3)

        await run_all(functools.partial(inspect, n, a) for n, a in manifest.artifacts.items())
        return problems

    async def _look_up(
        self, region: _Region, registration_id: str, *, since: dt.datetime | None
    ) -> Registration | None:
        """The registration as the registry reports it, or None (see `MimsClient.look_up`); a
        registry that does not answer is not waited on here for longer than a wait would be."""
        deadline = min(self.settings.submit_timeout, self.settings.wait_timeout)
        return await region.mims.look_up(registration_id, accepted_at=since, deadline=deadline)

    @_phase("upload")
    async def _upload(self) -> None:
        """Upload each artifact once, to every region that needs it."""
        mark = anyio.current_time()
        # First what an earlier run left whole: copied inside S3 (or, failing that, uploaded).
        await run_all(functools.partial(self._copy_carried, r) for r in self.regions if r.carried)
        if self.settings.preflight:
            unprobed = [r for r in self.regions if r.to_upload and r.capabilities is None]
            await run_all(functools.partial(self._capabilities, r) for r in unprobed)

        async def upload(name: str) -> None:
            with log_fields(artifact=name), span("upload_artifact", artifact=name):
                await upload_one(name)

        async def upload_one(name: str) -> None:
            regions = [r for r in self.regions if name in r.to_upload]
            targets = [(r.s3, S3Location(r.bucket, _prefix(r).key(f"{name}.tar.gz"))) for r in regions]
            source = self._sources[name]
            levels = [r.capabilities.integrity if r.capabilities else assumed_integrity(self.settings) for r in regions]
            async with self._uploads:
                if isinstance(source, S3Archive):  # already in S3: copied there (or, from another region, streamed)
                    results = await copy_to_all(
                        self._s3,
                        source,
                        targets,
                        self.settings,
                        artifact=name,
                        workers=self._workers,
                        cleanup=self._cleanup,
                        ledger=self._ledger,
                        on_progress=self._emit,
                        local_copy=self._local_copies.get(name),
                        budget=self._budget,
                        integrity=levels,
                    )
                else:
                    results = await upload_to_all(
                        source,
                        targets,
                        self.settings,
                        artifact=name,
                        on_progress=self._emit,
                        cleanup=self._cleanup,
                        workers=self._workers,
                        budget=self._budget,
                        ledger=self._ledger,
                        integrity=levels,
                    )
            for region, result in zip(regions, results, strict=True):
                region.artifacts[name] = result
                region.to_upload.discard(name)
            annotate(bytes=results[0].size, parts=results[0].parts, integrity=results[0].integrity)

        names = sorted({name for r in self.regions for name in r.to_upload})
        await run_all(functools.partial(upload, name) for name in names)
        self.timings["upload"] = anyio.current_time() - mark

    async def _submit(self) -> list[Exception]:
        """Submit every region not accepted yet, each on its own; return their errors."""
        self._submitted_at = anyio.current_time()
        pending = [r for r in self.regions if r.accepted is None]
        errors = await outcomes(functools.partial(self._submit_region, r) for r in pending)
        return [_in_region(e, r.region, self._several) for e, r in zip(errors, pending, strict=True) if e]

    @_phase("submit")
    async def _submit_region(self, region: _Region) -> None:
        assert self.identity is not None
        archives = {name: artifact.sha256 for name, artifact in region.artifacts.items()}
        while True:
            if region.generation > MAX_GENERATIONS:
                raise RegistrationRejected(
                    f"{region.region}: {MAX_GENERATIONS} registrations of these inputs ended FAILED; not trying again"
                )
            key = region.key or self.identity.idempotency_key(
                archives, region=region.region if self._several else None, generation=region.generation
            )
            region.key = key
            # Before the POST: a run killed while it is in flight leaves the key behind.
            await self._write_manifest(region, "submitting")
            region.unanswered = True  # from here the registry may have it, answered or not
            delivery = Delivery()
            try:
                answer = await region.mims.submit(self._submission(region), idempotency_key=key, delivery=delivery)
            except IdempotencyConflict as conflict:
                # The key holds another body: ours was not taken.  (An earlier run's POST of this
                # very body would have made the key its own: that is not settled here.)
                region.unanswered = False
                if conflict.holder is None:
                    raise
                holder = await self._look_up(region, conflict.holder, since=dt.datetime.now(dt.UTC))
                if holder is not None and holder.status != "FAILED":
                    if not self._same_contents(holder, archives):
                        raise IdempotencyConflict(
                            f"{region.region}: the key {key} holds registration {holder.registration_id} of other "
                            "contents; give this model a key of its own (REGISTRAR_IDEMPOTENCY_KEY)",
                            url=conflict.url,
                            holder=holder.registration_id,
                        ) from conflict
                    await self._follow(region, holder)
                    return
                log.info(
                    "%s: the key %s belongs to registration %s, which %s; submitting again (key generation %d)",
                    region.region,
                    key,
                    conflict.holder,
                    "ended FAILED" if holder else "the registry does not know",
                    region.generation + 1,
                )
                region.key, region.generation = None, region.generation + 1
                continue
            except RegistryError as exc:  # a rejection, or no answer until the deadline
                region.unanswered = exc.may_have_arrived
                raise
            except BaseException:
                # Cancelled (a signal, the host's deadline) or failed otherwise: kept only if a POST
                # may have reached the registry (not while it waits to retry after 503s).
                region.unanswered = delivery.may_have_arrived
                raise
            if answer.status == "FAILED":  # the registry replayed this key's registration: it failed
                region.unanswered = region.earlier_unanswered = False
                log.info(
                    "%s: the key %s is registration %s, which ended FAILED; submitting again (key generation %d)",
                    region.region,
                    key,
                    answer.registration_id,
                    region.generation + 1,
                )
                region.key, region.generation = None, region.generation + 1
                continue
            # ---- the point of no return: the registry accepted, and reads the prefix from now on ----
            region.accepted, region.status, region.reads_prefix = answer, answer.status, True
            region.unanswered = region.earlier_unanswered = False
            if self._final(region):  # a replay of a registration that SUCCEEDED already
                region.final = answer
            await self._record_accepted(region)
            annotate(registration_id=answer.registration_id, model_id=answer.model_id, status=answer.status)
            self._emit(
                RegistrationSubmitted(
                    answer.registration_id, answer.model_id, answer.workflow_execution_arn, region.region
                )
            )
            return

    async def _record_accepted(self, region: _Region) -> None:
        """Name the registration in the run's manifest before anything else can stop the run
        (shielded, briefly): a re-run then follows it by its id, and `sweep` asks the registry
        about it.  Without it, the key in the manifest written before the POST still finds it."""
        with anyio.move_on_after(MANIFEST_TIMEOUT, shield=True) as scope:
            try:
                await self._write_manifest(region, "accepted")
            except StorageError as exc:
                log.warning("%s; a re-run still finds the registration by its key", exc.message)
        if scope.cancelled_caught:
            log.warning("writing the run manifest timed out; a re-run still finds the registration by its key")

    async def _follow(self, region: _Region, holder: Registration) -> None:
        """Follow the registration the registry named for our key: these inputs, registered before
        (by a run that finished, or one running now).  It reads that run's artifacts, not ours."""
        region.accepted, region.status, region.resumed = holder, holder.status, True
        if self._final(region):
            region.final = holder
        # Named in the manifest before it is announced: killed while it follows, the run leaves
        # a prefix that `sweep` removes once the registration is final, not one it spares until
        # --max-age as a POST that may have gone unanswered (this one was answered).
        await self._record_accepted(region)
        log.info(
            "%s: these inputs are registration %s (%s) already: following it",
            region.region,
            holder.registration_id,
            holder.status,
        )
        self._emit(
            RegistrationSubmitted(
                holder.registration_id, holder.model_id, holder.workflow_execution_arn, region.region, True
            )
        )

    def _same_contents(self, holder: Registration, archives: dict[str, str]) -> bool:
        """Whether the registration holding our key registered these archives."""
        reported = {"model": holder.model_artifact, "payload": holder.payload_artifact}
        if holder.model_artifact is not None:
            return {name: ref.sha256 for name, ref in reported.items() if ref is not None} == archives
        # The registry does not say: a key derived from these archives' sha256 holds these archives;
        # a key the caller chose may hold anything.
        return self.identity is not None and self.identity.explicit_key is None

    async def _wait(self) -> list[Exception]:
        """Wait for every accepted, unfinished registration, each on its own; return their errors."""
        waiting = [r for r in self.regions if r.accepted is not None and not self._final(r)]
        errors = await outcomes(functools.partial(self._wait_region, r) for r in waiting)
        now = anyio.current_time()
        self.timings["register"] = now - (self._submitted_at or now)
        self.timings["total"] = now - self._started
        return [_in_region(e, r.region, self._several) for e, r in zip(errors, waiting, strict=True) if e]

    @_phase("wait")
    async def _wait_region(self, region: _Region) -> None:
        assert region.accepted is not None
        registration_id = region.accepted.registration_id

        def changed(registration: Registration) -> None:
            region.status = registration.status
            self._emit(
                RegistrationStatusChanged(
                    registration.registration_id, registration.status, registration.failure_reason, region.region
                )
            )

        try:
            region.final = await region.mims.wait(
                registration_id, max_wait=self.settings.wait_timeout, on_status=changed, known=region.accepted
            )
        except (RegistrationFailed, RegistrationInterrupted):
            raise
        except RegistrarError as exc:  # the registration goes on at the registry; we lost sight of it
            raise RegistrationInterrupted(
                f"registration {registration_id} was accepted, but following it failed: {exc.message}",
                url=getattr(exc, "url", None),
            ) from exc
        region.status = region.final.status
        annotate(status=region.status, model_id=region.final.model_id)

    # --- the exit ----------------------------------------------------------------------

    @_phase("cleanup")
    async def _finalize(self, exc: BaseException | None, *, reason: str | None = None) -> tuple[str, ...]:
        """Remove what no registration needs, keep (and name) what one still reads.

        Runs once, on every way out, shielded and within one cleanup deadline for all regions.
        Returns what could not be removed.
        """
        if self._finalized:
            return ()
        self._finalized = True
        kept = [r for r in self.regions if r.prefix is not None and r.past_point_of_no_return]
        ended = [r for r in self.regions if r.prefix is not None and not r.past_point_of_no_return]
        found: list[tuple[str, ...]] = []
        with self._cleanup.shield():
            taken = await self._taken_over(ended)
            removed = [_prefix(r) for r in ended if r not in taken]
            removed += [r.superseded for r in self.regions if r.superseded is not None]
            found = [() for _ in removed]

            async def remove(index: int) -> None:
                found[index] = await removed[index].remove()

            async with anyio.create_task_group() as tg:
                for index in range(len(removed)):
                    tg.start_soon(remove, index)
        for region in taken:
            log.warning(
                "%s: another run of the same inputs took %s over (this run's POST never reached the registry; "
                "that run's may have): left to it",
                region.region,
                _prefix(region).uri,
            )
        leftovers = tuple(item for items in found for item in items)
        self._report(exc, reason, kept, leftovers)
        return leftovers

    async def _taken_over(self, regions: list[_Region]) -> list[_Region]:
        """The regions whose prefix another run took over (see `_take_over`): those this run wrote
        a manifest in, never accepted, whose manifest now names another run as its owner."""
        asked = [r for r in regions if r.wrote_manifest and r.accepted is None]
        owners: list[str | None] = [None] * len(asked)

        async def read(index: int) -> None:
            prefix = _prefix(asked[index])
            manifest = await read_manifest(asked[index].s3, S3Location(prefix.bucket, prefix.key(MANIFEST_NAME)))
            owners[index] = manifest.owner if manifest is not None else None

        async with anyio.create_task_group() as tg:
            for index in range(len(asked)):
                tg.start_soon(read, index)
        return [r for r, owner in zip(asked, owners, strict=True) if owner not in (None, self.attempt)]

    def _report(
        self, exc: BaseException | None, reason: str | None, kept: list[_Region], leftovers: tuple[str, ...]
    ) -> None:
        """Say what was kept and what was left, on the error, in the log and as an event."""
        registrations = tuple(view for r in self.regions if (view := r.accepted_view(kept=r in kept)) is not None)
        notes: list[str] = []
        hint = self._resume_hint() if kept else None
        if kept:
            lines = [v.describe() for v in registrations if v.kept_prefix]
            lines += [
                f"{r.region}: the registry may have accepted key {r.key} without answering; "
                f"its artifacts are kept under {_prefix(r).uri}"
                for r in kept
                if r.accepted is None
            ]
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            why = reason or ("cancelled" if cancelled or exc is None else f"{type(exc).__name__}")
            log.warning("stopped (%s) before the registration was final: %s; %s", why, "; ".join(lines), hint)
            notes += [*lines, str(hint)]
            self._emit(
                RegistrationKept(
                    registrations=tuple(v for v in registrations if v.kept_prefix),
                    prefixes=tuple(_prefix(r).uri for r in kept),
                    reason=why,
                    resume_hint=str(hint),
                )
            )
        elif exc is not None and registrations:
            notes += [v.describe() for v in registrations]
        if leftovers:
            message = f"could not remove everything under the run's prefix; {REMOVE_BY_HAND}"
            if exc is None:
                log.warning("%s %s", message, "; ".join(leftovers))
            else:
                log.error("%s %s", message, "; ".join(leftovers))
                notes.append(CleanupError(message, leftovers).message)
        if isinstance(exc, RegistrarError):
            exc.registrations = registrations
            exc.resume_hint = hint
        if isinstance(exc, Exception):
            for note in notes:
                exc.add_note(note)

    def _resume_hint(self) -> str:
        request = self.request
        if request.workflow_execution_id:
            how = f"the same lineage id (MODS_WORKFLOW_EXECUTION_ID={request.workflow_execution_id})"
        elif request.idempotency_key:
            how = f"the same key (REGISTRAR_IDEMPOTENCY_KEY={request.idempotency_key})"
        else:
            return (
                "this run had no lineage id (MODS_WORKFLOW_EXECUTION_ID), so a re-run registers anew; "
                "once the registration is final, remove the kept prefix (aws s3 rm --recursive)"
            )
        return (
            f"re-run with {how} and the same inputs to resume: it follows the registration without "
            "uploading again and removes the kept objects once the registration is final"
        )

    # --- helpers -----------------------------------------------------------------------

    def _chosen(self, errors: list[Exception]) -> Exception:
        """The error to raise when regions failed: the first, with the others as notes."""
        first = errors[0]
        for other in errors[1:]:
            log.warning("%s", other)
            first.add_note(f"also: {redact(str(other).splitlines()[0])}")
        return first

    @staticmethod
    def _final(region: _Region) -> bool:
        return region.status in TERMINAL_STATUSES

    def _use(self, region: _Region, prefix: str, attempt: str, *, own: bool = False) -> None:
        # The ledger vouches only for a prefix this run made: an earlier run's (taken over) may
        # hold uploads that run opened and never closed, which only a listing finds.
        ledger = self._ledger if own else None
        region.prefix = TemporaryPrefix(
            region.s3, region.bucket, prefix, cleanup=self._cleanup, on_progress=self._emit, ledger=ledger
        )
        region.attempt = attempt
        assert self.identity is not None
        log.info("run %s: %s prefix %s", self.identity.group, region.region, region.prefix.uri)

    def _submission(self, region: _Region) -> RegistrationSubmission:
        artifacts = region.artifacts
        return RegistrationSubmission.model_validate(
            {
                **self.request.config.to_wire(region.region),
                "model_artifact": _ref(artifacts["model"]),
                "payload_artifact": _ref(artifacts["payload"]) if "payload" in artifacts else None,
                "performance_metadata": self._metadata,
                "workflow_execution_id": self.request.workflow_execution_id,
            }
        )

    async def _write_manifest(self, region: _Region, state: Literal["submitting", "accepted"]) -> None:
        assert self.identity is not None
        assert region.key is not None
        accepted = region.accepted
        manifest = Manifest(
            state=state,
            group=self.identity.group,
            attempt=region.attempt,
            region=region.region,
            regions=list(self.request.config.regions),
            endpoint=redact(region.mims.endpoint),
            workflow_execution_id=self.request.workflow_execution_id,
            idempotency_key=region.key,
            generation=region.generation,
            artifacts={name: ManifestArtifact.of(a) for name, a in region.artifacts.items()},
            registration=ManifestRegistration.of(accepted) if accepted is not None and state == "accepted" else None,
            created_at=region.created_at,
            updated_at=dt.datetime.now(dt.UTC),
            owner=self.attempt,
        )
        prefix = _prefix(region)
        region.wrote_manifest = True  # before the await: a write cut off may have landed
        await write_manifest(region.s3, S3Location(prefix.bucket, prefix.key(MANIFEST_NAME)), manifest)

    async def _inspect(self) -> tuple[ArtifactSource | S3Archive, ArtifactSource | S3Archive | None]:
        """Scan the inputs (in a worker thread: trees can be large)."""
        follow = self.settings.dereference

        async def inspect(where: Path | str, role: str) -> ArtifactSource | S3Archive:
            if is_s3_uri(where):  # a training job's model.tar.gz, already in S3
                return await inspect_s3_archive(self._s3, str(where), role=role)
            return await self._workers.stream(lambda: inspect_artifact(Path(where), role=role, dereference=follow))

        payload_path = self.request.payload_path
        # A local payload that does not exist means none. Even a stat goes to the registrar's
        # own threads (anyio.Path would draw on the shared ones).
        has_payload = payload_path is not None and (
            is_s3_uri(payload_path) or await self._workers.stream(Path(payload_path).exists)
        )
        model = await inspect(self.request.model_path, "model")
        payload = await inspect(payload_path, "payload") if has_payload and payload_path is not None else None
        if self.request.model_local_copy is not None and isinstance(model, S3Archive):
            copy = self.request.model_local_copy
            found = await self._workers.stream(lambda: inspect_artifact(copy, role="model's local copy"))
            self._local_copies["model"] = local_copy_of(model, found, copy)
        return model, payload

    async def _digest(self) -> dict[str, str]:
        """The sha256 of each archive, without uploading: to compare with an earlier run's."""
        archives = {}
        for name, source in self._sources.items():
            log.info("hashing the %s to compare it with what an earlier run registered", name)
            if isinstance(source, S3Archive):
                _, archives[name] = await digest_s3_archive(
                    self._s3,
                    source,
                    self._workers,
                    check=False,
                    local_copy=self._local_copies.get(name),
                    settings=self.settings,
                )
            else:
                _, archives[name] = await digest_artifact(source, self.settings, workers=self._workers)
        return archives

    def _result(self, leftovers: tuple[str, ...]) -> RegistrationResult:
        registrations = []
        for region in self.regions:
            accepted = region.accepted
            final = region.final or accepted
            assert accepted is not None
            assert final is not None
            registrations.append(
                RegionRegistration(
                    region=region.region,
                    registration_id=final.registration_id,
                    model_id=final.model_id or accepted.model_id,
                    workflow_execution_arn=final.workflow_execution_arn or accepted.workflow_execution_arn,
                    model_artifact=region.artifacts["model"],
                    payload_artifact=region.artifacts.get("payload"),
                    resumed=region.resumed,
                )
            )
        self.timings.setdefault("upload", 0.0)
        return RegistrationResult(tuple(registrations), dict(self.timings), leftovers)

    @property
    def accepted(self) -> tuple[Registration, ...]:
        """Each region's accepted registration, in order."""
        return tuple(r.accepted for r in self.regions if r.accepted is not None)


def _prefix(region: _Region) -> TemporaryPrefix:
    assert region.prefix is not None
    return region.prefix


def artifact_uri(region: _Region, name: str) -> str:
    artifact = region.artifacts.get(name)
    return artifact.uri if artifact else name


def _ref(artifact: UploadedArtifact) -> ArtifactRef:
    return ArtifactRef(s3_uri=artifact.uri, size_bytes=artifact.size, sha256=artifact.sha256)


def _in_region(error: Exception, region: str, several: bool) -> Exception:
    if several:
        error.add_note(f"(in {region})")
    return error
