"""The plan of a registration: what `check` found it would do, without doing it.

`Registrar.check(request)` (and `async-registrar check`) validates the inputs,
runs the preflight, and returns a `RegistrationPlan`: for each artifact its files,
bytes, the bound of its archive's size, the part size and part count, and the
memory its upload takes; the temporary prefix and the registry of each region;
and whether a lineage id makes the run resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["ArtifactPlan", "RegionPlan", "RegistrationPlan"]

MiB = 1024 * 1024
#: The process's own footprint (interpreter, clients, event loop) besides the part buffers.
BASELINE_MEMORY = 85 * MiB


@dataclass(frozen=True, slots=True)
class ArtifactPlan:
    """How one artifact (the model or the payload) would be uploaded."""

    name: Literal["model", "payload"]
    #: The local path, or the `s3://` URI of an archive already in S3.
    path: Path | str
    #: "directory" (archived on the fly), "prebuilt" (a `.tar.gz` uploaded as it is) or "s3"
    #: (a `.tar.gz` already in S3, copied there).
    kind: Literal["directory", "prebuilt", "s3"]
    files: int
    content_bytes: int
    #: The archive's size at most (exact for a prebuilt archive).
    size_bound: int
    part_size: int
    #: Parts at most (S3 allows 10,000).
    parts: int
    #: The part buffers its upload holds at most.
    memory_bytes: int

    def describe(self) -> str:
        what = {"directory": f"{self.files} file(s)", "prebuilt": "a prebuilt .tar.gz"}.get(
            self.kind, "a .tar.gz in S3, copied there inside S3, or streamed to a bucket in another region"
        )
        limit = " (past S3's 5 TiB object limit: it must compress below it)" if self.size_bound > 5 * 1024**4 else ""
        return (
            f"{self.name}: {self.path} ({what}, {_size(self.content_bytes)}); archive at most "
            f"{_size(self.size_bound)}{limit}, parts of {_size(self.part_size)}, at most {self.parts} part(s), "
            f"buffers up to {_size(self.memory_bytes)}"
        )


@dataclass(frozen=True, slots=True)
class RegionPlan:
    """Where one region's artifacts would go, and which registry would register them."""

    region: str
    bucket: str
    #: The `s3://` prefix shared by every attempt of this registration (each run adds its own
    #: attempt folder under it).
    prefix: str
    endpoint: str
    #: What the region's S3 was found to check (one line), if a registration of this process
    #: probed it already (`check` writes nothing, so it does not probe).
    s3_checks: str | None = None
    #: What the uploads would be checked by, if known: "crc32", "crc64nvme", "md5",
    #: "sigv4-payload" or "size-only" (see `UploadedArtifact.integrity`).
    integrity: str | None = None

    def describe(self) -> str:
        line = f"{self.region}: temporary prefix {self.prefix}<run id>/; registry {self.endpoint}"
        if self.s3_checks:
            return line + f"\n{self.region}: {self.s3_checks}"
        return line + (
            f"\n{self.region}: what S3 checks of the uploads is probed just before the first one (check writes nothing)"
        )


@dataclass(frozen=True, slots=True)
class RegistrationPlan:
    """What a registration would do; returned by `Registrar.check` after the preflight passed."""

    artifacts: tuple[ArtifactPlan, ...]
    regions: tuple[RegionPlan, ...]
    #: MODS_WORKFLOW_EXECUTION_ID (or None).
    lineage_id: str | None
    #: Whether a re-run with the same lineage id (or idempotency key) resumes this registration.
    resumable: bool
    #: The earlier runs of this lineage found under the prefix (a re-run checks whether they
    #: registered these very inputs).
    earlier_runs: int = 0
    #: The artifacts uploaded at once (Settings.max_parallel_uploads).
    parallel_uploads: int = 1
    #: Seconds: "validate", "preflight".
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        """The peak memory the run is expected to take: the process plus the buffers of the
        uploads that run at once."""
        buffers = sorted((a.memory_bytes for a in self.artifacts), reverse=True)[: self.parallel_uploads]
        return BASELINE_MEMORY + sum(buffers)

    def lines(self) -> list[str]:
        """The plan, for a person: one line per artifact and region, then resumability."""
        if "preflight" in self.timings:
            lines = [f"preflight passed in {self.timings['preflight']:.2f} s: a registration would start"]
        else:
            lines = ["preflight skipped (REGISTRAR_PREFLIGHT=false): the inputs are valid"]
        lines += [a.describe() for a in self.artifacts]
        lines += [r.describe() for r in self.regions]
        lines.append(f"memory: about {_size(self.memory_bytes)} at peak")
        if self.resumable:
            how = f"lineage id {self.lineage_id}" if self.lineage_id else "its idempotency key"
            lines.append(
                f"resumable: yes, by {how} (a re-run with it resumes instead of registering again); "
                f"{self.earlier_runs} earlier run(s) of it found"
            )
        else:
            lines.append("resumable: no (set MODS_WORKFLOW_EXECUTION_ID to make a re-run resume this registration)")
        return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
