"""The CLI as a user runs it: a subprocess against moto S3 and the reference MIMS on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Settings
from async_registrar._archive import stream_archive
from async_registrar._artifacts import DirectorySource, inspect_artifact
from async_registrar._local import LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import HELD, MiB, environment, leftovers, make_job, mims_server, registration_config, remove_all
from .fault_proxy import FaultProxy, s3_error


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "async_registrar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_releasing(
    env: dict[str, str], registry: ThreadedMimsServer, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`run` for a re-run of a registration `registry` holds unfinished: once the re-run says it
    resumes it (found unfinished: its artifacts checked), or submits one, the registry lets it
    finish while the re-run waits."""
    process = subprocess.Popen(
        [sys.executable, "-m", "async_registrar", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen: list[str] = []
    try:
        for line in process.stderr:
            seen.append(line)
            if "resuming registration" in line or "submitted:" in line:
                break
    finally:
        registry.finish_processing()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, "".join(seen) + stderr)


def expected_archive(path: Path) -> bytes:
    """The bytes the registrar must have produced: the archive is deterministic."""
    source = inspect_artifact(path, role="model")
    assert isinstance(source, DirectorySource)
    sink = io.BytesIO()
    defaults = Settings.model_fields
    stream_archive(
        source,
        sink,  # type: ignore[arg-type]
        level=defaults["compression_level"].default,
        mtime=defaults["archive_mtime"].default,
        min_saving=defaults["compression_min_saving"].default,
    )
    return sink.getvalue()


async def test_register_prints_the_two_lines(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """Exit 0, exactly the original's two lines, the artifacts in the registry byte for byte, nothing left."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Workflow execution arn for model registration process: arn:aws:states:us-west-2:")
    assert lines[1].startswith("Model id for model being registered: model-")
    model_id = lines[1].rsplit(" ", 1)[1]
    for name in ("model", "payload"):
        obj = await s3.get_object(Bucket=stack.registry_bucket, Key=f"models/{model_id}/{name}.tar.gz")
        async with obj["Body"] as body:
            assert await body.read() == expected_archive(job[name]), name
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert "Workflow execution arn" not in result.stderr


@pytest.mark.parametrize(
    "extra",
    [{"BOTO_DISABLE_CRT": "true"}, {"REGISTRAR_S3_CHECKSUM_ALGORITHM": "CRC64NVME"}],
    ids=["plain-botocore", "crc64nvme"],
)
async def test_upload_streams_a_directory(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, extra: dict[str, str]
) -> None:
    """`upload DIR s3://...` puts the deterministic archive there and prints its URI, size, sha256
    and integrity level (moto checks nothing: size-only):
    with botocore as `pip install async-registrar` has it (no AWS CRT), and with CRC64NVME."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    key = settings.s3_prefix + "uploaded.tar.gz"
    uri = f"s3://{settings.s3_bucket}/{key}"
    result = run(environment(stack, settings, job, **extra), "upload", str(job["model"]), uri)
    assert result.returncode == 0, result.stderr
    expected = expected_archive(job["model"])
    assert result.stdout.split() == [uri, str(len(expected)), hashlib.sha256(expected).hexdigest(), "size-only"]
    obj = await s3.get_object(Bucket=settings.s3_bucket, Key=key)
    async with obj["Body"] as body:
        assert await body.read() == expected
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]


@pytest.mark.parametrize("stdout", ["closed pipe", "/dev/full"])
async def test_a_result_that_cannot_be_written_exits_120_without_a_traceback(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, stdout: str
) -> None:
    """The upload is done, but its result line cannot be written: the pipe's reader went away, or
    the disk is full.  Exit 120 (as the README's table says), one `error:` line, no traceback:
    not exit 1, "unexpected error", as if it were a bug."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    key = settings.s3_prefix + "unreported.tar.gz"
    command = [sys.executable, "-m", "async_registrar", "upload", str(job["model"]), f"s3://{settings.s3_bucket}/{key}"]
    env = environment(stack, settings, job)
    if stdout == "closed pipe":
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None
        process.stdout.close()  # the reader goes away before the result comes
        _, stderr = process.communicate(timeout=60)
        code = process.returncode
    else:
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
        code, stderr = done.returncode, done.stderr
    assert code == 120, stderr
    assert "error: done, but the result could not be written on stdout" in stderr
    assert "Traceback" not in stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]  # the upload itself is done


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("s3://{bucket}/{prefix}dir/", "ends with '/', a folder; name the object"),
        ("s3://Bad_Bucket/model.tar.gz", "'Bad_Bucket' is not an S3 bucket name"),
    ],
)
async def test_an_upload_target_that_names_no_object_is_exit_2(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, target: str, says: str
) -> None:
    """A target ending in '/' made an object named `dir/`; a bucket name S3 refuses was said to be
    "not of the form s3://bucket/key".  Both are usage errors (exit 2) saying what is wrong."""
    job = make_job(tmp_path, model_bytes=MiB)
    uri = target.format(bucket=settings.s3_bucket, prefix=settings.s3_prefix)
    result = run(environment(stack, settings, job), "upload", str(job["model"]), uri)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_lifecycle_rule_needs_no_registry_endpoint(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`sweep --install-lifecycle` asks no registry: it needs no --mims-endpoint (it was exit 2)."""
    bucket = f"lifecycle-{secrets.token_hex(4)}"
    await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    env = environment(stack, settings, make_job(tmp_path))
    env.pop("REGISTRAR_MIMS_ENDPOINT")
    result = run(env, "sweep", "--install-lifecycle", "--bucket", bucket, "--prefix", "runs/")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Filter"]["Prefix"] == "runs/"
    await s3.delete_bucket_lifecycle(Bucket=bucket)
    await s3.delete_bucket(Bucket=bucket)


#: `python -m async_registrar`, with SIGINT sent as botocore starts to load: while the
#: command still imports, before it handles signals itself.
SIGINT_WHILE_LOADING = """
import os, runpy, signal, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "botocore":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv[0] = "async_registrar"
runpy.run_module("async_registrar", run_name="__main__", alter_sys=True)
"""


def upload_interrupted(script: str, tmp_path: Path, **options: Any) -> subprocess.CompletedProcess[str]:
    """`upload` of `tmp_path` run by `script` (which sends the process SIGINT at some point of its
    start), with nothing but PATH and HOME in its environment."""
    return subprocess.run(
        [sys.executable, "-c", script, "upload", str(tmp_path), "s3://bucket/key"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        **options,
    )


def test_sigint_while_the_command_loads_is_130_without_a_traceback(tmp_path: Path) -> None:
    """SIGINT in the first few hundred milliseconds (the command still importing, before it handles
    signals itself) printed Python's KeyboardInterrupt traceback; it is one `error:` line, 130.
    The signal is sent from inside the process as botocore starts to load: a signal sent from
    here, on seeing some import, could land anywhere on a loaded machine."""
    done = upload_interrupted(SIGINT_WHILE_LOADING, tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert "interrupted by SIGINT" in done.stderr


def test_a_command_started_with_sigint_ignored_still_ignores_it_while_it_loads(tmp_path: Path) -> None:
    """A background job of a script (or `nohup`) starts with SIGINT ignored, so that the
    terminal's Ctrl-C is not for it: the handler for SIGINT while loading must not take that
    over.  The command goes on and ends with its own code (here: no credentials, 2)."""
    done = upload_interrupted(
        SIGINT_WHILE_LOADING,
        tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # before exec only
    )
    assert "interrupted by SIGINT" not in done.stderr
    assert done.returncode not in (130, -signal.SIGINT), done.stderr


#: The console script's two steps (import the entry point, call it), with SIGINT sent at
#: the moment `main` is entered: between two statements no `try` of the command covers.
SIGINT_ENTERING_MAIN = """
import os, signal, sys
from async_registrar._entrypoint import main
def trace(frame, event, arg):
    if event == "call" and frame.f_code is main.__code__:
        sys.settrace(None)
        os.kill(os.getpid(), signal.SIGINT)
sys.settrace(trace)
sys.exit(main())
"""


def test_sigint_as_the_entry_point_is_entered_is_130_without_a_traceback(tmp_path: Path) -> None:
    """A SIGINT landing as `main` is entered, after its module was imported and before its
    `try`, ended the process with Python's KeyboardInterrupt traceback (-2; CI met it once
    in the test above); it is the same one line and 130 as a SIGINT during the imports."""
    done = upload_interrupted(SIGINT_ENTERING_MAIN, tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert "interrupted by SIGINT before anything started" in done.stderr


def run_unprivileged(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user whom file modes bind: root reads anything, so as root it runs
    without its capabilities (setpriv); the test is skipped where setpriv is missing."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: nothing stops root's reads")
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-all"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "async_registrar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", ["check", "register"])
async def test_an_unreadable_file_is_found_before_any_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, command: str
) -> None:
    """A file the job cannot read was found only when the archive reached it, the upload under
    way (and `check` said 0): it is an input problem (exit 3) of the scan now, named with the fix."""
    job = make_job(tmp_path)
    secret = job["model"] / "secret.bin"
    secret.write_bytes(b"x" * 1000)
    secret.chmod(0)
    done = run_unprivileged(environment(stack, settings, job), command)
    assert done.returncode == 3, done.stderr
    assert f"{secret}: cannot be read by this process" in done.stderr
    assert "chmod a+r" in done.stderr
    assert "uploading" not in done.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def test_an_unreadable_configuration_file_is_exit_2_like_a_missing_one(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    """A configuration file the job cannot read was exit 3 (an input), a missing one exit 2: both are
    configuration problems (exit 2), the file named with the fix."""
    job = make_job(tmp_path)
    job["config"].chmod(0)
    done = run_unprivileged(environment(stack, settings, job), "check")
    assert done.returncode == 2, done.stderr
    assert f"{job['config']}: cannot read the configuration file" in done.stderr
    assert "chmod a+r" in done.stderr


def test_upload_on_a_terminal_draws_a_live_progress_line(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """With stderr on a terminal (a pty here), upload progress is a bar redrawn in place."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    uri = f"s3://{settings.s3_bucket}/{settings.s3_prefix}tty.tar.gz"
    controller, terminal = pty.openpty()
    shown = b""
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "upload", str(job["model"]), uri],
            env=environment(stack, settings, job, COLUMNS="200"),
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)  # the child has its own: reading ends (EIO) once it exits
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # read as it writes: a full pty would block it
            if select.select([controller], [], [], 1)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
        process.wait(timeout=10)
    finally:
        os.close(controller)
    out = shown.decode()
    assert process.returncode == 0, out
    assert re.search(r"model \[[#-]{20}\] +\d+% \d+/\d+ MiB, \d+ MiB/s", out), out
    # The bar is erased before the next log record: the upload's "(done)" line.
    assert re.search(r"\r\x1b\[K[\d:]+ INFO async_registrar.cli: model: [\d.]+ MiB uploaded in .*\(done\)", out), out


def test_options_override_the_environment(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """--config beats REGISTRAR_CONFIG_PATH: a bad file through the option is what gets read."""
    job = make_job(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = run(environment(stack, settings, job), "register", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: the configuration must be a JSON object" in result.stderr


def test_invalid_config_exits_2_naming_every_problem(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """Exit 2 before anything is uploaded, with all the problems listed."""
    config = registration_config(model_registration_region="mars", model_ownr="me", model_domain=7)
    del config["model_owner"]
    job = make_job(tmp_path, config=config)
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    for needle in (
        "(4 problems)",
        "model_domain: Input should be a valid string",
        "model_registration_region",
        "model_owner: required field is missing",
        "model_ownr: unknown key (did you mean 'model_owner'?)",
    ):
        assert needle in result.stderr


async def test_empty_model_directory_exits_3(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """Exit 3 naming the directory, and nothing in S3."""
    job = make_job(tmp_path)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = run(environment(stack, settings, job), "register", "--model", str(empty))
    assert result.returncode == 3, result.stderr
    assert f"model directory {empty} holds no files" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def test_missing_settings_exit_2(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """No bucket and no endpoint: both named, by option and variable."""
    job = make_job(tmp_path)
    env = environment(stack, settings, job)
    del env["REGISTRAR_S3_BUCKET"], env["REGISTRAR_MIMS_ENDPOINT"]
    result = run(env, "register")
    assert result.returncode == 2
    assert "--bucket / REGISTRAR_S3_BUCKET: required" in result.stderr
    assert "--mims-endpoint / REGISTRAR_MIMS_ENDPOINT: required" in result.stderr


async def test_missing_bucket_exits_4(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """A bucket that does not exist is a storage failure, named."""
    job = make_job(tmp_path)
    result = run(environment(stack, settings, job), "register", "--bucket", "no-such-bucket-for-cli")
    assert result.returncode == 4, result.stderr
    assert "NoSuchBucket" in result.stderr
    assert "no-such-bucket-for-cli" in result.stderr


async def test_failed_registration_exits_5(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """FAILED: exit 5 with the registry's reason; the temporary objects are gone."""
    job = make_job(tmp_path)
    with mims_server(stack, fail_registrations="owner not allowed") as failing:
        result = run(environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=failing.endpoint), "register")
    assert result.returncode == 5, result.stderr
    assert "FAILED: owner not allowed" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def kept_and_named(stderr: str, registry: ThreadedMimsServer) -> tuple[str, str]:
    """The one registration the stderr names as kept (its id and kept prefix), checked against the registry."""
    match = re.search(
        r"registration (reg-\w+) \(model id (model-\w+), us-west-2\) is (PENDING|IN_PROGRESS); "
        r"its artifacts are kept under (s3://\S+/)",
        stderr,
    )
    assert match, stderr
    registration_id, model_id, _, prefix = match.groups()
    held = registry.registration(registration_id)
    assert held is not None
    assert held.model_id == model_id
    assert "re-run with the same lineage id (MODS_WORKFLOW_EXECUTION_ID=wf-cli) and the same inputs to resume" in stderr
    return registration_id, prefix


def resumes(env: dict[str, str], registry: ThreadedMimsServer, registration_id: str) -> None:
    """A re-run with the same lineage id follows the kept registration to SUCCEEDED: no second
    registration, nothing uploaded again, the two lines printed (the registry, holding it
    unfinished, lets it finish once the re-run follows it)."""
    result = run_releasing(env, registry, "register")
    assert result.returncode == 0, result.stderr
    assert f"resuming registration {registration_id}" in result.stderr, result.stderr
    assert "nothing to upload" in result.stderr, result.stderr
    assert "uploading model" not in result.stderr, result.stderr
    assert registry.registration_count == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(registration_id)


async def test_wait_timeout_exits_6_keeps_and_a_rerun_resumes(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Still unfinished at --wait-timeout: exit 6, the artifacts kept and named; the registry, reading
    them late, is not starved; a re-run resumes it to SUCCEEDED and then removes everything."""
    job = make_job(tmp_path)
    # Held until the re-run follows it: unfinished at --wait-timeout, however slow the machine.
    with mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as late:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=late.endpoint, MODS_WORKFLOW_EXECUTION_ID="wf-cli"
        )
        result = run(env, "register", "--wait-timeout", "1")
        assert result.returncode == 6, result.stderr
        assert result.stdout == ""
        assert "did not finish within 1 s (last status: IN_PROGRESS)" in result.stderr
        registration_id, prefix = kept_and_named(result.stderr, late)
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert sorted(f"s3://{settings.s3_bucket}/{k}" for k in kept) == [
            prefix + name for name in ("model.tar.gz", "payload.tar.gz", "registration.json")
        ]
        resumes(env, late, registration_id)
        assert late.registration(registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def register_signalled_once_submitted(
    env: dict[str, str], signum: int, **options: Any
) -> tuple[subprocess.Popen[str], list[str]]:
    """`register` in a subprocess, sent `signum` once it says the registry accepted (its
    "submitted:" line); the process, and the stderr lines read so far."""
    process = subprocess.Popen(
        [sys.executable, "-m", "async_registrar", "register"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "submitted:" in line:
            process.send_signal(signum)
            break
    return process, seen


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_signal_during_the_wait_keeps_and_a_rerun_resumes(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, signum: int, code: int
) -> None:
    """SIGTERM/SIGINT once the registry accepted: exit 143/130, the registration named with what was
    kept and how to resume; a re-run with the same lineage id resumes it, then nothing is left."""
    job = make_job(tmp_path)
    # Held until the re-run follows it: unfinished at the signal, however slow the machine.
    with mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as late:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=late.endpoint, MODS_WORKFLOW_EXECUTION_ID="wf-cli"
        )
        process, seen = register_signalled_once_submitted(env, signum)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == code, "".join(seen) + stderr
        assert f"{signal.Signals(signum).name} received: stopping and cleaning up" in stderr
        verb = "interrupted" if signum == signal.SIGINT else "terminated"
        assert f"error: {verb} by {signal.Signals(signum).name}:" in stderr
        assert stdout == ""
        registration_id, _ = kept_and_named(stderr, late)
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3
        resumes(env, late, registration_id)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_command_started_with_sigint_ignored_runs_on_through_one(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A background job of a script starts with SIGINT ignored (the terminal's Ctrl-C is for the
    script, not for it), as Python and POSIX tools keep it: the command took SIGINT over for its
    run and stopped on it.  It runs on, registers and cleans up; SIGTERM still stops it."""
    job = make_job(tmp_path)
    with mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as late:
        env = environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=late.endpoint, MODS_WORKFLOW_EXECUTION_ID="wf-ignored"
        )
        process, seen = register_signalled_once_submitted(
            env,
            signal.SIGINT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # before exec only
        )
        late.finish_processing()
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(seen) + stderr
    assert "SIGINT received" not in stderr
    assert len(stdout.splitlines()) == 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cleanup_denied_after_success_exits_0(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A role without s3:DeleteObject: registered is registered. Exit 0, the two lines, and a warning
    naming each key left behind."""
    job = make_job(tmp_path)
    denied = lambda method, target: (  # noqa: E731
        s3_error(403, "AccessDenied") if method == "DELETE" and "uploadId" not in target else None
    )
    with FaultProxy(stack.s3_endpoint, denied) as proxy:
        result = run(environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint), "register")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("Model id for model being registered: model-")
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    names = sorted(key.rsplit("/", 1)[1] for key in left)
    # The capability probe's objects could not be removed either (moto keeps even the damaged ones).
    assert [n for n in names if not n.startswith(".capabilities-")] == [
        "model.tar.gz",
        "payload.tar.gz",
        "registration.json",
    ]
    warning = next(line for line in result.stderr.splitlines() if "remove these by hand" in line)
    assert "WARNING" in warning
    for key in left:
        assert f"s3://{settings.s3_bucket}/{key}" in warning
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def test_help_lists_every_option_with_its_variable() -> None:
    """`register --help` documents the contract's options, variables and defaults."""
    result = subprocess.run(
        [sys.executable, "-m", "async_registrar", "register", "--help"], capture_output=True, text=True, check=True
    )
    for option, variable in (
        ("--model", "REGISTRAR_MODEL_PATH"),
        ("--payload", "REGISTRAR_PAYLOAD_PATH"),
        ("--config", "REGISTRAR_CONFIG_PATH"),
        ("--metadata", "REGISTRAR_METADATA_PATH"),
        ("--bucket", "REGISTRAR_S3_BUCKET"),
        ("--prefix", "REGISTRAR_S3_PREFIX"),
        ("--mims-endpoint", "REGISTRAR_MIMS_ENDPOINT"),
        ("--wait-timeout", "REGISTRAR_WAIT_TIMEOUT"),
    ):
        assert option in result.stdout
        assert variable in result.stdout
    assert "/opt/ml/processing/input/model" in result.stdout


async def test_a_truncated_prebuilt_archive_exits_3(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Checked while streaming: the parts already sent are aborted, exit 3 names the file."""
    job = make_job(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(12 * MiB))
    archive = tmp_path / "full.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(src), "."], check=True)
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / "model.tar.gz").write_bytes(archive.read_bytes()[: 9 * MiB])
    result = run(environment(stack, settings, job), "register", "--model", str(prebuilt))
    assert result.returncode == 3, result.stderr
    assert f"{prebuilt / 'model.tar.gz'} is not a usable tar.gz" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_links_and_special_files_exit_3(tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any) -> None:
    """Every offending entry of the model directory is listed in one message, before any upload."""
    job = make_job(tmp_path)
    (job["model"] / "link").symlink_to("/etc/passwd")
    os.mkfifo(job["model"] / "pipe")
    result = run(environment(stack, settings, job), "register")
    assert result.returncode == 3, result.stderr
    assert "link: symbolic link" in result.stderr
    assert "pipe: named pipe" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_exit_message_is_written_for_sagemaker(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """On failure, one line goes to <output>/message (SageMaker shows it as the job's reason)."""
    job = make_job(tmp_path)
    output = tmp_path / "output"
    output.mkdir()
    env = environment(stack, settings, job, REGISTRAR_OUTPUT_DIR=str(output))
    result = run(env, "register", "--model", str(tmp_path / "missing"))
    assert result.returncode == 3
    message = (output / "message").read_text()
    assert (
        message == f"model path {tmp_path / 'missing'} does not exist; mount the model there or pass its "
        "directory with --model\n"
    )


#: The command's entry point, run as `python -c` with one exit handler of the caller's that
#: writes to stdout (without flushing it) and one object whose teardown would say so.
ENDING = """
import atexit, sys
atexit.register(lambda: print(f"exit handler ran, switch interval {sys.getswitchinterval()}"))
class Torn:
    def __del__(self):
        print("module torn down")
keep = Torn()
from async_registrar._entrypoint import main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["upload", "{tmp}", "not-an-s3-uri"], 2, "upload target"),  # a usage error the command returns
        (["upload", "{tmp}/missing", "s3://bucket/model.tar.gz"], 3, "missing"),
    ],
)
def test_the_command_ends_its_process_with_its_code_output_and_exit_handlers(
    tmp_path: Path, args: list[str], code: int, said: str
) -> None:
    """The command ends its process itself, without the teardown of every module (~50 ms of
    each run): its exit code, what it printed on a pipe and the exit handlers' output are
    all still there; only the teardown is skipped.  It runs with a 1 ms switch interval."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRAR_", "AWS_", "PYTHONUNBUFFERED"))}
    env |= {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"}
    env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"  # nothing listens: the input is refused first
    done = subprocess.run(
        [sys.executable, "-c", ENDING, *(a.format(tmp=tmp_path) for a in args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code, done.stderr
    assert said in done.stderr
    assert done.stdout == "exit handler ran, switch interval 0.001\n"


#: The entry point, with an exit handler that says which of httpx's command-line
#: dependencies the command loaded.
LOADED = """
import atexit, sys
atexit.register(lambda: print(sorted({m.split(".")[0] for m in sys.modules} & {"click", "rich", "pygments"})))
from async_registrar._entrypoint import main
sys.exit(main())
"""


def test_the_command_does_not_load_httpx_s_command_line(tmp_path: Path) -> None:
    """httpx imports its command line (click, rich, pygments: ~40 ms of a 0.45 s start-up)
    wherever those are installed, as they are here; the command never runs it."""
    for package in ("click", "rich", "pygments"):
        pytest.importorskip(package)  # installed, or there is nothing to keep out
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRAR_", "AWS_"))}
    env |= {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"}
    env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"  # nothing listens: the input is refused first
    done = subprocess.run(
        [sys.executable, "-c", LOADED, "upload", str(tmp_path / "missing"), "s3://bucket/model.tar.gz"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "[]\n"


#: The entry point around a command that prints its result line and returns `argv[1]`.
RESULT_LINE = """
import sys
import async_registrar._cli as cli
cli.main = lambda: (sys.stdin.read(), print("the result line"), int(sys.argv[1]))[2]  # once stdin ends
from async_registrar._entrypoint import main
sys.exit(main())
"""


@pytest.mark.parametrize(("code", "ends"), [(0, 120), (5, 5)])
def test_a_stdout_nobody_reads_any_more_ends_a_success_with_120_and_keeps_a_failure(code: int, ends: int) -> None:
    """The result line cannot be written (the reader of the pipe is gone): a command that
    succeeded ends with 120, as the interpreter's own exit does, not 0 with its line lost;
    one that failed keeps its documented code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the line waits in the buffer
    process = subprocess.Popen(
        [sys.executable, "-c", RESULT_LINE, str(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    process.stdout.close()  # the reader goes away; then the child, reading stdin to its end, prints
    process.stdin.close()
    assert process.wait(timeout=60) == ends
