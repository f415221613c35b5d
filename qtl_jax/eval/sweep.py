"""The bits sweep: one model evaluated at L = 2, 4, 8, 16, 32 levels and at a 16-bit baseline.

This is a *post-hoc* sweep. The paper trained one model per L; here the same weights are evaluated at
every L. That is well defined because L is a config value of the quantizer: ``in_proj`` / ``out_proj``
are D -> D maps that do not depend on L, only the rounding grid does (:meth:`LoadedModel.with_levels`).
Expect the scores of the L the model was trained at to be the best-calibrated ones; a model trained at
L=4 sees finer grids at evaluation than in training, and coarser ones are a harder shift.

The 16-bit baseline is the same model with a 65536-level grid (16 bits per value, through the same
projections): the limit of the sweep, sending as many bits as the fp16 pass-through. (A model trained
with ``bound='none'`` has no projections and cannot be swept.)

Per level the sweep records, besides the benchmark scores, the uplink bytes per sample measured with the
real codec (:mod:`qtl_jax.codec`) on ``sweep.bytes_samples`` questions sent one at a time (batch of one,
the paper's evaluation): ``fp16`` (the pre-quantization values as float16: the "Original" payload),
``packed`` (fixed-width indices) and ``ans`` (entropy-coded indices), image and prompt-text codes
together, message headers included; and what a training step would send back for those positions
with the paper's float32 gradients (``downlink_bytes_fp32``, 4 bytes per value that went up, the same
at every L) with the round trips ``roundtrip_bytes_per_sample`` (ANS up) and
``roundtrip_bytes_per_sample_paper`` (fp16 up), the keys of the training link's ``metrics.jsonl``.
Evaluation prompts carry no answer, so these positions are fewer than a training sample's. The level
chosen by the entropy rule
(:func:`qtl_jax.level_selection.select_levels`) on the ``in_proj`` features of those samples is marked
on the plot.

Outputs: ``sweep.json`` (a list of objects: ``levels``, ``bits``, ``baseline``, ``scores``
{benchmark: headline score}, the same scores as top-level keys, ``metrics`` (all of them) and
``uplink_bytes_per_sample`` {fp16, packed, ans, downlink_bytes_fp32, roundtrip_bytes_per_sample,
roundtrip_bytes_per_sample_paper}), ``sweep_selection.json`` (the entropy rule's choice per
modality), ``sweep.md`` and ``sweep.png``; each level's answers and metrics under ``sweep/L<levels>/``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax import codec, level_selection
from qtl_jax.eval import harness
from qtl_jax.eval.answerer import make_answerer
from qtl_jax.eval.answers import Example
from qtl_jax.eval.benchmarks import BENCHMARKS
from qtl_jax.eval.model import LoadedModel
from qtl_jax.models import quantized as qm
from qtl_jax.models.tinyllava import TinyLlava

BASELINE_LEVELS = 65536
MODALITIES = ("image", "text")


@functools.partial(jax.jit, static_argnums=0)
def _client(qconfig, client, stats, batch):
    out = qm.client_forward(qconfig, client, stats, batch, train=False)
    return out.uplink.image_codes, out.uplink.text_codes, out.z


@functools.partial(jax.jit, static_argnums=0)
def _features(qconfig, client, batch):
    """The ``in_proj`` outputs u (before scaling), the features the entropy rule reads."""
    model = TinyLlava(qconfig.model)
    x_img = model.apply({"params": {"vision_tower": client["vision_tower"], "connector": client["connector"]}},
                        batch["pixel_values"], method=TinyLlava.encode_images)
    x_txt = model.apply({"params": {"llm": {"embed_tokens": client["embed_tokens"]}}}, batch["input_ids"],
                        method=TinyLlava.embed_tokens)
    out = {}
    for name, x in (("image", x_img), ("text", x_txt)):
        p = client[f"{name}_quantizer"]["in_proj"]
        out[name] = x.astype(jnp.float32) @ p["kernel"] + p["bias"]
    return out


def _single_batch(loaded: LoadedModel, ex: Example) -> tuple[dict[str, np.ndarray], bool]:
    import PIL.Image

    has_image = ex.image is not None
    ids = loaded.template.tokenize_prompt(ex.prompt, loaded.tokenizer, has_image)[None]
    size = loaded.base.vision.image_size
    pixels = np.zeros((1, size, size, loaded.base.vision.num_channels), np.float32)
    if has_image:
        with PIL.Image.open(ex.image) as im:
            pixels[0] = loaded.image_processor(im.convert("RGB"))
    return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32),
            "labels": np.full_like(ids, -100, np.int32), "pixel_values": pixels,
            "has_image": np.asarray([int(has_image)], np.int32)}, has_image


# The keys of the training link's metrics.jsonl (qtl_jax.split.link), reused for the sweep's round trip.
DOWNLINK_FP32 = "downlink_bytes_fp32"
ROUNDTRIP = "roundtrip_bytes_per_sample"


def _payload(image_codes, text_codes, z, has_image: bool, text_real: np.ndarray, levels: int) -> dict[str, int]:
    parts = [("text", np.asarray(text_codes)[0][text_real], np.asarray(z["text"])[0][text_real])]
    if has_image:
        parts.append(("image", np.asarray(image_codes)[0], np.asarray(z["image"])[0]))
    # A channel model over 65536 symbols per channel would cost more to describe than it saves.
    model = "auto" if levels <= 256 else "global"
    sizes = {"fp16": 0, "packed": 0, "ans": 0, DOWNLINK_FP32: 0}
    for _, codes, values in parts:
        sizes["fp16"] += len(codec.encode_fp16(values))
        sizes["packed"] += len(codec.encode(codes, levels, "packed"))
        sizes["ans"] += len(codec.encode(codes, levels, "ans", model=model))
        # Training sends one float32 gradient back per value that went up (the paper's downlink).
        sizes[DOWNLINK_FP32] += 4 * int(np.asarray(values).size)
    return sizes


def measure_uplink(loaded: LoadedModel, examples: Sequence[Example]) -> dict[str, float]:
    """Mean bytes per sample at ``loaded``'s L, one sample per message: the uplink (``fp16`` / ``packed`` /
    ``ans``), the fp32 gradients training would send back for the same positions (``downlink_bytes_fp32``)
    and the round trips ``roundtrip_bytes_per_sample`` (ANS up + fp32 down) and ``..._paper`` (fp16 up)."""
    if not examples:
        raise ValueError("measuring the uplink needs at least one example (sweep.bytes_samples >= 1).")
    q = loaded.qconfig
    levels = loaded.levels()
    totals = {"fp16": 0, "packed": 0, "ans": 0, DOWNLINK_FP32: 0}
    for ex in examples:
        batch, has_image = _single_batch(loaded, ex)
        image_codes, text_codes, z = _client(q, loaded.params["client"], loaded.batch_stats, batch)
        text_real = batch["input_ids"][0] != q.model.image_token_index
        for k, v in _payload(image_codes, text_codes, z, has_image, text_real, levels).items():
            totals[k] += v
    out = {k: v / len(examples) for k, v in totals.items()}
    # The same keys as the training link's metrics.jsonl (qtl_jax.split.link): as sent (ANS) and the paper's.
    out[ROUNDTRIP] = out["ans"] + out[DOWNLINK_FP32]
    out[ROUNDTRIP + "_paper"] = out["fp16"] + out[DOWNLINK_FP32]
    return out


def feature_samples(loaded: LoadedModel, examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """``{'image': u, 'text': u}``: in_proj outputs of the real image / text positions of ``examples``."""
    q = loaded.qconfig
    feats: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    for ex in examples:
        batch, has_image = _single_batch(loaded, ex)
        u = _features(q, loaded.params["client"], {k: batch[k] for k in ("pixel_values", "input_ids")})
        text_real = batch["input_ids"][0] != q.model.image_token_index
        feats["text"].append(np.asarray(u["text"])[0][text_real])
        if has_image:
            feats["image"].append(np.asarray(u["image"])[0])
    return {m: np.concatenate(v) for m, v in feats.items() if v}


def spread(examples_by_benchmark: Mapping[str, Sequence[Example]], n: int) -> list[Example]:
    """``n`` questions taken round-robin over the benchmarks (evenly spaced within each)."""
    pools = [list(v) for v in examples_by_benchmark.values() if v]
    out: list[Example] = []
    per = math.ceil(n / max(1, len(pools)))
    for pool in pools:
        idx = np.unique(np.linspace(0, len(pool) - 1, min(per, len(pool))).round().astype(int))
        out.extend(pool[i] for i in idx)
    return out[:n]


def entry(levels: int, baseline: bool, metrics: Mapping[str, Mapping[str, float]], heads: Mapping[str, str],
          uplink: Mapping[str, float]) -> dict[str, Any]:
    scores = {b: metrics[b][heads[b]] for b in metrics if heads[b] in metrics[b]}
    return {"levels": int(levels), "bits": math.log2(levels), "baseline": baseline, "scores": scores, **scores,
            "metrics": {b: dict(m) for b, m in metrics.items()}, "uplink_bytes_per_sample": dict(uplink)}


def markdown(entries: Sequence[Mapping[str, Any]], heads: Mapping[str, str], chosen: Mapping[str, int]) -> str:
    benches = list(entries[0]["scores"])
    head = ("| L | bits | " + " | ".join(f"{b} ({heads[b]})" for b in benches)
            + " | fp16 B/sample | packed B/sample | ans B/sample | round trip B/sample (ans + fp32 down) |")
    lines = [head, "|" + "---|" * (len(benches) + 6)]
    for e in entries:
        name = f"{e['levels']} (baseline)" if e["baseline"] else str(e["levels"])
        u = e["uplink_bytes_per_sample"]
        cells = " | ".join(f"{e['scores'][b]:.2f}" for b in benches)
        lines.append(f"| {name} | {e['bits']:g} | {cells} | {u['fp16']:.0f} | {u['packed']:.0f} | {u['ans']:.0f} "
                     f"| {u[ROUNDTRIP]:.0f} |")
    rule = ", ".join(f"{m}: L={lv}" for m, lv in chosen.items())
    lines += ["", f"Entropy rule (qtl_jax.level_selection) on the in_proj features: {rule}.",
              "Round trip: the ANS uplink plus the float32 gradients training sends back for the same positions "
              "(the paper's downlink, the same at every L)."]
    return "\n".join(lines) + "\n"


def plot(entries: Sequence[Mapping[str, Any]], heads: Mapping[str, str], chosen: Mapping[str, int], path: str) -> None:
    """Score vs bits per benchmark (Figure 3 style) plus the uplink and round-trip bytes per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [e for e in entries if not e["baseline"]]
    base = [e for e in entries if e["baseline"]]
    benches = list(entries[0]["scores"])
    n = len(benches) + 1
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    xs = [e["bits"] for e in swept]
    rule_bits = math.log2(chosen["image"]) if "image" in chosen else None
    for ax, b in zip(axes.flat, benches):
        ax.plot(xs, [e["scores"][b] for e in swept], "o-", color="C0", label="quantized")
        if base:
            ax.axhline(base[0]["scores"][b], color="C3", ls="--", label="16-bit baseline")
        if rule_bits is not None:
            ax.axvline(rule_bits, color="C2", ls=":", label=f"entropy rule L={chosen['image']}")
        ax.set_title(b)
        ax.set_xlabel("bits per value (log2 L)")
        ax.set_ylabel(heads[b])
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    ax = axes.flat[len(benches)]
    for k, style, label in (("fp16", "s--", "fp16"), ("packed", "o-", "packed"), ("ans", "^-", "ans"),
                            (ROUNDTRIP, "d:", "round trip (ans + fp32 down)")):
        ax.plot(xs, [e["uplink_bytes_per_sample"][k] for e in swept], style, label=label)
    if rule_bits is not None:
        ax.axvline(rule_bits, color="C2", ls=":")
    ax.set_yscale("log")
    ax.set_title("bytes per sample (uplink; round trip)")
    ax.set_xlabel("bits per value (log2 L)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for extra in list(axes.flat)[n:]:
        extra.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Score vs bits (post-hoc sweep of one model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(loaded: LoadedModel, config: Any, workdir: str, specs: Mapping[str, Mapping[str, Any]],
              answerer_for=None) -> list[dict[str, Any]]:
    """Evaluates ``loaded`` at every ``config.sweep.levels`` and the baseline; writes the sweep files.

    ``answerer_for(loaded_at_L)`` builds the answer function (default: greedy generation).
    """
    s = config.sweep
    levels = [int(v) for v in s.levels]
    if not levels or any(v < 2 for v in levels):
        raise ValueError(f"sweep.levels={levels}: give levels >= 2, e.g. (2, 4, 8, 16, 32).")
    plan = [(v, False) for v in levels] + ([(BASELINE_LEVELS, True)] if s.baseline else [])
    heads = {n: BENCHMARKS[spec["kind"]].headline for n, spec in specs.items()}
    by_bench = {n: BENCHMARKS[spec["kind"]].load(spec) for n, spec in specs.items()}
    samples = spread(by_bench, int(s.bytes_samples))
    entries = []
    for lv, is_base in plan:
        at = loaded.with_levels(lv)
        sub = os.path.join(workdir, "sweep", f"L{lv}")
        if lv == loaded.levels() and not os.path.isdir(os.path.join(sub, "answers")) and \
                os.path.isdir(os.path.join(workdir, "answers")):
            # The main evaluation already answered at the trained L: resume from its answers.
            shutil.copytree(os.path.join(workdir, "answers"), os.path.join(sub, "answers"))
        answerer = answerer_for(at) if answerer_for else make_answerer(at, config)
        print(f"sweep: L={lv}{' (baseline)' if is_base else ''}", flush=True)
        metrics = harness.run_benchmarks(at, config, sub, answerer=answerer, specs=specs)
        entries.append(entry(lv, is_base, metrics, heads, measure_uplink(at, samples)))
    feats = feature_samples(loaded, samples)
    selections = {m: level_selection.select_levels(u, max_samples=int(s.selection_max_samples)) for m, u in feats.items()}
    chosen = {m: sel.levels for m, sel in selections.items()}
    with open(os.path.join(workdir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    with open(os.path.join(workdir, "sweep_selection.json"), "w", encoding="utf-8") as f:
        json.dump({m: {"levels": sel.levels, "bits": sel.bits, "entropy_coded_bits": sel.entropy_coded_bits,
                       "reason": sel.reason, "features": int(feats[m].size)} for m, sel in selections.items()}, f,
                  indent=1)
    with open(os.path.join(workdir, "sweep.md"), "w", encoding="utf-8") as f:
        f.write(markdown(entries, heads, chosen))
    plot(entries, heads, chosen, os.path.join(workdir, "sweep.png"))
    return entries
