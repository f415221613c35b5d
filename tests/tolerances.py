"""Float tolerances derived from the arithmetic, never tuned to pass on one CPU.

Two programs computing the same function with differently ordered reductions (other shardings, the
split vs the fused step, XLA vs PyTorch, an AVX2 vs an AVX-512 CPU) differ by rounding alone. Rounding
an n-term sum adds n errors of at most eps/2 of the running value each; with independent signs they
add like a random walk, about sqrt(n)·eps·scale (eps: the dtype's machine epsilon, scale: the size of
the quantities), and chained reductions (one per layer and op) add their errors. ``SAFETY`` standard
deviations of that model: a difference beyond it is a bug, not rounding.
"""

from __future__ import annotations

import math

import numpy as np

SAFETY = 8.0


def rounding_tolerance(dtype, n: int, depth: int = 1, scale: float = 1.0) -> float:
    """Absolute tolerance for values of size ``scale`` after ``depth`` chained reductions of length <= ``n``."""
    return SAFETY * depth * math.sqrt(n) * float(np.finfo(dtype).eps) * scale


def adam_update_tolerance(grad_tolerance: float, lr: float, steps: int, adam_eps: float = 1e-8) -> float:
    """Bound on parameter differences after ``steps`` Adam(W) steps whose gradients differ by ``grad_tolerance``.

    Adam's update m̂/(sqrt(v̂) + eps) divides a gradient by its own size, so a gradient entry that is ~0 turns
    an absolute difference d into up to d/eps of update: the worst case is lr·d/eps per step.
    """
    return steps * lr * grad_tolerance / adam_eps


def layers_tolerance(reference, *, width: int, layers: int, dtype=np.float32, ops_per_layer: int = 6) -> float:
    """Tolerance for a deep model's outputs computed two ways (ours vs a reference implementation).

    Each layer chains ~``ops_per_layer`` reductions (norm, projections, attention, MLP) of length at most
    ``width`` (the widest of hidden size, MLP size and sequence length); ``reference`` sets the scale.
    """
    scale = float(np.max(np.abs(np.asarray(reference, np.float64))))
    return rounding_tolerance(dtype, width, ops_per_layer * layers + 2, scale)
