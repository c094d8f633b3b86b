"""A small HTTP-aware TCP proxy for fault injection in front of the moto server.

Each client connection carries one request (the proxy answers with `Connection:
close`), which keeps the parsing to request and response heads.  A rule looks at
the request (method and target; and its headers, lower-cased, for a proxy made with
`with_headers=True`) and picks what happens to it:

- `None`: forward it, unchanged, and relay the answer;
- `Reply(status, body)`: answer it here with a canned response (S3's XML errors);
- `RESET`: drop the connection with a TCP reset, as a broken network does;
- `Stall(seconds)`: forward it after a delay, as a slow or congested link does;
- `Hold(release)`: forward it once the test sets `release` (a `threading.Event`): a link stuck
  for exactly as long as the test needs, however slow the machine;
- `Cut(after)`: forward it, and break the answer off (a reset) after `after` bytes of its body;
- `Late(seconds)`: forward it whole, and hold the answer back that long (a server that took
  the request and answers late, or, past the client's read timeout, never).

`HoldingProxy` holds the requests it picks not for a time but until the test releases them.

A proxy made with a `body_rule` also reads each request's body before it forwards it, and
lets the rule answer it or change it: `S3Server` makes one behave like the S3 servers that
check what they receive (or not), and damages bodies on the way.

It runs its own event loop in a thread, so it works under any test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    reason: str = "Error"


@dataclass(frozen=True)
class Stall:
    seconds: float


@dataclass(frozen=True)
class Cut:
    """Forward the request, then break its answer off with a reset after `after` bytes of the body."""

    after: int


@dataclass(frozen=True)
class Late:
    """Forward the request, then hold its answer back `seconds`."""

    seconds: float


@dataclass(frozen=True)
class Hold:
    """Forward the request once the test sets `release` (a threading.Event), not after a time."""

    release: threading.Event


RESET = object()
Rule = Callable[..., "Reply | Stall | Hold | Late | object | None"]  # (method, target[, headers])
#: Sees a request's whole body: answers it (a `Reply`) or gives the body to forward.
BodyRule = Callable[[str, str, dict[str, str], bytes], "Reply | bytes"]


def s3_error(status: int, code: str) -> Reply:
    """A canned S3 error answer."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
    return Reply(status, body.encode(), code)


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `upstream`, applying `rule` to each request."""

    def __init__(
        self, upstream: str, rule: Rule, *, with_headers: bool = False, body_rule: BodyRule | None = None
    ) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.rule = rule
        self._with_headers = with_headers
        self._body_rule = body_rule
        #: The headers of every request, in order (names lower-cased).
        self.headers: list[dict[str, str]] = []
        self.seen: list[tuple[str, str]] = []
        #: Bytes the clients sent on to the server (request heads and bodies).
        self.sent_bytes = 0
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
            except asyncio.CancelledError:
                pass  # a stalled request at shutdown (Python 3.11's stream callback would log it)
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
        headers = _headers(head)
        self.seen.append((method.decode(), target.decode()))
        self.headers.append(headers)
        if self._with_headers:
            action = self.rule(method.decode(), target.decode(), headers)
        else:
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
            if isinstance(action, Cut):
                await self._forward(method, head, reader, writer, cut=action.after)
                return
            if isinstance(action, Late):
                await self._forward(method, head, reader, writer, late=action.seconds)
                return
            if isinstance(action, Stall):
                await asyncio.sleep(action.seconds)
            if isinstance(action, Hold):
                while not action.release.is_set():  # the proxy's loop goes on serving the other requests
                    await asyncio.sleep(0.005)
            length = _content_length(head)
            if self._body_rule is not None and length:
                if b"expect: 100-continue" in head.lower():  # answered here: the body is read here
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:"))
                body = await reader.readexactly(length)
                outcome = self._body_rule(method.decode(), target.decode(), headers, body)
                if isinstance(outcome, Reply):
                    await self._reply(head, reader, writer, outcome, body_read=True)
                    return
                await self._forward(method, head, reader, writer, body=outcome)
                return
            await self._forward(method, head, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    async def _reply(
        self,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reply: Reply,
        *,
        body_read: bool = False,
    ) -> None:
        headers = head.lower()
        if not body_read and b"expect: 100-continue" not in headers:  # the body is on its way: read it first
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
        self,
        method: bytes,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        body: bytes | None = None,
        cut: int | None = None,
        late: float = 0.0,
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            up_writer.write(head)
            self.sent_bytes += len(head)

            async def client_to_upstream() -> None:
                # The answer is read meanwhile: a server may answer (an error) before it read
                # the body, and close (Go's servers do: rclone, SeaweedFS, JuiceFS).
                with contextlib.suppress(ConnectionError):
                    if body is not None:  # read whole by the proxy already
                        self.sent_bytes += len(body)
                        up_writer.write(body)
                        await up_writer.drain()
                        return
                    await up_writer.drain()
                    while data := await reader.read(65536):
                        self.sent_bytes += len(data)
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
                if late:
                    await asyncio.sleep(late)
                lines = [line for line in response.split(b"\r\n") if not line.lower().startswith(b"connection:")]
                writer.write(b"\r\n".join(lines[:-2]) + b"\r\nConnection: close\r\n\r\n")
                length = _content_length(response)
                if method == b"HEAD" or response[9:12] in (b"204", b"304"):
                    length = 0
                if cut is not None and length is not None and cut < length:  # part of the body, then a reset
                    writer.write(await up_reader.readexactly(cut))
                    await writer.drain()
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
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


class HoldingProxy(FaultProxy):
    """A fault proxy that holds the requests `holds(method, target, headers)` picks on their way to
    S3, not for a time but until the test calls `release()`: then they go on (a request whose
    client gave up meanwhile still reaches the server, late, as one held up on the network does).
    `arrived` is set when the first is held, `answered` once every one held was answered by S3
    after the release; `answers` has the status line S3 gave each.  Made inside the test's loop."""

    def __init__(self, upstream: str, holds: Callable[[str, str, dict[str, str]], bool]) -> None:
        super().__init__(upstream, lambda method, target, headers: None, with_headers=True)
        self._holds = holds
        self._released = threading.Event()
        self._test_loop = asyncio.get_running_loop()
        self.arrived = anyio.Event()
        self.answered = anyio.Event()
        self.answers: list[str] = []
        self._held = self._done = 0

    def release(self) -> None:
        self._released.set()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()  # nothing stays held past the test
        super().__exit__(*exc_info)

    def _signal(self, event: anyio.Event) -> None:
        self._test_loop.call_soon_threadsafe(event.set)

    async def _forward(self, method: bytes, head: bytes, reader: Any, writer: Any, **options: Any) -> None:
        verb, target = (part.decode() for part in head.split(b" ", 2)[:2])
        if self._released.is_set() or not self._holds(verb, target, _headers(head)):
            await super()._forward(method, head, reader, writer, **options)
            return
        self._held += 1
        self._signal(self.arrived)
        while not self._released.is_set():  # the proxy's own loop goes on serving the other requests
            await asyncio.sleep(0.005)
        try:
            await super()._forward(method, head, reader, _FirstLine(writer, self.answers.append), **options)
        finally:
            self._done += 1
            if self._done == self._held:
                self._signal(self.answered)


