"""Settings: how the registrar reaches S3 and the registry, and how hard it pushes.

`Settings` is a plain immutable object; the library never reads the
environment on its own.  `Settings.from_env()` is the one place that maps
environment variables (and command-line overrides) onto it, for the CLI and
for callers who want the same behaviour.  `JobInputs` does the same for the
container paths of one registration job.
"""

from __future__ import annotations

import contextvars
import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ._checksums import ChecksumAlgorithm, crc64nvme_available
from ._config import describe_validation_errors
from ._errors import ConfigurationError, redact
from ._mims_contract import idempotency_key_problem, unsafe_key

__all__ = ["JobInputs", "Settings", "describe_field", "describe_source", "environment_value"]

M = TypeVar("M", bound=BaseModel)

MiB = 1024 * 1024
#: S3's bounds on a multipart upload's parts.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000


def _cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) < 10:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


def _prefix(value: str) -> str:
    value = value.lstrip("/")
    # Runs need a prefix of their own: at the bucket root, `sweep` (which would judge the
    # whole bucket) and the lifecycle rule (which would expire it) must refuse it, so what a
    # killed run left there could be removed only by hand.  Refused here, before any upload.
    if not value:
        raise ValueError(
            "is empty (or only '/'): the runs need a prefix of their own, which sweep and the lifecycle "
            "rule can clean without touching the rest of the bucket; give one such as 'registrar-tmp/' "
            "(the default)"
        )
    value = value if value.endswith("/") else value + "/"
    # The registry takes only plain keys: found here, not after the whole upload.
    if unsafe_key(value.removesuffix("/")):
        raise ValueError(
            f"{value!r} has an empty, '.' or '..' segment, which the registry refuses in a key; "
            "use plain names separated by single slashes, such as 'registrar-tmp/'"
        )
    return value


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _bucket_template(value: str) -> str:
    """A bucket name, which may hold `{region}` (filled per region)."""
    if not _BUCKET.fullmatch(value.replace("{region}", "us-east-1")):
        raise ValueError("must be an S3 bucket name (3-63 of a-z 0-9 . -), optionally with {region} in it")
    return value


def _header_value(value: str) -> str:
    problem = idempotency_key_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: An `s3://bucket/key` URI of an object, as the settings take it (the bucket's name is checked
#: where it is used).
_S3_OBJECT_URI = re.compile(r"s3://[^/\s]+/\S.*")


def _s3_object_uri(value: str) -> str:
    if not _S3_OBJECT_URI.fullmatch(value):
        raise ValueError(
            "must be the s3:// URI of a JSON object (s3://bucket/key); a local file goes in "
            "--metadata / REGISTRAR_METADATA_PATH"
        )
    return value


def _input_path(value: object) -> object:
    """An `s3://` URI of a prebuilt .tar.gz, as it is, or a local path: a string that begins
    like a URI (`s3:/` too) is never taken for a path (`s3://bucket/` would be `s3:/bucket`)."""
    if not isinstance(value, str):
        return value
    if not value.startswith("s3:/"):
        return Path(value)
    if not _S3_OBJECT_URI.fullmatch(value):
        raise ValueError("must be s3://bucket/key of a prebuilt .tar.gz, or a local path")
    return value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _computable(value: ChecksumAlgorithm) -> ChecksumAlgorithm:
    if value == "CRC64NVME" and not crc64nvme_available():
        raise ValueError("CRC64NVME needs the AWS CRT: install async-registrar[crt], or use CRC32")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
BucketName = Annotated[str, AfterValidator(_bucket_template)]
PartSize = Annotated[ByteSize, Field(ge=MIN_PART_SIZE, le=MAX_PART_SIZE)]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]


