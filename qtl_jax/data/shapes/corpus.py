"""Writes the shapes corpus to disk: the two training splits, their scenes and the benchmark files.

The training files use the LLaVA JSON formats (see ``samples``); ``benchmarks`` writes the held-out
evaluation sets under ``eval/``. For a given seed and set of sizes the files are byte-identical from run to
run (``tests/test_shapes.py`` pins a digest).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

from qtl_jax.data.shapes.benchmarks import write_benchmarks
from qtl_jax.data.shapes.samples import (Sample, check_probe_formats, instruct_sample, is_probe, pretrain_sample,
                                         save_png)
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.text import PROBE_FORMATS


def _write_split(out_dir: str, split: str, n: int, make: Callable[[int], Sample], with_scenes: bool) -> list[dict]:
    records = []
    scenes = []
    for i in range(n):
        sample = make(i)
        if sample.image is not None:
            save_png(sample.image, os.path.join(out_dir, "images", sample.record["image"]))
        records.append(sample.record)
        if with_scenes:
            scenes.append({"id": sample.record["id"],
                           "scene": None if sample.scene is None else sample.scene.to_json()})
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(records, f, indent=1)
    if with_scenes:
        with open(os.path.join(out_dir, f"{split}_scenes.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in scenes)
    return records


def write_corpus(out_dir: str, *, seed: int = 0, n_pretrain: int = 2000, n_instruct: int = 2000,
                 image_size: int = 64, cfg: ShapesConfig | None = None, text_only_fraction: float = 0.1,
                 probe_fraction: float = 0.0, probe_turns: int = 1, probe_formats: Sequence[str] | None = None,
                 benchmarks: bool = True, bench_sizes: dict | None = None, with_scenes: bool = True) -> dict:
    """Writes the corpus under ``out_dir`` and returns the counts written.

    Layout: ``images/{pretrain,instruct}/*.png``, ``pretrain.json`` and ``instruct.json`` (LLaVA JSON,
    image paths relative to ``images/``), ``*_scenes.jsonl`` (the ground-truth scene per id) and, with
    ``benchmarks``, the held-out evaluation sets under ``eval/`` (``benchmarks.write_benchmarks``).
    """
    if n_pretrain < 0 or n_instruct < 0:
        raise ValueError(f"sample counts must be >= 0, got n_pretrain={n_pretrain}, n_instruct={n_instruct}.")
    if not 0.0 <= probe_fraction <= 1.0:
        raise ValueError(f"probe_fraction={probe_fraction} must be in [0, 1] (the share of stage-2 samples that are "
                         f"benchmark-format yes/no probes).")
    if probe_turns < 1:
        raise ValueError(f"probe_turns={probe_turns} must be >= 1 (the yes/no questions of one probe sample).")
    probe_formats = check_probe_formats(PROBE_FORMATS if probe_formats is None else probe_formats)
    if cfg is None:
        cfg = ShapesConfig(image_size=image_size)
    elif cfg.image_size != image_size:
        raise ValueError(f"image_size={image_size} disagrees with cfg.image_size={cfg.image_size}; pass one.")
    os.makedirs(out_dir, exist_ok=True)
    counts: dict = {}
    t0 = time.perf_counter()
    pre = _write_split(out_dir, "pretrain", n_pretrain, lambda i: pretrain_sample(seed, i, cfg), with_scenes)
    counts["pretrain"] = len(pre)
    ins = _write_split(out_dir, "instruct", n_instruct,
                       lambda i: instruct_sample(seed, i, cfg, text_only_fraction, probe_fraction, probe_turns,
                                                 probe_formats),
                       with_scenes)
    counts["instruct"] = len(ins)
    counts["instruct_text_only"] = sum(1 for r in ins if "image" not in r)
    counts["instruct_probes"] = sum(1 for i in range(n_instruct) if is_probe(i, probe_fraction))
    counts["train_seconds"] = time.perf_counter() - t0
    if benchmarks:
        t1 = time.perf_counter()
        counts["eval"] = write_benchmarks(os.path.join(out_dir, "eval"), seed=seed, cfg=cfg, **(bench_sizes or {}))
        counts["eval_seconds"] = time.perf_counter() - t1
    with open(os.path.join(out_dir, "corpus_info.json"), "w") as f:
        json.dump({"seed": seed, "config": dataclasses.asdict(cfg), "text_only_fraction": text_only_fraction,
                   "probe_fraction": probe_fraction, "probe_turns": probe_turns,
                   "probe_formats": list(probe_formats),
                   "counts": {k: v for k, v in counts.items() if not k.endswith("seconds")}}, f, indent=1)
    return counts