class _FirstLine:
    """A stream writer that hands the first line written (the answer's status line) to `record`."""

    def __init__(self, writer: Any, record: Callable[[str], None]) -> None:
        self._writer = writer
        self._record: Callable[[str], None] | None = record

    def write(self, data: bytes) -> None:
        if self._record is not None:
            self._record(data.split(b"\r\n", 1)[0].decode())
            self._record = None
        self._writer.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def refuse_copies(method: str, target: str, headers: dict[str, str]) -> Reply | None:
    """A rule (`with_headers=True`) answering every UploadPartCopy and CopyObject 404 NoSuchKey, as
    S3 does once the copy's source is gone."""
    return s3_error(404, "NoSuchKey") if method == "PUT" and "x-amz-copy-source" in headers else None


def is_listing(method: str, target: str) -> bool:
    """ListMultipartUploads: `GET /bucket?uploads...` (not ListParts, which names an uploadId)."""
    return method == "GET" and "uploads" in target and "uploadId=" not in target


def is_creation(method: str, target: str) -> bool:
    """CreateMultipartUpload: `POST /bucket/key?uploads`."""
    return method == "POST" and target.endswith("?uploads")


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def _headers(head: bytes) -> dict[str, str]:
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower().decode()] = value.strip().decode(errors="replace")
    return fields


def b2_rule(method: str, target: str, headers: dict[str, str]) -> Reply | None:
    """What Backblaze B2's S3 API does with S3's flexible-checksum headers: 400 InvalidArgument
    naming the first one (a rule for a proxy made with `with_headers=True`)."""
    for name in headers:
        if name.startswith(("x-amz-checksum-", "x-amz-sdk-checksum-")) or name == "x-amz-trailer":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
                f"<Message>Unsupported header '{name}' received for this API call.</Message></Error>"
            )
            return Reply(400, body.encode(), "Bad Request")
    return None


class S3Server:
    """A body rule that makes moto (which checks nothing) behave like another S3 server, and
    damages bodies on the way to it (a proxy with `b2_rule` refuses the checksum headers too).

    - `checks`: what the server verifies of a body: "crc" (x-amz-checksum-crc32), "md5"
      (Content-MD5), "sha256" (a signed x-amz-content-sha256); a mismatch is 400 BadDigest
      (XAmzContentSHA256Mismatch for sha256), as AWS answers;
    - `damage(fragment, times)`: flip the last byte of the next `times` bodies whose target
      holds `fragment` (-1: all of them), before the checks: damage in transit.
    """

    def __init__(self, checks: frozenset[str] = frozenset()) -> None:
        self.checks = checks
        self._damage: tuple[str, int] | None = None
        self.damaged = 0

    def damage(self, fragment: str, times: int = 1) -> None:
        self._damage = (fragment, times)

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply | bytes:
        if self._damage is not None and self._damage[0] in target and self._damage[1] != 0:
            self._damage = (self._damage[0], self._damage[1] - 1)
            self.damaged += 1
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        crc = headers.get("x-amz-checksum-crc32")
        if "crc" in self.checks and crc and crc != base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode():
            return s3_error(400, "BadDigest")
        md5 = headers.get("content-md5")
        if "md5" in self.checks and md5 and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():  # noqa: S324
            return s3_error(400, "BadDigest")
        sha256 = headers.get("x-amz-content-sha256", "")
        signed = sha256 and not sha256.startswith(("UNSIGNED", "STREAMING"))
        if "sha256" in self.checks and signed and sha256 != hashlib.sha256(body).hexdigest():
            return s3_error(400, "XAmzContentSHA256Mismatch")
        return body
