"""Bench client: a prebuilt archive put under a run's prefix, uploaded or copied inside S3.

    python copy_or_upload.py upload DIR KEY      # Registrar.upload of DIR (holding one .tar.gz)
    python copy_or_upload.py copy SOURCE_URI KEY  # what `--model s3://...` does: copy + one read

Both to s3://$BENCH_BUCKET/KEY, through $AWS_ENDPOINT_URL_S3. Prints one JSON line: the
size, the sha256 and the wall time. The launcher measures CPU and RSS; the bench counts the
bytes the client sent with a proxy in front of the server.
"""

from __future__ import annotations

import json
import os
import sys
import time

import anyio

from async_registrar import Registrar, Settings
from async_registrar._concurrency import CleanupDeadline
from async_registrar._s3 import S3Location, make_session, open_s3_client
from async_registrar._s3_source import copy_to_all, inspect_s3_archive
from async_registrar._threads import Workers


async def main(mode: str, source: str, key: str) -> None:
    bucket = os.environ["BENCH_BUCKET"]
    settings = Settings.from_env(s3_bucket=bucket, mims_endpoint="http://mims.not-used.invalid")
    started = time.monotonic()
    if mode == "upload":
        async with Registrar(settings) as registrar:
            result = await registrar.upload(source, f"s3://{bucket}/{key}")
        size, sha256 = result.size, result.sha256
    else:
        session = make_session(settings.aws_access_key_id, settings.aws_secret_access_key)
        endpoint = str(settings.s3_endpoint_url) if settings.s3_endpoint_url else None
        async with open_s3_client(session, region=settings.aws_region, endpoint_url=endpoint) as s3:
            archive = await inspect_s3_archive(s3, source, role="model")
            (copied,) = await copy_to_all(
                s3,
                archive,
                [(s3, S3Location(bucket, key))],
                settings,
                artifact="model",
                workers=Workers.for_settings(settings),
                cleanup=CleanupDeadline(settings.cleanup_timeout),
            )
        size, sha256 = copied.size, copied.sha256
    print(json.dumps({"size": size, "sha256": sha256, "wall": time.monotonic() - started}))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
