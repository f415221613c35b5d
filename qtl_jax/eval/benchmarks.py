"""The benchmark kinds: how each reads its questions, keys its answers, scores, and which files it needs.

Benchmarks are ``config.benchmarks.<name>`` entries with a ``kind`` (one of :data:`BENCHMARKS`), a
``root`` folder (relative roots are under ``config.benchmark_dir``) and the kind's file names; the
defaults in ``configs/eval.py`` are LLaVA's ``playground/data/eval`` layout, so a directory laid out
like it needs no per-benchmark settings. A benchmark whose files are not there is skipped with one line
that names the first missing file (:func:`missing_file`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qtl_jax.eval import export, gqa, mme, pope, scienceqa, vqa
from qtl_jax.eval.answers import Example, load_llava_questions


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How one kind of benchmark is read and scored.

    load: question file -> examples. score: ``(spec, examples, rows by key, out_dir) -> metrics``.
    headline: the metric tables and the sweep show. by_prompt: answers are keyed by question id *and*
    prompt (the kind's question ids repeat). needs: spec fields naming files or folders (relative to
    the root) that must exist to score; ``None`` values mean optional. group: questions scored together,
    kept or dropped together when subsampling.
    """

    load: Callable[[Mapping[str, Any]], list[Example]]
    score: Callable[..., dict[str, float]]
    headline: str
    by_prompt: bool = False
    needs: tuple[str, ...] = ("question_file",)
    group: Callable[[Example], Any] = lambda ex: ex.key


def _llava(score, headline, by_prompt=False, **kw) -> Benchmark:
    return Benchmark(functools.partial(load_llava_questions, by_prompt=by_prompt), score, headline,
                     by_prompt=by_prompt, **kw)


BENCHMARKS: dict[str, Benchmark] = {
    "mme": _llava(mme.score, "perception", by_prompt=True, needs=("question_file", "gt_folder"),
                  group=lambda ex: ex.question_id),
    "pope": _llava(pope.score, "f1", needs=("question_file", "annotation_dir")),
    "scienceqa": Benchmark(scienceqa.load, scienceqa.score, "img_accuracy",
                           needs=("question_file", "problems_file", "splits_file")),
    "vqav2": _llava(vqa.score_vqav2, "accuracy", needs=("question_file", "annotation_file")),
    "textvqa": _llava(vqa.score_textvqa, "accuracy", by_prompt=True, needs=("question_file", "annotation_file")),
    "gqa": _llava(gqa.score, "accuracy", needs=("question_file", "annotation_file")),
    "mmvet": _llava(export.score_mmvet, "answered"),
    "mmmu": _llava(export.score_mmmu, "answered"),
}
# Files every kind reads that have no config field (fixed names in the official layouts).
_FIXED = {"problems_file": "problems.json", "splits_file": "pid_splits.json"}


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


def missing_file(spec: Mapping[str, Any], with_images: bool) -> str | None:
    """The first file or folder the benchmark needs that does not exist, or None.

    ``with_images``: the image folder is needed too (answering; scoring answers needs no image).
    VQAv2's annotation file is optional (test-dev has none): an empty ``annotation_file`` is not needed.
    """
    fields = list(BENCHMARKS[spec["kind"]].needs) + (["image_folder"] if with_images else [])
    for field in fields:
        value = _FIXED.get(field) or spec.get(field)
        if not value:
            continue
        path = os.path.join(spec["root"], value)
        if not os.path.exists(path):
            return path
    return None


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
