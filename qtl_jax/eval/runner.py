"""``evaluate(config, workdir)``: answer every configured benchmark, score it, write the results.

Outputs in ``workdir``:

* ``answers/<benchmark>.jsonl``: one line per question (``key``, ``question_id``, ``prompt``, ``text``),
  appended and flushed after every batch. A rerun answers only the missing questions (resume).
* ``results/<benchmark>/``: files for the official / external tools (MME ``mme_results/``, the VQAv2 EvalAI
  submission, MM-Vet and MMMU answer files).
* ``metrics.json``: ``{benchmark: {metric: number}}`` (the file contract; percentages, MME in points).
* ``results.md``: the headline table and every metric.

Benchmarks are ``config.benchmarks.<name>`` entries with a ``kind`` (one of :data:`BENCHMARKS`), a
``root`` folder (relative roots are under ``config.benchmark_dir``) and the kind's file names. With
``config.shapes_benchmarks.enabled`` the built-in shapes benchmark files are written first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qtl_jax.eval import export, gqa, mme, pope, scienceqa, vqa
from qtl_jax.eval.answers import (Example, answers_path, append_answers, missing_answers, read_answers,
                                  rewrite_answers)
from qtl_jax.eval.model import LoadedModel, load_model


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How one kind of benchmark is read and scored; ``headline`` is the metric tables and the sweep show."""

    load: Callable[[Mapping[str, Any]], list[Example]]
    score: Callable[..., dict[str, float]]
    headline: str
    # Questions that are scored together and must be kept or dropped together when subsampling.
    group: Callable[[Example], Any] = lambda ex: ex.key


BENCHMARKS: dict[str, Benchmark] = {
    "mme": Benchmark(mme.load, mme.score, "perception", group=lambda ex: ex.question_id),
    "pope": Benchmark(pope.load, pope.score, "f1"),
    "scienceqa": Benchmark(scienceqa.load, scienceqa.score, "img_accuracy"),
    "vqav2": Benchmark(vqa.load, vqa.score_vqav2, "accuracy"),
    "textvqa": Benchmark(vqa.load, vqa.score_textvqa, "accuracy"),
    "gqa": Benchmark(gqa.load, gqa.score, "accuracy"),
    "mmvet": Benchmark(export.load, export.score_mmvet, "answered"),
    "mmmu": Benchmark(export.load, export.score_mmmu, "answered"),
}

Answerer = Callable[[Sequence[Example]], list[str]]


def subsample(examples: Sequence[Example], limit: int, group: Callable[[Example], Any]) -> list[Example]:
    """At most ``limit`` questions, whole groups at evenly spaced positions (0: all of them)."""
    if limit <= 0 or limit >= len(examples):
        return list(examples)
    groups: dict[Any, list[Example]] = {}
    for ex in examples:
        groups.setdefault(group(ex), []).append(ex)
    keys = list(groups)
    size = max(len(v) for v in groups.values())
    n = max(1, limit // size)
    picked = [keys[int(i)] for i in np.unique(np.linspace(0, len(keys) - 1, n).round().astype(int))]
    return [ex for k in picked for ex in groups[k]]


def benchmark_specs(config: Any) -> dict[str, dict[str, Any]]:
    """``config.benchmarks`` as plain dicts with absolute roots; unknown kinds are rejected up front."""
    specs = {}
    for name, spec in config.benchmarks.items():
        spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        kind = spec.get("kind")
        if kind not in BENCHMARKS:
            raise ValueError(f"benchmarks.{name}.kind={kind!r}: use one of {sorted(BENCHMARKS)}.")
        root = spec.get("root") or ""
        if not os.path.isabs(root):
            if not config.benchmark_dir:
                raise ValueError(f"benchmarks.{name}.root={root!r} is relative: set --config.benchmark_dir.")
            root = os.path.join(config.benchmark_dir, root)
        spec["root"] = root
        specs[name] = spec
    if not specs:
        raise ValueError("no benchmarks configured: add entries to config.benchmarks.")
    return specs


def prepare_shapes_benchmarks(config: Any) -> None:
    """Writes the built-in shapes benchmark files into ``config.benchmark_dir`` once."""
    from qtl_jax.data.shapes import benchmarks as benchmark_files
    from qtl_jax.data.shapes import ShapesConfig

    s = config.shapes_benchmarks
    marker = os.path.join(config.benchmark_dir, "shapes_benchmarks.json")
    settings = dict(s.to_dict()) if hasattr(s, "to_dict") else dict(s)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f).get("settings") == settings:
                return
    counts = benchmark_files.write_benchmarks(
        config.benchmark_dir, seed=int(s.seed), cfg=ShapesConfig(image_size=int(s.image_size)), n_mme=int(s.n_mme),
        n_pope=int(s.n_pope), n_scienceqa=int(s.n_scienceqa), n_vqa=int(s.n_vqa))
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "counts": counts}, f, indent=1)


