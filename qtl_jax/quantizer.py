"""The quantizer at the split: client ``in_proj`` -> bound -> L-level rounding -> indices; server
indices -> grid values -> ``out_proj``.

The paper's method (Quantized-TinyLLaVA, as its official code runs it) is ``bound='linear'`` with
``scaling='batch'``: one scalar mean and unbiased std over the whole batch tensor (padding included,
gradients through both), a clip to mean ± 3·std, a rescale to [-1, 1], and nearest-of-L uniform levels
with a straight-through gradient. Variants: ``scaling='ema'`` (running statistics, frozen at
evaluation), ``scaling='token'`` (per-token statistics), ``bound='tanh'`` (canonical FSQ bounding, the
paper's "FSQ_old" baseline) and ``bound='none'`` (the fp16 "Original" baseline).

Split use. The client runs :meth:`Quantizer.encode` and sends ``codes``; the server runs
:meth:`Quantizer.decode` (equivalently :func:`dequantize` then :meth:`Quantizer.project_out`). Because the
straight-through estimator makes d(grid value)/dz the identity, the server's gradient with respect to
the dequantized values it fed to ``out_proj`` *is* the cotangent of the client's ``z``, so the client
finishes the backward pass with ``jax.vjp`` of ``encode`` (see ``docs/quantizer.md``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.precision import upcast

SCALINGS = ("batch", "ema", "token")
BOUNDS = ("linear", "tanh", "none")
INITS = ("normal", "identity")
# Largest L: indices must fit uint16, and float32 must resolve the grid (2/(L-1) >> float32 eps).
MAX_LEVELS = 1 << 16
# The robust-scaling constant of the official code (added to numerator and denominator).
SCALE_EPS = 1e-4
# The cosine-distortion denominator constant of the official code.
COSINE_EPS = 1e-3
# Canonical FSQ bound: half-width (L-1)(1+eps)/2 so the end levels are reachable.
TANH_EPS = 1e-3


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise ValueError(f"levels must be an int >= 2, got {levels!r} ({type(levels).__name__}).")
    levels = int(levels)
    if not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels={levels} is out of range: use 2 <= levels <= {MAX_LEVELS}.")
    return levels


def index_dtype(levels: int) -> jnp.dtype:
    """uint8 for L <= 256, uint16 up to 65536: the narrowest dtype that holds every index."""
    return jnp.dtype(jnp.uint8) if _check_levels(levels) <= 256 else jnp.dtype(jnp.uint16)


def grid(levels: int) -> np.ndarray:
    """The L grid values (k - h)/h, h = (L-1)/2, k = 0..L-1, correctly rounded to float32."""
    h = (_check_levels(levels) - 1) / 2
    return ((np.arange(levels, dtype=np.float64) - h) / h).astype(np.float32)


def dequantize(indices: jax.Array, levels: int) -> jax.Array:
    """Grid values of level indices, float32 in {-1, -1 + 2/(L-1), ..., 1}. The server side.

    A table lookup rather than arithmetic, so client and server get bit-identical values on any backend
    (XLA may turn a division into a reciprocal multiply). Out-of-range indices clamp to the end levels.
    """
    table = jnp.asarray(grid(levels))
    return jnp.take(table, jnp.asarray(indices).astype(jnp.int32), mode="clip")


def round_to_levels(z: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
    """Nearest of L uniform levels on [-1, 1] with a straight-through (identity) gradient.

    Follows the official code: s = h·z - o with h = (L-1)/2, o = ((L-1) mod 2)/2, r = round(s) (half to
    even), value (r + o)/h, index r + L//2. The math runs in float32 whatever z's dtype, so grid values
    and decision thresholds are exact. Inputs outside [-1, 1] go to the end levels (the gradient stays
    the identity) and NaN to the middle level, so the indices are always in {0..L-1}.

    Returns:
      z_hat: float32 grid values, equal to ``dequantize(indices, levels)``; d z_hat / d z = 1.
      indices: uint8 (L <= 256) or uint16 level indices.
    """
    levels = _check_levels(levels)
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"round_to_levels expects a floating-point z, got dtype {z.dtype}.")
    z32 = upcast(z)
    h = (levels - 1) / 2
    o = ((levels - 1) % 2) / 2
    half = levels // 2
    r = jnp.clip(jnp.round(jax.lax.stop_gradient(z32) * h - o), -half, levels - 1 - half)
    # NaN has no nearest level; send it to the middle one rather than an undefined integer cast.
    r = jnp.where(jnp.isnan(r), 0.0, r)
    indices = (r + half).astype(index_dtype(levels))
    # Value from the canonical grid formula plus an exact zero that carries the identity gradient, so
    # the fused forward and the server's dequantize() agree bit for bit.
    z_hat = jax.lax.stop_gradient(dequantize(indices, levels).astype(z32.dtype)) + (z32 - jax.lax.stop_gradient(z32))
    return z_hat, indices


def moments(u: jax.Array, mask: jax.Array | None = None, axis: Any = None) -> tuple[jax.Array, jax.Array]:
    """Mean and unbiased std over ``axis`` (all axes by default) of the elements ``mask`` keeps.

    ``mask`` has u's shape without the last (channel) axis; it is broadcast over channels. It may hold
    counts: a row of weight k stands for k equal rows (the packed text tensor's zero row).
    """
    u = upcast(u)
    if mask is None:
        w = jnp.ones_like(u)
    else:
        w = jnp.broadcast_to(jnp.asarray(mask, u.dtype)[..., None], u.shape)
    n = jnp.sum(w, axis=axis, keepdims=axis is not None)
    mean = jnp.sum(w * u, axis=axis, keepdims=axis is not None) / jnp.maximum(n, 1.0)
    centered = u - mean
    var = jnp.sum(w * (centered * centered), axis=axis, keepdims=axis is not None) / jnp.maximum(n - 1.0, 1.0)
    return mean, jnp.sqrt(var)


def linear_scale(u: jax.Array, mean: jax.Array, std: jax.Array, clip_sigma: float = 3.0):
    """The paper's robust min-max scaling: clip to mean ± clip_sigma·std, rescale to [-1, 1].

    z = 2(clip(u) - lo + 1e-4)/(hi - lo + 1e-4) - 1 exactly as the official code (the 1e-4 terms keep a
    zero-width range finite). Gradients flow through mean and std; clipped elements pass theirs to the
    bounds. Returns ``(z, clipped)`` with ``clipped`` the boolean mask of elements outside [lo, hi].
    """
    u = upcast(u)
    lo = mean - clip_sigma * std
    hi = mean + clip_sigma * std
    z = 2.0 * (jnp.clip(u, lo, hi) - lo + SCALE_EPS) / (hi - lo + SCALE_EPS) - 1.0
    return z, (u < lo) | (u > hi)


def tanh_bound(u: jax.Array, levels: int) -> jax.Array:
    """Canonical FSQ bounding (Mentzer et al.), expressed on this module's [-1, 1] grid coordinates.

    FSQ computes s = tanh(u + shift)·half_l - o with half_l = h(1 + eps) and shift = atanh(o/half_l), so
    that u = 0 lands on a level for even L. Dividing by h gives z with h·z - o = s, which
    :func:`round_to_levels` then rounds exactly as FSQ does.
    """
    levels = _check_levels(levels)
    if levels == 2:
        raise ValueError(
            "bound='tanh' is degenerate for levels=2 (the FSQ shift atanh(0.999) ~ 3.8 sends almost every "
            "input to the top level); use levels >= 3 or bound='linear'."
        )
    h = (levels - 1) / 2
    o = ((levels - 1) % 2) / 2
    half_l = h * (1.0 + TANH_EPS)
    shift = math.atanh(o / half_l)
    return jnp.tanh(upcast(u) + shift) * (half_l / h)


def cosine_distortion(z: jax.Array, z_hat: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over token rows of 1 - <z, sg(z_hat)>/(|z||z_hat| + 1e-3); only z receives gradient.

    With ``mask`` the mean runs over the rows it keeps (the official code averages over all rows).
    """
    z = upcast(z)
    z_hat = jax.lax.stop_gradient(z_hat.astype(z.dtype))
    dot = jnp.sum(z * z_hat, axis=-1)
    norms = jnp.linalg.norm(z, axis=-1) * jnp.linalg.norm(z_hat, axis=-1)
    per_row = 1.0 - dot / (norms + COSINE_EPS)
    if mask is None:
        return jnp.mean(per_row)
    w = jnp.asarray(mask, per_row.dtype)
    return jnp.sum(w * per_row) / jnp.maximum(jnp.sum(w), 1.0)


# Up to this many levels code_stats counts by comparison (work ~ L per index); beyond, by bincount.
ONE_HOT_COUNT_MAX_LEVELS = 32


def code_stats(indices: jax.Array, levels: int, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Level-usage fractions (``histogram``, shape [L]) and their entropy in bits (``entropy_bits``)."""
    levels = _check_levels(levels)
    indices = jnp.asarray(indices)
    if levels <= ONE_HOT_COUNT_MAX_LEVELS and indices.ndim > 0:
        # Counted as a reduction over one comparison per level. A scatter-add (bincount) into a handful of
        # bins serialises on a GPU: every index collides on the same few addresses (7 ms per 15 M indices on
        # an H200, 14 % of a paper-size stage-2 step), where the comparisons are one fused pass.
        per_row = jnp.sum((indices[..., None] == jnp.arange(levels, dtype=indices.dtype)).astype(jnp.int32),
                          axis=-2)
        if mask is None:
            counts = jnp.sum(per_row.reshape(-1, levels).astype(jnp.float32), axis=0)
        else:
            w = jnp.asarray(mask, jnp.float32)[..., None]
            counts = jnp.sum((w * per_row.astype(jnp.float32)).reshape(-1, levels), axis=0)
    else:
        if mask is None:
            w = jnp.ones(indices.shape, jnp.float32)
        else:
            w = jnp.broadcast_to(jnp.asarray(mask, jnp.float32)[..., None], indices.shape)
        counts = jnp.bincount(indices.reshape(-1).astype(jnp.int32), weights=w.reshape(-1), length=levels)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = jnp.sum(jnp.where(p > 0, p * jnp.log2(1.0 / jnp.where(p > 0, p, 1.0)), 0.0))
    return {"histogram": p, "entropy_bits": entropy}


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """One modality's quantizer.

    Attributes:
      dim: feature width D (in_proj and out_proj are D -> D).
      levels: number of uniform levels L >= 2 (bits per index log2 L).
      scaling: 'batch' (the paper: scalar mean/std over the whole batch tensor, padding included,
        gradients through them), 'ema' (running scalar mean/std in ``batch_stats``: batch statistics in
        training, frozen running ones at evaluation) or 'token' (per-token mean/std over channels).
        Only used by bound='linear'.
      bound: 'linear' (the paper's ±clip_sigma·std scaling), 'tanh' (canonical FSQ, the "FSQ_old"
        baseline) or 'none' (fp16 pass-through, the "Original" baseline: no projections, no indices).
      dist_weight: weight of the cosine distortion loss (0.25 in the paper; its FSQ_old baseline used 0).
      clip_sigma: clip width in stds (3 in the paper).
      ema_momentum: running-statistics momentum for scaling='ema'.
      dtype: compute dtype of the projections; the scaling and rounding always run in float32.
      param_dtype: dtype of the projection parameters.
      init: 'normal' (the paper: N(0, 0.02²) kernels, zero biases) or 'identity' (our own choice, for
        quantizers added to a model trained without them: ``in_proj`` the identity and ``out_proj`` the
        least-squares inverse of the scaling and rounding for Gaussian features of mean ``init_mean`` and std
        ``init_std`` (:func:`decoder_gain`), so that at init the server reconstructs the client's features as
        well as L levels allow; bound='linear' with scaling 'batch' or 'ema' only).
      init_mean, init_std: the scalar mean and std of the features that 'identity' calibrates ``out_proj`` to
        (the statistics the batch scaling will compute, e.g. ``feature_mean_*`` / ``feature_std_*`` of a
        16-bit run's metrics.jsonl).
    """

    dim: int
    levels: int = 4
    scaling: str = "batch"
    bound: str = "linear"
    dist_weight: float = 0.25
    clip_sigma: float = 3.0
    ema_momentum: float = 0.99
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init: str = "normal"
    init_mean: float = 0.0
    init_std: float = 1.0

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"QuantizerConfig.dim must be a positive int, got {self.dim!r}.")
        _check_levels(self.levels)
        if self.scaling not in SCALINGS:
            raise ValueError(f"QuantizerConfig.scaling={self.scaling!r}: use one of {SCALINGS}.")
        if self.bound not in BOUNDS:
            raise ValueError(f"QuantizerConfig.bound={self.bound!r}: use one of {BOUNDS}.")
        if self.bound == "tanh" and self.levels == 2:
            tanh_bound(jnp.zeros(()), 2)  # raises the explanatory error
        if not self.dist_weight >= 0:
            raise ValueError(f"QuantizerConfig.dist_weight must be >= 0, got {self.dist_weight!r}.")
        if not self.clip_sigma > 0:
            raise ValueError(f"QuantizerConfig.clip_sigma must be > 0, got {self.clip_sigma!r}.")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"QuantizerConfig.ema_momentum must be in [0, 1), got {self.ema_momentum!r}.")
        if self.init not in INITS:
            raise ValueError(f"QuantizerConfig.init={self.init!r}: use one of {INITS}.")
        if self.init == "identity":
            if self.bound != "linear" or self.scaling == "token":
                raise ValueError(
                    f"QuantizerConfig.init='identity' needs bound='linear' with scaling 'batch' or 'ema' (one scalar "
                    f"scale that out_proj can invert), got bound={self.bound!r}, scaling={self.scaling!r}; use "
                    "init='normal'.")
            if not (math.isfinite(self.init_mean) and math.isfinite(self.init_std) and self.init_std > 0):
                raise ValueError(f"QuantizerConfig.init='identity' needs a finite init_mean and init_std > 0, got "
                                 f"init_mean={self.init_mean!r}, init_std={self.init_std!r}.")


class Encoded(NamedTuple):
    """What the client's :meth:`Quantizer.encode` produces.

    codes: what crosses the network: uint8/uint16 level indices, or float16 values for bound='none'.
    z: float32 pre-rounding value whose straight-through image is ``dequantize(codes)``; the server's
      gradient w.r.t. the dequantized values is the cotangent of ``z``.
    loss: ``dist_weight`` · cosine distortion (the client's regulariser; 0 for bound='none').
    stats: per-modality diagnostics (see :meth:`Quantizer.encode`).
    """

    codes: jax.Array
    z: jax.Array
    loss: jax.Array
    stats: dict[str, jax.Array]


class QuantizerOutput(NamedTuple):
    """The fused forward: reconstruction ``y`` (what the LLM sees), ``codes``, ``loss`` and ``stats``."""

    y: jax.Array
    codes: jax.Array
    loss: jax.Array
    stats: dict[str, jax.Array]


class Quantizer(nn.Module):
    """One modality's split quantizer. Use ``apply(..., method='encode' | 'decode' | 'project_out')``.

    Parameters: ``in_proj`` (client) and ``out_proj`` (server), Dense D -> D with N(0, 0.02²) kernels and
    zero biases, as the official model's ``post_init`` (``init='identity'``: see :class:`QuantizerConfig`).
    The client can apply ``encode`` with only ``{'in_proj': ...}`` and the server ``decode`` with only
    ``{'out_proj': ...}``. scaling='ema' keeps
    ``batch_stats`` {mean, var, count}: pass ``mutable=['batch_stats']`` when ``train=True``.
    """

    config: QuantizerConfig

    def setup(self):
        cfg = self.config
        if cfg.bound != "none":
            dense = dict(features=cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            if cfg.init == "identity":
                # z = (u - mean)/(clip_sigma·std) up to the 1e-4 terms; the gain is the least-squares decoder of
                # the rounded z (clip_sigma·std for fine grids, less for coarse ones, whose end levels are rare).
                in_init = dict(kernel_init=_scaled_eye(1.0), bias_init=nn.initializers.zeros)
                out_init = dict(kernel_init=_scaled_eye(decoder_gain(cfg.levels, cfg.clip_sigma) * cfg.init_std),
                                bias_init=nn.initializers.constant(cfg.init_mean))
            else:
                in_init = out_init = dict(kernel_init=nn.initializers.normal(stddev=0.02),
                                          bias_init=nn.initializers.zeros)
            self.in_proj = nn.Dense(**dense, **in_init, name="in_proj")
            self.out_proj = nn.Dense(**dense, **out_init, name="out_proj")
        # Declared only where present, so the server can run decode() without the client's state.
        if self._uses_ema() and (self.is_initializing() or self.has_variable("batch_stats", "mean")):
            self.running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((), jnp.float32))
            self.running_var = self.variable("batch_stats", "var", lambda: jnp.ones((), jnp.float32))
            self.count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

    def _uses_ema(self) -> bool:
        return self.config.bound == "linear" and self.config.scaling == "ema"

    def _check_input(self, x: jax.Array, mask: jax.Array | None) -> None:
        if x.ndim < 1 or x.shape[-1] != self.config.dim:
            raise ValueError(
                f"Quantizer expects features [..., {self.config.dim}], got shape {tuple(x.shape)}; "
                f"set QuantizerConfig.dim to the feature width."
            )
        if mask is not None and tuple(jnp.shape(mask)) != tuple(x.shape[:-1]):
            raise ValueError(
                f"mask shape {tuple(jnp.shape(mask))} must equal the features' shape without the channel "
                f"axis, {tuple(x.shape[:-1])}."
            )

    def _statistics(self, u: jax.Array, mask: jax.Array | None, train: bool, stat_mask: jax.Array | None = None):
        cfg = self.config
        if cfg.scaling == "batch":
            # The paper: one scalar pair over the whole tensor, padding included (mask ignored on purpose);
            # stat_mask says which rows that tensor has when ours holds more (see encode).
            return moments(u, stat_mask)
        if cfg.scaling == "token":
            return moments(u, axis=-1)
        if not hasattr(self, "running_mean"):
            raise ValueError(
                "scaling='ema' needs the 'batch_stats' collection (from init) to encode: pass "
                "{'params': ..., 'batch_stats': ...} to apply."
            )
        if not train:
            return self.running_mean.value, jnp.sqrt(self.running_var.value)
        mean, std = moments(u, mask)
        if not self.is_initializing():
            m = cfg.ema_momentum
            first = self.count.value == 0
            bm, bv = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std * std)
            # The first update copies the batch statistics, so early evaluation is not biased to (0, 1).
            self.running_mean.value = jnp.where(first, bm, m * self.running_mean.value + (1 - m) * bm)
            self.running_var.value = jnp.where(first, bv, m * self.running_var.value + (1 - m) * bv)
            self.count.value = self.count.value + 1
        return mean, std

    def encode(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False,
               stat_mask: jax.Array | None = None) -> Encoded:
        """Client side. ``x``: [..., D] features; ``mask``: [...] (1 = real token) or None.

        ``stat_mask`` ([...], scaling='batch' only): the rows of the paper's tensor, over which the batch
        statistics and the distortion loss are taken (padding rows included, as the paper has them); None
        takes every row. A caller whose tensor holds more padding than the paper's (a bucket-padded batch,
        image placeholders) marks the paper's rows here.

        ``stats`` holds ``histogram`` (level-usage fractions, [L]), ``entropy_bits`` (of that histogram),
        ``clip_rate`` (fraction clipped by the ±clip_sigma·std bounds; 0 for tanh, which never clips),
        ``distortion`` (unweighted cosine distortion) and ``mse`` (mean squared z - z_hat), all over the
        positions ``mask`` keeps; for bound='none' only ``mse`` of the fp16 cast. Both hold ``feature_mean`` and
        ``feature_std``: the scalar moments of ``x`` over the ``stat_mask`` rows (all rows without one).
        """
        cfg = self.config
        x = jnp.asarray(x)
        self._check_input(x, mask)
        if stat_mask is not None and tuple(jnp.shape(stat_mask)) != tuple(x.shape[:-1]):
            raise ValueError(f"stat_mask shape {tuple(jnp.shape(stat_mask))} must equal the features' shape without "
                             f"the channel axis, {tuple(x.shape[:-1])}.")
        valid = None if mask is None else jnp.asarray(mask, jnp.float32)
        # The input's scalar moments over the paper's rows: what init='identity' is calibrated to.
        feature_mean, feature_std = jax.lax.stop_gradient(moments(x, stat_mask))
        if cfg.bound == "none":
            z = upcast(x)
            codes = x.astype(jnp.float16)
            err = jnp.square(codes.astype(z.dtype) - z)
            mse = jnp.mean(err) if valid is None else _masked_mean(err, valid)
            return Encoded(codes, z, jnp.zeros((), jnp.float32),
                           {"mse": mse, "feature_mean": feature_mean, "feature_std": feature_std})

        u = upcast(self.in_proj(x))
        if cfg.bound == "linear":
            mean, std = self._statistics(u, mask, train, stat_mask)
            z, clipped = linear_scale(u, mean, std, cfg.clip_sigma)
            clip_rate = _masked_mean(clipped.astype(z.dtype), valid)
        else:
            z = tanh_bound(u, cfg.levels)
            clip_rate = jnp.zeros((), jnp.float32)
        z_hat, codes = round_to_levels(z, cfg.levels)
        # The official code averages the distortion over every row, padding included; the non-paper
        # variants keep padding out of everything.
        loss_mask = stat_mask if (cfg.bound == "linear" and cfg.scaling == "batch") else valid
        distortion = cosine_distortion(z, z_hat, loss_mask)
        stats = code_stats(codes, cfg.levels, valid)
        stats.update(
            clip_rate=clip_rate,
            distortion=jax.lax.stop_gradient(cosine_distortion(z, z_hat, valid)),
            mse=jax.lax.stop_gradient(_masked_mean(jnp.square(z - z_hat), valid)),
            feature_mean=feature_mean,
            feature_std=feature_std,
        )
        return Encoded(codes, z, cfg.dist_weight * distortion, stats)

    def project_out(self, z_hat: jax.Array) -> jax.Array:
        """Server side, from dequantized values: ``out_proj`` (identity cast for bound='none')."""
        if self.config.bound == "none":
            return jnp.asarray(z_hat).astype(self.config.dtype)
        return self.out_proj(z_hat)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Server side, from the received codes alone: dequantize then ``out_proj``."""
        cfg = self.config
        codes = jnp.asarray(codes)
        if cfg.bound == "none":
            if codes.dtype != jnp.float16:
                raise ValueError(f"bound='none' decodes float16 values, got dtype {codes.dtype}.")
            return self.project_out(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"decode expects integer level indices, got dtype {codes.dtype}.")
        if codes.ndim < 1 or codes.shape[-1] != cfg.dim:
            raise ValueError(f"decode expects indices [..., {cfg.dim}], got shape {tuple(codes.shape)}.")
        return self.project_out(dequantize(codes, cfg.levels))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False,
                 stat_mask: jax.Array | None = None) -> QuantizerOutput:
        """The fused forward (non-split training and evaluation); equals decode(encode(x).codes)."""
        enc = self.encode(x, mask, train, stat_mask)
        if self.config.bound == "none":
            values = enc.codes.astype(jnp.float32)
        else:
            values = dequantize(enc.codes, self.config.levels)
        # Straight-through: the forward value is exactly the server's, the gradient flows to z.
        z_hat = jax.lax.stop_gradient(values) + (enc.z - jax.lax.stop_gradient(enc.z))
        return QuantizerOutput(self.project_out(z_hat), enc.codes, enc.loss, enc.stats)


def decoder_gain(levels: int, clip_sigma: float = 3.0) -> float:
    """g minimising E[(X - g·q(X))²] for X ~ N(0, 1), q the grid value of X/clip_sigma rounded to L levels.

    The reconstruction gain of ``init='identity'`` in units of the features' std: E[X q]/E[q²], integrated
    exactly over the levels' decision intervals. It tends to clip_sigma as L grows; for L = 2 it is
    E|X| = sqrt(2/pi).
    """
    levels = _check_levels(levels)
    values = grid(levels).astype(np.float64)
    edges = np.concatenate([[-np.inf], clip_sigma * (values[:-1] + values[1:]) / 2, [np.inf]])
    pdf = np.where(np.isfinite(edges), np.exp(-0.5 * np.where(np.isfinite(edges), edges, 0.0) ** 2), 0.0) / math.sqrt(2 * math.pi)
    cdf = np.array([0.5 * (1 + math.erf(e / math.sqrt(2))) if np.isfinite(e) else float(e > 0) for e in edges])
    mass = np.diff(cdf)
    first_moment = pdf[:-1] - pdf[1:]  # E[X; a < X < b] = pdf(a) - pdf(b)
    return float(np.sum(values * first_moment) / np.sum(values ** 2 * mass))


def _scaled_eye(gain: float):
    def init(key, shape, dtype=jnp.float32):
        del key
        return (gain * jnp.eye(shape[0], shape[1], dtype=jnp.float32)).astype(dtype)

    return init


def _masked_mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
    if valid is None:
        return jnp.mean(values)
    w = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim)), values.shape)
    return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1.0)
