"""A registrar's threads are its own: anyio's shared 40 tokens can be gone, and it still finishes.

The deadlock this guards against: every upload's producer holds a worker-thread token for the
whole stream and blocks while its part queue is full; hashing a part needs a token too.  With
anyio's process-wide limiter (40 tokens) shared by 40 producers, or by a host application's own
`to_thread` work, the hashers never get one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from async_registrar import Registrar, Settings

from .conftest import MiB, leftovers, make_job, request_for


async def test_registrations_finish_while_the_host_holds_every_shared_thread_token(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """The host app's own `to_thread` work holds all of anyio's default tokens (shrunk to 2 here, as
    40 busy tasks would); three registrations of multi-part models still finish, on their own tokens
    (even the payload's existence check: `anyio.Path` would wait for a shared token)."""
    shared = anyio.to_thread.current_default_thread_limiter()
    before = shared.total_tokens
    release = threading.Event()
    shared.total_tokens = 2
    results = []
    try:
        async with anyio.create_task_group() as host:

            async def host_work() -> None:  # the host's blocking work, holding a shared token
                await anyio.to_thread.run_sync(release.wait)

            for _ in range(2):
                host.start_soon(host_work)
            try:
                await anyio.sleep(0.1)
                assert shared.borrowed_tokens == 2
                jobs = [make_job(tmp_path / str(i), model_bytes=16 * MiB) for i in range(3)]
                with anyio.fail_after(90):
                    async with Registrar(settings.model_copy(update={"max_parallel_uploads": 3})) as registrar:

                        async def register(job: dict[str, Path]) -> None:
                            results.append(await registrar.register(request_for(job)))

                        async with anyio.create_task_group() as tg:
                            for job in jobs:
                                tg.start_soon(register, job)
            finally:
                release.set()  # the host's threads end (they cannot be cancelled)
    finally:
        shared.total_tokens = before
    assert len({r.model_id for r in results}) == 3
    assert all(r.model_artifact.parts >= 4 for r in results)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.timeout(300)
async def test_several_registrars_in_one_process_do_not_starve_each_other(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """Four registrars with two uploads each, in one process, with anyio's shared tokens cut to
    two: each registrar's producers and hashers run on its own tokens, and all finish."""
    shared = anyio.to_thread.current_default_thread_limiter()
    before = shared.total_tokens
    shared.total_tokens = 2
    job = make_job(tmp_path, model_bytes=10 * MiB)
    done: list[str] = []

    async def one_registrar() -> None:
        async with (
            Registrar(settings.model_copy(update={"max_parallel_uploads": 2})) as registrar,
            anyio.create_task_group() as tg,
        ):
            for _ in range(2):
                tg.start_soon(register, registrar)

    async def register(registrar: Registrar) -> None:
        done.append((await registrar.register(request_for(job))).model_id)

    try:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(one_registrar)
    finally:
        shared.total_tokens = before
    assert len(set(done)) == 8
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
