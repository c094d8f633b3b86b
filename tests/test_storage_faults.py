"""Storage faults through a fault-injecting proxy in front of the moto server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from async_registrar import Settings, StorageError, _upload
from async_registrar._artifacts import inspect_artifact
from async_registrar._budget import MemoryBudget
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._multipart import MultipartUpload
from async_registrar._s3 import S3Location, make_session, open_s3_client
from async_registrar._upload import upload_artifact

from .conftest import MiB, leftovers
from .fault_proxy import RESET, FaultProxy, Late, Reply, Stall, s3_error


class Faults:
    """Fail the first `times` UploadPart requests for part `part` with `action` (times < 0: always)."""

    def __init__(self) -> None:
        self.action: Reply | Stall | Late | object | None = None
        self.times = 0
        self.part = "partNumber=2"

    def __call__(self, method: str, target: str) -> Reply | Stall | Late | object | None:
        if method == "PUT" and self.part in target and self.times != 0:
            self.times -= 1
            return self.action
        return None


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def proxy(stack: LocalStack, faults: Faults) -> Iterator[FaultProxy]:
    with FaultProxy(stack.s3_endpoint, faults) as running:
        yield running


@pytest.fixture
async def proxied_s3(proxy: FaultProxy) -> AsyncIterator[Any]:
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:
        yield client


def model(root: Path) -> Path:
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(16 * MiB))
    return root


@pytest.mark.parametrize(
    "action", [s3_error(503, "SlowDown"), s3_error(500, "InternalError"), RESET], ids=["503", "500", "reset"]
)
async def test_a_part_that_fails_a_few_times_still_arrives(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults, action: object
) -> None:
    """Two failures of part 2 (botocore retries them): the upload succeeds, whole."""
    faults.action, faults.times = action, 2
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    result = await upload_artifact(
        proxied_s3, inspect_artifact(model(tmp_path / "m"), role="model"), location, settings
    )
    assert proxy.count("PUT", "partNumber=2") == 3
    head = await s3.head_object(Bucket=location.bucket, Key=location.key)
    assert head["ContentLength"] == result.size


async def test_a_part_sent_more_than_once_does_not_give_its_buffer_back(
    tmp_path: Path,
    proxied_s3: Any,
    s3: Any,
    settings: Settings,
    proxy: FaultProxy,
    faults: Faults,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Part 2 gets a 500 once and botocore sends it again: its buffer is never refilled (the
    attempt given up on may still be sending from it: uvloop, and asyncio from Python 3.12,
    send unsent bytes from the caller's buffer, not a copy); the other parts' come back.  With
    a budget that allows one buffer, the producer makes another in its place, not waits."""
    faults.action, faults.times = s3_error(500, "InternalError"), 1
    events: list[tuple[str, int, object]] = []
    put, upload_part = _upload._BufferPool.put, MultipartUpload.upload_part

    def recording_put(pool: Any, buffer: Any) -> None:
        events.append(("back", 0, buffer))
        put(pool, buffer)

    async def recording_upload_part(upload: Any, number: int, data: memoryview, **options: Any) -> bool:
        events.append(("sent", number, data.obj))
        return await upload_part(upload, number, data, **options)

    monkeypatch.setattr(_upload._BufferPool, "put", recording_put)
    monkeypatch.setattr(MultipartUpload, "upload_part", recording_upload_part)
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    one_part = settings.model_copy(update={"part_size": 5 * MiB, "upload_concurrency": 1})
    with anyio.fail_after(60):
        await upload_artifact(proxied_s3, source, location, one_part, budget=MemoryBudget(1))
    assert proxy.count("PUT", "partNumber=2") == 2
    # (number, whether its buffer came back after it was sent), in order
    came_back = [
        (number, any(kind == "back" and other is buffer for kind, _, other in events[index + 1 :]))
        for index, (kind, number, buffer) in enumerate(events)
        if kind == "sent"
    ]
    assert came_back == [(1, True), (2, False), (3, True), (4, False)]  # the last part's neither
    await s3.delete_object(Bucket=location.bucket, Key=location.key)


