"""The memory budget: all a registrar's part buffers come out of one pool of memory_limit bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import Registrar, Settings
from async_registrar._budget import MemoryBudget

from .conftest import MiB, leftovers


async def test_a_lease_waits_until_its_first_part_fits_and_extras_never_wait() -> None:
    budget = MemoryBudget(10)
    first = await budget.lease(6)
    assert first.take_more(4)
    assert not first.take_more(1)  # full: an extra is refused at once
    started: list[str] = []

    async def second() -> None:
        lease = await budget.lease(6)
        started.append("second")
        lease.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.05)
        assert started == []  # waiting for room
        first.release()
    assert started == ["second"]
    assert budget.used == 0
    assert budget.high_water == 10


async def test_one_upload_may_always_run_even_with_parts_larger_than_the_budget() -> None:
    budget = MemoryBudget(10)
    lease = await budget.lease(50)
    assert budget.used == 50
    assert not lease.take_more(1)
    lease.release()
    assert budget.used == 0


@pytest.mark.timeout(300)
async def test_many_uploads_share_one_budget_and_all_finish(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Eight uploads of 20 MiB (5 MiB parts, 10 buffers each if unbounded: 400 MiB) through one
    registrar whose budget is 24 MiB: every upload finishes, and the buffers held at once never
    exceed the budget (fewer parts in flight instead)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(20 * MiB))
    tight = settings.model_copy(
        update={"memory_limit": 24 * MiB, "part_size": 5 * MiB, "max_parallel_uploads": 8, "upload_concurrency": 6}
    )
    results = []
    async with Registrar(tight) as registrar:

        async def upload(index: int) -> None:
            key = f"{settings.s3_prefix}budget/{index}.tar.gz"
            results.append(await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}"))

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for index in range(8):
                    tg.start_soon(upload, index)
        high_water = registrar._budget.high_water
        assert registrar._budget.used == 0
    assert len(results) == 8
    assert len({r.sha256 for r in results}) == 1
    assert all(r.parts == 5 for r in results)
    assert high_water <= 24 * MiB, high_water / MiB
    for result in results:
        await s3.delete_object(Bucket=settings.s3_bucket, Key=result.location.key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
