"""A newcomer's first hour: a missing extra, a mistyped log level, a path that is not there.

Each test runs the command line as a user would (a subprocess, a clean environment) and
checks the exit code and that the message says what to do.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from async_registrar import Settings
from async_registrar._local import ACCESS_KEY, LocalStack

from .conftest import leftovers, make_job, mims_server
from .test_cli import environment, run


def without(modules: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with `modules` not importable, as on an install without their extra."""
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    code = f"import sys; {blocked}; from async_registrar._cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("modules", "command", "extra"),
    [(["moto"], "demo", "local"), (["starlette", "uvicorn"], "mims-server", "mims")],
)
def test_a_missing_extra_exits_2_naming_what_to_install(modules: list[str], command: str, extra: str) -> None:
    """Not a bug report (exit 1, a traceback): exit 2 and the pip command that fixes it."""
    result = without(modules, command)
    assert result.returncode == 2, result.stderr
    assert f"pip install 'async-registrar[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "unexpected error" not in result.stderr


@pytest.mark.parametrize("level", ["TRACE", "10", "verbose"])
@pytest.mark.parametrize("where", ["variable", "option-before", "option-after"])
def test_a_bad_log_level_exits_2_with_the_accepted_values(level: str, where: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    if where == "variable":
        env["REGISTRAR_LOG_LEVEL"] = level
        args = ["check"]
    elif where == "option-before":
        args = ["--log-level", level, "check"]
    else:
        args = ["check", "--log-level", level]
    result = run(env, *args)
    assert result.returncode == 2, result.stderr
    assert f"{level!r} is not a log level" in result.stderr
    assert "DEBUG, INFO, WARNING, ERROR" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_log_level_works_after_the_command_and_ignores_case_and_blanks(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    """`check --log-level warning` quiets the INFO lines; `REGISTRAR_LOG_LEVEL="info "` is INFO."""
    env = environment(stack, settings, make_job(tmp_path))
    quiet = run(env, "check", "--log-level", "warning")
    assert quiet.returncode == 0, quiet.stderr
    assert " INFO " not in quiet.stderr
    assert "preflight passed" in quiet.stdout
    chatty = run({**env, "REGISTRAR_LOG_LEVEL": "info "}, "--log-level", "ERROR", "check", "--log-level", "info")
    assert chatty.returncode == 0, chatty.stderr
    assert " INFO " in chatty.stderr  # the option after the command wins


@pytest.mark.parametrize(
    ("option", "variable", "name"),
    [("--payload", "REGISTRAR_PAYLOAD_PATH", "nopayload"), ("--metadata", "REGISTRAR_METADATA_PATH", "nope.json")],
)
@pytest.mark.parametrize("given_by", ["option", "variable"])
async def test_a_named_path_that_does_not_exist_exits_3_naming_it(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, option: str, variable: str, name: str, given_by: str
) -> None:
    """A payload or metadata path the user named is not dropped silently; the defaults stay optional."""
    job = make_job(tmp_path)
    env = environment(stack, settings, job)
    env.pop(variable, None)
    missing = tmp_path / name
    if given_by == "option":
        result = run(env, "register", option, str(missing))
    else:
        result = run({**env, variable: str(missing)}, "register")
    assert result.returncode == 3, result.stderr
    assert f"{option} / {variable}: {missing}: no such file or directory" in result.stderr
    assert "leave the option and its variable unset" in result.stderr
    assert result.stdout == ""
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_default_container_paths_stay_optional(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """No payload or metadata named, none at the SageMaker paths: registered without them."""
    env = environment(stack, settings, make_job(tmp_path))
    env.pop("REGISTRAR_PAYLOAD_PATH")
    env.pop("REGISTRAR_METADATA_PATH", None)
    result = run(env, "register")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def test_upload_of_a_missing_path_says_what_to_give(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    env = environment(stack, settings, make_job(tmp_path))
    result = run(env, "upload", str(tmp_path / "nothing-here"), f"s3://{settings.s3_bucket}/x.tar.gz")
    assert result.returncode == 3, result.stderr
    assert "give the path of an existing directory" in result.stderr
    assert "--upload" not in result.stderr


async def test_upload_to_a_missing_bucket_names_the_target_not_an_option(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    env = environment(stack, settings, make_job(tmp_path))
    result = run(env, "upload", str(tmp_path / "model"), "s3://no-such-bucket-for-upload/x.tar.gz")
    assert result.returncode == 4, result.stderr
    assert "the bucket no-such-bucket-for-upload does not exist" in result.stderr
    assert "fix the s3://bucket/key target" in result.stderr
    assert "--bucket" not in result.stderr


def test_upload_without_credentials_exits_2_saying_how_to_provide_them(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    env = environment(stack, settings, make_job(tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name)
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = run(env, "upload", str(tmp_path / "model"), f"s3://{settings.s3_bucket}/x.tar.gz")
    assert result.returncode == 2, result.stderr
    assert "no usable AWS credentials" in result.stderr
    assert "AWS_ACCESS_KEY_ID" in result.stderr


def test_register_to_a_missing_bucket_is_one_error_line(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """No cleanup warnings and no 'remove these by hand' list for a bucket that does not exist."""
    env = environment(stack, settings, make_job(tmp_path), REGISTRAR_S3_BUCKET="no-such-bucket-at-all")
    result = run(env, "register")
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the bucket no-such-bucket-at-all does not exist (HeadBucket: 404 NoSuchBucket); create it, or fix "
        "--bucket / REGISTRAR_S3_BUCKET"
    ]
    assert " WARNING " not in result.stderr
    assert " ERROR " not in result.stderr
    assert "by hand" not in result.stderr


def test_a_metadata_uri_that_is_not_s3_says_so() -> None:
    result = run({"PATH": "/usr/bin:/bin", "PERFORMANCE_METADATA_PATH": "/tmp/metadata.json"}, "check")
    assert result.returncode == 2, result.stderr
    assert "PERFORMANCE_METADATA_PATH: must be the s3:// URI of a JSON object" in result.stderr
    assert "control characters" not in result.stderr


@pytest.mark.parametrize("command", ["register", "check", "demo", "upload", "mims-server"])
def test_every_command_has_a_description_an_example_and_its_variables(command: str) -> None:
    result = run({"PATH": "/usr/bin:/bin"}, command, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    description = text.partition("\n\n")[2].split("\n\n", 1)[0]
    assert description.strip(), "no description"
    assert f"async-registrar {command}" in text.split("example:\n", 1)[1].split("\n\n", 1)[0]
    assert "environment:\n" in text
    assert "exit codes:" in text
    if command == "upload":
        assert "AWS_ENDPOINT_URL_S3" in text
        assert "REGISTRAR_DEREFERENCE" in text


def test_the_top_level_help_lists_each_command_with_one_line() -> None:
    result = run({"PATH": "/usr/bin:/bin"}, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("register", "check", "demo", "upload", "mims-server"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.MULTILINE), command


#: Words that start a next step in a message: what to fix, set, check, install, run ...
NEXT_STEP = re.compile(
    r"\b(check|fix|set|pass|create|install|run|re-run|remove|give|use|raise|mount|rename|replace|put|"
    r"leave|rebuild|make sure|add|wait|needs)\b"
)


async def test_every_error_line_says_what_to_do(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """A catalogue of what a user runs into, through the CLI: each `error:` line names a next step."""
    job = make_job(tmp_path)
    env = environment(stack, settings, job, REGISTRAR_PREFLIGHT_TIMEOUT="1")
    empty = tmp_path / "empty"
    empty.mkdir()
    links = tmp_path / "links"
    links.mkdir()
    (links / "a").symlink_to("/etc/hostname")
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"model_domain": 3}')
    no_credentials = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and "SECRET" not in k}
    no_credentials |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    cases: list[tuple[str, dict[str, str], list[str]]] = [
        ("settings missing", {"PATH": env["PATH"]}, ["register"]),
        ("invalid config", env, ["register", "--config", str(bad_config)]),
        ("empty model", env, ["register", "--model", str(empty)]),
        ("links", env, ["register", "--model", str(links)]),
        ("named payload missing", env, ["register", "--payload", str(tmp_path / "nope")]),
        ("missing bucket", env, ["register", "--bucket", "no-such-bucket-next-step"]),
        ("no credentials", no_credentials, ["register"]),
        ("registry refused", env, ["register", "--mims-endpoint", "http://127.0.0.1:9"]),
        ("bad metadata uri", {**env, "PERFORMANCE_METADATA_PATH": "metadata.json"}, ["register"]),
        ("upload missing path", env, ["upload", str(tmp_path / "nope"), f"s3://{settings.s3_bucket}/x"]),
        ("upload bad target", env, ["upload", str(job["model"]), "not-a-uri"]),
    ]
    with mims_server(stack, signing_secrets={ACCESS_KEY: SecretStr("another-secret")}) as strict:
        cases.append(("signature refused", env, ["register", "--mims-endpoint", strict.endpoint]))
        with mims_server(stack, fail_registrations="owner not allowed") as failing:
            cases.append(("registration failed", env, ["register", "--mims-endpoint", failing.endpoint]))
            silent: list[str] = []
            for name, case_env, args in cases:
                result = run(case_env, *args)
                assert result.returncode not in (0, 1), f"{name}: {result.returncode}\n{result.stderr}"
                errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
                assert errors, f"{name}: no error line\n{result.stderr}"
                silent += [f"{name}: {line}" for line in errors if not NEXT_STEP.search(line)]
    assert silent == [], "\n".join(silent)
