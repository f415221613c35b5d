"""Choosing the number of quantizer levels L from the estimated entropy of the scaled features.

The quantizer (method.md §3) scales features u to z = 2 (clip(u, lo, hi) - lo + eps)/(hi - lo + eps) - 1
with lo/hi = mean -/+ 3 std over the whole batch tensor, then sends the index of the nearest of L uniform
levels c_k = -1 + 2k/(L-1). This module estimates the density of z with a Gaussian KDE (of the unclipped
affine image t of u, so the clipped tails become exact point masses at the ends instead of a smeared KDE
spike), and for each candidate L integrates it over the nearest-level bins to get the index distribution
P_k, the index entropy H(k), the expected squared error and the cosine distortion.

The rule (derived in docs/entropy.md). Let h be the entropy of z with its two clip atoms p-, p+
(h = -p- log p- - p+ log p+ - int_(-1,1) f log f) and Delta = 2/(L-1). At high resolution
H(k) -> h - (1 - p- - p+) log2 Delta, and the *resolution gap*

    gap(L) = H(k) - [h - (1 - p- - p+) log2 Delta]

is, over the interior cells, sum_k P_k KL(f restricted to cell k || uniform on it): in bits per index, how
much of the shape of the feature distribution the L-level code fails to represent. The two end cells add
terms that vanish as Delta -> 0 (and can be slightly negative when the clip atoms are large, so the rule
uses |gap|); docs/entropy.md has the identity and a test checks it. The rule picks the smallest candidate
L from which the gap stays within ``tolerance_bits`` (0.1 bit by default) for every larger candidate:
below it the code loses the shape of the distribution; above it each extra bit of rate only halves the
step (a constant 1 bit of entropy and 6 dB of distortion per bit, with nothing structural left to gain).
The fixed-width cost of that L is ceil(log2 L) bits; its entropy-coded cost is H(k) (the source-coding
lower bound, which an ANS coder reaches to within a fraction of a percent).

The scaling constants, the grid and the rounding are the quantizer's own (``qtl_jax.quantizer``): this
module evaluates them on a float64 density estimate; it does not restate them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from qtl_jax.entropy import KernelDensity, fit_kde
from qtl_jax.quantizer import SCALE_EPS, QuantizerConfig, grid

# The paper's clip width, as the quantizer's config defaults it.
CLIP_SIGMA: float = QuantizerConfig.clip_sigma
DEFAULT_CANDIDATES = tuple(range(2, 33))
DEFAULT_TOLERANCE_BITS = 0.1
_CURVE_POINTS = 401


# ----------------------------------------------------------------------------- the quantizer, in float64


def scaling_bounds(u: np.ndarray, clip_sigma: float = CLIP_SIGMA) -> tuple[float, float, float, float]:
    """(mean, std, lo, hi) of the paper's robust scaling: scalars over the whole tensor, unbiased std."""
    u = np.asarray(u, dtype=np.float64)
    mean = float(np.mean(u))
    std = float(np.std(u, ddof=1))
    return mean, std, mean - clip_sigma * std, mean + clip_sigma * std


def _affine(lo: float, hi: float) -> tuple[float, float]:
    """slope, intercept with z = slope * clip(u, lo, hi) + intercept (the official formula, expanded)."""
    slope = 2.0 / (hi - lo + SCALE_EPS)
    return slope, slope * (SCALE_EPS - lo) - 1.0


def scale_features(u: np.ndarray, clip_sigma: float = CLIP_SIGMA) -> np.ndarray:
    """z = 2 (clip(u, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1, float64, statistics over all of u."""
    u = np.asarray(u, dtype=np.float64)
    _, _, lo, hi = scaling_bounds(u, clip_sigma)
    return 2.0 * (np.clip(u, lo, hi) - lo + SCALE_EPS) / (hi - lo + SCALE_EPS) - 1.0


