"""Host names are looked up on the library's own threads (`_lookups`), never on the event
loop's default executor, which a host application fills with its own work."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpcore
import httpx
import pytest

from async_registrar import Registrar
from async_registrar._local import LocalStack
from async_registrar._lookups import NetworkBackend, Resolver, use_own_lookups

from .conftest import leftovers, make_job, request_for

REAL_GETADDRINFO = socket.getaddrinfo


def by_name(endpoint: str) -> str:
    return endpoint.replace("127.0.0.1", "localhost")


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, object]]:
    """Every `socket.getaddrinfo` call: the thread it ran on, the host and the port."""
    calls: list[tuple[str, str, object]] = []

    def recording(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread().name, str(host), port))
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return calls


@pytest.fixture
def hanging(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """`hang.test` resolves only once the event is set (a resolver that does not answer)."""
    release = threading.Event()

    def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hang.test":
            release.wait(10)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    yield release
    release.set()


async def test_a_registration_by_host_name_finishes_while_the_host_fills_the_default_executor(
    stack: LocalStack, prefix: str, s3: Any, tmp_path: Path, lookups: list[tuple[str, str, object]]
) -> None:
    """Both endpoints given as `localhost`: every new connection needs a lookup.  With each
    thread of asyncio's default executor blocked by the host, the registration still finishes,
    and every lookup ran on the library's threads."""
    settings = stack.registrar_settings(
        s3_prefix=prefix,
        s3_endpoint_url=by_name(stack.s3_endpoint),
        mims_endpoint=by_name(stack.mims_endpoint),
        poll_initial=0.02,
        poll_max=0.2,
    )
    job = make_job(tmp_path)
    release = threading.Event()
    blockers = [asyncio.ensure_future(asyncio.to_thread(release.wait)) for _ in range(64)]
    model_id = ""
    try:
        with anyio.move_on_after(20):
            async with Registrar(settings) as registrar:
                model_id = (await registrar.register(request_for(job))).model_id
        assert model_id, "register() did not finish within 20 s while the default executor was full"
    finally:
        release.set()
        await asyncio.gather(*blockers)
    ports = {port for _, host, port in lookups if host == "localhost"}
    wanted = {httpx.URL(endpoint).port for endpoint in (stack.s3_endpoint, stack.mims_endpoint)}
    assert wanted <= ports, f"both endpoints were looked up: {lookups}"
    threads = {thread for thread, host, _ in lookups if host == "localhost"}
    assert all(t.startswith("async-registrar-lookups") for t in threads), threads
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_lookup_that_does_not_answer_is_bounded_by_the_connect_timeout(hanging: threading.Event) -> None:
    backend = NetworkBackend(httpcore.AnyIOBackend())
    started = time.monotonic()
    with pytest.raises(httpcore.ConnectTimeout, match=r"looking up hang\.test"):
        await backend.connect_tcp("hang.test", 443, timeout=0.2)
    assert time.monotonic() - started < 2


async def test_a_lookup_for_s3_that_does_not_answer_fails_as_aiohttp_expects(hanging: threading.Event) -> None:
    """aiohttp turns a resolver's OSError into its DNS error, which botocore retries."""
    started = time.monotonic()
    with pytest.raises(OSError, match=r"looking up hang\.test took more than 0\.2 s"):
        await Resolver(timeout=0.2).resolve("hang.test", 443)
    assert time.monotonic() - started < 2


async def test_a_cancelled_lookup_returns_at_once(hanging: threading.Event) -> None:
    started = time.monotonic()
    with anyio.move_on_after(0.2) as scope:
        await Resolver().resolve("hang.test", 443)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 2


async def test_an_unknown_name_is_a_connect_error_naming_it() -> None:
    async with httpx.AsyncClient() as client:
        assert use_own_lookups(client)
        with pytest.raises(httpx.ConnectError, match=r"no-such-host\.invalid"):
            await client.get("http://mims.no-such-host.invalid:9/")


async def test_the_next_address_is_tried_when_one_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with two addresses, the first refusing (nothing listens on 127.0.0.2 there)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def two(host: Any, port_: Any, *args: Any, **kwargs: Any) -> Any:
            assert host == "twice.test"
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]

        monkeypatch.setattr(socket, "getaddrinfo", two)
        stream = await NetworkBackend(httpcore.AnyIOBackend()).connect_tcp("twice.test", port, timeout=5)
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        await stream.aclose()
        answers = await Resolver().resolve("twice.test", port, family=socket.AF_UNSPEC)
        assert [a["host"] for a in answers] == ["127.0.0.2", "127.0.0.1"]
        assert all(a["hostname"] == "twice.test" and a["port"] == port for a in answers)


async def test_a_proxy_from_the_environment_looks_up_on_our_threads_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx builds a transport per proxy variable; each gets the backend (and the check that
    httpx still keeps its pool where `use_own_lookups` reaches for it)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "internal.test")
    async with httpx.AsyncClient() as client:
        assert use_own_lookups(client)
        pools = [t._pool for t in [client._transport, *client._mounts.values()] if t is not None]  # type: ignore[attr-defined]
        assert len(pools) >= 2
        assert all(isinstance(pool._network_backend, NetworkBackend) for pool in pools)
        assert use_own_lookups(client), "a second call changes nothing and still holds"
        assert all(not isinstance(pool._network_backend._inner, NetworkBackend) for pool in pools)
