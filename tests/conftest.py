"""Shared fixtures: a real S3 server (moto) and the reference MIMS, both on loopback.

The servers run in threads of the test process, once per session; every test gets
a prefix of its own, and checks that its prefix is empty afterwards where it
matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import shutil
import tarfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import stamina
from pydantic import SecretStr

from async_registrar import (
    ProgressEvent,
    Registrar,
    RegistrationConfig,
    RegistrationRequest,
    RegistrationSubmitted,
    RegistrationTimeout,
    Settings,
    _capabilities,
)
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client
from async_registrar.reference_mims import ReferenceMimsSettings, ThreadedMimsServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "demo"
MiB = 1024 * 1024
#: The buckets the tests' reference MIMS reads artifacts from: the stack's, and the regional ones.
ALLOWED_BUCKETS = ["registrar-local-tmp", *(f"registrar-mr-{r}" for r in ("us-west-2", "eu-west-1", "ap-south-1"))]


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """moto S3 and the reference MIMS (verifying signatures), for the whole session."""
    with LocalStack(mims=ReferenceMimsSettings(pending_delay=0.05, allowed_buckets=ALLOWED_BUCKETS)) as running:
        yield running


@pytest.fixture(autouse=True)
def _forget_probes_of_closed_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """What a capability probe found is kept per endpoint URL for the process (see
    `_capabilities`); a test's proxy or emulated server closes with the test, and a later test's
    server may get its port: that one must be probed, not given the old answer.  Only the
    session stack's own endpoint stays known across tests."""
    keep = request.getfixturevalue("stack").s3_endpoint if "stack" in request.fixturenames else None
    yield
    for key in [k for k in _capabilities._FOUND if k[0] != keep]:
        del _capabilities._FOUND[key]


@pytest.fixture
def prefix() -> str:
    """A temporary prefix of this test's own."""
    return f"test-{secrets.token_hex(4)}/"


@pytest.fixture
def settings(stack: LocalStack, prefix: str) -> Settings:
    """Registrar settings pointing at the session's stack, under this test's prefix."""
    return stack.registrar_settings(s3_prefix=prefix, poll_initial=0.02, poll_max=0.2)


@pytest.fixture
async def s3(stack: LocalStack) -> AsyncIterator[Any]:
    """An S3 client on the session's moto server."""
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with open_s3_client(session, region=REGION, endpoint_url=stack.s3_endpoint) as client:
        yield client


@pytest.fixture
async def regional_s3(stack: LocalStack) -> AsyncIterator[dict[str, Any]]:
    """A client per region, and each region's temporary bucket (moto checks a bucket's region)."""
    regions = ["us-west-2", "eu-west-1", "ap-south-1"]
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with contextlib.AsyncExitStack() as stack_:
        clients = {}
        for region in regions:
            client = await stack_.enter_async_context(
                open_s3_client(session, region=region, endpoint_url=stack.s3_endpoint)
            )
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                await client.create_bucket(
                    Bucket=f"registrar-mr-{region}", CreateBucketConfiguration={"LocationConstraint": region}
                )
            clients[region] = client
        yield clients


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """stamina retries without sleeping (up to 10 attempts)."""
    with stamina.set_testing(True, attempts=10):
        yield


def mims_server(stack: LocalStack, **overrides: Any) -> ThreadedMimsServer:
    """A reference MIMS of its own (faults and all), on the session's S3."""
    return ThreadedMimsServer(mims_settings(stack, **overrides))


def mims_settings(stack: LocalStack, **overrides: Any) -> ReferenceMimsSettings:
    """The settings of `mims_server`: the session's S3, verifying our signatures."""
    values: dict[str, Any] = {
        "registry_bucket": stack.registry_bucket,
        "s3_endpoint_url": stack.s3_endpoint,
        "aws_region": REGION,
        "aws_access_key_id": SecretStr(ACCESS_KEY),
        "aws_secret_access_key": SecretStr(SECRET_KEY),
        "signing_secrets": {ACCESS_KEY: SecretStr(SECRET_KEY)},
        "pending_delay": 0.05,
        "allowed_buckets": ALLOWED_BUCKETS,
        **overrides,
    }
    return ReferenceMimsSettings(**values)


