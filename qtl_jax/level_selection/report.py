"""The level-selection report: ``levels.json``, ``levels.md`` and the four-panel ``levels.png``."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from qtl_jax.level_selection.rule import BatchEstimate, level_values


def plot(estimate: BatchEstimate, path: str) -> None:
    """Writes a 2x2 PNG: density of z per batch, entropy per batch, H(k) vs bits, resolution gap vs bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = estimate.per_batch
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(batches)))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    bits = np.log2(estimate.candidates)
    chosen = math.log2(estimate.levels)
    chosen_label = f"chosen L={estimate.levels} ({estimate.bits} bits fixed, {estimate.entropy_coded_bits:.2f} coded)"

    ax = axes[0, 0]
    for i, s in enumerate(batches):
        ax.plot(s.curve_z, s.curve_density, color=colors[i], lw=1.2, label=f"batch {i}")
    for v in level_values(estimate.levels):
        ax.axvline(v, color="0.6", lw=0.7, ls=":")
    lo = 100 * np.mean([s.clip_low for s in batches])
    hi = 100 * np.mean([s.clip_high for s in batches])
    ax.set_title(
        f"(a) density of the scaled features z per batch (dotted: the L={estimate.levels} levels)\n"
        f"clip atoms at -1 / +1: {lo:.2f}% / {hi:.2f}% of the mass"
    )
    ax.set_xlabel("z")
    ax.set_ylabel("estimated density")
    ax.set_xlim(-1.05, 1.05)
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0, 1]
    idx = np.arange(len(batches))
    mean, sd = estimate.entropy_mean, estimate.entropy_sd
    ax.axhspan(mean - sd, mean + sd, color="C0", alpha=0.15, label="mean ± sd")
    ax.axhline(mean, color="C0", lw=1, label=f"h = {mean:.4f} ± {sd:.4f} bits")
    ax.scatter(idx, [s.entropy for s in batches], color=colors, zorder=3, s=40)
    span = max(5 * sd, 0.02)
    ax.set_ylim(mean - span, mean + span)
    ax.set_xticks(idx)
    ax.set_xlabel("batch")
    ax.set_ylabel("differential entropy h of z (bits)")
    ax.set_title("(b) entropy of the scaled features per batch (leave-one-out KDE)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for i, s in enumerate(batches):
        ax.plot(bits, [r.index_entropy for r in s.table], color=colors[i], lw=0.8, alpha=0.7)
    ax.plot(bits, estimate.index_entropy_mean, "o", color="k", ms=3, label="H(k), batch mean")
    high_res = [np.mean([s.table[j].high_res_entropy for s in batches]) for j in range(len(bits))]
    ax.plot(bits, high_res, color="C3", ls="--", lw=1, label="high-resolution value h − log2 Δ")
    ax.plot(
        bits, np.ceil(bits), color="0.4", ls="-", lw=0.8, drawstyle="steps-post", label="fixed-width cost ⌈log2 L⌉"
    )
    ax.axvline(chosen, color="C2", lw=1.2, label=chosen_label)
    ax.set_xlabel("log2 L")
    ax.set_ylabel("bits per index")
    ax.set_title("(c) index entropy (entropy-coded cost) vs levels")
    ax.set_ylim(bottom=max(min(high_res), -1.0))
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1, 1]
    gap_mean = np.abs(np.asarray(estimate.gap_mean))
    for i, s in enumerate(batches):
        ax.plot(bits, [max(abs(r.resolution_gap), 1e-5) for r in s.table], color=colors[i], lw=0.8, alpha=0.7)
    ax.plot(bits, np.maximum(gap_mean, 1e-5), "o", color="k", ms=3, label="|gap|, batch mean")
    ax.axhline(estimate.tolerance_bits, color="C3", ls="--", lw=1, label=f"tolerance {estimate.tolerance_bits} bit")
    ax.axvline(chosen, color="C2", lw=1.2, label=chosen_label)
    ax.set_yscale("log")
    ax.set_xlabel("log2 L")
    ax.set_ylabel("resolution gap |H(k) − (h − log2 Δ)| (bits)")
    ax.set_title("(d) the rule: smallest L whose gap stays under the tolerance")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(estimate: BatchEstimate, out_dir: str) -> dict[str, str]:
    """Writes levels.json, levels.md and levels.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"levels.{name}") for name in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(estimate.to_dict(), f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(estimate.to_markdown())
    plot(estimate, paths["png"])
    return paths

