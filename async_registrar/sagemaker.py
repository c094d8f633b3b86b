"""The registration step of a SageMaker Pipeline: the successor of the original's
`MimsModelRegistrationProcessingStep`.

    from async_registrar.sagemaker import registration_step

    step = registration_step(
        image_uri="123456789012.dkr.ecr.us-west-2.amazonaws.com/async-registrar:1",
        role="arn:aws:iam::123456789012:role/registration",
        model=training.properties.ModelArtifacts.S3ModelArtifacts,
        config="s3://my-bucket/registration.json",
        sagemaker_session=pipeline_session,
    )

It builds a `ProcessingStep` with the SageMaker Python SDK v3 (`sagemaker-core` and
`sagemaker-mlops`), which must be installed where the pipeline is defined (see
docs/containers.md: they are installed beside this package, not as an extra of it). The
container runs `async-registrar register` and reads what the step declares:

- the model: its `s3://` URI is passed as `REGISTRAR_MODEL_PATH` (a prebuilt `.tar.gz`,
  copied inside S3: no byte of it through the container), or, with `model_by_copy=False`,
  downloaded to the container's model path;
- the configuration file, and optionally payload samples and performance metadata, as
  processing inputs at the container paths the command reads by default;
- `MODS_WORKFLOW_EXECUTION_ID` bound to the pipeline execution id, so a retried step
  resumes the registration its earlier attempt started;
- `settings` (REGISTRAR_* variables) in the environment; a stopping condition; retry
  policies for SageMaker's own faults.

Nothing here is imported unless the builder is called: the module is importable without
the SDK (its paths and names are plain constants).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CONFIG_PATH",
    "METADATA_PATH",
    "MODEL_PATH",
    "PAYLOAD_PATH",
    "registration_step",
]

#: The container paths `async-registrar register` reads by default (`JobInputs`).
MODEL_PATH = "/opt/ml/processing/input/model"
PAYLOAD_PATH = "/opt/ml/processing/mims_payload"
CONFIG_PATH = "/opt/ml/processing/config"
METADATA_PATH = "/opt/ml/processing/input/metadata"
#: The configuration file's name inside CONFIG_PATH when its URI does not tell (the original's).
CONFIG_FILE = "config"

_SDK = (
    "the SageMaker Python SDK v3 is needed to build the step: install sagemaker-core and sagemaker-mlops "
    "where the pipeline is defined (docs/containers.md)"
)


def registration_step(
    *,
    image_uri: str,
    role: str,
    model: Any,
    config: Any,
    sagemaker_session: Any,
    payload: Any | None = None,
    metadata: Any | None = None,
    name: str = "RegisterModel",
    instance_type: str = "ml.m5.xlarge",
    instance_count: int = 1,
    volume_size_in_gb: int = 30,
    max_runtime_in_seconds: int = 4 * 3600,
    settings: Mapping[str, str] | None = None,
    model_by_copy: bool = True,
    retry_attempts: int = 3,
    depends_on: list[Any] | None = None,
    config_name: str | None = None,
) -> Any:
    """A `ProcessingStep` that registers `model` with MIMS.

    `model`, `config`, `payload` and `metadata` are `s3://` URIs or pipeline variables (a
    training step's `properties.ModelArtifacts.S3ModelArtifacts`, a parameter). `config` is
    the registration's JSON configuration object; SageMaker downloads it under its own name
    (`config_name`: by default the last part of the URI, or `config` for a pipeline
    variable, whose value is not known here). `settings` are extra environment
    variables (REGISTRAR_*). The step retries SageMaker's transient faults (throttling,
    service faults, capacity) up to `retry_attempts` times; a retry has the same pipeline
    execution id, so the registrar resumes what the attempt before it started.
    """
    try:
        from sagemaker.core.processing import Processor
        from sagemaker.core.shapes import ProcessingInput, ProcessingS3Input
        from sagemaker.core.workflow.execution_variables import ExecutionVariables
        from sagemaker.mlops.workflow.retry import (
            SageMakerJobExceptionTypeEnum,
            SageMakerJobStepRetryPolicy,
            StepExceptionTypeEnum,
            StepRetryPolicy,
        )
        from sagemaker.mlops.workflow.steps import ProcessingStep
    except ImportError as exc:
        raise ImportError(f"{_SDK} ({exc})") from exc

    def s3_input(input_name: str, uri: Any, local_path: str) -> Any:
        return ProcessingInput(
            input_name=input_name,
            s3_input=ProcessingS3Input(
                s3_uri=uri,
                local_path=local_path,
                s3_data_type="S3Prefix",
                s3_input_mode="File",
                s3_data_distribution_type="FullyReplicated",
            ),
        )

    environment: dict[str, Any] = {
        "MODS_WORKFLOW_EXECUTION_ID": ExecutionVariables.PIPELINE_EXECUTION_ID,
        "REGISTRAR_CONFIG_PATH": f"{CONFIG_PATH}/{config_name or _name_in(config)}",
        **dict(settings or {}),
    }
    inputs = [s3_input("config", config, CONFIG_PATH)]
    if model_by_copy:
        environment["REGISTRAR_MODEL_PATH"] = model
    else:
        inputs.append(s3_input("model", model, MODEL_PATH))
    if payload is not None:
        inputs.append(s3_input("payload", payload, PAYLOAD_PATH))
    if metadata is not None:
        inputs.append(s3_input("metadata", metadata, METADATA_PATH))

    processor = Processor(
        role=role,
        image_uri=image_uri,
        instance_count=instance_count,
        instance_type=instance_type,
        entrypoint=["async-registrar", "register"],
        volume_size_in_gb=volume_size_in_gb,
        max_runtime_in_seconds=max_runtime_in_seconds,
        base_job_name="async-registrar",
        sagemaker_session=sagemaker_session,
        env=environment,
    )
    transient = [StepExceptionTypeEnum.SERVICE_FAULT, StepExceptionTypeEnum.THROTTLING]
    capacity = [SageMakerJobExceptionTypeEnum.CAPACITY_ERROR, SageMakerJobExceptionTypeEnum.INTERNAL_ERROR]
    return ProcessingStep(
        name=name,
        step_args=processor.run(inputs=inputs),  # under a PipelineSession: arguments, no job
        retry_policies=[
            StepRetryPolicy(
                exception_types=transient, interval_seconds=10, backoff_rate=2.0, max_attempts=retry_attempts
            ),
            SageMakerJobStepRetryPolicy(
                exception_types=capacity, interval_seconds=60, backoff_rate=2.0, max_attempts=retry_attempts
            ),
        ],
        depends_on=depends_on,
    )


def _name_in(uri: Any) -> str:
    """The file name SageMaker gives the object at `uri` when it downloads it."""
    if isinstance(uri, str) and uri.startswith("s3://") and not uri.endswith("/"):
        return uri.rsplit("/", 1)[-1]
    return CONFIG_FILE
