"""Bench client: many uploads at once in one process, through the public API.

    python many_uploads.py COUNT REGISTRARS DATA_DIR

COUNT uploads of the directory DATA_DIR, spread over REGISTRARS `Registrar`s (each with
the default settings but `max_parallel_uploads`, which is set so that every upload runs at
once), to s3://$BENCH_BUCKET/many/<i>.  Prints one JSON line: how many finished, the wall
time, and the largest memory budget any registrar held.  The launcher measures its RSS.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import anyio

from async_registrar import Registrar, Settings


async def main(count: int, registrars: int, data: Path) -> None:
    bucket = os.environ["BENCH_BUCKET"]
    per = -(-count // registrars)
    settings = Settings.from_env(
        s3_bucket=bucket, mims_endpoint="http://mims.not-used.invalid", max_parallel_uploads=min(per, 256)
    )
    done: list[int] = []
    highs: list[int] = []

    async def one(registrar: Registrar, i: int) -> None:
        await registrar.upload(data, f"s3://{bucket}/many/{i:04d}.tar.gz")
        done.append(i)

    async def group(first: int) -> None:
        async with Registrar(settings) as registrar, anyio.create_task_group() as tg:
            for i in range(first, min(first + per, count)):
                tg.start_soon(one, registrar, i)
        highs.append(registrar._budget.high_water)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for first in range(0, count, per):
            tg.start_soon(group, first)
    print(
        json.dumps(
            {
                "finished": len(done),
                "wall": time.perf_counter() - started,
                "budget_high_water_mib": max(highs) / 2**20,
                "budget_mib": settings.memory_limit / 2**20,
            }
        )
    )


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
