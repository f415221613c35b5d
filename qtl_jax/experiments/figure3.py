r"""Figure 3 of the paper, reproduced: one model **trained** per number of levels, five benchmarks with CIs.

    python -m qtl_jax.experiments.figure3 --config=configs/figure3.py:builtin --workdir=/tmp/fig3

For each L in ``config.levels`` and the 16-bit baseline (``bound='none'``), and (built-in) the image-blind
control, :func:`run` trains stage 1 and stage 2 with :func:`qtl_jax.train.loop.train_and_evaluate` (the
same data, steps and seed for every model; only the quantizer differs), evaluates the stage-2 model on
the five benchmarks (:mod:`qtl_jax.eval`), puts bootstrap intervals on the scores, reads the uplink bytes
the split link measured with the real codec, runs the entropy rule on the model's features and the
image-inversion attack on its wire (:mod:`qtl_jax.experiments.measure`). Then it writes
``figure3.json``, ``figure3.md``, ``figure3.png`` and ``figureA1.png`` (:mod:`qtl_jax.experiments.report`).

Workdir layout (every step resumes: a killed run picks up where it stopped)::

    data/                      the built-in corpus, its blanked twin and the tokenizer (qtl_jax.experiments.inputs)
    [pretrained/stage1/  pretrained/stage2_probes/  pretrained/stage2_probes2/]
                               the shared 16-bit pretraining (``pretrain.steps`` > 0), every part trained, in
                               place of pretrained components; every model's stage 1 starts from its last run
                               (stage2_probes2: a second probe phase on other formats, ``pretrain.probe2_steps``)
    <model>/stage1/  [<model>/stage2_probes/]  <model>/stage2/
                               train.py workdirs (model: L2, L4, ..., fp16, blind), each started from the one
                               before; stage2_probes is the curriculum's first phase (``probe_phase.steps`` > 0,
                               and in the pretraining, ``pretrain.probe_steps`` > 0)
    <model>/eval/              answers/, metrics.json, results.md (qtl_jax.eval)
    <model>/measured.json      scores with intervals, uplink, privacy, the phases' wall and CPU seconds
    <model>/features.npz       in_proj features in batches (quantized models)
    timing.json                wall and CPU seconds of every phase, with the load average
    figure3.{json,md,png}  figureA1.png
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from qtl_jax.experiments import inputs as inputs_lib
from qtl_jax.experiments import report

TIMING_FILE = "timing.json"
STAGE_DONE = "figure3_stage.json"
MEASURED = "measured.json"
FEATURES = "features.npz"
BUILTIN_PRESETS = ("builtin", "curriculum", "half", "demo", "tiny")


@dataclasses.dataclass(frozen=True)
class Model:
    """One trained model of the figure: ``levels`` L (0: the 16-bit baseline), ``blind``: images blanked."""

    name: str
    levels: int
    blind: bool = False

    @property
    def bits(self) -> float:
        return report.BASELINE_BITS if self.levels == 0 else math.log2(self.levels)


def models(config: Any) -> list[Model]:
    levels = [int(v) for v in config.levels]
    if not levels or any(v < 2 for v in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"levels={tuple(config.levels)}: give distinct numbers of levels >= 2, e.g. 2,4,8,16,32.")
    # The references first: a run cut short still has what every quantized model is compared with.
    if int(config.probe_phase.steps) > 0 and config.preset not in BUILTIN_PRESETS:
        raise ValueError("probe_phase.steps > 0 needs the built-in corpus (it writes the probe-only stage-2 data); "
                         "set --config.probe_phase.steps=0 for the paper preset.")
    if int(config.pretrain.probe2_steps) > 0 and not str(config.pretrain.probe2_formats).strip():
        raise ValueError("pretrain.probe2_steps > 0 needs pretrain.probe2_formats (the formats of the second probe "
                         "phase, e.g. --config.pretrain.probe2_formats=scienceqa).")
    if int(config.pretrain.steps) > 0 and config.preset not in BUILTIN_PRESETS:
        raise ValueError("pretrain.steps > 0 stands in for pretrained components on the built-in corpus; the paper "
                         "preset starts from real ones: set --config.pretrain.steps=0.")
    out = [Model("fp16", 0)] if config.baseline else []
    if config.blind:
        if config.preset not in BUILTIN_PRESETS:
            raise ValueError("blind=True needs the built-in corpus (its images can be blanked); set "
                             "--config.blind=False for the paper preset.")
        out.append(Model("blind", 0, blind=True))
    return out + [Model(f"L{v}", v) for v in sorted(levels)]


def _quantizer(section: Any, levels: int) -> None:
    if levels == 0:
        section.bound = "none"
    else:
        section.bound = "linear" if section.bound == "none" else section.bound
        section.levels = levels


# The shared start of every model when ``pretrain.steps`` > 0: a 16-bit model with every part trained, in
# place of the paper's pretrained SigLIP and OpenELM (the built-in model has none).
PRETRAINED = Model("pretrained", 0)
# What every model's first run takes afresh from its own initialisation instead of from PRETRAINED.
FRESH_QUANTIZERS = (".*_quantizer/.*",)


def pretrained(config: Any) -> bool:
    return int(config.pretrain.steps) > 0


def stages(config: Any, model: Model) -> list[str]:
    """``model``'s training runs, in order, each started from the one before: stage 1, (the curriculum's
    probe-only phase,) stage 2. :data:`PRETRAINED` (``pretrain.steps`` > 0) runs stage 1 and (with
    ``pretrain.probe_steps`` > 0) a probe-only phase, then (``pretrain.probe2_steps`` > 0) a second one on other
    formats; every other model's stage 1 then starts from its last run."""
    if model == PRETRAINED:
        return ["stage1"] + (["stage2_probes"] if int(config.pretrain.probe_steps) > 0 else []) + (
            ["stage2_probes2"] if int(config.pretrain.probe_steps) > 0 and int(config.pretrain.probe2_steps) > 0
            else [])
    return ["stage1"] + (["stage2_probes"] if int(config.probe_phase.steps) > 0 else []) + ["stage2"]


