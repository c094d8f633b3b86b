"""--dereference: Hugging Face and DVC style trees (links into a cache) become plain archives.

Without it, every link is refused and the message names the option; with it, a link to a
file is archived as a regular file of the target's bytes under the link's name, a link to a
directory as that directory, a hard-linked file as a regular file, and loops, dangling
links and links to anything else are still refused.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from async_registrar import InputError, Settings
from async_registrar._artifacts import DirectorySource, inspect_artifact
from async_registrar._local import LocalStack

from .conftest import make_job
from .test_cli import environment, run


def hugging_face_cache(root: Path) -> Path:
    """A hub cache as `huggingface_hub` lays it out: snapshot files are relative links into blobs/."""
    repo = root / "models--acme--risk-model"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "a1b2").write_text('{"hidden": 8}')
    (blobs / "c3d4").write_bytes(os.urandom(4096))
    (blobs / "e5f6").write_text("tokenizer")
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "onnx").mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/a1b2")
    (snapshot / "model.safetensors").symlink_to("../../blobs/c3d4")
    (snapshot / "onnx" / "tokenizer.txt").symlink_to("../../../blobs/e5f6")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def members(archive: bytes) -> dict[str, bytes | None]:
    """Each member's name and bytes (None for a directory); every member must be a file or a directory."""
    found: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for info in tar:
            assert info.isfile() or info.isdir(), f"{info.name} is neither a file nor a directory"
            extracted = tar.extractfile(info) if info.isfile() else None
            found[info.name] = extracted.read() if extracted else None
    return found


def test_links_are_refused_naming_the_option(tmp_path: Path) -> None:
    snapshot = hugging_face_cache(tmp_path)
    with pytest.raises(InputError) as caught:
        inspect_artifact(snapshot, role="model")
    message = caught.value.message
    assert message.count("symbolic link") == 3
    assert "--dereference (REGISTRAR_DEREFERENCE=true)" in message


def test_a_hugging_face_snapshot_is_archived_with_the_targets_bytes(tmp_path: Path) -> None:
    snapshot = hugging_face_cache(tmp_path)
    source = inspect_artifact(snapshot, role="model", dereference=True)
    assert isinstance(source, DirectorySource)
    files = {e.name: e for e in source.entries if not e.is_dir}
    assert set(files) == {"config.json", "model.safetensors", "onnx/tokenizer.txt"}
    assert files["model.safetensors"].size == 4096
    assert Path(files["model.safetensors"].path) == (tmp_path / "models--acme--risk-model/blobs/c3d4").resolve()


def test_hard_links_are_archived_as_regular_files(tmp_path: Path) -> None:
    """A tree made with `cp -al` (or a DVC cache): every file has two names."""
    original = tmp_path / "original"
    original.mkdir()
    (original / "weights.bin").write_bytes(b"w" * 100)
    tree = tmp_path / "tree"
    tree.mkdir()
    os.link(original / "weights.bin", tree / "weights.bin")
    with pytest.raises(InputError, match=r"hard link .*--dereference"):
        inspect_artifact(tree, role="model")
    source = inspect_artifact(tree, role="model", dereference=True)
    assert isinstance(source, DirectorySource)
    assert [(e.name, e.size) for e in source.entries] == [("weights.bin", 100)]


def test_loops_dangling_links_and_special_targets_are_still_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "up").symlink_to("..")  # back to an ancestor: a loop
    (tree / "self").symlink_to("self")  # a link to itself
    (tree / "gone").symlink_to("nowhere")  # dangling
    os.mkfifo(tmp_path / "fifo")
    (tree / "pipe").symlink_to(tmp_path / "fifo")
    (tree / "ok.txt").write_text("fine")
    (tree / "chain").symlink_to("link-to-ok")  # a chain of links ends at a file: fine
    (tree / "link-to-ok").symlink_to("ok.txt")
    with pytest.raises(InputError) as caught:
        inspect_artifact(tree, role="model", dereference=True)
    message = caught.value.message
    assert "up: symbolic link (to ..) loops back to a directory above it" in message
    assert "self: symbolic link (to self) cannot be followed (a loop of symbolic links)" in message
    assert "gone: dangling symbolic link (to nowhere)" in message
    assert "pipe: named pipe (FIFO)" in message
    assert "chain" not in message
    assert "link-to-ok" not in message


async def test_upload_dereference_streams_the_targets_as_regular_files(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """End to end: `upload --dereference` of a hub snapshot; the object holds plain files with the
    links' names and the blobs' bytes (and extracts with tarfile's `data` filter)."""
    snapshot = hugging_face_cache(tmp_path)
    env = environment(stack, settings, make_job(tmp_path))
    key = f"{settings.s3_prefix}snapshot.tar.gz"
    refused = run(env, "upload", str(snapshot), f"s3://{settings.s3_bucket}/{key}")
    assert refused.returncode == 3, refused.stderr
    assert "--dereference" in refused.stderr
    result = run(env, "upload", "--dereference", str(snapshot), f"s3://{settings.s3_bucket}/{key}")
    assert result.returncode == 0, result.stderr
    body = await (await s3.get_object(Bucket=settings.s3_bucket, Key=key))["Body"].read()
    found = members(body)
    blobs = tmp_path / "models--acme--risk-model" / "blobs"
    assert found["model.safetensors"] == (blobs / "c3d4").read_bytes()
    assert found["config.json"] == (blobs / "a1b2").read_bytes()
    assert found["onnx/tokenizer.txt"] == (blobs / "e5f6").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body)), mode="r:") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


async def test_register_with_the_variable_registers_a_snapshot(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    snapshot = hugging_face_cache(tmp_path)
    env = environment(stack, settings, make_job(tmp_path), REGISTRAR_MODEL_PATH=str(snapshot))
    refused = run(env, "register")
    assert refused.returncode == 3, refused.stderr
    registered = run({**env, "REGISTRAR_DEREFERENCE": "true"}, "register")
    assert registered.returncode == 0, registered.stderr
    assert len(registered.stdout.splitlines()) == 2
