"""The upload pipeline against a real S3 server (moto on loopback)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from async_registrar import InputError, Settings, StorageError, UploadProgress
from async_registrar._artifacts import inspect_artifact
from async_registrar._s3 import S3Location
from async_registrar._upload import UploadedArtifact, upload_artifact

from .conftest import MiB, leftovers


def model_dir(root: Path, size: int) -> Path:
    root.mkdir()
    (root / "a-weights.bin").write_bytes(os.urandom(size))
    (root / "b-config.json").write_text('{"dim": 3}')
    return root


def client_error(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "injected"}}, operation)


def model_location(settings: Settings) -> S3Location:
    return S3Location(settings.s3_bucket, settings.s3_prefix + "model.tar.gz")


async def upload_with_hook(
    tmp_path: Path, s3: Any, settings: Settings, event: str, hook: Callable[..., None], size: int = 12 * MiB
) -> UploadedArtifact:
    """Upload a model of `size` bytes to `model_location` with `hook` registered on botocore's `event`."""
    root = model_dir(tmp_path / "model", size)
    s3.meta.events.register(event, hook)
    return await upload_artifact(s3, inspect_artifact(root, role="model"), model_location(settings), settings)


async def download(s3: Any, location: S3Location) -> bytes:
    response = await s3.get_object(Bucket=location.bucket, Key=location.key)
    async with response["Body"] as body:
        data: bytes = await body.read()
    return data


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_multipart_round_trip(tmp_path: Path, s3: Any, settings: Settings, checksums: str) -> None:
    """A 12 MiB model goes up in 5 MiB parts; GNU tar extracts it; sha256 and size match."""
    root = model_dir(tmp_path / "model", 12 * MiB)
    settings = settings.model_copy(update={"s3_checksums": checksums})
    location = model_location(settings)
    events: list[UploadProgress] = []
    result = await upload_artifact(
        s3, inspect_artifact(root, role="model"), location, settings, artifact="model", on_progress=events.append
    )  # type: ignore[arg-type]
    data = await download(s3, location)
    assert result.parts == 3
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    (tmp_path / "got.tar.gz").write_bytes(data)
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "got.tar.gz"), "-C", str(tmp_path / "out")], check=True)
    assert (tmp_path / "out" / "a-weights.bin").read_bytes() == (root / "a-weights.bin").read_bytes()
    assert events[-1].done
    assert events[-1].bytes_uploaded == result.size
    assert events[-1].parts_done == 3
    assert events[-1].bytes_read > 12 * MiB
    assert events[-1].bytes_total == events[-1].bytes_read  # the tar stream's length, known up front
    assert all(e.bytes_total == events[-1].bytes_total for e in events)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [location.key]


