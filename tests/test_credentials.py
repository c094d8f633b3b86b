"""botocore's credential and configuration exceptions, said as configuration errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    BotoCoreError,
    ConfigParseError,
    CredentialRetrievalError,
    EndpointConnectionError,
    InfiniteLoopConfigError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    UnauthorizedSSOTokenError,
)

from async_registrar import ConfigurationError, Registrar, Settings, _capabilities
from async_registrar._credentials import credential_errors

from .conftest import hooked, leftovers, make_job, request_for


@pytest.mark.parametrize(
    ("raised", "needles"),
    [
        pytest.param(NoCredentialsError(), ["no usable AWS credentials", "AWS_SECRET_ACCESS_KEY"], id="none"),
        pytest.param(
            PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
            ["AWS_SECRET_ACCESS_KEY is not set", "unset AWS_ACCESS_KEY_ID"],
            id="partial-env",
        ),
        pytest.param(
            PartialCredentialsError(provider="shared-credentials-file", cred_var="aws_secret_access_key"),
            ["aws_secret_access_key is missing", "AWS_SHARED_CREDENTIALS_FILE"],
            id="partial-file",
        ),
        pytest.param(ProfileNotFound(profile="prod"), ["'prod'", "AWS_PROFILE", "~/.aws/config"], id="profile"),
        pytest.param(ConfigParseError(path="/home/u/.aws/config"), ["/home/u/.aws/config", "INI"], id="parse"),
        pytest.param(
            CredentialRetrievalError(provider="custom-process", error_msg="exit 1"),
            ["CredentialRetrievalError", "exit 1", "AWS_PROFILE"],
            id="credential-process",
        ),
        pytest.param(
            InfiniteLoopConfigError(source_profile="a", visited_profiles=["a", "b"]),
            ["InfiniteLoopConfigError", "AWS_PROFILE"],
            id="source-profile-loop",
        ),
        pytest.param(UnauthorizedSSOTokenError(), ["aws sso login"], id="sso-expired"),
    ],
)
def test_each_credential_mistake_is_a_configuration_error_naming_the_fix(
    raised: BotoCoreError, needles: list[str]
) -> None:
    """The botocore exception becomes a ConfigurationError naming the variable, profile or file."""
    with pytest.raises(ConfigurationError) as caught, credential_errors():
        raise raised
    for needle in needles:
        assert needle in caught.value.message, caught.value.message
    assert caught.value.__cause__ is None  # no botocore traceback attached to the message


def test_other_botocore_errors_pass_through() -> None:
    """A failure to reach S3 is not a credential problem: it is left for `storage_errors`."""
    with pytest.raises(EndpointConnectionError), credential_errors():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")


STILL_EXPIRED = "Credentials were refreshed, but the refreshed credentials are still expired."


async def test_keys_going_stale_at_a_best_effort_call_leave_the_library_as_a_configuration_error(
    settings: Settings, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capability probe is best-effort: it maps S3's answers, not aiobotocore's RuntimeError
    for refreshed keys that are still expired.  `register()` raises the library's error naming
    the credentials (not a bare RuntimeError), and nothing is left."""
    monkeypatch.setattr(_capabilities, "_FOUND", {})  # the probe runs for this registrar

    def stale(params: dict[str, Any], **_: Any) -> None:
        if ".capabilities-" in params["url_path"]:
            raise RuntimeError(STILL_EXPIRED)

    with hooked(s3, ("before-call.s3.PutObject", stale)):
        async with Registrar(settings, s3_client=s3) as registrar:
            with pytest.raises(ConfigurationError, match="expired") as caught:
                await registrar.register(request_for(make_job(tmp_path)))
    assert caught.value.__cause__ is None
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_stray_json_error_in_a_registrar_call_is_not_called_a_credential_failure(settings: Settings) -> None:
    """Only inside an S3 call is a JSONDecodeError taken as the credential_process's output."""
    async with Registrar(settings) as registrar:
        with pytest.raises(json.JSONDecodeError), registrar._work():
            json.loads("not json")
