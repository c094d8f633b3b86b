"""S3's hard limits, checked before S3 does: at most 10,000 parts, at every compression level.

The part size is grown from a bound of the archive's size; the bound must hold at each
level's worst case.  isal's level 0 expands weights by about 23 %, so level 0 writes stored
blocks instead (5 bytes per 64 KiB).  And if a stream outgrows the bound anyway, the part
cutter stops before part 10,001 with a message, not after the whole upload.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from async_registrar import StorageError
from async_registrar._archive import _deflate
from async_registrar._artifacts import DirectorySource, FileEntry, PrebuiltArchive, choose_part_size
from async_registrar._settings import MAX_PARTS, MiB
from async_registrar._upload import _BufferPool, _PartCutter

TiB = 1024**4


def worst_ratio(level: int, min_saving: int) -> float:
    """The output/input ratio of the archive's deflate blocks on incompressible data (8 MiB)."""
    data = bytearray(os.urandom(8 * MiB))
    out = 0
    dictionary = b""
    for start in range(0, len(data), MiB):
        block = bytearray(data[start : start + MiB])
        pieces, _, _ = _deflate(block, len(block), dictionary, level, min_saving)
        out += sum(len(piece) for piece in pieces)
        dictionary = bytes(block[-32 * 1024 :])
    return out / len(data)


@pytest.mark.parametrize("min_saving", [0, 10])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_a_5_tib_input_stays_within_10000_parts_at_every_level(level: int, min_saving: int) -> None:
    """A synthetic 5 TiB directory (one file, no disk): the size bound covers the level's worst
    case (compressed, or sampled and stored), and the part size chosen from it keeps the
    upload within 10,000 parts."""
    content = 5 * TiB - 64 * MiB
    source = DirectorySource(
        root=__import__("pathlib").Path("/synthetic"), entries=(FileEntry("w.bin", "/x", False, content, False),)
    )
    ratio = worst_ratio(level, min_saving)
    assert ratio < 1.001, ratio  # level 0 is stored blocks now, not isal's expanding level 0
    archive = int(content * ratio) + 1024
    assert archive <= source.size_bound
    part = choose_part_size(source.size_bound, 8 * MiB)
    assert -(-archive // part) <= MAX_PARTS


def test_a_prebuilt_archive_of_5_tib_stays_within_10000_parts() -> None:
    source = PrebuiltArchive(Path("/synthetic.tar.gz"), 5 * TiB)
    part = choose_part_size(source.size_bound, 8 * MiB)
    assert -(-source.size // part) <= MAX_PARTS


def test_level_0_is_stored_blocks() -> None:
    """What level 0 makes is ordinary deflate (stored blocks) that inflates back."""
    block = bytearray(os.urandom(MiB))
    pieces, crc, length = _deflate(block, len(block), b"", 0, 0)
    deflated = b"".join(pieces)
    assert len(deflated) < len(block) * 1.001
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated) == bytes(block)
    assert (crc, length) == (zlib.crc32(block), MiB)


def test_the_cutter_stops_before_part_10001() -> None:
    """A stream that outgrows its bound fails at part 10,001 with a message that says what to do,
    before anything past S3's limit is handed on."""
    sent: list[int] = []
    cutter = _PartCutter(16, lambda part: sent.append(part.number), _BufferPool())
    with pytest.raises(StorageError, match=r"past S3's limit of 10,000 parts .*raise REGISTRAR_PART_SIZE"):
        cutter.write(b"x" * (16 * MAX_PARTS + 17))
    assert sent[-1] == MAX_PARTS


def test_an_input_past_5_tib_is_not_refused_before_it_is_compressed(tmp_path: Path) -> None:
    """A sparse 5.5 TiB file (no disk): weights compress by about 7 %, so the scan accepts it and
    sizes the parts for S3's 5 TiB object limit itself; only the compressed stream can tell."""
    from async_registrar._artifacts import MAX_OBJECT_SIZE, inspect_artifact

    model = tmp_path / "model"
    model.mkdir()
    with (model / "weights.bin").open("wb") as f:
        f.truncate(5 * TiB + TiB // 2)
    source = inspect_artifact(model, role="model")
    assert isinstance(source, DirectorySource)
    assert source.size_bound > MAX_OBJECT_SIZE
    part = choose_part_size(source.size_bound, 8 * MiB)
    assert part == 525 * MiB
    assert -(-MAX_OBJECT_SIZE // part) <= MAX_PARTS


def test_the_cutter_stops_at_the_5_tib_object_limit_naming_the_input() -> None:
    """A stream that compresses to more than S3's object limit (scaled down here) stops with an
    input error that names the input and says what to do, before the part past it is sent."""
    from async_registrar import InputError

    sent: list[int] = []
    cutter = _PartCutter(16, lambda part: sent.append(part.number), _BufferPool(), source="/m/model", max_size=100)
    with pytest.raises(InputError, match=r"/m/model compresses to more than S3's .* object limit; try a higher"):
        for _ in range(20):
            cutter.write(b"x" * 10)
    assert sent == [1, 2, 3, 4, 5, 6]  # 96 bytes cut; the write that passed 100 went nowhere


def test_a_prebuilt_archive_past_5_tib_is_refused_naming_it(tmp_path: Path) -> None:
    import io
    import tarfile

    from async_registrar import InputError
    from async_registrar._artifacts import inspect_artifact

    head = io.BytesIO()
    with tarfile.open(fileobj=head, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("weights.bin"), io.BytesIO(b""))
    archive = tmp_path / "model.tar.gz"
    with archive.open("wb") as f:  # a real archive's start, then a sparse tail to 5 TiB + 1
        f.write(head.getvalue())
        f.truncate(5 * TiB + 1)
    with pytest.raises(InputError, match=r"model archive .*model.tar.gz is larger than S3's 5 TiB object limit"):
        inspect_artifact(archive, role="model")
