"""Feature batches for the level-selection rule: from an ``.npz`` file, or synthetic ones to try it on."""

from __future__ import annotations

import numpy as np

SYNTHETIC_KINDS = ("gaussian", "outlier", "mixture")


def load_feature_batches(path: str) -> list[np.ndarray]:
    """Batches from an npz: arrays batch_0..batch_N (in numeric order), or one array split on axis 0."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as .npz ({e}).") from None
    named = {k: v for k, v in arrays.items() if k.startswith("batch_") and k[6:].isdigit()}
    if named:
        return [named[k] for k in sorted(named, key=lambda k: int(k[6:]))]
    if len(arrays) == 1:
        (stacked,) = arrays.values()
        if stacked.ndim < 2:
            raise ValueError(f"{path}: a single array must be [num_batches, ...], got shape {stacked.shape}.")
        return list(stacked)
    raise ValueError(f"{path}: expected arrays batch_0..batch_N or one [num_batches, ...] array, got {sorted(arrays)}.")


def synthetic_feature_batches(
    kind: str = "outlier", num_batches: int = 8, tokens: int = 512, dim: int = 256, seed: int = 0
) -> list[np.ndarray]:
    """Features u = x W (W ~ N(0, 0.02^2), zero bias: the official in_proj init) of synthetic activations x.

    kind: "gaussian" (x i.i.d. normal), "outlier" (normal plus a few high-magnitude channels whose size
    varies per token, as LLM/connector activations have: a scale mixture, so heavy-tailed features), or
    "mixture" (two token populations with different activation scales, like image and text tokens).
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; use one of {SYNTHETIC_KINDS}.")
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.02, size=(dim, dim))
    out = []
    for _ in range(num_batches):
        x = rng.normal(size=(tokens, dim))
        if kind == "outlier":
            channels = rng.choice(dim, size=4, replace=False)
            x[:, channels] *= 20.0 * rng.lognormal(0.0, 0.75, size=(tokens, 1))
        elif kind == "mixture":
            x[: tokens // 2] *= 0.25
        out.append((x @ w).astype(np.float32))
    return out