QUANTIZER_INITS = ("normal", "identity")


def needs_moments(config: Any, model: Model, stage: str) -> bool:
    """Whether ``model``'s run ``stage`` starts fresh quantizers calibrated to the pretraining's feature moments
    (``pretrain.quantizer_init='identity'``)."""
    init = str(config.pretrain.quantizer_init)
    if init not in QUANTIZER_INITS:
        raise ValueError(f"pretrain.quantizer_init={init!r}: use one of {QUANTIZER_INITS}.")
    return init == "identity" and pretrained(config) and model.levels > 0 and model != PRETRAINED and \
        stage == stages(config, model)[0]


def pretrained_moments(config: Any, workdir: str) -> dict[str, tuple[float, float]]:
    """``{'image': (mean, std), 'text': (mean, std)}`` of the quantizers' inputs over the last quarter of the
    pretraining's last run (its ``feature_mean_*`` / ``feature_std_*`` in metrics.jsonl: the final weights on
    the batches' rows that the paper's batch statistics take)."""
    from qtl_jax.train.metrics_log import METRICS_FILE, read_jsonl

    run_dir = os.path.join(workdir, PRETRAINED.name, stages(config, PRETRAINED)[-1])
    path = os.path.join(run_dir, METRICS_FILE)
    keys = [f"feature_{s}_{m}" for m in ("image", "text") for s in ("mean", "std")]
    records = [r for r in read_jsonl(path) if all(k in r for k in keys)]
    if not records:
        raise ValueError(f"{path} has no feature_mean_* / feature_std_* records to calibrate the quantizers "
                         "(pretrain.quantizer_init='identity'): finish the pretraining first, or rerun it with this "
                         "version (older runs did not log them), or set --config.pretrain.quantizer_init=normal.")
    last = max(r["step"] for r in records)
    tail = [r for r in records if r["step"] > 0.75 * last] or records[-1:]
    return {m: (float(np.mean([r[f"feature_mean_{m}"] for r in tail])),
                float(np.sqrt(np.mean([float(r[f"feature_std_{m}"]) ** 2 for r in tail]))))
            for m in ("image", "text")}


