"""GQA: accuracy over the balanced questions, split into binary and open questions (the official eval.py).

Official scripts: LLaVA's ``scripts/convert_gqa_for_eval.py`` (answer -> prediction) and GQA's
``eval.py`` (the evaluation script distributed with the GQA data, run by LLaVA's
``scripts/v1_5/eval/gqa.sh`` as ``eval/eval.py --tier testdev_balanced``).

Files (``playground/data/eval/gqa``): ``llava_gqa_testdev_balanced.jsonl`` (question_id, image, text) and
GQA's ``data/testdev_balanced_questions.json`` (``{question_id: {"answer", "isBalanced", "types":
{"structural", ...}, ...}}``).

Rules: the prediction is the answer with trailing periods removed, lower-cased (the converter; nothing
else is stripped); a question is right when the prediction equals its ``answer`` exactly. Only questions
with ``isBalanced`` true are scored. ``accuracy`` is over them; ``binary`` over those whose structural
type is not ``query``, ``open`` over those whose structural type is ``query`` (percent; 0 where a group is
empty, as the official ``avg``). The scorer also writes ``testdev_balanced_predictions.json``
(``[{"questionId", "prediction"}]``), the converter's output that ``eval.py`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json, require_file


def prediction(text: str) -> str:
    return text.rstrip(".").lower()


def answer_type(question: Mapping[str, Any]) -> str:
    return "open" if question["types"]["structural"] == "query" else "binary"


def accuracy(predictions: Mapping[str, str], questions: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``predictions``: question id -> prediction; ``questions``: the GQA questions of those ids."""
    scores: dict[str, list[float]] = {"accuracy": [], "binary": [], "open": []}
    for qid, pred in predictions.items():
        q = questions[qid]
        if not q["isBalanced"]:
            continue
        right = float(pred == q["answer"])
        scores["accuracy"].append(right)
        scores[answer_type(q)].append(right)
    out = {k: 100.0 * sum(v) / len(v) if v else 0.0 for k, v in scores.items()}
    out["count"] = float(len(scores["accuracy"]))
    return out


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    path = require_file(os.path.join(spec["root"], spec.get("annotation_file", "testdev_balanced_questions.json")),
                        "GQA questions file")
    questions = read_json(path)
    preds = {str(ex.question_id): prediction(rows[ex.key]["text"]) for ex in examples if ex.key in rows}
    missing = [q for q in preds if q not in questions]
    if missing:
        raise ValueError(f"{path} has no question for ids {missing[:3]} ({len(missing)} in all).")
    bad = [q for q in preds if "isBalanced" not in questions[q] or "structural" not in questions[q].get("types", {})]
    if bad:
        raise ValueError(f"{path}: questions {bad[:3]} lack 'isBalanced' or 'types.structural'; use GQA's "
                         "questions file (e.g. testdev_balanced_questions.json).")
    with open(os.path.join(out_dir, "testdev_balanced_predictions.json"), "w", encoding="utf-8") as f:
        json.dump([{"questionId": q, "prediction": p} for q, p in preds.items()], f)
    if not preds:
        raise ValueError("GQA: no answered question to score.")
    return accuracy(preds, questions)