def level_values(levels: int) -> np.ndarray:
    """The quantizer's L grid values -1 + 2k/(L-1) (``quantizer.grid``, float32 as the server uses them)."""
    return grid(levels).astype(np.float64)


def decision_thresholds(levels: int) -> np.ndarray:
    """The L-1 midpoints between neighbouring grid values (nearest-level decision boundaries)."""
    # The grid is symmetric, so the middle threshold of an even L is exactly 0.
    c = level_values(levels)
    return (c[:-1] + c[1:]) / 2


def nearest_level_indices(z: np.ndarray, levels: int) -> np.ndarray:
    """Index of the nearest grid value of each z: what ``quantizer.round_to_levels`` returns, except that a z
    exactly on a threshold goes up here (the quantizer rounds half to even); ties have probability zero."""
    # A lookup in the grid's thresholds, not the quantizer's jitted rounding: that compiles once per L and
    # array shape (~4 s for L = 2..32 on this CPU), while this is 20 ms for 12k values.
    return np.searchsorted(decision_thresholds(levels), np.asarray(z, dtype=np.float64), side="right")


# ----------------------------------------------------------------------------- the density of z


@dataclasses.dataclass(frozen=True)
class ScaledDensity:
    """The estimated distribution of the scaled features z: a KDE inside (-1, 1) plus two clip atoms.

    ``kde`` is the KDE of the unclipped t = slope * u + intercept; z = clip(t, z_low, 1).
    """

    kde: KernelDensity
    z: np.ndarray  # every scaled feature (for the empirical cross-checks)
    mean: float
    std: float
    z_low: float  # z at the lower clip bound: -1 + 2e-4/(hi - lo + 1e-4)
    clip_low: float  # KDE mass below z_low
    clip_high: float  # KDE mass above 1
    entropy: float  # differential entropy of t in bits (leave-one-out KDE estimate)
    mixed_entropy: float  # entropy of the estimated z distribution with its clip atoms (see module doc), bits


def scaled_density(
    features: np.ndarray,
    bandwidth: str | float = "plugin",
    *,
    max_samples: int | None = 1_000_000,
    seed: int = 0,
) -> ScaledDensity:
    """Scales one batch as the quantizer does (statistics over all of it) and estimates the density of z."""
    u = np.asarray(features, dtype=np.float64).ravel()
    if u.size < 3:
        raise ValueError(f"a feature batch needs at least 3 elements, got {u.size}.")
    if not np.all(np.isfinite(u)):
        raise ValueError(f"the feature batch has {int(np.sum(~np.isfinite(u)))} non-finite values.")
    mean, std, lo, hi = scaling_bounds(u)
    if not std > 0:
        raise ValueError("the feature batch is constant: every element scales to the same code, nothing to select.")
    slope, intercept = _affine(lo, hi)
    t = slope * u + intercept
    z_low = slope * lo + intercept
    z = np.clip(t, z_low, 1.0)
    kde = fit_kde(t, bandwidth, max_samples=max_samples, seed=seed)
    clip_low = float(kde.cdf(z_low))
    clip_high = float(1.0 - kde.cdf(1.0))
    log_f = kde.log_density_at_samples(leave_one_out=True) - math.log(kde.scale)
    # The rule compares H(k) of the estimated distribution with the entropy of that same distribution, so
    # the gap goes to exactly zero as Delta -> 0; the leave-one-out h (smaller smoothing bias) is reported.
    t_grid = kde.loc + kde.scale * kde.grid
    f_grid = kde.density / kde.scale
    inside = (t_grid > z_low) & (t_grid < 1.0) & (f_grid > 0)
    continuous = -float(np.trapezoid(np.where(inside, f_grid * np.log2(np.where(inside, f_grid, 1.0)), 0.0), t_grid))
    atoms = -sum(p * math.log2(p) for p in (clip_low, clip_high) if p > 0)
    return ScaledDensity(
        kde=kde,
        z=z,
        mean=mean,
        std=std,
        z_low=float(z_low),
        clip_low=clip_low,
        clip_high=clip_high,
        entropy=-float(np.mean(log_f)) / math.log(2.0),
        mixed_entropy=atoms + continuous,
    )