def stage_config(config: Any, model: Model, stage: str, given: inputs_lib.Inputs, workdir: str,
                 moments: Mapping[str, tuple[float, float]] | None = None) -> Any:
    """The train.py config of ``model``'s run ``stage`` (one of :func:`stages`): the experiment's section with the
    model's quantizer, the experiment's seed, its data and the workdir of the run before to start from.

    ``stage2_probes`` is the ``stage2`` section for ``probe_phase.steps`` steps on the probe-only data.
    :data:`PRETRAINED` trains at 16 bits what ``pretrain.param_groups`` says (its stage 1 for ``pretrain.steps``
    steps at ``pretrain.lr``, its probe phase for ``pretrain.probe_steps``); the first run of any other model
    then starts from its last run, its quantizers initialised afresh: by ``pretrain.quantizer_init``, and for
    'identity' calibrated to ``moments`` (:func:`pretrained_moments`; required where :func:`needs_moments`).
    """
    order = stages(config, model)
    if stage not in order:
        raise ValueError(f"stage {stage!r}: this experiment trains {', '.join(order)} for {model.name}.")
    c = copy.deepcopy(config.stage1 if stage == "stage1" else config.stage2)
    c.seed = int(config.seed)
    _quantizer(c.quantizer, model.levels)
    c.data.kind = "llava"
    probe_data = given.pretrain_probe_data if model == PRETRAINED and given.pretrain_probe_data else given.probe_data
    c.data.dataset_dir = {"stage1": given.stage1_data, "stage2_probes": probe_data,
                          "stage2_probes2": given.pretrain_probe2_data, "stage2": given.stage2_data}[stage]
    if stage == "stage2_probes":
        c.total_steps = int(config.pretrain.probe_steps if model == PRETRAINED else config.probe_phase.steps)
    elif stage == "stage2_probes2":
        c.total_steps = int(config.pretrain.probe2_steps)
    c.model.tokenizer_dir = given.tokenizer_dir
    if given.vision_dir:
        c.model.vision_dir, c.model.llm_dir = given.vision_dir, given.llm_dir
    if model == PRETRAINED:
        c.optimizer.param_groups = config.pretrain.param_groups
        if stage == "stage1":
            c.total_steps, c.optimizer.lr = int(config.pretrain.steps), float(config.pretrain.lr)
    if stage != order[0]:
        c.init.from_workdir = os.path.join(workdir, model.name, order[order.index(stage) - 1])
    elif pretrained(config) and model != PRETRAINED:
        c.init.from_workdir = os.path.join(workdir, PRETRAINED.name, stages(config, PRETRAINED)[-1])
        c.init.dont_load = FRESH_QUANTIZERS if model.levels > 0 else ()
    if needs_moments(config, model, stage):
        if moments is None:
            raise ValueError(f"{model.name} {stage}: pretrain.quantizer_init='identity' needs the pretraining's "
                             "feature moments (figure3.pretrained_moments after the pretraining has run).")
        c.quantizer.init = "identity"
        for m in ("image", "text"):
            mean, std = moments[m]
            c.quantizer[f"init_{m}_mean"], c.quantizer[f"init_{m}_std"] = float(mean), float(std)
    return c


def probe_corpus(config: Any) -> dict[str, Any] | None:
    """The probe-only stage-2 corpus of the curriculum's first phase (None without one): ``corpus``'s seed and
    text settings with ``probe_phase``'s samples, formats and questions per sample, every sample a probe."""
    p = config.probe_phase
    if int(p.steps) <= 0 and not (pretrained(config) and int(config.pretrain.probe_steps) > 0):
        return None
    return {"n_instruct": int(p.n_samples), "probe_fraction": 1.0, "probe_turns": int(p.probe_turns),
            "probe_formats": str(p.probe_formats)}


