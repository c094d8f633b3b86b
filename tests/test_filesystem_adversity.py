"""Black-box: the filesystem fights back while the archive streams.

The promise under test (README "Inputs", docs/faults.md): good input gives an archive that
extracts to exactly the input as it was when read; bad input, or input that changes under the
run, fails with an `InputError` (exit 3) naming the file and what to do, and nothing stays in S3
(no object, no open multipart upload).  An archive that matches no state the input was ever in
is a defect.

Changes are made at a point observed, not timed: after the first part S3 acknowledged (an
`UploadProgress` event), or while the model's part 2 is held on its way to S3 (a
`HoldingProxy`, for the command line), with one part in flight and one queued, so backpressure
holds the producer well inside a large file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import secrets
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import InputError, Registrar, Settings, UploadProgress
from async_registrar._local import LocalStack

from .conftest import MiB, environment, leftovers, make_job, request_for
from .fault_proxy import HoldingProxy
from .test_cli import run_unprivileged
from .test_https_review import read_back

#: A file large enough that the producer is still inside it when the first part is acknowledged
#: (it has read about 16 MiB then, and `held_back` keeps it within about 30 MiB).
BIG = 40 * MiB


def held_back(settings: Settings) -> Settings:
    """One part in flight, one queued, one gzip thread: the producer cannot run more than about
    30 MiB ahead of what S3 acknowledged, whatever the machine's cores."""
    return settings.model_copy(update={"upload_concurrency": 1, "upload_queue_parts": 1, "compression_threads": 1})


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tree(root: Path) -> dict[str, str | None]:
    """Every entry under `root`: a file's sha256 (short), None for a directory."""
    out: dict[str, str | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = None if path.is_dir() else digest(path.read_bytes())
    return out


def members(archive: bytes) -> dict[str, str | None]:
    """What the archive extracts to, described as `tree` describes a directory."""
    out: dict[str, str | None] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            assert member.isfile() or member.isdir(), member.name
            assert tarfile.data_filter(member, "/dest") is not None
            name = member.name.removeprefix("./")
            if member.isdir():
                out[name] = None
            else:
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[name] = digest(extracted.read())
    return out


def once_a_part_is_up(action: Callable[[], None]) -> Callable[[Any], None]:
    """A progress callback that runs `action` once, after the first acknowledged part."""
    fired: list[bool] = []

    def callback(event: Any) -> None:
        if isinstance(event, UploadProgress) and event.parts_done >= 1 and not event.done and not fired:
            fired.append(True)
            action()

    return callback


async def upload(settings: Settings, root: Path, on_progress: Callable[[Any], None] | None = None) -> str:
    """`Registrar.upload` of `root` under the test's prefix; the object's URI."""
    uri = f"s3://{settings.s3_bucket}/{settings.s3_prefix}{secrets.token_hex(3)}/model.tar.gz"
    async with Registrar(settings) as registrar:
        await registrar.upload(root, uri, on_progress=on_progress)
    return uri


async def fetch(s3: Any, uri: str) -> bytes:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return await read_back(s3, bucket, key)


async def refused(settings: Settings, s3: Any, root: Path, on_progress: Any = None) -> InputError:
    """The upload of `root` fails with an InputError, and nothing is left under the prefix."""
    with anyio.fail_after(30), pytest.raises(InputError) as caught:
        await upload(settings, root, on_progress)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    return caught.value


async def archived_or_refused_bytes(
    settings: Settings, s3: Any, root: Path, on_progress: Callable[[Any], None]
) -> bytes | InputError:
    """The object the upload of `root` made, or the InputError it raised (then nothing is left)."""
    try:
        uri = await upload(settings, root, on_progress)
    except InputError as exc:
        error = exc
    else:
        return await fetch(s3, uri)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    return error


async def archived_or_refused(
    settings: Settings, s3: Any, root: Path, on_progress: Callable[[Any], None]
) -> dict[str, str | None] | InputError:
    """What the upload of `root` archived, or the InputError it raised (then nothing is left)."""
    got = await archived_or_refused_bytes(settings, s3, root, on_progress)
    return got if isinstance(got, InputError) else members(got)


def big_model(root: Path) -> Path:
    root.mkdir()
    (root / "a-weights.bin").write_bytes(os.urandom(BIG))
    (root / "b-config.json").write_text('{"dim": 3}')
    return root


# --- the file being read changes -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["unlinked", "renamed-over"])
async def test_the_file_being_read_removed_or_renamed_over_keeps_the_bytes_it_had(
    tmp_path: Path, settings: Settings, s3: Any, how: str
) -> None:
    """`rm` or `mv new weights` while weights is read: the open file's bytes, whole, are archived."""
    root = big_model(tmp_path / "model")
    before = tree(root)

    def change() -> None:
        if how == "unlinked":
            os.unlink(root / "a-weights.bin")
        else:
            (tmp_path / "new.bin").write_bytes(os.urandom(BIG))
            os.rename(tmp_path / "new.bin", root / "a-weights.bin")

    uri = await upload(held_back(settings), root, once_a_part_is_up(change))
    assert members(await fetch(s3, uri)) == before


# --- what comes later in the archive changes before it is read ------------------------------------


def remove_file(root: Path, outside: Path) -> None:
    os.unlink(root / "z-later.bin")


def replace_with_fifo(root: Path, outside: Path) -> None:
    os.unlink(root / "z-later.bin")
    os.mkfifo(root / "z-later.bin")  # opened blocking, it would wait for a writer forever


def replace_with_directory(root: Path, outside: Path) -> None:
    os.unlink(root / "z-later.bin")
    (root / "z-later.bin").mkdir()


def replace_with_socket_like_device(root: Path, outside: Path) -> None:
    os.unlink(root / "z-later.bin")
    os.mknod(root / "z-later.bin", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero: endless bytes


def remove_directory(root: Path, outside: Path) -> None:
    os.unlink(root / "zz-dir" / "inner.bin")
    os.rmdir(root / "zz-dir")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (remove_file, "z-later.bin"),
        (replace_with_fifo, "z-later.bin"),
        (replace_with_directory, "z-later.bin"),
        (replace_with_socket_like_device, "z-later.bin"),
        (remove_directory, "zz-dir"),
    ],
)
async def test_a_later_entry_that_changes_kind_or_goes_is_refused_by_name(
    tmp_path: Path, settings: Settings, s3: Any, change: Callable[[Path, Path], None], named: str
) -> None:
    """A file or directory not yet read removed, or replaced by a FIFO, a directory or a device:
    an InputError naming it (a FIFO is not waited on), and nothing left."""
    root = big_model(tmp_path / "model")
    (root / "z-later.bin").write_bytes(b"L" * 4096)
    (root / "zz-dir").mkdir()
    (root / "zz-dir" / "inner.bin").write_bytes(b"I" * 100)
    error = await refused(held_back(settings), s3, root, once_a_part_is_up(lambda: change(root, tmp_path)))
    assert named in str(error)
    assert "changed while it was being archived" in str(error)


