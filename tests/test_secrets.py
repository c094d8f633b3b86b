"""Secrets: with DEBUG logging, no secret key, session token or signature is ever written."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_registrar import Settings
from async_registrar._local import SECRET_KEY, LocalStack

from .conftest import make_job, mims_server
from .test_cli import environment, run

TOKEN = "FAKE-SESSION-TOKEN-7d1c0ffee"


@pytest.mark.parametrize("outcome", ["success", "failed", "storage"])
def test_debug_runs_never_print_credentials(
    tmp_path: Path, stack: LocalStack, settings: Settings, outcome: str
) -> None:
    """Success, a FAILED registration and a storage failure, all at DEBUG: nothing secret anywhere."""
    job = make_job(tmp_path)
    output = tmp_path / "output"
    output.mkdir()
    extra = {"AWS_SESSION_TOKEN": TOKEN, "REGISTRAR_LOG_LEVEL": "DEBUG", "REGISTRAR_OUTPUT_DIR": str(output)}
    if outcome == "storage":
        extra["REGISTRAR_S3_BUCKET"] = "no-such-bucket-secrets"
    with mims_server(stack, fail_registrations="rejected by policy" if outcome == "failed" else None) as registry:
        env = environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=registry.endpoint, **extra)
        result = run(env, "register")
    assert result.returncode == {"success": 0, "failed": 5, "storage": 4}[outcome], result.stderr
    assert "DEBUG" in result.stderr  # the logging really was at DEBUG
    message = (output / "message").read_text() if outcome != "success" else ""
    if outcome != "success":
        assert message.strip()
        assert len(message.splitlines()) == 1
    for text in (result.stdout, result.stderr, message):
        assert SECRET_KEY not in text
        assert TOKEN not in text
        assert "Signature=" not in text
        assert "X-Amz-Security-Token" not in text
        assert "uploadId=" not in text  # URLs are logged without their query strings
