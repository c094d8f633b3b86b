"""AWS credentials: what goes wrong resolving them, said as what to do about it.

botocore reads the AWS configuration in three places a run goes through before it sends
anything: making the session (the profile, the config file), making a client (the
credentials, resolved there and then) and the preflight's own resolution.  A half-set
pair of variables, a profile that does not exist or a config file that is not INI raise
botocore's own exceptions there, which used to end the run as an "unexpected error"
(exit 1) with a traceback.  `credential_errors` turns each into a `ConfigurationError`
(exit 2) that names the variable, profile or file and how to fix it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from botocore.exceptions import (
    BotoCoreError,
    ConfigNotFound,
    ConfigParseError,
    CredentialRetrievalError,
    InvalidChecksumConfigError,
    InvalidConfigError,
    InvalidDefaultsMode,
    InvalidEndpointConfigurationError,
    InvalidIMDSEndpointModeError,
    InvalidRetryConfigurationError,
    InvalidRetryModeError,
    InvalidS3UsEast1RegionalEndpointConfigError,
    InvalidSTSRegionalEndpointsConfigError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    RefreshWithMFAUnsupportedError,
    SSOError,
    TokenRetrievalError,
    UnknownCredentialError,
)

from ._errors import ConfigurationError, redact

__all__ = ["CREDENTIAL_ERRORS", "NO_CREDENTIALS", "credential_errors", "credential_problem", "is_credential_failure"]

NO_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run with an IAM role "
    "(a SageMaker job's execution role, an instance profile, a task role)"
)

_CONFIG_FILE = "the AWS config file (AWS_CONFIG_FILE, default ~/.aws/config)"
_CREDENTIALS_FILE = "the AWS credentials file (AWS_SHARED_CREDENTIALS_FILE, default ~/.aws/credentials)"

#: Where botocore's providers (by their `METHOD`) found what they found.
_PROVIDERS = {
    "env": "the environment",
    "shared-credentials-file": _CREDENTIALS_FILE,
    "config-file": _CONFIG_FILE,
    "custom-process": "the profile's credential_process",
    "container-role": "the container credentials endpoint (AWS_CONTAINER_CREDENTIALS_*_URI)",
    "iam-role": "the instance metadata service",
}

#: botocore's refusals of a setting's value, and the variables that set it (or the profile).
_SETTING_ERRORS: dict[type[BotoCoreError], str] = {
    InvalidDefaultsMode: "AWS_DEFAULTS_MODE",
    InvalidS3UsEast1RegionalEndpointConfigError: "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT",
    InvalidSTSRegionalEndpointsConfigError: "AWS_STS_REGIONAL_ENDPOINTS",
    InvalidRetryModeError: "AWS_RETRY_MODE",
    InvalidRetryConfigurationError: "AWS_RETRY_MODE or AWS_MAX_ATTEMPTS",
    InvalidIMDSEndpointModeError: "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
    InvalidChecksumConfigError: "AWS_REQUEST_CHECKSUM_CALCULATION or AWS_RESPONSE_CHECKSUM_VALIDATION",
    InvalidEndpointConfigurationError: "AWS_USE_FIPS_ENDPOINT, AWS_USE_DUALSTACK_ENDPOINT or AWS_ENDPOINT_URL*",
}

#: The botocore exceptions that mean the AWS configuration or credentials need fixing.
CREDENTIAL_ERRORS: tuple[type[BotoCoreError], ...] = (
    *_SETTING_ERRORS,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ConfigParseError,
    ConfigNotFound,
    InvalidConfigError,
    CredentialRetrievalError,
    UnknownCredentialError,
    RefreshWithMFAUnsupportedError,
    SSOError,
    TokenRetrievalError,
)


#: What aiobotocore raises (a bare RuntimeError) when a refresh gave credentials already expired.
_STILL_EXPIRED = "refreshed credentials are still expired"


def is_credential_failure(exc: BaseException) -> bool:
    """Whether `exc` is the credentials failing to resolve or refresh: one of
    `CREDENTIAL_ERRORS`; aiobotocore's RuntimeError for a refresh that gave expired keys; or
    a `credential_process` whose output is not JSON (the JSONDecodeError of its parse)."""
    return (
        isinstance(exc, CREDENTIAL_ERRORS)
        or (isinstance(exc, RuntimeError) and _STILL_EXPIRED in str(exc))
        or isinstance(exc, json.JSONDecodeError)
    )


def credential_problem(exc: BaseException, *, profile: str | None = None) -> ConfigurationError:
    """The `ConfigurationError` of a credential failure (see `is_credential_failure`), naming
    what to fix (and `profile`, the session's, where a profile's setting failed)."""
    kwargs = getattr(exc, "kwargs", {})
    the_profile = f"the profile {profile!r} (AWS_PROFILE)" if profile else "the profile (AWS_PROFILE)"
    if isinstance(exc, json.JSONDecodeError):
        return ConfigurationError(
            f"the credential_process of {the_profile} printed something that is not JSON "
            f"({exc.msg}): it must print the credentials as JSON (Version 1); run it by hand to see what it "
            "prints (a login prompt?), fix it, or use another source of credentials (AWS_PROFILE)"
        )
    if isinstance(exc, RuntimeError):
        return ConfigurationError(
            "the AWS credentials were refreshed, but their source gave keys already expired; check the "
            "credential source (its clock, and this host's), or use another source of credentials"
        )
    if isinstance(exc, CredentialRetrievalError) and kwargs.get("provider") in _PROVIDERS:
        provider = kwargs["provider"]
        where = _PROVIDERS[provider]
        fix = {
            "container-role": "check that the endpoint answers (the task or pod role's agent) and that "
            "AWS_CONTAINER_CREDENTIALS_FULL_URI / AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and "
            "AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE) are right",
            "iam-role": "check the instance's role and that its metadata service answers",
            "custom-process": f"run the credential_process of {the_profile} by hand to see why it fails",
        }.get(provider, f"check AWS_PROFILE and the profile's settings in {_CONFIG_FILE} and {_CREDENTIALS_FILE}")
        return ConfigurationError(
            f"the AWS credentials could not be had from {where} ({type(exc).__name__}: {redact(str(exc))}); {fix}"
        )
    if isinstance(exc, NoCredentialsError):
        return ConfigurationError(f"no usable AWS credentials (none found); {NO_CREDENTIALS}")
    if isinstance(exc, PartialCredentialsError):
        provider, missing = kwargs.get("provider", ""), kwargs.get("cred_var", "a key")
        if provider == "env":
            return ConfigurationError(
                f"incomplete AWS credentials in the environment: {missing} is not set; set it too, or unset "
                "AWS_ACCESS_KEY_ID (and AWS_SESSION_TOKEN) to use a profile or an IAM role instead"
            )
        where = _PROVIDERS.get(provider, provider or "the AWS configuration")
        return ConfigurationError(
            f"incomplete AWS credentials in {where}: {missing} is missing; add it there, or remove the "
            f"incomplete entry; {NO_CREDENTIALS}"
        )
    if isinstance(exc, ProfileNotFound):
        profile = kwargs.get("profile", "?")
        return ConfigurationError(
            f"the AWS profile {profile!r} (AWS_PROFILE or AWS_DEFAULT_PROFILE) is defined in neither "
            f"{_CONFIG_FILE} nor {_CREDENTIALS_FILE}; fix its name, add it to one of them, or unset "
            "AWS_PROFILE to use the default credentials"
        )
    if isinstance(exc, ConfigParseError):
        path = kwargs.get("path", "?")
        return ConfigurationError(
            f"the AWS configuration file {path} cannot be parsed (it must be INI: [profile name] sections "
            "of key = value lines); fix it, or point AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE at a "
            "valid file"
        )
    if isinstance(exc, ConfigNotFound):
        path = kwargs.get("path", "?")
        return ConfigurationError(
            f"the AWS configuration file {path} does not exist; fix AWS_CONFIG_FILE / "
            "AWS_SHARED_CREDENTIALS_FILE, or unset them to use ~/.aws/config and ~/.aws/credentials"
        )
    for kind, variables in _SETTING_ERRORS.items():
        if isinstance(exc, kind):
            return ConfigurationError(
                f"an AWS SDK setting has a value botocore refuses ({redact(str(exc))}); fix or unset "
                f"{variables} (or the same setting of the profile in {_CONFIG_FILE})"
            )
    if isinstance(exc, SSOError | TokenRetrievalError):
        return ConfigurationError(
            f"the AWS SSO session of the profile cannot give credentials ({redact(str(exc))}); run "
            "`aws sso login` with that profile, or use another source of credentials"
        )
    return ConfigurationError(
        f"the AWS credentials could not be resolved: {type(exc).__name__}: {redact(str(exc))}; check "
        f"AWS_PROFILE and the profile's settings in {_CONFIG_FILE} and {_CREDENTIALS_FILE}"
    )


@contextlib.contextmanager
def credential_errors(profile: str | None = None) -> Iterator[None]:
    """Turn botocore's credential and configuration exceptions raised inside the block into a
    `ConfigurationError` (exit 2) saying what to fix (naming `profile`, the session's, if
    given); others pass through."""
    try:
        yield
    except (BotoCoreError, RuntimeError, json.JSONDecodeError) as exc:
        if not is_credential_failure(exc):
            raise
        raise credential_problem(exc, profile=profile) from None
