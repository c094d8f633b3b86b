"""The registration step's SageMaker Pipeline definition, built with the real SDK v3 in a virtual
environment of its own (requirements/sagemaker*.txt, made once under .bench/tools), offline:
fake credentials, a default bucket, and an AWS endpoint that refuses any call.

    python scripts/sagemaker_step.py OUT.json --image IMAGE --model s3://... --config s3://... \\
        [--payload s3://...] [--metadata s3://...] [--setting NAME=VALUE ...]

The model is a pipeline parameter (`ModelArtifact`, default `--model`), as a training step's
output would be. Used by tests/test_sagemaker_step.py and scripts/container-smoke.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = [ROOT / "requirements" / "sagemaker.txt", ROOT / "requirements" / "sagemaker-sdk.txt"]
ROLE = "arn:aws:iam::123456789012:role/registration"

_BUILD = """
import json, sys
import boto3
from sagemaker.core.workflow.parameters import ParameterString
from sagemaker.core.workflow.pipeline_context import PipelineSession
from sagemaker.mlops.workflow.pipeline import Pipeline
from async_registrar.sagemaker import registration_step

out, spec = sys.argv[1], json.loads(sys.argv[2])
session = PipelineSession(boto_session=boto3.Session(region_name="us-west-2"), default_bucket="pipeline-bucket")
model = ParameterString(name="ModelArtifact", default_value=spec.pop("model"))
step = registration_step(model=model, sagemaker_session=session, **spec)
pipeline = Pipeline(name="train-and-register", parameters=[model], steps=[step], sagemaker_session=session)
with open(out, "w") as f:
    f.write(pipeline.definition())
"""


def sdk_python() -> Path:
    """The Python of a virtual environment with the SDK (made again when the requirements change)."""
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in REQUIREMENTS)).hexdigest()[:16]
    venv = ROOT / ".bench" / "tools" / f"sagemaker-{stamp}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*install, "-r", str(REQUIREMENTS[0])], check=True, timeout=600)
        subprocess.run([*install, "--no-deps", "-r", str(REQUIREMENTS[1])], check=True, timeout=600)
        (venv / ".complete").touch()
    return python


def build_definition(out: Path, **spec: Any) -> dict[str, Any]:
    """Build the pipeline with `registration_step(**spec)` (`model` the parameter's default,
    `role` this module's by default) and return its definition, also written to `out`."""
    spec.setdefault("role", ROLE)
    offline = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",  # the SDK makes a client when it is imported
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # any AWS call would be refused at once
        "PYTHONPATH": str(ROOT),  # the builder needs nothing else of the package
    }
    subprocess.run([str(sdk_python()), "-c", _BUILD, str(out), json.dumps(spec)], check=True, env=offline, timeout=300)
    definition: dict[str, Any] = json.loads(out.read_text())
    return definition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--image", required=True)
    parser.add_argument("--model", required=True, help="the ModelArtifact parameter's default")
    parser.add_argument("--config", required=True)
    parser.add_argument("--payload")
    parser.add_argument("--metadata")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    spec: dict[str, Any] = {"image_uri": args.image, "model": args.model, "config": args.config}
    spec.update({k: v for k, v in (("payload", args.payload), ("metadata", args.metadata)) if v})
    if args.setting:
        spec["settings"] = dict(s.split("=", 1) for s in args.setting)
    build_definition(args.out, **spec)


if __name__ == "__main__":
    main()
