"""Writes the shapes corpus to disk: the two training splits, their scenes and the benchmark files.

The training files use the LLaVA JSON formats (see ``samples``); ``benchmarks`` writes the held-out
evaluation sets under ``eval/``. For a given seed and set of sizes the files are byte-identical from run to
run (``tests/test_shapes.py`` pins a digest).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Sequence

from qtl_jax.data.shapes.benchmarks import write_benchmarks
from qtl_jax.data.shapes.samples import (Sample, check_probe_formats, instruct_sample, is_probe, pretrain_sample,
                                         save_png)
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.text import PROBE_FORMATS


# Samples per task handed to a worker: large enough that pickling the records costs little against rendering.
CHUNK = 256


def _make_sample(kind: str, args: tuple, index: int) -> Sample:
    if kind == "pretrain":
        seed, cfg = args
        return pretrain_sample(seed, index, cfg)
    seed, cfg, text_only_fraction, probe_fraction, probe_turns, probe_formats = args
    return instruct_sample(seed, index, cfg, text_only_fraction, probe_fraction, probe_turns, probe_formats)


def _write_chunk(out_dir: str, kind: str, args: tuple, start: int, stop: int,
                 with_scenes: bool) -> list[tuple[dict, dict | None]]:
    """Writes the images of samples [start, stop) and returns their (record, scene entry): one worker's task."""
    out = []
    for i in range(start, stop):
        sample = _make_sample(kind, args, i)
        if sample.image is not None:
            save_png(sample.image, os.path.join(out_dir, "images", sample.record["image"]))
        scene = None
        if with_scenes:
            scene = {"id": sample.record["id"], "scene": None if sample.scene is None else sample.scene.to_json()}
        out.append((sample.record, scene))
    return out


def _write_split(out_dir: str, split: str, n: int, kind: str, args: tuple, with_scenes: bool,
                 workers: int) -> list[dict]:
    # Every sample is a pure function of its address, so workers write the same bytes in any order; the
    # records are gathered in index order.
    bounds = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    if workers > 1 and len(bounds) > 1:
        # 'spawn': the caller may hold JAX's threads, which a forked child must not inherit.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(bounds)), mp_context=ctx) as pool:
            parts = list(pool.map(_write_chunk, *zip(*[(out_dir, kind, args, a, b, with_scenes)
                                                       for a, b in bounds])))
    else:
        parts = [_write_chunk(out_dir, kind, args, a, b, with_scenes) for a, b in bounds]
    pairs = [p for part in parts for p in part]
    records = [r for r, _ in pairs]
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(records, f, indent=1)
    if with_scenes:
        with open(os.path.join(out_dir, f"{split}_scenes.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for _, s in pairs)
    return records


def default_workers() -> int:
    """Processes that render the corpus: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def write_corpus(out_dir: str, *, seed: int = 0, n_pretrain: int = 2000, n_instruct: int = 2000,
                 image_size: int = 64, cfg: ShapesConfig | None = None, text_only_fraction: float = 0.1,
                 probe_fraction: float = 0.0, probe_turns: int = 1, probe_formats: Sequence[str] | None = None,
                 benchmarks: bool = True, bench_sizes: dict | None = None, with_scenes: bool = True,
                 workers: int = 1) -> dict:
    """Writes the corpus under ``out_dir`` and returns the counts written.

    Layout: ``images/{pretrain,instruct}/*.png``, ``pretrain.json`` and ``instruct.json`` (LLaVA JSON,
    image paths relative to ``images/``), ``*_scenes.jsonl`` (the ground-truth scene per id) and, with
    ``benchmarks``, the held-out evaluation sets under ``eval/`` (``benchmarks.write_benchmarks``).
    ``workers`` processes render the training images (1: this process); the files are the same for any
    number. The workers are spawned, so a script that asks for more than one must guard its entry point
    (``if __name__ == "__main__":``), as for any ``multiprocessing`` spawn.
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
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1 (the processes that render the corpus).")
    pre = _write_split(out_dir, "pretrain", n_pretrain, "pretrain", (seed, cfg), with_scenes, workers)
    counts["pretrain"] = len(pre)
    ins = _write_split(out_dir, "instruct", n_instruct, "instruct",
                       (seed, cfg, text_only_fraction, probe_fraction, probe_turns, tuple(probe_formats)),
                       with_scenes, workers)
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