async def test_a_later_file_replaced_by_a_link_is_refused_as_changed(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A file not yet read replaced by a link (same-size target): refused as changed, not chmod advice."""
    root = big_model(tmp_path / "model")
    (root / "z-later.bin").write_bytes(b"L" * 64)
    (tmp_path / "secret").write_bytes(b"S" * 64)

    def swap() -> None:
        os.unlink(root / "z-later.bin")
        os.symlink(tmp_path / "secret", root / "z-later.bin")

    error = await refused(held_back(settings), s3, root, once_a_part_is_up(swap))
    assert "z-later.bin" in str(error)
    assert "chmod" not in str(error), str(error)


async def test_a_directory_swapped_for_a_link_mid_upload_is_not_followed_outside(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A directory not yet read, swapped for a link to outside: no byte from outside is archived."""
    root = big_model(tmp_path / "model")
    (root / "sub").mkdir()
    (root / "sub" / "key.txt").write_bytes(b"p" * 64)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.txt").write_bytes(b"S" * 64)  # the same size: what the scan promised
    before = tree(root)

    def swap() -> None:
        os.rename(root / "sub", tmp_path / "sub-moved")
        os.symlink(outside, root / "sub")

    got = await archived_or_refused(held_back(settings), s3, root, once_a_part_is_up(swap))
    if isinstance(got, InputError):
        assert "sub" in str(got)
    else:
        assert got["sub/key.txt"] != digest(b"S" * 64), "a file outside the model directory was archived"
        assert got == before


def version(root: Path, config: bytes) -> Path:
    """A model version: big weights and a config of a length every version shares."""
    root.mkdir()
    (root / "a-weights.bin").write_bytes(os.urandom(BIG))
    (root / "b-config.json").write_bytes(config)
    return root


@pytest.mark.parametrize("how", ["rename", "symlink-flip"])
async def test_the_model_directory_replaced_mid_upload_is_not_archived_as_a_mix(
    tmp_path: Path, settings: Settings, s3: Any, how: str
) -> None:
    """The model path atomically replaced by a new version (same names and sizes) mid-upload:
    the archive is one version, or the run fails; never v1's weights with v2's config."""
    v1 = version(tmp_path / "v1", b'{"version": 1}')
    v2 = version(tmp_path / "v2", b'{"version": 2}')
    one, two = tree(v1), tree(v2)
    model = tmp_path / "model"
    if how == "rename":
        os.rename(v1, model)
    else:
        os.symlink(v1, model)

    def replace() -> None:
        if how == "rename":  # mv model model.old && mv v2 model
            os.rename(model, tmp_path / "model.old")
            os.rename(v2, model)
        else:  # ln -sfn v2 model, atomically
            os.symlink(v2, tmp_path / "model.new")
            os.rename(tmp_path / "model.new", model)

    got = await archived_or_refused(held_back(settings), s3, model, once_a_part_is_up(replace))
    if isinstance(got, InputError):
        assert "b-config.json" in str(got) or str(model) in str(got)
        return
    assert got in (one, two), (
        f"a mix: weights of v{1 if got['a-weights.bin'] == one['a-weights.bin'] else 2}, "
        f"config of v{1 if got['b-config.json'] == one['b-config.json'] else 2}"
    )


# --- the command line: exit 3, the file named, nothing left ---------------------------------------


def truncate_weights(model: Path) -> None:
    os.truncate(model / "extra.f32", 0)


def make_later_unreadable(model: Path) -> None:
    (model / "z-later.bin").chmod(0)


@pytest.mark.parametrize(
    ("change", "named", "says"),
    [
        (truncate_weights, "extra.f32", "shrank"),
        (make_later_unreadable, "z-later.bin", "chmod a+r"),
    ],
)
async def test_register_exits_3_naming_a_file_that_changes_mid_upload(
    tmp_path: Path,
    stack: LocalStack,
    settings: Settings,
    s3: Any,
    change: Callable[[Path], None],
    named: str,
    says: str,
) -> None:
    """`register`, the model's part 2 held on its way: the file being read truncated to 0, or a
    later one made unreadable (chmod 000, the command without root's capabilities): exit 3,
    named, nothing left."""
    job = make_job(tmp_path, model_bytes=BIG)
    (job["model"] / "z-later.bin").write_bytes(b"z" * 1000)

    def part_two(method: str, target: str, headers: dict[str, str]) -> bool:
        return method == "PUT" and "model.tar.gz" in target and "partNumber=2&" in target + "&"

    done: list[subprocess.CompletedProcess[str]] = []
    proxy = HoldingProxy(stack.s3_endpoint, part_two)
    with proxy:
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_UPLOAD_CONCURRENCY="1",
            REGISTRAR_UPLOAD_QUEUE_PARTS="1",
            REGISTRAR_COMPRESSION_THREADS="1",
        )

        async def run() -> None:
            done.append(await anyio.to_thread.run_sync(lambda: run_unprivileged(env, "register")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(45):
                await proxy.arrived.wait()
            change(job["model"])
            proxy.release()
    (result,) = done
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error, result.stderr
    assert named in error[0], error[0]
    assert says in error[0], error[0]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- names ----------------------------------------------------------------------------------------

AWKWARD = [
    "...",
    "..a",
    "a..",
    "... /.. x",
    " leading space",
    "trailing space ",
    "-rf",
    "back\\slash",
    "colon:semi;quote\"'`",
    "glob*?[]{}",
    "percent%2F..%2F",
    "\u00e9-composed.txt",  # NFC
    "e\u0301-composed.txt",  # NFD: the same text, another name on Linux
    "\u65e5\u672c\u8a9e/\U0001f600.bin",
    "n" * 99,
    "n" * 100,
    "n" * 101,
    "d" * 154 + "/" + "f" * 100,  # 255 bytes: ustar's prefix (155) + name (100), split at the slash
    "d" * 155 + "/" + "f" * 100,
    "p" * 40 + "/" + "q" * 200,  # no split fits ustar
    "x" * 255,  # NAME_MAX
    "\u00e9" * 127 + "z",  # NAME_MAX in UTF-8 bytes, 128 characters
]


async def test_awkward_names_round_trip(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Dot-only, spaced, glob, NFC/NFD twins, ustar-boundary and NAME_MAX names extract as they were."""
    root = tmp_path / "model"
    root.mkdir()
    for i, name in enumerate(AWKWARD):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(f"{i}:{name}".encode())
    uri = await upload(settings, root)
    assert members(await fetch(s3, uri)) == tree(root)


def deep_tree(root: Path, depth: int, component: str) -> str:
    """A file `depth` directories of `component` deep under `root` (made with dir fds: the whole
    path is longer than PATH_MAX); its relative path."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(component, dir_fd=fd)
            inner = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        file = os.open("leaf.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(file, b"deep")
        os.close(file)
    finally:
        os.close(fd)
    return "/".join([component] * depth + ["leaf.bin"])


async def test_a_path_longer_than_path_max_is_archived_or_named(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """A file 4,600 bytes deep (over PATH_MAX): archived whole, or an InputError naming the problem."""
    rel = deep_tree(tmp_path / "model", 18, "c" * 250)
    assert len(str(tmp_path / "model" / rel)) > 4096
    got = await archived_or_refused(settings, s3, tmp_path / "model", lambda event: None)
    if isinstance(got, InputError):
        assert "c" * 250 in str(got)
        assert "File name too long" in str(got)
    else:
        assert got[rel] == digest(b"deep")


# --- sizes ----------------------------------------------------------------------------------------

SPARSE = 512 * MiB
#: Runs the command given as its arguments; its exit code, and its peak RSS on stderr's last line.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


async def test_a_sparse_file_streams_in_bounded_memory_and_extracts_to_zeros(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`upload` of a 512 MiB file that is one hole: bounded RSS, a few seconds, and its zeros back."""
    job = make_job(tmp_path)
    root = tmp_path / "sparse"
    root.mkdir()
    with (root / "hole.bin").open("wb") as f:
        f.truncate(SPARSE)
    (root / "tail.txt").write_text("after the hole")
    uri = f"s3://{settings.s3_bucket}/{settings.s3_prefix}sparse/model.tar.gz"
    env = environment(stack, settings, job, REGISTRAR_PART_SIZE="16MiB")
    started = time.monotonic()
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "async_registrar", "upload", str(root), uri],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert uri in done.stdout
    peak_mib = int(done.stderr.splitlines()[-1].removeprefix("peak-rss-kib ")) / 1024
    assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB for a file that is one hole"
    assert took < 60, f"{took:.0f} s for 512 MiB of zeros"
    archive = await fetch(s3, uri)
    assert len(archive) < 8 * MiB  # zeros compress
    # The tar stream, inflated 64 MiB at a time: hole.bin's header, the zeros, then the rest.
    inflate = zlib.decompressobj(wbits=31)
    pending, offset, head, rest = archive, 0, b"", bytearray()
    while not inflate.eof:
        chunk = inflate.decompress(pending, 64 * MiB)
        pending = inflate.unconsumed_tail
        start, end = offset, offset + len(chunk)
        offset = end
        head += chunk[: max(0, 512 - start)]
        body = chunk[max(0, 512 - start) : max(0, 512 + SPARSE - start)]
        assert body.count(0) == len(body), f"a non-zero byte in the hole near offset {start}"
        rest += chunk[max(0, 512 + SPARSE - start) :]
    info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    assert (info.name, info.size) == ("hole.bin", SPARSE)
    with tarfile.open(fileobj=io.BytesIO(bytes(rest))) as tar:
        tail = tar.extractfile("tail.txt")
        assert tail is not None
        assert tail.read() == b"after the hole"


def tar_gz_of_size(size: int) -> bytes:
    """A valid tar.gz of exactly `size` bytes: one incompressible member, stored (gzip level 0),
    its gzip header's file name grown to land on the size."""
    data = os.urandom(size)
    member = size - 64 * 1024
    while True:
        info = tarfile.TarInfo("weights.bin")
        info.size = member
        raw = info.tobuf(tarfile.PAX_FORMAT) + data[:member] + bytes(-member % 512) + bytes(1024)

        def gz(name: str, raw: bytes = raw) -> bytes:
            buffer = io.BytesIO()
            with gzip.GzipFile(filename=name, mode="wb", fileobj=buffer, compresslevel=0, mtime=0) as f:
                f.write(raw)
            return buffer.getvalue()

        short = len(gz("x"))
        if 0 <= size - short < 512:
            made = gz("x" * (1 + size - short))
            assert len(made) == size
            return made
        member += 512 * ((size - short) // 512) or 512


@pytest.mark.parametrize("offset", [0, 1, 5 * MiB + 1])
async def test_a_prebuilt_archive_at_the_part_boundary_is_uploaded_byte_for_byte(
    tmp_path: Path, settings: Settings, s3: Any, offset: int
) -> None:
    """A prebuilt tar.gz of exactly a part, a part and a byte, two parts and a byte: the same bytes in S3."""
    size = settings.part_size + offset
    root = tmp_path / "prebuilt"
    root.mkdir()
    (root / "model.tar.gz").write_bytes(tar_gz_of_size(size))
    uri = f"s3://{settings.s3_bucket}/{settings.s3_prefix}boundary/model.tar.gz"
    async with Registrar(settings) as registrar:
        uploaded = await registrar.upload(root, uri)
    assert uploaded.size == size
    assert await fetch(s3, uri) == (root / "model.tar.gz").read_bytes()


async def test_a_model_of_empty_files_round_trips(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """A model whose every file has 0 bytes (and an empty directory) extracts as it was."""
    root = tmp_path / "model"
    (root / "empty-dir").mkdir(parents=True)
    (root / "a.bin").touch()
    (root / "b" / "c.bin").parent.mkdir()
    (root / "b" / "c.bin").touch()
    uri = await upload(settings, root)
    assert members(await fetch(s3, uri)) == tree(root)


@pytest.mark.parametrize("name", ["model.tar.gz", "weights.bin"])
async def test_a_lone_empty_file(tmp_path: Path, settings: Settings, s3: Any, name: str) -> None:
    """One 0-byte file: named .tar.gz it is refused by name (it is no gzip); otherwise archived."""
    root = tmp_path / "model"
    root.mkdir()
    (root / name).touch()
    if name.endswith(".tar.gz"):
        error = await refused(settings, s3, root)
        assert name in str(error)
    else:
        uri = await upload(settings, root)
        assert members(await fetch(s3, uri)) == {name: digest(b"")}


@pytest.mark.parametrize("target", ["/proc/version", "/sys/kernel/address_bits"])
async def test_a_file_whose_stat_size_lies_is_archived_whole_or_refused(
    tmp_path: Path, settings: Settings, s3: Any, target: str
) -> None:
    """With --dereference, a link to a /proc (size 0) or /sys (size 4096) file: its real bytes, or
    an InputError naming it; never the bytes stat promised."""
    if not Path(target).is_file():
        pytest.skip(f"no {target} here")
    root = tmp_path / "model"
    root.mkdir()
    (root / "info").symlink_to(target)
    (root / "weights.bin").write_bytes(b"w" * 100)
    real = Path(target).read_bytes()
    got = await archived_or_refused(settings.model_copy(update={"dereference": True}), s3, root, lambda event: None)
    if isinstance(got, InputError):
        assert "info" in str(got) or target in str(got)  # the link, or the file it was read through
    else:
        assert got["info"] == digest(real), f"{target} archived as other bytes than it reads"


@pytest.mark.parametrize("how", ["link", "loop", "dangling"])
async def test_the_model_path_itself_a_link(tmp_path: Path, settings: Settings, s3: Any, how: str) -> None:
    """The model path a link to a directory is that directory; a loop or a dangling link is named."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "weights.bin").write_bytes(b"w" * 1000)
    model = tmp_path / "model"
    model.symlink_to({"link": real, "loop": model, "dangling": tmp_path / "nowhere"}[how])
    if how == "link":
        uri = await upload(settings, model)
        assert members(await fetch(s3, uri)) == tree(real)
    else:
        error = await refused(settings, s3, model)
        assert str(model) in str(error)


# --- through the registry -------------------------------------------------------------------------


async def registered_model(s3: Any, stack: LocalStack, model_id: str) -> dict[str, str | None]:
    """What the registry holds for `model_id` (the reference MIMS copies it into its bucket)."""
    return members(await fetch(s3, f"s3://{stack.registry_bucket}/models/{model_id}/model.tar.gz"))


async def test_registered_awkward_names_are_what_the_registry_holds(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The awkward names registered: the registry accepts the archive and holds exactly the model."""
    job = make_job(tmp_path)
    for i, name in enumerate(AWKWARD):
        (job["model"] / name).parent.mkdir(parents=True, exist_ok=True)
        (job["model"] / name).write_bytes(f"{i}:{name}".encode())
    async with Registrar(settings) as registrar:
        result = await registrar.register(request_for(job))
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert await registered_model(s3, stack, result.model_id) == tree(job["model"])


async def test_a_model_rewritten_mid_registration_is_not_registered_torn(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`register` while the weights are rewritten in place (same size): registered old or new, or refused."""
    job = make_job(tmp_path, model_bytes=BIG)
    before = tree(job["model"])
    new = os.urandom(BIG)

    def rewrite() -> None:
        with (job["model"] / "extra.f32").open("r+b") as f:
            f.write(new)

    rewrite_once = once_a_part_is_up(rewrite)

    def on_progress(event: Any) -> None:
        if isinstance(event, UploadProgress) and event.artifact == "model":
            rewrite_once(event)

    error: InputError | None
    async with Registrar(held_back(settings)) as registrar:
        try:
            result = await registrar.register(request_for(job), on_progress=on_progress)
        except InputError as exc:
            error = exc
        else:
            error = None
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    if error is not None:
        assert "extra.f32" in str(error)
        return
    got = await registered_model(s3, stack, result.model_id)
    assert got in (before, tree(job["model"])), f"registered extra.f32 {got['extra.f32']}: neither old nor new"


# --- a prebuilt archive changing while it uploads -------------------------------------------------


def stored_tar_gz(weights: bytes) -> bytes:
    """A tar.gz of one member, stored (gzip level 0): two of these with weights of one length
    differ only in the weights and the gzip trailer's CRC32."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=0, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        info = tarfile.TarInfo("weights.bin")
        info.size = len(weights)
        tar.addfile(info, io.BytesIO(weights))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "how",
    [
        "rewritten",
        "appended",
        "rewritten-unchecked",
    ],
)
async def test_a_prebuilt_archive_changed_mid_upload_is_uploaded_whole_or_refused(
    tmp_path: Path, settings: Settings, s3: Any, how: str
) -> None:
    """A prebuilt tar.gz rewritten in place (another of the same layout) or appended to while it
    uploads: S3 gets the old or the new file byte for byte, or an InputError names it."""
    root = tmp_path / "prebuilt"
    root.mkdir()
    archive = root / "model.tar.gz"
    old = stored_tar_gz(os.urandom(BIG))
    archive.write_bytes(old)
    new = old + b"\0" * 4096 if how == "appended" else stored_tar_gz(os.urandom(BIG))
    if how == "rewritten-unchecked":  # "the registry checks again" (README)
        settings = settings.model_copy(update={"check_prebuilt": False})

    def change() -> None:
        with archive.open("r+b") as f:
            f.write(new)

    got = await archived_or_refused_bytes(held_back(settings), s3, root, once_a_part_is_up(change))
    if isinstance(got, InputError):
        assert "model.tar.gz" in str(got)
    else:
        assert digest(got) in (digest(old), digest(new)), "S3 holds neither the old nor the new model.tar.gz"
