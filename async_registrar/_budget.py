"""The memory budget: the part buffers of all a registrar's uploads come out of one pool.

Each upload holds part buffers (the one being filled, those queued, those in flight) and its
gzip blocks, which its lease takes with its first part.  Their number is bounded per upload,
but not across uploads, and parts grow with the input (past about 155 GiB with 16 MiB parts,
to keep within 10,000 parts).  A `MemoryBudget` of `Settings.memory_limit` bytes bounds them
together:

- an upload starts with a `Lease` of one part (it waits until that fits, unless nothing is
  leased at all: one upload may always run, even with parts larger than the budget);
- each further buffer is taken only if it fits (`Lease.take_more`, from the producer's thread,
  never waiting); if not, the producer reuses a buffer the upload hands back, so fewer
  parts are in flight;
- everything is given back when the upload ends, however it ends.

An upload can always progress on its own lease, so no upload waits on another's buffers.
"""

from __future__ import annotations

import mmap
import threading

import anyio

__all__ = ["Lease", "MemoryBudget", "allocate"]


def allocate(size: int) -> mmap.mmap:
    """A zeroed, writable buffer of `size` bytes in a mapping of its own.

    Part buffers and gzip blocks (1 to 525 MiB) come and go with every upload, from many
    threads.  As `bytearray`s they came from glibc's heaps, which the dynamic mmap threshold
    lets them enter after the first one is freed, and fragmented them: 200 uploads at once
    in one process peaked at 752 MiB of RSS under a 512 MiB budget.  A mapping of its own
    goes back to the system the moment it is dropped (measured: 554 MiB).
    """
    return mmap.mmap(-1, size)


class MemoryBudget:
    """Bytes of part buffers that a registrar's uploads may hold together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()  # producers take extras from their own threads
        self._freed: anyio.Event | None = None
        #: The most ever held at once (for tests and the bench).
        self.high_water = 0

    @property
    def used(self) -> int:
        return self._used

    async def lease(self, minimum: int) -> Lease:
        """Wait until `minimum` bytes fit (or nothing is leased), then take them."""
        while True:
            with self._lock:
                if self._used == 0 or self._used + minimum <= self.limit:
                    self._take(minimum)
                    return Lease(self, minimum)
                if self._freed is None:
                    self._freed = anyio.Event()
                freed = self._freed
            await freed.wait()

    def try_take(self, size: int) -> bool:
        """Take `size` bytes if they fit; never waits (thread-safe)."""
        with self._lock:
            if self._used + size > self.limit:
                return False
            self._take(size)
            return True

    def give_back(self, size: int) -> None:
        """Return `size` bytes and wake the uploads waiting to start (from the event loop)."""
        with self._lock:
            self._used -= size
            freed, self._freed = self._freed, None
        if freed is not None:
            freed.set()

    def _take(self, size: int) -> None:
        self._used += size
        self.high_water = max(self.high_water, self._used)


class Lease:
    """One upload's share of the budget."""

    def __init__(self, budget: MemoryBudget, held: int) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self.held = held

    def take_more(self, size: int) -> bool:
        """Take `size` more bytes if the budget has them (from the producer's thread)."""
        if not self._budget.try_take(size):
            return False
        with self._lock:
            self.held += size
        return True

    def release(self) -> None:
        """Give back everything this upload held."""
        with self._lock:
            held, self.held = self.held, 0
        if held:
            self._budget.give_back(held)
