"""When packing pays: the split train step on bucketed batches vs the same batches packed (``data.pack``).

One stream of batches, each sample an image plus a text whose length is drawn from a stated distribution,
goes through our split step twice from the same initial state: once as ``train.loop`` cuts each batch to
its longest sample's bucket (``sequence.pad_to_bucket``), once packed into rows of ``--capacity`` merged
positions (``sequence.pack``). Every shape of both is compiled in a warm-up pass over the stream
(not timed); then the stream is timed step by step. Printed and written to ``OUT/packing.{json,md}``:

* ``real_positions``: merged positions that hold a token or image token (the same in both);
* ``computed_positions_{bucketed,packed}``: rows x merged length the decoder runs over, and the padding
  fraction ``1 - real / computed``;
* ``attention_pairs_{bucketed,packed}``: rows x length^2, the size of the score tensors;
* ``step_s_{bucketed,packed}``: total seconds of the timed steps, and ``speedup`` = bucketed / packed;
* ``shapes_{bucketed,packed}``: distinct batch shapes (one compilation each);
* ``max_loss_difference``: the largest |loss| difference between the two runs over the stream (the same
  samples, so the same function: float32 rounding only).

Text lengths: ``uniform:N`` (every sample N text tokens: LLaVA-558k's short captions are like this) or
``lognormal:MEDIAN:SIGMA`` (a long tail, like multi-turn instruction data), clipped to what fits the capacity.
The distribution is synthetic and stated; the real figure depends on the user's data.

Usage (from the repository root)::

    python -m bench.packing [--size=demo] [--batch=16] [--capacity=512] [--lengths=lognormal:48:0.8] \
        [--batches=6] [--out=DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from bench import perf


def parse_lengths(spec: str) -> tuple[str, tuple[float, ...]]:
    kind, *args = spec.split(":")
    try:
        values = tuple(float(a) for a in args)
    except ValueError:
        values = ()
    if (kind, len(values)) not in (("uniform", 1), ("lognormal", 2)) or min(values, default=0) <= 0:
        raise ValueError(f"--lengths={spec!r}: use uniform:N or lognormal:MEDIAN:SIGMA with positive numbers.")
    return kind, values


def make_stream(s: perf.Size, batches: int, capacity: int, lengths: str, image_tokens: int,
                seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``batches`` loader batches (right-padded to the longest possible sample) of ``s.batch`` image samples."""
    kind, args = parse_lengths(lengths)
    rng = np.random.default_rng(seed)
    longest = capacity - image_tokens  # text tokens (besides the placeholder) that still fit a row
    if longest < 2:
        raise ValueError(f"--capacity={capacity} leaves no room for text beside {image_tokens} image tokens.")
    out = []
    for _ in range(batches):
        if kind == "uniform":
            n = np.full(s.batch, int(args[0]))
        else:
            n = np.round(args[0] * np.exp(args[1] * rng.standard_normal(s.batch))).astype(int)
        n = np.clip(n, 2, longest)
        width = longest + 1
        mask = (np.arange(width)[None] < (n + 1)[:, None]).astype(np.int32)
        ids = np.where(mask > 0, rng.integers(1, s.vocab, (s.batch, width)), 0).astype(np.int32)
        ids[:, 1] = perf.IMAGE_PLACEHOLDER
        labels = np.where((np.arange(width) >= 2) & (mask > 0), ids, -100).astype(np.int32)
        pixels = rng.normal(size=(s.batch, s.image_size, s.image_size, 3)).astype(np.float32)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                        has_image=np.ones(s.batch, np.int32)))
    return out


def _geometry(batch: dict[str, np.ndarray], model) -> tuple[int, int]:
    """(rows, merged length) the decoder runs over."""
    if "segment_ids" in batch:
        return batch["segment_ids"].shape
    rows, t = batch["input_ids"].shape
    return rows, model.merged_length(t, num_images=rows)


