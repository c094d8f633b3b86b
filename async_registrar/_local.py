"""The embedded local default: an S3 server and the reference MIMS, in-process on loopback.

`LocalStack` starts moto's S3 server and the reference MIMS service in
background threads on ephemeral ports, with throwaway credentials, and hands
out `Settings` that point a registrar at them.  The `demo` command and the
tests use it.  Needs the `local` extra (moto's server).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import boto3
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from ._config import load_config
from ._errors import ConfigurationError
from ._request import RegistrationRequest
from ._s3 import make_session, open_s3_client
from ._settings import MIN_PART_SIZE, Settings
from .reference_mims import ReferenceMimsSettings, ThreadedMimsServer

__all__ = ["LocalStack", "example_request"]

#: Throwaway credentials, known to both the local S3 server and the reference MIMS.
ACCESS_KEY = "AKIALOCALDEMO0000000"
SECRET_KEY = "local-demo-secret-not-a-real-key"  # noqa: S105  (a throwaway key for loopback servers)
REGION = "us-west-2"


class LocalStack:
    """moto S3 and the reference MIMS on 127.0.0.1, started on entry, stopped on exit."""

    def __init__(
        self,
        *,
        temporary_bucket: str = "registrar-local-tmp",
        registry_bucket: str = "mims-registry",
        mims: ReferenceMimsSettings | None = None,
    ) -> None:
        self.temporary_bucket = temporary_bucket
        self.registry_bucket = registry_bucket
        self._mims_settings = mims
        self._s3_server: ThreadedMotoServer | None = None
        self._mims_server: ThreadedMimsServer | None = None
        self.s3_endpoint = ""
        self.mims_endpoint = ""

    def __enter__(self) -> LocalStack:
        self._s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._s3_server.start()
        host, port = self._s3_server.get_host_and_port()
        self.s3_endpoint = f"http://{host}:{port}"
        try:
            _create_bucket(self.s3_endpoint, self.temporary_bucket)
            settings = (self._mims_settings or ReferenceMimsSettings()).model_copy(
                update={
                    "registry_bucket": self.registry_bucket,
                    "s3_endpoint_url": self.s3_endpoint,
                    "aws_region": REGION,
                    "aws_access_key_id": SecretStr(ACCESS_KEY),
                    "aws_secret_access_key": SecretStr(SECRET_KEY),
                    "signing_secrets": {ACCESS_KEY: SecretStr(SECRET_KEY)},
                    # Artifacts only from the registrars' bucket (unless the caller named others).
                    "allowed_buckets": (self._mims_settings.allowed_buckets if self._mims_settings else None)
                    or [self.temporary_bucket],
                }
            )
            self._mims_server = ThreadedMimsServer(settings)
            self._mims_server.start()
            self.mims_endpoint = self._mims_server.endpoint
        except BaseException:
            self._s3_server.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._mims_server is not None:
            self._mims_server.stop()
        if self._s3_server is not None:
            self._s3_server.stop()

    @property
    def mims_server(self) -> ThreadedMimsServer:
        """The reference MIMS service of this stack."""
        if self._mims_server is None:
            raise RuntimeError("the stack is not running")
        return self._mims_server

    def registrar_settings(self, **overrides: object) -> Settings:
        """Settings that point a registrar at this stack (smallest parts, quick polls)."""
        values: dict[str, object] = {
            "s3_bucket": self.temporary_bucket,
            "mims_endpoint": self.mims_endpoint,
            "s3_endpoint_url": self.s3_endpoint,
            "aws_region": REGION,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "part_size": MIN_PART_SIZE,
            "poll_initial": 0.1,
            "poll_max": 1.0,
        }
        values.update(overrides)
        return Settings.model_validate(values)

    async def describe_registry(self) -> list[str]:
        """One line per object in the registry bucket, and whether the temporary bucket is empty."""
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=self.s3_endpoint) as s3:
            registry = await s3.list_objects_v2(Bucket=self.registry_bucket)
            temporary = await s3.list_objects_v2(Bucket=self.temporary_bucket)
            uploads = await s3.list_multipart_uploads(Bucket=self.temporary_bucket)
        lines = [
            f"registry holds s3://{self.registry_bucket}/{o['Key']} ({o['Size']} bytes)"
            for o in registry.get("Contents", [])
        ]
        left = len(temporary.get("Contents", [])) + len(uploads.get("Uploads", []))
        lines.append(f"s3://{self.temporary_bucket} holds {left} temporary object(s) or open upload(s)")
        return lines


def _create_bucket(endpoint: str, bucket: str) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})


async def example_request(root: Path) -> RegistrationRequest:
    """The registration request of an example directory (model/, payload/, registration.json)."""
    config = root / "registration.json"
    if not config.exists():
        raise ConfigurationError(
            f"{root} is not an example directory (no registration.json); pass --example DIR "
            "with model/, payload/ and registration.json"
        )
    return RegistrationRequest(
        config=await load_config(config),
        model_path=root / "model",
        payload_path=root / "payload",
        metadata_path=root / "metadata",
        workflow_execution_id="local-demo",
    )
