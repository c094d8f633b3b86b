"""S3 protocol quirks that AWS S3 and S3-compatible servers show and moto does not, written
black-box from the README and docs/faults.md: a proxy in front of moto rewrites its answers.

- DeleteObjects answered 200 with per-key `<Error>` entries (AccessDenied, SlowDown,
  InternalError), as AWS does for keys it could not delete, or 501 NotImplemented (servers
  without the multi-object delete: GCS's XML API);
- AbortMultipartUpload answered 204 while the upload still lists (AWS: an abort may need
  repeating while parts are in flight);
- UploadPart answered 200 without an ETag header (a gateway stripping it);
- CompleteMultipartUpload's 200 cut off in its body;
- listings served a page at a time (ListObjectsV2 `max-keys` capped, ListMultipartUploads
  with `IsTruncated` and markers, which moto never paginates).

Each asserts the exit code (or the exception), what the message names, and what is left in
S3: objects and incomplete multipart uploads.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import pytest
from pydantic import SecretStr

from async_registrar import Registrar, RegistrarError, Settings, StorageError
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client

from .conftest import ROOT, MiB, leftovers, make_job, mims_server, remove_all, request_for
from .fault_proxy import Cut, FaultProxy, Reply, S3Server, s3_error

CLI = ROOT / ".venv" / "bin" / "async-registrar"
EXE = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "async_registrar"]
NS = "http://s3.amazonaws.com/doc/2006-03-01/"
ET.register_namespace("", NS)

ResponseRewrite = Callable[[str, str, bytes, bytes], "tuple[bytes, bytes] | None"]


def run(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


class _Buffer:
    """A stream writer that keeps what is written (the whole answer) for a rewrite."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        if not self.data and data.startswith(b"HTTP/1.1 100"):  # 100 Continue goes on at once
            self._writer.write(data)
            return
        self.data += data

    async def drain(self) -> None:
        await self._writer.drain()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class QuirkProxy(FaultProxy):
    """A fault proxy that may also change a forwarded request's target (`request`) and rewrite
    S3's whole answer (`response(method, target, head, body)` -> new head and body, or None)."""

    def __init__(
        self,
        upstream: str,
        rule: Callable[[str, str, dict[str, str]], Any] | None = None,
        *,
        body_rule: Any = None,
        request: Callable[[str, str], str | None] | None = None,
        response: ResponseRewrite | None = None,
    ) -> None:
        super().__init__(upstream, rule or (lambda m, t, h: None), with_headers=True, body_rule=body_rule)
        self._request = request
        self._response = response

    async def _forward(self, method: bytes, head: bytes, reader: Any, writer: Any, **options: Any) -> None:
        verb, target = (part.decode() for part in head.split(b" ", 2)[:2])
        if self._request is not None and (changed := self._request(verb, target)) is not None:
            head = head.replace(target.encode(), changed.encode(), 1)
        if self._response is None:
            await super()._forward(method, head, reader, writer, **options)
            return
        buffer: Any = _Buffer(writer)
        await super()._forward(method, head, reader, buffer, **options)
        answer_head, _, body = bytes(buffer.data).partition(b"\r\n\r\n")
        rewritten = self._response(verb, target, answer_head, body)
        if rewritten is not None:
            answer_head, body = rewritten
        writer.write(answer_head + b"\r\n\r\n" + body)
        await writer.drain()


def with_length(head: bytes, body: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length:")]
    return b"\r\n".join([*lines, f"Content-Length: {len(body)}".encode()])


def is_delete_objects(method: str, target: str) -> bool:
    return method == "POST" and ("?delete" in target or "&delete" in target)


def keys_of_delete(body: bytes) -> list[str]:
    root = ET.fromstring(body)  # noqa: S314 (moto's answers, the client's requests)
    return [e.text or "" for e in root.iter() if e.tag.endswith("Key")]


def delete_errors(keys: list[str], code: str) -> Reply:
    """DeleteObjects' 200 answer with an <Error> for every key (nothing deleted)."""
    root = ET.Element(f"{{{NS}}}DeleteResult")
    for key in keys:
        error = ET.SubElement(root, f"{{{NS}}}Error")
        ET.SubElement(error, f"{{{NS}}}Key").text = key
        ET.SubElement(error, f"{{{NS}}}Code").text = code
        ET.SubElement(error, f"{{{NS}}}Message").text = f"{code} (per key)"
    body = b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root)
    return Reply(200, body, "OK")


