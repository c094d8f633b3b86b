"""The `async-registrar` command: the CLI, started with the collector set for a short-lived process.

Imports build a few hundred thousand objects (botocore's service models above all)
that live as long as the process.  Collecting while they are built, and scanning
them again in every full collection afterwards, cost about 0.2 s of a 2.5 s upload
of 20,000 small files (measured with `scripts/bench`).  So the collector is off
while the command's modules load, and what they built is then frozen out of its
view (`gc.freeze`); it runs as usual for everything made after.  This is the
command's choice for its own process: the library never touches the collector.
"""

from __future__ import annotations

import gc


def main() -> int:
    """Load the command line with the collector paused, then run it."""
    gc.disable()
    try:
        from ._cli import main as run
    finally:
        gc.freeze()
        gc.enable()
    return run()
