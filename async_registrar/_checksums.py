"""The checksums S3 verifies: each part's, and (for CRC64NVME) the whole object's.

CRC32 (the default) is checked by S3 part by part; the object then carries a
checksum of the part checksums ("composite").  CRC64NVME is a full-object
checksum: each part still carries its own, and S3 also checks the whole
object's against the value sent with CompleteMultipartUpload.  Computing
CRC64NVME needs the AWS CRT (`awscrt`, installed with `async-registrar[crt]`),
as it does for botocore.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from typing import Literal

from isal import isal_zlib

__all__ = [
    "ChecksumAlgorithm",
    "Checksummer",
    "PartCheck",
    "composite_crc32",
    "crc64nvme_available",
    "is_full_object",
    "multipart_etag",
]

ChecksumAlgorithm = Literal["CRC32", "CRC64NVME"]
#: What a part can carry for the server to check: a CRC header, or the classic Content-MD5.
PartCheck = Literal["CRC32", "CRC64NVME", "MD5"]


def is_full_object(algorithm: str | None) -> bool:
    """Whether a multipart object's checksum of `algorithm` is the whole object's (S3's
    FULL_OBJECT type, which S3 checks at completion) rather than the composite of the
    parts' checksums (COMPOSITE).  A single PutObject's checksum is always the whole object's."""
    return algorithm == "CRC64NVME"


def crc64nvme_available() -> bool:
    """Whether the AWS CRT is installed and computes CRC64NVME."""
    try:
        from awscrt import checksums
    except ImportError:
        return False
    return hasattr(checksums, "crc64nvme")


def _b64(value: int, size: int) -> str:
    return base64.b64encode(value.to_bytes(size, "big")).decode()


class Checksummer:
    """Computes the checksums of one upload's parts, fed in order, piece by piece."""

    def __init__(self, algorithm: PartCheck) -> None:
        self.algorithm = algorithm
        #: Whether S3 checks the whole object's checksum at completion.
        self.full_object = is_full_object(algorithm)
        self._crc64 = 0  # the whole object's CRC64NVME so far
        self._part = 0  # the current part's checksum so far
        self._md5 = hashlib.md5() if algorithm == "MD5" else None  # noqa: S324 (S3's Content-MD5)
        self._fed = False
        if self.full_object:
            from awscrt import checksums  # optional: only CRC64NVME needs it

            self._crc64nvme = checksums.crc64nvme

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        """Feed the next piece of the current part."""
        self._fed = True
        if self._md5 is not None:
            self._md5.update(piece)
            return
        if not self.full_object:
            self._part = isal_zlib.crc32(piece, self._part)
            return
        self._crc64 = self._crc64nvme(piece, self._crc64)
        self._part = self._crc64nvme(piece, self._part)

    def part_done(self) -> str:
        """The current part's checksum (base64, as S3 wants it); the next piece starts a part."""
        self._fed = True
        if self._md5 is not None:
            digest, self._md5 = self._md5.digest(), hashlib.md5()  # noqa: S324
            return base64.b64encode(digest).decode()
        value, self._part = self._part, 0
        return _b64(value, 4 if not self.full_object else 8)

    @property
    def whole(self) -> str | None:
        """The whole object's CRC64NVME once every part was fed; None with CRC32, whose
        object checksum S3 composes from the parts' (see `composite_crc32`)."""
        return _b64(self._crc64, 8) if self.full_object and self._fed else None


def composite_crc32(parts: Sequence[str]) -> str:
    """S3's checksum of a multipart object's part CRC32s (base64, without the "-N" suffix)."""
    return _b64(zlib.crc32(b"".join(base64.b64decode(v) for v in parts)), 4)


def multipart_etag(md5s: Sequence[str]) -> str:
    """The ETag S3 gives a multipart object whose parts had these (base64) MD5s: the MD5 of
    their digests, with the part count."""
    digest = hashlib.md5(b"".join(base64.b64decode(v) for v in md5s)).hexdigest()  # noqa: S324
    return f"{digest}-{len(md5s)}"
