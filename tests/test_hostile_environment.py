"""Black-box: the registrar in a hostile container environment, as real clusters run jobs.

What a cluster does to a job's process, not to its inputs: proxy variables, TLS bundle
variables, AWS SDK variables, an open-file limit, a uid without a passwd entry on a read-only
filesystem, a C locale, stderr going nowhere, registry and S3 endpoints given as IPv6
literals or with a trailing slash. Each case runs the command as a subprocess against the
session's moto S3 and reference MIMS on loopback (conftest's `environment`) and holds it to
the README: a success prints the two lines and leaves nothing; a failure is one `error:` line
naming the variable or file and what to do, a documented exit code, no traceback, nothing
left in S3 (no object, no open multipart upload).

Cases marked `xfail(strict=True)` pin a defect found this way; the reason names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack

from .conftest import environment, leftovers, make_job

TWO_LINES = ("Workflow execution arn for model registration process: ", "Model id for model being registered: ")


def run(
    env: dict[str, str],
    *args: str,
    preexec: Callable[[], None] | None = None,
    wrapper: list[str] | None = None,
    stderr: Any = subprocess.PIPE,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The command as a job runs it: a subprocess with exactly `env`."""
    return subprocess.run(
        [*(wrapper or []), sys.executable, "-m", "async_registrar", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=90,
        check=False,
        preexec_fn=preexec,
        cwd=cwd,
    )


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def registered(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a success (exit 0, the two lines and nothing else on stdout); its model id."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(TWO_LINES[0]), result.stdout
    assert lines[1].startswith(TWO_LINES[1]), result.stdout
    return lines[1].rsplit(" ", 1)[1]


def refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert a documented failure: `code`, an `error:` line, no traceback, stdout empty, and each
    needle named on stderr. Returns stderr."""
    err = result.stderr
    assert "Traceback" not in err, err
    assert result.returncode == code, err
    assert result.stdout == "", result.stdout
    assert "error:" in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not named:\n{err}"
    return err


async def nothing_left(s3: Any, settings: Settings) -> None:
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def members(s3: Any, stack: LocalStack, model_id: str) -> list[str]:
    """The member names of the model archive the registry holds for `model_id`."""
    obj = await s3.get_object(Bucket=stack.registry_bucket, Key=f"models/{model_id}/model.tar.gz")
    async with obj["Body"] as body:
        data = await body.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


# --- proxies ------------------------------------------------------------------------------
#
# README says nothing about proxies. botocore (S3) honours HTTP_PROXY/HTTPS_PROXY/NO_PROXY,
# httpx (the registry) those and ALL_PROXY: so a job in a cluster with proxy variables sends
# both through the proxy unless NO_PROXY names the hosts.


def localhost_s3(stack: LocalStack) -> str:
    """The session's S3 endpoint by the name `localhost`: NO_PROXY=localhost then spares S3 alone."""
    return stack.s3_endpoint.replace("127.0.0.1", "localhost")


async def test_no_proxy_naming_the_hosts_spares_both_clients(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """HTTP_PROXY and ALL_PROXY at a dead proxy, NO_PROXY naming the hosts: both clients go direct."""
    dead = f"http://127.0.0.1:{dead_port()}"
    env = environment(stack, settings, make_job(tmp_path), HTTP_PROXY=dead, ALL_PROXY=dead, NO_PROXY="127.0.0.1")
    registered(run(env, "register"))
    await nothing_left(s3, settings)


async def test_s3_through_a_dead_proxy_is_exit_4_naming_the_proxy_and_uploads_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """HTTP_PROXY at a dead proxy with a password in it: S3 fails at the preflight (exit 4), the
    log names the proxy, the password is masked, nothing is written."""
    port = dead_port()
    env = environment(
        stack,
        settings,
        make_job(tmp_path),
        HTTP_PROXY=f"http://bob:proxy-pass-4417@127.0.0.1:{port}",
        REGISTRAR_PREFLIGHT_TIMEOUT="1",
        REGISTRAR_LOG_LEVEL="DEBUG",
    )
    err = refused(run(env, "register"), 4, "HeadBucket")
    assert f'proxy URL: "http://127.0.0.1:{port}"' in err
    assert "proxy-pass-4417" not in err
    await nothing_left(s3, settings)


async def test_a_registry_behind_a_dead_proxy_names_the_proxy(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """S3 spared by NO_PROXY, the registry sent to a dead HTTP_PROXY: exit 5, and stderr says proxy."""
    port = dead_port()
    env = environment(
        stack,
        settings,
        make_job(tmp_path),
        AWS_ENDPOINT_URL_S3=localhost_s3(stack),
        HTTP_PROXY=f"http://127.0.0.1:{port}",
        NO_PROXY="localhost",
        REGISTRAR_PREFLIGHT_TIMEOUT="1",
    )
    err = refused(run(env, "register"), 5, stack.mims_endpoint)
    await nothing_left(s3, settings)
    assert "proxy" in err.lower() or str(port) in err, err


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ALL_PROXY", "socks5://127.0.0.1:1080"), ("HTTP_PROXY", "ftp://127.0.0.1:2121")],
    ids=["all-proxy-socks5", "http-proxy-ftp"],
)
async def test_a_proxy_variable_the_client_cannot_use_is_a_configuration_error(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, variable: str, value: str
) -> None:
    """A proxy URL of a scheme the registry client cannot use: exit 2 naming the variable."""
    env = environment(stack, settings, make_job(tmp_path), **{variable: value})
    result = run(env, "register")
    await nothing_left(s3, settings)
    refused(result, 2, variable)


# --- TLS bundles and AWS SDK variables ---------------------------------------------------
#
# README: "AWS_CA_BUNDLE is the bundle botocore trusts, and SSL_CERT_FILE the one the registry
# client (httpx) trusts". A bundle variable left over from another image, naming a file this
# one lacks, is a configuration problem of the job.


async def test_ssl_cert_file_naming_a_missing_file_is_exit_2_naming_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SSL_CERT_FILE=/nonexistent/ca.pem: exit 2 naming SSL_CERT_FILE and the path."""
    env = environment(stack, settings, make_job(tmp_path), SSL_CERT_FILE="/nonexistent/ca.pem")
    result = run(env, "register")
    await nothing_left(s3, settings)
    refused(result, 2, "SSL_CERT_FILE", "/nonexistent/ca.pem")


async def test_aws_ca_bundle_naming_a_missing_file_is_named(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """AWS_CA_BUNDLE=/nonexistent/ca.pem: an error that names AWS_CA_BUNDLE and the path."""
    env = environment(
        stack, settings, make_job(tmp_path), AWS_CA_BUNDLE="/nonexistent/ca.pem", REGISTRAR_PREFLIGHT_TIMEOUT="1"
    )
    result = run(env, "register")
    await nothing_left(s3, settings)
    assert result.returncode in (2, 4), result.stderr
    refused(result, result.returncode, "AWS_CA_BUNDLE", "/nonexistent/ca.pem")


@pytest.mark.parametrize(
    "variable", ["AWS_DEFAULTS_MODE", "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT"], ids=["defaults-mode", "us-east-1"]
)
async def test_an_invalid_botocore_setting_variable_is_exit_2_naming_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, variable: str
) -> None:
    """An AWS SDK variable botocore refuses: exit 2 naming it, no traceback."""
    env = environment(stack, settings, make_job(tmp_path), **{variable: "bogus"})
    result = run(env, "register")
    await nothing_left(s3, settings)
    refused(result, 2, variable)


async def test_an_account_id_endpoint_mode_botocore_refuses_is_exit_2_naming_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """AWS_ACCOUNT_ID_ENDPOINT_MODE=bogus: exit 2 with the setting and its valid values."""
    env = environment(stack, settings, make_job(tmp_path), AWS_ACCOUNT_ID_ENDPOINT_MODE="bogus")
    refused(run(env, "register"), 2, "account_id_endpoint_mode", "bogus")
    await nothing_left(s3, settings)


@pytest.mark.parametrize(
    ("extra", "drop"),
    [
        ({"AWS_MAX_ATTEMPTS": "0", "AWS_RETRY_MODE": "bogus"}, None),
        ({"AWS_ENDPOINT_URL": "from-s3"}, "AWS_ENDPOINT_URL_S3"),
        ({"AWS_ENDPOINT_URL": "dead"}, None),
        ({"AWS_DEFAULT_REGION": "eu-west-1"}, None),
    ],
    ids=["retry-variables-ignored", "general-endpoint-only", "s3-endpoint-beats-general", "region-conflict"],
)
async def test_aws_variables_the_registrar_settles_itself(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, extra: dict[str, str], drop: str | None
) -> None:
    """AWS variables that would break botocore's defaults (no attempts, an unknown retry mode),
    AWS_ENDPOINT_URL alone or beside AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION against AWS_REGION:
    the registration goes through and leaves nothing."""
    values = {
        k: {"from-s3": stack.s3_endpoint, "dead": f"http://127.0.0.1:{dead_port()}"}.get(v, v) for k, v in extra.items()
    }
    env = environment(stack, settings, make_job(tmp_path), **values)
    if drop:
        del env[drop]
    registered(run(env, "register"))
    await nothing_left(s3, settings)


# --- process limits, identity, filesystem -------------------------------------------------


def open_files(limit: int) -> Callable[[], None]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return lower


async def test_a_low_open_file_limit_still_registers(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`ulimit -n 32`, a model of 40 files: registered, nothing left."""
    job = make_job(tmp_path)
    for i in range(40):
        (job["model"] / f"shard-{i:02}.bin").write_bytes(os.urandom(4096))
    registered(run(environment(stack, settings, job), "register", preexec=open_files(32)))
    await nothing_left(s3, settings)


async def test_running_out_of_file_descriptors_is_not_blamed_on_the_input(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`ulimit -n 9`: nothing left, and running out of descriptors is not blamed on the input (no
    chmod advice for a readable file); the error names the open-file limit. Where exactly the
    process runs out depends on how many connections are open at that moment: a run that does not
    (it registered) is skipped, not passed."""
    env = environment(stack, settings, make_job(tmp_path), REGISTRAR_PREFLIGHT_TIMEOUT="3")
    result = run(env, "register", preexec=open_files(9))
    await nothing_left(s3, settings)
    if result.returncode == 0:
        pytest.skip("registered at ulimit -n 9 this time: the descriptors sufficed")
    assert "Traceback" not in result.stderr, result.stderr
    assert "chmod" not in result.stderr, result.stderr
    assert "open file" in result.stderr.lower() or "ulimit" in result.stderr, result.stderr


def _can_sandbox() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    script = "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && exec unshare --user --map-user=12345 true"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


#: Every directory a process could write to made read-only, then a uid without a passwd entry.
SANDBOX = [
    "unshare",
    "-m",
    "sh",
    "-c",
    "for d in /tmp /var/tmp /dev/shm /root /work /run /home; do [ -d $d ] || continue; "
    "mount --bind $d $d && mount -o remount,bind,ro $d || exit 97; done; "
    'exec unshare --user --map-user=12345 --map-group=12345 "$@"',
    "sh",
]


@pytest.mark.skipif(not _can_sandbox(), reason="needs root, unshare and bind mounts")
async def test_a_uid_without_passwd_entry_on_a_read_only_filesystem_registers(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """uid 12345 with no passwd entry, HOME unset, TMPDIR missing, every writable directory
    read-only (the cwd too): the registrar writes nothing locally, so it registers and leaves nothing."""
    job = make_job(tmp_path)
    env = environment(stack, settings, job, TMPDIR="/nonexistent/tmp")
    del env["HOME"]
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    registered(run(env, "register", wrapper=SANDBOX, cwd="/"))
    await nothing_left(s3, settings)


# --- locale and non-ASCII names -----------------------------------------------------------

NON_ASCII = "poids-modèle-权重.txt"


async def test_non_ascii_names_under_the_c_locale_are_archived_as_utf8(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """LC_ALL=C LANG=C (Python's UTF-8 mode follows): a UTF-8 file name reaches the registry's
    archive as it is; a missing non-ASCII model path is named in the exit-3 error."""
    job = make_job(tmp_path)
    (job["model"] / NON_ASCII).write_text("héllo")
    env = environment(stack, settings, job, LC_ALL="C", LANG="C")
    model_id = registered(run(env, "register"))
    assert NON_ASCII in await members(s3, stack, model_id)
    missing = env | {"REGISTRAR_MODEL_PATH": str(tmp_path / "modèle-absent")}
    refused(run(missing, "register"), 3, "modèle-absent")
    await nothing_left(s3, settings)


async def test_a_utf8_name_is_not_refused_when_python_s_utf8_mode_is_off(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """LC_ALL=C PYTHONUTF8=0: a UTF-8 file name is archived as it is, not refused as "not UTF-8"."""
    job = make_job(tmp_path)
    (job["model"] / NON_ASCII).write_text("héllo")
    env = environment(stack, settings, job, LC_ALL="C", PYTHONUTF8="0")
    result = run(env, "register")
    await nothing_left(s3, settings)
    model_id = registered(result)
    assert NON_ASCII in await members(s3, stack, model_id)


# --- stderr going nowhere -----------------------------------------------------------------


@contextlib.contextmanager
def reader_gone() -> Iterator[int]:
    """A pipe's write end whose reader has already gone: every write is EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        yield write
    finally:
        os.close(write)


async def test_a_success_with_stderr_s_reader_gone_is_exit_0(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """stderr's reader gone, stdout fine: the two lines and exit 0."""
    env = environment(stack, settings, make_job(tmp_path))
    with reader_gone() as stderr:
        result = run(env, "register", stderr=stderr)
    await nothing_left(s3, settings)
    assert result.returncode == 0, result.returncode
    registered(result)


async def test_a_failure_with_stderr_s_reader_gone_keeps_its_code_and_its_message_file(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """stderr's reader gone, the model missing: exit 3, and REGISTRAR_OUTPUT_DIR/message written."""
    output = tmp_path / "output"
    output.mkdir()
    env = environment(
        stack,
        settings,
        make_job(tmp_path),
        REGISTRAR_MODEL_PATH=str(tmp_path / "absent"),
        REGISTRAR_OUTPUT_DIR=str(output),
    )
    with reader_gone() as stderr:
        result = run(env, "register", stderr=stderr)
    await nothing_left(s3, settings)
    assert (result.returncode, (output / "message").exists()) == (3, True)


async def test_a_command_started_with_stderr_closed_still_registers(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`register 2>&-`: the two lines on stdout and exit 0 (the log has nowhere to go)."""
    env = environment(stack, settings, make_job(tmp_path))
    result = run(env, "register", stderr=None, preexec=lambda: os.close(2))
    await nothing_left(s3, settings)
    assert result.returncode == 0, f"exit {result.returncode}, stdout {result.stdout!r}"
    registered(result)


# --- endpoints ------------------------------------------------------------------------------


@contextlib.contextmanager
def ipv6_relay(upstream: str) -> Iterator[str]:
    """A plain TCP relay on [::1] to `upstream` (http://127.0.0.1:port): the request, its Host
    header and signature, reach the server as the client sent them. Yields its endpoint."""
    host, port = upstream.removeprefix("http://").rsplit(":", 1)
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "::1", 0, family=socket.AF_INET6)
        state["endpoint"] = f"http://[::1]:{server.sockets[0].getsockname()[1]}"
        state["stop"] = stop = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        ready.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield state["endpoint"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_endpoints_given_as_ipv6_literals_register(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """AWS_ENDPOINT_URL_S3 and REGISTRAR_MIMS_ENDPOINT as http://[::1]:port (the latter with a
    trailing slash): both signatures hold over the bracketed Host; registered, nothing left."""
    with ipv6_relay(stack.s3_endpoint) as s3_v6, ipv6_relay(stack.mims_endpoint) as mims_v6:
        env = environment(
            stack, settings, make_job(tmp_path), AWS_ENDPOINT_URL_S3=s3_v6, REGISTRAR_MIMS_ENDPOINT=mims_v6 + "/"
        )
        registered(run(env, "register"))
    await nothing_left(s3, settings)


async def test_endpoints_by_host_name_with_a_trailing_slash_register(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Both endpoints as http://localhost:port/ (a name, a trailing slash), PYTHONOPTIMIZE=2 as
    some production images set it: registered, nothing left."""
    env = environment(
        stack,
        settings,
        make_job(tmp_path),
        AWS_ENDPOINT_URL_S3=localhost_s3(stack) + "/",
        REGISTRAR_MIMS_ENDPOINT=stack.mims_endpoint.replace("127.0.0.1", "localhost") + "/",
        PYTHONOPTIMIZE="2",
    )
    registered(run(env, "register"))
    await nothing_left(s3, settings)
