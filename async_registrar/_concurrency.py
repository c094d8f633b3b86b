"""Small structured-concurrency helpers shared by the pipeline and the registrar."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from ._errors import RegistrarError

__all__ = ["CleanupDeadline", "first_error", "outcomes", "run_all"]

log = logging.getLogger("async_registrar")


class first_error:
    """Raise the one error that matters out of a task group's `ExceptionGroup`.

    anyio wraps every child failure in a group, even a single one.  Callers of this
    package expect its own errors, so: a group of cancellations only is left alone, so
    is one holding a KeyboardInterrupt or SystemExit, and otherwise the first
    `RegistrarError` wins, else the first error; any others are logged, not lost.  It
    never swallows an exception.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, BaseExceptionGroup):
            return
        cancelled = anyio.get_cancelled_exc_class()
        real = [e for e in _leaves(exc) if not isinstance(e, cancelled)]
        if not real or not all(isinstance(e, Exception) for e in real):
            # A KeyboardInterrupt or SystemExit stays in its group, as anyio raises it: raised
            # bare again in each task it passes, asyncio takes it each time for "stop the loop",
            # and a host's asyncio.run stopped halfway, its worker threads stranded.
            return
        chosen = next((e for e in real if isinstance(e, RegistrarError)), real[0])
        for other in real:
            if other is not chosen:
                log.debug("also failed: %r", other)
        raise chosen from None


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


async def run_all(calls: Iterable[Callable[[], Coroutine[Any, Any, object]]]) -> None:
    """Run every call at once in a task group; if any fails, the others are cancelled and
    the one error that matters is raised (see `first_error`)."""
    with first_error():
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)


async def outcomes(calls: Iterable[Callable[[], Coroutine[Any, Any, object]]]) -> list[Exception | None]:
    """Run every call at once; return each one's error (or None), in order.

    Unlike `run_all`, one call's failure does not cancel the others: each region of a
    registration goes on with its own work when another's fails.  Cancellation from
    outside still cancels them all, and propagates.
    """
    calls = list(calls)
    results: list[Exception | None] = [None] * len(calls)

    async def run(index: int) -> None:
        try:
            await calls[index]()
        except Exception as exc:  # kept for the caller, which decides what matters
            results[index] = exc

    async with anyio.create_task_group() as tg:
        for index in range(len(calls)):
            tg.start_soon(run, index)
    return results


def require_asyncio(what: str) -> None:
    """Raise `RuntimeError` naming `what` unless it runs in an asyncio event loop: aiobotocore and
    aiofiles work on asyncio only, and under trio they would fail deep inside ("no running event
    loop"), half-way through a run."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{what} runs on asyncio only (aiobotocore and aiofiles need it), not on another event loop "
            "(trio): run it with asyncio.run, or anyio.run(..., backend='asyncio')"
        ) from None


class CleanupDeadline:
    """The one deadline of an exit's cleanup, fixed when its first step starts.

    Every abort and delete of that exit runs under `shield()`, so together they finish
    within `timeout` seconds, however many steps, regions and retries there are: a
    container's grace period is per exit, not per step.  Only a cleanup may ask for it
    (the first ask starts the clock): work that is not an exit must never touch it.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._deadline: float | None = None

    @property
    def deadline(self) -> float:
        """The deadline (on anyio's clock); the first call starts it."""
        if self._deadline is None:
            self._deadline = anyio.current_time() + self.timeout
        return self._deadline

    def shield(self) -> anyio.CancelScope:
        """A scope shielded from outside cancellation that ends at the deadline."""
        return anyio.CancelScope(deadline=self.deadline, shield=True)

    async def recovered(self) -> None:
        """Say that the step which asked for the deadline failed and the work goes on (an
        abort of a step the caller recovers from, not an exit): the clock stops, and the exit
        gets its whole timeout.  A cancellation that arrived meanwhile is delivered first, so
        an exit under way keeps the deadline it started."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._deadline = None
