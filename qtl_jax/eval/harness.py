"""Answering and scoring benchmarks, and the files that record it.

* :func:`run_benchmarks`: asks a model every question not yet answered in ``<workdir>/answers/`` (resume),
  then scores; used by the evaluation and by each level of the bits sweep.
* :func:`score_answers`: scores answer files already written (``config.score_only``), ours or the
  official PyTorch scripts', without a model.

Both write, in ``workdir``: ``results/<benchmark>/`` (files for the official / external tools),
``metrics.json`` (``{benchmark: {metric: number}}``) and ``results.md`` (the headline table and every
metric).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import (Answerer, Example, answers_path, append_answers, missing_answers, read_answers,
                                  rewrite_answers)
from qtl_jax.eval.benchmarks import BENCHMARKS, benchmark_specs, subsample


def answer_benchmark(name: str, examples: Sequence[Example], answerer: Answerer, workdir: str, batch_size: int,
                     model_id: str, progress: bool = True, by_prompt: bool = False) -> dict[str, dict[str, Any]]:
    """Answers the questions of ``examples`` not yet in the answer file; returns all rows by key.

    The file ends up holding exactly the asked questions in question-file order, the order the official
    scripts expect (POPE's pairs labels with answers by position).
    """
    from tqdm.auto import tqdm

    path = answers_path(os.path.join(workdir, "answers"), name)
    rows = read_answers(path, by_prompt)
    if os.path.exists(path):
        # Drop a torn last line (and answers to questions no longer asked) before appending.
        rewrite_answers(path, [rows[ex.key] for ex in examples if ex.key in rows])
    todo = [ex for ex in examples if ex.key not in rows]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=name, unit="q", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        append_answers(path, batch, answerer(batch), model_id)
        bar.update(len(batch))
    bar.close()
    rows = read_answers(path, by_prompt)
    if list(rows) != [ex.key for ex in examples if ex.key in rows]:
        rewrite_answers(path, [rows[ex.key] for ex in examples if ex.key in rows])
    return rows


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


def _score(name: str, spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Any],
           workdir: str) -> dict[str, float]:
    out_dir = os.path.join(workdir, "results", name)
    os.makedirs(out_dir, exist_ok=True)
    scores = BENCHMARKS[spec["kind"]].score(spec, examples, rows, out_dir)
    return {k: float(v) for k, v in scores.items()}


def _write(workdir: str, metrics: Mapping[str, Mapping[str, float]], specs: Mapping[str, Mapping[str, Any]],
           title: str) -> None:
    with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    table = {n: {**m, "_headline": BENCHMARKS[specs[n]["kind"]].headline} for n, m in metrics.items()}
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(table, title))


def _headline(name: str, kind: str, scores: Mapping[str, float]) -> str:
    head = BENCHMARKS[kind].headline
    return f"{name}: {head}={scores.get(head, float('nan')):.2f}"


def run_benchmarks(loaded: Any, config: Any, workdir: str, answerer: Answerer | None = None,
                   specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """Answers and scores every benchmark for ``loaded``; writes metrics.json and results.md in ``workdir``.

    ``answerer`` defaults to greedy generation with ``loaded`` (:func:`qtl_jax.eval.answerer.make_answerer`).
    """
    os.makedirs(workdir, exist_ok=True)
    specs = benchmark_specs(config) if specs is None else specs
    if answerer is None:
        from qtl_jax.eval.answerer import make_answerer

        answerer = make_answerer(loaded, config)
    metrics: dict[str, dict[str, float]] = {}
    for name, spec in specs.items():
        bench = BENCHMARKS[spec["kind"]]
        examples = subsample(bench.load(spec), int(config.max_examples), bench.group)
        t0 = time.time()
        rows = answer_benchmark(name, examples, answerer, workdir, int(config.batch_size), loaded.source,
                                bool(config.progress), bench.by_prompt)
        missing_answers(examples, rows, name)
        metrics[name] = _score(name, spec, examples, rows, workdir)
        print(f"{_headline(name, spec['kind'], metrics[name])} ({len(examples)} questions, "
              f"{time.time() - t0:.1f} s)", flush=True)
    levels = loaded.levels()
    _write(workdir, metrics, specs, f"{loaded.source}" + ("" if levels is None else f", L={levels}"))
    return metrics


def score_answers(config: Any, workdir: str, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Scores ``<config.answers_dir>/<benchmark>.jsonl`` (LLaVA answer lines) for every benchmark in ``specs``.

    A benchmark without its answer file is skipped with one line. Questions without an answer are left
    out as the official scripts leave them out (ScienceQA counts them wrong) and counted in one line;
    an answer that matches no question is an error.
    """
    answers_dir = config.answers_dir
    if not answers_dir or not os.path.isdir(answers_dir):
        raise FileNotFoundError(f"score_only needs --config.answers_dir, a folder of <benchmark>.jsonl answer "
                                f"files; got {answers_dir!r}.")
    os.makedirs(workdir, exist_ok=True)
    metrics: dict[str, dict[str, float]] = {}
    for name, spec in specs.items():
        bench = BENCHMARKS[spec["kind"]]
        path = answers_path(answers_dir, name)
        if not os.path.isfile(path):
            print(f"skipping {name}: no answer file {path}", flush=True)
            continue
        examples = subsample(bench.load(spec), int(config.max_examples), bench.group)
        rows = read_answers(path, bench.by_prompt)
        keys = {ex.key for ex in examples}
        stray = [k for k in rows if k not in keys]
        if stray and not int(config.max_examples):
            raise ValueError(f"{path}: {len(stray)} answers match no question of {name}'s question file "
                             f"(first: {stray[:3]}); is it the answer file of another benchmark?")
        unanswered = sum(ex.key not in rows for ex in examples)
        if unanswered:
            print(f"{name}: {unanswered} of {len(examples)} questions have no answer in {path}", flush=True)
        metrics[name] = _score(name, spec, examples, rows, workdir)
        print(f"{_headline(name, spec['kind'], metrics[name])} ({len(examples) - unanswered} answers from {path})",
              flush=True)
    if not metrics:
        raise FileNotFoundError(f"no answer file for any configured benchmark in {answers_dir} (expected "
                                f"{', '.join(answers_path(answers_dir, n) for n in specs)}).")
    _write(workdir, metrics, specs, f"answers from {answers_dir}")
    return metrics
