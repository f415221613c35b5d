"""POPE: per split (random / popular / adversarial) accuracy, precision, recall, F1 and yes-ratio.

Files: ``llava_pope_test.jsonl`` (question_id, image, text, category = split) and the label files
``<annotation_dir>/coco_pope_<split>.json`` (jsonl: question_id, label yes|no), one per split present.

Answer parsing (``eval_pope.py``): keep the text before the first ".", drop commas, split on spaces; the
answer is "no" if one of the words is exactly "No", "no" or "not", otherwise "yes" (so an empty or
unrelated answer counts as yes). Positive class = yes. Precision, recall and F1 are 0 where their
denominator is 0 (the official adds 1e-6 to denominators instead, a < 1e-5 difference). Answers are matched
to labels by question_id (the official zips them in file order, which is the same pairing for files
written in order); labels of questions that were not asked (``max_examples``) are left out. Reported per split as ``<split>/<metric>`` (accuracy, precision, recall, f1 and
yes_ratio in percent) and averaged over splits as ``accuracy`` and ``f1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_jsonl, require_file
from qtl_jax.eval.vqa import load_llava_questions

SPLITS = ("random", "popular", "adversarial")


def parse_yes_no(text: str) -> str:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def split_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Metrics (percent) of raw answers against 'yes'/'no' labels."""
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
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / len(preds), "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * sum(preds) / len(preds)}


def load(spec: Mapping[str, Any]) -> list[Example]:
    return load_llava_questions(spec)


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    ann_dir = os.path.join(spec["root"], spec.get("annotation_dir", "coco"))
    by_id = {str(ex.question_id): ex for ex in examples}
    out: dict[str, float] = {}
    found = []
    for split in SPLITS:
        path = os.path.join(ann_dir, f"coco_pope_{split}.json")
        if not os.path.isfile(path):
            continue
        # Only the questions asked count (max_examples may have subsampled the question file).
        labels = [r for r in read_jsonl(path) if str(r["question_id"]) in by_id]
        if not labels:
            continue
        answers = [rows[by_id[str(r["question_id"])].key]["text"] for r in labels]
        m = split_metrics(answers, [r["label"] for r in labels])
        out.update({f"{split}/{k}": v for k, v in m.items()})
        found.append(split)
    if not found:
        require_file(os.path.join(ann_dir, "coco_pope_random.json"), "POPE label files (coco_pope_<split>.json)")
        raise ValueError(f"none of the asked POPE questions has a label in {ann_dir}/coco_pope_<split>.json.")
    out["accuracy"] = sum(out[f"{s}/accuracy"] for s in found) / len(found)
    out["f1"] = sum(out[f"{s}/f1"] for s in found) / len(found)
    return out
