"""async-registrar: register trained models with MIMS, streaming multi-gigabyte artifacts.

    async with Registrar(settings) as registrar:
        result = await registrar.register(request)

Names are imported on first use (PEP 562), so the command line starts without
loading what its command does not need (the HTTP client for an upload, say).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._config import RegistrationConfig, load_config
    from ._errors import (
        CleanupError,
        ConfigurationError,
        InputError,
        RegistrarError,
        RegistrationFailed,
        RegistrationRejected,
        RegistrationTimeout,
        RegistryError,
        RegistryUnavailable,
        StorageError,
    )
    from ._progress import (
        CleanupFinished,
        ProgressCallback,
        ProgressEvent,
        RegistrationStatusChanged,
        RegistrationSubmitted,
        UploadProgress,
    )
    from ._registrar import RegionRegistration, Registrar, RegistrationHandle, RegistrationResult
    from ._request import RegistrationRequest
    from ._settings import JobInputs, Settings
    from ._upload import UploadedArtifact


_MODULES = {
    "CleanupError": "._errors",
    "CleanupFinished": "._progress",
    "ConfigurationError": "._errors",
    "InputError": "._errors",
    "JobInputs": "._settings",
    "ProgressCallback": "._progress",
    "ProgressEvent": "._progress",
    "Registrar": "._registrar",
    "RegistrarError": "._errors",
    "RegistrationConfig": "._config",
    "RegistrationFailed": "._errors",
    "RegistrationRejected": "._errors",
    "RegistrationRequest": "._request",
    "RegistrationHandle": "._registrar",
    "RegionRegistration": "._registrar",
    "RegistrationResult": "._registrar",
    "RegistrationStatusChanged": "._progress",
    "RegistrationSubmitted": "._progress",
    "RegistrationTimeout": "._errors",
    "RegistryError": "._errors",
    "RegistryUnavailable": "._errors",
    "Settings": "._settings",
    "StorageError": "._errors",
    "UploadProgress": "._progress",
    "UploadedArtifact": "._upload",
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
    "CleanupError",
    "CleanupFinished",
    "ConfigurationError",
    "InputError",
    "JobInputs",
    "ProgressCallback",
    "ProgressEvent",
    "RegionRegistration",
    "Registrar",
    "RegistrarError",
    "RegistrationConfig",
    "RegistrationFailed",
    "RegistrationHandle",
    "RegistrationRejected",
    "RegistrationRequest",
    "RegistrationResult",
    "RegistrationStatusChanged",
    "RegistrationSubmitted",
    "RegistrationTimeout",
    "RegistryError",
    "RegistryUnavailable",
    "Settings",
    "StorageError",
    "UploadProgress",
    "UploadedArtifact",
    "__version__",
    "load_config",
]
