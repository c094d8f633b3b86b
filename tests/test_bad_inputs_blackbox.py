"""Black-box: bad input a real user gets wrong, through the CLI as a subprocess.

The promise under test (README, docs/faults.md): "Bad input gets a clear error that names the
file, field or key and what to do, and a documented exit code; nothing is left in S3."

Every case runs `.venv/bin/async-registrar` (`register`, `check`, `upload` or `sweep`) against
the session's moto S3 server and reference MIMS on loopback, and asserts:

- the exit code the README documents for the class of the fault (2 usage/configuration,
  3 input artifacts or metadata, 4 storage, 5 registry);
- stderr names the offending file, field, key, variable or URL (loosely: the name appears),
  with an `error:` message, and no Python traceback;
- stdout stays empty (it is kept for the two lines of a success);
- nothing is left under the test's prefix: no object and no open multipart upload.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack

from .conftest import ROOT, environment, leftovers, make_job, tar_gz
from .fault_proxy import FaultProxy, Late, Reply, s3_error

CLI = ROOT / ".venv" / "bin" / "async-registrar"
EXE = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "async_registrar"]

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 130, 143}


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Ctx:
    """What a case builds its inputs from."""

    tmp: Path
    job: dict[str, Path]
    stack: LocalStack
    settings: Settings
    env: dict[str, str]
    #: Extra things to enter for the run (a proxy), set by a case.
    proxies: list[Any] = field(default_factory=list)

    def uri(self, name: str) -> str:
        return f"s3://{self.settings.s3_bucket}/{self.settings.s3_prefix}{name}"


#: A case builds (argv, env changes; None removes a variable) and returns the names stderr must carry.
Build = Callable[[Ctx], tuple[list[str], dict[str, str | None], list[str]]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_dir(ctx: Ctx, name: str, files: dict[str, bytes]) -> Path:
    path = ctx.tmp / name
    path.mkdir()
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    return path


# --- the model and payload inputs: exit 3 -------------------------------------------------------


def model_missing(ctx: Ctx) -> Any:
    path = ctx.tmp / "no-such-model"
    return ["register", "--model", str(path)], {}, [str(path), "--model"]


def model_is_a_file(ctx: Ctx) -> Any:
    path = ctx.tmp / "model.bin"
    path.write_bytes(b"weights")
    return ["register", "--model", str(path)], {}, [str(path)]


def model_empty(ctx: Ctx) -> Any:
    path = model_dir(ctx, "empty", {})
    return ["register", "--model", str(path)], {}, [str(path)]


def model_only_directories(ctx: Ctx) -> Any:
    path = ctx.tmp / "dirs-only"
    (path / "a" / "b").mkdir(parents=True)
    return ["register", "--model", str(path)], {}, [str(path)]


def model_gzip_not_tar(ctx: Ctx) -> Any:
    path = model_dir(ctx, "gz-not-tar", {"model.tar.gz": gzip.compress(os.urandom(300_000))})
    return ["register", "--model", str(path)], {}, [str(path / "model.tar.gz")]


def model_named_tar_gz_not_gzip(ctx: Ctx) -> Any:
    """One file named model.tar.gz that is not gzip. The README says the single file is "checked by
    its bytes, not its name" (so a plain file to archive); docs/faults.md lists a prebuilt
    `.tar.gz` that is "not gzip" as exit 3, which is what happens."""
    path = model_dir(ctx, "not-gzip", {"model.tar.gz": b"this is not gzip at all\n" * 100})
    return ["register", "--model", str(path)], {}, [str(path / "model.tar.gz")]


def model_truncated_tar_gz(ctx: Ctx) -> Any:
    whole = tar_gz({"weights.bin": os.urandom(3 * 1024 * 1024)})
    path = model_dir(ctx, "truncated", {"model.tar.gz": whole[: len(whole) // 2]})
    return ["register", "--model", str(path)], {}, [str(path / "model.tar.gz")]


def model_corrupt_tar_gz(ctx: Ctx) -> Any:
    whole = bytearray(tar_gz({"weights.bin": os.urandom(2 * 1024 * 1024)}))
    whole[len(whole) // 2 : len(whole) // 2 + 64] = b"\0" * 64
    path = model_dir(ctx, "corrupt", {"model.tar.gz": bytes(whole)})
    return ["register", "--model", str(path)], {}, [str(path / "model.tar.gz")]


def model_tar_gz_escaping(ctx: Ctx) -> Any:
    path = model_dir(ctx, "escaping", {"model.tar.gz": tar_gz({"../../etc/evil": b"x"})})
    return ["register", "--model", str(path)], {}, [str(path / "model.tar.gz"), "../../etc/evil"]


def model_symlink_outside(ctx: Ctx) -> Any:
    (ctx.job["model"] / "outside").symlink_to("/etc/passwd")
    return ["register"], {}, ["outside", "--dereference"]


def model_dangling_symlink_dereferenced(ctx: Ctx) -> Any:
    (ctx.job["model"] / "dangling").symlink_to(ctx.tmp / "nowhere")
    return ["register", "--dereference"], {}, ["dangling"]


def model_fifo(ctx: Ctx) -> Any:
    os.mkfifo(ctx.job["model"] / "pipe")
    return ["register"], {}, ["pipe"]


def model_unreadable_file(ctx: Ctx) -> Any:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop reads")
    secret = ctx.job["model"] / "secret.bin"
    secret.write_bytes(b"x" * 1000)
    secret.chmod(0)
    return ["register"], {}, ["secret.bin"]


def model_control_character_name(ctx: Ctx) -> Any:
    (ctx.job["model"] / "bad\nname.txt").write_bytes(b"x")
    return ["register"], {}, ["bad"]


def payload_missing(ctx: Ctx) -> Any:
    path = ctx.tmp / "no-such-payload"
    return ["register", "--payload", str(path)], {}, [str(path)]


def payload_fifo(ctx: Ctx) -> Any:
    os.mkfifo(ctx.job["payload"] / "pipe.csv")
    return ["register"], {}, ["pipe.csv"]


def model_s3_not_tar_gz(ctx: Ctx) -> Any:
    uri = ctx.uri("model.zip")
    return ["register", "--model", uri], {}, [uri]


def model_s3_missing_bucket(ctx: Ctx) -> Any:
    uri = "s3://no-such-source-bucket-bb/models/model.tar.gz"
    return ["register", "--model", uri], {}, [uri, "does not exist", "--model"]


def model_s3_missing_key(ctx: Ctx) -> Any:
    uri = ctx.uri("no-such-model.tar.gz")
    return ["register", "--model", uri], {}, [uri, "does not exist", "--model"]


# --- metadata and configuration -----------------------------------------------------------------


def metadata_malformed_json(ctx: Ctx) -> Any:
    path = ctx.tmp / "perf.json"
    path.write_text('{"auc": 0.9,')
    return ["register", "--metadata", str(path)], {}, [str(path)]


def metadata_not_an_object(ctx: Ctx) -> Any:
    path = ctx.tmp / "perf.json"
    path.write_text("[1, 2, 3]")
    return ["register", "--metadata", str(path)], {}, [str(path)]


def metadata_dir_of_two(ctx: Ctx) -> Any:
    path = model_dir(ctx, "metadata", {"a.json": b"{}", "b.json": b"{}"})
    return ["register", "--metadata", str(path)], {}, [str(path)]


def metadata_named_missing(ctx: Ctx) -> Any:
    path = ctx.tmp / "no-such-metadata.json"
    return ["register", "--metadata", str(path)], {}, [str(path)]


def metadata_s3_missing(ctx: Ctx) -> Any:
    uri = ctx.uri("perf-missing.json")
    return ["register"], {"PERFORMANCE_METADATA_PATH": uri}, [uri]


def metadata_not_s3_uri(ctx: Ctx) -> Any:
    return ["register"], {"PERFORMANCE_METADATA_PATH": "/tmp/perf.json"}, ["PERFORMANCE_METADATA_PATH"]


def config_malformed_json(ctx: Ctx) -> Any:
    ctx.job["config"].write_text('{"model_domain": "risk",')
    return ["register"], {}, [str(ctx.job["config"])]


def config_wrong_schema(ctx: Ctx) -> Any:
    config = json.loads(ctx.job["config"].read_text())
    config["model_ownr"] = config.pop("model_owner")
    config["source_model_inference_content_types"] = "text/csv"
    ctx.job["config"].write_text(json.dumps(config))
    return ["register"], {}, ["model_ownr", "model_owner", "source_model_inference_content_types"]


def config_missing(ctx: Ctx) -> Any:
    path = ctx.tmp / "no-such-config.json"
    return ["register", "--config", str(path)], {}, [str(path), "--config"]


# --- settings: environment variables and options, exit 2 ----------------------------------------


def env_case(variable: str, value: str, command: str = "register") -> Build:
    def build(ctx: Ctx) -> Any:
        return [command], {variable: value}, [variable]

    build.__name__ = f"{variable}={value}"
    return build


def unknown_variable(ctx: Ctx) -> Any:
    # A typo of REGISTRAR_WAIT_TIMEOUT: the user thinks the wait is 5 s.
    return ["register"], {"REGISTRAR_WAIT_TIMOUT": "5"}, ["REGISTRAR_WAIT_TIMOUT"]


def misspelt_required_variable(ctx: Ctx) -> Any:
    # REGISTRAR_S3_BUCKET misspelt: the bucket is missing, and the message must name the right variable.
    bucket = ctx.env["REGISTRAR_S3_BUCKET"]
    return ["register"], {"REGISTRAR_S3_BUCKET": None, "REGISTRAR_S3_BUKET": bucket}, ["REGISTRAR_S3_BUCKET"]


def wait_timeout_option_not_a_number(ctx: Ctx) -> Any:
    return ["register", "--wait-timeout", "soon"], {}, ["--wait-timeout"]


def log_level_option_bad(ctx: Ctx) -> Any:
    return ["--log-level", "VERBOSE", "register"], {}, ["--log-level"]


def model_local_copy_with_local_model(ctx: Ctx) -> Any:
    return ["register", "--model-local-copy", str(ctx.tmp)], {}, ["--model-local-copy"]


def mims_endpoint_not_a_url(ctx: Ctx) -> Any:
    return ["register", "--mims-endpoint", "mims example com"], {}, ["--mims-endpoint"]


def mims_endpoint_no_scheme(ctx: Ctx) -> Any:
    return ["register", "--mims-endpoint", "mims.example.com"], {}, ["--mims-endpoint"]


def no_credentials(ctx: Ctx) -> Any:
    return (
        ["register"],
        {
            "AWS_ACCESS_KEY_ID": None,
            "AWS_SECRET_ACCESS_KEY": None,
            "HOME": str(ctx.tmp),
            "AWS_CONFIG_FILE": str(ctx.tmp / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(ctx.tmp / "no-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        },
        ["credentials"],
    )


def aws_config(ctx: Ctx, **changes: str | None) -> dict[str, str | None]:
    """No AWS credentials nor config files (HOME is the test's directory), then `changes`."""
    return {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "HOME": str(ctx.tmp),
        "AWS_CONFIG_FILE": str(ctx.tmp / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(ctx.tmp / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **changes,
    }


def secret_key_missing(ctx: Ctx) -> Any:
    """AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY: botocore's PartialCredentialsError."""
    return ["register"], aws_config(ctx, AWS_ACCESS_KEY_ID="AKIDEXAMPLE"), ["AWS_SECRET_ACCESS_KEY"]


def profile_unknown(ctx: Ctx) -> Any:
    """AWS_PROFILE naming no profile: botocore's ProfileNotFound, raised as the session is made."""
    return ["register"], aws_config(ctx, AWS_PROFILE="nosuchprofile"), ["nosuchprofile", "AWS_PROFILE"]


def config_file_not_ini(ctx: Ctx) -> Any:
    """~/.aws/config that is not INI: botocore's ConfigParseError, raised as the session is made."""
    path = ctx.tmp / ".aws" / "config"
    path.parent.mkdir()
    path.write_text("region: us-west-2\n[[profile\n= nothing\n")
    return ["register"], aws_config(ctx, AWS_CONFIG_FILE=None), [str(path), "AWS_CONFIG_FILE"]


def as_command(build: Build, *command: str) -> Build:
    """The same `register` case through another command (`upload`, `sweep`, ...), same exit."""

    def other(ctx: Ctx) -> Any:
        args, changes, needles = build(ctx)
        assert args == ["register"]
        if command[0] == "upload":
            return ["upload", str(ctx.job["model"]), ctx.uri("m.tar.gz")], changes, needles
        return list(command), changes, needles

    return other


# --- S3 and the registry ------------------------------------------------------------------------


def bucket_missing(ctx: Ctx) -> Any:
    return ["register", "--bucket", "no-such-bucket-bb"], {}, ["no-such-bucket-bb", "NoSuchBucket"]


def prefix_empty(*args: str, env: str | None = None) -> Build:
    """A prefix that normalises to nothing (the bucket root): refused by every command."""

    def build(ctx: Ctx) -> Any:
        changes: dict[str, str | None] = {} if env is None else {"REGISTRAR_S3_PREFIX": env}
        return list(args), changes, ["--prefix / REGISTRAR_S3_PREFIX", "is empty", "sweep", "registrar-tmp/"]

    return build


def prefix_with_empty_segment(ctx: Ctx) -> Any:
    prefix = ctx.settings.s3_prefix + "a//b/"
    return ["register", "--prefix", prefix], {}, ["--prefix"]


def bucket_as_uri(ctx: Ctx) -> Any:
    return ["register", "--bucket", f"s3://{ctx.settings.s3_bucket}"], {}, ["--bucket"]


def bucket_invalid_name(ctx: Ctx) -> Any:
    return ["register", "--bucket", "My_Bucket!"], {}, ["My_Bucket!"]


def reject_credentials(method: str, target: str) -> Reply:
    """S3's answer to an unknown access key: 403, with no body for a HEAD."""
    return Reply(403, b"", "Forbidden") if method == "HEAD" else s3_error(403, "InvalidAccessKeyId")


def credentials_rejected(ctx: Ctx) -> Any:
    """A proxy in front of moto answers every request as S3 does for an unknown access key."""
    proxy = FaultProxy(ctx.stack.s3_endpoint, reject_credentials)
    ctx.proxies.append(proxy)
    proxy.__enter__()
    return ["register"], {"AWS_ENDPOINT_URL_S3": proxy.endpoint}, [ctx.settings.s3_bucket, "403"]


#: For the cases whose preflight retries until its timeout (nothing listens, or answers 500): 1 s, not the 30 s
#: default. Every other case keeps the default, so that a preflight that must pass does on a
#: loaded machine.
SHORT_PREFLIGHT: dict[str, str | None] = {"REGISTRAR_PREFLIGHT_TIMEOUT": "1"}


def s3_endpoint_nothing_listens(ctx: Ctx) -> Any:
    endpoint = f"http://127.0.0.1:{free_port()}"
    return ["register"], {"AWS_ENDPOINT_URL_S3": endpoint, **SHORT_PREFLIGHT}, [ctx.settings.s3_bucket]


def registry_nothing_listens(ctx: Ctx) -> Any:
    endpoint = f"http://127.0.0.1:{free_port()}"
    return ["register", "--mims-endpoint", endpoint], dict(SHORT_PREFLIGHT), [endpoint]


class AnyWebServer:
    """A plain web server on loopback that answers every request with `status` (not a MIMS)."""

    def __init__(self, status: int) -> None:
        answer = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"<html><body>hello</body></html>"
                self.send_response(answer)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AnyWebServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def registry_is_a_web_server(status: int) -> Build:
    def build(ctx: Ctx) -> Any:
        server = AnyWebServer(status)
        ctx.proxies.append(server)
        server.__enter__()
        return ["register", "--mims-endpoint", server.endpoint], {}, [server.endpoint, "--mims-endpoint"]

    return build


def registry_path_typo(ctx: Ctx) -> Any:
    endpoint = ctx.stack.mims_endpoint + "/api"
    return ["register", "--mims-endpoint", endpoint], {}, [endpoint, "--mims-endpoint"]


def registry_not_mims(ctx: Ctx) -> Any:
    # The S3 server answers, but it is no MIMS (moto's 500s are retried until the preflight's timeout).
    return ["register", "--mims-endpoint", ctx.stack.s3_endpoint], dict(SHORT_PREFLIGHT), [ctx.stack.s3_endpoint]


# --- upload's target URI --------------------------------------------------------------------------


def upload_to(target: str, *needles: str) -> Build:
    def build(ctx: Ctx) -> Any:
        return ["upload", str(ctx.job["model"]), target], {}, list(needles or [target])

    build.__name__ = f"upload {target}"
    return build


def upload_missing_path(ctx: Ctx) -> Any:
    path = ctx.tmp / "nothing-here"
    return ["upload", str(path), ctx.uri("m.tar.gz")], {}, [str(path)]


def upload_fifo(ctx: Ctx) -> Any:
    os.mkfifo(ctx.job["model"] / "pipe")
    return ["upload", str(ctx.job["model"]), ctx.uri("m.tar.gz")], {}, ["pipe"]


def upload_truncated(ctx: Ctx) -> Any:
    # Cut well past the first parts: found once the upload is under way (with a smaller archive,
    # it is found while CreateMultipartUpload is in flight, as in the "create-answer-late" case).
    whole = tar_gz({"weights.bin": os.urandom(24 * 1024 * 1024)})
    path = model_dir(ctx, "truncated", {"model.tar.gz": whole[: 20 * 1024 * 1024]})
    return ["upload", str(path), ctx.uri("m.tar.gz")], {}, [str(path / "model.tar.gz")]


def late_create(method: str, target: str) -> Late | None:
    """CreateMultipartUpload reaches S3 at once; its answer comes back a second late."""
    return Late(1.0) if method == "POST" and target.endswith("?uploads") else None


def truncated_with_late_create(ctx: Ctx) -> tuple[Path, dict[str, str | None]]:
    """A model directory holding a truncated archive, and the environment that sends S3 requests
    through a proxy answering CreateMultipartUpload a second late."""
    proxy = FaultProxy(ctx.stack.s3_endpoint, late_create)
    ctx.proxies.append(proxy)
    proxy.__enter__()
    # Over one part (a multipart upload), cut just after the first: found while the creation is in flight.
    whole = tar_gz({"weights.bin": os.urandom(12 * 1024 * 1024)})
    path = model_dir(ctx, "truncated", {"model.tar.gz": whole[: 9 * 1024 * 1024]})
    return path, {"AWS_ENDPOINT_URL_S3": proxy.endpoint}


def upload_truncated_create_late(ctx: Ctx) -> Any:
    """The archive's fault is found while CreateMultipartUpload is in flight (S3 has opened it)."""
    path, changes = truncated_with_late_create(ctx)
    return ["upload", str(path), ctx.uri("m.tar.gz")], changes, [str(path / "model.tar.gz")]


def register_truncated_create_late(ctx: Ctx) -> Any:
    path, changes = truncated_with_late_create(ctx)
    return ["register", "--model", str(path)], changes, [str(path / "model.tar.gz")]


def upload_missing_bucket(ctx: Ctx) -> Any:
    target = "s3://no-such-bucket-bb/key/m.tar.gz"
    return ["upload", str(ctx.job["model"]), target], {}, ["no-such-bucket-bb"]


def upload_bad_part_size(ctx: Ctx) -> Any:
    return (
        ["upload", str(ctx.job["model"]), ctx.uri("m.tar.gz")],
        {"REGISTRAR_PART_SIZE": "1MiB"},
        ["REGISTRAR_PART_SIZE"],
    )


# --- sweep ----------------------------------------------------------------------------------------


def sweep(*args: str, needles: list[str], env: dict[str, str | None] | None = None) -> Build:
    def build(ctx: Ctx) -> Any:
        return ["sweep", *args], dict(env or {}), needles

    build.__name__ = "sweep " + " ".join(args)
    return build


def as_check(build: Build) -> Build:
    """The same case through `check`, which must answer as `register` would."""

    def checked(ctx: Ctx) -> Any:
        args, changes, needles = build(ctx)
        assert args[0] == "register"
        return ["check", *args[1:]], changes, needles

    return checked


CASES = [
    # inputs: exit 3
    pytest.param(model_missing, 3, id="model-missing"),
    pytest.param(model_is_a_file, 3, id="model-is-a-file"),
    pytest.param(model_empty, 3, id="model-empty-dir"),
    pytest.param(model_only_directories, 3, id="model-only-directories"),
    pytest.param(model_gzip_not_tar, 3, id="model-gzip-not-tar"),
    pytest.param(model_named_tar_gz_not_gzip, 3, id="model-named-tar-gz-not-gzip"),
    pytest.param(model_truncated_tar_gz, 3, id="model-truncated-tar-gz"),
    pytest.param(model_corrupt_tar_gz, 3, id="model-corrupt-tar-gz"),
    pytest.param(model_tar_gz_escaping, 3, id="model-tar-gz-member-escapes"),
    pytest.param(model_symlink_outside, 3, id="model-symlink-outside"),
    pytest.param(model_dangling_symlink_dereferenced, 3, id="model-dangling-link-dereference"),
    pytest.param(model_fifo, 3, id="model-fifo"),
    pytest.param(model_unreadable_file, 3, id="model-unreadable-file"),
    pytest.param(model_control_character_name, 3, id="model-control-char-name"),
    pytest.param(payload_missing, 3, id="payload-named-missing"),
    pytest.param(payload_fifo, 3, id="payload-fifo"),
    pytest.param(model_s3_not_tar_gz, 3, id="model-s3-key-not-tar-gz"),
    pytest.param(model_s3_missing_bucket, 4, id="model-s3-bucket-missing"),
    pytest.param(model_s3_missing_key, 4, id="model-s3-key-missing"),
    pytest.param(metadata_malformed_json, 3, id="metadata-malformed-json"),
    pytest.param(metadata_not_an_object, 3, id="metadata-not-an-object"),
    pytest.param(metadata_dir_of_two, 3, id="metadata-dir-two-json"),
    pytest.param(metadata_named_missing, 3, id="metadata-named-missing"),
    pytest.param(metadata_s3_missing, 3, id="metadata-s3-missing"),
    pytest.param(metadata_not_s3_uri, 2, id="metadata-env-not-s3-uri"),
    # configuration: exit 2
    pytest.param(config_malformed_json, 2, id="config-malformed-json"),
    pytest.param(config_wrong_schema, 2, id="config-wrong-schema"),
    pytest.param(config_missing, 2, id="config-missing"),
    # settings: exit 2
    pytest.param(
        unknown_variable,
        2,
        id="env-unknown-REGISTRAR-name",
    ),
    pytest.param(misspelt_required_variable, 2, id="env-misspelt-required-variable"),
    pytest.param(env_case("REGISTRAR_WAIT_TIMEOUT", "-5"), 2, id="wait-timeout-negative"),
    pytest.param(env_case("REGISTRAR_WAIT_TIMEOUT", "1h"), 2, id="wait-timeout-not-numeric"),
    pytest.param(wait_timeout_option_not_a_number, 2, id="wait-timeout-option-not-numeric"),
    pytest.param(env_case("REGISTRAR_PREFLIGHT_TIMEOUT", "-1"), 2, id="preflight-timeout-negative"),
    pytest.param(env_case("REGISTRAR_MIMS_REQUEST_TIMEOUT", "abc"), 2, id="request-timeout-not-numeric"),
    pytest.param(env_case("REGISTRAR_PART_SIZE", "4MiB"), 2, id="part-size-below-5MiB"),
    pytest.param(env_case("REGISTRAR_PART_SIZE", "16 parsecs"), 2, id="part-size-bad-unit"),
    pytest.param(env_case("REGISTRAR_PART_SIZE", "-16MiB"), 2, id="part-size-negative"),
    pytest.param(env_case("REGISTRAR_MEMORY_LIMIT", "8MiB"), 2, id="memory-limit-below-16MiB"),
    pytest.param(env_case("REGISTRAR_COMPRESSION_LEVEL", "9"), 2, id="compression-level-9"),
    pytest.param(env_case("REGISTRAR_COMPRESSION_LEVEL", "-1"), 2, id="compression-level-negative"),
    pytest.param(env_case("REGISTRAR_COMPRESSION_MIN_SAVING", "150"), 2, id="min-saving-over-100"),
    pytest.param(env_case("REGISTRAR_UPLOAD_CONCURRENCY", "0"), 2, id="upload-concurrency-0"),
    pytest.param(env_case("REGISTRAR_S3_CHECKSUMS", "always"), 2, id="s3-checksums-bad"),
    pytest.param(env_case("REGISTRAR_S3_CHECKSUM_ALGORITHM", "MD5"), 2, id="checksum-algorithm-bad"),
    pytest.param(env_case("REGISTRAR_DEREFERENCE", "maybe"), 2, id="dereference-not-boolean"),
    pytest.param(env_case("REGISTRAR_PREFLIGHT", "nope"), 2, id="preflight-not-boolean"),
    pytest.param(env_case("REGISTRAR_LOG_LEVEL", "VERBOSE"), 2, id="log-level-env-bad"),
    pytest.param(env_case("REGISTRAR_LOG_FORMAT", "xml"), 2, id="log-format-env-bad"),
    pytest.param(log_level_option_bad, 2, id="log-level-option-bad"),
    pytest.param(env_case("SOURCE_DATE_EPOCH", "yesterday"), 2, id="source-date-epoch-bad"),
    pytest.param(
        prefix_with_empty_segment,
        2,
        id="prefix-empty-segment",
    ),
    pytest.param(prefix_empty("register", "--prefix", "/"), 2, id="prefix-slash"),
    pytest.param(prefix_empty("register", "--prefix", ""), 2, id="prefix-empty"),
    pytest.param(prefix_empty("register", env="/"), 2, id="prefix-env-slash"),
    pytest.param(prefix_empty("check", "--prefix", "/"), 2, id="check-prefix-slash"),
    pytest.param(prefix_empty("sweep", "--prefix", "/"), 2, id="sweep-prefix-slash"),
    pytest.param(prefix_empty("sweep", "--install-lifecycle", "--prefix", "/"), 2, id="lifecycle-prefix-slash"),
    pytest.param(bucket_as_uri, 2, id="bucket-given-as-s3-uri"),
    pytest.param(env_case("REGISTRAR_S3_BUCKET", "registrar-local-tmp/sub"), 2, id="bucket-with-slash"),
    pytest.param(model_local_copy_with_local_model, 2, id="model-local-copy-without-s3-model"),
    pytest.param(mims_endpoint_not_a_url, 2, id="mims-endpoint-not-a-url"),
    pytest.param(mims_endpoint_no_scheme, 2, id="mims-endpoint-no-scheme"),
    pytest.param(no_credentials, 2, id="no-credentials"),
    pytest.param(as_command(no_credentials, "upload"), 2, id="upload-no-credentials"),
    pytest.param(as_command(no_credentials, "sweep"), 2, id="sweep-no-credentials"),
    pytest.param(as_command(no_credentials, "sweep", "--install-lifecycle"), 2, id="lifecycle-no-credentials"),
    pytest.param(secret_key_missing, 2, id="secret-key-missing"),
    pytest.param(as_command(secret_key_missing, "check"), 2, id="check-secret-key-missing"),
    pytest.param(as_command(secret_key_missing, "upload"), 2, id="upload-secret-key-missing"),
    pytest.param(as_command(secret_key_missing, "sweep"), 2, id="sweep-secret-key-missing"),
    pytest.param(profile_unknown, 2, id="profile-unknown"),
    pytest.param(as_command(profile_unknown, "check"), 2, id="check-profile-unknown"),
    pytest.param(as_command(profile_unknown, "upload"), 2, id="upload-profile-unknown"),
    pytest.param(as_command(profile_unknown, "sweep"), 2, id="sweep-profile-unknown"),
    pytest.param(config_file_not_ini, 2, id="aws-config-not-ini"),
    pytest.param(as_command(config_file_not_ini, "check"), 2, id="check-aws-config-not-ini"),
    pytest.param(as_command(config_file_not_ini, "upload"), 2, id="upload-aws-config-not-ini"),
    pytest.param(as_command(config_file_not_ini, "sweep", "--install-lifecycle"), 2, id="lifecycle-aws-config-not-ini"),
    # S3 and the registry
    pytest.param(bucket_missing, 4, id="bucket-missing"),
    pytest.param(bucket_invalid_name, 2, id="bucket-invalid-name"),
    pytest.param(credentials_rejected, 4, id="credentials-rejected-by-s3"),
    pytest.param(s3_endpoint_nothing_listens, 4, id="s3-endpoint-nothing-listens"),
    pytest.param(registry_nothing_listens, 5, id="registry-nothing-listens"),
    pytest.param(registry_not_mims, 5, id="registry-is-the-s3-server"),
    pytest.param(registry_is_a_web_server(200), 5, id="registry-is-a-web-server-200"),
    pytest.param(registry_is_a_web_server(404), 5, id="registry-is-a-web-server-404"),
    pytest.param(registry_path_typo, 5, id="registry-url-path-typo"),
    # upload
    pytest.param(upload_to("s3://"), 2, id="upload-target-s3-empty"),
    pytest.param(upload_to("s3:///key/m.tar.gz"), 2, id="upload-target-no-bucket"),
    pytest.param(upload_to("s3:/registrar-local-tmp/x/m.tar.gz"), 2, id="upload-target-s3-one-slash"),
    pytest.param(upload_to("s3:registrar-local-tmp/x/m.tar.gz"), 2, id="upload-target-s3-no-slash"),
    pytest.param(upload_to("registrar-local-tmp/x/m.tar.gz"), 2, id="upload-target-no-scheme"),
    pytest.param(upload_to("s3://registrar-local-tmp"), 2, id="upload-target-no-key"),
    pytest.param(upload_to("s3://registrar-local-tmp/"), 2, id="upload-target-empty-key"),
    pytest.param(
        upload_truncated_create_late,
        3,
        id="upload-truncated-tar-gz-create-answer-late",
    ),
    pytest.param(register_truncated_create_late, 3, id="register-truncated-tar-gz-create-answer-late"),
    pytest.param(upload_missing_bucket, 4, id="upload-bucket-missing"),
    pytest.param(upload_missing_path, 3, id="upload-path-missing"),
    pytest.param(upload_fifo, 3, id="upload-fifo"),
    pytest.param(upload_truncated, 3, id="upload-truncated-tar-gz"),
    pytest.param(upload_bad_part_size, 2, id="upload-part-size-below-5MiB"),
    # sweep
    pytest.param(sweep("--older-than", "banana", needles=["--older-than"]), 2, id="sweep-older-than-bad"),
    pytest.param(sweep("--older-than=-1h", needles=["--older-than"]), 2, id="sweep-older-than-negative"),
    pytest.param(sweep("--max-age", "7 days", needles=["--max-age"]), 2, id="sweep-max-age-bad"),
    pytest.param(sweep("--prefix", "", needles=["prefix"]), 2, id="sweep-empty-prefix"),
    pytest.param(
        sweep(needles=["no-such-bucket-bb"], env={"REGISTRAR_S3_BUCKET": "no-such-bucket-bb"}),
        4,
        id="sweep-bucket-missing",
    ),
    pytest.param(
        sweep("--abort-after-days", "0", "--install-lifecycle", needles=["--abort-after-days"]),
        2,
        id="sweep-lifecycle-days-0",
    ),
    # check: the same answers as register
    pytest.param(as_check(model_missing), 3, id="check-model-missing"),
    pytest.param(as_check(bucket_missing), 4, id="check-bucket-missing"),
    pytest.param(as_check(model_symlink_outside), 3, id="check-model-symlink"),
    pytest.param(as_check(config_wrong_schema), 2, id="check-config-wrong-schema"),
    pytest.param(as_check(registry_nothing_listens), 5, id="check-registry-nothing-listens"),
]


@pytest.mark.parametrize(("build", "code"), CASES)
async def test_bad_input_is_named_with_its_exit_code_and_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, build: Build, code: int
) -> None:
    job = make_job(tmp_path)
    ctx = Ctx(tmp_path, job, stack, settings, environment(stack, settings, job))
    try:
        args, changes, needles = build(ctx)
        env = dict(ctx.env)
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        result = run(env, *args)
    finally:
        for proxy in ctx.proxies:
            proxy.__exit__(None, None, None)
    shown = f"exit {result.returncode}\n--- stderr:\n{result.stderr}\n--- stdout:\n{result.stdout}"
    print(shown)
    assert "Traceback" not in result.stderr, shown
    assert result.returncode in DOCUMENTED, shown
    assert result.returncode == code, shown
    assert "error" in result.stderr.lower(), shown
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not named\n{shown}"
    assert result.stdout == "", shown
    # Everything a case could write is under the test's own prefix (a changed prefix extends it).
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- what the README documents as accepted, though a user may expect an error ----------------------


def two_archives(ctx: Ctx) -> Path:
    """Two .tar.gz files: not "exactly one file", so the directory is archived as it is (README)."""
    return model_dir(ctx, "two", {"a.tar.gz": tar_gz({"a": b"a"}), "b.tar.gz": tar_gz({"b": b"b"})})


@pytest.mark.parametrize("build", [pytest.param(two_archives, id="two-tar-gz")])
async def test_documented_as_a_directory_to_archive(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, build: Callable[[Ctx], Path]
) -> None:
    """`check` accepts it (exit 0, the plan on stdout) and writes nothing."""
    job = make_job(tmp_path)
    ctx = Ctx(tmp_path, job, stack, settings, environment(stack, settings, job))  # a preflight that must pass
    model = build(ctx)
    result = run(ctx.env, "check", "--model", str(model))
    shown = f"exit {result.returncode}\n--- stderr:\n{result.stderr}\n--- stdout:\n{result.stdout}"
    print(shown)
    assert "Traceback" not in result.stderr, shown
    assert result.returncode == 0, shown
    assert f"model: {model} (" in result.stdout, shown
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
