"""The reference MIMS service: a real implementation of the registry's HTTP contract.

It verifies SigV4 signatures, keeps registrations in memory, reads each uploaded
artifact back from S3 (size, sha256, tar.gz), copies it into its registry
bucket, and moves each registration PENDING -> IN_PROGRESS -> SUCCEEDED or
FAILED.  It backs the local demo, the compose stack and the tests.

Needs the `mims` extra: `pip install 'async-registrar[mims]'`.
"""

from ._app import create_app
from ._openapi import openapi_document
from ._server import ThreadedMimsServer, serve
from ._settings import ReferenceMimsSettings

__all__ = ["ReferenceMimsSettings", "ThreadedMimsServer", "create_app", "openapi_document", "serve"]