def run(size: str = "demo", batch: int = 16, capacity: int = 512, lengths: str = "lognormal:48:0.8",
        batches: int = 6, buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024), seed: int = 0,
        log=print) -> dict[str, Any]:
    from qtl_jax.data import sequence
    from qtl_jax.split import step as steplib
    from qtl_jax.split.mesh import split_meshes

    if size not in perf.SIZES:
        raise ValueError(f"--size={size!r}: choose from {sorted(perf.SIZES)}.")
    s = dataclasses.replace(perf.SIZES[size], batch=batch)
    config = perf.quantized_config(s)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, max_length=capacity))
    t_img = config.model.num_image_tokens  # the tower's patches less the dropped one ('patch' selection)
    stream = make_stream(s, batches, capacity, lengths, t_img, seed)
    meshes = split_meshes(0, 0, devices=jax.devices()[:1])
    ways = {
        "bucketed": [sequence.pad_to_bucket(b, buckets) for b in stream],
        "packed": [sequence.pack(b, capacity=capacity, num_image_tokens=t_img, length_buckets=buckets)
                   for b in stream],
    }
    real = int(sum(int(b["attention_mask"].sum()) + s.batch * (t_img - 1) for b in stream))
    report: dict[str, Any] = dict(size=size, batch=batch, capacity=capacity, lengths=lengths, batches=batches,
                                  buckets=list(buckets), image_tokens=t_img, real_positions=real,
                                  backend=jax.default_backend(), device=str(jax.devices()[0]))
    losses = {}
    for way, shaped in ways.items():
        geometry = [_geometry(b, config.model) for b in shaped]
        computed = sum(r * n for r, n in geometry)
        report[f"computed_positions_{way}"] = computed
        report[f"padding_fraction_{way}"] = 1 - real / computed
        report[f"attention_pairs_{way}"] = sum(r * n * n for r, n in geometry)
        report[f"shapes_{way}"] = len({tuple(b["input_ids"].shape) + tuple(b.get("segment_ids", np.zeros((0, 0))).shape)
                                       for b in shaped})
        state = steplib.create_train_state(config, jax.random.key(0), meshes, perf.OPTIMIZER, total_steps=1000)
        optimizers = steplib.make_split_optimizers(perf.OPTIMIZER, 1000, {"client": state.client.params,
                                                                          "server": state.server.params})
        step = steplib.make_train_step(config, meshes, optimizers, mode="split")
        warm = state
        for b in shaped:  # compiles every shape; the warm-up state is thrown away
            warm, _ = step(jax.tree_util.tree_map(lambda x: x.copy(), state), b)
        del warm
        times, losses[way] = [], []
        for b in shaped:
            start = time.perf_counter()
            state, metrics = step(state, b)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
            losses[way].append(metrics["loss"])
        report[f"step_s_{way}"] = float(sum(times))
        log(f"bench.packing: {way}: {len(shaped)} steps in {sum(times):.3f} s, {report[f'shapes_{way}']} shapes, "
            f"padding {report[f'padding_fraction_{way}']:.1%} of {computed} positions")
    report["speedup"] = report["step_s_bucketed"] / report["step_s_packed"]
    report["max_loss_difference"] = float(np.max(np.abs(np.subtract(losses["bucketed"], losses["packed"]))))
    if not np.all(np.isfinite(losses["packed"])):
        raise FloatingPointError(f"a packed step gave a non-finite loss: {losses['packed']}")
    return report


def markdown(r: dict[str, Any]) -> str:
    rows = [("merged positions computed", "computed_positions"), ("padding fraction", "padding_fraction"),
            ("attention score entries (rows x L^2)", "attention_pairs"), ("distinct shapes", "shapes"),
            ("timed steps, total s", "step_s")]
    lines = [f"Size `{r['size']}`, batch {r['batch']}, capacity {r['capacity']}, text lengths `{r['lengths']}`, "
             f"{r['batches']} batches, {r['real_positions']} real merged positions ({r['device']}).", "",
             "| | bucketed | packed |", "|---|---:|---:|"]
    for label, key in rows:
        a, b = r[f"{key}_bucketed"], r[f"{key}_packed"]
        fmt = (lambda v: f"{v:.1%}") if "fraction" in key else (lambda v: f"{v:.3f}" if isinstance(v, float) else f"{v:,}")
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} |")
    lines += ["", f"Speedup of packing: **{r['speedup']:.2f}x**; largest loss difference over the stream "
                  f"{r['max_loss_difference']:.2e} (float32 rounding: the same samples)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="demo")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--capacity", type=int, default=512)
    p.add_argument("--lengths", default="lognormal:48:0.8")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        parse_lengths(a.lengths)
        if min(a.batch, a.capacity, a.batches) < 1:
            raise ValueError("--batch, --capacity and --batches must be >= 1.")
        report = run(a.size, a.batch, a.capacity, a.lengths, a.batches, seed=a.seed)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    text = markdown(report)
    print(text, end="")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "packing.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(a.out, "packing.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
