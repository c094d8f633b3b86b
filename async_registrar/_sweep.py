"""The sweep: remove what runs that never cleaned up left under the prefix.

SIGKILL, an OOM kill, a node failure or a SageMaker stop after its grace period
end a run with no chance to clean up: its objects and open multipart uploads stay
under `{prefix}{group}/{attempt}/`.  `sweep` lists the prefix (objects and open
multipart uploads, paginated), groups them into runs, and removes each run older
than a threshold - unless the registry still needs it.  A run's age is that of
its youngest evidence: its newest object, its newest open upload, and the start
time its attempt's name carries (`new_run_id`; a time in the future counts as
young).  The name matters because a server may report any `Initiated` for an
upload (moto reports 2010-11-10 for every one): a run whose only trace is the
upload in flight must not look old.  The registry may still need an old run:

- a run whose manifest names a registration the registry reports PENDING or
  IN_PROGRESS is spared (the registry reads its artifacts);
- a run whose manifest says a POST may have reached the registry unanswered, or
  whose registry cannot be asked (unreachable, another endpoint than the one
  configured, a refusal), is spared until it is older than `max_age`.

Only the configured registry endpoint is ever asked (a manifest is data in a
bucket; its endpoint is compared, never followed).  Nothing outside the prefix is
touched, and an empty prefix is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from ._concurrency import run_all
from ._errors import ConfigurationError, RegistrarError, StorageError, redact
from ._manifest import MANIFEST_NAME, read_manifest
from ._mims_client import NOT_FOUND_GRACE, MimsClient
from ._mims_contract import TERMINAL_STATUSES
from ._request import run_id_time
from ._s3 import S3Client, S3Location, storage_errors

__all__ = ["RunSwept", "SweepReport", "sweep"]

log = logging.getLogger("async_registrar.sweep")

#: Keys per DeleteObjects request (S3's limit).
DELETE_BATCH = 1000
#: Runs examined and removed at once.
CONCURRENT_RUNS = 16
#: How far in the future a manifest's time may be (clocks of hosts differ) before it is no
#: run's: a run writes it with its own clock, which may run ahead of this one.
CLOCK_SKEW = 15 * 60

#: The MIMS client for a region (the configured endpoint, signed for that region).
RegistryFor = Callable[[str], Awaitable[MimsClient]]


@dataclass(frozen=True, slots=True)
class RunSwept:
    """One run prefix the sweep looked at, and what it did with it."""

    prefix: str  # s3://bucket/{prefix}{group}/{attempt}/
    age_seconds: float
    objects: int
    uploads: int
    bytes: int
    #: "removed", "spared" or "young" (below the threshold: not looked into).
    outcome: str
    reason: str = ""
    registration_id: str | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What a sweep found and did (or, with `dry_run`, would do)."""

    #: The bucket(s) swept (one per region with a `{region}` bucket name).
    buckets: tuple[str, ...]
    prefix: str
    dry_run: bool
    runs: tuple[RunSwept, ...] = ()
    #: Keys under the prefix that are not in a run's layout: left alone.
    not_runs: tuple[str, ...] = ()
    #: What could not be removed (each `s3://` key or upload id).
    leftovers: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def removed(self) -> tuple[RunSwept, ...]:
        return tuple(r for r in self.runs if r.outcome == "removed")

    @property
    def spared(self) -> tuple[RunSwept, ...]:
        return tuple(r for r in self.runs if r.outcome == "spared")

    @property
    def objects_removed(self) -> int:
        return sum(r.objects for r in self.removed)

    @property
    def uploads_aborted(self) -> int:
        return sum(r.uploads for r in self.removed)

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.removed)

    def lines(self) -> list[str]:
        """The summary, for a person."""
        would = "would be " if self.dry_run else ""
        lines = [
            f"sweep of {', '.join(f's3://{b}/{self.prefix}' for b in self.buckets)}"
            f"{' (dry run: nothing removed)' if self.dry_run else ''}: "
            f"{len(self.runs)} run(s) seen, {len(self.removed)} {would}removed, {len(self.spared)} spared, "
            f"{sum(r.outcome == 'young' for r in self.runs)} younger than the threshold",
            f"{self.objects_removed} object(s) and {self.uploads_aborted} open multipart upload(s) {would}removed, "
            f"{self.bytes_freed} bytes {'would be ' if self.dry_run else ''}freed",
        ]
        for run in self.spared:
            status = f" ({run.status})" if run.status else ""  # not known when the registry was not asked
            what = f"registration {run.registration_id}{status}" if run.registration_id else "spared"
            lines.append(f"spared {run.prefix}: {what}: {run.reason}")
        if self.not_runs:
            lines.append(f"{len(self.not_runs)} key(s) under the prefix are not a run's: left alone")
        lines += [f"left behind: {item}" for item in self.leftovers]
        return lines


@dataclass
class _Run:
    prefix: str  # the key prefix {prefix}{group}/{attempt}/
    objects: list[tuple[str, int]] = field(default_factory=list)  # key, size
    uploads: list[tuple[str, str]] = field(default_factory=list)  # key, upload id
    #: The youngest evidence of the run: its newest object or upload, or its attempt's start.
    newest: dt.datetime | None = None

    def saw(self, when: dt.datetime) -> None:
        self.newest = when if self.newest is None or when > self.newest else self.newest


