"""Performance metadata: an optional JSON object sent with the registration.

It comes from an `s3://` URI (the original's PERFORMANCE_METADATA_PATH) or from
a local file or directory (the SageMaker input `/opt/ml/processing/input/metadata`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
from botocore.exceptions import ClientError

from . import _strict_json as strict_json
from ._errors import InputError
from ._s3 import S3Client, S3Location, get_object, storage_errors
from ._threads import FILES

__all__ = ["MAX_METADATA_BYTES", "load_performance_metadata"]

log = logging.getLogger("async_registrar")

#: Largest metadata document accepted; real ones are a few KiB of metrics.
MAX_METADATA_BYTES = 10 * 1024 * 1024


async def load_performance_metadata(s3: S3Client, *, local: Path | None, uri: str | None) -> dict[str, Any] | None:
    """Load the metadata object from `uri` if given, else from `local` if it exists, else None."""
    if uri:
        if local is not None and await aiofiles.os.path.exists(local, executor=FILES):
            log.warning("performance metadata: using %s; ignoring the local %s", uri, local)
        return await _from_s3(s3, S3Location.parse(uri, what="PERFORMANCE_METADATA_PATH"))
    if local is None:
        return None
    file = await _local_file(local)
    if file is None:
        return None
    try:
        async with aiofiles.open(file, "rb", executor=FILES) as f:
            data = await f.read(MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise InputError(f"performance metadata {file} cannot be read ({exc.strerror})", [str(file)]) from None
    return _parse(data, str(file))


async def _local_file(path: Path) -> Path | None:
    """The metadata file at `path`: the path itself, or the one JSON file in that directory."""
    if not await aiofiles.os.path.exists(path, executor=FILES):
        return None
    if not await aiofiles.os.path.isdir(path, executor=FILES):
        return path
    # Links to files count (a Kubernetes ConfigMap mounts each key as a link into `..data/`);
    # hidden entries (`..data`, `..2026_...`) do not.
    files = sorted(
        Path(entry.path)
        for entry in await aiofiles.os.scandir(path, executor=FILES)
        if not entry.name.startswith(".") and entry.is_file()
    )
    if not files:
        return None
    if len(files) > 1:
        json_files = [f for f in files if f.suffix == ".json"]
        if len(json_files) != 1:
            raise InputError(
                f"performance metadata directory {path} holds {len(files)} files; it must hold one "
                "JSON file: " + ", ".join(f.name for f in files),
                [str(f) for f in files],
            )
        files = json_files
    return files[0]


async def _from_s3(s3: S3Client, location: S3Location) -> dict[str, Any]:
    with storage_errors("GetObject", location.bucket, location.key):
        try:
            response = await get_object(s3, Bucket=location.bucket, Key=location.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise InputError(
                    f"performance metadata {location} does not exist; fix PERFORMANCE_METADATA_PATH "
                    "or upload the object",
                    [location.uri],
                ) from None
            raise
    body = response["Body"]
    async with body:  # closes the connection; `as` would give aiohttp's response, not the body
        if response.get("ContentLength", 0) > MAX_METADATA_BYTES:
            raise InputError(_too_large(location.uri), [location.uri])
        with storage_errors("GetObject", location.bucket, location.key):
            data = await body.read(MAX_METADATA_BYTES + 1)
    return _parse(data, location.uri)


def _parse(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_METADATA_BYTES:
        raise InputError(_too_large(where), [where])
    try:
        value = strict_json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"performance metadata {where} is not valid JSON ({exc}); fix the file", [where]) from None
    if not isinstance(value, dict):
        raise InputError(f"performance metadata {where} must be a JSON object, got {type(value).__name__}", [where])
    return value


def _too_large(where: str) -> str:
    return (
        f"performance metadata {where} is larger than {MAX_METADATA_BYTES >> 20} MiB; it should hold metrics, not data"
    )