class PerKeyDeleteErrors:
    """A body rule: the first `times` DeleteObjects (-1: all) get 200 with a per-key `code` error
    for every key they name; `seen` keeps the keys of those refused."""

    def __init__(self, code: str, times: int = -1) -> None:
        self.code = code
        self.times = times
        self.refused: list[str] = []

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply | bytes:
        if is_delete_objects(method, target) and self.times != 0:
            self.times -= 1
            keys = keys_of_delete(body)
            self.refused += keys
            return delete_errors(keys, self.code)
        return body


def lib_settings(settings: Settings, proxy: FaultProxy, **changes: Any) -> Settings:
    return settings.model_copy(update={"s3_endpoint_url": proxy.endpoint, "cleanup_timeout": 10, **changes})


def key_of(entry: str, bucket: str) -> str:
    return entry.removeprefix(f"s3://{bucket}/").split()[0]


def assert_named(left: list[str], named: str, bucket: str) -> None:
    """Every key (and open upload) actually left is named in `named`."""
    for entry in left:
        assert entry.removeprefix("upload:") in named, f"{entry} is left in S3 but not named: {named!r}"


# --- sweep -------------------------------------------------------------------------------------


async def killed_runs(s3: Any, bucket: str, prefix: str, count: int) -> list[str]:
    """`count` runs as a SIGKILL leaves them (no manifest): an object and an open upload each."""
    keys = []
    for _ in range(count):
        run_prefix = f"{prefix}run-{secrets.token_hex(12)}/20200101T000000Z-{secrets.token_hex(6)}/"
        await s3.put_object(Bucket=bucket, Key=run_prefix + "payload.tar.gz", Body=b"x" * 100)
        await s3.create_multipart_upload(Bucket=bucket, Key=run_prefix + "model.tar.gz")
        keys.append(run_prefix)
    return keys


def sweep_env(stack: LocalStack, settings: Settings, endpoint: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "REGISTRAR_S3_BUCKET": settings.s3_bucket,
        "REGISTRAR_S3_PREFIX": settings.s3_prefix,
        "REGISTRAR_MIMS_ENDPOINT": stack.mims_endpoint,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


async def test_sweep_with_per_key_access_denied_exits_4(stack: LocalStack, settings: Settings, s3: Any) -> None:
    """`sweep` whose DeleteObjects is answered 200 with AccessDenied per key: exit 4 (something
    could not be removed), the objects still there, and not counted as removed."""
    await killed_runs(s3, settings.s3_bucket, settings.s3_prefix, 2)
    rule = PerKeyDeleteErrors("AccessDenied")
    with QuirkProxy(stack.s3_endpoint, body_rule=rule) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(sweep_env(stack, settings, proxy.endpoint), "sweep", "--older-than", "0s")
        )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    objects = [k for k in left if not k.startswith("upload:")]
    assert rule.refused, done.stderr[-2000:]
    assert len(objects) == 2
    assert done.returncode == 4, (done.returncode, done.stdout, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    assert_named(objects, done.stdout + done.stderr, settings.s3_bucket)


@pytest.mark.parametrize("code", ["SlowDown", "InternalError"])
async def test_sweep_with_a_transient_per_key_error_does_not_claim_success(
    stack: LocalStack, settings: Settings, s3: Any, code: str
) -> None:
    """`sweep` whose first DeleteObjects is answered 200 with a transient per-key error (AWS: retry
    those keys): either it retries and nothing is left (exit 0), or it exits 4 naming what is left;
    never exit 0 with objects left."""
    await killed_runs(s3, settings.s3_bucket, settings.s3_prefix, 2)
    rule = PerKeyDeleteErrors(code, times=1)
    with QuirkProxy(stack.s3_endpoint, body_rule=rule) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(sweep_env(stack, settings, proxy.endpoint), "sweep", "--older-than", "0s")
        )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert rule.refused, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if done.returncode == 0:
        assert left == [], (left, done.stdout, done.stderr[-3000:])
    else:
        assert done.returncode == 4, (done.returncode, done.stderr[-3000:])
        assert_named(left, done.stdout + done.stderr, settings.s3_bucket)


