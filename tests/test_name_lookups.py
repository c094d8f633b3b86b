"""Host names are looked up on the library's own threads (`_lookups`), never on the event
loop's default executor, which a host application fills with its own work."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpcore
import httpx
import pytest

from async_registrar import Registrar
from async_registrar._local import REGION, LocalStack
from async_registrar._lookups import NetworkBackend, Resolver, use_own_lookups
from async_registrar._s3 import make_session, open_s3_client

from .conftest import default_executor_filled, leftovers, make_job, request_for

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
def blackholes() -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """Two addresses, one port, whose connection attempts get no answer: listeners on 127.0.0.2
    and 127.0.0.4 with a full backlog, so the kernel drops further SYNs (as a firewall or a
    broken IPv6 route does); 127.0.0.1 is free on that port for a listener of the test's."""
    sockets: list[socket.socket] = []
    port = 0
    for host in ("127.0.0.2", "127.0.0.4"):
        held = socket.socket()
        sockets.append(held)
        held.bind((host, port))
        held.listen(0)
        port = held.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            sockets.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, port))
    time.sleep(0.2)
    yield ("127.0.0.2", port), ("127.0.0.4", port)
    for sock in sockets:
        sock.close()


def resolving(monkeypatch: pytest.MonkeyPatch, name: str, *addresses: tuple[str, int]) -> None:
    def answer(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address) for address in addresses]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", answer)


async def test_an_address_that_does_not_answer_does_not_hold_up_the_next(
    monkeypatch: pytest.MonkeyPatch, blackholes: tuple[tuple[str, int], tuple[str, int]]
) -> None:
    """Happy eyeballs, as httpcore's own backend does it: the next address is tried after
    0.25 s, not after the whole connect timeout."""
    port = blackholes[0][1]
    with socket.create_server(("127.0.0.1", port)):
        resolving(monkeypatch, "lb.test", blackholes[0], ("127.0.0.1", port))
        started = time.monotonic()
        stream = await NetworkBackend(httpcore.AnyIOBackend()).connect_tcp("lb.test", port, timeout=5)
        took = time.monotonic() - started
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        await stream.aclose()
    assert took < 2, took


async def test_one_connect_timeout_bounds_every_address_together(
    monkeypatch: pytest.MonkeyPatch, blackholes: tuple[tuple[str, int], tuple[str, int]]
) -> None:
    """Two addresses that do not answer: one timeout for both (and the lookup), not one each."""
    resolving(monkeypatch, "dark.test", *blackholes)
    started = time.monotonic()
    with pytest.raises(httpcore.ConnectTimeout, match=r"connecting to dark\.test took more than 1 s"):
        await NetworkBackend(httpcore.AnyIOBackend()).connect_tcp("dark.test", blackholes[0][1], timeout=1)
    assert time.monotonic() - started < 1.8


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
    model_id = ""
    async with default_executor_filled():
        with anyio.move_on_after(20):
            async with Registrar(settings) as registrar:
                model_id = (await registrar.register(request_for(job))).model_id
    assert model_id, "register() did not finish within 20 s while the default executor was full"
    ports = {port for _, host, port in lookups if host == "localhost"}
    wanted = {httpx.URL(endpoint).port for endpoint in (stack.s3_endpoint, stack.mims_endpoint)}
    assert wanted <= ports, f"both endpoints were looked up: {lookups}"
    threads = {thread for thread, host, _ in lookups if host == "localhost"}
    assert all(t.startswith("async-registrar-lookups") for t in threads), threads
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_lookup_that_does_not_answer_is_bounded_by_the_connect_timeout(hanging: threading.Event) -> None:
    backend = NetworkBackend(httpcore.AnyIOBackend())
    started = time.monotonic()
    with pytest.raises(httpcore.ConnectTimeout, match=r"connecting to hang\.test took more than 0\.2 s"):
        await backend.connect_tcp("hang.test", 443, timeout=0.2)
    assert time.monotonic() - started < 2


async def test_a_lookup_for_s3_that_does_not_answer_is_aiohttps_connection_timeout(hanging: threading.Event) -> None:
    """The resolver's TimeoutError is what aiohttp raises as its connection timeout (which
    aiobotocore turns into botocore's ConnectTimeoutError, retried)."""
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"looking up hang\.test took more than 0\.2 s"):
        await Resolver(timeout=0.2).resolve("hang.test", 443)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=Resolver(timeout=0.2))) as session:
        with pytest.raises(aiohttp.ServerTimeoutError):
            await session.get("http://hang.test/")
    assert time.monotonic() - started < 3


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


async def test_an_assumed_roles_sts_call_looks_up_on_our_threads_too(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lookups: list[tuple[str, str, object]]
) -> None:
    """botocore makes its own STS client to assume a profile's role: it takes the session's
    default config, so its lookup of the STS endpoint's name runs on the library's threads."""
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile source]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
        "[profile assumed]\nrole_arn = arn:aws:iam::123456789012:role/registrar\nsource_profile = source\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "assumed")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", by_name(stack.s3_endpoint))
    async with open_s3_client(make_session(), region=REGION, endpoint_url=stack.s3_endpoint) as client:
        assert (await client.get_bucket_location(Bucket=stack.temporary_bucket))["ResponseMetadata"]
        frozen = await client._get_credentials().get_frozen_credentials()
    assert frozen.access_key != "testing", "the role was assumed"
    sts = [thread for thread, host, _ in lookups if host == "localhost"]
    assert sts, f"the STS endpoint was looked up by name: {lookups}"
    assert all(thread.startswith("async-registrar-lookups") for thread in sts), sts
