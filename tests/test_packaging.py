"""Install as the README says: a built wheel in a new virtualenv, outside the checkout.

The wheel is built from this checkout (`pip wheel`), installed into a fresh venv with the
dependencies pinned by `requirements/dev.lock` (so the package registry's cache serves them),
and run from a directory that is not the checkout: `register` works on a plain install,
`demo` names the extra it needs, and works once the extra is installed, on the example the
wheel carries (its weights generated on the fly).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from async_registrar import Settings
from async_registrar._local import LocalStack

from .conftest import ROOT, make_job
from .test_cli import environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def pip(python: Path, *args: str) -> None:
    result = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_built_wheel_installs_and_runs_outside_the_checkout(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    wheels = tmp_path / "wheels"
    pip(Path(sys.executable), "wheel", "--no-deps", "-w", str(wheels), str(ROOT))
    (wheel,) = wheels.glob("async_registrar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "async_registrar/_example_files/registration.json" in names
    assert not any(name.endswith(".f32") for name in names)  # the weights are made on the fly
    assert wheel.stat().st_size < 1024 * 1024

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    lock = ["-c", str(ROOT / "requirements" / "dev.lock")]
    pip(python, "install", *lock, str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [str(venv / "bin" / "async-registrar")]

    def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command + list(args), env=env, cwd=elsewhere, capture_output=True, text=True, timeout=120, check=False
        )

    job = make_job(tmp_path)
    plain = {k: v for k, v in environment(stack, settings, job).items() if k != "PYTHONPATH"}
    registered = run(plain, "register")
    assert registered.returncode == 0, registered.stderr
    assert len(registered.stdout.splitlines()) == 2

    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    missing = run(base, "demo")
    assert missing.returncode == 2, missing.stderr
    assert "pip install 'async-registrar[local]'" in missing.stderr
    assert "Traceback" not in missing.stderr

    pip(python, "install", *lock, f"{wheel}[local]")
    demo = run(base, "demo")
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.splitlines()[1].startswith("Model id for model being registered: model-")
    assert "with generated weights" in demo.stderr
