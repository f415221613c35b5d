"""GQA: exact-match accuracy after LLaVA's answer conversion.

Files: ``llava_gqa_testdev_balanced.jsonl`` (question_id, image, text) and the GQA questions file
``testdev_balanced_questions.json`` (``{question_id: {"answer": ..., ...}}``). LLaVA's converter turns an
answer into a prediction by removing trailing periods and lower-casing; the official GQA ``eval.py`` then
counts ``prediction == answer``. We also strip surrounding whitespace (generated answers can end in a
newline, which the converter would keep and the GQA scorer would count wrong). Accuracy in percent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json, require_file
from qtl_jax.eval.vqa import load_llava_questions


def normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    if not predictions or len(predictions) != len(answers):
        raise ValueError(f"GQA needs one prediction per answer; got {len(predictions)} and {len(answers)}.")
    return 100.0 * sum(normalize(p) == a.strip().lower() for p, a in zip(predictions, answers)) / len(answers)


def load(spec: Mapping[str, Any]) -> list[Example]:
    return load_llava_questions(spec)


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    path = require_file(os.path.join(spec["root"], spec.get("annotation_file", "testdev_balanced_questions.json")),
                        "GQA questions file")
    gold = read_json(path)
    missing = [ex.question_id for ex in examples if str(ex.question_id) not in gold]
    if missing:
        raise ValueError(f"{path} has no answer for question ids {missing[:3]} ({len(missing)} in all).")
    return {"accuracy": accuracy([rows[ex.key]["text"] for ex in examples],
                                 [gold[str(ex.question_id)]["answer"] for ex in examples])}