def make_answerer(loaded: LoadedModel, config: Any) -> Answerer:
    """Greedy answers: ``config.generation='kv_cache'`` (the paper: :func:`qtl_jax.generate.generate_answers`,
    only the prompt through the quantizers) or ``'requantized'`` (every token through them, see
    :mod:`qtl_jax.eval.requantized`)."""
    import PIL.Image

    if config.generation == "requantized":
        from qtl_jax.eval.requantized import make_requantized_answerer

        return make_requantized_answerer(loaded, int(config.max_new_tokens))
    if config.generation != "kv_cache":
        raise ValueError(f"generation={config.generation!r}: use 'kv_cache' (the paper) or 'requantized'.")

    from qtl_jax import generate

    if loaded.qconfig is not None:
        model, params, quantizers = generate.split_model(loaded.qconfig, loaded.params, loaded.batch_stats)
    else:
        from qtl_jax.models.tinyllava import TinyLlava

        model, params, quantizers = TinyLlava(loaded.base), loaded.params, None

    def answer(batch: Sequence[Example]) -> list[str]:
        items = []
        for ex in batch:
            image = None
            if ex.image is not None:
                with PIL.Image.open(ex.image) as im:
                    image = im.convert("RGB")
            items.append((image, ex.prompt))
        return generate.generate_answers(model, params, loaded.tokenizer, loaded.template, loaded.image_processor,
                                         items, batch_size=len(items), max_new_tokens=int(config.max_new_tokens),
                                         quantizers=quantizers)

    return answer


def answer_benchmark(name: str, examples: Sequence[Example], answerer: Answerer, workdir: str, batch_size: int,
                     model_id: str, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Answers the questions of ``examples`` not yet in the answers file; returns all rows by key."""
    from tqdm.auto import tqdm

    path = answers_path(workdir, name)
    rows = read_answers(path)
    keys = {ex.key for ex in examples}
    if os.path.exists(path):
        # Drop a torn last line (and answers to questions no longer asked) before appending.
        rewrite_answers(path, [r for k, r in rows.items() if k in keys])
    todo = [ex for ex in examples if ex.key not in rows]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=name, unit="q", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        texts = answerer(batch)
        append_answers(path, batch, texts, model_id)
        bar.update(len(batch))
    bar.close()
    return read_answers(path)


def markdown_table(metrics: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """The headline score of each benchmark, then every metric."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| benchmark | headline metric | score |", "|---|---|---|"]
    for name, m in metrics.items():
        head = m.get("_headline")
        lines.append(f"| {name} | {head} | {m[head]:.2f} |" if head in m else f"| {name} | - | - |")
    lines += ["", "| benchmark | metric | value |", "|---|---|---|"]
    for name, m in metrics.items():
        lines += [f"| {name} | {k} | {v:.2f} |" for k, v in m.items() if not k.startswith("_")]
    return "\n".join(lines) + "\n"


def run_benchmarks(loaded: LoadedModel, config: Any, workdir: str, answerer: Answerer | None = None,
                   specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """Answers and scores every benchmark for ``loaded``; writes metrics.json and results.md in ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    specs = benchmark_specs(config) if specs is None else specs
    answerer = answerer or make_answerer(loaded, config)
    metrics: dict[str, dict[str, float]] = {}
    heads = {}
    for name, spec in specs.items():
        bench = BENCHMARKS[spec["kind"]]
        examples = subsample(bench.load(spec), int(config.max_examples), bench.group)
        t0 = time.time()
        rows = answer_benchmark(name, examples, answerer, workdir, int(config.batch_size), loaded.source,
                                bool(config.progress))
        missing_answers(examples, rows, name)
        out_dir = os.path.join(workdir, "results", name)
        os.makedirs(out_dir, exist_ok=True)
        scores = bench.score(spec, examples, rows, out_dir)
        metrics[name] = {k: float(v) for k, v in scores.items()}
        heads[name] = bench.headline
        print(f"{name}: {bench.headline}={scores.get(bench.headline, float('nan')):.2f} "
              f"({len(examples)} questions, {time.time() - t0:.1f} s)", flush=True)
    with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    table = {n: {**m, "_headline": heads[n]} for n, m in metrics.items()}
    levels = loaded.levels()
    title = f"{loaded.source}" + ("" if levels is None else f", L={levels}")
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(table, title))
    return metrics


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Loads the model, evaluates every benchmark, and runs the bits sweep when ``config.sweep.enabled``."""
    if config.shapes_benchmarks.enabled:
        if not config.benchmark_dir:
            config.benchmark_dir = os.path.join(workdir, "benchmarks")
        prepare_shapes_benchmarks(config)
    specs = benchmark_specs(config)
    loaded = load_model(config)
    if config.levels:
        loaded = loaded.with_levels(int(config.levels))
    print(f"model: {loaded.source}; quantizer levels: {loaded.levels()}", flush=True)
    metrics = run_benchmarks(loaded, config, workdir, specs=specs)
    out: dict[str, Any] = {"metrics": metrics}
    if config.sweep.enabled:
        from qtl_jax.eval import sweep

        out["sweep"] = sweep.run_sweep(loaded, config, workdir, specs)
    return out
