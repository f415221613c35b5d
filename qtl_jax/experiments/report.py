"""Figure 3 and Figure A1 from the measured rows: the knee, the rule's check, ``figure3.{json,md,png}``, ``figureA1.png``.

Definitions used in the outputs (docs/experiments.md):

* **knee** (:func:`knee_levels`): the smallest trained L whose headline on every benchmark is not below the
  lower end of the 16-bit baseline's 95 % interval (a score above the interval keeps the quality too).
* **beats blind** (:func:`beats_blind`): the model's interval lies entirely above the image-blind control's,
  for the headline and for every secondary metric both report (POPE: F1 and accuracy; F1 alone rewards
  saying yes: an always-yes blind control has F1 66.7 at 50 % accuracy).
* **the rule against the knee** (:func:`tolerance_window`): the rule picks the smallest L whose resolution
  gap stays within τ for it and every larger candidate, so the τ that make it pick the knee form an
  interval [M(knee), M(previous candidate)) of suffix maxima M of the batch-mean |gap|.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BASELINE_BITS = 16


def knee_levels(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The smallest quantized L whose every headline is >= the baseline's interval's lower end (None: none is)."""
    base = [r for r in rows if r["levels"] == 0]
    if not base:
        return None
    floors = {b: s["ci95"][0] for b, s in base[0]["scores"].items() if s.get("ci95")}
    for r in sorted((r for r in rows if r["levels"] > 0), key=lambda r: r["levels"]):
        if floors and all(r["scores"][b]["value"] is not None and r["scores"][b]["value"] >= low
                          for b, low in floors.items()):
            return int(r["levels"])
    return None


def secondary_metrics(score: Mapping[str, Any]) -> list[str]:
    """The secondary metrics a benchmark score holds (``{name: {value, ci95}}`` entries beside the headline)."""
    return [k for k, v in score.items() if isinstance(v, Mapping) and "ci95" in v]


def beats_blind(score: Mapping[str, Any], blind: Mapping[str, Any] | None) -> bool | None:
    """True when ``score``'s interval lies above ``blind``'s, for the headline and every secondary metric both
    have (None when either has no headline interval)."""
    if not blind or not score.get("ci95") or not blind.get("ci95"):
        return None
    pairs = [(score, blind)] + [(score[m], blind[m]) for m in secondary_metrics(score) if m in blind]
    return all(bool(s["ci95"][0] > b["ci95"][1]) for s, b in pairs)


def tolerance_window(candidates: Sequence[int], gap_mean: Sequence[float], target: int) -> tuple[float, float] | None:
    """The τ interval [low, high) for which the rule on these batch-mean gaps picks exactly ``target``.

    None when no τ does (``target`` is not a candidate, or a larger gap after it hides it).
    """
    cands = list(candidates)
    if target not in cands:
        return None
    gaps = np.abs(np.asarray(gap_mean, dtype=np.float64))
    suffix = np.maximum.accumulate(gaps[::-1])[::-1]  # M(L): the largest |gap| at L or beyond
    i = cands.index(target)
    low = float(suffix[i])
    high = float(suffix[i - 1]) if i > 0 else math.inf
    return (low, high) if high > low else None


def rule_choice(candidates: Sequence[int], gap_mean: Sequence[float], tolerance: float) -> int:
    """The rule's L for a given τ on batch-mean gaps (qtl_jax.level_selection.apply_rule's choice)."""
    from qtl_jax.level_selection import apply_rule

    return apply_rule(tuple(candidates), list(gap_mean), tolerance)[0]


def _fmt(score: Mapping[str, Any] | None) -> str:
    if not score or score.get("value") is None:
        return "–"
    low, high = score["ci95"]
    return f"{score['value']:.1f} [{low:.1f}, {high:.1f}]"


# As the split link logs it (uplink and downlink as sent, per sample; measure.ROUNDTRIP_KEYS).
ROUNDTRIP = "roundtrip_bytes_per_sample"