def pretrain_probe_corpus(config: Any) -> dict[str, Any] | None:
    """The pretraining's own probe-only corpus: :func:`probe_corpus` with ``pretrain.probe_formats``; None where
    the pretraining has no probe phase or asks the same formats (it then trains on :func:`probe_corpus`)."""
    same = probe_corpus(config)
    fmt = str(config.pretrain.probe_formats)
    if not (pretrained(config) and int(config.pretrain.probe_steps) > 0) or not fmt or fmt == same["probe_formats"]:
        return None
    return dict(same, probe_formats=fmt)


def pretrain_probe2_corpus(config: Any) -> dict[str, Any] | None:
    """The corpus of the pretraining's second probe phase: :func:`probe_corpus` with ``pretrain.probe2_formats``
    (None without that phase)."""
    if not (pretrained(config) and int(config.pretrain.probe_steps) > 0 and int(config.pretrain.probe2_steps) > 0):
        return None
    return dict(probe_corpus(config), probe_formats=str(config.pretrain.probe2_formats))


def eval_config(config: Any, model: Model, given: inputs_lib.Inputs, workdir: str) -> Any:
    c = copy.deepcopy(config.eval)
    c.seed = int(config.seed)
    c.checkpoint = os.path.join(workdir, model.name, "stage2")
    c.benchmark_dir = given.benchmark_dir
    c.tokenizer_dir = given.tokenizer_dir
    c.shapes_benchmarks.enabled = False
    return c