def _partial_moments(kde: KernelDensity) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """t grid and int_-inf^t s^m f(s) ds for m = 0, 1, 2 (trapezoid on the KDE grid)."""
    t = kde.loc + kde.scale * kde.grid
    f = kde.density / kde.scale
    dt = t[1] - t[0]

    def cumulative(g: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * dt)])

    m0 = cumulative(f)
    total = m0[-1]
    return t, m0 / total, cumulative(t * f) / total, cumulative(t * t * f) / total


# ----------------------------------------------------------------------------- per-L statistics


@dataclasses.dataclass(frozen=True)
class LevelStats:
    """What an L-level quantizer does to the estimated feature distribution."""

    levels: int
    bits_fixed: int  # ceil(log2 L): a fixed-width code
    bin_width: float  # Delta = 2/(L-1)
    probabilities: tuple[float, ...]  # P_k from the density
    index_entropy: float  # H(k) in bits from the density: the entropy-coded cost per index
    index_entropy_empirical: float  # H(k) of the actual indices of the batch (a check)
    high_res_entropy: float  # h - (1 - p- - p+) log2 Delta
    resolution_gap: float  # index_entropy - high_res_entropy
    mse: float  # E (z - z_hat)^2 from the density
    mse_empirical: float  # mean (z - z_hat)^2 over the batch (a check)
    cosine_distortion: float  # 1 - E[z z_hat] / sqrt(E z^2 E z_hat^2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def level_stats(density: ScaledDensity, levels: int) -> LevelStats:
    """Index distribution, entropy and distortion of nearest-level quantization with L levels."""
    c = level_values(levels)  # validates L
    levels = int(levels)
    edges = np.concatenate([[-np.inf], decision_thresholds(levels), [np.inf]])
    cdf = density.kde.cdf(edges)
    p = np.clip(np.diff(cdf), 0.0, None)
    p = p / p.sum()
    nz = p[p > 0]
    entropy = -float(np.sum(nz * np.log2(nz)))

    k = nearest_level_indices(density.z, levels)
    counts = np.bincount(k, minlength=levels) / k.size
    cz = counts[counts > 0]
    entropy_emp = -float(np.sum(cz * np.log2(cz)))
    mse_emp = float(np.mean((density.z - c[k]) ** 2))

    # Interior parts of the bins, (z_low, 1), integrated against the density; the atoms added apart.
    t, m0, m1, m2 = _partial_moments(density.kde)
    a = np.clip(edges[:-1], density.z_low, 1.0)
    b = np.clip(edges[1:], density.z_low, 1.0)
    d0 = np.interp(b, t, m0) - np.interp(a, t, m0)
    d1 = np.interp(b, t, m1) - np.interp(a, t, m1)
    d2 = np.interp(b, t, m2) - np.interp(a, t, m2)
    p_lo, p_hi, z_lo = density.clip_low, density.clip_high, density.z_low
    mse = float(np.sum(d2 - 2 * c * d1 + c * c * d0)) + p_lo * (z_lo - c[0]) ** 2 + p_hi * (1.0 - c[-1]) ** 2
    e_zzhat = float(np.sum(c * d1)) + p_lo * z_lo * c[0] + p_hi * c[-1]
    e_z2 = float(np.sum(d2)) + p_lo * z_lo**2 + p_hi
    e_zhat2 = float(np.sum(c * c * p))
    cosine = 1.0 - e_zzhat / math.sqrt(e_z2 * e_zhat2) if e_z2 > 0 and e_zhat2 > 0 else 1.0

    delta = 2.0 / (levels - 1)
    high_res = density.mixed_entropy - (1.0 - p_lo - p_hi) * math.log2(delta)
    return LevelStats(
        levels=levels,
        bits_fixed=int(math.ceil(math.log2(levels))),
        bin_width=delta,
        probabilities=tuple(float(v) for v in p),
        index_entropy=entropy,
        index_entropy_empirical=entropy_emp,
        high_res_entropy=high_res,
        resolution_gap=entropy - high_res,
        mse=max(mse, 0.0),
        mse_empirical=mse_emp,
        cosine_distortion=cosine,
    )