async def test_sweep_on_a_server_without_delete_objects(stack: LocalStack, settings: Settings, s3: Any) -> None:
    """A server without the multi-object delete (GCS's XML API: 501 NotImplemented): `sweep`
    removes the runs one object at a time (exit 0, nothing left), or exits 4 naming each object
    left; no traceback."""
    await killed_runs(s3, settings.s3_bucket, settings.s3_prefix, 2)

    def rule(method: str, target: str, headers: dict[str, str]) -> Reply | None:
        return s3_error(501, "NotImplemented") if is_delete_objects(method, target) else None

    with QuirkProxy(stack.s3_endpoint, rule) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(sweep_env(stack, settings, proxy.endpoint), "sweep", "--older-than", "0s")
        )
        refused = sum(1 for m, t in proxy.seen if is_delete_objects(m, t))
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert refused >= 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if done.returncode == 0:
        assert left == [], (left, done.stdout, done.stderr[-3000:])
    else:
        assert done.returncode == 4, (done.returncode, done.stderr[-3000:])
        assert_named(left, done.stdout + done.stderr, settings.s3_bucket)


# --- paginated listings ------------------------------------------------------------------------


def cap_object_pages(method: str, target: str) -> str | None:
    """ListObjectsV2 a key at a time (a server whose pages are smaller than asked for)."""
    path, _, query = target.partition("?")
    if method != "GET" or "list-type=2" not in query:
        return None
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "max-keys"]
    return f"{path}?{urlencode([*pairs, ('max-keys', '1')])}"


def page_uploads(method: str, target: str, head: bytes, body: bytes) -> tuple[bytes, bytes] | None:
    """ListMultipartUploads one upload a page, with IsTruncated and the next markers, honouring
    `key-marker` / `upload-id-marker` as S3 does (moto never paginates)."""
    query = target.partition("?")[2]
    if method != "GET" or not head.startswith(b"HTTP/1.1 200") or "uploads" not in dict(parse_qsl(query, True)):
        return None
    if "uploadId" in query:
        return None
    params = dict(parse_qsl(query, keep_blank_values=True))
    key_marker, id_marker = params.get("key-marker", ""), params.get("upload-id-marker", "")
    root = ET.fromstring(body)  # noqa: S314 (moto's answers, the client's requests)
    uploads = [e for e in root if e.tag == f"{{{NS}}}Upload"]
    for upload in uploads:
        root.remove(upload)

    def ident(upload: ET.Element) -> tuple[str, str]:
        return (upload.findtext(f"{{{NS}}}Key") or "", upload.findtext(f"{{{NS}}}UploadId") or "")

    ordered = sorted(uploads, key=ident)
    if not key_marker:
        after = ordered
    elif id_marker:  # S3: the same key's later uploads, then the later keys
        after = [u for u in ordered if ident(u) > (key_marker, id_marker)]
    else:  # S3: only keys after the marker
        after = [u for u in ordered if ident(u)[0] > key_marker]
    page, rest = after[:1], after[1:]
    for tag in ("IsTruncated", "NextKeyMarker", "NextUploadIdMarker", "MaxUploads"):
        for old in root.findall(f"{{{NS}}}{tag}"):
            root.remove(old)
    ET.SubElement(root, f"{{{NS}}}MaxUploads").text = "1"
    ET.SubElement(root, f"{{{NS}}}IsTruncated").text = "true" if rest else "false"
    if page and rest:
        ET.SubElement(root, f"{{{NS}}}NextKeyMarker").text = ident(page[0])[0]
        ET.SubElement(root, f"{{{NS}}}NextUploadIdMarker").text = ident(page[0])[1]
    for upload in page:
        root.append(upload)
    new = b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root)
    return with_length(head, new), new


@pytest.fixture
def paging_proxy(stack: LocalStack) -> Iterator[QuirkProxy]:
    proxy = QuirkProxy(stack.s3_endpoint, request=cap_object_pages, response=page_uploads)
    with proxy:
        yield proxy