class Timings:
    """Wall and CPU seconds (all threads of this process) per phase, kept in ``timing.json`` across reruns."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, TIMING_FILE)
        self.phases: dict[str, dict[str, float]] = {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.phases = json.load(f)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        yield
        self.phases[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                             "load_start": load, "load_end": os.getloadavg()[0]}
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(self.phases, f, indent=1)


def _read(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a kill never leaves half a marker


def train_stage(config: Any, model: Model, stage: str, given: inputs_lib.Inputs, workdir: str,
                timings: Timings) -> dict[str, Any]:
    """Trains (or resumes, or finds finished) one run (``stage``, one of :func:`stages`) of one model."""
    from qtl_jax.train.loop import train_and_evaluate

    stage_dir = os.path.join(workdir, model.name, stage)
    done = _read(os.path.join(stage_dir, STAGE_DONE))
    if done is None:
        print(f"figure3: {model.name} {stage}", flush=True)
        moments = pretrained_moments(config, workdir) if needs_moments(config, model, stage) else None
        with timings.phase(f"{model.name}/{stage}"):
            out = train_and_evaluate(stage_config(config, model, stage, given, workdir, moments), stage_dir)
        done = {"step": out["step"], "loss": out["loss"], **timings.phases[f"{model.name}/{stage}"]}
        _write(os.path.join(stage_dir, STAGE_DONE), done)
    return done


def trained_levels(stage_dir: str) -> int:
    """L the run in ``stage_dir`` was trained with, from its config.json (0 for bound='none')."""
    q = _read(os.path.join(stage_dir, "config.json"))["quantizer"]
    return 0 if q["bound"] == "none" else int(q["levels"])


def measure_model(config: Any, model: Model, given: inputs_lib.Inputs, workdir: str, timings: Timings) -> dict[str, Any]:
    """Scores (with intervals), uplink, rule features and inversion attack of one trained model (cached)."""
    import jax

    from qtl_jax.eval.model import load_model
    from qtl_jax.experiments import measure

    root = os.path.join(workdir, model.name)
    path = os.path.join(root, MEASURED)
    done = _read(path)
    attack = bool(config.privacy.enabled) and not model.blind
    # A run measured without the attack gets only the attack when it is enabled later.
    if done is not None and (not attack or "privacy" in done):
        return done
    ecfg = eval_config(config, model, given, workdir)
    if done is not None:
        loaded = load_model(ecfg)
        out = done
    else:
        print(f"figure3: {model.name} evaluation", flush=True)
        with timings.phase(f"{model.name}/eval"):
            loaded = load_model(ecfg)
            scores, metrics = measure.benchmark_scores(loaded, ecfg, os.path.join(root, "eval"), config.bootstrap)
        out = {
            "name": model.name, "levels": model.levels, "bits": model.bits,
            "trained_levels": trained_levels(os.path.join(root, "stage2")), "scores": scores,
            "uplink_bytes_per_sample": measure.uplink_per_sample(os.path.join(root, "stage2")),
            "metrics": metrics,
        }
        if model.levels > 0:
            e = config.entropy
            with timings.phase(f"{model.name}/features"):
                # Twice the batches: the first half for the rule, the second half to check a refitted tolerance.
                feats = measure.rule_feature_batches(loaded, ecfg, 2 * int(e.batches), int(e.questions))
            np.savez(os.path.join(root, FEATURES),
                     **{f"{m}_{i}": u for m, us in feats.items() for i, u in enumerate(us)})
    if attack:
        print(f"figure3: {model.name} inversion attack", flush=True)
        with timings.phase(f"{model.name}/privacy"):
            out["privacy"] = measure.inversion_attack(loaded, config.privacy)
    del loaded
    jax.clear_caches()
    _write(path, out)
    return out


def _feature_batches(workdir: str, model: Model) -> dict[str, list[np.ndarray]]:
    with np.load(os.path.join(workdir, model.name, FEATURES)) as z:
        out: dict[str, list[np.ndarray]] = {"image": [], "text": []}
        for m in out:
            i = 0
            while f"{m}_{i}" in z:
                out[m].append(z[f"{m}_{i}"])
                i += 1
        return out


def entropy_rule(config: Any, quantized: list[Model], workdir: str, knee: int | None
                 ) -> tuple[dict[str, dict[str, int]], dict[str, Any], dict[str, Any]]:
    """The rule on every quantized model's features; the figure's choice from the ``entropy.from_levels`` model.

    Returns (per-model choices, details of the figure's choice, its estimates per modality for Figure A1).
    With a knee, also the τ interval that would make the rule pick it, fitted on the first half of the
    batches and checked on the second half.
    """
    from qtl_jax import level_selection

    e = config.entropy
    per_model, estimates, checks = {}, {}, {}
    want = int(e.from_levels)
    source = next((m for m in quantized if m.levels == want), quantized[-1])
    for m in quantized:
        feats = _feature_batches(workdir, m)
        half = int(e.batches)
        per_model[m.name] = {}
        for modality, batches in feats.items():
            fit = level_selection.estimate_over_batches(batches[:half], tolerance_bits=float(e.tolerance_bits),
                                                        max_samples=int(e.max_samples))
            per_model[m.name][modality] = fit.levels
            if m == source:
                estimates[modality] = fit
                check = level_selection.estimate_over_batches(batches[half:], tolerance_bits=float(e.tolerance_bits),
                                                              max_samples=int(e.max_samples), seed=1000)
                entry: dict[str, Any] = {
                    "levels": fit.levels, "bits": fit.bits, "entropy_coded_bits": fit.entropy_coded_bits,
                    "reason": fit.reason, "chosen_per_batch": list(fit.chosen_per_batch),
                    "check_batches_levels": check.levels,
                    "gap_mean": dict(zip(map(str, fit.candidates), fit.gap_mean))}
                if knee is not None:
                    window = report.tolerance_window(fit.candidates, fit.gap_mean, knee)
                    entry["tolerance_for_knee"] = window and [window[0], None if math.isinf(window[1]) else window[1]]
                    if window:
                        tau = math.sqrt(window[0] * window[1]) if math.isfinite(window[1]) else 2 * window[0]
                        entry["refitted_tolerance"] = tau
                        entry["refitted_choice_on_check_batches"] = report.rule_choice(check.candidates,
                                                                                       check.gap_mean, tau)
                checks[modality] = entry
    details = {"source": f"in_proj features of the model trained at L={source.levels}", "model": source.name,
               "tolerance_bits": float(e.tolerance_bits), "batches": int(e.batches), "questions_per_batch":
               int(e.questions), **checks}
    return per_model, details, estimates


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the whole experiment; returns what ``figure3.json`` holds.

    The built-in corpus is rendered by spawned worker processes: a script calling this must guard its entry
    point (``if __name__ == "__main__":``)."""
    from qtl_jax.data.shapes.corpus import default_workers

    workdir = os.path.abspath(workdir)
    plan = models(config)
    os.makedirs(workdir, exist_ok=True)
    timings = Timings(workdir)
    if config.preset in BUILTIN_PRESETS:
        with timings.phase("data"):
            image_size = int(config.stage1.model.vision.image_size)
            given = inputs_lib.prepare_builtin(os.path.join(workdir, "data"), config.corpus.to_dict(), image_size,
                                               blank=bool(config.blind), probes=probe_corpus(config),
                                               pretrain_probes=pretrain_probe_corpus(config),
                                               pretrain_probes2=pretrain_probe2_corpus(config),
                                               workers=default_workers())
    else:
        given = {"images": inputs_lib.check_paths(config.paths.to_dict())}
    if pretrained(config):
        for stage in stages(config, PRETRAINED):
            train_stage(config, PRETRAINED, stage, given["images"], workdir, timings)
    measured = {}
    for model in plan:
        model_inputs = given["blank" if model.blind else "images"]
        for stage in stages(config, model):
            train_stage(config, model, stage, model_inputs, workdir, timings)
        measured[model.name] = measure_model(config, model, model_inputs, workdir, timings)

    def trained(m: Model) -> dict[str, Any]:
        return {s: _read(os.path.join(workdir, m.name, s, STAGE_DONE)) for s in stages(config, m)}

    rows = [dict(measured[m.name], train=trained(m)) for m in plan if not m.blind]
    for r in rows:
        r.pop("metrics", None)
    blind = next((measured[m.name]["scores"] for m in plan if m.blind), None)
    knee = report.knee_levels(rows)
    quantized = [m for m in plan if m.levels > 0]
    notes = []
    per_model, details, estimates = {}, {}, {}
    if quantized:
        with timings.phase("entropy_rule"):
            per_model, details, estimates = entropy_rule(config, quantized, workdir, knee)
    else:
        notes.append("No quantized model: the entropy rule has no features to read.")
    for r in rows:
        if r["name"] in per_model:
            r["entropy_rule"] = per_model[r["name"]]
        if blind:
            r["beats_blind"] = {b: report.beats_blind(s, blind.get(b)) for b, s in r["scores"].items()}
    if not any(k.startswith("roundtrip") or k.startswith("downlink") for r in rows for k in r["uplink_bytes_per_sample"]):
        notes.append("Round-trip bytes are not reported: the split link's metrics.jsonl of this run has no "
                     "roundtrip_bytes_per_sample / downlink_bytes_fp32 figure.")
    result = {
        "preset": config.preset, "rows": rows, "blind": blind,
        "pretrained": trained(PRETRAINED) if pretrained(config) else None,
        "entropy_rule": {m: details[m]["levels"] for m in ("image", "text") if m in details},
        "entropy_rule_details": details, "knee_levels": knee,
        "knee_definition": "the smallest trained L whose headline on every benchmark is >= the lower end of the "
                           "16-bit baseline's 95 % bootstrap interval",
        "timing": timings.phases, "notes": notes,
        "config": json.loads(config.to_json_best_effort()),
    }
    paths = report.write(result, estimates, workdir)
    print(f"figure3: wrote {', '.join(paths.values())}", flush=True)
    return result


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation; see qtl_jax/xla_flags.py
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    try:  # bad settings or paths are one line, before anything slow
        models(config)
        if config.preset not in BUILTIN_PRESETS:
            inputs_lib.check_paths(config.paths.to_dict())
    except (ValueError, FileNotFoundError) as e:
        print(f"figure3: error: {e}", file=sys.stderr)
        sys.exit(2)
    run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/figure3.py:<builtin|half|tiny|paper>.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the experiment (resumed if it holds one).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
