"""Regenerate model/weights.f32 (deterministic: seed 42, He-initialised float32)."""

from pathlib import Path

import numpy as np

root = Path(__file__).parent / "model"
rng = np.random.default_rng(42)
feature_dim, hidden_dim = 512, 3072
parts = [
    rng.standard_normal((feature_dim, hidden_dim)) * np.sqrt(2.0 / feature_dim),
    np.zeros(hidden_dim),
    rng.standard_normal((hidden_dim, 1)) * np.sqrt(1.0 / hidden_dim),
    np.full(1, -1.0),
]
np.concatenate([p.ravel() for p in parts]).astype("<f4").tofile(root / "weights.f32")
