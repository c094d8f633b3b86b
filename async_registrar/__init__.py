"""async-registrar: register trained models with MIMS, streaming multi-gigabyte artifacts.

async with Registrar(settings) as registrar:
    result = await registrar.register(request)
"""

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
from ._registrar import Registrar, RegistrationRequest, RegistrationResult
from ._settings import JobInputs, Settings
from ._upload import UploadedArtifact
from ._version import __version__

__all__ = [
    "CleanupError",
    "CleanupFinished",
    "ConfigurationError",
    "InputError",
    "JobInputs",
    "ProgressCallback",
    "ProgressEvent",
    "Registrar",
    "RegistrarError",
    "RegistrationConfig",
    "RegistrationFailed",
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