async def test_the_paging_proxy_pages(paging_proxy: QuirkProxy, settings: Settings, s3: Any) -> None:
    """The proxy itself: through it, a listing of 3 uploads and 3 objects is 3 pages each."""
    runs = await killed_runs(s3, settings.s3_bucket, settings.s3_prefix, 3)
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with open_s3_client(session, region=REGION, endpoint_url=paging_proxy.endpoint) as client:
        first = await client.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
        seen = await _all_uploads(client, settings)
        objects = await client.list_objects_v2(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert first["IsTruncated"]
    assert len(first["Uploads"]) == 1
    assert sorted(seen) == sorted(r + "model.tar.gz" for r in runs)
    assert objects["IsTruncated"]
    assert objects["KeyCount"] == 1


async def _all_uploads(client: Any, settings: Settings) -> list[str]:
    keys = []
    paginator = client.get_paginator("list_multipart_uploads")
    async for page in paginator.paginate(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix):
        keys += [u["Key"] for u in page.get("Uploads", [])]
    return keys


async def test_sweep_through_one_item_pages_removes_every_run(
    paging_proxy: QuirkProxy, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`sweep --older-than 0s` on three killed runs, the listings served an item a page: every
    object and open upload is removed, exit 0."""
    await killed_runs(s3, settings.s3_bucket, settings.s3_prefix, 3)
    done = await anyio.to_thread.run_sync(
        lambda: run(sweep_env(stack, settings, paging_proxy.endpoint), "sweep", "--older-than", "0s")
    )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert done.returncode == 0, done.stderr[-3000:]
    assert left == []


async def test_a_failed_run_through_one_item_pages_leaves_nothing(
    tmp_path: Path, paging_proxy: QuirkProxy, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A registration refused by the registry (before the point of no return), its S3 listings
    served an item a page: its prefix is emptied (objects and uploads)."""
    with mims_server(stack, reject_regions=[REGION]) as registry:
        changed = lib_settings(settings, paging_proxy, mims_endpoint=registry.endpoint)
        async with Registrar(changed) as registrar:
            with anyio.fail_after(60), pytest.raises(RegistrarError):
                await registrar.register(request_for(make_job(tmp_path)))
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert left == []


# --- multipart answers -------------------------------------------------------------------------


def upload_env(endpoint: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "REGISTRAR_PART_SIZE": "5MiB",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def model_dir(root: Path, size: int = 12 * MiB) -> Path:
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(size))
    return root


class AbortIgnoredOnce:
    """Part 2 is refused (403, not retried); the first AbortMultipartUpload is answered 204
    without reaching S3, as an abort that races parts in flight leaves the upload listed."""

    def __init__(self) -> None:
        self.faked = 0

    def __call__(self, method: str, target: str, headers: dict[str, str]) -> Reply | None:
        if method == "PUT" and "partNumber=2" in target:
            return s3_error(403, "AccessDenied")
        if method == "DELETE" and "uploadId=" in target and self.faked == 0:
            self.faked += 1
            return Reply(204, b"", "No Content")
        return None


async def test_an_abort_answered_but_not_done_is_not_left_silently_by_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`upload` whose part 2 is refused: exit 4; its abort is answered 204 but the upload still
    lists (AWS documents that aborting may need repeating): it is aborted again or named."""
    key = f"{settings.s3_prefix}abort/model.tar.gz"
    rule = AbortIgnoredOnce()
    with QuirkProxy(stack.s3_endpoint, rule) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(
                upload_env(proxy.endpoint), "upload", str(model_dir(tmp_path / "m")), f"s3://{settings.s3_bucket}/{key}"
            )
        )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert rule.faked == 1, done.stderr[-2000:]
    assert done.returncode == 4, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    uploads = await _upload_ids(left)
    assert uploads == [] or all(u in done.stderr for u in uploads), (left, done.stderr[-3000:])
    assert left == [] or key in done.stderr, (left, done.stderr[-3000:])


async def _upload_ids(left: list[str]) -> list[str]:
    return [entry for entry in left if entry.startswith("upload:")]


async def test_an_abort_answered_but_not_done_leaves_nothing_after_a_failed_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A registration whose model part 2 is refused: StorageError; the first abort is answered
    204 and not done; the prefix is emptied all the same (the cleanup lists open uploads), or the
    error names the upload left."""
    rule = AbortIgnoredOnce()
    with QuirkProxy(stack.s3_endpoint, rule) as proxy:
        job = make_job(tmp_path, model_bytes=12 * MiB)
        async with Registrar(lib_settings(settings, proxy)) as registrar:
            with anyio.fail_after(60), pytest.raises(StorageError) as caught:
                await registrar.register(request_for(job))
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert rule.faked == 1
    message = str(caught.value) + " ".join(getattr(caught.value, "__notes__", []))
    assert "part 2" in message, message
    assert_named(left, message, settings.s3_bucket)


def strip_part_etag(method: str, target: str, head: bytes, body: bytes) -> tuple[bytes, bytes] | None:
    if method == "PUT" and "partNumber=" in target and "uploadId=" in target:
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"etag:")]
        return b"\r\n".join(lines), body
    return None


