"""Per-question outcomes of a scored benchmark and bootstrap confidence intervals of its headline metric.

The scorers (:mod:`qtl_jax.eval.mme`, ``pope``, ``scienceqa``, ``vqa``) give one number per benchmark.
A confidence interval needs what that number is made of: :func:`outcomes` reads the same files and
answers and returns, per *unit*, the columns the headline is computed from, with the parsing and lookup
rules of those modules (their public helpers):

==========  =============================  ====================================  ==========================
kind        unit (stratum)                 columns                               headline
==========  =============================  ====================================  ==========================
pope        question (category)            said yes, label is yes                mean over categories of F1
mme         image (subtask)                questions answered right (0, 1, 2)    perception: sum over the
                                                                                 perception subtasks of
                                                                                 100·acc + 100·acc+
scienceqa   image question                 right                                 img_accuracy
vqav2       question                       VQA soft accuracy (m4c)               accuracy
textvqa     question                       VQA soft accuracy (m4c)               accuracy
==========  =============================  ====================================  ==========================

:func:`bootstrap_interval` resamples units with replacement *within* each stratum (the headline averages
or sums per-stratum metrics, so every replicate keeps the benchmark's composition) and recomputes the
headline from the resampled columns: F1 and MME's score are recomputed, not averaged from per-question
scores. An MME unit is an image because acc+ is defined on an image's pair of questions. The interval
is the percentile interval of the replicates (seeded, so it is reproducible).

:func:`outcomes` checks that its columns reproduce the scorer's headline exactly (to float rounding)
on the full sample, so the interval is about the very number the benchmark reports.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qtl_jax.eval import mme, pope, scienceqa, vqa
from qtl_jax.eval.answers import Example, read_json, read_jsonl

# statistic(columns by stratum, each [..., n_units, n_columns]) -> headline [...]
Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """What a benchmark's headline is computed from.

    columns: stratum -> ``[n_units, n_columns]`` float array (one row per unit).
    statistic: the headline from columns of any leading batch shape (units on axis -2).
    questions: the number of questions behind the headline (an MME unit holds two).
    secondary: other metrics of the scorer computed from the same columns (POPE: ``accuracy``, which F1
        alone hides: an always-yes model has F1 66.7 at accuracy 50).
    """

    kind: str
    headline: str
    columns: Mapping[str, np.ndarray]
    statistic: Statistic
    questions: int
    secondary: Mapping[str, Statistic] = dataclasses.field(default_factory=dict)

    def value(self, metric: str | None = None) -> float:
        """The headline, or the secondary ``metric``, on the full sample."""
        return float(self.statistic_for(metric)(self.columns))

    def statistic_for(self, metric: str | None) -> Statistic:
        """The statistic of the headline (None) or of a secondary metric."""
        if metric is None or metric == self.headline:
            return self.statistic
        if metric not in self.secondary:
            known = ", ".join([self.headline, *self.secondary])
            raise ValueError(f"{self.kind}: no metric {metric!r}; it has {known}.")
        return self.secondary[metric]


def _f1(said_yes: np.ndarray, is_yes: np.ndarray) -> np.ndarray:
    """POPE's F1 (percent; 0 where there is no yes answer or no yes label, as ``pope.split_metrics``)."""
    tp = np.sum(said_yes * is_yes, axis=-1)
    fp = np.sum(said_yes * (1 - is_yes), axis=-1)
    fn = np.sum((1 - said_yes) * is_yes, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return 100.0 * f1


def _pope_statistic(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.mean([_f1(c[..., 0], c[..., 1]) for c in columns.values()], axis=0)


def _pope_accuracy_statistic(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    # The mean over categories of the share answered right (pope.score's ``accuracy``).
    return np.mean([100.0 * np.mean(c[..., 0] == c[..., 1], axis=-1) for c in columns.values()], axis=0)


def _mme_statistic(perception: Sequence[str]) -> Statistic:
    def statistic(columns: Mapping[str, np.ndarray]) -> np.ndarray:
        total = 0.0
        for subtask in perception:
            if subtask in columns:
                right = columns[subtask][..., 0]
                total = total + 100.0 * (np.mean(right, axis=-1) / 2.0 + np.mean(right == 2, axis=-1))
        return np.asarray(total)

    return statistic


def _mean_statistic(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    (c,) = columns.values()
    return 100.0 * np.mean(c[..., 0], axis=-1)


def _pope(spec, examples, rows) -> Outcomes:
    root = spec["root"]
    labels = {c: read_jsonl(p) for c, p in pope.label_files(os.path.join(root, spec.get("annotation_dir", "coco"))).items()}
    position: dict[str, tuple[str, int]] = {}
    seen: collections.Counter[str] = collections.Counter()
    for q in read_jsonl(os.path.join(root, spec["question_file"])):
        c = str(q.get("category", ""))
        position[str(q["question_id"])] = (c, seen[c])  # labels pair with questions by position (pope.py)
        seen[c] += 1
    cols: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for ex in examples:
        c, i = position[str(ex.question_id)]
        if ex.key in rows and c in labels:
            cols[c].append((float(pope.parse_yes_no(rows[ex.key]["text"]) == "yes"), float(labels[c][i]["label"] == "yes")))
    columns = {c: np.asarray(v) for c, v in cols.items()}
    return Outcomes("pope", "f1", columns, _pope_statistic, sum(len(v) for v in columns.values()),
                    secondary={"accuracy": _pope_accuracy_statistic})


def _mme(spec, examples, rows) -> Outcomes:
    root = spec["root"]
    gt = mme.load_ground_truth(os.path.join(root, spec.get("gt_folder", "MME_Benchmark_release_version")))
    right: dict[tuple[str, str], int] = collections.defaultdict(int)
    for ex in examples:
        if ex.key in rows:
            row = rows[ex.key]
            _, truth = mme.lookup(gt, ex.question_id, row.get("prompt", ex.recorded_prompt))
            ok = mme.parse_yes_no(row["text"].replace("\n", " ").replace("\t", " ")) == truth.strip().lower()
            right[str(ex.question_id).split("/")[0], mme.gt_file(ex.question_id)] += ok
    groups_file = os.path.join(root, "subtasks.json")
    perception = read_json(groups_file)["Perception"] if os.path.isfile(groups_file) else mme.PERCEPTION
    cols: dict[str, list[list[float]]] = collections.defaultdict(list)
    for (subtask, _), n in right.items():
        cols[subtask].append([float(n)])
    columns = {s: np.asarray(v) for s, v in cols.items() if s in perception}
    return Outcomes("mme", "perception", columns, _mme_statistic(tuple(perception)),
                    2 * sum(len(v) for v in columns.values()))


def _scienceqa(spec, examples, rows) -> Outcomes:
    problems = read_json(os.path.join(spec["root"], "problems.json"))
    right = []
    for ex in examples:
        line = rows.get(ex.key)
        if line is not None and scienceqa.IMAGE_TAG in line.get("prompt", ""):  # img_accuracy's rule
            prob = problems[str(ex.question_id)]
            right.append([float(scienceqa.predicted_index(line["text"], len(prob["choices"])) == prob["answer"])])
    return Outcomes("scienceqa", "img_accuracy", {"": np.asarray(right).reshape(-1, 1)}, _mean_statistic, len(right))


def _vqav2(spec, examples, rows) -> Outcomes:
    if not spec.get("annotation_file"):
        raise ValueError("VQAv2 without an annotation_file (test-dev) has no local accuracy to put an interval on.")
    by_id = {str(a["question_id"]): a for a in read_json(os.path.join(spec["root"], spec["annotation_file"]))["annotations"]}
    acc = [[vqa.soft_accuracy(rows[ex.key]["text"], [x["answer"] for x in by_id[str(ex.question_id)]["answers"]])]
           for ex in examples if ex.key in rows]
    return Outcomes("vqav2", "accuracy", {"": np.asarray(acc).reshape(-1, 1)}, _mean_statistic, len(acc))


def _textvqa(spec, examples, rows) -> Outcomes:
    data = read_json(os.path.join(spec["root"], spec["annotation_file"]))["data"]
    table = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in data}
    acc = []
    for ex in examples:
        if ex.key in rows:
            key = (str(ex.question_id), vqa.textvqa_question(rows[ex.key].get("prompt", ex.recorded_prompt)))
            acc.append([vqa.soft_accuracy(rows[ex.key]["text"], table[key])])
    return Outcomes("textvqa", "accuracy", {"": np.asarray(acc).reshape(-1, 1)}, _mean_statistic, len(acc))


_EXTRACT = {"pope": _pope, "mme": _mme, "scienceqa": _scienceqa, "vqav2": _vqav2, "textvqa": _textvqa}
SUPPORTED = tuple(_EXTRACT)


def outcomes(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
             scored: Mapping[str, float] | None = None) -> Outcomes:
    """The units of ``spec``'s benchmark for the answered ``examples`` (``rows`` by key).

    ``scored``: the scorer's metrics for the same answers; the headline (and each secondary metric the scorer
    reports) recomputed from the units must equal the scorer's (else ValueError: the two disagree on what was
    scored).
    """
    kind = spec["kind"]
    if kind not in _EXTRACT:
        raise ValueError(f"no bootstrap for benchmark kind {kind!r}; supported: {', '.join(SUPPORTED)}.")
    out = _EXTRACT[kind](spec, examples, rows)
    if not out.questions:
        raise ValueError(f"{kind}: no answered question counts towards {out.headline}.")
    if scored is not None:
        for metric in [out.headline, *(m for m in out.secondary if m in scored)]:
            want, got = float(scored[metric]), out.value(metric)
            if not np.isclose(got, want, rtol=1e-9, atol=1e-9):
                raise ValueError(f"{kind}: the per-question outcomes give {metric}={got!r} but the scorer gave "
                                 f"{want!r}; they must score the same answers the same way.")
    return out


def bootstrap_interval(out: Outcomes, *, samples: int = 2000, seed: int = 0, level: float = 0.95,
                       chunk: int = 250, metric: str | None = None) -> tuple[float, float]:
    """Percentile interval of the headline (or the secondary ``metric``) over ``samples`` stratified bootstrap
    replicates."""
    statistic = out.statistic_for(metric)
    if samples < 1 or not 0 < level < 1:
        raise ValueError(f"need samples >= 1 and 0 < level < 1, got samples={samples}, level={level}.")
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        resampled = {s: c[rng.integers(0, len(c), size=(b, len(c)))] for s, c in out.columns.items()}
        values.append(np.broadcast_to(statistic(resampled), (b,)))
    v = np.concatenate(values)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))


__all__ = ["Outcomes", "SUPPORTED", "bootstrap_interval", "outcomes"]