# ----------------------------------------------------------------------------- the rule


def _check_candidates(candidates: Iterable[int]) -> tuple[int, ...]:
    candidates = list(candidates)
    for v in candidates:
        grid(v)  # the quantizer's own check of L, with its message
    out = tuple(sorted({int(v) for v in candidates}))
    if not out:
        raise ValueError("no candidate level counts given.")
    return out


def apply_rule(levels: Sequence[int], gaps: Sequence[float], tolerance_bits: float) -> tuple[int, str]:
    """Smallest L whose |resolution gap|, and that of every larger candidate, is within the tolerance.

    Returns (L, reason). If even the largest candidate misses, it is returned and the reason says so.
    """
    if not tolerance_bits > 0:
        raise ValueError(f"tolerance_bits must be positive, got {tolerance_bits}.")
    levels = list(levels)
    gaps = [abs(float(g)) for g in gaps]
    if len(levels) != len(gaps) or not levels:
        raise ValueError("levels and gaps must be non-empty and of equal length.")
    order = np.argsort(levels)
    levels = [levels[i] for i in order]
    gaps = [gaps[i] for i in order]
    chosen = None
    for i in range(len(levels) - 1, -1, -1):
        if gaps[i] > tolerance_bits:
            break
        chosen = i
    if chosen is None:
        return levels[-1], (
            f"no candidate up to L={levels[-1]} resolves the feature density (gap {gaps[-1]:.3f} bit > "
            f"{tolerance_bits} bit); L={levels[-1]} is the largest offered. The features may be (nearly) "
            "discrete or extremely peaked: inspect the density plot or offer more levels."
        )
    why = (
        f"L={levels[chosen]} is the smallest candidate from which the index entropy stays within "
        f"{tolerance_bits} bit of its high-resolution value h - log2(Delta) (gap {gaps[chosen]:.3f} bit)"
    )
    if chosen > 0:
        why += f"; L={levels[chosen - 1]} misses the density's shape by {gaps[chosen - 1]:.3f} bit"
    return levels[chosen], why


