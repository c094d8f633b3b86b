"""A bucket lifecycle rule for the registrar's prefix: the last backstop.

S3 itself aborts incomplete multipart uploads and expires objects under the
prefix after a number of days, even if no sweep ever runs.  The rule is merged
into the bucket's configuration: other rules are kept as they are, and a rule
of ours for the same prefix is replaced (so installing twice leaves one).  A dry
run reads the configuration, logs the rule it would add or replace, and writes
nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ._errors import ConfigurationError, StorageError
from ._s3 import S3Client, storage_errors

__all__ = ["install_lifecycle", "rule_id"]

log = logging.getLogger("async_registrar.lifecycle")


def rule_id(prefix: str) -> str:
    """The ID of our rule for `prefix` (S3 allows 255 characters)."""
    return f"async-registrar:{prefix}"[:255]


async def install_lifecycle(
    s3: S3Client,
    bucket: str,
    prefix: str,
    *,
    abort_after_days: int = 1,
    expire_after_days: int = 7,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Add (or replace) our rule for `prefix` in the bucket's lifecycle configuration; return it.
    With `dry_run`, write nothing: log what would be added or replaced, and return the rule."""
    if not prefix.strip("/"):
        raise ConfigurationError("a lifecycle rule for an empty prefix would expire the whole bucket; set --prefix")
    problems = [
        f"{option} ({name}) is {days}: must be 1 or more"
        for option, name, days in (
            ("--abort-after-days", "abort_after_days", abort_after_days),
            ("--expire-after-days", "expire_after_days", expire_after_days),
        )
        if days < 1
    ]
    if problems:
        raise ConfigurationError("invalid lifecycle rule; fix each and run again:", problems)
    rule: dict[str, Any] = {
        "ID": rule_id(prefix),
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": abort_after_days},
        "Expiration": {"Days": expire_after_days},
        # On a bucket with versioning, what is deleted stays as a noncurrent version: expired too.
        "NoncurrentVersionExpiration": {"NoncurrentDays": expire_after_days},
    }
    try:
        with storage_errors("GetBucketLifecycleConfiguration", bucket):
            current = await s3.get_bucket_lifecycle_configuration(Bucket=bucket)
        rules: list[dict[str, Any]] = list(current.get("Rules", []))
    except StorageError as exc:
        if exc.code != "NoSuchLifecycleConfiguration":  # none yet: an error code, not a failure
            raise
        rules = []
    replaced = next((r for r in rules if r.get("ID") == rule["ID"]), None)
    rules = [r for r in rules if r.get("ID") != rule["ID"]] + [rule]
    where = f"s3://{bucket}/{prefix}"
    if dry_run:
        what = f"replace {json.dumps(replaced, default=str)}" if replaced else "be added"
        log.info("dry run: nothing written; the lifecycle rule for %s would %s", where, what)
        return rule
    with storage_errors("PutBucketLifecycleConfiguration", bucket):
        await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    what = f"replaced {json.dumps(replaced, default=str)}" if replaced else "added"
    log.info("the lifecycle rule for %s: %s", where, what)
    return rule