async def sweep(
    s3: S3Client,
    bucket: str,
    prefix: str,
    *,
    registry_for: RegistryFor,
    endpoint_for: Callable[[str], str],
    older_than: float,
    max_age: float,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    lookup_deadline: float = 30.0,
) -> SweepReport:
    """Sweep `s3://bucket/prefix`: see the module.  Raises `StorageError` if it cannot be listed."""
    if not prefix.strip("/"):
        raise ConfigurationError(
            "sweep refuses an empty prefix (it would judge a whole bucket); set --prefix / REGISTRAR_S3_PREFIX "
            "to the registrar's temporary prefix"
        )
    started = anyio.current_time()
    now = now or dt.datetime.now(dt.UTC)
    runs, not_runs = await _list_runs(s3, bucket, prefix)
    results: dict[str, RunSwept] = {}
    leftovers: list[str] = []
    limiter = anyio.CapacityLimiter(CONCURRENT_RUNS)
    removable: list[_Run] = []

    async def judge(run: _Run) -> None:
        async with limiter:
            # Negative for a start time in the future (clock skew): young even to `older_than=0`.
            age = (now - run.newest).total_seconds() if run.newest else 0.0
            size = sum(s for _, s in run.objects)
            swept = functools.partial(
                RunSwept, f"s3://{bucket}/{run.prefix}", age, len(run.objects), len(run.uploads), size
            )
            if age < older_than:
                results[run.prefix] = swept(outcome="young")
                return
            spare = await _why_spare(
                s3, bucket, run, age, max_age, registry_for, endpoint_for, lookup_deadline, now=now
            )
            if spare is not None:
                reason, registration_id, status = spare
                log.info("sweep: spared s3://%s/%s: %s", bucket, run.prefix, reason)
                results[run.prefix] = swept(
                    outcome="spared", reason=reason, registration_id=registration_id, status=status
                )
                return
            removable.append(run)
            results[run.prefix] = swept(outcome="removed")

    await run_all(functools.partial(judge, run) for run in runs.values())
    if removable and not dry_run:
        # Judging every run can take minutes; a re-run of a lineage may take a judged run's
        # prefix over meanwhile (a new manifest, new artifacts, a new registration reading
        # them).  A run that changed since it was listed is left to the next sweep.
        changed = await _changed_since_listed(s3, bucket, prefix, removable)
        for run in changed:
            reason = (
                "it changed while the sweep judged it, or could not be listed again (a re-run may have "
                "taken it over); judged again next time"
            )
            log.info("sweep: spared s3://%s/%s: %s", bucket, run.prefix, reason)
            results[run.prefix] = dataclasses.replace(results[run.prefix], outcome="spared", reason=reason)
        spared = {id(run) for run in changed}
        removable = [run for run in removable if id(run) not in spared]
        leftovers += await _remove(s3, bucket, removable)
        for run in removable:
            log.info("sweep: removed s3://%s/%s (%d object(s), %d upload(s))", bucket, run.prefix, *_counts(run))
    report = SweepReport(
        buckets=(bucket,),
        prefix=prefix,
        dry_run=dry_run,
        runs=tuple(results[p] for p in sorted(results)),
        not_runs=tuple(sorted(not_runs)),
        leftovers=tuple(leftovers),
        seconds=anyio.current_time() - started,
    )
    return report


def _run_prefix(prefix: str, key: str) -> str | None:
    """`{prefix}{group}/{attempt}/` of a key in a run's layout, or None."""
    parts = key[len(prefix) :].split("/")
    if len(parts) < 3 or not parts[0].startswith("run-") or not parts[1]:
        return None
    return f"{prefix}{parts[0]}/{parts[1]}/"


async def _list_runs(s3: S3Client, bucket: str, prefix: str) -> tuple[dict[str, _Run], list[str]]:
    """The runs under `prefix`, and the keys under it that are not in a run's layout."""
    runs: dict[str, _Run] = {}
    not_runs: list[str] = []

    def run_of(key: str) -> _Run | None:
        where = _run_prefix(prefix, key)
        if where is None:
            not_runs.append(key)
            return None
        if where not in runs:
            runs[where] = _Run(where)
            # The attempt's start time, from its name (`{group}/{attempt}/`): whatever a server
            # says of an upload's Initiated, a run is no older than its attempt.
            started = run_id_time(where.rstrip("/").rsplit("/", 1)[1])
            if started is not None:
                runs[where].saw(started)
        return runs[where]

    with storage_errors("ListObjectsV2", bucket, prefix):
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                run = run_of(item["Key"])
                if run is not None:
                    run.objects.append((item["Key"], int(item.get("Size", 0))))
                    run.saw(item["LastModified"])
    with storage_errors("ListMultipartUploads", bucket, prefix):
        paginator = s3.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                run = run_of(upload["Key"])
                if run is not None:
                    run.uploads.append((upload["Key"], upload["UploadId"]))
                    run.saw(upload["Initiated"])
    return runs, not_runs


