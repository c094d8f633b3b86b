"""Black-box: the SageMaker Processing container contract, as a job sees it.

Written from README.md, docs/containers.md, docs/faults.md and the original script's design
(not from the code): the entrypoint runs as a subprocess in a clean environment, its inputs at
paths of the test's own (`REGISTRAR_*_PATH`) and its output directory redirected with
`REGISTRAR_OUTPUT_DIR` (the documented stand-in for `/opt/ml/output`).

What is promised and checked here:

- on success exactly the original's two lines on stdout, logs on stderr, no message file;
- on every failure (exit 2, 3, 4, 5, 6, 130/143) one `error:` message on stderr and its first
  line, alone, in `<output>/message` (SageMaker's failure reason), secret-free and one line;
- the configuration, payload and metadata channels present, absent, empty, unreadable, doubled;
- JSON logs: every stderr line one JSON object, the last the `exit` record;
- read-only inputs and a non-root uid; a job re-run by SageMaker with the same lineage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack

from .conftest import ROOT, environment, final_status, late_registry, leftovers, make_job, mims_server, remove_all
from .fault_proxy import FaultProxy, Hold

LINE_ARN = re.compile(r"^Workflow execution arn for model registration process: arn:aws:states:\S+$")
LINE_MODEL = re.compile(r"^Model id for model being registered: \S+$")


def run(env: dict[str, str], *args: str, timeout: float = 60, **options: Any) -> subprocess.CompletedProcess[str]:
    """The entrypoint as a job runs it: `python -m async_registrar ARGS`, a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "async_registrar", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **options,
    )


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "async_registrar", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def job_env(
    tmp_path: Path, stack: LocalStack, settings: Settings, **extra: str
) -> tuple[dict[str, Path], dict[str, str]]:
    """A job's inputs and environment, its output directory (`tmp_path/output`) created."""
    job = make_job(tmp_path)
    output = tmp_path / "output"
    output.mkdir(exist_ok=True)
    env = environment(stack, settings, job, REGISTRAR_OUTPUT_DIR=str(output), **extra)
    return job, env


def message_of(tmp_path: Path) -> str:
    return (tmp_path / "output" / "message").read_text(encoding="utf-8")


def assert_failure_contract(result: subprocess.CompletedProcess[str], tmp_path: Path, code: int) -> str:
    """The documented failure: its exit code, no traceback, nothing on stdout, the message file
    one line that is the stderr error message's first line.  Returns that line."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    message = message_of(tmp_path)
    assert message.endswith("\n"), repr(message)
    assert message.count("\n") == 1, repr(message)
    line = message.rstrip("\n")
    assert line.strip(), "an empty failure reason"
    first = error_message(result.stderr).splitlines()[0]
    assert line.startswith(first.rstrip(":")), (line, first)
    return line


def error_message(stderr: str) -> str:
    """The `error:` message of a run: the text after `error: ` (text logs), or the `error`
    record's message (JSON logs)."""
    if stderr.startswith("{"):
        errors = [r for r in json_records(stderr) if r.get("event") == "error"]
        assert len(errors) == 1, stderr
        return str(errors[0]["message"]).removeprefix("error: ")
    found = re.search(r"^error: (.*)", stderr, re.MULTILINE | re.DOTALL)
    assert found, stderr
    return found.group(1)


