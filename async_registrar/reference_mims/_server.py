"""Running the reference service: in a background thread (tests, demo) or in the foreground (CLI)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from .._mims_contract import Registration
from ._app import create_app
from ._settings import ReferenceMimsSettings

__all__ = ["ThreadedMimsServer", "serve"]


class ThreadedMimsServer:
    """The reference service on loopback in a thread of its own, with its own event loop.

    A thread keeps its loop apart from the caller's, and uvicorn installs no signal
    handlers outside the main thread: embedding it changes nothing for the host.
    """

    def __init__(self, settings: ReferenceMimsSettings, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._settings = settings
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.endpoint = ""
        self.app: Starlette | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; return once the service accepts requests."""
        if self._thread is not None:
            raise RuntimeError("a ThreadedMimsServer can be started only once")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        host, port = sock.getsockname()[:2]
        self.endpoint = f"http://{host}:{port}"
        self.app = create_app(self._settings)
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", lifespan="on", access_log=False)
        self._server = uvicorn.Server(config)

        def run() -> None:
            try:
                assert self._server is not None
                self._server.run(sockets=[sock])
            except BaseException as exc:  # reported by start()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name="reference-mims", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reference MIMS service did not start: {self._error!r}")
            time.sleep(0.01)

    def registration(self, registration_id: str) -> Registration | None:
        """The registration as the service holds it now, or None if it has no such registration."""
        if self.app is None:
            return None
        record = self.app.state.registry.records.get(registration_id)
        return record.registration if record is not None else None

    @property
    def registration_count(self) -> int:
        """How many registrations the service has accepted (each idempotency key counts once)."""
        return len(self.app.state.registry.records) if self.app is not None else 0

    def finish_processing(self) -> None:
        """End the processing delay of every registration now, and of those to come (a test
        keeps a registration unfinished for as long as it needs, whatever the machine's
        speed, then lets it finish at once)."""
        if self.app is not None:
            self.app.state.registry.released.set()

    def hold_processing(self) -> None:
        """Undo `finish_processing()`: the registrations to come (and those not finished yet)
        stay unfinished again, until the next `finish_processing()`."""
        if self.app is not None:
            self.app.state.registry.released.clear()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ThreadedMimsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(settings: ReferenceMimsSettings, *, host: str, port: int) -> None:
    """Serve in the foreground until interrupted (the `mims-server` command)."""
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", lifespan="on")
