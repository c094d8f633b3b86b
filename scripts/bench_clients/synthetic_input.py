"""Bench client: a huge input streamed without disk, to measure memory at that size.

    python synthetic_input.py SIZE_GIB STOP_GIB WORK_DIR

Makes a sparse file of SIZE_GIB in WORK_DIR (no disk used), so that the scan, the size
bound and the part size are those of a real input that size.  Its reads are served by a
synthetic reader: a pipe fed with pseudo-random bytes (a 64 MiB random block, repeated:
deflate's 32 KiB window finds nothing in it, so it is as incompressible as weights) in place
of the holes.  The upload runs through `Registrar.upload` to s3://$BENCH_BUCKET/synthetic
until STOP_GIB have been uploaded, then is cancelled (its multipart upload is aborted).
Memory is flat once the pipeline is full (a few parts), so the peak over the first
STOP_GIB is the peak of the whole stream; RSS is sampled as it goes to show it.

Prints one JSON line: part size, parts sent, bytes uploaded, the RSS samples, the budget's
high water, and whether any multipart upload was left in the bucket.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import anyio

from async_registrar import Registrar, Settings, UploadProgress, _archive

GiB = 1024**3
MiB = 1024**2


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def feed(fd: int, size: int) -> None:
    """Write `size` pseudo-random bytes to the pipe `fd`, then close it."""
    block = memoryview(os.urandom(64 * MiB))
    left = size
    try:
        while left:
            n = os.write(fd, block[: min(left, len(block))])
            left -= n
            block = block[n:] if n < len(block) else memoryview(block.obj)
    except BrokenPipeError:
        pass  # the upload was cancelled
    finally:
        os.close(fd)


async def main(size_gib: float, stop_gib: float, work: Path) -> None:
    bucket = os.environ["BENCH_BUCKET"]
    model = work / "synthetic-model"
    model.mkdir(parents=True, exist_ok=True)
    weights = model / "weights.f32"
    size = int(size_gib * GiB)
    with weights.open("wb") as f:
        f.truncate(size)

    real_open = _archive._open_regular_fd

    def synthetic_open(path: str | os.PathLike[str]) -> tuple[int, int]:
        if os.fspath(path) != os.fspath(weights):
            return real_open(path)
        read, write = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(read, 1031, MiB)  # F_SETPIPE_SZ: 1 MiB reads
        except OSError:
            pass
        threading.Thread(target=feed, args=(write, size), daemon=True).start()
        return read, size

    _archive._open_regular_fd = synthetic_open  # type: ignore[assignment]

    settings = Settings.from_env(s3_bucket=bucket, mims_endpoint="http://mims.not-used.invalid")
    samples: list[tuple[float, float]] = []  # (GiB uploaded, RSS MiB)
    state = {"uploaded": 0, "parts": 0, "part_size": 0}
    stop = int(stop_gib * GiB)
    with anyio.CancelScope() as scope:

        def progress(p: UploadProgress) -> None:
            state["uploaded"], state["parts"] = p.bytes_uploaded, p.parts_done
            samples.append((p.bytes_uploaded / GiB, rss_mib()))
            if p.bytes_uploaded >= stop:
                scope.cancel()

        async with Registrar(settings) as registrar:
            started = time.perf_counter()
            try:
                await registrar.upload(model, f"s3://{bucket}/synthetic.tar.gz", on_progress=progress)
            finally:
                wall = time.perf_counter() - started
                high = registrar._budget.high_water
    import boto3

    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    left = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    first = state["uploaded"] / max(1, state["parts"])
    print(
        json.dumps(
            {
                "size_gib": size_gib,
                "uploaded_gib": state["uploaded"] / GiB,
                "parts": state["parts"],
                "part_mib": round(first / MiB),
                "wall": wall,
                "rss_samples": samples[:: max(1, len(samples) // 12)] + samples[-1:],
                "budget_high_water_mib": high / MiB,
                "budget_mib": settings.memory_limit / MiB,
                "multipart_uploads_left": len(left),
            }
        )
    )


if __name__ == "__main__":
    anyio.run(main, float(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]))