class Settings(BaseModel):
    """Where temporary artifacts go, which registry to use, and the tuning knobs.

    Only `s3_bucket` is required, and `mims_endpoint` to register or sweep (an upload alone,
    `Registrar.upload`, needs no registry).  Explicit AWS credentials are optional: without
    them the standard AWS credential chain is used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: May hold `{region}`: one bucket per region for multi-region registrations.
    s3_bucket: BucketName
    #: May hold `{region}`: one endpoint per region.  Needed to register or sweep.
    mims_endpoint: HttpUrl | None = None
    s3_prefix: Annotated[str, AfterValidator(_prefix), StringConstraints(max_length=512)] = "registrar-tmp/"
    wait_timeout: Seconds = 3600.0

    # How S3 is reached.
    aws_region: Annotated[str, StringConstraints(pattern=r"^[a-z]{2,4}(-[a-z]+)+-[0-9]{1,2}$")] | None = None
    s3_endpoint_url: HttpUrl | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    s3_checksums: Literal["when_supported", "when_required"] = "when_supported"
    #: What S3 checks each part with: CRC32, or CRC64NVME, which S3 also checks over the
    #: whole object at completion (AWS S3 has it; needs `async-registrar[crt]`).
    s3_checksum_algorithm: Annotated[ChecksumAlgorithm, BeforeValidator(_upper), AfterValidator(_computable)] = "CRC32"

    # The upload engine.  Defaults chosen with `scripts/bench` (1 GiB float32 directory, two
    # cores): 16 MiB parts cost ~0.3 CPU-s per GiB less than 8 MiB (botocore spends a few ms
    # on each request) for ~30 MiB more memory; one part queued is as fast as two.
    part_size: PartSize = ByteSize(16 * MiB)
    upload_queue_parts: Annotated[int, Field(ge=1, le=64)] = 1
    #: Artifacts a registrar uploads at once, across all its registrations (memory is
    #: about this many times one upload's); the other registrations wait their turn.
    max_parallel_uploads: Annotated[int, Field(ge=1, le=256)] = 4
    #: The part buffers of all a registrar's uploads together (an upload with parts larger
    #: than this still runs, alone): see `_budget`.
    memory_limit: Annotated[ByteSize, Field(ge=16 * MiB)] = ByteSize(512 * MiB)
    compression_level: Annotated[int, Field(ge=0, le=3)] = 1
    #: Percent a 1 MiB block must save to be compressed, judged on its first 64 KiB; the
    #: rest of a block that saves less is stored.  Float32/float16 weights save ~8 % for
    #: ~1.3 CPU-s per GiB, bfloat16 ~22 %, text far more.  0 compresses everything (for a
    #: network much slower than the gzip threads, where every byte saved counts).
    compression_min_saving: Annotated[int, Field(ge=0, le=99)] = 10
    #: Gzip threads: one core is left for reading, hashing and the event loop (on two
    #: cores, one gzip thread is measurably faster than two), at most 4.
    compression_threads: Annotated[int, Field(ge=1, le=64)] = Field(default_factory=lambda: min(4, max(1, _cpus() - 1)))
    #: Parts in flight per upload; by default enough to carry what the gzip threads
    #: produce (1 + 2 per thread: 3 on two cores, 9 from five cores up).  More costs
    #: memory and, measured on two cores, CPU on both ends without adding speed.
    upload_concurrency: Annotated[int, Field(ge=1, le=64)] = Field(
        default_factory=lambda data: 1 + 2 * data["compression_threads"]
    )
    archive_mtime: Annotated[int, Field(ge=0, lt=2**33)] = 315532800  # 1980-01-01T00:00:00Z
    #: Read a prebuilt archive as tar.gz while it uploads (corrupt, truncated or unsafe: exit 3).
    #: Inflating costs about 4 CPU-seconds per GiB of weights; the registry checks it again.
    check_prebuilt: bool = True
    #: Follow symbolic links (archive the target's bytes under the link's name) and archive
    #: hard-linked files as regular files: Hugging Face caches, DVC caches, `cp -al` trees.
    dereference: bool = False

    # The registry client.
    mims_service_name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")] = "mims"
    mims_request_timeout: Seconds = 30.0
    submit_timeout: Seconds = 300.0
    #: The first poll comes this long after the registry accepted; then the wait doubles
    #: (with jitter) up to `poll_max`.
    poll_initial: Seconds = 0.25
    poll_max: Seconds = 30.0

    @field_validator("poll_max")
    @classmethod
    def _not_below_poll_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("poll_initial")
        if initial is not None and value < initial:
            raise ValueError(f"must be at least the first poll's delay, poll_initial ({initial:g} s)")
        return value

    #: Before anything is uploaded: check the credentials, every bucket and every registry
    #: endpoint (a signed GET of a registration that cannot exist must be a 404).
    preflight: bool = True
    #: How long the preflight retries an endpoint that does not answer.
    preflight_timeout: Seconds = 30.0

    # Cleanup, which must finish inside a container's grace period.
    cleanup_timeout: Seconds = 25.0
    #: Before a registrar's first registration, sweep runs older than a day under the prefix
    #: (see `Registrar.sweep`): a fleet of jobs keeps its bucket clean without a schedule.
    sweep_on_start: bool = False

    def __init__(self, **values: Any) -> None:
        """Validate `values`; raise `ConfigurationError` listing every problem (as `from_env` does)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _configuration_error(type(self), exc, _describe.get()) from None

    def bucket_for(self, region: str) -> str:
        """The temporary bucket for `region`."""
        return self.s3_bucket.replace("{region}", region)

    def endpoint_for(self, region: str) -> str:
        """The MIMS endpoint for `region`."""
        return self.require_registry().replace("{region}", region)

    def require_registry(self) -> str:
        """`mims_endpoint`; raise `ConfigurationError` if it is not set."""
        if self.mims_endpoint is None:
            raise ConfigurationError(
                "invalid settings; fix each and run again:",
                [f"{_describe.get()('mims_endpoint')}: required to register or sweep (an upload alone needs none)"],
            )
        return self.mims_endpoint

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, registry: bool = True, **overrides: Any) -> Settings:
        """Build settings from environment variables, with keyword overrides taking precedence.

        `registry=False` for an upload alone: then no MIMS endpoint is needed.  Raises
        `ConfigurationError` naming each bad variable (every one at once).
        """
        values = _gather(_ENVIRONMENT, environ, overrides)
        missing = []
        if registry and "mims_endpoint" not in values:
            missing = [f"{describe_field('mims_endpoint')}: required field is missing"]
        settings: Settings | None = None
        found: tuple[str, ...] = ()
        try:
            settings = _validate(cls, values, describe_field)
        except ConfigurationError as exc:
            found = exc.problems
        bucket = 1 if found and found[0].startswith(describe_field("s3_bucket")) else 0
        problems = [*found[:bucket], *missing, *found[bucket:], *unknown_variables(environ)]
        if problems or settings is None:
            raise ConfigurationError("invalid settings; fix each and run again:", problems)
        return settings


