"""Black-box acceptance tests for issue 13, "Preflight".

Written against the spec, the public API and the CLI only, on the real moto S3 server and the
reference MIMS over HTTP (no mocks): before the first byte is uploaded, the registrar checks that
credentials resolve, that every region's bucket answers HeadBucket and that every region's
registry answers a signed GET of a registration that cannot exist (404 = reachable and our
signature accepted).  A failure ends the run with its exit code (2 credentials, 4 bucket, 5
registry) before any upload starts: a FaultProxy in front of S3 (and, where it matters, in front
of the registry) records every request, so "no CreateMultipartUpload, no PutObject" is checked on
the wire.  `async-registrar check` / `Registrar.check` run the same validation and preflight,
upload nothing and describe the plan.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from async_registrar import (
    ConfigurationError,
    Registrar,
    RegistrarError,
    RegistrationPlan,
    RegistrationRejected,
    RegistrationRequest,
    RegistryError,
    RegistryUnavailable,
    Settings,
    StorageError,
)
from async_registrar._local import ACCESS_KEY, REGION, LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import MiB, leftovers, make_job, mims_server, mims_settings, registration_config, request_for
from .fault_proxy import FaultProxy, Hold, Reply, Rule, Stall
from .test_cli import environment, run

#: REGISTRAR_PREFLIGHT_TIMEOUT in these tests, and the bound on a failing run's wall time: the
#: preflight's 3 s plus room for what else is timed (a CLI's interpreter start-up and imports,
#: the job's inspection) on a loaded machine; still far below the 30 s default preflight timeout
#: a run that did not keep REGISTRAR_PREFLIGHT_TIMEOUT would take.
PREFLIGHT_TIMEOUT = 3.0
BOUND = PREFLIGHT_TIMEOUT + 15

REGISTRATIONS = "/v1/registrations"

# --- helpers ------------------------------------------------------------------------------------


def forward(method: str, target: str) -> object:
    """A FaultProxy rule that forwards everything."""
    return None


def uploads(proxy: FaultProxy) -> list[tuple[str, str]]:
    """The requests that start or carry an upload: CreateMultipartUpload (POST ?uploads) and every PUT
    (PutObject, UploadPart, CreateBucket: none of them is a preflight's business)."""
    return [(m, t) for m, t in proxy.seen if m == "PUT" or (m == "POST" and re.search(r"[?&]uploads(=|&|$)", t))]


def writes(proxy: FaultProxy) -> list[tuple[str, str]]:
    """Every request that could change S3 (PUT, POST, DELETE)."""
    return [(m, t) for m, t in proxy.seen if m in ("PUT", "POST", "DELETE")]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def is_head_bucket(bucket: str, method: str, target: str) -> bool:
    return method == "HEAD" and target.split("?", 1)[0].strip("/") == bucket


def deny_head_bucket(bucket: str) -> Rule:
    """S3 answering 403 to HeadBucket on `bucket` (a role without s3:ListBucket), forwarding the rest."""

    def rule(method: str, target: str) -> object:
        return Reply(403, b"", "Forbidden") if is_head_bucket(bucket, method, target) else None

    return rule


def described(exc: BaseException) -> str:
    """An error's message with its notes."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


def sizes_of(directory: Path) -> tuple[int, int]:
    """How many regular files `directory` holds (recursively), and their bytes."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def mentions_size(text: str, size: int) -> bool:
    """`text` shows `size` bytes, as a number of bytes or in binary/decimal units (up to 2 decimals)."""
    candidates = {str(size), f"{size:,}", f"{size:_}"}
    for unit, scale in (("KiB", 1024), ("MiB", MiB), ("GiB", 1024 * MiB), ("kB", 1000), ("KB", 1000)):
        for decimals in (0, 1, 2):
            shown = f"{size / scale:.{decimals}f}"
            candidates |= {f"{shown} {unit}", f"{shown}{unit}"}
    for unit, scale in (("MB", 1000**2), ("GB", 1000**3)):
        for decimals in (0, 1, 2):
            shown = f"{size / scale:.{decimals}f}"
            candidates |= {f"{shown} {unit}", f"{shown}{unit}"}
    return any(re.search(rf"(?<![\d.,_]){re.escape(c)}(?![\d])", text) for c in candidates)


class Traffic:
    """Every request that went through the proxies using `rule(label)`, in the order they arrived."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def rule(self, label: str, then: Rule = forward) -> Rule:
        def record(method: str, target: str) -> object:
            with self._lock:
                self.log.append((label, method, target))
            return then(method, target)

        return record

    def first(self, label: str, method: str, pattern: str) -> int:
        """The position of the first `label` request with `method` whose target matches `pattern` (or -1)."""
        for i, (lab, m, t) in enumerate(self.log):
            if lab == label and m == method and re.search(pattern, t):
                return i
        return -1


# --- the faults a preflight must catch ------------------------------------------------------------


@dataclass
class Fault:
    """One preflight failure: what it must end with, and how to cause it in the library and the CLI."""

    code: int
    error: type[RegistrarError]
    needles: tuple[str, ...]  # what the message must name (case-insensitive)
    settings: dict[str, Any] = field(default_factory=dict)  # library: Settings changes
    env: dict[str, str] = field(default_factory=dict)  # CLI: variables (AWS_* ones also set in-process)
    unset: tuple[str, ...] = ()  # variables removed
    s3_rule: Rule = forward
    registry: ThreadedMimsServer | None = None


FAULTS = [
    "registry-refusing",
    "registry-unresolvable",
    "registry-stalling",
    "registry-path-typo",
    "signature-rejected",
    "bucket-missing",
    "bucket-denied",
    "no-credentials",
]


@contextlib.contextmanager
def arranged(kind: str, stack: LocalStack, settings: Settings, tmp_path: Path) -> Iterator[Fault]:
    if kind == "registry-refusing":
        endpoint = f"http://127.0.0.1:{free_port()}"
        yield Fault(
            5, RegistryUnavailable, (endpoint,), {"mims_endpoint": endpoint}, {"REGISTRAR_MIMS_ENDPOINT": endpoint}
        )
    elif kind == "registry-unresolvable":
        endpoint = "http://mims.no-such-host.invalid:8080"
        yield Fault(
            5, RegistryUnavailable, (endpoint,), {"mims_endpoint": endpoint}, {"REGISTRAR_MIMS_ENDPOINT": endpoint}
        )
    elif kind == "registry-stalling":  # accepts the connection, never answers in time
        with FaultProxy(stack.mims_endpoint, lambda method, target: Stall(60)) as stalling:
            endpoint = stalling.endpoint
            yield Fault(
                5, RegistryUnavailable, (endpoint,), {"mims_endpoint": endpoint}, {"REGISTRAR_MIMS_ENDPOINT": endpoint}
            )
    elif kind == "registry-path-typo":  # a registry's host with a wrong path: 404 for everything
        endpoint = f"{stack.mims_endpoint}/typo"
        yield Fault(
            5,
            RegistrationRejected,
            ("/typo", "base URL"),
            {"mims_endpoint": endpoint},
            {"REGISTRAR_MIMS_ENDPOINT": endpoint},
        )
    elif kind == "signature-rejected":
        with mims_server(stack, signing_secrets={ACCESS_KEY: SecretStr("another-secret")}) as strict:
            yield Fault(
                5,
                RegistrationRejected,
                ("credentials", "model_registration_region", "REGISTRAR_MIMS_SERVICE_NAME"),
                {"mims_endpoint": strict.endpoint},
                {"REGISTRAR_MIMS_ENDPOINT": strict.endpoint},
                registry=strict,
            )
    elif kind == "bucket-missing":
        bucket = f"no-such-preflight-bucket-{secrets.token_hex(4)}"
        yield Fault(4, StorageError, (bucket,), {"s3_bucket": bucket}, {"REGISTRAR_S3_BUCKET": bucket})
    elif kind == "bucket-denied":
        bucket = settings.s3_bucket
        yield Fault(4, StorageError, (bucket, "s3:ListBucket"), s3_rule=deny_head_bucket(bucket))
    elif kind == "no-credentials":
        nowhere = str(tmp_path / "no-such-aws-file")
        yield Fault(
            2,
            ConfigurationError,
            ("credentials",),
            {"aws_access_key_id": None, "aws_secret_access_key": None, "aws_session_token": None},
            {"AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"},
            unset=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"),
        )
    else:  # pragma: no cover
        raise AssertionError(kind)


def cli_env(stack: LocalStack, settings: Settings, job: dict[str, Path], fault: Fault, s3: str) -> dict[str, str]:
    env = environment(
        stack,
        settings,
        job,
        AWS_ENDPOINT_URL_S3=s3,
        REGISTRAR_PREFLIGHT_TIMEOUT=str(PREFLIGHT_TIMEOUT),
        **fault.env,
    )
    for name in fault.unset:
        env.pop(name, None)
    return env


# --- 1. every preflight failure, before any upload: CLI and library -------------------------------


@pytest.mark.parametrize("command", ["register", "check"])
@pytest.mark.parametrize("kind", FAULTS)
async def test_cli_preflight_failure_exits_with_its_code_before_any_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, kind: str, command: str
) -> None:
    """`register` and `check` alike: the documented exit code (2 credentials, 4 bucket, 5 registry),
    within REGISTRAR_PREFLIGHT_TIMEOUT + 15 s, the message naming the cause, and no upload started:
    neither a CreateMultipartUpload nor a PutObject reached S3, no registration was made."""
    job = make_job(tmp_path)
    with arranged(kind, stack, settings, tmp_path) as fault, FaultProxy(stack.s3_endpoint, fault.s3_rule) as proxy:
        env = cli_env(stack, settings, job, fault, proxy.endpoint)
        started = time.monotonic()
        result = run(env, command, timeout=BOUND + 20)
        took = time.monotonic() - started
        registered = fault.registry.registration_count if fault.registry is not None else 0
    assert result.returncode == fault.code, result.stderr
    assert took <= BOUND, f"{command} took {took:.1f} s (bound {BOUND} s)"
    for needle in fault.needles:
        assert needle.lower() in result.stderr.lower(), f"{needle!r} not named:\n{result.stderr}"
    assert uploads(proxy) == [], proxy.seen
    assert registered == 0
    if kind != "bucket-missing":
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("kind", FAULTS)
async def test_library_register_raises_the_preflight_error_before_any_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`Registrar.register` raises ConfigurationError / StorageError / RegistrationRejected /
    RegistryUnavailable (both RegistryErrors) within preflight_timeout + 15 s, naming the cause, and
    S3 saw no upload."""
    job = make_job(tmp_path)
    with arranged(kind, stack, settings, tmp_path) as fault, FaultProxy(stack.s3_endpoint, fault.s3_rule) as proxy:
        for name in fault.unset:
            monkeypatch.delenv(name, raising=False)
        for name, value in fault.env.items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        changed = settings.model_copy(
            update={"s3_endpoint_url": proxy.endpoint, "preflight_timeout": PREFLIGHT_TIMEOUT, **fault.settings}
        )
        started = time.monotonic()
        with pytest.raises(fault.error) as caught:
            async with Registrar(changed) as registrar:
                await registrar.register(request_for(job))
        took = time.monotonic() - started
        registered = fault.registry.registration_count if fault.registry is not None else 0
    assert took <= BOUND, f"register took {took:.1f} s (bound {BOUND} s)"
    if fault.code == 5:
        assert isinstance(caught.value, RegistryError)
    message = described(caught.value).lower()
    for needle in fault.needles:
        assert needle.lower() in message, f"{needle!r} not named: {described(caught.value)}"
    assert uploads(proxy) == [], proxy.seen
    assert registered == 0
    if kind != "bucket-missing":
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("kind", FAULTS)
async def test_library_check_raises_the_same_errors_and_writes_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`Registrar.check` fails the same way as `register`, and never writes to S3."""
    job = make_job(tmp_path)
    with arranged(kind, stack, settings, tmp_path) as fault, FaultProxy(stack.s3_endpoint, fault.s3_rule) as proxy:
        for name in fault.unset:
            monkeypatch.delenv(name, raising=False)
        for name, value in fault.env.items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        changed = settings.model_copy(
            update={"s3_endpoint_url": proxy.endpoint, "preflight_timeout": PREFLIGHT_TIMEOUT, **fault.settings}
        )
        started = time.monotonic()
        with pytest.raises(fault.error):
            async with Registrar(changed) as registrar:
                await registrar.check(request_for(job))
        took = time.monotonic() - started
    assert took <= BOUND, f"check took {took:.1f} s (bound {BOUND} s)"
    assert writes(proxy) == [], proxy.seen


async def test_a_registry_that_comes_up_within_the_preflight_timeout_is_waited_for(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Refused connections are retried with backoff: a registry that starts listening well into the
    preflight (it was down when the run began) is reached, and the registration goes through."""
    port = free_port()
    late = ThreadedMimsServer(mims_settings(stack), port=port)
    up_at: list[float] = []

    def come_up() -> None:
        late.start()
        up_at.append(time.monotonic())

    changed = settings.model_copy(update={"mims_endpoint": f"http://127.0.0.1:{port}", "preflight_timeout": 8.0})
    starter = threading.Timer(1.5, come_up)
    try:
        async with Registrar(changed) as registrar:
            began = time.monotonic()
            starter.start()
            result = await registrar.register(request_for(make_job(tmp_path)))
    finally:
        starter.join()
        late.stop()
    assert up_at, "the registry did not start"
    assert up_at[0] - began >= 1.4  # down for that long after the run began
    assert result.model_id.startswith("model-")
    assert result.timings["preflight"] >= 1.0
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- 2. `async-registrar check` on the example job --------------------------------------------------


async def test_cli_check_prints_the_plan_and_writes_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Exit 0; the plan names the model and payload, their bytes, the part size, the temporary
    prefix, the registry endpoint and resumability; S3 saw no write, the registry no submission,
    and nothing is under the prefix."""
    job = make_job(tmp_path)
    _, model_bytes = sizes_of(job["model"])
    with (
        FaultProxy(stack.s3_endpoint, forward) as s3_proxy,
        mims_server(stack) as registry,
        FaultProxy(registry.endpoint, forward) as registry_proxy,
    ):
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=s3_proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry_proxy.endpoint,
            REGISTRAR_PREFLIGHT_TIMEOUT=str(PREFLIGHT_TIMEOUT),
            MODS_WORKFLOW_EXECUTION_ID="wf-preflight-cli",
        )
        result = run(env, "check", timeout=60)
        assert registry.registration_count == 0
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model" in out
    assert "payload" in out
    assert mentions_size(out, model_bytes), f"the model's {model_bytes} bytes are not shown:\n{out}"
    assert mentions_size(out, settings.part_size), f"the part size {settings.part_size} is not shown:\n{out}"
    assert f"s3://{settings.s3_bucket}/{settings.s3_prefix}" in out
    assert registry_proxy.endpoint in out
    assert "resumable" in out.lower()
    assert writes(s3_proxy) == [], s3_proxy.seen
    assert [t for m, t in registry_proxy.seen if m == "POST"] == []
    assert registry_proxy.count("GET", REGISTRATIONS + "/") >= 1  # the preflight
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("broken", ["empty-model", "invalid-config"])
def test_cli_check_exits_as_register_does_on_bad_inputs(
    tmp_path: Path, stack: LocalStack, settings: Settings, broken: str
) -> None:
    """`check` validates as `register` does: an empty model directory is 3, a bad configuration 2."""
    if broken == "invalid-config":
        job = make_job(tmp_path, config=registration_config(model_domain=7))
        expected = 2
    else:
        job = make_job(tmp_path)
        job["model"] = tmp_path / "empty-model"
        job["model"].mkdir()
        expected = 3
    with FaultProxy(stack.s3_endpoint, forward) as proxy:
        result = run(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint), "check", timeout=60)
    assert result.returncode == expected, result.stderr
    assert writes(proxy) == []


# --- 3. the library's plan -------------------------------------------------------------------------


@pytest.mark.parametrize("lineage", [None, "wf-preflight-plan"])
async def test_library_check_returns_a_consistent_plan(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, lineage: str | None
) -> None:
    """The plan's numbers add up: content bytes and file counts are the inputs', enough parts of
    part_size for the archive's size bound (and not one more), memory for at least a part; one
    region with its bucket, an s3:// prefix under the configured one and the registry endpoint;
    resumable exactly when there is a lineage id; the preflight's time; nothing written."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    with FaultProxy(stack.s3_endpoint, forward) as proxy:
        changed = settings.model_copy(update={"s3_endpoint_url": proxy.endpoint})
        async with Registrar(changed) as registrar:
            plan = await registrar.check(request_for(job, workflow_execution_id=lineage))
    assert isinstance(plan, RegistrationPlan)
    assert [a.name for a in plan.artifacts] == ["model", "payload"]
    for artifact in plan.artifacts:
        files, content = sizes_of(job[artifact.name])
        assert Path(artifact.path) == job[artifact.name]
        assert artifact.kind == "directory"
        assert artifact.files == files, artifact
        assert artifact.content_bytes == content, artifact
        assert artifact.size_bound >= artifact.content_bytes, artifact
        assert artifact.part_size >= 5 * MiB, artifact
        assert artifact.parts >= 1, artifact
        assert artifact.parts * artifact.part_size >= artifact.size_bound, artifact
        assert (artifact.parts - 1) * artifact.part_size < artifact.size_bound, artifact
        assert artifact.memory_bytes >= artifact.part_size, artifact
    model = plan.artifacts[0]
    assert model.part_size == settings.part_size
    assert model.parts >= 3  # 12 MiB of random weights and more, in 5 MiB parts
    (region,) = plan.regions
    assert region.region == REGION
    assert region.bucket == settings.s3_bucket
    assert region.prefix.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}")
    assert region.endpoint == settings.mims_endpoint
    assert plan.lineage_id == lineage
    assert plan.resumable is (lineage is not None)
    assert plan.timings["preflight"] > 0
    lines = list(plan.lines())
    assert lines
    assert all(isinstance(line, str) for line in lines)
    shown = "\n".join(lines)
    assert region.prefix in shown
    assert settings.mims_endpoint in shown
    assert writes(proxy) == [], proxy.seen
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_library_check_plans_a_prebuilt_archive(tmp_path: Path, settings: Settings) -> None:
    """A model directory holding one .tar.gz is planned as 'prebuilt', bounded by the file's size;
    a missing payload directory means no payload in the plan."""
    job = make_job(tmp_path)
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    archive = prebuilt / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(job["model"], arcname=".")
    request = RegistrationRequest(
        config=request_for(job).config, model_path=prebuilt, payload_path=tmp_path / "no-payload"
    )
    async with Registrar(settings) as registrar:
        plan = await registrar.check(request)
    (model,) = plan.artifacts
    assert (model.name, model.kind) == ("model", "prebuilt")
    assert model.size_bound >= os.path.getsize(archive)
    assert model.parts * model.part_size >= model.size_bound
    assert plan.resumable is False


