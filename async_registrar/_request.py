"""What to register: the request, and the identity of its run.

A request pairs the validated configuration with the input paths.  Its run
identity (the temporary prefix's name and the Idempotency-Key) is derived from
what it registers when it has a lineage id, so that a retried job makes no
second registration.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._artifacts import ArtifactSource, DirectorySource
from ._config import RegistrationConfig, load_config
from ._settings import JobInputs

__all__ = ["RegistrationRequest", "new_run_id", "run_identity"]


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """What to register: the configuration and where the inputs are.

    `payload_path` and `metadata_path` are optional: a path that does not exist means
    no payload or no metadata.  `performance_metadata_uri`, when set, takes precedence
    over `metadata_path`.
    """

    config: RegistrationConfig
    model_path: Path
    payload_path: Path | None = None
    metadata_path: Path | None = None
    performance_metadata_uri: str | None = None
    workflow_execution_id: str | None = None
    #: Sent with every submission attempt.  When neither this nor `workflow_execution_id`
    #: is set, each registration gets a fresh key (see `run_identity`).
    idempotency_key: str | None = None

    @classmethod
    async def from_files(
        cls, config: Path, model: Path, *, payload: Path | None = None, **options: Any
    ) -> RegistrationRequest:
        """A request from a configuration JSON file and the input paths (`options`: the other fields)."""
        return cls(config=await load_config(config), model_path=model, payload_path=payload, **options)

    @classmethod
    async def from_job(cls, inputs: JobInputs) -> RegistrationRequest:
        """Build the request of a registration job: read and validate its configuration file."""
        return cls(
            config=await load_config(inputs.config_path),
            model_path=inputs.model_path,
            payload_path=inputs.payload_path,
            metadata_path=inputs.metadata_path,
            performance_metadata_uri=inputs.performance_metadata_uri,
            workflow_execution_id=inputs.workflow_execution_id,
            idempotency_key=inputs.idempotency_key,
        )


def run_identity(
    request: RegistrationRequest,
    model: ArtifactSource,
    payload: ArtifactSource | None,
    metadata: dict[str, Any] | None,
) -> tuple[str, str]:
    """The run id (the temporary prefix's name) and the Idempotency-Key of a registration.

    With a lineage id (MODS_WORKFLOW_EXECUTION_ID) or an explicit key, both are derived
    from what the job registers: the lineage, the configuration, the metadata and the
    inputs' names and sizes.  A retried container therefore uploads to the same keys and,
    since archives are deterministic, submits the same body with the same key: the
    registry answers with the registration it already has instead of making a second.
    Without either, each run is its own registration: a fresh id and key.
    """
    if not (request.idempotency_key or request.workflow_execution_id):
        run_id = new_run_id()
        return run_id, f"registrar-{run_id}"
    identity = {
        "key": request.idempotency_key,
        "workflow_execution_id": request.workflow_execution_id,
        "config": request.config.model_dump(mode="json"),
        "metadata": metadata,
        "performance_metadata_uri": request.performance_metadata_uri,
        "model": _listing(model),
        "payload": _listing(payload),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"run-{digest[:24]}", request.idempotency_key or f"registrar-{digest}"


def _listing(source: ArtifactSource | None) -> list[tuple[str, int, bool]] | None:
    if source is None:
        return None
    if isinstance(source, DirectorySource):
        return [(e.name, e.size, e.executable) for e in source.entries]
    return [(source.path.name, source.size, False)]


def new_run_id() -> str:
    """A run id that sorts by time and is unique: `20261126T065650Z-3f2a9c1b7d4e`."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(6)
