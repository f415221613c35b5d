"""Token recovery from the text codes on the wire: nearest neighbour in the LLM's embedding table.

The client embeds text with the LLM's table E [V, D] and quantizes it: u = x W + b (``in_proj``), then the
batch scaling z = clip(u, mu +- 3 sd) rescaled to [-1, 1], then L levels. The server (or an eavesdropper)
receives the level indices and decodes them to grid values z_hat. Two attackers (threat model in
``docs/privacy.md``):

* :func:`known_projection_attack` -- knows ``in_proj`` (e.g. released weights): every candidate token v
  maps to a known u_v = E_v W + b, and the wire shows an unknown positive affine image of u per batch
  (the scaling statistics are never sent) plus rounding. Step 1 matches each received row to the
  candidate with the highest Pearson correlation (invariant to any positive affine map); step 2 fits the
  batch's map (alpha, beta) by least squares on those matches and re-matches every row by Euclidean
  distance to clip(alpha u_v + beta, -1, 1), which also uses the scale the correlation ignores.
* :func:`learned_map_attack` -- does not know ``in_proj``: it collects (received values, token) pairs on
  its own text through black-box access to the client encoder, fits a ridge-regularised linear map
  values -> embedding (:func:`fit_linear_map`) and takes the nearest table row.

For the fp16 baseline the wire carries E_v itself (rounded to float16), so plain nearest neighbour
(:func:`nearest_neighbour`) recovers every token whose embedding differs from the others in float16.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

METRICS = ("euclidean", "correlation")


def _rows(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise ValueError(f"{name} must be {want}, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf.")
    return x


def _center_unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def nearest_neighbour(queries: np.ndarray, table: np.ndarray, metric: str = "euclidean",
                      chunk: int = 4096) -> np.ndarray:
    """Index of the closest ``table`` row for each query row ([N, D] against [V, D]) -> int64 [N].

    ``metric``: 'euclidean' or 'correlation' (Pearson: centred cosine, blind to a per-row offset and
    positive scale). Ties go to the lowest index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: use one of {METRICS}.")
    table = _rows(table, "table")
    queries = _rows(queries, "queries", table.shape[1])
    if metric == "correlation":
        table, queries = _center_unit(table), _center_unit(queries)
        score_bias = np.zeros(len(table))
    else:
        # argmin |q - t|^2 = argmax q.t - |t|^2 / 2
        score_bias = -0.5 * np.sum(table * table, axis=1)
    out = np.empty(len(queries), np.int64)
    for i in range(0, len(queries), chunk):
        out[i:i + chunk] = np.argmax(queries[i:i + chunk] @ table.T + score_bias, axis=1)
    return out


def known_projection_attack(values: np.ndarray, table: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                            batch_ids: np.ndarray | None = None) -> np.ndarray:
    """Tokens from decoded text codes when ``in_proj`` (``kernel`` [D, D'], ``bias`` [D']) is known.

    Args:
      values: [N, D'] grid values of the received rows (real text positions only).
      table: the client's embedding table [V, D].
      kernel, bias: the client's ``in_proj``.
      batch_ids: [N] the message each row came in; the scaling map is fitted per message (one batch's
        statistics). None: all rows share one message.

    Returns:
      int64 [N] recovered token ids.
    """
    table = _rows(table, "table")
    kernel = np.asarray(kernel, np.float64)
    bias = np.asarray(bias, np.float64)
    if kernel.shape[0] != table.shape[1] or bias.shape != (kernel.shape[1],):
        raise ValueError(f"in_proj kernel {kernel.shape} / bias {bias.shape} do not fit table {table.shape}.")
    candidates = table @ kernel + bias
    values = _rows(values, "values", candidates.shape[1])
    batch_ids = np.zeros(len(values), np.int64) if batch_ids is None else np.asarray(batch_ids)
    if batch_ids.shape != (len(values),):
        raise ValueError(f"batch_ids must be [N={len(values)}], got {batch_ids.shape}.")
    guess = nearest_neighbour(values, candidates, "correlation")
    out = np.empty_like(guess)
    for b in np.unique(batch_ids):
        rows = batch_ids == b
        u, z = candidates[guess[rows]].ravel(), values[rows].ravel()
        # Least-squares fit z ~ alpha u + beta of this message's scaling map on the first guesses.
        a = np.stack([u, np.ones_like(u)], axis=1)
        (alpha, beta), *_ = np.linalg.lstsq(a, z, rcond=None)
        if not alpha > 0:  # degenerate fit (e.g. one constant row): keep the correlation matches
            out[rows] = guess[rows]
            continue
        predicted = np.clip(alpha * candidates + beta, -1.0, 1.0)
        out[rows] = nearest_neighbour(values[rows], predicted, "euclidean")
    return out


class LinearMap(NamedTuple):
    """values [N, D'] -> ``values @ weight + bias`` [N, D]."""

    weight: np.ndarray
    bias: np.ndarray

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64) @ self.weight + self.bias


def fit_linear_map(values: np.ndarray, targets: np.ndarray, ridge: float = 1e-3) -> LinearMap:
    """Ridge regression (intercept not penalised) from received values to the true embeddings."""
    values = _rows(values, "values")
    targets = _rows(targets, "targets")
    if len(values) != len(targets):
        raise ValueError(f"values and targets need the same rows, got {len(values)} and {len(targets)}.")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    mu_v, mu_t = values.mean(axis=0), targets.mean(axis=0)
    v, t = values - mu_v, targets - mu_t
    # Scale the penalty with the data so one ridge value suits features of any magnitude.
    gram = v.T @ v
    lam = ridge * np.trace(gram) / max(gram.shape[0], 1)
    weight = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), v.T @ t)
    return LinearMap(weight, mu_t - mu_v @ weight)


def learned_map_attack(values: np.ndarray, table: np.ndarray, linear_map: LinearMap) -> np.ndarray:
    """Tokens from received values via the attacker's learned map, then nearest table row (Euclidean)."""
    return nearest_neighbour(linear_map(_rows(values, "values")), table, "euclidean")


def token_accuracy(predicted: np.ndarray, true: np.ndarray) -> float:
    """Fraction of positions whose recovered id equals the true id."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    if predicted.shape != true.shape or predicted.size == 0:
        raise ValueError(f"need equal, non-empty shapes, got {predicted.shape} and {true.shape}.")
    return float(np.mean(predicted == true))