def json_records(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object (fails on a line that is not one)."""
    records = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"a stderr line in JSON mode is not JSON: {line!r}\n{stderr}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


# --- success -------------------------------------------------------------------------------------


async def test_success_prints_exactly_the_two_lines_logs_json_and_leaves_no_message(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    _job, env = job_env(tmp_path, stack, settings, REGISTRAR_LOG_FORMAT="json")
    shutil.copytree(ROOT / "examples" / "demo" / "metadata", tmp_path / "metadata")
    env["REGISTRAR_METADATA_PATH"] = str(tmp_path / "metadata")
    result = run(env, "register")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 3, result.stdout
    assert lines[2] == "", result.stdout
    assert LINE_ARN.match(lines[0]), result.stdout
    assert LINE_MODEL.match(lines[1]), result.stdout
    records = json_records(result.stderr)
    assert records[-1]["event"] == "exit"
    assert records[-1]["exit_code"] == 0
    assert not [r for r in records if r.get("event") == "error"]
    submitted = [r for r in records if r.get("event") == "registration_submitted"]
    assert len(submitted) == 1
    assert submitted[0]["model_id"] in lines[1]
    assert not (tmp_path / "output" / "message").exists()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- the failure message file on every way out ------------------------------------------------------


def break_job(case: str, job: dict[str, Path], env: dict[str, str], tmp_path: Path) -> None:
    if case == "config-unknown-key":
        config = json.loads(job["config"].read_text())
        config["model_ownr"] = config.pop("model_owner")
        job["config"].write_text(json.dumps(config))
    elif case == "model-missing":
        env["REGISTRAR_MODEL_PATH"] = str(tmp_path / "nowhere")
    elif case == "bucket-missing":
        env["REGISTRAR_S3_BUCKET"] = "no-such-bucket-h39"
    else:
        env["REGISTRAR_WAIT_TIMOUT"] = "10"


NAMED = {
    "config-unknown-key": "model_ownr",
    "model-missing": "nowhere",
    "bucket-missing": "no-such-bucket-h39",
    "env-typo": "REGISTRAR_WAIT_TIMOUT",
}


HEADER_ONLY = "the message file holds only the header of the problem list ('...; fix each and run again:'), no problem"


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("model-missing", 3),
        ("bucket-missing", 4),
        pytest.param("config-unknown-key", 2),
        pytest.param("env-typo", 2),
    ],
)
async def test_each_failure_writes_a_reason_naming_what_is_wrong_to_the_message_file(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, case: str, code: int
) -> None:
    """SageMaker's console shows the message file alone: one line, the error's first line, and
    it must name the file, key, bucket or variable at fault.  In JSON mode: one `error` record
    with the exit code, and the `exit` record last."""
    job, env = job_env(tmp_path, stack, settings, REGISTRAR_LOG_FORMAT="json")
    break_job(case, job, env, tmp_path)
    result = run(env, "register")
    line = assert_failure_contract(result, tmp_path, code)
    records = json_records(result.stderr)
    assert [r["exit_code"] for r in records if r.get("event") == "error"] == [code]
    assert records[-1]["event"] == "exit"
    assert records[-1]["exit_code"] == code
    assert NAMED[case] in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert NAMED[case] in line, line


@pytest.mark.parametrize("args", [["--wait-timeout", "abc"]])
async def test_a_usage_error_is_a_failure_like_any_other(
    tmp_path: Path, stack: LocalStack, settings: Settings, args: list[str]
) -> None:
    """A job's ContainerArguments with a typo: exit 2, and SageMaker still gets a reason; in JSON
    mode the log pipeline still gets JSON and the exit record."""
    _, env = job_env(tmp_path, stack, settings, REGISTRAR_LOG_FORMAT="json")
    result = run(env, "register", *args)
    assert result.returncode == 2, result.stderr
    assert (tmp_path / "output" / "message").exists(), result.stderr
    assert message_of(tmp_path).count("\n") == 1
    records = json_records(result.stderr)
    assert records[-1]["event"] == "exit"
    assert records[-1]["exit_code"] == 2


async def test_a_failed_registration_names_the_registrys_reason_in_the_message(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    with mims_server(stack, fail_registrations="weights do not load (h39)") as registry:
        _, env = job_env(tmp_path, stack, settings, REGISTRAR_MIMS_ENDPOINT=registry.endpoint)
        line = assert_failure_contract(run(env, "register"), tmp_path, 5)
    assert "weights do not load (h39)" in line
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_model_path_with_a_newline_still_gives_a_one_line_message(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    _, env = job_env(tmp_path, stack, settings)
    env["REGISTRAR_MODEL_PATH"] = str(tmp_path / "mo\ndel")
    assert_failure_contract(run(env, "check"), tmp_path, 3)


async def test_a_model_path_that_is_not_utf8_is_exit_3_with_a_message(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    _, env = job_env(tmp_path, stack, settings)
    env["REGISTRAR_MODEL_PATH"] = str(tmp_path) + "/mod\udcffel"  # the byte 0xff, as os.fsencode sends it
    result = run(env, "check")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    raw = (tmp_path / "output" / "message").read_bytes()
    assert raw.endswith(b"\n"), raw
    assert raw.count(b"\n") == 1, raw


@pytest.mark.parametrize("where", ["missing-dir", "message-is-a-directory", "empty-variable"])
async def test_an_output_directory_that_cannot_take_the_message_keeps_the_exit_code(
    tmp_path: Path, stack: LocalStack, settings: Settings, where: str
) -> None:
    _, env = job_env(tmp_path, stack, settings)
    env["REGISTRAR_MODEL_PATH"] = str(tmp_path / "nowhere")
    if where == "missing-dir":
        env["REGISTRAR_OUTPUT_DIR"] = str(tmp_path / "no-output")
    elif where == "message-is-a-directory":
        (tmp_path / "output" / "message").mkdir()
    else:
        env["REGISTRAR_OUTPUT_DIR"] = ""  # unset, as every empty variable: /opt/ml/output (absent here)
    result = run(env, "register")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "nowhere" in result.stderr
    if where == "missing-dir":
        # nothing invented where the job did not give a directory... or, if made, one line
        made = tmp_path / "no-output" / "message"
        assert not made.exists() or made.read_text().count("\n") == 1


async def test_a_very_long_reason_is_bounded_for_sagemaker(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    """SageMaker keeps at most 1024 characters of a failure reason; the message is one line
    whatever the problem, and should not hand it a multi-kilobyte line."""
    _, env = job_env(tmp_path, stack, settings)
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200) / ("h" * 200) / ("i" * 200)
    env["REGISTRAR_MODEL_PATH"] = str(deep)
    result = run(env, "check")
    assert result.returncode == 3, result.stderr
    message = message_of(tmp_path)
    assert message.count("\n") == 1
    assert len(message.rstrip("\n")) <= 1024, len(message)


# --- signals, the wait, and SageMaker's re-run of the job -------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_signal_during_the_upload_has_its_code_a_message_and_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, signum: int, code: int
) -> None:
    release = threading.Event()

    def rule(method: str, target: str) -> Hold | None:
        return Hold(release) if method == "PUT" and "partNumber=" in target else None

    with FaultProxy(stack.s3_endpoint, rule) as proxy:
        _, env = job_env(tmp_path, stack, settings, AWS_ENDPOINT_URL_S3=proxy.endpoint, REGISTRAR_LOG_FORMAT="json")
        process = start(env, "register")
        try:
            with anyio.fail_after(30):
                while proxy.count("PUT", "partNumber=") == 0:
                    assert process.poll() is None, process.communicate()
                    await anyio.sleep(0.05)
            process.send_signal(signum)
            out, err = process.communicate(timeout=40)
        finally:
            release.set()
            if process.poll() is None:
                process.kill()
                process.communicate()
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    line = assert_failure_contract(result, tmp_path, code)
    assert "no temporary object was left behind" in line, line
    records = json_records(err)
    assert records[-1]["event"] == "exit"
    assert records[-1]["exit_code"] == code
    await anyio.sleep(0.5)  # a held part released after the abort reaches S3 late
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_job_stopped_during_the_wait_and_rerun_by_sagemaker_gets_its_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    lineage = f"pipelines-h39-{os.getpid()}-{time.monotonic_ns()}"
    with late_registry(stack) as registry:
        _, env = job_env(
            tmp_path,
            stack,
            settings,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            MODS_WORKFLOW_EXECUTION_ID=lineage,
            REGISTRAR_LOG_FORMAT="json",
        )
        process = start(env, "register")
        assert process.stderr is not None
        registration_id = ""
        try:
            with anyio.fail_after(30):
                while not registration_id:
                    line = await anyio.to_thread.run_sync(process.stderr.readline)
                    assert line, "the run ended before it submitted"
                    record = json.loads(line)
                    if record.get("event") == "registration_submitted":
                        registration_id = record["registration_id"]
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=40)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        first = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        line = assert_failure_contract(first, tmp_path, 143)
        assert registration_id in line, line
        assert f"s3://{settings.s3_bucket}/{settings.s3_prefix}" in line, line
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert any(k.endswith("model.tar.gz") for k in kept), kept

        # SageMaker re-runs the step: same lineage, fresh output directory
        (tmp_path / "output" / "message").unlink()
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        again = run(env, "register")
        assert again.returncode == 0, again.stderr
        assert len(again.stdout.splitlines()) == 2
        assert registry.registration(registration_id) is not None
        model_id = registry.registration(registration_id).model_id  # type: ignore[union-attr]
        assert again.stdout.splitlines()[1].endswith(model_id)
        assert not (tmp_path / "output" / "message").exists()
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_wait_timeout_message_names_the_kept_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    with late_registry(stack) as registry:
        _, env = job_env(tmp_path, stack, settings, REGISTRAR_MIMS_ENDPOINT=registry.endpoint)
        try:
            line = assert_failure_contract(run(env, "register", "--wait-timeout", "1"), tmp_path, 6)
            assert f"s3://{settings.s3_bucket}/{settings.s3_prefix}" in line, line
            assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) != []
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- the configuration channel ----------------------------------------------------------------------


def configured(tmp_path: Path, stack: LocalStack, settings: Settings, text: bytes) -> tuple[Path, dict[str, str]]:
    job, env = job_env(tmp_path, stack, settings)
    job["config"].write_bytes(text)
    return job["config"], env


def example_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads((ROOT / "examples" / "demo" / "registration.json").read_text())
    return config


NOT_JSON = "NaN / Infinity (not JSON) are accepted and registered, sent to the registry as null"


async def test_a_config_with_a_utf8_bom_is_read_or_refused_saying_so(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    path, env = configured(tmp_path, stack, settings, b"\xef\xbb\xbf" + json.dumps(example_config()).encode())
    result = run(env, "check")
    assert "Traceback" not in result.stderr
    assert result.returncode == 0 or (
        result.returncode == 2 and str(path) in result.stderr and re.search(r"BOM|byte.order", result.stderr)
    ), result.stderr


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("not-utf8", '{"model_owner": "caf\xe9"}'.encode("latin-1")),
        ("deeply-nested", b'{"load_testing_info_map": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"),
        pytest.param(
            "huge-integer",
            json.dumps(example_config())[:-1].encode() + b', "load_testing_info_map": {"x": ' + b"9" * 5000 + b"}}",
        ),
        pytest.param(
            "nan",
            json.dumps({**example_config(), "load_testing_info_map": {"max_tps": float("nan")}}).encode(),
        ),
        pytest.param(
            "infinity",
            json.dumps({**example_config(), "load_testing_info_map": {"max_tps": float("inf")}}).encode(),
        ),
    ],
)
async def test_a_config_that_is_not_valid_json_is_exit_2_naming_the_file(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, case: str, text: bytes
) -> None:
    path, env = configured(tmp_path, stack, settings, text)
    result = run(env, "check")  # exits with the code `register` would, before any upload
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr or "configuration" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_config_with_a_key_given_twice_is_not_silently_half_read(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    """Two values for one field: the user cannot know which one is registered; say so."""
    body = json.dumps(example_config())[:-1] + ', "model_owner": "someone-else"}'
    _, env = configured(tmp_path, stack, settings, body.encode())
    result = run(env, "check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model_owner" in result.stderr


async def test_a_huge_config_is_refused_quickly(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    config = {**example_config(), "model_owner": "x" * (40 * 1024 * 1024)}
    path, env = configured(tmp_path, stack, settings, json.dumps(config).encode())
    began = time.monotonic()
    result = run(env, "check", timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(path) in result.stderr
    assert "larger than" in result.stderr
    assert len(result.stderr) < 20_000, "the huge value is echoed back"
    assert time.monotonic() - began < 20


@pytest.mark.parametrize(
    ("layout", "named"),
    [
        ("configmap-links", "file"),
        pytest.param(
            "one-file",
            "directory",
        ),
    ],
)
async def test_a_config_directory_holding_one_json_file_is_read(
    tmp_path: Path, stack: LocalStack, settings: Settings, layout: str, named: str
) -> None:
    job, env = job_env(tmp_path, stack, settings)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    if layout == "one-file":
        shutil.copy(job["config"], config_dir / "registration.json")
    else:
        data = config_dir / "..2026_12_01_10_00_00.000000001"
        data.mkdir()
        shutil.copy(job["config"], data / "registration.json")
        (config_dir / "..data").symlink_to(data.name)
        (config_dir / "registration.json").symlink_to("..data/registration.json")
    env["REGISTRAR_CONFIG_PATH"] = str(config_dir if named == "directory" else config_dir / "registration.json")
    result = run(env, "check")
    assert result.returncode == 0, result.stderr
    assert "a registration would start" in result.stdout


async def test_the_default_config_path_missing_names_it_and_the_variable(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    _, env = job_env(tmp_path, stack, settings)
    del env["REGISTRAR_CONFIG_PATH"]
    result = run(env, "check")
    line = assert_failure_contract(result, tmp_path, 2)
    assert "/opt/ml/processing/config/config" in result.stderr
    assert "REGISTRAR_CONFIG_PATH" in result.stderr
    assert "/opt/ml/processing/config/config" in line


# --- the payload and metadata channels --------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("two-json-files", 3),
        ("deeply-nested", 3),
        pytest.param("nan", 3),
        pytest.param("infinity", 3),
        pytest.param(
            "huge-integer",
            3,
        ),
    ],
)
async def test_metadata_channel_edges_are_exit_3_before_any_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, case: str, code: int
) -> None:
    _, env = job_env(tmp_path, stack, settings)
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    if case == "two-json-files":
        (metadata / "a.json").write_text('{"auc": 0.9}')
        (metadata / "b.json").write_text('{"auc": 0.8}')
    elif case == "nan":
        (metadata / "performance.json").write_text('{"auc": NaN}')
    elif case == "infinity":
        (metadata / "performance.json").write_text('{"auc": Infinity}')
    elif case == "deeply-nested":
        (metadata / "performance.json").write_text('{"auc": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "huge-integer":
        (metadata / "performance.json").write_text('{"auc": ' + "9" * 5000 + "}")
    env["REGISTRAR_METADATA_PATH"] = str(metadata)
    result = run(env, "check")  # exits with the code `register` would, before any upload
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert str(metadata) in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_empty_payload_directory_named_by_the_job_is_exit_3(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    job, env = job_env(tmp_path, stack, settings)
    shutil.rmtree(job["payload"])
    job["payload"].mkdir()
    line = assert_failure_contract(run(env, "check"), tmp_path, 3)
    assert str(job["payload"]) in line


# --- read-only inputs, a non-root uid -----------------------------------------------------------------


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="h39-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(path)], check=False, timeout=30)
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run as another uid")
    return subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "async_registrar", *args],
        env={**env, "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mode, p.stat().st_size) for p in sorted(path.rglob("*"))}


async def test_a_non_root_job_with_read_only_inputs_registers_and_writes_nothing_there(
    world_dir: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    job, env = job_env(world_dir, stack, settings)
    shutil.copytree(ROOT / "examples" / "demo" / "metadata", world_dir / "metadata")
    env["REGISTRAR_METADATA_PATH"] = str(world_dir / "metadata")
    os.chown(world_dir / "output", 65534, 65534)
    for name in ("model", "payload", "metadata"):
        for p in sorted((world_dir / name).rglob("*"), reverse=True):
            p.chmod(0o555 if p.is_dir() else 0o444)
        (world_dir / name).chmod(0o555)
    job["config"].chmod(0o444)
    before = {n: snapshot(world_dir / n) for n in ("model", "payload", "metadata")}
    result = as_nobody(env, "register")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert {n: snapshot(world_dir / n) for n in ("model", "payload", "metadata")} == before
    assert not (world_dir / "output" / "message").exists()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("which", ["metadata", "config", "output-read-only"])
async def test_a_non_root_job_that_cannot_read_an_input_names_it_with_its_code(
    world_dir: Path, stack: LocalStack, settings: Settings, s3: Any, which: str
) -> None:
    job, env = job_env(world_dir, stack, settings)
    os.chown(world_dir / "output", 65534, 65534)
    for p in world_dir.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    if which == "metadata":
        metadata = world_dir / "metadata"
        metadata.mkdir(mode=0o755)
        unreadable = metadata / "performance.json"
        unreadable.write_text('{"auc": 0.9}')
        env["REGISTRAR_METADATA_PATH"] = str(metadata)
        code = 3
    elif which == "config":
        unreadable = job["config"]
        code = 2
    else:
        os.chown(world_dir / "output", 0, 0)  # the job cannot write its output directory
        env["REGISTRAR_MODEL_PATH"] = str(world_dir / "nowhere")
        result = as_nobody(env, "register")
        assert result.returncode == 3, result.stderr
        assert "Traceback" not in result.stderr
        assert "nowhere" in result.stderr
        assert not (world_dir / "output" / "message").exists()
        return
    unreadable.chmod(0o000)
    result = as_nobody(env, "register")
    line = assert_failure_contract(result, world_dir, code)
    assert str(unreadable) in result.stderr
    assert str(unreadable) in line or which in line or "configuration" in line
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_metadata_from_s3_takes_precedence_over_the_local_channel_with_a_warning(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    key = f"{settings.s3_prefix}inputs/performance.json"
    await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b'{"auc": 0.97, "source": "s3"}')
    local = tmp_path / "metadata"
    local.mkdir()
    (local / "performance.json").write_text('{"auc": 0.5, "source": "local"}')
    try:
        with mims_server(stack) as registry:
            _, env = job_env(
                tmp_path,
                stack,
                settings,
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                REGISTRAR_METADATA_PATH=str(local),
                PERFORMANCE_METADATA_PATH=f"s3://{settings.s3_bucket}/{key}",
                REGISTRAR_LOG_FORMAT="json",
            )
            result = run(env, "register")
            assert result.returncode == 0, result.stderr
            records = json_records(result.stderr)
            (submitted,) = [r for r in records if r.get("event") == "registration_submitted"]
            record = registry.app.state.registry.records[submitted["registration_id"]]  # type: ignore[union-attr]
            assert record.submission.performance_metadata == {"auc": 0.97, "source": "s3"}
            warnings = [r["message"] for r in records if r["level"] == "WARNING"]
            assert any(str(local) in w for w in warnings), warnings
    finally:
        await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