async def test_small_artifacts_take_one_put(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """An archive smaller than a part is one PutObject: no multipart upload is ever created."""
    root = model_dir(tmp_path / "model", 1000)
    created: list[str] = []
    s3.meta.events.register("before-call.s3.CreateMultipartUpload", lambda **_: created.append("mpu"))
    location = S3Location(settings.s3_bucket, f"{settings.s3_prefix}small.tar.gz")
    result = await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    assert result.parts == 1
    assert created == []
    assert hashlib.sha256(await download(s3, location)).hexdigest() == result.sha256


async def test_same_input_same_sha256(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """Two uploads of one directory give the same sha256 (what MIMS checks)."""
    root = model_dir(tmp_path / "model", 6 * MiB)
    source = inspect_artifact(root, role="model")
    first = await upload_artifact(s3, source, S3Location(settings.s3_bucket, settings.s3_prefix + "1"), settings)
    second = await upload_artifact(s3, source, S3Location(settings.s3_bucket, settings.s3_prefix + "2"), settings)
    assert first.sha256 == second.sha256
    assert first.size == second.size


async def test_prebuilt_archive_is_uploaded_unchanged(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """A directory holding one tar.gz uploads that file's exact bytes."""
    src = model_dir(tmp_path / "src", 11 * MiB)
    (tmp_path / "prebuilt").mkdir()
    archive = tmp_path / "prebuilt" / "model.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(src), "."], check=True)
    location = model_location(settings)
    events: list[UploadProgress] = []
    source = inspect_artifact(archive.parent, role="model")
    result = await upload_artifact(s3, source, location, settings, on_progress=events.append)  # type: ignore[arg-type]
    assert await download(s3, location) == archive.read_bytes()
    assert result.parts == 3
    assert events[-1].bytes_read == events[-1].bytes_total == archive.stat().st_size


async def test_producer_error_aborts_the_upload(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """A file that changes once parts are going up fails the producer: nothing stays open."""
    root = model_dir(tmp_path / "model", 40 * MiB)
    source = inspect_artifact(root, role="model")
    # With one upload at a time, backpressure holds the producer well inside a-weights.bin
    # when the first part goes up; b-config.json changes then, before it is read.
    settings = settings.model_copy(update={"upload_concurrency": 1, "upload_queue_parts": 1})
    location = model_location(settings)
    parts: list[int] = []

    def change_config(**_: Any) -> None:
        parts.append(1)
        (root / "b-config.json").write_text('{"dim": 3, "changed": true}')

    s3.meta.events.register("before-call.s3.UploadPart", change_config)
    with pytest.raises(InputError, match=r"b-config\.json changed"):
        await upload_artifact(s3, source, location, settings)
    assert parts, "parts should have been uploaded before the producer failed"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_part_error_aborts_the_upload(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """S3 failing one part (after botocore's own retries) aborts the whole upload."""

    def fail_part_two(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2:
            raise client_error("InternalError", "UploadPart")

    with pytest.raises(StorageError, match=r"UploadPart \(part 2\) failed for s3://.*: InternalError") as caught:
        await upload_with_hook(
            tmp_path, s3, settings, "before-parameter-build.s3.UploadPart", fail_part_two, size=16 * MiB
        )
    assert caught.value.code == "InternalError"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cancellation_mid_upload_aborts(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """Cancelling after the first part stops the producer, cancels the parts and aborts the upload."""
    root = model_dir(tmp_path / "model", 24 * MiB)
    location = model_location(settings)
    seen: list[UploadProgress] = []
    with anyio.CancelScope() as scope:

        def on_progress(event: Any) -> None:
            seen.append(event)
            scope.cancel()

        await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings, on_progress=on_progress)
    assert scope.cancelled_caught
    # Parts that finished together may each report before the cancellation lands.
    assert seen
    assert not any(event.done for event in seen)
    assert seen[-1].parts_done < 5  # of 24 MiB in 5 MiB parts
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_missing_bucket_is_a_storage_error(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """NoSuchBucket names the bucket and says what to do."""
    root = model_dir(tmp_path / "model", 6 * MiB)
    location = S3Location("no-such-bucket-here", "k/model.tar.gz")
    with pytest.raises(StorageError, match=r"NoSuchBucket.*create the bucket or fix --bucket"):
        await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)


async def test_a_completion_reported_failed_but_done_is_reconciled(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """NoSuchUpload after the completion went through (a retried success): HeadObject finds it whole."""

    def lose_the_answer(**_: Any) -> None:
        raise client_error("NoSuchUpload", "CompleteMultipartUpload")

    result = await upload_with_hook(tmp_path, s3, settings, "after-call.s3.CompleteMultipartUpload", lose_the_answer)
    assert hashlib.sha256(await download(s3, model_location(settings))).hexdigest() == result.sha256


async def test_a_completion_that_failed_is_reported_and_aborted(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """An error before the completion reached S3: HeadObject finds nothing, exit 4, nothing left."""

    def fail(**_: Any) -> None:
        raise client_error("InternalError", "CompleteMultipartUpload")

    with pytest.raises(StorageError, match=r"CompleteMultipartUpload failed .*InternalError"):
        await upload_with_hook(tmp_path, s3, settings, "before-call.s3.CompleteMultipartUpload", fail)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [("ChecksumCRC32", "AAAAAA==-3", "its CRC32 is AAAAAA==-3"), ("ContentLength", 17, "it holds 17 bytes")],
)
async def test_an_object_that_is_not_whole_is_deleted(
    tmp_path: Path, s3: Any, settings: Settings, field: str, value: object, problem: str
) -> None:
    """A size or checksum that does not match after completion: StorageError, and the object goes."""

    def corrupt(parsed: dict[str, Any], **_: Any) -> None:
        parsed[field] = value

    with pytest.raises(StorageError, match=f"is not what was uploaded: {problem}.*the object was deleted"):
        await upload_with_hook(tmp_path, s3, settings, "after-call.s3.HeadObject", corrupt)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize(
    ("reported", "warnings"),
    [
        # A server that answers a FULL_OBJECT CRC64NVME request with a composite value ("-N").
        (
            {"ChecksumCRC64NVME": "AAAAAAAAAAA=-3", "ChecksumType": "COMPOSITE"},
            ["reports a COMPOSITE CRC64NVME (AAAAAAAAAAA=-3); it was not compared"],
        ),
        # moto without the CRT stores a 4-byte CRC32 under the name CRC64NVME (issue 17): no
        # CRC64NVME has 4 bytes, and the warning names the settings that fit.
        (
            {"ChecksumCRC64NVME": "AAAAAA==", "ChecksumType": "FULL_OBJECT"},
            ["reports a CRC64NVME that is not one ('AAAAAA==')", "REGISTRAR_S3_CHECKSUM_ALGORITHM=CRC32"],
        ),
    ],
    ids=["another-kind", "wrong-length"],
)
async def test_a_checksum_that_cannot_be_compared_is_not_taken_for_damage(
    tmp_path: Path,
    s3: Any,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    reported: dict[str, str],
    warnings: list[str],
) -> None:
    """A CRC64NVME of another kind or of the wrong length gives nothing to compare: a warning
    that says why, and the object stays."""
    settings = settings.model_copy(update={"s3_checksum_algorithm": "CRC64NVME"})

    def report(parsed: dict[str, Any], **_: Any) -> None:
        parsed.update(reported)

    result = await upload_with_hook(tmp_path, s3, settings, "after-call.s3.HeadObject", report)
    assert hashlib.sha256(await download(s3, model_location(settings))).hexdigest() == result.sha256
    for warning in warnings:
        assert warning in caplog.text


def crc64nvme(data: bytes) -> str:
    """The CRC64NVME S3 reports, computed the way botocore does (the AWS CRT)."""
    from awscrt import checksums

    return base64.b64encode(checksums.crc64nvme(data).to_bytes(8, "big")).decode()


def sent_headers(request: Any) -> dict[str, str]:
    """A signed request's headers as text, by lower-case name (botocore holds some as bytes)."""
    return {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}


async def stored_checksums(s3: Any, settings: Settings) -> dict[str, Any]:
    """HeadObject of the uploaded model, with the checksums S3 holds for it."""
    response: dict[str, Any] = await s3.head_object(
        Bucket=settings.s3_bucket, Key=model_location(settings).key, ChecksumMode="ENABLED"
    )
    return response


async def test_crc64nvme_is_a_full_object_checksum(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """With CRC64NVME, every part carries its own CRC64NVME and the completion carries the whole
    object's, as a FULL_OBJECT checksum with the object's size; S3's CRC64NVME of the object is it."""
    settings = settings.model_copy(update={"s3_checksum_algorithm": "CRC64NVME"})
    sent: dict[str, list[dict[str, str]]] = {}

    def record(request: Any, event_name: str, **_: Any) -> None:
        sent.setdefault(event_name.rsplit(".", 1)[1], []).append(sent_headers(request))

    result = await upload_with_hook(tmp_path, s3, settings, "before-send.s3", record)
    data = await download(s3, model_location(settings))
    head = await stored_checksums(s3, settings)
    assert head["ChecksumCRC64NVME"] == crc64nvme(data)
    assert head["ChecksumType"] == "FULL_OBJECT"
    assert result.parts == 3
    (create,), parts, (complete,) = sent["CreateMultipartUpload"], sent["UploadPart"], sent["CompleteMultipartUpload"]
    assert (create["x-amz-checksum-algorithm"], create["x-amz-checksum-type"]) == ("CRC64NVME", "FULL_OBJECT")
    cut = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    assert sorted(h["x-amz-checksum-crc64nvme"] for h in parts) == sorted(crc64nvme(c) for c in cut)
    assert complete["x-amz-checksum-crc64nvme"] == crc64nvme(data)
    assert (complete["x-amz-checksum-type"], complete["x-amz-mp-object-size"]) == ("FULL_OBJECT", str(len(data)))


async def test_crc64nvme_on_a_single_put(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """An artifact smaller than a part goes up in one PutObject that carries its CRC64NVME."""
    settings = settings.model_copy(update={"s3_checksum_algorithm": "CRC64NVME"})
    sent: list[str] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(sent_headers(request)["x-amz-checksum-crc64nvme"])

    result = await upload_with_hook(tmp_path, s3, settings, "before-send.s3.PutObject", record, size=MiB)
    data = await download(s3, model_location(settings))
    head = await stored_checksums(s3, settings)
    assert result.parts == 1
    assert head["ChecksumCRC64NVME"] == crc64nvme(data)
    assert sent == [crc64nvme(data)]


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC64NVME"])
async def test_a_part_damaged_on_the_way_is_caught(tmp_path: Path, s3: Any, settings: Settings, algorithm: str) -> None:
    """A part whose bytes change between us and the server (which, like moto, does not check them
    itself): the object's checksum differs from ours, so the object is deleted and the upload fails."""
    settings = settings.model_copy(update={"s3_checksum_algorithm": algorithm})

    def damage_part_two(request: Any, **_: Any) -> None:
        if "partNumber=2" in request.url:
            request.body.seek(0)
            body = bytearray(request.body.read())
            body[100] ^= 0xFF
            request.body = io.BytesIO(bytes(body))

    with pytest.raises(StorageError, match=f"is not what was uploaded: its {algorithm} is .*the object was deleted"):
        await upload_with_hook(tmp_path, s3, settings, "before-send.s3.UploadPart", damage_part_two)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_access_denied_on_create_is_named(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """AccessDenied when starting the upload: a StorageError that says what to check; nothing left."""

    def deny(**_: Any) -> None:
        raise client_error("AccessDenied", "CreateMultipartUpload")

    with pytest.raises(StorageError, match=r"AccessDenied.*the job's role needs s3:PutObject on s3://"):
        await upload_with_hook(tmp_path, s3, settings, "before-call.s3.CreateMultipartUpload", deny)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
