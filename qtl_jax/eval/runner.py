"""``evaluate(config, workdir)``: what ``python eval.py`` runs.

* Default: loads the model, answers every configured benchmark whose files are present, scores it, and
  runs the bits sweep when ``config.sweep.enabled``.
* ``config.score_only``: scores the answer files in ``config.answers_dir`` (``<benchmark>.jsonl``, LLaVA's
  answer-file format; ours or the official PyTorch scripts') without loading a model.

Outputs in ``workdir``:

* ``answers/<benchmark>.jsonl``: one LLaVA answer line per question (``question_id``, ``prompt``,
  ``text``, ``answer_id``, ``model_id``, ``metadata``), appended and flushed after every batch; a rerun
  answers only the missing questions (resume). The official scoring scripts read these files.
* ``results/<benchmark>/``: files for the official / external tools (MME ``mme_results/``, the VQAv2 EvalAI
  submission, the GQA predictions, MM-Vet and MMMU answer files).
* ``metrics.json``: ``{benchmark: {metric: number}}`` (the file contract; percentages, MME in points).
* ``results.md``: the headline table and every metric.

A benchmark whose files are missing (e.g. a LLaVA ``playground/data/eval`` folder without GQA) is skipped
with one line naming the missing file. With ``config.shapes_benchmarks.enabled`` the built-in shapes
benchmark files are written first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from qtl_jax.eval import harness
from qtl_jax.eval.benchmarks import benchmark_specs, missing_file


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


def present_specs(specs: Mapping[str, Mapping[str, Any]], with_images: bool) -> dict[str, Mapping[str, Any]]:
    """The benchmarks whose files exist; prints one line for each one skipped."""
    out = {}
    for name, spec in specs.items():
        missing = missing_file(spec, with_images)
        if missing is None:
            out[name] = spec
        else:
            print(f"skipping {name}: {missing} does not exist", flush=True)
    if not out:
        roots = sorted({os.path.dirname(spec["root"].rstrip("/")) for spec in specs.values()})
        raise FileNotFoundError(f"none of the configured benchmarks has its files under {', '.join(roots)}; set "
                                "--config.benchmark_dir to a folder laid out like LLaVA's playground/data/eval.")
    return out


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Scores ``config.answers_dir`` (``score_only``) or loads the model, evaluates, and sweeps if enabled."""
    if config.shapes_benchmarks.enabled:
        if not config.benchmark_dir:
            config.benchmark_dir = os.path.join(workdir, "benchmarks")
        prepare_shapes_benchmarks(config)
    specs = present_specs(benchmark_specs(config), with_images=not config.score_only)
    if config.score_only:
        return {"metrics": harness.score_answers(config, workdir, specs)}
    from qtl_jax.eval.model import load_model  # JAX; not needed to score answer files

    loaded = load_model(config)
    if config.levels:
        loaded = loaded.with_levels(int(config.levels))
    print(f"model: {loaded.source}; quantizer levels: {loaded.levels()}", flush=True)
    out: dict[str, Any] = {"metrics": harness.run_benchmarks(loaded, config, workdir, specs=specs)}
    if config.sweep.enabled:
        from qtl_jax.eval import sweep  # JAX and the codec; not needed to score answer files

        out["sweep"] = sweep.run_sweep(loaded, config, workdir, specs)
    return out
