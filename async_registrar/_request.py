"""What to register: the request, and the identity of its run.

A request pairs the validated configuration with the input paths.  Its run
identity (the folder its attempts share, and its Idempotency-Keys) is derived
from what it registers when it has a lineage id, so that a retried job finds
the registration an earlier run made instead of making a second.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._artifacts import ArtifactSource, DirectorySource, S3Archive, is_s3_uri
from ._concurrency import require_asyncio
from ._config import RegistrationConfig, load_config
from ._errors import ConfigurationError, InputError
from ._mims_contract import idempotency_key_problem
from ._settings import JobInputs, Settings, describe_field

__all__ = ["RUN_ID_TIME", "RegistrationRequest", "RunIdentity", "new_run_id", "run_id_time", "run_identity"]


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """What to register: the configuration and where the inputs are.

    `payload_path` and `metadata_path` are optional: a path that does not exist means
    no payload or no metadata.  `performance_metadata_uri`, when set, takes precedence
    over `metadata_path`.
    """

    config: RegistrationConfig
    #: A local directory (or one holding a `.tar.gz`), or the `s3://` URI of a prebuilt
    #: `.tar.gz` (a training job's model.tar.gz): copied inside S3, not through this process.
    model_path: Path | str
    #: A local copy of a model given by its `s3://` URI (a mounted file, or a directory
    #: holding it, of the object's size): the sha256 and the archive check read it instead
    #: of the object (the registry's own sha256 check still reads what was copied).
    model_local_copy: Path | None = None
    payload_path: Path | str | None = None
    metadata_path: Path | None = None
    performance_metadata_uri: str | None = None
    workflow_execution_id: str | None = None
    #: Sent with every submission attempt (with a "-gN" suffix for the Nth registration of
    #: the same inputs, after earlier ones ended FAILED).  When neither this nor
    #: `workflow_execution_id` is set, each registration gets a fresh key (see `run_identity`).
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        problem = idempotency_key_problem(self.idempotency_key) if self.idempotency_key is not None else None
        if problem is not None:
            raise ConfigurationError(
                "invalid settings; fix each and run again:",
                [f"{describe_field('idempotency_key')}: {problem}"],
            )
        if self.model_local_copy is not None and not is_s3_uri(self.model_path):
            raise ConfigurationError(
                "invalid settings; fix each and run again:",
                [
                    f"{describe_field('model_local_copy')}: only for a model given by its s3:// URI "
                    f"(the model is {self.model_path}); unset it, or give the model's s3:// URI"
                ],
            )

    @classmethod
    async def from_files(
        cls, config: Path, model: Path, *, payload: Path | None = None, **options: Any
    ) -> RegistrationRequest:
        """A request from a configuration JSON file and the input paths (`options`: the other
        fields; the payload as `payload` or, by its field's name, `payload_path`)."""
        require_asyncio("RegistrationRequest.from_files")
        named = options.pop("payload_path", None)
        if payload is not None and named is not None:
            raise TypeError("from_files() takes the payload once: as payload= or as payload_path=")
        payload_path = named if named is not None else payload
        return cls(config=await load_config(config), model_path=model, payload_path=payload_path, **options)

    @classmethod
    async def from_job(cls, inputs: JobInputs) -> RegistrationRequest:
        """Build the request of a registration job: read and validate its configuration file.

        The payload and metadata paths are optional where they default to the container's
        paths (absent means none); a path the job named (by option or variable) must exist.
        """
        named = [
            (name, getattr(inputs, name))
            for name in ("payload_path", "metadata_path")
            if name in inputs.model_fields_set
            and isinstance(getattr(inputs, name), Path)
            and not getattr(inputs, name).exists()
        ]
        if named:
            lines = "\n".join(f"  - {describe_field(name)}: {path}: no such file or directory" for name, path in named)
            raise InputError(
                "a path given for the job does not exist; fix it, or leave the option and its variable unset "
                f"to register without it:\n{lines}",
                [str(path) for _, path in named],
            )
        return cls(
            config=await load_config(inputs.config_path),
            model_path=inputs.model_path,
            model_local_copy=inputs.model_local_copy,
            payload_path=inputs.payload_path,
            metadata_path=inputs.metadata_path,
            performance_metadata_uri=inputs.performance_metadata_uri,
            workflow_execution_id=inputs.workflow_execution_id,
            idempotency_key=inputs.idempotency_key,
        )


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """Who a registration run is: where its attempts live, and the keys it submits with.

    `group` names the folder under the temporary prefix that every attempt of the same
    registration shares (`{prefix}{group}/{attempt}/`): a re-run lists it to find what an
    earlier run left for the registry.  With a lineage id (MODS_WORKFLOW_EXECUTION_ID) or
    an explicit key it is derived from what the job registers, cheaply: the lineage, the
    configuration, the metadata, the inputs' names and sizes, and the settings that shape
    the archive.  Without either, every run is its own registration (`resumable` is False).
    """

    group: str
    resumable: bool
    #: The digest of the identity document, from which the Idempotency-Keys are derived.
    seed: str
    explicit_key: str | None = None

    def idempotency_key(self, archives: Mapping[str, str], *, region: str | None = None, generation: int = 1) -> str:
        """The Idempotency-Key of one registration: `archives` maps each artifact to its sha256.

        Derived from the identity and the archives' contents, so that two different models
        never share a key and the same inputs always get the same one.  `region` is added
        when a configuration registers in several; `generation` counts the registrations
        of the same inputs that ended FAILED before (a re-run means "try again").
        """
        if self.explicit_key is not None:
            key = self.explicit_key
        else:
            contents = json.dumps({"seed": self.seed, "archives": dict(sorted(archives.items()))}, sort_keys=True)
            key = "registrar-" + hashlib.sha256(contents.encode()).hexdigest()
        if region is not None:
            key += f"-{region}"
        if generation > 1:
            key += f"-g{generation}"
        return key


def run_identity(
    request: RegistrationRequest,
    model: ArtifactSource | S3Archive,
    payload: ArtifactSource | S3Archive | None,
    metadata: dict[str, Any] | None,
    settings: Settings,
) -> RunIdentity:
    """The identity of a registration run (see `RunIdentity`)."""
    if not (request.idempotency_key or request.workflow_execution_id):
        run_id = new_run_id()
        return RunIdentity(group=f"run-{run_id}", resumable=False, seed=run_id)
    identity = {
        "key": request.idempotency_key,
        "workflow_execution_id": request.workflow_execution_id,
        "config": request.config.model_dump(mode="json"),
        "metadata": metadata,
        "performance_metadata_uri": request.performance_metadata_uri,
        "model": _listing(model),
        "payload": _listing(payload),
        # What else decides the archive's bytes: a changed level is another registration.
        "archive": {
            "compression_level": settings.compression_level,
            "compression_min_saving": settings.compression_min_saving,
            "mtime": settings.archive_mtime,
        },
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return RunIdentity(group=f"run-{digest[:24]}", resumable=True, seed=digest, explicit_key=request.idempotency_key)


def _listing(source: ArtifactSource | S3Archive | None) -> list[tuple[str, int, bool | str]] | None:
    if source is None:
        return None
    if isinstance(source, DirectorySource):
        return [(e.name, e.size, e.executable) for e in source.entries]
    if isinstance(source, S3Archive):
        return [(source.location.uri, source.size, source.etag or "")]
    return [(source.path.name, source.size, False)]


#: The UTC start time a run id begins with.
RUN_ID_TIME = "%Y%m%dT%H%M%SZ"


def new_run_id() -> str:
    """A run id that sorts by time and is unique: `20261126T065650Z-3f2a9c1b7d4e`."""
    return dt.datetime.now(dt.UTC).strftime(RUN_ID_TIME) + "-" + secrets.token_hex(6)


def run_id_time(run_id: str) -> dt.datetime | None:
    """The UTC time (to the second) a run id of `new_run_id` was made at; None for another name."""
    stamp, dash, _ = run_id.partition("-")
    if not dash or len(stamp) != 16:
        return None
    try:
        return dt.datetime.strptime(stamp, RUN_ID_TIME).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