@dataclasses.dataclass(frozen=True)
class LevelSelection:
    """The rule's choice for one feature batch, with the table it was read from."""

    levels: int
    bits: int  # fixed-width bits per index for the chosen L
    entropy_coded_bits: float  # H(k) at the chosen L: the entropy coder's cost per index
    tolerance_bits: float
    reason: str
    table: tuple[LevelStats, ...]
    n: int
    mean: float
    std: float
    bandwidth: float  # KDE bandwidth in z units
    entropy: float  # h of the scaled features (bits)
    mixed_entropy: float  # h with the clip atoms (bits)
    clip_fraction: float  # empirical fraction of elements clipped by the +-3 std scaling
    curve_z: tuple[float, ...]  # density of z on (-1, 1) for plots
    curve_density: tuple[float, ...]
    clip_low: float
    clip_high: float

    def stats(self, levels: int) -> LevelStats:
        for row in self.table:
            if row.levels == levels:
                return row
        raise KeyError(f"L={levels} is not in the table (candidates {[r.levels for r in self.table]}).")

    def to_dict(self, with_curve: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_curve:
            d.pop("curve_z")
            d.pop("curve_density")
        return d


def select_levels(
    features: np.ndarray,
    candidates: Iterable[int] = DEFAULT_CANDIDATES,
    tolerance_bits: float = DEFAULT_TOLERANCE_BITS,
    *,
    bandwidth: str | float = "plugin",
    max_samples: int | None = 1_000_000,
    seed: int = 0,
) -> LevelSelection:
    """Estimates the scaled-feature density of one batch and picks L by the resolution-gap rule."""
    candidates = _check_candidates(candidates)
    density = scaled_density(features, bandwidth, max_samples=max_samples, seed=seed)
    table = tuple(level_stats(density, L) for L in candidates)
    levels, why = apply_rule(candidates, [r.resolution_gap for r in table], tolerance_bits)
    row = table[candidates.index(levels)]
    reason = (
        f"{why}. Cost: {row.bits_fixed} bits fixed-width, {row.index_entropy:.3f} bits entropy-coded; "
        f"expected cosine distortion {row.cosine_distortion:.4f}, MSE {row.mse:.2e}."
    )
    curve_z = np.linspace(density.z_low, 1.0, _CURVE_POINTS)
    return LevelSelection(
        levels=levels,
        bits=row.bits_fixed,
        entropy_coded_bits=row.index_entropy,
        tolerance_bits=tolerance_bits,
        reason=reason,
        table=table,
        n=int(density.z.size),
        mean=density.mean,
        std=density.std,
        bandwidth=density.kde.bandwidth,
        entropy=density.entropy,
        mixed_entropy=density.mixed_entropy,
        clip_fraction=float(np.mean((density.z <= density.z_low) | (density.z >= 1.0))),
        curve_z=tuple(float(v) for v in curve_z),
        curve_density=tuple(float(v) for v in density.kde.pdf(curve_z)),
        clip_low=density.clip_low,
        clip_high=density.clip_high,
    )


# ----------------------------------------------------------------------------- over batches


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class BatchEstimate:
    """Per-batch selections and their mean +- sd; the overall L applies the rule to the mean gaps."""

    per_batch: tuple[LevelSelection, ...]
    candidates: tuple[int, ...]
    tolerance_bits: float
    levels: int
    bits: int
    entropy_coded_bits: float
    reason: str
    entropy_mean: float
    entropy_sd: float
    index_entropy_mean: tuple[float, ...]  # per candidate
    index_entropy_sd: tuple[float, ...]
    gap_mean: tuple[float, ...]
    gap_sd: tuple[float, ...]
    cosine_mean: tuple[float, ...]
    mse_mean: tuple[float, ...]

    @property
    def chosen_per_batch(self) -> tuple[int, ...]:
        return tuple(s.levels for s in self.per_batch)

    def to_dict(self) -> dict:
        return {
            "levels": self.levels,
            "bits": self.bits,
            "entropy_coded_bits": self.entropy_coded_bits,
            "tolerance_bits": self.tolerance_bits,
            "reason": self.reason,
            "chosen_per_batch": list(self.chosen_per_batch),
            "entropy_bits": {"mean": self.entropy_mean, "sd": self.entropy_sd},
            "per_level": [
                {
                    "levels": L,
                    "bits_fixed": int(math.ceil(math.log2(L))),
                    "index_entropy_mean": self.index_entropy_mean[i],
                    "index_entropy_sd": self.index_entropy_sd[i],
                    "resolution_gap_mean": self.gap_mean[i],
                    "resolution_gap_sd": self.gap_sd[i],
                    "cosine_distortion_mean": self.cosine_mean[i],
                    "mse_mean": self.mse_mean[i],
                }
                for i, L in enumerate(self.candidates)
            ],
            "per_batch": [s.to_dict() for s in self.per_batch],
        }

    def to_markdown(self) -> str:
        lines = [
            f"**Chosen: L = {self.levels} ({self.bits} bits fixed-width, {self.entropy_coded_bits:.3f} bits "
            f"entropy-coded)** over {len(self.per_batch)} batches, tolerance {self.tolerance_bits} bit.",
            "",
            self.reason,
            "",
            "| batch | elements | mean | std | clipped | bandwidth | h (bits) | h with atoms | chosen L | bits "
            "| H(k) at L |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, s in enumerate(self.per_batch):
            lines.append(
                f"| {i} | {s.n} | {s.mean:.4g} | {s.std:.4g} | {100 * s.clip_fraction:.2f}% | {s.bandwidth:.3g} | "
                f"{s.entropy:.4f} | {s.mixed_entropy:.4f} | {s.levels} | {s.bits} | {s.entropy_coded_bits:.3f} |"
            )
        levels_sd = _mean_sd(self.chosen_per_batch)
        lines.append(
            f"| mean ± sd | | | | | | {self.entropy_mean:.4f} ± {self.entropy_sd:.4f} | | "
            f"{levels_sd[0]:.2f} ± {levels_sd[1]:.2f} | | |"
        )
        lines += [
            "",
            "| L | fixed bits | H(k) mean ± sd (bits) | gap mean ± sd (bits) | cosine distortion | MSE |",
            "|---|---|---|---|---|---|",
        ]
        for i, L in enumerate(self.candidates):
            mark = " ←" if L == self.levels else ""
            lines.append(
                f"| {L}{mark} | {int(math.ceil(math.log2(L)))} | {self.index_entropy_mean[i]:.3f} ± "
                f"{self.index_entropy_sd[i]:.3f} | {self.gap_mean[i]:.3f} ± {self.gap_sd[i]:.3f} | "
                f"{self.cosine_mean[i]:.4f} | {self.mse_mean[i]:.2e} |"
            )
        return "\n".join(lines) + "\n"


def estimate_over_batches(
    batches: Iterable[np.ndarray],
    candidates: Iterable[int] = DEFAULT_CANDIDATES,
    tolerance_bits: float = DEFAULT_TOLERANCE_BITS,
    *,
    bandwidth: str | float = "plugin",
    max_samples: int | None = 1_000_000,
    seed: int = 0,
) -> BatchEstimate:
    """Runs ``select_levels`` on each batch (each scaled with its own statistics, as the quantizer does).

    ``batches`` is any iterable of feature arrays (the paper uses 8); a model's features plug in directly.
    """
    candidates = _check_candidates(candidates)
    per_batch = tuple(
        select_levels(b, candidates, tolerance_bits, bandwidth=bandwidth, max_samples=max_samples, seed=seed + i)
        for i, b in enumerate(batches)
    )
    if not per_batch:
        raise ValueError("no feature batches given; pass at least one (the paper uses 8).")

    def column(name: str) -> np.ndarray:
        return np.array([[getattr(r, name) for r in s.table] for s in per_batch])

    def sd(values: np.ndarray) -> np.ndarray:
        return values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])

    h_k, gaps = column("index_entropy"), column("resolution_gap")
    levels, why = apply_rule(candidates, gaps.mean(axis=0), tolerance_bits)
    i = candidates.index(levels)
    entropy_mean, entropy_sd = _mean_sd([s.entropy for s in per_batch])
    per = [s.levels for s in per_batch]
    reason = (
        f"{why} (batch-mean gaps). Per-batch choices: {per}. "
        f"Cost: {int(math.ceil(math.log2(levels)))} bits fixed-width, {h_k[:, i].mean():.3f} bits entropy-coded."
    )
    return BatchEstimate(
        per_batch=per_batch,
        candidates=candidates,
        tolerance_bits=tolerance_bits,
        levels=levels,
        bits=int(math.ceil(math.log2(levels))),
        entropy_coded_bits=float(h_k[:, i].mean()),
        reason=reason,
        entropy_mean=entropy_mean,
        entropy_sd=entropy_sd,
        index_entropy_mean=tuple(h_k.mean(axis=0).tolist()),
        index_entropy_sd=tuple(sd(h_k).tolist()),
        gap_mean=tuple(gaps.mean(axis=0).tolist()),
        gap_sd=tuple(sd(gaps).tolist()),
        cosine_mean=tuple(column("cosine_distortion").mean(axis=0).tolist()),
        mse_mean=tuple(column("mse").mean(axis=0).tolist()),
    )


