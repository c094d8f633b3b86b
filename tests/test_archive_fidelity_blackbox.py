"""Byte boundaries and archive fidelity, checked as a user would (black box, from the README).

- What the registry holds (the reference MIMS copies each artifact to
  `s3://{registry bucket}/models/{model id}/model.tar.gz`) extracts, with
  `tarfile.extractall(filter="data")` and with GNU tar, to exactly the input tree: bytes, empty
  files, empty directories, unicode and long names, deep nesting, the modes the README names
  ("modes 0644/0755": executables 0755), the fixed mtime and uid/gid 0.
- Archives whose compressed size is exactly one part, one byte under and one over (the tests'
  part size is 5 MiB, S3's minimum), 1-byte and 0-byte files, many tiny files: the size and
  sha256 the library and the command report are those of the bytes in S3.
- Prebuilt `.tar.gz` inputs from other producers (GNU tar in its formats, tarfile's GNU and PAX
  formats, a `git archive`-style global PAX header, `./` members, gzip headers with
  FNAME/FEXTRA/FCOMMENT/FHCRC, multi-member gzip as bgzip writes it, extra or missing
  end-of-archive blocks, zero padding after the gzip stream, other names) are registered byte
  for byte; archives that are not usable tar.gz files (trailing garbage, a bad CRC or length
  in the gzip trailer, plain tar, bzip2, a gzip of something else, nothing at all) are exit 3
  naming the file, before any registration, with nothing left in S3.

Assumptions where the README is silent (stated in the report too):
- "usable tar.gz" is what `gzip -t` and `tar -xzf` (GNU) accept: trailing garbage after the
  gzip stream, or a wrong CRC-32 / length in its trailer, is corrupt (GNU tar fails on them);
  zero padding after the stream, extra zero blocks after the end-of-archive, and a tar without
  its end-of-archive blocks are fine (both tools accept them).
- "a single file named `.tar.gz` or `.tgz`" matches the suffix in any case (`MODEL.TGZ`).
- A single gzip file that is not a tar and is not named `.tar.gz`/`.tgz` (`weights.json.gz`)
  is a model of one plain file, archived like any other.
- A prebuilt archive with no file in it (no member, or directories only) is an empty model,
  exit 3, as a model directory "holding nothing but directories" is (docs/faults.md).
- A file name with a C1 control character (U+0080-U+009F, Unicode category Cc) "holds control
  characters" as much as one with a tab does.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import os
import random
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from async_registrar import InputError, Registrar, Settings
from async_registrar._local import LocalStack

from .conftest import environment, leftovers, make_job, request_for
from .test_cli import expected_archive, run

MiB = 1024 * 1024
FIXED_MTIME = 315532800  # 1980-01-01, the README's default archive mtime


# -- helpers ------------------------------------------------------------------------------------


async def object_bytes(s3: Any, bucket: str, key: str) -> bytes:
    obj = await s3.get_object(Bucket=bucket, Key=key)
    async with obj["Body"] as body:
        data: bytes = await body.read()
    return data


async def registered_model(s3: Any, stack: LocalStack, model_id: str) -> bytes:
    """The model archive as the registry holds it."""
    return await object_bytes(s3, stack.registry_bucket, f"models/{model_id}/model.tar.gz")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: relative POSIX path -> bytes (files) or None (directories)."""
    found: dict[str, bytes | None] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = b"link->" + os.readlink(path).encode()
        elif path.is_dir():
            found[rel] = None
        else:
            found[rel] = path.read_bytes()
    return found


def extracted(data: bytes, dest: Path) -> dict[str, bytes | None]:
    """`data` extracted by tarfile with the `data` filter into `dest`, as a snapshot."""
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(dest, filter="data")
    return snapshot(dest)