async def leftovers(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Objects and open multipart uploads under `prefix` (should be none after a run)."""
    objects = await s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    uploads = await s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in objects.get("Contents", [])] + [f"upload:{u['Key']}" for u in uploads.get("Uploads", [])]


async def final_status(registry: ThreadedMimsServer, registration_id: str, timeout: float = 15) -> str:
    """Wait until the registry has finished `registration_id`; its status, with the reason if FAILED."""
    with anyio.fail_after(timeout):
        while True:
            registration = registry.registration(registration_id)
            assert registration is not None, f"the registry has no {registration_id}"
            if registration.status in ("SUCCEEDED", "FAILED"):
                return registration.status + (f": {registration.failure_reason}" if registration.failure_reason else "")
            await anyio.sleep(0.05)


#: A processing delay that holds a registration unfinished for as long as a test needs, however
#: slow the machine: the test ends it with `registry.finish_processing()` at the point from which
#: the registration may (or must) finish.  A finite delay is a race against the machine's speed.
HELD = 600.0

#: A registry that reads the artifacts only when it finishes, and holds every registration
#: unfinished until the test calls `finish_processing()`.
LATE: dict[str, Any] = {"read_artifacts": "at_finish", "processing_delay": HELD}


@contextlib.contextmanager
def late_registry(stack: LocalStack, **overrides: Any) -> Iterator[ThreadedMimsServer]:
    """A reference MIMS of its own that reads the artifacts only when a registration finishes (as an
    asynchronous workflow does): a run that deleted them too early sees its registration FAILED.
    It holds every registration unfinished (`HELD`) until `registry.finish_processing()`; a test
    that expects a final status calls it first (or passes a `processing_delay` of its own)."""
    with mims_server(stack, **{**LATE, **overrides}) as registry:
        yield registry


def release_when_submitted(
    registry: ThreadedMimsServer, then: Callable[[ProgressEvent], None] | None = None, *, count: int = 1
) -> Callable[[ProgressEvent], None]:
    """A progress callback that lets `registry` finish its registrations (`finish_processing()`)
    once the run has reported `count` RegistrationSubmitted events (a registration submitted, or an
    earlier one followed): held unfinished until then, they finish while the run waits for them.
    Every event goes on to `then`."""
    submitted = [0]

    def callback(event: ProgressEvent) -> None:
        if then is not None:
            then(event)
        if isinstance(event, RegistrationSubmitted):
            submitted[0] += 1
            if submitted[0] >= count:
                registry.finish_processing()

    return callback


def on(settings: Settings, registry: ThreadedMimsServer, **changes: Any) -> Settings:
    """`settings` pointed at `registry`, with `changes`."""
    return settings.model_copy(update={"mims_endpoint": registry.endpoint, **changes})


@contextlib.asynccontextmanager
async def default_executor_filled(threads: int = 64) -> AsyncIterator[None]:
    """Every thread of the event loop's default executor blocked for the block, as a host
    application's `asyncio.to_thread` work can keep them."""
    release = threading.Event()
    blockers = [asyncio.ensure_future(asyncio.to_thread(release.wait)) for _ in range(threads)]
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*blockers)


@contextlib.contextmanager
def hooked(client: Any, *hooks: tuple[str, Callable[..., Any]]) -> Iterator[None]:
    """`client`'s botocore events (`("before-call.s3.HeadObject", handler)`, ...) handled by
    the given handlers for the block, and by nothing of the test's after it."""
    for event, handler in hooks:
        client.meta.events.register(event, handler)
    try:
        yield
    finally:
        for event, handler in hooks:
            client.meta.events.unregister(event, handler)


class ForwardingTransport(httpx.AsyncBaseTransport):
    """Real HTTP, for an `httpx.AsyncClient` given to a registrar: a subclass answers some
    requests itself (a fault) and forwards the rest with `self._real`."""

    def __init__(self) -> None:
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        await self._real.aclose()


class Recorder:
    """Every progress event, by kind."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


async def kept_by_a_timeout(settings: Settings, request: RegistrationRequest) -> RegistrationTimeout:
    """Register with a short wait: the registry accepts, the wait times out, the artifacts are kept."""
    async with Registrar(settings.model_copy(update={"wait_timeout": 0.3})) as registrar:
        with pytest.raises(RegistrationTimeout) as caught:
            await registrar.register(request)
    return caught.value


async def names_under(s3: Any, settings: Settings) -> list[str]:
    """The names of the objects (and open uploads) under the test's prefix, sorted."""
    return sorted(k.rsplit("/", 1)[1] for k in await leftovers(s3, settings.s3_bucket, settings.s3_prefix))


