"""Models already in S3 (`--model s3://.../model.tar.gz`): copied inside S3, read once for the
sha256, never sent through the client (issue 18, part 2)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from async_registrar import Settings, StorageError
from async_registrar._artifacts import S3Archive
from async_registrar._concurrency import CleanupDeadline
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import S3Location, make_session, open_s3_client
from async_registrar._s3_source import copy_to_all, inspect_s3_archive
from async_registrar._threads import Workers

from .conftest import MiB, leftovers, make_job
from .fault_proxy import FaultProxy, Reply, Stall, s3_error
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

    def stall(method: str, target: str) -> Any:
        return Stall(2.0) if method == "PUT" and "partNumber=" in target else None

    with FaultProxy(stack.s3_endpoint, stall) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as proxied:
            source = await inspect_s3_archive(proxied, uri, role="model")
            target = S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")
            with anyio.move_on_after(0.5) as scope:
                await copy_model(proxied, source, target, settings)
        assert scope.cancelled_caught
        assert proxy.count("PUT", "partNumber=1") == 1  # the part copy was on its way
        assert proxy.count("DELETE", "uploadId=") == 1  # the abort
    await anyio.sleep(2.5)  # the held-back part copy reaches the server after the abort
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
