"""The worker threads of a registrar: its own tokens, never anyio's process-wide ones.

`anyio.to_thread.run_sync` draws, by default, on one limiter of 40 tokens shared by the
whole process.  An upload's producer holds its token for the whole stream and blocks
while the part queue is full; hashing a part needs a token too.  With 40 producers (40
uploads, or 10 registrars of 4, or a host application's own `to_thread` work) every token
is held by a producer waiting on a hasher that waits for a token: a deadlock.

So a registrar owns two limiters:

- `streams`, for work that runs long and may block on the next stage (an archive's
  producer, a digest, a scan of a tree): as many tokens as the registrar uploads at once,
  plus a few for scans;
- `quick`, for short CPU work that never waits on anything but the CPU (hashing a part):
  a stage a producer waits on always finds its own tokens.

Several registrars, and a host application using `to_thread`, cannot starve each other.

The few small files the library reads through aiofiles (the configuration, the performance
metadata) are read on `FILES`, a pool of its own: aiofiles would otherwise use asyncio's default
executor, which a host fills with `asyncio.to_thread` or `run_in_executor(None, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.to_thread

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["FILES", "Workers"]

#: aiofiles' executor for the library's reads of small files (see the module): its threads
#: start on first use, wait on nothing but the disk, and are shared by every registrar.
FILES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="async-registrar-files")

T = TypeVar("T")

#: Tokens beyond the uploads: scans and digests of registrations waiting for their turn.
SPARE_STREAMS = 2


class Workers:
    """A registrar's thread tokens (see the module)."""

    def __init__(self, streams: int, quick: int) -> None:
        self.streams = anyio.CapacityLimiter(streams)
        self.quick = anyio.CapacityLimiter(quick)

    @classmethod
    def for_settings(cls, settings: Settings) -> Workers:
        """Sized from the settings: a stream per upload at once (and spares), a quick token per
        upload (each hashes one part at a time)."""
        uploads = settings.max_parallel_uploads
        return cls(streams=uploads + SPARE_STREAMS, quick=max(2, uploads))

    async def stream(self, func: Callable[[], T]) -> T:
        """Run long or blocking work (it may wait on a later stage) in a thread."""
        return await anyio.to_thread.run_sync(func, limiter=self.streams)

    async def compute(self, func: Callable[[], T]) -> T:
        """Run short CPU work that waits on nothing else in a thread."""
        return await anyio.to_thread.run_sync(func, limiter=self.quick)
