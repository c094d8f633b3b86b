"""Performance metadata: from S3 or a local file or directory, checked and capped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from async_registrar import InputError, Settings
from async_registrar._metadata import MAX_METADATA_BYTES, load_performance_metadata


async def test_absent_metadata_is_none(tmp_path: Path, s3: Any) -> None:
    """No URI and no local path (or an empty directory) means no metadata."""
    assert await load_performance_metadata(s3, local=tmp_path / "missing", uri=None) is None
    assert await load_performance_metadata(s3, local=None, uri=None) is None
    assert await load_performance_metadata(s3, local=tmp_path, uri=None) is None


async def test_local_file_or_directory(tmp_path: Path, s3: Any) -> None:
    """A file, or the one (JSON) file of a directory, is read."""
    (tmp_path / "perf.json").write_text('{"auc": 0.9}')
    assert await load_performance_metadata(s3, local=tmp_path / "perf.json", uri=None) == {"auc": 0.9}
    assert await load_performance_metadata(s3, local=tmp_path, uri=None) == {"auc": 0.9}
    (tmp_path / "README").write_text("notes")
    assert await load_performance_metadata(s3, local=tmp_path, uri=None) == {"auc": 0.9}
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InputError, match="holds 3 files; it must hold one JSON file"):
        await load_performance_metadata(s3, local=tmp_path, uri=None)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{oops", "is not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"\xff\xfe", "is not valid JSON")],
)
async def test_bad_local_metadata_names_the_file(tmp_path: Path, s3: Any, content: bytes, message: str) -> None:
    """Unparseable or non-object metadata is an InputError naming the file."""
    path = tmp_path / "perf.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        await load_performance_metadata(s3, local=path, uri=None)
    assert caught.value.paths == (str(path),)


async def test_oversized_metadata_is_refused(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """Above the cap, locally and in S3 (checked before reading the body)."""
    big = b'{"x": "' + b"a" * MAX_METADATA_BYTES + b'"}'
    (tmp_path / "perf.json").write_bytes(big)
    with pytest.raises(InputError, match="larger than 10 MiB"):
        await load_performance_metadata(s3, local=tmp_path / "perf.json", uri=None)
    key = settings.s3_prefix + "big.json"
    await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=big)
    with pytest.raises(InputError, match="larger than 10 MiB"):
        await load_performance_metadata(s3, local=None, uri=f"s3://{settings.s3_bucket}/{key}")
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


async def test_s3_metadata_wins_and_a_missing_object_is_named(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """The URI takes precedence over the local path; a missing object is an InputError."""
    key = settings.s3_prefix + "perf.json"
    await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=json.dumps({"from": "s3"}).encode())
    (tmp_path / "perf.json").write_text('{"from": "local"}')
    uri = f"s3://{settings.s3_bucket}/{key}"
    assert await load_performance_metadata(s3, local=tmp_path, uri=uri) == {"from": "s3"}
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    with pytest.raises(InputError, match=f"performance metadata {uri} does not exist"):
        await load_performance_metadata(s3, local=None, uri=uri)


async def test_a_kubernetes_configmap_mount_is_read(tmp_path: Path, s3: Any) -> None:
    """A ConfigMap volume: each key is a link into `..data/`, itself a link to a timestamped directory.
    The metadata used to be ignored there without a word (links were not counted as files)."""
    mount = tmp_path / "metadata"
    stamped = mount / "..2026_11_29_12_00_00.000000001"
    stamped.mkdir(parents=True)
    (stamped / "performance.json").write_text(json.dumps({"auc": 0.91}))
    (mount / "..data").symlink_to(stamped.name)
    (mount / "performance.json").symlink_to("..data/performance.json")
    assert await load_performance_metadata(s3, local=mount, uri=None) == {"auc": 0.91}
