"""A small HTTP-aware TCP proxy for fault injection in front of the moto server.

Each client connection carries one request (the proxy answers with `Connection:
close`), which keeps the parsing to request and response heads.  A rule looks at
the request (method and target) and picks what happens to it:

- `None`: forward it, unchanged, and relay the answer;
- `Reply(status, body)`: answer it here with a canned response (S3's XML errors);
- `RESET`: drop the connection with a TCP reset, as a broken network does;
- `Stall(seconds)`: forward it after a delay, as a slow or congested link does.

It runs its own event loop in a thread, so it works under any test.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    reason: str = "Error"


@dataclass(frozen=True)
class Stall:
    seconds: float


RESET = object()
Rule = Callable[[str, str], "Reply | Stall | object | None"]


def s3_error(status: int, code: str) -> Reply:
    """A canned S3 error answer."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
    return Reply(status, body.encode(), code)


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `upstream`, applying `rule` to each request."""

    def __init__(self, upstream: str, rule: Rule) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.rule = rule
        self.seen: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.endpoint = ""

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def count(self, method: str, fragment: str) -> int:
        """How many requests matched `method` and contained `fragment` in their target."""
        return sum(1 for m, t in self.seen if m == method and fragment in t)

    def _run(self) -> None:
        asyncio.run(self._main())  # cancels and awaits what is still running (stalled requests) at the end

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._handle(reader, writer)
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        async with server:
            await self._stop.wait()
        # Let the requests in flight end on their own (a connection cancelled while it is
        # being opened leaks its socket in Python 3.11); asyncio.run cancels the rest.
        if handlers:
            await asyncio.wait(set(handlers), timeout=1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        finally:  # on every way out, cancellation at shutdown included
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        method, target = head.split(b" ", 2)[:2]
        self.seen.append((method.decode(), target.decode()))
        action = self.rule(method.decode(), target.decode())
        try:
            if action is RESET:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if isinstance(action, Reply):
                await self._reply(head, reader, writer, action)
                return
            if isinstance(action, Stall):
                await asyncio.sleep(action.seconds)
            await self._forward(method, head, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    async def _reply(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Reply
    ) -> None:
        headers = head.lower()
        if b"expect: 100-continue" not in headers:  # the body is on its way: read it first
            length = _content_length(head)
            if length:
                await reader.readexactly(length)
        writer.write(
            f"HTTP/1.1 {reply.status} {reply.reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n\r\n".encode()
            + reply.body
        )
        await writer.drain()

    async def _forward(
        self, method: bytes, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            up_writer.write(head)
            await up_writer.drain()

            async def client_to_upstream() -> None:
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()

            pump = asyncio.ensure_future(client_to_upstream())
            try:
                while True:  # response heads: pass 100 Continue on, mark the final one `close`
                    response = await up_reader.readuntil(b"\r\n\r\n")
                    if response.startswith(b"HTTP/1.1 100"):
                        writer.write(response)
                        await writer.drain()
                        continue
                    break
                lines = [line for line in response.split(b"\r\n") if not line.lower().startswith(b"connection:")]
                writer.write(b"\r\n".join(lines[:-2]) + b"\r\nConnection: close\r\n\r\n")
                length = _content_length(response)
                if method == b"HEAD" or response[9:12] in (b"204", b"304"):
                    length = 0
                if length is None:
                    while data := await up_reader.read(65536):
                        writer.write(data)
                else:
                    writer.write(await up_reader.readexactly(length))
                await writer.drain()
            finally:
                pump.cancel()
        finally:
            up_writer.close()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None
