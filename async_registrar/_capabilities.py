"""What an S3 endpoint verifies, found out once per endpoint and process, and the integrity
an upload gets from it.

S3-compatible servers differ in what they check.  AWS S3 refuses a part whose CRC32 header
does not match its bytes; JuiceFS and rclone accept any CRC32 header and verify nothing of
it, though JuiceFS checks a signed payload's sha256; Backblaze B2 refuses the checksum
headers altogether; moto checks nothing.  So before the first upload to an endpoint, the
probe sends a few tiny objects, some of them damaged on the way on purpose (one byte of the
body changed after the request was signed and its checksums computed), and notes which
damage the server refused:

- a CRC header (`x-amz-checksum-crc32`, or the configured algorithm's), and whether
  HeadObject reports the value sent;
- `Content-MD5`;
- a signed payload (`x-amz-content-sha256` of the body, covered by the signature);
- and whether it lists multipart uploads (the cleanup's safety net).

The uploads then use the strongest check the server performs (`Integrity`): a server-checked
CRC (free: computed as the parts are cut); else a signed payload (one more sha256 pass, ~0.8
CPU-s per GiB here, but stronger, and cheaper than MD5's ~1.5); else Content-MD5; else
nothing the server checks, which one WARNING per run says: the object's integrity then rests
on its size and on the registry's sha256 check.  With `REGISTRAR_S3_CHECKSUMS=when_required`
no checksum header of any kind is sent, so only a signed payload can be checked.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import secrets
import urllib.parse
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from ._checksums import Checksummer, crc64nvme_available
from ._concurrency import run_all
from ._s3 import S3Client, content_md5_where_required, drop_request_checksum, error_code, sign_known_payloads

__all__ = [
    "Integrity",
    "S3Capabilities",
    "adapt_uploads",
    "integrity_of",
    "known_capabilities",
    "prepare_uploads",
    "probe_capabilities",
    "settings_integrity",
    "size_only_warning",
]

log = logging.getLogger("async_registrar")

Integrity = Literal["crc64nvme", "crc32", "md5", "sigv4-payload", "size-only"]

#: What the probes send: small, and the same every time.
_BODY = b"async-registrar capability probe\n"
#: The errors a server answers a request whose body does not match what it was told.
_DAMAGE_CODES = frozenset(
    {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch", "InvalidRequest"}
)
#: 4xx answers that judge nothing of the request (botocore retries them as throttling).
_UNJUDGED = frozenset({"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "RequestLimitExceeded"})
#: How long the probe may take in all (each request is small).
PROBE_TIMEOUT = 30.0
#: How long the listing of multipart uploads may take (it is only reported).
LIST_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class S3Capabilities:
    """What one S3 endpoint was found to check (see the module's docstring)."""

    endpoint: str
    #: Whether it takes S3's flexible-checksum headers (None: not sent, `when_required`).
    checksum_headers: bool | None
    #: Whether it refuses a body that does not match its CRC header.
    verifies_checksum: bool
    #: Whether HeadObject (checksum mode on) gives back the CRC sent.
    reports_checksum: bool
    #: Whether it refuses a body that does not match its Content-MD5 (None: not sent).
    verifies_md5: bool | None
    #: Whether it refuses a body that does not match its signed payload hash.
    verifies_payload_hash: bool
    #: Whether ListMultipartUploads works.
    lists_uploads: bool
    #: The check the uploads use.
    integrity: Integrity

    def describe(self) -> str:
        """One line for the log and `check`."""

        def yes(value: bool | None) -> str:
            return "not sent" if value is None else ("yes" if value else "no")

        return (
            f"S3 at {self.endpoint} checks: CRC headers {yes(self.checksum_headers and self.verifies_checksum)}"
            f"{'' if self.checksum_headers is not False else ' (refused)'}, Content-MD5 {yes(self.verifies_md5)}, "
            f"signed payloads {yes(self.verifies_payload_hash)}; lists multipart uploads "
            f"{yes(self.lists_uploads)}; uploads are checked by {self.integrity}"
        )


def size_only_warning(where: str, endpoint: str) -> str:
    """The one WARNING for a server that checks nothing of what it receives."""
    return (
        f"{where}: the S3 server at {endpoint} checks no CRC, Content-MD5 or signed payload of what it "
        "receives: an object damaged on the way would be taken, so its integrity rests on its size and "
        "on the registry's sha256 check (uploads report integrity 'size-only')"
    )


def settings_integrity(checksums: str, algorithm: str) -> Integrity:
    """The integrity the settings ask for where the server was not probed: its CRC
    (`when_supported`), or a signed payload (`when_required`, where botocore signs them)."""
    if checksums != "when_supported":
        return "sigv4-payload"
    return "crc64nvme" if algorithm == "CRC64NVME" else "crc32"


def integrity_of(capabilities: S3Capabilities, algorithm: str) -> Integrity:
    """The strongest check the server performs (see the module's docstring)."""
    if capabilities.verifies_checksum:
        return "crc64nvme" if algorithm == "CRC64NVME" else "crc32"
    if capabilities.verifies_payload_hash:
        return "sigv4-payload"
    if capabilities.verifies_md5:
        return "md5"
    return "size-only"


#: Probed endpoints: (endpoint, region, checksums setting, algorithm) -> what was found.
_FOUND: dict[tuple[str, str, str, str], S3Capabilities] = {}


def _cache_key(s3: S3Client, checksums: str, algorithm: str) -> tuple[str, str, str, str]:
    return (str(s3.meta.endpoint_url), str(s3.meta.region_name), checksums, algorithm)


def known_capabilities(s3: S3Client, settings: Any) -> S3Capabilities | None:
    """What an earlier probe in this process found for the endpoint of `s3`, if any (`check`
    shows it; it writes nothing, so it probes nothing)."""
    return _FOUND.get(_cache_key(s3, settings.s3_checksums, settings.s3_checksum_algorithm))


async def probe_capabilities(
    s3: S3Client,
    bucket: str,
    prefix: str,
    *,
    checksums: str,
    algorithm: str,
    removal_timeout: float = 10.0,
    covered: bool = False,
) -> S3Capabilities:
    """What the endpoint of `s3` checks: probed with a few small objects under `prefix` in
    `bucket` (removed again, within `removal_timeout`; `covered`: a cleanup removes what is
    left under `prefix` anyway), once per endpoint and process; logged at INFO the first time.

    A damaged request refused for another reason than the damage (a denied permission)
    counts as "not checked": the upload then fails or warns on its own terms.  One that gets
    no answer at all, or a server error once botocore's retries are spent, says nothing of
    what the server checks: the probe is then inconclusive, like one that times out (the
    settings' level, unverified, a warning; not cached, so the next upload asks again).
    Taken as "not checked", a server unwell for a minute weakened, for the life of the
    process, the check of every upload a service made after it."""
    endpoint = str(s3.meta.endpoint_url)
    cache_key = _cache_key(s3, checksums, algorithm)
    if (found := _FOUND.get(cache_key)) is not None:
        return found
    # One probe at a time on a client: a probe that ended makes the client's PutObjects carry
    # what it found (`prepare_uploads`: a signed payload, no CRC header), and another probe's
    # requests sent after that were judged by it (a CRC probe sent signed and without its CRC
    # was refused by the sha256 check: 'verifies CRC headers', cached for the endpoint).
    lock = _LOCKS.get(s3)
    if lock is None:
        lock = _LOCKS[s3] = anyio.Lock()
    async with lock:
        if (found := _FOUND.get(cache_key)) is not None:
            return found
        return await _probe(s3, bucket, prefix, checksums, algorithm, removal_timeout, covered, endpoint, cache_key)


#: One lock per client (see `probe_capabilities`).
_LOCKS: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()


async def _probe(
    s3: S3Client,
    bucket: str,
    prefix: str,
    checksums: str,
    algorithm: str,
    removal_timeout: float,
    covered: bool,
    endpoint: str,
    cache_key: tuple[str, str, str, str],
) -> S3Capabilities:
    base = f"{prefix}.capabilities-{secrets.token_hex(6)}"
    names = ("crc", "crc-damaged", "md5", "md5-damaged", "sha256", "sha256-damaged")
    keys = {name: f"{base}-{name}" for name in names}
    results: dict[str, bool | None] = {}
    #: The probe's requests whose answer tells nothing of the checks (a server error, no
    #: connection, an undamaged control refused).
    failed: list[str] = []
    with anyio.move_on_after(PROBE_TIMEOUT) as overall:
        damaged = {keys["crc-damaged"], keys["md5-damaged"], keys["sha256-damaged"]}
        only = {keys[name] for name in ("md5", "md5-damaged", "sha256", "sha256-damaged")}  # one check alone
        signed = {keys["sha256"], keys["sha256-damaged"]}
        with _damaging(s3, damaged), _signing(s3, signed), _without_crc(s3, only):
            # The first object made alone, the others once it is there: `rclone serve s3` makes a
            # key's directory as it stores it, and several PutObjects making one directory at
            # once got 500s; once, a probe object whose first attempt failed so turned up after
            # the run's cleanup (a `scripts/compat` cell found it left behind).
            first = anyio.Event()

            async def crc() -> None:
                if checksums != "when_supported":
                    results.update(headers=None, verifies=False, reports=False)
                    first.set()  # the signed-payload check makes the first object instead
                    return
                accepted, reported = await _put_and_report(s3, bucket, keys["crc"], algorithm, failed, first)
                results.update(headers=accepted, reports=reported)
                results["verifies"] = accepted and await _refused(
                    s3.put_object(Bucket=bucket, Key=keys["crc-damaged"], Body=_BODY, **_crc_header(algorithm)),
                    failed,
                    "a damaged body with a CRC header",
                )

            async def md5() -> None:
                if checksums != "when_supported":
                    results["md5"] = None
                    return
                value = base64.b64encode(hashlib.md5(_BODY).digest()).decode()  # noqa: S324 (S3's own check)
                await first.wait()
                results["md5"] = await _refused_alone(
                    functools.partial(s3.put_object, Bucket=bucket, Key=keys["md5"], Body=_BODY, ContentMD5=value),
                    functools.partial(
                        s3.put_object, Bucket=bucket, Key=keys["md5-damaged"], Body=_BODY, ContentMD5=value
                    ),
                    failed,
                    "a body with a Content-MD5",
                )

            async def sha256() -> None:
                await first.wait()
                results["sha256"] = await _refused_alone(
                    functools.partial(s3.put_object, Bucket=bucket, Key=keys["sha256"], Body=_BODY),
                    functools.partial(s3.put_object, Bucket=bucket, Key=keys["sha256-damaged"], Body=_BODY),
                    failed,
                    "a body with a signed payload",
                )

            async def uploads() -> None:
                results["lists"] = False
                # Only reported (the cleanup copes either way): a server slow to answer it does
                # not hold up the upload.
                with anyio.move_on_after(LIST_TIMEOUT), contextlib.suppress(ClientError, BotoCoreError):
                    await s3.list_multipart_uploads(Bucket=bucket, Prefix=base)
                    results["lists"] = True

            try:
                await run_all([crc, md5, sha256, uploads])
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(removal_timeout) as removal:
                    await _remove(s3, bucket, list(keys.values()))
                if removal.cancelled_caught:
                    log.log(
                        logging.INFO if covered else logging.WARNING,
                        "the capability probe's objects s3://%s/%s-* were not removed within %g s%s",
                        bucket,
                        base,
                        removal_timeout,
                        "; the run's cleanup removes them" if covered else "; remove them by hand if they stay",
                    )
    if overall.cancelled_caught or failed:  # not cached: the next upload asks again
        assumed = settings_integrity(checksums, algorithm)
        why = (
            f"did not answer the capability probe within {PROBE_TIMEOUT:g} s"
            if overall.cancelled_caught
            else (f"gave the capability probe no answer that tells what it checks ({'; '.join(failed)})")
        )
        log.warning("S3 at %s %s; the uploads carry what the settings ask for (%s), unverified", endpoint, why, assumed)
        return S3Capabilities(endpoint, None, False, False, None, False, False, assumed)
    partial = S3Capabilities(
        endpoint=endpoint,
        checksum_headers=results.get("headers"),
        verifies_checksum=bool(results.get("verifies")),
        reports_checksum=bool(results.get("reports")),
        verifies_md5=results.get("md5", False),
        verifies_payload_hash=bool(results.get("sha256")),
        lists_uploads=bool(results.get("lists")),
        integrity="size-only",
    )
    found = S3Capabilities(**{**_fields(partial), "integrity": integrity_of(partial, algorithm)})
    _FOUND[cache_key] = found
    log.info("%s", found.describe())
    return found


def _fields(capabilities: S3Capabilities) -> dict[str, Any]:
    return {name: getattr(capabilities, name) for name in S3Capabilities.__slots__}


async def _put_and_report(
    s3: S3Client, bucket: str, key: str, algorithm: str, failed: list[str], put: anyio.Event
) -> tuple[bool, bool]:
    """Put `_BODY` with a checksum header: whether it was taken, and whether HeadObject reports
    it.  A put that got no answer to judge by is added to `failed`.  `put` is set once the put
    is answered (taken or not)."""
    try:
        await s3.put_object(Bucket=bucket, Key=key, Body=_BODY, **_crc_header(algorithm))
    except (ClientError, BotoCoreError) as exc:
        if not _answered(exc):
            failed.append(f"a body with a CRC header: {_describe(exc)}")
        return False, False
    finally:
        put.set()
    expected = _expected(algorithm)
    try:
        head = await s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except (ClientError, BotoCoreError):
        return True, False
    return True, expected is not None and head.get(f"Checksum{algorithm}") == expected


def _crc_header(algorithm: str) -> dict[str, str]:
    """The CRC of `_BODY` as a header value, as the uploads' parts carry theirs.  Left to
    botocore, over HTTPS it goes in an aws-chunked trailer, not a header: what was probed was
    not what the uploads send, and the body (an async stream) could not be damaged: the
    probe, and so every upload to an HTTPS endpoint, failed with a TypeError."""
    value = _expected(algorithm)
    if value is None:
        return {"ChecksumAlgorithm": algorithm}  # botocore computes it (it needs the CRT too)
    return {"ChecksumAlgorithm": algorithm, f"Checksum{algorithm}": value}


def _expected(algorithm: str) -> str | None:
    if algorithm == "CRC32":
        return base64.b64encode(zlib.crc32(_BODY).to_bytes(4, "big")).decode()
    if algorithm == "CRC64NVME" and crc64nvme_available():
        checksummer = Checksummer("CRC64NVME")
        checksummer.update(_BODY)
        return checksummer.part_done()
    return None  # CRC64NVME needs the CRT; "reports" stays unknown (False) without it


async def _refused_alone(
    control: Callable[[], Awaitable[Any]], request: Callable[[], Awaitable[Any]], failed: list[str], what: str
) -> bool:
    """Whether the server refused the damaged `request` as damaged and took `control`, the
    same request undamaged.  Without the control, a server that refuses every such request
    (a key too long for it, a header it will not take, any 400) was found to check it: the
    uploads were said to be checked by it, and a part damaged on the way was taken.  A
    control refused says nothing of the check: added to `failed` (the probe is inconclusive)."""
    # One after the other: the control makes the key's directory on servers that have them
    # (see `_probe`), and a control refused leaves the damaged request nothing to tell.
    try:
        await control()
    except (ClientError, BotoCoreError) as exc:
        failed.append(f"{what}, undamaged: {_describe(exc)}")
        return False
    return await _refused(request(), failed, f"{what}, damaged")


async def _refused(request: Any, failed: list[str], what: str) -> bool:
    """Whether the server refused a damaged request as damaged (a 4xx saying so).  One that
    got no answer to judge by (a server error, no connection) is added to `failed`."""
    try:
        await request
    except ClientError as exc:
        if _answered(exc):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            return error_code(exc) in _DAMAGE_CODES or (status == 400 and error_code(exc) != "InvalidArgument")
        failed.append(f"{what}: {_describe(exc)}")
    except BotoCoreError as exc:
        failed.append(f"{what}: {_describe(exc)}")
    return False


def _answered(exc: ClientError | BotoCoreError) -> bool:
    """Whether the server judged the request (a 4xx), rather than failing to (a 5xx, a
    throttling, no connection or answer: what botocore retried and gave up on)."""
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
    return 400 <= status < 500 and status != 429 and error_code(exc) not in _UNJUDGED


def _describe(exc: ClientError | BotoCoreError) -> str:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"{status} {error_code(exc)}"
    return type(exc).__name__


async def _remove(s3: S3Client, bucket: str, keys: list[str]) -> None:
    """Delete the probe's objects (those it never made are no error); name what is left."""
    left: list[str] = []

    async def one(key: str) -> None:
        try:
            await s3.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            left.append(f"s3://{bucket}/{key} ({exc})")

    await run_all(functools.partial(one, key) for key in keys)
    if left:
        log.warning(
            "the capability probe could not remove its objects (the role needs s3:DeleteObject); "
            "remove them by hand: %s",
            ", ".join(left),
        )


def _matches(url: str, keys: set[str]) -> bool:
    """Whether `url` is a request to one of `keys`.  botocore has percent-encoded the key in
    it (`=`, `;`, spaces, non-ASCII letters): compared encoded, a key with one never matched,
    so the probe's damage was never made and every server seemed to check nothing."""
    path = urllib.parse.unquote(url.split("?", 1)[0])
    return any(path.endswith("/" + key) for key in keys)


@contextlib.contextmanager
def _registered(s3: S3Client, event: str, handler: Callable[..., None]) -> Iterator[None]:
    """`handler` on `event` of the client for the block only."""
    s3.meta.events.register(event, handler)
    try:
        yield
    finally:
        s3.meta.events.unregister(event, handler)


def _damaging(s3: S3Client, keys: set[str]) -> contextlib.AbstractContextManager[None]:
    """Change one byte of the body of the PutObject requests to `keys` after they were signed
    and their checksums computed: damage on the way, as the server sees it."""

    def damage(request: Any, **_: Any) -> None:
        if not _matches(request.url, keys):
            return
        body = request.body
        data = bytearray(body.read() if hasattr(body, "read") else body or b"")
        if data:
            data[-1] ^= 0xFF
            request.body = bytes(data)

    return _registered(s3, "before-send.s3.PutObject", damage)


def _without_crc(s3: S3Client, keys: set[str]) -> contextlib.AbstractContextManager[None]:
    """No CRC header on the PutObject requests to `keys` (botocore adds one by default)."""

    def strip(params: dict[str, Any], **_: Any) -> None:
        if _matches(str(params.get("url", "")), keys):
            drop_request_checksum(params)

    return _registered(s3, "before-call.s3.PutObject", strip)


def _signing(s3: S3Client, keys: set[str]) -> contextlib.AbstractContextManager[None]:
    """Sign the payload of the PutObject requests to `keys` (whatever the client's setting)."""
    handler = _payload_signer(s3, lambda request: _matches(request.url, keys))
    return _registered(s3, "before-sign.s3.PutObject", handler)


def _payload_signer(s3: S3Client, applies: Callable[[Any], bool]) -> Callable[..., None]:
    signing = s3.meta.config.merge(AioConfig(s3={**(s3.meta.config.s3 or {}), "payload_signing_enabled": True}))

    def sign(request: Any, **_: Any) -> None:
        if applies(request):
            request.context["client_config"] = signing

    return sign


#: The operations whose bodies carry an artifact's bytes.
_UPLOADS = ("PutObject", "UploadPart")


async def adapt_uploads(
    s3: S3Client,
    bucket: str,
    prefix: str,
    settings: Any,
    *,
    where: str,
    removal_timeout: float,
    covered: bool = False,
) -> S3Capabilities:
    """Probe what the endpoint of `s3` checks (see `probe_capabilities`), make the client's
    uploads carry it (`prepare_uploads`), and say once, for `where`, when it checks nothing."""
    capabilities = await probe_capabilities(
        s3,
        bucket,
        prefix,
        checksums=settings.s3_checksums,
        algorithm=settings.s3_checksum_algorithm,
        removal_timeout=removal_timeout,
        covered=covered,
    )
    prepare_uploads(s3, capabilities)
    if capabilities.integrity == "size-only":
        log.warning("%s", size_only_warning(where, capabilities.endpoint))
    return capabilities


def prepare_uploads(s3: S3Client, capabilities: S3Capabilities) -> None:
    """Make the requests of `s3` carry what its server checks: a signed payload (the server
    then checks each part's sha256) for "sigv4-payload"; no CRC header (botocore adds one by
    default) where the server checks none; and where it refuses them, none of any kind (the
    operations that require a checksum carry Content-MD5).  Registered once per client."""
    integrity = capabilities.integrity
    if capabilities.checksum_headers is False:
        content_md5_where_required(s3)
    if integrity == "sigv4-payload":
        sign_known_payloads(s3)  # a host's own client too: the parts' sha256 are known already
        signer = _payload_signer(s3, lambda request: True)
        for operation in _UPLOADS:
            s3.meta.events.register(
                f"before-sign.s3.{operation}", signer, unique_id=f"async-registrar-sign-payloads-{operation}"
            )
    if integrity not in ("crc32", "crc64nvme"):
        for operation in _UPLOADS:
            s3.meta.events.register(
                f"before-call.s3.{operation}", _no_default_crc, unique_id=f"async-registrar-no-crc-{operation}"
            )


def _no_default_crc(params: dict[str, Any], **_: Any) -> None:
    headers = params.get("headers", {})
    if any(name.lower().startswith("x-amz-checksum-") for name in headers):
        return  # one the caller asked for
    drop_request_checksum(params)
