"""async-registrar: register trained models with MIMS, streaming multi-gigabyte artifacts.

    async with Registrar(settings) as registrar:
        result = await registrar.register(request)

Names are imported on first use (PEP 562), so the command line starts without
loading what its command does not need (the HTTP client for an upload, say).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__

# A library's logger: records go where the host's logging sends them, and nowhere (not to
# stderr through logging's last resort) when the host configures none.
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from ._config import RegistrationConfig, load_config
    from ._errors import (
        AcceptedRegistration,
        CleanupError,
        ConfigurationError,
        IdempotencyConflict,
        InputError,
        RegistrarError,
        RegistrationFailed,
        RegistrationInterrupted,
        RegistrationRejected,
        RegistrationTimeout,
        RegistryError,
        RegistryUnavailable,
        StorageError,
    )
    from ._log_fields import JsonFormatter, current_log_fields
    from ._mims_contract import Registration
    from ._plan import ArtifactPlan, RegionPlan, RegistrationPlan
    from ._progress import (
        CleanupFinished,
        ProgressCallback,
        ProgressEvent,
        RegistrationKept,
        RegistrationStatusChanged,
        RegistrationSubmitted,
        RegistrationSucceeded,
        UploadProgress,
    )
    from ._registrar import Registrar, RegistrationHandle
    from ._request import RegistrationRequest
    from ._results import RegionRegistration, RegistrationResult
    from ._s3 import S3Location
    from ._settings import JobInputs, Settings
    from ._sweep import RunSwept, SweepReport
    from ._upload import UploadedArtifact


_MODULES = {
    "AcceptedRegistration": "._errors",
    "ArtifactPlan": "._plan",
    "CleanupError": "._errors",
    "CleanupFinished": "._progress",
    "ConfigurationError": "._errors",
    "IdempotencyConflict": "._errors",
    "InputError": "._errors",
    "JobInputs": "._settings",
    "JsonFormatter": "._log_fields",
    "ProgressCallback": "._progress",
    "ProgressEvent": "._progress",
    "Registrar": "._registrar",
    "RegistrarError": "._errors",
    "RegistrationConfig": "._config",
    "Registration": "._mims_contract",
    "RegistrationFailed": "._errors",
    "RegistrationInterrupted": "._errors",
    "RegistrationKept": "._progress",
    "RegistrationRejected": "._errors",
    "RegistrationRequest": "._request",
    "RegistrationHandle": "._registrar",
    "RegionPlan": "._plan",
    "RegionRegistration": "._results",
    "RegistrationPlan": "._plan",
    "RegistrationResult": "._results",
    "RegistrationStatusChanged": "._progress",
    "RegistrationSubmitted": "._progress",
    "RegistrationSucceeded": "._progress",
    "RegistrationTimeout": "._errors",
    "RegistryError": "._errors",
    "RegistryUnavailable": "._errors",
    "RunSwept": "._sweep",
    "S3Location": "._s3",
    "Settings": "._settings",
    "StorageError": "._errors",
    "SweepReport": "._sweep",
    "UploadProgress": "._progress",
    "UploadedArtifact": "._upload",
    "current_log_fields": "._log_fields",
    "load_config": "._config",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AcceptedRegistration",
    "ArtifactPlan",
    "CleanupError",
    "CleanupFinished",
    "ConfigurationError",
    "IdempotencyConflict",
    "InputError",
    "JobInputs",
    "JsonFormatter",
    "ProgressCallback",
    "ProgressEvent",
    "RegionPlan",
    "RegionRegistration",
    "Registrar",
    "RegistrarError",
    "Registration",
    "RegistrationConfig",
    "RegistrationFailed",
    "RegistrationHandle",
    "RegistrationInterrupted",
    "RegistrationKept",
    "RegistrationPlan",
    "RegistrationRejected",
    "RegistrationRequest",
    "RegistrationResult",
    "RegistrationStatusChanged",
    "RegistrationSubmitted",
    "RegistrationSucceeded",
    "RegistrationTimeout",
    "RegistryError",
    "RegistryUnavailable",
    "RunSwept",
    "S3Location",
    "Settings",
    "StorageError",
    "SweepReport",
    "UploadProgress",
    "UploadedArtifact",
    "__version__",
    "current_log_fields",
    "load_config",
]
