"""The demo's example model, wherever the package runs from.

In a checkout it is `examples/demo`.  An installed copy carries the example's small
files (`_example_files`, put there by the wheel build) but not its 6 MiB of weights:
`materialize` copies the files into a directory and generates the weights there,
deterministically, with the standard library (the checkout's were made with numpy,
so the values differ; the shapes, the size and the model's code are the same).
"""

from __future__ import annotations

import array
import json
import math
import random
import shutil
import sys
from pathlib import Path

__all__ = ["checkout_example", "materialize", "packaged_example"]

_PACKAGE = Path(__file__).resolve().parent


def checkout_example() -> Path | None:
    """`examples/demo` of the checkout this package runs from, if it runs from one."""
    root = _PACKAGE.parent / "examples" / "demo"
    return root if (root / "registration.json").is_file() else None


def packaged_example() -> Path | None:
    """The example's files shipped inside an installed copy (no weights), if there are any."""
    root = _PACKAGE / "_example_files"
    return root if (root / "registration.json").is_file() else None


def materialize(files: Path, into: Path) -> Path:
    """Copy the example's `files` into `into` and generate its weights there; return `into`."""
    shutil.copytree(files, into, dirs_exist_ok=True)
    model = into / "model"
    config = json.loads((model / "config.json").read_text())
    weights = model / config["weights_file"]
    if not weights.exists():
        _write_weights(weights, config)
    return into


def _write_weights(path: Path, config: dict[str, object]) -> None:
    """He-initialised float32 weights (seed 42) in the order and shapes `config` lists them."""
    rng = random.Random(42)  # noqa: S311  (example weights, not secrets)
    values = array.array("f")
    layers = config["layers"]
    assert isinstance(layers, list)
    for layer in layers:
        shape = layer["shape"]
        size = math.prod(shape)
        if layer["name"].endswith("bias") or len(shape) == 1:
            values.extend([0.0] * size)
        else:
            scale = math.sqrt(2.0 / shape[0])
            values.extend(rng.gauss(0.0, scale) for _ in range(size))
    if sys.byteorder != "little":
        values.byteswap()
    with path.open("wb") as out:
        values.tofile(out)