# --- 4. a successful registration runs the preflight first ----------------------------------------


async def test_register_runs_the_preflight_before_the_first_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """timings["preflight"] > 0; the registry saw a signed GET of a registration id it never made
    before the submission, S3 saw HeadBucket, and both came before the first upload request."""
    traffic = Traffic()
    bucket = settings.s3_bucket
    with (
        FaultProxy(stack.s3_endpoint, traffic.rule("s3")) as s3_proxy,
        mims_server(stack) as registry,
        FaultProxy(registry.endpoint, traffic.rule("mims")) as registry_proxy,
    ):
        changed = settings.model_copy(
            update={"s3_endpoint_url": s3_proxy.endpoint, "mims_endpoint": registry_proxy.endpoint}
        )
        async with Registrar(changed) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path)))
        assert registry.registration_count == 1
    assert result.timings["preflight"] > 0
    probe = traffic.first("mims", "GET", rf"^{REGISTRATIONS}/[^/?]+")
    assert probe >= 0, traffic.log
    probed_id = traffic.log[probe][2].split("?", 1)[0].rsplit("/", 1)[1]
    assert probed_id != result.registration_id
    submission = traffic.first("mims", "POST", rf"^{REGISTRATIONS}/?$")
    head = next((i for i, (lab, m, t) in enumerate(traffic.log) if lab == "s3" and is_head_bucket(bucket, m, t)), -1)
    first_upload = next(
        i
        for i, (lab, m, t) in enumerate(traffic.log)
        if lab == "s3" and (m == "PUT" or (m == "POST" and re.search(r"[?&]uploads(=|&|$)", t)))
    )
    assert 0 <= head < first_upload, traffic.log
    assert probe < first_upload < submission, traffic.log
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_preflight_false_turns_it_off(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """preflight=False: the first request the registry sees is the submission."""
    with mims_server(stack) as registry, FaultProxy(registry.endpoint, forward) as registry_proxy:
        changed = settings.model_copy(update={"mims_endpoint": registry_proxy.endpoint, "preflight": False})
        async with Registrar(changed) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path)))
    assert result.model_id.startswith("model-")
    assert registry_proxy.seen, "the registry saw nothing"
    assert registry_proxy.seen[0][0] == "POST", registry_proxy.seen
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cli_registrar_preflight_false_uploads_before_the_registry_rejects(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """REGISTRAR_PREFLIGHT=false: a registry that rejects our signature is found out only at the
    submission, after the upload (still exit 5, and cleaned up)."""
    job = make_job(tmp_path)
    with (
        mims_server(stack, signing_secrets={ACCESS_KEY: SecretStr("another-secret")}) as strict,
        FaultProxy(stack.s3_endpoint, forward) as proxy,
    ):
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=strict.endpoint,
            REGISTRAR_PREFLIGHT="false",
        )
        result = run(env, "register", timeout=60)
    assert result.returncode == 5, result.stderr
    assert uploads(proxy) != []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- 5. several regions ------------------------------------------------------------------------------


