"""Host name lookups on the library's own threads, for both of its HTTP clients.

`getaddrinfo` blocks, so the event loop runs it in a thread: asyncio's default executor,
which aiohttp's resolver (the S3 client) and anyio's `connect_tcp` (under httpx, the registry
client) both use.  A host application fills that executor with its own `asyncio.to_thread`
or `run_in_executor(None, ...)` work, and every new connection of ours to an endpoint given by
name would wait for it, with no bound.  So lookups run on `LOOKUPS`, a small pool of the
library's:

- `Resolver`, an aiohttp resolver, given to aiobotocore's connector (`connector_args`);
- `NetworkBackend`, an httpcore network backend that resolves the name there and connects
  to the addresses, installed in the registrar's own `httpx.AsyncClient` (`use_own_lookups`).

A lookup waits on the network, never on the library, so one process-wide pool cannot
deadlock; a lookup that hangs holds one of its threads until the system resolver gives up.
A cancelled lookup returns at once and leaves its thread to finish.  Addresses such as
`127.0.0.1` need no lookup and never reach the pool.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp.abc import AbstractResolver, ResolveResult

if TYPE_CHECKING:  # httpcore costs the `upload` command ~90 ms of start-up: imported when used
    import httpcore
    import httpx

__all__ = ["LOOKUPS", "NetworkBackend", "Resolver", "getaddrinfo", "use_own_lookups"]

#: The threads that resolve host names (see the module); they start on first use.
LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="async-registrar-lookups")

#: What aiohttp's own resolver passes: only the address families this host can reach.
_AI_ADDRCONFIG = getattr(socket, "AI_ADDRCONFIG", 0)
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_NAME_FLAGS = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
#: How long an address may take to connect before the next is tried too (anyio's default).
HAPPY_EYEBALLS_DELAY = 0.25


async def getaddrinfo(
    host: str, port: int | str | None, *, family: int = 0, type: int = 0, flags: int = 0
) -> list[tuple[Any, ...]]:
    """`socket.getaddrinfo` on `LOOKUPS`."""
    call = functools.partial(socket.getaddrinfo, host, port, family, type, 0, flags)
    return await asyncio.get_running_loop().run_in_executor(LOOKUPS, call)


class Resolver(AbstractResolver):
    """aiohttp's threaded resolver, on `LOOKUPS` instead of the default executor.

    A lookup that takes more than `timeout` seconds fails with a `TimeoutError`, which aiohttp
    raises as its connection timeout and botocore retries as `ConnectTimeoutError` (aiohttp's
    socket connect timeout, which botocore sets, does not cover the lookup).  A name that does
    not resolve stays the `socket.gaierror`: aiohttp's DNS error, botocore's
    `EndpointConnectionError`.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            with anyio.fail_after(self._timeout):
                infos = await getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, flags=_AI_ADDRCONFIG)
        except TimeoutError:
            raise TimeoutError(f"looking up {host} took more than {self._timeout} s") from None
        hosts: list[ResolveResult] = []
        for found_family, _, proto, _, address in infos:
            if found_family == socket.AF_INET6:
                if len(address) < 3:
                    continue  # IPv6 without support in this Python
                if address[3]:
                    # A link-local address: its scope id is in the name, as aiohttp does it.
                    call = functools.partial(socket.getnameinfo, address, _NAME_FLAGS)
                    name, service = await asyncio.get_running_loop().run_in_executor(LOOKUPS, call)
                    resolved, found_port = name, int(service)
                else:
                    resolved, found_port = address[0], address[1]
            elif found_family == socket.AF_INET:
                resolved, found_port = address[0], address[1]
            else:
                continue
            hosts.append(
                ResolveResult(
                    hostname=host, host=resolved, port=found_port, family=found_family, proto=proto, flags=_NUMERIC
                )
            )
        return hosts

    async def close(self) -> None:
        pass


def _in_connect_order(infos: list[tuple[Any, ...]]) -> list[str]:
    """The addresses of `getaddrinfo`'s answer, once each, ordered as anyio orders them."""
    ordered: list[str] = []
    v6 = v4 = False
    for family, *_, address in infos:
        host = str(address[0])
        if host in ordered:
            continue
        if family == socket.AF_INET6 and not v6:
            v6 = True
            ordered.insert(0, host)
        elif family == socket.AF_INET and v6 and not v4:
            v4 = True
            ordered.insert(1, host)
        else:
            ordered.append(host)
    return ordered


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class NetworkBackend:
    """httpcore's default backend, with the name resolved on `LOOKUPS` first (httpcore's
    `AsyncNetworkBackend` interface; not a subclass, so that httpcore is imported only by the
    commands that talk to the registry).

    Connects as anyio's `connect_tcp` would to the name: the addresses in its order (the first
    IPv6, then the first IPv4, then the rest), the next started when the one before has not
    connected within `HAPPY_EYEBALLS_DELAY`, the first to connect kept.  One connect timeout
    bounds the lookup and every attempt together; TLS still checks the name, which httpcore
    passes separately.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        import httpcore

        if _is_address(host):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            with anyio.fail_after(timeout):
                infos = await getaddrinfo(host, port, type=socket.SOCK_STREAM)
                return await self._first_to_connect(host, _in_connect_order(infos), port, local_address, socket_options)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {host} took more than {timeout} s") from exc
        except OSError as exc:  # socket.gaierror: no such name, no resolver
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc

    async def _first_to_connect(
        self,
        host: str,
        addresses: list[str],
        port: int,
        local_address: str | None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
    ) -> httpcore.AsyncNetworkStream:
        import httpcore

        connected: httpcore.AsyncNetworkStream | None = None
        failures: list[str] = []
        options = list(socket_options or ())

        async def attempt(address: str, done: anyio.Event) -> None:
            nonlocal connected
            try:
                stream = await self._inner.connect_tcp(address, port, None, local_address, options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failures.append(f"{address}: {exc}")
                return
            finally:
                done.set()
            if connected is None:
                connected = stream
                group.cancel_scope.cancel()
            else:
                await stream.aclose()

        async with anyio.create_task_group() as group:
            for address in addresses:
                done = anyio.Event()
                group.start_soon(attempt, address, done)
                with anyio.move_on_after(HAPPY_EYEBALLS_DELAY):
                    await done.wait()
        if connected is None:
            raise httpcore.ConnectError(f"cannot connect to {host}: {'; '.join(failures) or 'it has no address'}")
        return connected

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def use_own_lookups(client: httpx.AsyncClient) -> bool:
    """Make every transport `client` built for itself (the default one, and a proxy's from
    the environment) resolve names on `LOOKUPS`.  Returns whether each could be changed.

    httpx has no public way to give its transports a network backend, so this reaches for
    the connection pool httpx made (`_pool`) and the backend it holds; a later httpx that
    renames them is caught by the tests, and the client keeps working as it did.
    """
    import httpcore

    transports = [client._transport, *client._mounts.values()]
    changed = True
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        inner = getattr(pool, "_network_backend", None)
        if isinstance(inner, NetworkBackend):
            continue
        if not isinstance(inner, httpcore.AsyncNetworkBackend):
            changed = changed and transport is None
            continue
        pool._network_backend = NetworkBackend(inner)  # type: ignore[union-attr]
    return changed
