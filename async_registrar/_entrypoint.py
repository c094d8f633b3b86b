"""The `async-registrar` command: the CLI, started and ended for a short-lived process.

Imports build a few hundred thousand objects (botocore's service models above all)
that live as long as the process.  Collecting while they are built, and scanning
them again in every full collection afterwards, cost about 0.2 s of a 2.5 s upload
of 20,000 small files (measured with `scripts/bench`).  So the collector is off
while the command's modules load, and what they built is then frozen out of its
view (`gc.freeze`); it runs as usual for everything made after.

The event loop's thread sends the parts while the producer's threads cut and hash them,
and each waits for the GIL whenever another runs Python.  With CPython's default switch
interval (5 ms) a wait could last that long, and the parts reached the server unevenly: a
1 GiB upload on the bench's two cores took 4.00 s (median of 8 runs), the server 4.7
CPU-s; with 1 ms, 3.63 s and 4.05 CPU-s (2 ms: 3.66 s; 0.2 ms no better).  So the command
asks for 1 ms.

Tearing those objects down again at exit cost another ~50 ms of every run (of a 0.5 s
upload of one small file): once the command has returned, the process runs its exit
handlers, flushes its output and ends (`os._exit`) without unloading every module.
httpx imports its own command line (click, rich and pygments, ~40 ms of the start-up)
whenever those are installed, as they are in many a data-science environment; the command
never runs it, so the entry point keeps it out (`httpx.main` is then httpx's stand-in that
says to install `httpx[cli]`).

SIGINT while the command still loads (its first few hundred milliseconds: imports) ends it
with 130 and one line, from a handler this module installs as it is imported: a
`KeyboardInterrupt` could land between two statements no `try` covers (entering `main`,
say) and end the process with Python's traceback.  Nothing has started then; the handler
gives way to Python's own just before the command runs, whose cleanup needs the exception.

These are the command's choices for its own process: the library never touches the
collector, the switch interval or signal handlers, and never exits.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

#: What SIGINT before the command runs says on stderr; the process then ends with 130.
INTERRUPTED_LOADING = "error: interrupted by SIGINT before anything started"


def _interrupted_while_loading(signum: int, frame: FrameType | None) -> None:
    """SIGINT while the command loads: nothing to clean up yet, so say so and end at once."""
    os.write(2, f"{INTERRUPTED_LOADING}\n".encode())
    os._exit(130)


#: Python's own SIGINT handling, unless the process was started with SIGINT ignored (a
#: background job of a script, `nohup`): then it stays ignored while the command loads.
_PYTHONS_HANDLER = (
    threading.current_thread() is threading.main_thread()  # where handlers can be set at all
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
)
if _PYTHONS_HANDLER:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

#: CPython's GIL switch interval for the command's process (see the module's docstring).
SWITCH_INTERVAL = 0.001


def main() -> NoReturn:
    """Load the command line with the collector paused, run it, and end the process with its code."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    if sys.stderr is None:  # started with stderr closed (`2>&-`): the log and errors go nowhere
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    try:
        gc.disable()
        try:
            # httpx loads its own command line (click, rich, pygments: ~40 ms) as it is
            # imported, wherever those are installed; this command never runs it.
            sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
            from ._cli import main as run
        finally:
            gc.freeze()
            gc.enable()
        if _PYTHONS_HANDLER:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the command's cleanup needs the exception
        code = run()
    except KeyboardInterrupt:  # SIGINT before the command handles signals itself (or as it hands them back)
        print("error: interrupted by SIGINT", file=sys.stderr)
        code = 130
    _end(code)


def _end(code: int) -> NoReturn:
    """End the process with `code` now, as the interpreter would, minus the teardown of
    every module: run the `atexit` handlers (logging's flush among them), flush stdout and
    stderr, exit.  A stream that cannot be flushed (a closed pipe) ends it with 120, as the
    interpreter does, unless `code` already says the command failed.  Only stdout's: it
    holds the result, while stderr's reader going away (a log shipper that died) loses only
    the log.  A SIGINT from here on is ignored: the command is over, and the exit it would
    interrupt is a few milliseconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit._run_exitfuncs()
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "closed", False):  # a stand-in may have no `closed`
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            flushed = flushed and stream is not sys.stdout
    os._exit(code if flushed else code or 120)
