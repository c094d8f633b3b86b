"""What a finished registration returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._upload import UploadedArtifact

__all__ = ["RegionRegistration", "RegistrationResult"]


@dataclass(frozen=True, slots=True)
class RegionRegistration:
    """The registration in one region: what MIMS registered and what was uploaded for it."""

    region: str
    registration_id: str
    model_id: str
    workflow_execution_arn: str
    model_artifact: UploadedArtifact
    payload_artifact: UploadedArtifact | None
    #: True when this run did not submit it but found it: accepted for the same inputs by
    #: an earlier run (resumed from its manifest, or named by the registry for the key).
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    """A finished registration, one entry per region (usually one).

    The shortcuts (`model_id`, `workflow_execution_arn`, ...) are the first region's.
    """

    registrations: tuple[RegionRegistration, ...]
    #: Seconds spent in each phase: "validate", "preflight", "upload", "register", "total"
    #: (and "digest" when a re-run hashed its inputs to compare them with an earlier run's).
    timings: dict[str, float] = field(default_factory=dict)
    #: What the cleanup could not remove after the registration succeeded (each `s3://`
    #: key or open upload): the registration stands; these are for a person to remove.
    leftovers: tuple[str, ...] = ()

    @property
    def registration_id(self) -> str:
        """The (first region's) registration id."""
        return self.registrations[0].registration_id

    @property
    def model_id(self) -> str:
        """The (first region's) model id."""
        return self.registrations[0].model_id

    @property
    def workflow_execution_arn(self) -> str:
        """The (first region's) workflow execution ARN."""
        return self.registrations[0].workflow_execution_arn

    @property
    def model_artifact(self) -> UploadedArtifact:
        """The (first region's) uploaded model archive."""
        return self.registrations[0].model_artifact

    @property
    def payload_artifact(self) -> UploadedArtifact | None:
        """The (first region's) uploaded payload archive, if any."""
        return self.registrations[0].payload_artifact
