"""POPE: per category (random / popular / adversarial) accuracy, precision, recall, F1 and yes-ratio.

The official scorer is LLaVA's ``llava/eval/eval_pope.py`` (TinyLLaVA Factory's
``tinyllava/eval/eval_pope.py`` is the same plus 1e-6 guards on the denominators).

Files (LLaVA's ``playground/data/eval/pope``): ``llava_pope_test.jsonl`` (``question_id``, ``image``,
``text``, ``category``) and POPE's label files ``coco/coco_pope_<category>.json``: JSON lines despite
the name (``question_id``, ``image``, ``text``, ``label`` yes|no), numbered 1..n in each file, while the
question file numbers each category from its own offset (adversarial 1, random 10000001, popular
20000001). So a label belongs to a question by *position*: line i of ``coco_pope_<c>.json`` labels the
i-th question of category c. The official script zips the labels with that category's answers in
answer-file order; we pair each label with the question at the same position of the question file and
look its answer up by question id, which is the same pairing for every answer file written in question
order (``model_vqa_loader.py`` and ours) and stays right for answer files in another order or for a
subset of the questions (``max_examples``). Where a label row and its question both name an image and
the images differ, the files do not belong together (e.g. POPE's current ``coco_pope_random.json`` has
3000 rows, LLaVA's question file was built from the older 2910-row one) and scoring stops with an error;
the official script would silently misalign them.

Answer parsing: cut everything from the first ``.``, remove ``,``, split on single spaces; the answer is
"no" when one of the words is exactly ``No``, ``not`` or ``no``, else "yes" (so ``NO``, ``Not really``
and ``No!`` are yes). Positive class = yes. Where a denominator is 0 (no answer is yes: TP+FP = 0) the
metric is 0: LLaVA's script raises ZeroDivisionError there and TinyLLaVA Factory's prints 0; elsewhere
our values are the exact fractions (TinyLLaVA Factory's guards lower them by at most about 2e-4 points).

Reported per category as ``<category>/<metric>`` (accuracy, precision, recall, f1, yes_ratio in percent;
``<category>/count``) and averaged over the scored categories as ``accuracy`` and ``f1``. The categories
are those with a ``coco_pope_<category>.json`` file; questions of other categories are not scored (as the
official script, which loops over the label files).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_jsonl, require_file

LABEL_PREFIX, LABEL_SUFFIX = "coco_pope_", ".json"


def parse_yes_no(text: str) -> str:
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def split_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Metrics (percent) of raw answers against 'yes'/'no' labels, paired in order."""
    if len(answers) != len(labels) or not answers:
        raise ValueError(f"POPE needs one answer per label and at least one; got {len(answers)} and {len(labels)}.")
    bad = sorted({lab for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', found {bad}.")
    preds = [parse_yes_no(a) == "yes" for a in answers]
    gold = [lab == "yes" for lab in labels]
    tp = sum(p and g for p, g in zip(preds, gold))
    fp = sum(p and not g for p, g in zip(preds, gold))
    tn = sum(not p and not g for p, g in zip(preds, gold))
    fn = sum(not p and g for p, g in zip(preds, gold))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"accuracy": 100.0 * (tp + tn) / len(preds), "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * sum(preds) / len(preds), "count": float(len(preds))}


def label_files(ann_dir: str) -> dict[str, str]:
    """``category -> path`` of the ``coco_pope_<category>.json`` files in ``ann_dir``."""
    if not os.path.isdir(ann_dir):
        raise FileNotFoundError(f"POPE label folder {ann_dir} does not exist; set the benchmark's annotation_dir.")
    return {name[len(LABEL_PREFIX):-len(LABEL_SUFFIX)]: os.path.join(ann_dir, name)
            for name in sorted(os.listdir(ann_dir)) if name.startswith(LABEL_PREFIX) and name.endswith(LABEL_SUFFIX)}


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    root = spec["root"]
    qpath = require_file(os.path.join(root, spec["question_file"]), "POPE question file")
    ann_dir = os.path.join(root, spec.get("annotation_dir", "coco"))
    files = label_files(ann_dir)
    if not files:
        raise FileNotFoundError(f"no {LABEL_PREFIX}<category>{LABEL_SUFFIX} label files in {ann_dir}.")
    # Position of every question within its category, in question-file order.
    where: dict[str, tuple[str, int, Mapping[str, Any]]] = {}
    counts: collections.Counter[str] = collections.Counter()
    for q in read_jsonl(qpath):
        c = str(q.get("category", ""))
        where[str(q["question_id"])] = (c, counts[c], q)
        counts[c] += 1
    pairs: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    labels = {c: read_jsonl(p) for c, p in files.items()}
    for ex in examples:
        if ex.key not in rows:
            continue  # not answered (score_only on a partial file): not scored, as the official script
        c, i, q = where[str(ex.question_id)]
        if c not in labels:
            continue
        if i >= len(labels[c]):
            raise ValueError(f"{files[c]} has {len(labels[c])} labels but {qpath} has at least {i + 1} questions of "
                             f"category {c!r}; the label file does not belong to this question file.")
        lab = labels[c][i]
        if "image" in lab and "image" in q and lab["image"] != q["image"]:
            raise ValueError(f"line {i + 1} of {files[c]} labels image {lab['image']!r} but the question at that "
                             f"position of category {c!r} in {qpath} shows {q['image']!r}; the label file does not "
                             "belong to this question file (labels pair with questions by position).")
        pairs[c].append((rows[ex.key]["text"], lab["label"]))
    if not pairs:
        raise ValueError(f"none of the answered POPE questions has a category with a label file in {ann_dir} "
                         f"(label files for {sorted(files)}).")
    out: dict[str, float] = {}
    for c, items in pairs.items():
        m = split_metrics([a for a, _ in items], [lab for _, lab in items])
        out.update({f"{c}/{k}": v for k, v in m.items()})
    out["accuracy"] = sum(out[f"{c}/accuracy"] for c in pairs) / len(pairs)
    out["f1"] = sum(out[f"{c}/f1"] for c in pairs) / len(pairs)
    return out