def markdown(result: Mapping[str, Any]) -> str:
    rows = result["rows"]
    benches = list(rows[0]["scores"])
    metric = {b: rows[0]["scores"][b].get("metric", "") for b in benches}
    # Each benchmark's headline, then its secondary metrics (POPE accuracy) as their own columns.
    columns = []
    for b in benches:
        extra = dict.fromkeys(m for r in rows for m in secondary_metrics(r["scores"].get(b) or {}))
        columns += [(b, None)] + [(b, m) for m in extra]
    head = ("| model | bits | " + " | ".join(f"{b} ({m or metric[b]})" for b, m in columns)
            + " | uplink B/sample fp16 / packed / ANS | round trip B/sample | inversion PSNR (dB) / SSIM |")
    lines = [f"# Figure 3 ({result['preset']})", "", "Each score: value [95 % bootstrap interval]; n questions per "
             "benchmark: " + ", ".join(f"{b} {rows[0]['scores'][b]['n']}" for b in benches) + ".", "", head,
             "|" + "---|" * (len(columns) + 5)]
    for r in rows + ([dict(name="blind", levels=-1, bits=None, scores=result["blind"])] if result.get("blind") else []):
        u = r.get("uplink_bytes_per_sample")
        p = r.get("privacy")
        name = {0: "16-bit baseline", -1: "image-blind control (16-bit)"}.get(r["levels"], f"L={r['levels']}")
        bits = "–" if r["bits"] is None else f"{r['bits']:g}"
        lines.append(f"| {name} | {bits} | " + " | ".join(
            _fmt(r["scores"].get(b) if m is None else (r["scores"].get(b) or {}).get(m)) for b, m in columns) + " | "
                     + (f"{u['fp16']:.0f} / {u['packed']:.0f} / {u['ans']:.0f}" if u else "–") + " | "
                     + (f"{u[ROUNDTRIP]:.0f}" if u and ROUNDTRIP in u else "–") + " | "
                     + (f"{p['psnr']:.2f} / {p['ssim']:.3f}" if p else "–") + " |")
    knee = result["knee_levels"]
    rule = result["entropy_rule"]
    if result.get("pretrained"):
        lines += ["", "Every model's stage 1 starts from one shared 16-bit pretraining, every part trained ("
                  + ", ".join(f"{k}: {v['step']} steps" for k, v in result["pretrained"].items())
                  + "), its quantizers initialised afresh."]
    if result.get("blind"):
        lines += ["", "**Beats the image-blind control** (95 % interval above its interval; with a secondary metric, "
                  "on both): " + "; ".join(
                      f"{r['name']}: " + (", ".join(b for b in benches if (r.get("beats_blind") or {}).get(b))
                                          or "none") for r in rows) + "."]
    if not any(r["levels"] == 0 for r in result["rows"]):
        knee_text = "none: this run has no 16-bit baseline to compare with (`baseline=False`)"
    elif knee is None:
        knee_text = "none of the trained L"
    else:
        knee_text = f"L = {knee} ({math.log2(knee):g} bits)"
    lines += ["", f"**Knee** (smallest L within the baseline's interval on every benchmark): {knee_text}.",
              f"**Entropy rule** (τ = {result['entropy_rule_details'].get('tolerance_bits')} bit): image L = "
              f"{rule.get('image')}, text L = {rule.get('text')}.", ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    timing = result.get("timing") or {}
    if timing:
        total = sum(t["wall_s"] for t in timing.values())
        lines += ["", f"Wall time of every phase together: {total / 60:.1f} min.", "",
                  "| phase | wall (s) | CPU (s) | load average (1 min) at start |", "|---|---|---|---|"]
        for name, t in timing.items():
            lines.append(f"| {name} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {t.get('load_start', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def plot_figure3(result: Mapping[str, Any], path: str) -> None:
    """Score vs bits per benchmark (95 % intervals, baseline and blind bands), uplink bytes and inversion PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    quant = sorted((r for r in rows if r["levels"] > 0), key=lambda r: r["levels"])
    base = next((r for r in rows if r["levels"] == 0), None)
    blind = result.get("blind") or {}
    benches = list(rows[0]["scores"])
    xs = [r["bits"] for r in quant]
    knee = result["knee_levels"]
    rule_bits = {m: math.log2(v) for m, v in result["entropy_rule"].items() if v}
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.6), squeeze=False)
    for ax, b in zip(axes.flat, benches):
        have = [(r["bits"], r["scores"][b]) for r in quant if r["scores"][b]["value"] is not None]
        if have:
            x, s = zip(*have)
            y = np.array([v["value"] for v in s])
            err = np.array([[v["value"] - v["ci95"][0], v["ci95"][1] - v["value"]] for v in s]).T
            ax.errorbar(x, y, yerr=err, fmt="o-", color="C0", capsize=3, label="trained at L (95 % CI)")
        if base and base["scores"][b]["value"] is not None:
            s = base["scores"][b]
            ax.axhspan(*s["ci95"], color="C3", alpha=0.15)
            ax.axhline(s["value"], color="C3", ls="--", label="16-bit baseline (band: 95 % CI)")
        if blind.get(b) and blind[b]["value"] is not None:
            ax.axhspan(*blind[b]["ci95"], color="0.5", alpha=0.2)
            ax.axhline(blind[b]["value"], color="0.4", ls=":", label="image-blind control")
        if knee:
            ax.axvline(math.log2(knee), color="C1", lw=1, alpha=0.7, label=f"knee L={knee}")
        for m, bits in rule_bits.items():
            ax.axvline(bits, color="C2", ls="-." if m == "text" else ":", lw=1.2,
                       label=f"entropy rule ({m}) L={result['entropy_rule'][m]}")
        ax.set_title(f"{b} ({rows[0]['scores'][b].get('metric', '')})")
        ax.set_xlabel("bits per value (log2 L)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    ax = axes.flat[len(benches)]
    for k, style in (("fp16", "s--"), ("packed", "o-"), ("ans", "^-")):
        ax.plot(xs, [r["uplink_bytes_per_sample"][k] for r in quant], style, label=k)
    if base:
        ax.axhline(base["uplink_bytes_per_sample"]["fp16"], color="C3", ls="--", label="16-bit baseline")
    ax.set_yscale("log")
    ax.set_title("uplink bytes per training sample")
    ax.set_xlabel("bits per value (log2 L)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes.flat[len(benches) + 1]
    priv = [(r["bits"], r["privacy"]) for r in quant if r.get("privacy")]
    if priv:
        x, p = zip(*priv)
        ax.errorbar(x, [v["psnr"] for v in p], yerr=[v["psnr_sd"] for v in p], fmt="o-", color="C4", capsize=3,
                    label="PSNR, trained at L")
        if base and base.get("privacy"):
            ax.axhline(base["privacy"]["psnr"], color="C3", ls="--", label="PSNR, 16-bit baseline")
        ax.axhline(p[0]["mean_image_psnr"], color="0.4", ls=":", label="attacker's mean image")
        ax.set_ylabel("PSNR (dB)")
        twin = ax.twinx()
        twin.plot(x, [v["ssim"] for v in p], "s--", color="C5", label="SSIM")
        twin.set_ylabel("SSIM")
        twin.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="upper left")
    else:  # an empty axis would read as a failed attack
        ax.text(0.5, 0.5, "not run\n(--config.privacy.enabled=True runs it)", ha="center", va="center",
                transform=ax.transAxes, fontsize=10, color="0.3")
    ax.set_title("image inversion attack on each model")
    ax.set_xlabel("bits per value (log2 L)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    for extra in list(axes.flat)[len(benches) + 2:]:
        extra.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=9)
    counts = " / ".join(f"{b} n={rows[0]['scores'][b]['n']}" for b in benches)
    fig.suptitle(f"Figure 3 ({result['preset']}): one model trained per L; questions: {counts}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_figure_a1(estimates: Mapping[str, Any], knee: int | None, source: str, path: str) -> None:
    """Per modality: the scaled-feature density of each batch, its KDE entropy per batch and the rule's gap
    curve, with the rule's L (and the knee) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qtl_jax.level_selection import level_values

    fig, axes = plt.subplots(len(estimates), 3, figsize=(16, 4.2 * len(estimates)), squeeze=False)
    for row, (modality, est) in zip(axes, estimates.items()):
        colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(est.per_batch)))
        ax = row[0]
        for i, s in enumerate(est.per_batch):
            ax.plot(s.curve_z, s.curve_density, color=colors[i], lw=1.1, label=f"batch {i}")
        for v in level_values(est.levels):
            ax.axvline(v, color="0.6", lw=0.7, ls=":")
        ax.set_title(f"{modality}: density of the scaled features z per batch\n(dotted: the rule's L={est.levels} levels)")
        ax.set_xlabel("z")
        ax.set_xlim(-1.05, 1.05)
        ax.legend(fontsize=6, ncol=2)
        ax = row[1]
        h = [s.entropy for s in est.per_batch]
        ax.axhspan(est.entropy_mean - est.entropy_sd, est.entropy_mean + est.entropy_sd, color="C0", alpha=0.15)
        ax.axhline(est.entropy_mean, color="C0", lw=1, label=f"h = {est.entropy_mean:.3f} ± {est.entropy_sd:.3f} bits")
        ax.scatter(range(len(h)), h, color=colors, zorder=3)
        ax.set_xticks(range(len(h)))
        ax.set_xlabel("batch")
        ax.set_ylabel("KDE differential entropy of z (bits)")
        ax.set_title(f"{modality}: entropy per batch (chosen per batch: {list(est.chosen_per_batch)})")
        ax.legend(fontsize=8)
        ax = row[2]
        bits = np.log2(est.candidates)
        ax.plot(bits, np.maximum(np.abs(est.gap_mean), 1e-5), "o-", color="k", ms=3, label="|gap|, batch mean")
        ax.axhline(est.tolerance_bits, color="C3", ls="--", label=f"τ = {est.tolerance_bits} bit")
        ax.axvline(math.log2(est.levels), color="C2", lw=1.5, label=f"rule: L={est.levels}")
        if knee:
            ax.axvline(math.log2(knee), color="C1", lw=1.5, ls="--", label=f"knee of Figure 3: L={knee}")
        ax.set_yscale("log")
        ax.set_xlabel("log2 L")
        ax.set_ylabel("|H(k) − (h − log2 Δ)| (bits)")
        ax.set_title(f"{modality}: the rule's resolution gap")
        ax.legend(fontsize=8)
    fig.suptitle(f"Figure A1: feature densities and KDE entropy over {len(next(iter(estimates.values())).per_batch)} "
                 f"batches ({source})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: Mapping[str, Any], estimates: Mapping[str, Any] | None, workdir: str) -> dict[str, str]:
    """``figure3.json``, ``figure3.md``, ``figure3.png`` and (with ``estimates``) ``figureA1.png`` in ``workdir``."""
    paths = {k: os.path.join(workdir, f) for k, f in (("json", "figure3.json"), ("md", "figure3.md"),
                                                       ("png", "figure3.png"), ("a1", "figureA1.png"))}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(result))
    plot_figure3(result, paths["png"])
    if estimates:
        plot_figure_a1(estimates, result["knee_levels"], result["entropy_rule_details"].get("source", ""), paths["a1"])
    else:
        paths.pop("a1")
    return paths
