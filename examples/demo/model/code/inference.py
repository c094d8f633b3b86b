"""SageMaker inference handlers for the demo risk-scoring model.

A two-layer perceptron over hashed features: numeric inputs go in as signed
log1p values, text inputs as one-hot "name=value" buckets.  The weights are
float32 little-endian in the order config.json lists them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zlib

import numpy as np


def model_fn(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    flat = np.fromfile(os.path.join(model_dir, config["weights_file"]), dtype="<f4")
    params, offset = {}, 0
    for layer in config["layers"]:
        size = math.prod(layer["shape"])
        params[layer["name"]] = flat[offset : offset + size].reshape(layer["shape"])
        offset += size
    if offset != flat.size:
        raise ValueError(f"weights file holds {flat.size} values, config.json describes {offset}")
    return {"config": config, "params": params}


def _features(row: dict, config: dict) -> np.ndarray:
    x = np.zeros(config["feature_dim"], dtype=np.float32)
    for name in config["inputs"]:
        value = row.get(name, "")
        if name in config["numeric_inputs"]:
            number = float(value or 0.0)
            x[zlib.crc32(name.encode()) % x.size] += math.copysign(math.log1p(abs(number)), number)
        else:
            x[zlib.crc32(f"{name}={value}".encode()) % x.size] += 1.0
    return x


def input_fn(body: str | bytes, content_type: str) -> list[dict]:
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    if content_type == "text/csv":
        return list(csv.DictReader(io.StringIO(body)))
    if content_type == "application/json":
        data = json.loads(body)
        return data if isinstance(data, list) else [data]
    raise ValueError(f"unsupported content type {content_type!r}")


def predict_fn(rows: list[dict], model: dict) -> list[float]:
    config, p = model["config"], model["params"]
    x = np.stack([_features(row, config) for row in rows])
    hidden = np.maximum(x @ p["hidden.weight"] + p["hidden.bias"], 0.0)
    logits = hidden @ p["output.weight"] + p["output.bias"]
    return [float(v) for v in 1.0 / (1.0 + np.exp(-logits[:, 0]))]


def output_fn(scores: list[float], accept: str) -> str:
    if accept not in ("application/json", "*/*"):
        raise ValueError(f"unsupported accept type {accept!r}")
    return json.dumps([{"risk_score": s} for s in scores])