@pytest.mark.parametrize("action", [s3_error(503, "SlowDown"), RESET], ids=["503", "reset"])
async def test_a_part_that_always_fails_aborts_the_upload(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults, action: object
) -> None:
    """Part 2 fails on every attempt: StorageError naming it, and no upload stays open."""
    faults.action, faults.times = action, -1
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    with pytest.raises(StorageError, match=r"UploadPart \(part 2\) failed"):
        await upload_artifact(proxied_s3, source, location, settings)
    assert proxy.count("PUT", "partNumber=2") >= 5  # botocore's standard mode retried it
    assert proxy.count("DELETE", "uploadId=") >= 1  # the abort
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("action", [s3_error(503, "SlowDown"), RESET], ids=["503", "reset"])
async def test_each_failed_attempt_is_a_warning_naming_the_part(
    tmp_path: Path,
    proxied_s3: Any,
    settings: Settings,
    faults: Faults,
    action: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """botocore retries quietly; each failed attempt is said when botocore sends the request
    again, and the last one at once (a stalled server would otherwise show only when botocore
    gives up)."""
    faults.action, faults.times = action, 2
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    with caplog.at_level("WARNING", logger="async_registrar.s3"):
        await upload_artifact(proxied_s3, source, location, settings)
    records = [r for r in caplog.records if r.name == "async_registrar.s3"]
    said = [r.getMessage() for r in records]
    assert [r.fields for r in records] == [  # type: ignore[attr-defined]
        {"event": "s3_attempt_failed", "operation": "UploadPart", "part": 2, "attempt": n, "attempts": 6}
        for n in range(1, len(records) + 1)
    ]
    problem = "503 SlowDown" if action is not RESET else "Error"
    # Two failed requests; aiohttp itself sends a PUT again once when the server closed the
    # connection before answering, so two resets may be one failed attempt to botocore.
    assert len(said) in ((1, 2) if action is RESET else (2,)), said
    for attempt, message in enumerate(said, start=1):
        assert message.startswith(f"S3 UploadPart http://127.0.0.1:{proxy_port(proxied_s3)}/"), message
        assert f"{location.key} (part 2): attempt {attempt} of 6 failed: " in message
        assert problem in message
        assert message.endswith(f"; sending it again (attempt {attempt + 1})")
        assert "uploadId" not in message  # no query string

    caplog.clear()
    faults.action, faults.times = action, -1
    with caplog.at_level("WARNING", logger="async_registrar.s3"), pytest.raises(StorageError):
        await upload_artifact(proxied_s3, inspect_artifact(tmp_path / "m", role="model"), location, settings)
    said = [r.getMessage() for r in caplog.records if r.name == "async_registrar.s3"]
    assert [m.split(": attempt ", 1)[1].split(" failed")[0] for m in said] == [f"{n} of 6" for n in range(1, 7)]
    assert [m.rsplit("; ", 1)[1] for m in said] == [f"sending it again (attempt {n})" for n in range(2, 7)] + [
        "no attempts left"
    ]


async def test_a_failure_botocore_does_not_retry_is_not_said_to_be_retried(
    tmp_path: Path,
    proxied_s3: Any,
    settings: Settings,
    proxy: FaultProxy,
    faults: Faults,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 429 with a code outside botocore's throttling list is not retried by botocore: no line
    says it is sent again; the refusal is the error, and no upload stays open."""
    faults.action, faults.times = s3_error(429, "TooManyRequests"), 1
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    with caplog.at_level("WARNING", logger="async_registrar.s3"), pytest.raises(StorageError, match=r"TooManyRequests"):
        await upload_artifact(proxied_s3, inspect_artifact(model(tmp_path / "m"), role="model"), location, settings)
    assert proxy.count("PUT", "partNumber=2") == 1
    assert [r.getMessage() for r in caplog.records if r.name == "async_registrar.s3"] == []


async def test_a_part_never_answered_is_a_warning_after_the_read_timeout(
    tmp_path: Path, proxy: FaultProxy, settings: Settings, faults: Faults, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that takes a part and does not answer: when the read timeout ends the attempt
    (120 s in the registrar's clients, 2 s here), the WARNING says so, then the part is sent again."""
    from aiobotocore.config import AioConfig

    from async_registrar._s3 import log_failed_attempts

    # Part 2's first answer is held far past the read timeout: never, as far as that attempt goes.
    faults.action, faults.times = Late(30.0), 1
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    config = AioConfig(read_timeout=2, retries={"mode": "standard", "max_attempts": 5})
    async with session.client("s3", region_name=REGION, endpoint_url=proxy.endpoint, config=config) as client:
        log_failed_attempts(client)
        location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
        with caplog.at_level("WARNING", logger="async_registrar.s3"):
            await upload_artifact(client, inspect_artifact(model(tmp_path / "m"), role="model"), location, settings)
    # The short read timeout is the whole client's: on a loaded machine another request may run
    # past it too (and be said, and retried). Part 2's warnings are the ones this is about: one
    # per failed attempt, the first its unanswered one.
    messages = [r.getMessage() for r in caplog.records if r.name == "async_registrar.s3"]
    said = [m for m in messages if "(part 2): " in m]
    assert said, messages
    assert "(part 2): attempt 1 of 6 failed: ReadTimeoutError" in said[0], said
    assert said[0].endswith("; sending it again (attempt 2)"), said
    assert [m.split(": attempt ", 1)[1].split(" of ")[0] for m in said] == [str(n) for n in range(1, len(said) + 1)]


def proxy_port(client: Any) -> int:
    return int(str(client.meta.endpoint_url).rsplit(":", 1)[1].strip("/"))


async def test_a_stalled_part_is_waited_for(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults
) -> None:
    """A slow link (a part held back 1 s) only makes the upload slower."""
    faults.action, faults.times = Stall(1.0), 1
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    result = await upload_artifact(
        proxied_s3, inspect_artifact(model(tmp_path / "m"), role="model"), location, settings
    )
    assert result.parts == 4
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [location.key]


async def test_access_denied_on_create_is_not_retried(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy
) -> None:
    """A real 403 AccessDenied to CreateMultipartUpload: one request, exit-4 error, nothing left."""
    proxy.rule = lambda method, target: s3_error(403, "AccessDenied") if target.endswith("?uploads") else None
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    with pytest.raises(StorageError, match=r"CreateMultipartUpload failed .*AccessDenied") as caught:
        await upload_artifact(proxied_s3, source, location, settings)
    assert caught.value.code == "AccessDenied"
    assert proxy.count("POST", "?uploads") == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("code", ["BadDigest", "InvalidDigest"])
async def test_a_part_found_damaged_once_is_sent_again(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults, code: str
) -> None:
    """S3 answers BadDigest (a one-off corruption in transit): the part is sent again, the
    upload completes (issue 17)."""
    faults.action, faults.times = s3_error(400, code), 1
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    uploaded = await upload_artifact(proxied_s3, source, location, settings)
    assert proxy.count("PUT", "partNumber=2") == 2
    assert uploaded.size > 0
    await s3.delete_object(Bucket=location.bucket, Key=location.key)


@pytest.mark.parametrize("code", ["BadDigest", "XAmzContentSHA256Mismatch"])
async def test_a_part_always_found_damaged_fails_naming_it(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults, code: str
) -> None:
    """Found damaged on every attempt: three sends, then a StorageError naming the part, aborted.
    A signed payload found damaged every time (XAmzContentSHA256Mismatch) is not taken for a
    server refusing the checksum headers: setting `when_required` would not help."""
    faults.action, faults.times = s3_error(400, code), -1
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    with pytest.raises(StorageError, match=r"UploadPart \(part 2\) failed.*part 2 arrived damaged 3 times") as caught:
        await upload_artifact(proxied_s3, source, location, settings)
    assert "REGISTRAR_S3_CHECKSUMS" not in caught.value.message
    assert proxy.count("PUT", "partNumber=2") == 3
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_server_that_drops_the_upload_with_a_damaged_part_is_explained(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults
) -> None:
    """`rclone serve s3` drops the whole multipart upload when a part arrives damaged: the part
    sent again gets NoSuchUpload. One StorageError says so, names the part and says to run
    again; nothing is left (found by `scripts/compat`)."""
    answers = iter([s3_error(400, "BadDigest")])
    proxy.rule = lambda method, target: (
        next(answers, s3_error(404, "NoSuchUpload")) if method == "PUT" and "partNumber=2" in target else None
    )
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    with pytest.raises(
        StorageError, match=r"part 2 of s3://\S+ arrived damaged, and sending it again failed"
    ) as caught:
        await upload_artifact(proxied_s3, source, location, settings)
    assert "NoSuchUpload" in str(caught.value)
    assert "rclone serve s3" in str(caught.value)
    assert str(caught.value).endswith("run again")
    assert proxy.count("PUT", "partNumber=2") == 2  # not three: sending it a third time cannot help
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_server_that_refuses_checksum_headers_is_told_which_setting_helps(
    tmp_path: Path, proxied_s3: Any, s3: Any, settings: Settings, proxy: FaultProxy, faults: Faults
) -> None:
    """Backblaze B2 answers 400 InvalidArgument "Unsupported header 'x-amz-checksum-crc32'": the
    error names REGISTRAR_S3_CHECKSUMS=when_required (issue 17)."""
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
        b"<Message>Unsupported header 'x-amz-checksum-crc32' received for this API call.</Message></Error>"
    )
    faults.action, faults.times = Reply(400, body, "InvalidArgument"), -1
    location = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    source = inspect_artifact(model(tmp_path / "m"), role="model")
    with pytest.raises(StorageError, match=r"InvalidArgument .*set REGISTRAR_S3_CHECKSUMS=when_required"):
        await upload_artifact(proxied_s3, source, location, settings)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
