"""The SageMaker Pipelines step builder (issue 18, part 1): a pipeline definition built offline
with the real SDK, in a virtual environment of its own (scripts/sagemaker_step.py), on fake
credentials and a default bucket, with no AWS call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from async_registrar import sagemaker as step_builder
from async_registrar._settings import JobInputs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from sagemaker_step import build_definition

IMAGE = "123456789012.dkr.ecr.us-west-2.amazonaws.com/async-registrar:1"
ROLE = "arn:aws:iam::123456789012:role/registration"


@pytest.fixture(scope="session")
def definition(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pipeline with the step, its model a parameter as a training step's output would be."""
    return build_definition(
        tmp_path_factory.mktemp("pipeline") / "definition.json",
        image_uri=IMAGE,
        role=ROLE,
        model="s3://training/out/model.tar.gz",
        config="s3://configs/jobs/registration.json",
        payload="s3://configs/jobs/payload/",
        metadata="s3://configs/jobs/metadata/",
        settings={"REGISTRAR_LOG_FORMAT": "json"},
        max_runtime_in_seconds=7200,
    )


def test_the_step_declares_what_the_container_reads(definition: dict[str, Any]) -> None:
    (step,) = definition["Steps"]
    assert step["Name"] == "RegisterModel"
    assert step["Type"] == "Processing"
    arguments = step["Arguments"]
    assert arguments["AppSpecification"]["ImageUri"] == IMAGE
    assert arguments["AppSpecification"]["ContainerEntrypoint"] == ["async-registrar", "register"]
    assert arguments["RoleArn"] == ROLE
    assert arguments["ProcessingResources"]["ClusterConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert arguments["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    inputs = {i["InputName"]: i["S3Input"] for i in arguments["ProcessingInputs"]}
    assert {name: (i["S3Uri"], i["LocalPath"]) for name, i in inputs.items()} == {
        "config": ("s3://configs/jobs/registration.json", "/opt/ml/processing/config"),
        "payload": ("s3://configs/jobs/payload/", "/opt/ml/processing/mims_payload"),
        "metadata": ("s3://configs/jobs/metadata/", "/opt/ml/processing/input/metadata"),
    }
    environment = arguments["Environment"]
    # A retried step has the same execution id: the registrar resumes what it started.
    assert environment["MODS_WORKFLOW_EXECUTION_ID"] == {"Get": "Execution.PipelineExecutionId"}
    # The model goes as its S3 URI (copied inside S3), bound to the pipeline parameter.
    assert environment["REGISTRAR_MODEL_PATH"] == {"Get": "Parameters.ModelArtifact"}
    assert environment["REGISTRAR_CONFIG_PATH"] == "/opt/ml/processing/config/registration.json"
    assert environment["REGISTRAR_LOG_FORMAT"] == "json"
    kinds = [policy["ExceptionType"] for policy in step["RetryPolicies"]]
    assert ["Step.SERVICE_FAULT", "Step.THROTTLING"] in kinds
    assert ["SageMaker.CAPACITY_ERROR", "SageMaker.JOB_INTERNAL_ERROR"] in kinds
    assert definition["Parameters"] == [
        {"Name": "ModelArtifact", "Type": "String", "DefaultValue": "s3://training/out/model.tar.gz"}
    ]


def test_the_step_paths_are_the_commands_defaults() -> None:
    """The paths the step declares are the ones `register` reads when given none."""
    defaults = JobInputs()
    assert str(defaults.model_path) == step_builder.MODEL_PATH
    assert str(defaults.payload_path) == step_builder.PAYLOAD_PATH
    assert str(defaults.metadata_path) == step_builder.METADATA_PATH
    assert f"{step_builder.CONFIG_PATH}/{step_builder.CONFIG_FILE}" == str(defaults.config_path)


def test_without_the_sdk_the_builder_says_what_to_install() -> None:
    """The package's own environment has no SDK: the builder says where to get it."""
    with pytest.raises(ImportError, match="sagemaker-core and sagemaker-mlops"):
        step_builder.registration_step(
            image_uri=IMAGE, role=ROLE, model="s3://b/m.tar.gz", config="s3://b/c", sagemaker_session=None
        )
