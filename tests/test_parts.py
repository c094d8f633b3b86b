"""Parts: cut from the archive stream, hashed in order, and read back as one body."""

from __future__ import annotations

import base64
import hashlib
import os
import zlib

import pytest

from async_registrar._checksums import Checksummer
from async_registrar._multipart import PartBody
from async_registrar._upload import _BufferPool, _Part, _PartCutter


def cut(pieces: list[bytes], part_size: int) -> tuple[list[_Part], _PartCutter]:
    parts: list[_Part] = []
    cutter = _PartCutter(part_size, parts.append, _BufferPool(), checksummer=Checksummer("CRC32"))
    for piece in pieces:
        cutter.write(piece)
    cutter.finish()
    return parts, cutter


@pytest.mark.parametrize("part_size", [3, 7, 1000, 4096, 10**6])
def test_parts_are_the_stream_cut_in_order_with_their_checksums(part_size: int) -> None:
    pieces = [os.urandom(n) for n in (0, 1, 999, 4096, 5000, 3, 12_345)]
    stream = b"".join(pieces)
    parts, cutter = cut(pieces, part_size)
    assert b"".join(bytes(p.data) for p in parts) == stream
    assert all(p.size == part_size for p in parts[:-1])
    assert 0 < parts[-1].size <= part_size
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert [p.number for p in parts] == list(range(1, len(parts) + 1))
    for part in parts:
        data = bytes(part.data)
        assert part.size == len(data)
        assert part.checksum == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert cutter.sha256.hexdigest() == hashlib.sha256(stream).hexdigest()
    assert cutter.size == len(stream)


def test_an_empty_stream_is_one_empty_last_part() -> None:
    parts, _ = cut([], 100)
    assert [(p.size, p.last) for p in parts] == [(0, True)]


def test_part_body_reads_seeks_and_has_a_length_like_a_bytesio() -> None:
    whole = os.urandom(315)
    body = PartBody(memoryview(bytearray(whole)))
    assert len(body) == len(whole)
    with body.getbuffer() as buffer:  # how aiohttp's BytesIOPayload takes the size
        assert len(buffer) == len(whole)
    got = b""
    while chunk := body.read(7):
        assert len(chunk) <= 7
        got += bytes(chunk)
    assert got == whole
    assert body.tell() == len(whole)
    assert len(body) == 0
    body.seek(12)
    assert bytes(body.read()) == whole[12:]
    body.seek(-4, os.SEEK_END)
    assert bytes(body.read(100)) == whole[-4:]
    body.seek(0)
    assert bytes(body.read()) == whole
