"""`--log-format json`: one JSON object per line on stderr, with the fields a log pipeline
keys on, and the same redaction as the text log (issue 18, part 3)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from async_registrar import JsonFormatter, Settings, current_log_fields
from async_registrar._local import SECRET_KEY, LocalStack
from async_registrar._log_fields import log_fields

from .conftest import MiB, make_job, mims_server
from .test_cli import environment, run

TOKEN = "FAKE-SESSION-TOKEN-json-5e1f"


def records(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as JSON (a line that is not fails the test, naming it)."""
    parsed = []
    for line in stderr.splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")
    for record in parsed:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    return parsed


def test_a_registration_logs_json_lines_with_its_fields(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    """Each line is a JSON object; upload lines carry the run id, phase and artifact, progress
    carries bytes, parts and rate, the submission its registration id and region, and the last
    line the exit code. stdout keeps the original's two lines."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    result = run(environment(stack, settings, job), "--log-format", "json", "register")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    lines = records(result.stderr)
    model_lines = [r for r in lines if r.get("phase") == "upload" and r.get("artifact") == "model"]
    assert model_lines, "no line of the model's upload"
    assert all(r["run_id"].startswith("run-") and r["attempt"] for r in model_lines)
    done = [r for r in lines if r.get("event") == "upload_progress" and r.get("artifact") == "model" and r["done"]]
    assert len(done) == 1
    assert done[0]["bytes"] > 12 * MiB
    assert done[0]["parts"] == 4  # 5 MiB parts (the example model adds ~6 MiB)
    assert done[0]["rate"] > 0
    submitted = [r for r in lines if r.get("event") == "registration_submitted"]
    assert len(submitted) == 1
    assert submitted[0]["registration_id"].startswith("reg-")
    assert submitted[0]["region"] == "us-west-2"
    waiting = [r for r in lines if r.get("phase") == "wait"]
    assert waiting
    assert all(r["registration_id"] == submitted[0]["registration_id"] for r in waiting)
    assert any(r.get("phase") == "cleanup" for r in lines)
    assert lines[-1]["event"] == "exit"
    assert lines[-1]["exit_code"] == 0


@pytest.mark.parametrize("outcome", ["storage", "failed"])
def test_a_failure_is_one_json_error_with_its_exit_code_and_no_secret(
    tmp_path: Path, stack: LocalStack, settings: Settings, outcome: str
) -> None:
    """At DEBUG, with a session token: a storage failure (exit 4) and a FAILED registration
    (exit 5) end with one ERROR record naming the exit code, then the exit record; no
    secret, signature or upload id anywhere (REGISTRAR_LOG_FORMAT set in the environment)."""
    job = make_job(tmp_path)
    extra = {"AWS_SESSION_TOKEN": TOKEN, "REGISTRAR_LOG_LEVEL": "DEBUG", "REGISTRAR_LOG_FORMAT": "JSON"}
    if outcome == "storage":
        extra["REGISTRAR_S3_BUCKET"] = "no-such-bucket-json"
    with mims_server(stack, fail_registrations="rejected by policy" if outcome == "failed" else None) as registry:
        result = run(environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=registry.endpoint, **extra), "register")
    code = {"storage": 4, "failed": 5}[outcome]
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = records(result.stderr)
    assert any(r["level"] == "DEBUG" for r in lines)  # the logging really was at DEBUG
    errors = [r for r in lines if r.get("event") == "error"]
    assert len(errors) == 1
    assert errors[0]["level"] == "ERROR"
    assert errors[0]["exit_code"] == code
    assert ("no-such-bucket-json" if outcome == "storage" else "rejected by policy") in errors[0]["message"]
    assert lines[-1] == {**lines[-1], "event": "exit", "exit_code": code}
    for text in (result.stdout, result.stderr):
        assert SECRET_KEY not in text
        assert TOKEN not in text
        assert "Signature=" not in text
        assert "X-Amz-Security-Token" not in text
        assert "uploadId=" not in text


def test_an_unknown_log_format_is_a_usage_error(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    job = make_job(tmp_path)
    result = run(environment(stack, settings, job, REGISTRAR_LOG_FORMAT="yaml"), "check")
    assert result.returncode == 2
    assert "'yaml' is not a log format" in result.stderr
    assert "REGISTRAR_LOG_FORMAT" in result.stderr


async def test_fields_follow_tasks_and_threads_and_values_are_redacted() -> None:
    """The formatter puts the context's fields on each line, in tasks and worker threads a
    block starts, without leaking them out of it; URLs lose their query strings."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("async_registrar.test_json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_fields(run_id="run-1", phase="upload", region=None):
            assert current_log_fields() == {"run_id": "run-1", "phase": "upload"}

            async def in_task(name: str) -> None:
                with log_fields(artifact=name):
                    logger.info("task %s", name)
                    await anyio.to_thread.run_sync(lambda: logger.info("thread %s", name))

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_task, "model")
                tg.start_soon(in_task, "payload")
            logger.info(
                "see https://bucket.s3.amazonaws.com/k?X-Amz-Signature=abc",
                extra={"fields": {"uri": "https://user:pw@host/x?token=1"}},
            )
        logger.info("outside")
        try:
            raise ValueError("https://host/p?X-Amz-Credential=secret")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_message = {line["message"]: line for line in lines}
    for name in ("model", "payload"):
        for where in ("task", "thread"):
            line = by_message[f"{where} {name}"]
            assert (line["run_id"], line["phase"], line["artifact"]) == ("run-1", "upload", name)
    redacted = by_message["see https://bucket.s3.amazonaws.com/k"]
    assert redacted["uri"] == "https://host/x"
    assert "run_id" not in by_message["outside"]
    assert "X-Amz-Credential" not in by_message["failed"]["exception"]
    assert "ValueError" in by_message["failed"]["exception"]