async def create_bucket(regional_s3: dict[str, Any], region: str, bucket: str) -> None:
    await regional_s3[region].create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})


REGIONS = ["us-west-2", "eu-west-1"]


async def test_library_one_regions_bucket_missing_fails_before_any_upload_anywhere(
    tmp_path: Path, stack: LocalStack, settings: Settings, regional_s3: dict[str, Any]
) -> None:
    """Two regions, eu-west-1's bucket missing: StorageError naming it, and no upload to either region
    (us-west-2's bucket is there and stays empty); `check` says the same."""
    template = f"pf-{secrets.token_hex(4)}-{{region}}"
    present, missing = template.format(region="us-west-2"), template.format(region="eu-west-1")
    await create_bucket(regional_s3, "us-west-2", present)
    try:
        job = make_job(tmp_path, config=registration_config(model_registration_region=REGIONS))
        with FaultProxy(stack.s3_endpoint, forward) as proxy:
            changed = settings.model_copy(update={"s3_bucket": template, "s3_endpoint_url": proxy.endpoint})
            async with Registrar(changed) as registrar:
                with pytest.raises(StorageError) as caught:
                    await registrar.register(request_for(job))
                with pytest.raises(StorageError):
                    await registrar.check(request_for(job))
        assert missing in described(caught.value)
        assert uploads(proxy) == [], proxy.seen
        assert await leftovers(regional_s3["us-west-2"], present, "") == []
    finally:
        await regional_s3["us-west-2"].delete_bucket(Bucket=present)