async def test_an_upload_part_answered_without_an_etag_is_a_storage_error(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """UploadPart answered 200 without an ETag (a gateway that strips it): not a traceback (1),
    but exit 4 naming the missing ETag or the part, and no upload left open."""
    key = f"{settings.s3_prefix}noetag/model.tar.gz"
    with QuirkProxy(stack.s3_endpoint, response=strip_part_etag) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(
                upload_env(proxy.endpoint), "upload", str(model_dir(tmp_path / "m")), f"s3://{settings.s3_bucket}/{key}"
            )
        )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert left == [], left
    assert done.returncode == 4, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "etag" in done.stderr.lower(), done.stderr[-3000:]


async def test_a_completion_answer_cut_in_its_body_still_uploads(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """CompleteMultipartUpload's 200 breaks off after a few bytes of its body (the object is
    complete in S3): `upload` exits 0 and prints the URI; the object is whole; no upload open."""
    key = f"{settings.s3_prefix}cut/model.tar.gz"
    cut = [0]

    def rule(method: str, target: str, headers: dict[str, str]) -> Cut | None:
        if method == "POST" and "uploadId=" in target and cut[0] == 0:
            cut[0] += 1
            return Cut(after=20)
        return None

    with QuirkProxy(stack.s3_endpoint, rule) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(
                upload_env(proxy.endpoint), "upload", str(model_dir(tmp_path / "m")), f"s3://{settings.s3_bucket}/{key}"
            )
        )
    uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    head = await s3.head_object(Bucket=settings.s3_bucket, Key=key) if done.returncode == 0 else None
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert cut[0] == 1
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"s3://{settings.s3_bucket}/{key}" in done.stdout
    assert head is not None
    assert str(head["ContentLength"]) in done.stdout.replace(",", "")
    assert uploads.get("Uploads", []) == []


