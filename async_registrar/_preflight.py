"""The preflight: fail in seconds on what cannot work, before the first byte is uploaded.

A typo in an endpoint, a missing bucket or credentials the registry refuses used
to surface only after the whole model was uploaded.  Before anything is
uploaded, a run checks (every region's at once):

- that AWS credentials resolve, for S3 and for signing the registry's requests
  (else `ConfigurationError`: exit 2);
- each bucket, with `HeadBucket` (missing or denied: `StorageError`, exit 4);
- each registry endpoint, with a signed GET of a registration that cannot exist,
  which a MIMS registry answers 404 once it verified the signature
  (`MimsClient.probe`; refused, 401/403 or unreachable: exit 5).

A re-run of a lineage does not probe the registry of a region where it finds an
earlier run: it asks that registry about the earlier registration instead (and
follows it, or waits for it, under the usual deadlines).

Each check is bounded by `Settings.preflight_timeout` (`within`); what does not answer in
time is an error naming what to check.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
from botocore.exceptions import BotoCoreError, ClientError

from ._concurrency import run_all
from ._credentials import CREDENTIAL_ERRORS, NO_CREDENTIALS, credential_problem
from ._errors import ConfigurationError, StorageError, redact
from ._mims_client import MimsClient
from ._s3 import S3Client, error_code, storage_errors

__all__ = [
    "NO_CREDENTIALS",
    "PreflightTarget",
    "check_bucket",
    "check_credentials",
    "check_registries",
    "check_storage",
]

log = logging.getLogger("async_registrar")

#: Resolves the AWS credentials (raises `ConfigurationError` when there are none).
CredentialsCheck = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class PreflightTarget:
    """One region's bucket and registry, and the clients that reach them."""

    region: str
    s3: S3Client
    bucket: str
    #: The key prefix the run writes under, for the permissions a denial names.
    prefix: str
    mims: MimsClient


async def check_storage(targets: Sequence[PreflightTarget], *, credentials: CredentialsCheck, within: float) -> None:
    """Check the credentials, then every region's bucket at once (the first failure is raised,
    the other checks cancelled)."""
    await check_credentials(credentials, within=within)
    await run_all(functools.partial(check_bucket, t.s3, t.bucket, t.prefix, within=within) for t in targets)


async def check_registries(targets: Sequence[PreflightTarget], *, within: float) -> None:
    """Probe every region's registry at once (see `MimsClient.probe`); the first failure is
    raised at once, the other probes cancelled."""
    await run_all(functools.partial(t.mims.probe, region=t.region, within=within) for t in targets)


async def check_credentials(credentials: CredentialsCheck, *, within: float) -> None:
    """Resolve the AWS credentials; raise `ConfigurationError` saying how to provide them."""
    try:
        with anyio.fail_after(within):
            await credentials()
    except TimeoutError:
        raise ConfigurationError(
            f"the AWS credentials did not resolve within {within:g} s (an instance metadata service "
            f"that does not answer?); {NO_CREDENTIALS}"
        ) from None
    except CREDENTIAL_ERRORS as exc:  # a half-set pair, an unknown profile, a broken config file, ...
        raise credential_problem(exc) from None
    except BotoCoreError as exc:  # anything else botocore raises while resolving them
        raise ConfigurationError(
            f"the AWS credentials could not be resolved: {type(exc).__name__}: {redact(str(exc))}; "
            "check AWS_PROFILE, AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE"
        ) from None


async def check_bucket(
    s3: S3Client, bucket: str, prefix: str, *, within: float, fix: str = "fix --bucket / REGISTRAR_S3_BUCKET"
) -> None:
    """`HeadBucket`: the bucket exists and these credentials may use it.  `fix` says where the
    bucket's name comes from, for the message when it does not exist."""
    where = f"s3://{bucket}"
    with anyio.move_on_after(within) as scope:
        try:
            await s3.head_bucket(Bucket=bucket)
        except CREDENTIAL_ERRORS as exc:
            raise credential_problem(exc) from None
        except ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchBucket"):
                raise StorageError(
                    f"the bucket {bucket} does not exist (HeadBucket: 404 NoSuchBucket); create it, or {fix}",
                    operation="HeadBucket",
                    bucket=bucket,
                    code="NoSuchBucket",
                ) from None
            if code in ("403", "AccessDenied", "AllAccessDisabled"):
                raise StorageError(
                    f"access to the bucket {bucket} is denied (HeadBucket: 403 AccessDenied); the job's role needs "
                    f"s3:ListBucket and s3:ListBucketMultipartUploads on arn:aws:s3:::{bucket}, and s3:PutObject, "
                    f"s3:GetObject, s3:DeleteObject and s3:AbortMultipartUpload on arn:aws:s3:::{bucket}/{prefix}*; "
                    "or the credentials are not the ones meant",
                    operation="HeadBucket",
                    bucket=bucket,
                    code="AccessDenied",
                ) from None
            with storage_errors("HeadBucket", bucket):
                raise
        except BotoCoreError:
            with storage_errors("HeadBucket", bucket):
                raise
    if scope.cancelled_caught:
        raise StorageError(
            f"S3 did not answer HeadBucket for {where} within the preflight's {within:g} s; check "
            "AWS_ENDPOINT_URL_S3 (if set), the region and the network (REGISTRAR_PREFLIGHT_TIMEOUT sets how long "
            "to try)",
            operation="HeadBucket",
            bucket=bucket,
            code="Timeout",
        )