async def _why_spare(
    s3: S3Client,
    bucket: str,
    run: _Run,
    age: float,
    max_age: float,
    registry_for: RegistryFor,
    endpoint_for: Callable[[str], str],
    deadline: float,
    *,
    now: dt.datetime,
) -> tuple[str, str | None, str | None] | None:
    """Why the registry may still need this run (reason, registration id, status), or None."""
    old = age >= max_age
    for key, _ in run.objects:
        if not key.endswith("/" + MANIFEST_NAME):
            continue
        problems: list[str] = []
        manifest = await read_manifest(s3, S3Location(bucket, key), problems=problems)
        if manifest is None:
            # A manifest that is there but unreadable (denied, a newer version's) may well
            # name a registration that still reads this run: only no manifest says none does.
            if old:
                continue
            return (f"its manifest {problems[-1]}; spared until --max-age", None, None)
        configured = redact(endpoint_for(manifest.region))
        if manifest.registration is None:
            if old:
                continue
            return (
                f"a POST (key {manifest.idempotency_key}) may have reached the registry unanswered; spared "
                "until --max-age",
                None,
                None,
            )
        registration_id = manifest.registration.registration_id
        if manifest.endpoint != configured:
            if old:
                continue
            return (
                f"its registration went to another registry ({manifest.endpoint}), which is not asked; spared "
                "until --max-age",
                registration_id,
                manifest.registration.status,
            )
        try:
            mims = await registry_for(manifest.region)
            with anyio.fail_after(deadline):
                current = await mims.get(registration_id, deadline=deadline)
        except (RegistrarError, TimeoutError) as exc:
            if old:
                continue
            why = exc.message.splitlines()[0] if isinstance(exc, RegistrarError) else "no answer in time"
            return (f"the registry cannot be asked ({why}); spared until --max-age", registration_id, None)
        if current is not None and current.status not in TERMINAL_STATUSES:
            return (f"the registry reports it {current.status}", registration_id, current.status)
        since = (now - manifest.updated_at).total_seconds()
        if since < -CLOCK_SKEW:  # a time no run wrote: it would pin the run past --max-age
            if old:
                continue
            return (
                f"its manifest is dated {manifest.updated_at.isoformat()}, in the future; spared until --max-age",
                registration_id,
                None,
            )
        if current is None and since < NOT_FOUND_GRACE:  # as `MimsClient.look_up` allows
            return (
                f"the registry does not know it yet, {since:.0f} s after it accepted it (it has {NOT_FOUND_GRACE:g} s)",
                registration_id,
                None,
            )
    return None


async def _changed_since_listed(s3: S3Client, bucket: str, prefix: str, runs: Sequence[_Run]) -> list[_Run]:
    """The runs whose objects or open uploads are no longer those listed (or are newer), from
    one listing of the prefix again (as many requests as the first: not one per run).  If it
    cannot be listed, none is known unchanged."""
    try:
        found, _ = await _list_runs(s3, bucket, prefix)
    except StorageError as exc:
        log.warning("sweep: s3://%s/%s cannot be listed again (%s); nothing removed", bucket, prefix, exc.message)
        return list(runs)

    def changed(run: _Run) -> bool:
        now = found.get(run.prefix, _Run(run.prefix))
        return (
            sorted(now.objects) != sorted(run.objects)
            or sorted(now.uploads) != sorted(run.uploads)
            or (now.newest is not None and (run.newest is None or now.newest > run.newest))
        )

    return [run for run in runs if changed(run)]


def _counts(run: _Run) -> tuple[int, int]:
    return len(run.objects), len(run.uploads)


async def _remove(s3: S3Client, bucket: str, runs: Sequence[_Run]) -> list[str]:
    """Abort the runs' open uploads, then delete their objects in DeleteObjects batches of up to
    1,000 keys (several at once); return what is left."""
    leftovers: list[str] = []
    limiter = anyio.CapacityLimiter(CONCURRENT_RUNS)

    async def abort(key: str, upload_id: str) -> None:
        async with limiter:
            try:
                with storage_errors("AbortMultipartUpload", bucket, key):
                    await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except StorageError as exc:
                if exc.code not in ("NoSuchUpload", "404"):
                    log.warning("%s", exc)
                    leftovers.append(f"s3://{bucket}/{key} (open multipart upload, upload id {upload_id})")

    async def delete(batch: Sequence[str]) -> None:
        async with limiter:
            try:
                with storage_errors("DeleteObjects", bucket, batch[0]):
                    answer = await s3.delete_objects(
                        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                    )
            except StorageError as exc:
                log.warning("%s", exc)
                leftovers.extend(f"s3://{bucket}/{k}" for k in batch)
                return
            leftovers.extend(f"s3://{bucket}/{e.get('Key')} ({e.get('Code')})" for e in answer.get("Errors", []))

    await run_all(functools.partial(abort, key, upload_id) for run in runs for key, upload_id in run.uploads)
    keys = [key for run in runs for key, _ in run.objects]
    await run_all(functools.partial(delete, batch) for batch in _batches(keys, DELETE_BATCH))
    return leftovers


def _batches(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