@pytest.mark.parametrize("command", ["register", "check"])
async def test_cli_one_regions_bucket_missing_exits_4_before_any_upload_anywhere(
    tmp_path: Path, stack: LocalStack, settings: Settings, regional_s3: dict[str, Any], command: str
) -> None:
    """The same from the command line: exit 4 naming the missing bucket, no upload in any region."""
    template = f"pf-{secrets.token_hex(4)}-{{region}}"
    present, missing = template.format(region="us-west-2"), template.format(region="eu-west-1")
    await create_bucket(regional_s3, "us-west-2", present)
    try:
        job = make_job(tmp_path, config=registration_config(model_registration_region=REGIONS))
        with FaultProxy(stack.s3_endpoint, forward) as proxy:
            env = environment(
                stack,
                settings,
                job,
                AWS_ENDPOINT_URL_S3=proxy.endpoint,
                REGISTRAR_S3_BUCKET=template,
                REGISTRAR_PREFLIGHT_TIMEOUT=str(PREFLIGHT_TIMEOUT),
            )
            started = time.monotonic()
            result = run(env, command, timeout=BOUND + 20)
            took = time.monotonic() - started
        assert result.returncode == 4, result.stderr
        assert took <= BOUND
        assert missing in result.stderr
        assert uploads(proxy) == [], proxy.seen
        assert await leftovers(regional_s3["us-west-2"], present, "") == []
    finally:
        await regional_s3["us-west-2"].delete_bucket(Bucket=present)


