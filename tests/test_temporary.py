"""TemporaryPrefix: the run's prefix is emptied on every way out, and only that prefix."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from async_registrar import CleanupError, CleanupFinished, Settings
from async_registrar._temporary import TemporaryPrefix

from .conftest import leftovers


async def fill(s3: Any, bucket: str, prefix: str) -> None:
    """An object and an open multipart upload under `prefix`."""
    await s3.put_object(Bucket=bucket, Key=prefix + "model.tar.gz", Body=b"x")
    await s3.create_multipart_upload(Bucket=bucket, Key=prefix + "payload.tar.gz")


async def test_success_empties_only_its_own_prefix(s3: Any, settings: Settings) -> None:
    """Objects and open uploads under the prefix go; a sibling prefix is untouched."""
    bucket, mine, other = settings.s3_bucket, settings.s3_prefix + "run-a/", settings.s3_prefix + "run-b/"
    await fill(s3, bucket, other)
    events: list[CleanupFinished] = []
    async with TemporaryPrefix(s3, bucket, mine, timeout=10, on_progress=events.append) as tmp:  # type: ignore[arg-type]
        await fill(s3, bucket, mine)
        assert tmp.key("x") == mine + "x"
    assert await leftovers(s3, bucket, mine) == []
    assert sorted(await leftovers(s3, bucket, other)) == [other + "model.tar.gz", "upload:" + other + "payload.tar.gz"]
    assert events == [CleanupFinished(f"s3://{bucket}/{mine}", 1, 1, ())]


async def test_error_and_cancellation_still_clean(s3: Any, settings: Settings) -> None:
    """An exception or a cancellation inside the block still empties the prefix."""
    bucket, prefix = settings.s3_bucket, settings.s3_prefix
    with pytest.raises(ValueError, match="boom"):
        async with TemporaryPrefix(s3, bucket, prefix + "e/", timeout=10):
            await fill(s3, bucket, prefix + "e/")
            raise ValueError("boom")
    with anyio.CancelScope() as scope:
        async with TemporaryPrefix(s3, bucket, prefix + "c/", timeout=10):
            await fill(s3, bucket, prefix + "c/")
            scope.cancel()
            await anyio.sleep(5)
    assert scope.cancelled_caught
    assert await leftovers(s3, bucket, prefix) == []


async def test_failed_cleanup_names_what_is_left(s3: Any, settings: Settings) -> None:
    """If deletes fail, the original error stays, with a note naming each key left behind."""
    bucket, prefix = settings.s3_bucket, settings.s3_prefix

    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObject")

    s3.meta.events.register("before-parameter-build.s3.DeleteObject", deny)
    with pytest.raises(ValueError, match="original") as caught:
        async with TemporaryPrefix(s3, bucket, prefix, timeout=10):
            await s3.put_object(Bucket=bucket, Key=prefix + "model.tar.gz", Body=b"x")
            raise ValueError("original")
    assert caught.value.__notes__
    assert f"s3://{bucket}/{prefix}model.tar.gz" in caught.value.__notes__[0]

    with pytest.raises(CleanupError) as cleanup:
        async with TemporaryPrefix(s3, bucket, prefix, timeout=10):
            pass
    assert cleanup.value.leftovers == (f"s3://{bucket}/{prefix}model.tar.gz",)
    s3.meta.events.unregister("before-parameter-build.s3.DeleteObject", deny)
    await s3.delete_object(Bucket=bucket, Key=prefix + "model.tar.gz")


def test_a_prefix_must_be_a_folder(s3: Any) -> None:
    """An empty or unterminated prefix would risk deleting someone else's objects."""
    for bad in ("", "/", "no-slash"):
        with pytest.raises(ValueError, match="non-empty folder"):
            TemporaryPrefix(s3, "b", bad, timeout=1)