#: Each setting's environment variables, first match wins.
_ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "s3_bucket": ("REGISTRAR_S3_BUCKET",),
    "s3_prefix": ("REGISTRAR_S3_PREFIX",),
    "mims_endpoint": ("REGISTRAR_MIMS_ENDPOINT",),
    "wait_timeout": ("REGISTRAR_WAIT_TIMEOUT",),
    "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "s3_endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_checksums": ("REGISTRAR_S3_CHECKSUMS",),
    "s3_checksum_algorithm": ("REGISTRAR_S3_CHECKSUM_ALGORITHM",),
    "part_size": ("REGISTRAR_PART_SIZE",),
    "upload_concurrency": ("REGISTRAR_UPLOAD_CONCURRENCY",),
    "upload_queue_parts": ("REGISTRAR_UPLOAD_QUEUE_PARTS",),
    "max_parallel_uploads": ("REGISTRAR_MAX_PARALLEL_UPLOADS",),
    "memory_limit": ("REGISTRAR_MEMORY_LIMIT",),
    "compression_level": ("REGISTRAR_COMPRESSION_LEVEL",),
    "compression_min_saving": ("REGISTRAR_COMPRESSION_MIN_SAVING",),
    "compression_threads": ("REGISTRAR_COMPRESSION_THREADS",),
    "archive_mtime": ("SOURCE_DATE_EPOCH",),
    "check_prebuilt": ("REGISTRAR_CHECK_PREBUILT",),
    "dereference": ("REGISTRAR_DEREFERENCE",),
    "mims_service_name": ("REGISTRAR_MIMS_SERVICE_NAME",),
    "mims_request_timeout": ("REGISTRAR_MIMS_REQUEST_TIMEOUT",),
    "submit_timeout": ("REGISTRAR_SUBMIT_TIMEOUT",),
    "poll_initial": ("REGISTRAR_POLL_INITIAL",),
    "poll_max": ("REGISTRAR_POLL_MAX",),
    "preflight": ("REGISTRAR_PREFLIGHT",),
    "preflight_timeout": ("REGISTRAR_PREFLIGHT_TIMEOUT",),
    "cleanup_timeout": ("REGISTRAR_CLEANUP_TIMEOUT",),
    "sweep_on_start": ("REGISTRAR_SWEEP_ON_START",),
}

#: The command-line option of a setting or input, where it has one.
OPTIONS: dict[str, str] = {
    "s3_bucket": "--bucket",
    "s3_prefix": "--prefix",
    "mims_endpoint": "--mims-endpoint",
    "wait_timeout": "--wait-timeout",
    "dereference": "--dereference",
    "model_path": "--model",
    "model_local_copy": "--model-local-copy",
    "payload_path": "--payload",
    "config_path": "--config",
    "metadata_path": "--metadata",
}


#: Variables of ours that the command line reads itself (not settings nor job inputs).
_COMMAND_LINE_ENVIRONMENT = ("REGISTRAR_LOG_LEVEL", "REGISTRAR_LOG_FORMAT", "REGISTRAR_OUTPUT_DIR")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A problem for each `REGISTRAR_*` variable that names nothing (a typo would otherwise be
    ignored without a word, and its setting left at the default), with the closest name."""
    env = os.environ if environ is None else environ
    known = {name for names in (*_ENVIRONMENT.values(), *_JOB_ENVIRONMENT.values()) for name in names}
    known.update(_COMMAND_LINE_ENVIRONMENT)
    problems = []
    for name in sorted(n for n in env if n.startswith("REGISTRAR_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"did you mean {close[0]}?" if close else "the README lists the variables"
        problems.append(f"{name}: not a variable of async-registrar ({hint}); rename or unset it")
    return problems


def environment_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """One environment variable, for the CLI's own options (such as the log level)."""
    env = os.environ if environ is None else environ
    return env.get(name) or None


