"""Models already in S3 (`--model s3://.../model.tar.gz`): copied inside S3, read once for the
sha256, never sent through the client (issue 18, part 2)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from async_registrar import InputError, Settings, StorageError
from async_registrar._artifacts import S3Archive
from async_registrar._concurrency import CleanupDeadline
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._ranged_read import RANGE_SIZE
from async_registrar._s3 import S3Location, make_session, open_s3_client
from async_registrar._s3_source import copy_to_all, digest_s3_archive, inspect_s3_archive
from async_registrar._threads import Workers
from async_registrar._upload import DigestSink

from .conftest import MiB, leftovers, make_job
from .fault_proxy import Cut, FaultProxy, HoldingProxy, Reply, Stall, s3_error
from .test_cli import environment, run

TRAINING = "training-output"


def model_archive(size: int = 20 * MiB) -> bytes:
    """A training job's model.tar.gz: random weights (they do not compress) and a config."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, data in (("weights.f32", os.urandom(size)), ("config.json", b'{"layers": 2}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def put_training_output(s3: Any, key: str, body: bytes) -> str:
    try:
        await s3.create_bucket(Bucket=TRAINING, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise
    await s3.put_object(Bucket=TRAINING, Key=key, Body=body)
    return f"s3://{TRAINING}/{key}"


async def copy_model(s3: Any, source: S3Archive, target: S3Location, settings: Settings, **options: Any) -> Any:
    """`copy_to_all` of `source` to `target` alone, with the registrar's defaults."""
    (copied,) = await copy_to_all(
        s3,
        source,
        [(s3, target)],
        settings,
        artifact="model",
        workers=Workers.for_settings(settings),
        cleanup=CleanupDeadline(settings.cleanup_timeout),
        **options,
    )
    return copied


async def registry_object(s3: Any, stack: LocalStack, model_id: str) -> bytes:
    obj = await s3.get_object(Bucket=stack.registry_bucket, Key=f"models/{model_id}/model.tar.gz")
    async with obj["Body"] as body:
        return bytes(await body.read())


async def test_a_model_in_s3_is_registered_without_passing_through_the_client(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """register --model s3://.../model.tar.gz: registered (the registry checked its sha256),
    the registry holds the very bytes, the client sent under 1% of them, the temporary copy
    is gone at the end."""
    archive = model_archive()
    uri = await put_training_output(s3, f"{tmp_path.name}/output/model.tar.gz", archive)
    job = make_job(tmp_path)
    with FaultProxy(stack.s3_endpoint, lambda method, target: None) as proxy:
        env = environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        result = run(env, "register")
    assert result.returncode == 0, result.stderr
    model_id = result.stdout.splitlines()[1].rsplit(" ", 1)[1]
    assert await registry_object(s3, stack, model_id) == archive
    assert proxy.sent_bytes < len(archive) / 100, f"sent {proxy.sent_bytes} bytes for a {len(archive)}-byte model"
    assert "copying model from" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_large_model_is_copied_part_by_part(settings: Settings, s3: Any, tmp_path: Path) -> None:
    """Parts (scaled down here), copied by concurrent UploadPartCopy requests: the copy is the
    source byte for byte, the sha256 read once is the source's, no upload stays open."""
    archive = model_archive(11 * MiB)
    source = await inspect_s3_archive(
        s3, await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", archive), role="model"
    )
    target = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    copied = await copy_model(s3, source, target, settings, copy_part_size=5 * MiB)
    assert copied.parts == 3
    assert copied.size == len(archive)
    assert copied.sha256 == hashlib.sha256(archive).hexdigest()
    assert copied.integrity == "server-copy"
    obj = await s3.get_object(Bucket=target.bucket, Key=target.key)
    async with obj["Body"] as body:
        assert await body.read() == archive
    uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    assert uploads.get("Uploads", []) == []
    await s3.delete_object(Bucket=target.bucket, Key=target.key)


async def test_a_source_replaced_after_it_was_inspected_is_not_copied(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """The copy is pinned to the ETag seen: a source replaced meanwhile is a StorageError, not a
    registration of bytes other than those hashed; nothing is left."""
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", model_archive(1 * MiB))
    source = await inspect_s3_archive(s3, uri, role="model")
    await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", model_archive(1 * MiB))
    target = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    with pytest.raises(StorageError, match="PreconditionFailed"):
        await copy_model(s3, source, target, settings)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_source_the_role_cannot_read_is_exit_4_naming_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A model in another bucket the role cannot read (403 from S3: moto enforces no IAM, the
    proxy answers for it): exit 4 before anything is written, naming the URI and the permission."""
    uri = "s3://someone-elses-bucket/output/model.tar.gz"

    def deny(method: str, target: str) -> Any:
        if not target.startswith("/someone-elses-bucket/"):
            return None
        return Reply(403, b"", "Forbidden") if method == "HEAD" else s3_error(403, "AccessDenied")

    job = make_job(tmp_path)
    with FaultProxy(stack.s3_endpoint, deny) as proxy:
        env = environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        result = run(env, "register")
    assert result.returncode == 4, result.stderr
    assert f"the model {uri} cannot be read" in result.stderr
    assert "s3:GetObject" in result.stderr
    assert not [t for m, t in proxy.seen if m in ("PUT", "POST")], "something was written"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize(
    ("key", "body", "code", "says"),
    [
        ("model.zip", b"PK\x03\x04", 3, "is not a .tar.gz"),
        ("corrupt.tar.gz", os.urandom(64 * 1024), 3, "is not a usable tar.gz"),
    ],
    ids=["not-tar-gz", "corrupt"],
)
async def test_a_bad_archive_in_s3_is_exit_3_and_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, key: str, body: bytes, code: int, says: str
) -> None:
    uri = await put_training_output(s3, f"{tmp_path.name}/{key}", body)
    job = make_job(tmp_path)
    result = run(environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri), "register")
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert uri in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rerun_with_the_same_lineage_finds_the_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The same s3:// model and lineage id again: the re-run reads the source for its sha256,
    finds the registration the first run made, and prints the same two lines."""
    uri = await put_training_output(s3, f"{tmp_path.name}/model.tar.gz", model_archive(2 * MiB))
    job = make_job(tmp_path)
    env = environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri, MODS_WORKFLOW_EXECUTION_ID=f"wf-{tmp_path.name}")
    first = run(env, "register")
    assert first.returncode == 0, first.stderr
    again = run(env, "register")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "found: registration" in again.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_check_describes_a_model_in_s3(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    uri = await put_training_output(s3, f"{tmp_path.name}/model.tar.gz", model_archive(1 * MiB))
    job = make_job(tmp_path)
    result = run(environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri), "check")
    assert result.returncode == 0, result.stderr
    assert f"model: {uri} (a .tar.gz in S3, copied there" in result.stdout


async def test_a_copy_cancelled_while_a_part_is_copied_leaves_nothing(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """Cancelled while UploadPartCopy is held back on the way: the multipart copy is aborted,
    nothing stays at the target (the part that lands later lands in no upload)."""
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", model_archive(1 * MiB))

    def part_copies(method: str, target: str, headers: dict[str, str]) -> bool:
        return method == "PUT" and "partNumber=" in target

    with HoldingProxy(stack.s3_endpoint, part_copies) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as proxied:
            source = await inspect_s3_archive(proxied, uri, role="model")
            target = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
            # Cancelled once the part copy is held on its way (not after a time it may not reach).
            await cancelled_once(proxy.arrived.is_set, copy_model(proxied, source, target, settings))
        assert proxy.count("PUT", "partNumber=1") == 1  # the part copy was on its way
        assert proxy.count("DELETE", "uploadId=") == 2  # the abort, and the one confirming it
        proxy.release()  # the held-back part copy reaches the server after the abort
        with anyio.fail_after(30):
            await proxy.answered.wait()
    assert len(proxy.answers) == 1  # the late part copy did reach S3 before the check below
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- the read: concurrent ranged GETs, a local copy, another region --------------------------------------------


async def cancelled_once(ready: Callable[[], bool], work: Awaitable[Any]) -> float:
    """Run `work`, cancel it once `ready()` (polled; within 30 s), and return how long it took
    to stop after the cancel."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await work

            tg.start_soon(run)
            with anyio.fail_after(30):
                while not ready():
                    await anyio.sleep(0.005)
            cancelled = time.monotonic()
            scope.cancel()
    assert scope.cancelled_caught
    return time.monotonic() - cancelled


async def copy_through(proxy: FaultProxy, source_uri: str, settings: Settings, **options: Any) -> tuple[S3Archive, Any]:
    """Inspect `source_uri` and copy it to the settings' prefix, through `proxy`."""
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as proxied:
        source = await inspect_s3_archive(proxied, source_uri, role="model")
        target = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
        return source, await copy_model(proxied, source, target, settings, **options)


async def test_the_sha256_is_read_with_concurrent_ranged_gets_pinned_to_the_etag(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """The read for the sha256 asks for the object in ranges, several at once (each held back
    here: all are asked for before the first answers), pinned to the ETag, covering every byte."""
    archive = model_archive(20 * MiB)
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", archive)
    asked: list[tuple[float, dict[str, str]]] = []

    def hold_gets(method: str, target: str, headers: dict[str, str]) -> Any:
        if method == "GET" and "range" in headers:
            asked.append((time.monotonic(), headers))
            return Stall(3.0)
        return None

    with FaultProxy(stack.s3_endpoint, hold_gets, with_headers=True) as proxy:
        source, copied = await copy_through(proxy, uri, settings)
    assert copied.sha256 == hashlib.sha256(archive).hexdigest()
    size = len(archive)
    assert sorted(h["range"] for _, h in asked) == sorted(
        f"bytes={start}-{min(start + RANGE_SIZE, size) - 1}" for start in range(0, size, RANGE_SIZE)
    )
    assert {h.get("if-match") for _, h in asked} == {source.etag}
    first = asked[0][0]
    assert all(at - first < 2.5 for at, _ in asked), "a range was asked for only after another came back"
    await s3.delete_object(Bucket=settings.s3_bucket, Key=settings.s3_prefix + "model.tar.gz")


async def test_a_range_whose_answer_breaks_off_is_asked_for_again(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """A connection reset in the middle of one range's body: that range is asked for again,
    and the sha256 is the object's."""
    archive = model_archive(12 * MiB)
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", archive)
    cut = {"left": 1}

    def break_second(method: str, target: str, headers: dict[str, str]) -> Any:
        if method == "GET" and headers.get("range", "").startswith(f"bytes={RANGE_SIZE}-") and cut["left"]:
            cut["left"] -= 1
            return Cut(MiB)
        return None

    with FaultProxy(stack.s3_endpoint, break_second, with_headers=True) as proxy:
        _, copied = await copy_through(proxy, uri, settings)
        second = [h for h in proxy.headers if h.get("range", "").startswith(f"bytes={RANGE_SIZE}-")]
    assert cut["left"] == 0
    assert len(second) == 2
    assert copied.sha256 == hashlib.sha256(archive).hexdigest()
    await s3.delete_object(Bucket=settings.s3_bucket, Key=settings.s3_prefix + "model.tar.gz")


async def test_a_local_copy_is_read_instead_of_the_object(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """REGISTRAR_MODEL_LOCAL_COPY (a directory holding the mounted model.tar.gz): no GET of the
    object at all, still copied inside S3, registered (the registry checked the sha256)."""
    archive = model_archive(6 * MiB)
    key = f"{tmp_path.name}/output/model.tar.gz"
    uri = await put_training_output(s3, key, archive)
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (mounted / "model.tar.gz").write_bytes(archive)
    job = make_job(tmp_path)
    with FaultProxy(stack.s3_endpoint, lambda method, target: None) as proxy:
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MODEL_PATH=uri,
            REGISTRAR_MODEL_LOCAL_COPY=str(mounted),
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
        )
        result = run(env, "register")
    assert result.returncode == 0, result.stderr
    assert proxy.count("GET", key) == 0, "the object was read although a local copy was given"
    assert proxy.count("PUT", "partNumber=") >= 1  # copied inside S3
    assert proxy.sent_bytes < len(archive) / 100
    model_id = result.stdout.splitlines()[1].rsplit(" ", 1)[1]
    assert await registry_object(s3, stack, model_id) == archive
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_local_copy_of_another_size_is_exit_3_naming_both(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    uri = await put_training_output(s3, f"{tmp_path.name}/model.tar.gz", model_archive(1 * MiB))
    other = tmp_path / "other.tar.gz"
    other.write_bytes(model_archive(2 * MiB))
    job = make_job(tmp_path)
    env = environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri, REGISTRAR_MODEL_LOCAL_COPY=str(other))
    result = run(env, "register")
    assert result.returncode == 3, result.stderr
    assert f"the model's local copy {other} is" in result.stderr
    assert uri in result.stderr
    assert "REGISTRAR_MODEL_LOCAL_COPY" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_local_copy_of_a_local_model_is_exit_2(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    job = make_job(tmp_path)
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(model_archive(1024))
    result = run(environment(stack, settings, job, REGISTRAR_MODEL_LOCAL_COPY=str(copy)), "register")
    assert result.returncode == 2, result.stderr
    assert "--model-local-copy / REGISTRAR_MODEL_LOCAL_COPY: only for a model given by its s3:// URI" in result.stderr


async def put_in_region(client: Any, region: str, key: str, body: bytes) -> str:
    """An object in a bucket of `region` (a training job's output in another region)."""
    bucket = f"training-output-{region}"
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        await client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
    await client.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


async def test_a_model_in_another_region_is_streamed_not_copied(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, regional_s3: dict[str, Any]
) -> None:
    """The training output is in eu-west-1, the registration in us-west-2: no UploadPartCopy
    across regions; the object is read (ranged GETs) and uploaded, once; registered."""
    archive = model_archive(11 * MiB)
    uri = await put_in_region(regional_s3["eu-west-1"], "eu-west-1", f"{tmp_path.name}/model.tar.gz", archive)
    job = make_job(tmp_path)
    with FaultProxy(stack.s3_endpoint, lambda method, target, headers: None, with_headers=True) as proxy:
        env = environment(stack, settings, job, REGISTRAR_MODEL_PATH=uri, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        result = run(env, "register")
        copies = [h for h in proxy.headers if "x-amz-copy-source" in h]
    assert result.returncode == 0, result.stderr
    assert "streaming model from" in result.stderr
    assert "(eu-west-1)" in result.stderr
    assert copies == []
    assert proxy.sent_bytes > len(archive)  # it went through this process
    model_id = result.stdout.splitlines()[1].rsplit(" ", 1)[1]
    assert await registry_object(s3, stack, model_id) == archive
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_one_read_feeds_the_copy_in_its_region_and_the_upload_to_another(
    settings: Settings, s3: Any, regional_s3: dict[str, Any], tmp_path: Path
) -> None:
    """Targets in the source's region and in another: the first is copied inside S3, the second
    gets the object streamed; both hold the source byte for byte and report its sha256."""
    archive = model_archive(11 * MiB)
    source = await inspect_s3_archive(
        s3, await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", archive), role="model"
    )
    key = settings.s3_prefix + "model.tar.gz"
    here = S3Location(settings.s3_bucket, key)
    there = S3Location("registrar-mr-eu-west-1", key)
    results = await copy_to_all(
        s3,
        source,
        [(s3, here), (regional_s3["eu-west-1"], there)],
        settings,
        artifact="model",
        workers=Workers.for_settings(settings),
        cleanup=CleanupDeadline(settings.cleanup_timeout),
    )
    assert [r.integrity == "server-copy" for r in results] == [True, False]
    assert {r.sha256 for r in results} == {hashlib.sha256(archive).hexdigest()}
    for client, where in ((s3, here), (regional_s3["eu-west-1"], there)):
        obj = await client.get_object(Bucket=where.bucket, Key=where.key)
        async with obj["Body"] as body:
            assert await body.read() == archive
        await client.delete_object(Bucket=where.bucket, Key=where.key)
    for client, bucket in ((s3, settings.s3_bucket), (regional_s3["eu-west-1"], "registrar-mr-eu-west-1")):
        uploads = await client.list_multipart_uploads(Bucket=bucket, Prefix=settings.s3_prefix)
        assert uploads.get("Uploads", []) == []


async def test_a_corrupt_model_streamed_from_another_region_is_exit_3_and_leaves_nothing(
    settings: Settings, s3: Any, regional_s3: dict[str, Any], tmp_path: Path
) -> None:
    eu = regional_s3["eu-west-1"]
    uri = await put_in_region(eu, "eu-west-1", f"{tmp_path.name}/corrupt.tar.gz", os.urandom(12 * MiB))
    source = await inspect_s3_archive(s3, uri, role="model")
    target = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
    with pytest.raises(InputError, match=r"is not a usable tar\.gz"):
        await copy_model(s3, source, target, settings)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    assert uploads.get("Uploads", []) == []


async def test_a_stream_from_another_region_cancelled_mid_part_leaves_nothing(
    settings: Settings, s3: Any, stack: LocalStack, regional_s3: dict[str, Any], tmp_path: Path
) -> None:
    """Cancelled while a part of the streamed upload is held back on the way (the ranged GETs
    feeding it from the event loop, the producer in its thread): the upload is aborted, the
    reads stop, nothing stays."""
    uri = await put_in_region(
        regional_s3["eu-west-1"], "eu-west-1", f"{tmp_path.name}/m.tar.gz", model_archive(40 * MiB)
    )

    def parts(method: str, target: str, headers: dict[str, str]) -> bool:
        return method == "PUT" and "partNumber=" in target

    with HoldingProxy(stack.s3_endpoint, parts) as proxy:
        await cancelled_once(proxy.arrived.is_set, copy_through(proxy, uri, settings))
        assert proxy.count("DELETE", "uploadId=") >= 1  # the abort, while the parts are held
        proxy.release()  # the held-back parts reach the server after the abort
        with anyio.fail_after(30):
            await proxy.answered.wait()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    assert uploads.get("Uploads", []) == []


async def test_a_read_cancelled_while_its_ranges_are_held_back_returns_at_once(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """Cancelled while every ranged GET is held back (the hashing thread waiting for the first
    range): the read returns within a moment, not once the GETs come back."""
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", model_archive(40 * MiB))

    def hold(method: str, target: str) -> Any:
        return Stall(5.0) if method == "GET" else None

    with FaultProxy(stack.s3_endpoint, hold) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as proxied:
            source = await inspect_s3_archive(proxied, uri, role="model")
            took = await cancelled_once(
                lambda: proxy.count("GET", "m.tar.gz") >= 4,  # the ranges are on their way, held
                digest_s3_archive(proxied, source, Workers.for_settings(settings), settings=settings),
            )
    assert took < 2.0, f"the cancelled read took {took:.1f} s"


async def test_a_read_that_fails_while_the_thread_is_busy_ends_with_its_error(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source replaced under the read (412 on range 2) while the thread still hashes range 1
    (slowed down here: a race a server cannot be made to win): the thread's next read does not
    wait forever for a range that never comes; the read's error is the one raised."""
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", model_archive(20 * MiB))
    write = DigestSink.write

    def slow_write(self: Any, data: bytes | memoryview) -> None:
        time.sleep(0.05)  # 1 MiB at a time: range 1 takes 0.4 s
        write(self, data)

    monkeypatch.setattr(DigestSink, "write", slow_write)

    def refuse_second(method: str, target: str, headers: dict[str, str]) -> Any:
        if method == "GET" and headers.get("range", "").startswith(f"bytes={RANGE_SIZE}-"):
            return s3_error(412, "PreconditionFailed")
        return None

    with FaultProxy(stack.s3_endpoint, refuse_second, with_headers=True) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as proxied:
            source = await inspect_s3_archive(proxied, uri, role="model")
            started = time.monotonic()
            with pytest.raises(StorageError, match="PreconditionFailed"):
                await digest_s3_archive(proxied, source, Workers.for_settings(settings), settings=settings)
    assert time.monotonic() - started < 15  # the bug was a wait forever


async def test_a_server_that_ignores_the_range_header_is_refused_before_its_answer_is_read(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    archive = model_archive(12 * MiB)
    uri = await put_training_output(s3, f"{tmp_path.name}/m.tar.gz", archive)

    def whole_object(method: str, target: str, headers: dict[str, str]) -> Any:
        return Reply(200, archive, "OK") if method == "GET" and "range" in headers else None

    with FaultProxy(stack.s3_endpoint, whole_object, with_headers=True) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as proxied:
            source = await inspect_s3_archive(proxied, uri, role="model")
            with pytest.raises(StorageError, match="ignores the Range header"):
                await digest_s3_archive(proxied, source, Workers.for_settings(settings), settings=settings)


async def test_a_stream_from_another_region_whose_source_is_replaced_fails_and_leaves_nothing(
    settings: Settings, s3: Any, stack: LocalStack, regional_s3: dict[str, Any], tmp_path: Path
) -> None:
    """412 on the ranges asked for once a part of the streamed upload is on its way (the source
    replaced under the read): exit 4's error, the upload aborted, nothing left."""
    uri = await put_in_region(
        regional_s3["eu-west-1"], "eu-west-1", f"{tmp_path.name}/m.tar.gz", model_archive(80 * MiB)
    )

    part_seen = [False]

    def refuse_once_a_part_is_on_its_way(method: str, target: str, headers: dict[str, str]) -> Any:
        if method == "PUT" and "partNumber=" in target:
            part_seen[0] = True
        elif method == "GET" and "range" in headers and part_seen[0]:
            return s3_error(412, "PreconditionFailed")
        return None

    with FaultProxy(stack.s3_endpoint, refuse_once_a_part_is_on_its_way, with_headers=True) as proxy:
        with pytest.raises(StorageError, match="PreconditionFailed"):
            await copy_through(proxy, uri, settings)
        assert proxy.count("PUT", "partNumber=") >= 1  # the streamed upload was under way
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    assert uploads.get("Uploads", []) == []
