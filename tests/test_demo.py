"""The demo: the example model registered end to end on the embedded default."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from .conftest import ROOT


def test_demo_registers_the_example() -> None:
    """`async-registrar demo` (what scripts/demo runs) exits 0 and prints the two lines."""
    result = subprocess.run(
        [sys.executable, "-m", "async_registrar", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "Workflow execution arn for model registration process",
        "Model id for model being registered",
    ]
    assert "registry holds s3://mims-registry/models/" in result.stderr
    assert "holds 0 temporary object(s) or open upload(s)" in result.stderr


def test_example_model_serves_predictions() -> None:
    """The example is a real model: its SageMaker handlers score the payload sample."""
    code = ROOT / "examples" / "demo" / "model" / "code" / "inference.py"
    spec = importlib.util.spec_from_file_location("demo_inference", code)
    assert spec is not None
    assert spec.loader is not None
    inference = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # keep the example free of __pycache__
    try:
        spec.loader.exec_module(inference)
    finally:
        sys.dont_write_bytecode = previous
    model = inference.model_fn(str(ROOT / "examples" / "demo" / "model"))
    rows = inference.input_fn((ROOT / "examples" / "demo" / "payload" / "sample.csv").read_text(), "text/csv")
    scores = json.loads(inference.output_fn(inference.predict_fn(rows, model), "application/json"))
    assert len(scores) == 3
    assert all(0.0 < s["risk_score"] < 1.0 for s in scores)