#: The proxy variables httpx reads for the registry client (NO_PROXY last: it sends through none).
PROXY_ENVIRONMENT = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
#: Every variable httpx reads for the registry client: its proxies, and the CA bundle it trusts.
HTTP_CLIENT_ENVIRONMENT = (*PROXY_ENVIRONMENT, "NO_PROXY", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")


def http_client_environment(
    names: Sequence[str] = HTTP_CLIENT_ENVIRONMENT, environ: Mapping[str, str] | None = None
) -> list[str]:
    """`NAME=value` for each of `names` that is set (credentials in a proxy URL removed), for
    messages about the registry client."""
    env = os.environ if environ is None else environ
    return [f"{name}={redact(env[name])}" for name in names if env.get(name)]


def describe_source(field: str) -> str:
    """The environment variable(s) of a setting or job input, for help texts."""
    return " or ".join(_ENVIRONMENT.get(field, ()) or _JOB_ENVIRONMENT.get(field, ()))


def describe_field(field: str) -> str:
    """How a message names a setting or job input: its option (if any) and its variables."""
    names = [OPTIONS[field]] if field in OPTIONS else []
    names += _ENVIRONMENT.get(field, ()) or _JOB_ENVIRONMENT.get(field, ())
    return " / ".join(names) if names else field


class JobInputs(BaseModel):
    """The inputs of one registration job: where its files are, and its lineage.

    The defaults are the SageMaker Processing container paths of the original.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A local directory (or one holding a .tar.gz), or the `s3://` URI of a prebuilt .tar.gz.
    model_path: Annotated[str | Path, BeforeValidator(_input_path)] = Path("/opt/ml/processing/input/model")
    #: A local copy of a model given by its `s3://` URI (a mounted file, or a directory
    #: holding it): its sha256 is read from here instead of from S3.
    model_local_copy: Path | None = None
    payload_path: Annotated[str | Path, BeforeValidator(_input_path)] = Path("/opt/ml/processing/mims_payload")
    config_path: Path = Path("/opt/ml/processing/config/config")
    metadata_path: Path = Path("/opt/ml/processing/input/metadata")
    #: An `s3://` URI of a JSON performance-metadata object (PERFORMANCE_METADATA_PATH).
    performance_metadata_uri: Annotated[str, AfterValidator(_s3_object_uri)] | None = None
    workflow_execution_id: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    #: One logical registration's key, when the caller manages retries itself.
    idempotency_key: Annotated[str, AfterValidator(_header_value)] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> JobInputs:
        """Build the job inputs from environment variables, with keyword overrides taking precedence."""
        return _validate(cls, _gather(_JOB_ENVIRONMENT, environ, overrides), describe_field)


_JOB_ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "model_path": ("REGISTRAR_MODEL_PATH",),
    "model_local_copy": ("REGISTRAR_MODEL_LOCAL_COPY",),
    "payload_path": ("REGISTRAR_PAYLOAD_PATH",),
    "config_path": ("REGISTRAR_CONFIG_PATH",),
    "metadata_path": ("REGISTRAR_METADATA_PATH",),
    "performance_metadata_uri": ("PERFORMANCE_METADATA_PATH",),
    "workflow_execution_id": ("MODS_WORKFLOW_EXECUTION_ID",),
    "idempotency_key": ("REGISTRAR_IDEMPOTENCY_KEY",),
}


def _gather(
    variables: Mapping[str, tuple[str, ...]], environ: Mapping[str, str] | None, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Field values from the first set variable of each field, then the overrides that are not None."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field, names in variables.items():
        value = next((env[name] for name in names if env.get(name)), None)
        if value is not None:
            values[field] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


#: How a problem names its field: by the field's name, or (from the environment) by its
#: option and variables.  pydantic runs a model's own `__init__` from `model_validate` too.
_describe: contextvars.ContextVar[Callable[[str], str]] = contextvars.ContextVar("describe", default=str)


def _validate(model: type[M], values: dict[str, Any], describe: Callable[[str], str]) -> M:
    token = _describe.set(describe)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _configuration_error(model, exc, describe) from None
    finally:
        _describe.reset(token)


def _configuration_error(
    model: type[BaseModel], exc: ValidationError, describe: Callable[[str], str]
) -> ConfigurationError:
    problems = []
    for line in describe_validation_errors(exc, known=list(model.model_fields)):
        field, _, rest = line.partition(":")
        base = field.split("[", 1)[0]
        problems.append(f"{describe(base)}:{rest}" if base in model.model_fields else line)
    return ConfigurationError("invalid settings; fix each and run again:", problems)