def gnu_extracted(data: bytes, dest: Path) -> dict[str, bytes | None]:
    """`data` extracted by GNU tar (`tar -xzf -`), as a snapshot."""
    dest.mkdir()
    done = subprocess.run(["tar", "-xzf", "-", "-C", str(dest)], input=data, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return snapshot(dest)


def gzip_member(
    data: bytes, *, fname: bytes = b"", extra: bytes = b"", comment: bytes = b"", hcrc: bool = False
) -> bytes:
    """One gzip member of `data` with the optional header fields (RFC 1952) a producer may write."""
    flags = (0x02 if hcrc else 0) | (0x04 if extra else 0) | (0x08 if fname else 0) | (0x10 if comment else 0)
    header = b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", 1700000000) + b"\x00\x03"
    if extra:
        header += struct.pack("<H", len(extra)) + extra
    if fname:
        header += fname + b"\x00"
    if comment:
        header += comment + b"\x00"
    if hcrc:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def tar_bytes(members: dict[str, bytes | None], *, fmt: int = tarfile.PAX_FORMAT, **kwargs: Any) -> bytes:
    """A tar of `members` (None: a directory) in tarfile's format `fmt`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, **kwargs) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def without_end_of_archive(tar: bytes) -> bytes:
    """`tar` cut after its last member's data: no end-of-archive blocks, no record padding."""
    end = 0
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive:
            end = member.offset_data + -(-member.size // 512) * 512
    assert tar[end:].strip(b"\0") == b""
    return tar[:end]


#: What the prebuilt archives hold: a little of everything, names long and unicode.
CONTENT: dict[str, bytes | None] = {
    "code": None,
    "code/inference.py": b"def model_fn(model_dir):\n    return model_dir\n",
    "weights.bin": random.Random(7).randbytes(300_000),
    "empty.txt": b"",
    "donn\u00e9es/mod\u00e8le-\u65e5\u672c-\U0001f600.json": b'{"k": 1}\n',
    "d" * 120 + "/" + "f" * 150: b"long path\n",
    "nested/" * 30 + "leaf": b"deep\n",
}


def gnu_tar(src: Path, fmt: str, dot: bool) -> bytes:
    """GNU tar's own archive of `src` in `fmt`, gzipped by GNU tar (with `./` members if `dot`)."""
    args = ["tar", f"--format={fmt}", "-czf", "-", "-C", str(src)]
    args += ["."] if dot else sorted(os.listdir(src))
    return subprocess.run(args, capture_output=True, check=True).stdout


def content_tree(root: Path) -> Path:
    root.mkdir()
    for name, data in CONTENT.items():
        path = root / name
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


# -- round trip of a directory ------------------------------------------------------------------


def odd_tree(root: Path) -> Path:
    """A model directory with what trips archivers: every entry a user could reasonably have."""
    root.mkdir()
    files: dict[str, bytes] = {
        "empty.bin": b"",
        "one.bin": b"\x00",
        "s511.bin": os.urandom(511),
        "s512.bin": os.urandom(512),
        "s513.bin": os.urandom(513),
        "caf\u00e9.txt": b"NFC",  # composed
        "cafe\u0301.txt": b"NFD",  # decomposed: another name on Linux
        "\u65e5\u672c\u8a9e/\u91cd\u307f.bin": os.urandom(1000),
        "emoji-\U0001f600\U0001f9e0.txt": b"emoji",
        "n" * 100: b"exactly 100 bytes of name",
        "m" * 101: b"101 bytes of name",
        "\u00e9" * 49 + "ab": b"a two-byte character across byte 100",
        "\u00e9" * 127 + "x": b"a 255-byte name",
        "\U0001f600" * 63 + "xyz": b"a 255-byte name of 4-byte characters",
        ("D" * 150) + "/" + ("F" * 200): b"a long directory and a long name",
        "/".join(["p" * 60] * 6) + "/leaf.txt": b"a path over 255 bytes",
        "/".join(["l"] * 80) + "/leaf": b"deep",
        "with space.txt": b"space",
        "-leading-dash": b"dash",
        ".hidden": b"hidden",
        "...": b"dots",
        "back\\slash": b"backslash",
        "q'uo\"te?*[x]#%&": b"shell characters",
        "a-b": b"sorted before a/ by bytes",
        "a/b": b"inside a",
        "a.b/c": b"inside a.b",
        "serve": b"#!/bin/sh\nexec python -m serve\n",
        "bin/train": b"#!/bin/sh\n",
        "private.key": b"owner-only",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for directory in ("empty-dir", "nested/empty/deeper", "\u7a7a"):
        (root / directory).mkdir(parents=True)
    os.chmod(root / "serve", 0o755)  # noqa: S103 (an executable, as a model ships one)
    os.chmod(root / "bin/train", 0o700)
    os.chmod(root / "private.key", 0o600)
    os.chmod(root / "bin", 0o700)
    # A sparse file: a hole, then data (read back as zeros).
    with open(root / "sparse.bin", "wb") as sparse:
        sparse.seek(3 * 65536)
        sparse.write(b"end")
    return root


def check_members(data: bytes, executables: set[str]) -> list[str]:
    """The archive's member names, after checking their metadata against the README's promise."""
    names: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            names.append(member.name)
            assert member.isfile() or member.isdir(), member.name
            assert member.mtime == FIXED_MTIME, (member.name, member.mtime)
            assert (member.uid, member.gid) == (0, 0), member.name
            expected = 0o755 if member.isdir() or member.name in executables else 0o644
            assert member.mode == expected, (member.name, oct(member.mode))
            parent = member.name.rpartition("/")[0]
            assert not parent or parent in names, f"{member.name} comes before its directory"
    assert len(names) == len(set(names)), "a member twice"
    return names


async def test_a_tree_of_odd_names_registers_and_extracts_to_exactly_the_input(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`register` of a model with empty files and directories, unicode (NFC and NFD), names of
    100/101/255 bytes, a multi-byte character across byte 100, a path over 255 bytes, 80 levels,
    shell characters, executables and a sparse file: what the registry holds extracts (tarfile's
    `data` filter and GNU tar alike) to exactly that tree, with modes 0755/0644, the fixed mtime
    and uid/gid 0; the run leaves nothing under its prefix."""
    job = make_job(tmp_path)
    job["model"] = odd_tree(tmp_path / "odd")
    before = snapshot(job["model"])
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 0, result.stderr
    model_id = result.stdout.splitlines()[1].rsplit(" ", 1)[1]
    data = await registered_model(s3, stack, model_id)
    assert data == expected_archive(job["model"])  # deterministic: the same bytes again
    assert extracted(data, tmp_path / "by-tarfile") == before
    assert gnu_extracted(data, tmp_path / "by-gnu-tar") == before
    names = check_members(data, executables={"serve", "bin/train"})
    assert set(names) == set(before)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize(
    "char",
    [
        pytest.param("\t", id="tab-C0"),
        pytest.param("\x7f", id="DEL"),
        pytest.param("\x85", id="NEL-C1"),
        pytest.param("\x9b", id="CSI-C1"),
    ],
)
async def test_a_name_with_a_control_character_is_refused(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, char: str
) -> None:
    """The README refuses "names that ... hold control characters" before any upload: a tab,
    DEL, and the C1 controls U+0085 (NEL) and U+009B (CSI, a terminal escape) are all control
    characters (Unicode category Cc), and a tab and DEL are refused."""
    job = make_job(tmp_path)
    (job["model"] / f"ctl{char}name.bin").write_bytes(b"x")
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 3, result.stderr
    assert "ctl" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# -- size boundaries ----------------------------------------------------------------------------

PART = 5 * MiB  # the tests' part size (conftest's settings and environment), S3's minimum


_TEXT = random.Random(41).randbytes(2 * MiB).translate(bytes(b"0123456789abcdef"[i & 15] for i in range(256)))
_RANDOM = random.Random(42).randbytes(5 * MiB)


def _sized_model(root: Path, rand: int, text: int) -> Path:
    """Random bytes first (stored blocks), then hex text (compressed: ~0.56 byte a character)."""
    (root / "a.bin").write_bytes(_RANDOM[:rand])
    (root / "z.txt").write_bytes(_TEXT[:text])
    return root


@functools.cache
def _tuned_sizes(target: int) -> tuple[int, int]:
    """Sizes (random bytes, text bytes) of a two-file model whose deterministic archive is exactly
    `target` bytes: the smallest text size that reaches it, by bisection, for a few random sizes."""
    with tempfile.TemporaryDirectory() as work:
        for rand in range(target - 1_100_000, target - 1_100_000 + 8):

            def size(text: int, rand: int = rand) -> int:
                return len(expected_archive(_sized_model(Path(work), rand, text)))

            lo, hi = 0, len(_TEXT)
            assert size(lo) < target <= size(hi)
            while lo + 1 < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if size(mid) >= target else (mid, hi)
            if size(hi) == target:
                return rand, hi
    raise AssertionError(f"no model of exactly {target} bytes found")


def model_of_archive_size(root: Path, target: int) -> Path:
    root.mkdir()
    return _sized_model(root, *_tuned_sizes(target))


async def assert_uploaded(
    s3: Any, settings: Settings, key: str, uploaded: Any, model: Path, tmp_path: Path, *, parts: int
) -> bytes:
    """What `upload` reported is what S3 holds, and that extracts to the model."""
    data = await object_bytes(s3, settings.s3_bucket, key)
    head = await s3.head_object(Bucket=settings.s3_bucket, Key=key)
    assert uploaded.size == len(data) == head["ContentLength"]
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
    assert uploaded.parts == parts, (uploaded.parts, len(data))
    assert str(uploaded.location) == f"s3://{settings.s3_bucket}/{key}"
    assert data == expected_archive(model)
    assert extracted(data, tmp_path / "out") == snapshot(model)
    return data


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["one-byte-under-a-part", "exactly-one-part", "one-byte-over"])
async def test_an_archive_at_the_part_size_boundary(tmp_path: Path, settings: Settings, s3: Any, offset: int) -> None:
    """A model whose archive is the part size, one byte under, one byte over: one part, one part,
    two parts; the reported size and sha256 are those of the object, which extracts to the model."""
    assert settings.part_size == PART
    model = model_of_archive_size(tmp_path / "model", PART + offset)
    assert len(expected_archive(model)) == PART + offset
    key = f"{settings.s3_prefix}boundary.tar.gz"
    async with Registrar(settings) as registrar:
        uploaded = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
    data = await assert_uploaded(s3, settings, key, uploaded, model, tmp_path, parts=1 if offset <= 0 else 2)
    assert len(data) == PART + offset
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]


async def test_the_upload_command_reports_what_s3_holds_at_exactly_one_part(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`upload` prints URI, size, sha256 and integrity: the size and sha256 of the bytes in S3."""
    model = model_of_archive_size(tmp_path / "sized", PART)
    job = make_job(tmp_path)
    key = f"{settings.s3_prefix}exact.tar.gz"
    uri = f"s3://{settings.s3_bucket}/{key}"
    result = run(environment(stack, settings, job), "upload", str(model), uri)
    assert result.returncode == 0, result.stderr
    data = await object_bytes(s3, settings.s3_bucket, key)
    assert result.stdout.split() == [uri, str(PART), hashlib.sha256(data).hexdigest(), "size-only"]
    assert len(data) == PART
    assert extracted(data, tmp_path / "out") == snapshot(model)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]


def _one_empty_file(root: Path) -> None:
    (root / "empty").write_bytes(b"")


def _one_byte(root: Path) -> None:
    (root / "b").write_bytes(b"\xff")


def _many_tiny_files(root: Path) -> None:
    for i in range(1500):
        sub = root / f"shard-{i % 15:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"t{i:05d}.bin").write_bytes(bytes([i % 256]) * (i % 4))


def _empty_file_in_an_empty_tree(root: Path) -> None:
    (root / "a/b/c").mkdir(parents=True)
    (root / "a/b/c/zero").write_bytes(b"")
    (root / "x/y").mkdir(parents=True)


@pytest.mark.parametrize(
    "fill",
    [_one_empty_file, _one_byte, _many_tiny_files, _empty_file_in_an_empty_tree],
    ids=["one-0-byte-file", "one-1-byte-file", "1500-tiny-files", "a-0-byte-file-among-empty-dirs"],
)
async def test_tiny_models_round_trip(
    tmp_path: Path, settings: Settings, s3: Any, fill: Callable[[Path], None]
) -> None:
    """The smallest models there are (and very many tiny files): one part, the size and sha256
    of the object, extracting to the model with its empty directories."""
    model = tmp_path / "model"
    model.mkdir()
    fill(model)
    key = f"{settings.s3_prefix}tiny.tar.gz"
    async with Registrar(settings) as registrar:
        uploaded = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
    await assert_uploaded(s3, settings, key, uploaded, model, tmp_path, parts=1)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]


@pytest.mark.parametrize("shape", ["no-entry", "only-directories"])
async def test_a_model_with_no_file_is_refused_naming_it(
    tmp_path: Path, settings: Settings, s3: Any, shape: str
) -> None:
    """A 0-byte model (an empty directory, or directories only) is an InputError naming it,
    nothing written (README: "A missing or empty model directory is exit 3")."""
    model = tmp_path / "model"
    model.mkdir()
    if shape == "only-directories":
        (model / "a/b").mkdir(parents=True)
    key = f"{settings.s3_prefix}none.tar.gz"
    async with Registrar(settings) as registrar:
        with pytest.raises(InputError) as caught:
            await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
    assert str(model) in str(caught.value)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# -- prebuilt archives from other producers -----------------------------------------------------


def _gnu_tar_posix(src: Path) -> bytes:
    return gnu_tar(src, "posix", dot=False)


def _gnu_tar_gnu_dot(src: Path) -> bytes:
    return gnu_tar(src, "gnu", dot=True)


def _gnu_tar_ustar_then_gzip_cli(src: Path) -> bytes:
    """`tar --format=ustar | gzip -9` (no long names in ustar: the short members only)."""
    args = ["tar", "--format=ustar", "-cf", "-", "-C", str(src), "code", "weights.bin", "empty.txt"]
    tar = subprocess.run(args, capture_output=True, check=True).stdout
    return subprocess.run(["gzip", "-9"], input=tar, capture_output=True, check=True).stdout


def _tarfile(fmt: int, **kwargs: Any) -> Callable[[Path], bytes]:
    def build(src: Path) -> bytes:
        return gzip.compress(tar_bytes(CONTENT, fmt=fmt, **kwargs), mtime=0)

    return build


def _gzip_header_fields(src: Path) -> bytes:
    return gzip_member(
        tar_bytes(CONTENT), fname=b"model.tar", extra=b"AB\x04\x00data", comment=b"built by hand", hcrc=True
    )


def _multi_member(src: Path) -> bytes:
    """bgzip/pigz --independent style: the tar cut into members of 64 KiB, each its own gzip."""
    tar = tar_bytes(CONTENT)
    return b"".join(gzip.compress(tar[i : i + 65536], mtime=0) for i in range(0, len(tar), 65536))


def _extra_zero_blocks(src: Path) -> bytes:
    return gzip.compress(tar_bytes(CONTENT) + b"\0" * (20 * 512), mtime=0)


def _no_end_of_archive(src: Path) -> bytes:
    return gzip.compress(without_end_of_archive(tar_bytes(CONTENT)), mtime=0)


def _zero_padding_after_gzip(src: Path) -> bytes:
    return gzip.compress(tar_bytes(CONTENT), mtime=0) + b"\0" * 4096


def _gzip_level_0(src: Path) -> bytes:
    return gzip.compress(tar_bytes(CONTENT), compresslevel=0, mtime=0)


def _links_inside_the_tree(src: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        data = b"blob bytes\n"
        info = tarfile.TarInfo("blobs/abc")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("snapshot/model.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "../blobs/abc"
        tar.addfile(link)
        hard = tarfile.TarInfo("copy.bin")
        hard.type, hard.linkname = tarfile.LNKTYPE, "blobs/abc"
        tar.addfile(hard)
    return buffer.getvalue()


VALID: dict[str, tuple[str, Callable[[Path], bytes]]] = {
    "gnu-tar-posix": ("model.tar.gz", _gnu_tar_posix),
    "gnu-tar-gnu-dot-members": ("model.tar.gz", _gnu_tar_gnu_dot),
    "gnu-tar-ustar-gzip-9": ("model.tar.gz", _gnu_tar_ustar_then_gzip_cli),
    "tarfile-gnu-format": ("model.tar.gz", _tarfile(tarfile.GNU_FORMAT)),
    "pax-global-header-git-archive": (
        "model.tar.gz",
        _tarfile(tarfile.PAX_FORMAT, pax_headers={"comment": "0123456789abcdef0123456789abcdef01234567"}),
    ),
    "gzip-fname-fextra-fcomment-fhcrc": ("model.tar.gz", _gzip_header_fields),
    "multi-member-gzip": ("model.tar.gz", _multi_member),
    "extra-zero-blocks": ("model.tar.gz", _extra_zero_blocks),
    "no-end-of-archive-blocks": ("model.tar.gz", _no_end_of_archive),
    "zero-padding-after-gzip": ("model.tar.gz", _zero_padding_after_gzip),
    "stored-deflate": ("model.tar.gz", _gzip_level_0),
    "links-inside-the-tree": ("model.tar.gz", _links_inside_the_tree),
    "uppercase-TAR-GZ": ("MODEL.TAR.GZ", _tarfile(tarfile.PAX_FORMAT)),
    "tgz": ("model.tgz", _tarfile(tarfile.PAX_FORMAT)),
    "no-extension": ("weights", _tarfile(tarfile.PAX_FORMAT)),
}


@pytest.mark.parametrize("variant", list(VALID))
async def test_a_valid_prebuilt_archive_is_registered_byte_for_byte(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, variant: str
) -> None:
    """A prebuilt tar.gz from another producer is "uploaded as it is": the registry holds those
    very bytes, the result reports their size and sha256, nothing is left under the prefix."""
    name, build = VALID[variant]
    archive = build(content_tree(tmp_path / "src"))
    job = make_job(tmp_path)
    job["model"] = tmp_path / "prebuilt"
    job["model"].mkdir()
    (job["model"] / name).write_bytes(archive)
    async with Registrar(settings) as registrar:
        result = await registrar.register(request_for(job))
    assert result.model_artifact.size == len(archive)
    assert result.model_artifact.sha256 == hashlib.sha256(archive).hexdigest()
    assert await registered_model(s3, stack, result.model_id) == archive
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_single_gzip_file_that_is_not_a_tar_is_archived_as_a_plain_file(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A model of one `weights.json.gz` (gzip, but not of a tar, and not named .tar.gz/.tgz) is
    not a prebuilt archive ("a gzip-compressed tar (checked by its bytes)"): it is archived like
    any directory, and the registry's archive extracts to that one file."""
    job = make_job(tmp_path)
    job["model"] = tmp_path / "gz-model"
    job["model"].mkdir()
    (job["model"] / "weights.json.gz").write_bytes(gzip.compress(b'{"w": [1, 2, 3]}\n' * 1000))
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 0, result.stderr
    model_id = result.stdout.splitlines()[1].rsplit(" ", 1)[1]
    data = await registered_model(s3, stack, model_id)
    assert extracted(data, tmp_path / "out") == snapshot(job["model"])
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def _trailing_garbage(src: Path) -> bytes:
    return gzip.compress(tar_bytes(CONTENT), mtime=0) + b"garbage after the gzip stream\n"


def _bad_crc(src: Path) -> bytes:
    data = bytearray(gzip.compress(tar_bytes(CONTENT), mtime=0))
    data[-8] ^= 0x01
    return bytes(data)


def _bad_length(src: Path) -> bytes:
    data = bytearray(gzip.compress(tar_bytes(CONTENT), mtime=0))
    data[-1] ^= 0x01
    return bytes(data)


def _plain_tar(src: Path) -> bytes:
    return tar_bytes(CONTENT)


def _bzip2_tar(src: Path) -> bytes:
    return bz2.compress(tar_bytes(CONTENT))


def _gzip_of_json(src: Path) -> bytes:
    return gzip.compress(b'{"not": "a tar"}\n' * 100)


def _gzip_of_an_empty_tar(src: Path) -> bytes:
    return gzip.compress(tar_bytes({}))


INVALID: dict[str, tuple[str, Callable[[Path], bytes], str]] = {
    "trailing-garbage": ("model.tar.gz", _trailing_garbage, "assumed: gzip -t and GNU tar fail on it"),
    "bad-crc32-trailer": ("model.tar.gz", _bad_crc, "corrupt"),
    "bad-length-trailer": ("model.tar.gz", _bad_length, "corrupt"),
    "plain-tar-named-tar-gz": ("model.tar.gz", _plain_tar, "documented"),
    "plain-tar-named-TGZ": ("MODEL.TGZ", _plain_tar, "assumed: the suffix in any case"),
    "bzip2-tar-named-tgz": ("model.tgz", _bzip2_tar, "documented"),
    "gzip-of-json-named-tar-gz": ("model.tar.gz", _gzip_of_json, "documented"),
    "zero-bytes-named-tar-gz": ("model.tar.gz", lambda src: b"", "documented"),
    "gzip-of-an-empty-tar": ("model.tar.gz", _gzip_of_an_empty_tar, "assumed: an empty model"),
    "gzip-of-directories-only": (
        "model.tar.gz",
        lambda src: gzip.compress(tar_bytes({"a": None, "a/b": None})),
        "assumed: an empty model",
    ),
}


@pytest.mark.parametrize("variant", list(INVALID))
async def test_an_unusable_prebuilt_archive_is_exit_3_before_any_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, variant: str
) -> None:
    """`register` with a single file that is no usable tar.gz: exit 3, one error naming the
    file, no traceback, no registration made, nothing left under the prefix."""
    name, build, _why = INVALID[variant]
    job = make_job(tmp_path)
    job["model"] = tmp_path / "prebuilt"
    job["model"].mkdir()
    path = job["model"] / name
    path.write_bytes(build(content_tree(tmp_path / "src")))
    registrations = stack.mims_server.registration_count
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 3, result.stderr
    assert str(path) in result.stderr, result.stderr
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "rebuild" in result.stderr, result.stderr  # what to do
    assert result.stdout == ""
    assert stack.mims_server.registration_count == registrations
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
