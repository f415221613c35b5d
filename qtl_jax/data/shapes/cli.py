"""``python -m qtl_jax.data.shapes --out=DIR``: writes the shapes corpus, its benchmarks and, optionally,
the tokenizer and a preview picture; prints what it wrote and how long it took."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from qtl_jax import cli as clilib
from qtl_jax.data.shapes.corpus import default_workers, write_corpus
from qtl_jax.data.shapes.preview import preview_grid
from qtl_jax.data.shapes.samples import parse_probe_formats
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.text import PROBE_FORMATS
from qtl_jax.data.shapes.tokenizer import build_shapes_tokenizer


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses ``argv`` (default ``sys.argv[1:]``), writes the corpus and returns the counts written.

    Bad arguments print one ``error:`` line and exit with status 2.
    """
    p = argparse.ArgumentParser(prog="python -m qtl_jax.data.shapes",
                                description="Write the built-in shapes corpus and its benchmark files.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_pretrain", type=int, default=2000)
    p.add_argument("--n_instruct", type=int, default=2000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--text_only_fraction", type=float, default=0.1)
    p.add_argument("--probe_fraction", type=float, default=0.0,
                   help="stage-2 samples that are yes/no questions in the POPE / MME formats (balanced)")
    p.add_argument("--probe_turns", type=int, default=1, help="yes/no questions per probe sample")
    p.add_argument("--probe_formats", default=",".join(PROBE_FORMATS),
                   help="the probes' formats, taken in turn (comma-separated: pope, existence, count, position, color, "
                        "scienceqa)")
    p.add_argument("--n_mme", type=int, default=30, help="images per MME subtask (2 questions each)")
    p.add_argument("--n_pope", type=int, default=50, help="POPE images (6 questions each per split)")
    p.add_argument("--n_scienceqa", type=int, default=200)
    p.add_argument("--n_vqa", type=int, default=200, help="VQA images (2 questions each)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that render the training images (the files do not depend on it)")
    p.add_argument("--no_benchmarks", action="store_true")
    p.add_argument("--tokenizer", action="store_true", help="also write the word-level tokenizer to OUT/tokenizer")
    p.add_argument("--preview", default=None, help="also save a PNG grid of samples to this path")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = ShapesConfig(image_size=a.image_size)
        counts = write_corpus(a.out, seed=a.seed, n_pretrain=a.n_pretrain, n_instruct=a.n_instruct,
                              image_size=a.image_size, cfg=cfg, text_only_fraction=a.text_only_fraction,
                              probe_fraction=a.probe_fraction,
                              probe_turns=a.probe_turns, probe_formats=parse_probe_formats(a.probe_formats),
                              benchmarks=not a.no_benchmarks, workers=a.workers,
                              bench_sizes=dict(n_mme=a.n_mme, n_pope=a.n_pope, n_scienceqa=a.n_scienceqa,
                                               n_vqa=a.n_vqa))
    except ValueError as e:
        clilib.print_error(e)
        raise SystemExit(2) from None
    n_train = counts["pretrain"] + counts["instruct"]
    print(f"wrote {a.out}: pretrain.json {counts['pretrain']} samples, instruct.json {counts['instruct']} samples "
          f"({counts['instruct_text_only']} text-only) in {counts['train_seconds']:.2f} s "
          f"({n_train / max(counts['train_seconds'], 1e-9):.0f} samples/s)")
    for name, value in counts.get("eval", {}).items():
        print(f"  eval/{name}: {value}")
    if "eval_seconds" in counts:
        print(f"  benchmarks written in {counts['eval_seconds']:.2f} s")
    if a.tokenizer:
        tok = build_shapes_tokenizer(os.path.join(a.out, "tokenizer"))
        print(f"  tokenizer: {len(tok)} tokens -> {os.path.join(a.out, 'tokenizer')}")
    if a.preview:
        preview_grid(a.preview, seed=a.seed, n=8, cfg=cfg)
        print(f"  preview: {a.preview}")
    print(f"total {time.perf_counter() - t0:.2f} s")
    return counts