async def test_an_upload_part_answered_without_an_etag_is_a_storage_error_for_the_library(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """The same through `Registrar.register`: a `StorageError` (a `RegistrarError`), not a bare
    KeyError, and the run's prefix emptied."""
    with QuirkProxy(stack.s3_endpoint, response=strip_part_etag) as proxy:
        job = make_job(tmp_path, model_bytes=12 * MiB)
        async with Registrar(lib_settings(settings, proxy)) as registrar:
            with anyio.fail_after(60), pytest.raises((RegistrarError, KeyError)) as caught:
                await registrar.register(request_for(job))
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert left == [], left
    assert isinstance(caught.value, StorageError), repr(caught.value)


# --- a versioned bucket ------------------------------------------------------------------------


async def test_a_success_on_a_versioned_bucket_leaves_no_version_behind(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A temporary bucket with versioning enabled (common by policy on AWS): after SUCCEEDED the
    run's prefix holds no object version (a DeleteObject without a VersionId only adds a delete
    marker: the multi-gigabyte archives would stay, billed, as noncurrent versions)."""
    bucket = f"h35-versioned-{secrets.token_hex(4)}"
    await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    await s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        with mims_server(stack, allowed_buckets=[bucket]) as registry:
            changed = settings.model_copy(update={"s3_bucket": bucket, "mims_endpoint": registry.endpoint})
            async with Registrar(changed) as registrar:
                with anyio.fail_after(60):
                    result = await registrar.register(request_for(make_job(tmp_path)))
        assert result.model_id
        assert await leftovers(s3, bucket, settings.s3_prefix) == []
        listed = await s3.list_object_versions(Bucket=bucket, Prefix=settings.s3_prefix)
        versions = [f"{v['Key']} {v['VersionId']}" for v in listed.get("Versions", [])]
        assert versions == [], f"object versions left under the prefix: {versions}"
    finally:
        listed = await s3.list_object_versions(Bucket=bucket)
        for entry in [*listed.get("Versions", []), *listed.get("DeleteMarkers", [])]:
            await s3.delete_object(Bucket=bucket, Key=entry["Key"], VersionId=entry["VersionId"])
        await s3.delete_bucket(Bucket=bucket)


# --- ETags that are not MD5s -------------------------------------------------------------------


class EncryptedEtags:
    """An S3 server that checks Content-MD5 (the probe finds `md5`) but, as one encrypting at rest
    does (AWS SSE-KMS, MinIO with SSE), answers ETags that are not the MD5 of what it stored:
    each part's ETag and the completed object's (in S3's `<hex>-<parts>` form) are opaque. The
    proxy maps the parts' ETags back for moto when the upload is completed."""

    def __init__(self) -> None:
        self._checks = S3Server(frozenset({"md5"}))
        self.real: dict[str, str] = {}
        self.final: dict[str, str] = {}

    def body(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply | bytes:
        if method == "POST" and "uploadId=" in target:  # CompleteMultipartUpload: our ETags back to moto's
            text = body.decode()
            for fake, real in self.real.items():
                text = text.replace(fake.strip('"'), real.strip('"'))
            return text.encode()
        return self._checks(method, target, headers, body)

    def response(self, method: str, target: str, head: bytes, body: bytes) -> tuple[bytes, bytes] | None:
        path = target.partition("?")[0]
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        if method == "PUT" and "partNumber=" in target and "uploadId=" in target:
            return self._swap_header(head, body, lambda real: self._fake(real))
        if method == "POST" and "uploadId=" in target:
            root = ET.fromstring(body)  # noqa: S314 (moto's answers, the client's requests)
            element = root.find(f"{{{NS}}}ETag")
            if element is not None and element.text:
                parts = element.text.strip('"').rpartition("-")[2]
                self.final[path] = f'"{secrets.token_hex(16)}-{parts}"'
                element.text = self.final[path]
                new = b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root)
                return with_length(head, new), new
        if method in ("HEAD", "GET") and path in self.final:
            return self._swap_header(head, body, lambda real: self.final[path])
        return None

    def _fake(self, real: str) -> str:
        fake = f'"{secrets.token_hex(16)}"'
        self.real[fake] = real
        return fake

    @staticmethod
    def _swap_header(head: bytes, body: bytes, new: Callable[[str], str]) -> tuple[bytes, bytes]:
        lines = []
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"etag":
                line = b"ETag: " + new(value.strip().decode()).encode()
            lines.append(line)
        return b"\r\n".join(lines), body


async def test_opaque_etags_of_an_encrypting_server_are_not_taken_for_damage(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`upload` to a server that checks Content-MD5 (integrity `md5`) but answers opaque ETags
    (encryption at rest: AWS documents that such ETags are not MD5 digests): the upload is whole,
    so exit 0 and the object kept; not exit 4 with a good object deleted as damaged."""
    key = f"{settings.s3_prefix}sse/model.tar.gz"
    server = EncryptedEtags()
    with QuirkProxy(stack.s3_endpoint, body_rule=server.body, response=server.response) as proxy:
        done = await anyio.to_thread.run_sync(
            lambda: run(
                upload_env(proxy.endpoint), "upload", str(model_dir(tmp_path / "m")), f"s3://{settings.s3_bucket}/{key}"
            )
        )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert server.final, done.stderr[-3000:]  # the completion's ETag was made opaque
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "md5" in done.stdout, done.stdout  # the level the probe found
    assert left == [key]