async def test_library_check_plans_every_region_concurrently(
    tmp_path: Path, stack: LocalStack, settings: Settings, regional_s3: dict[str, Any]
) -> None:
    """Two regions: one RegionPlan each (its bucket, prefix and endpoint); each HeadBucket is held
    unanswered until both have reached S3: the regions are checked at once (one after the other,
    the second would never come while the first waits for its answer)."""
    buckets = {region: f"registrar-mr-{region}" for region in REGIONS}
    release = threading.Event()
    heads: set[str] = set()  # the buckets whose HeadBucket reached S3 (held)

    def held_heads(method: str, target: str) -> object:
        for bucket in buckets.values():
            if is_head_bucket(bucket, method, target):
                heads.add(bucket)
                return Hold(release)
        return None

    job = make_job(tmp_path, config=registration_config(model_registration_region=REGIONS))
    plans: list[RegistrationPlan] = []
    with FaultProxy(stack.s3_endpoint, held_heads) as proxy:
        changed = settings.model_copy(update={"s3_bucket": "registrar-mr-{region}", "s3_endpoint_url": proxy.endpoint})
        async with Registrar(changed) as registrar:

            async def check() -> None:
                plans.append(await registrar.check(request_for(job)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(check)
                try:
                    # A hang guard: both come within moments; checked one after the other, the
                    # second never comes (the first is held), and this fails.
                    with anyio.fail_after(20):
                        while heads != set(buckets.values()):
                            await anyio.sleep(0.01)
                finally:
                    release.set()
    (plan,) = plans
    assert sorted(r.region for r in plan.regions) == sorted(REGIONS)
    for planned in plan.regions:
        assert planned.bucket == buckets[planned.region]
        assert planned.prefix.startswith(f"s3://{buckets[planned.region]}/{settings.s3_prefix}")
        assert planned.endpoint == settings.mims_endpoint
    assert "preflight" in plan.timings, plan.timings
    assert writes(proxy) == []
    for region in REGIONS:
        assert await leftovers(regional_s3[region], buckets[region], settings.s3_prefix) == []


def test_the_plan_and_errors_are_public() -> None:
    """RegistrationPlan is exported; the preflight's registry errors are RegistryErrors."""
    import async_registrar

    assert "RegistrationPlan" in async_registrar.__all__
    assert issubclass(RegistrationRejected, RegistryError)
    assert issubclass(RegistryUnavailable, RegistryError)