async def remove_all(s3: Any, bucket: str, prefix: str) -> None:
    """Remove what a test kept on purpose under `prefix` (objects and open uploads)."""
    for key in await leftovers(s3, bucket, prefix):
        if key.startswith("upload:"):
            uploads = await s3.list_multipart_uploads(Bucket=bucket, Prefix=key.removeprefix("upload:"))
            for upload in uploads.get("Uploads", []):
                await s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        else:
            await s3.delete_object(Bucket=bucket, Key=key)


def registration_config(**changes: Any) -> dict[str, Any]:
    """The example's registration configuration, with `changes` applied."""
    config: dict[str, Any] = json.loads((EXAMPLE / "registration.json").read_text())
    config.update(changes)
    return config


def make_job(tmp_path: Path, *, model_bytes: int = 0, config: dict[str, Any] | None = None) -> dict[str, Path]:
    """A job's inputs under `tmp_path`: the example, optionally with extra random weights."""
    model = tmp_path / "model"
    shutil.copytree(EXAMPLE / "model", model)
    if model_bytes:
        (model / "extra.f32").write_bytes(os.urandom(model_bytes))
    payload = tmp_path / "payload"
    shutil.copytree(EXAMPLE / "payload", payload)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config if config is not None else registration_config()))
    return {"model": model, "payload": payload, "config": config_path, "metadata": tmp_path / "no-metadata"}


def request_for(job: dict[str, Path], **extra: Any) -> RegistrationRequest:
    """A registration of `make_job`'s inputs (its metadata path does not exist: no metadata)."""
    return RegistrationRequest(
        config=RegistrationConfig.from_json(job["config"].read_text()),
        model_path=job["model"],
        payload_path=job["payload"],
        metadata_path=job["metadata"],
        **extra,
    )


async def kept_then_failed(
    settings: Settings, registry: ThreadedMimsServer, request: RegistrationRequest, s3: Any
) -> tuple[str, str]:
    """A registration kept by a wait timeout whose model someone then removed, so that it ends FAILED
    (the payload stays whole in its prefix); its id and its prefix's key."""
    timed_out = await kept_by_a_timeout(on(settings, registry), request)
    (kept,) = timed_out.kept
    assert kept.kept_prefix is not None
    earlier = kept.kept_prefix.removeprefix(f"s3://{settings.s3_bucket}/")
    await s3.delete_object(Bucket=settings.s3_bucket, Key=f"{earlier}model.tar.gz")
    registry.finish_processing()
    assert (await final_status(registry, kept.registration_id)).startswith("FAILED")
    return kept.registration_id, earlier


async def cancel_when(registrar: Registrar, request: Any, ready: Any) -> None:
    """Run `registrar.register(request)` and cancel it from outside once `await ready()` returns."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(registrar.register, request)
            with anyio.fail_after(30):
                await ready()
            scope.cancel()
    assert scope.cancelled_caught


def environment(stack: LocalStack, settings: Settings, job: dict[str, Path], **extra: str) -> dict[str, str]:
    """A clean environment: only what a registration job would be given."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": stack.s3_endpoint,
        "REGISTRAR_S3_BUCKET": settings.s3_bucket,
        "REGISTRAR_S3_PREFIX": settings.s3_prefix,
        "REGISTRAR_MIMS_ENDPOINT": stack.mims_endpoint,
        "REGISTRAR_MODEL_PATH": str(job["model"]),
        "REGISTRAR_PAYLOAD_PATH": str(job["payload"]),
        "REGISTRAR_CONFIG_PATH": str(job["config"]),
        "REGISTRAR_PART_SIZE": "5MiB",
        "REGISTRAR_POLL_INITIAL": "0.05",
        "REGISTRAR_POLL_MAX": "0.2",
        "PYTHONDONTWRITEBYTECODE": "1",
        # A path the job names must exist; `make_job`'s metadata path may not (no metadata).
        **({"REGISTRAR_METADATA_PATH": str(job["metadata"])} if job["metadata"].exists() else {}),
        **extra,
    }


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
