"""Choosing the number of quantizer levels L from the estimated entropy of the scaled features.

* ``rule``: the quantizer's scaling evaluated on a KDE of the features, per-L statistics and the
  resolution-gap rule (``select_levels``, ``estimate_over_batches``); NumPy and the quantizer only;
* ``features``: feature batches from an ``.npz`` file or synthetic ones;
* ``report``: ``levels.json`` / ``levels.md`` / ``levels.png`` (matplotlib);
* ``cli``: ``python -m qtl_jax.level_selection (--features=FILE.npz | --synthetic) --out=DIR``.

Each imports only the ones listed before it. The rule and the feature sources are re-exported here.
"""

from qtl_jax.level_selection.features import SYNTHETIC_KINDS, load_feature_batches, synthetic_feature_batches
from qtl_jax.level_selection.rule import (
    CLIP_SIGMA,
    DEFAULT_CANDIDATES,
    DEFAULT_TOLERANCE_BITS,
    BatchEstimate,
    LevelSelection,
    LevelStats,
    ScaledDensity,
    apply_rule,
    decision_thresholds,
    estimate_over_batches,
    level_stats,
    level_values,
    nearest_level_indices,
    scale_features,
    scaled_density,
    scaling_bounds,
    select_levels,
)

__all__ = [
    "CLIP_SIGMA", "DEFAULT_CANDIDATES", "DEFAULT_TOLERANCE_BITS", "SYNTHETIC_KINDS", "BatchEstimate", "LevelSelection",
    "LevelStats", "ScaledDensity", "apply_rule", "decision_thresholds", "estimate_over_batches", "level_stats",
    "level_values", "load_feature_batches", "nearest_level_indices", "scale_features", "scaled_density",
    "scaling_bounds", "select_levels", "synthetic_feature_batches",
]
