"""Answer files for the benchmarks graded outside this repository (MM-Vet, MMMU).

MM-Vet (GPT-4 graded; ``mm-vet_evaluator``): question file ``llava-mm-vet.jsonl`` (question_id, image,
text). Output ``mmvet_results.json``: one JSON object ``{"v1_<question_id>": "<answer>", ...}``, what
LLaVA's ``convert_mmvet_for_eval.py`` produces and the MM-Vet grader takes as its results file.

MMMU (``main_eval_only.py`` of the MMMU repository): LLaVA-style question jsonl (question_id such as
``validation_Art_1``, image, text). Output ``mmmu_results.json``: ``{"<question_id>": "<answer>"}``, the
``--output_path`` file of ``main_eval_only.py``. For multiple-choice questions the grader compares the
value with the gold option letter, so the letter is taken from answers of the forms "A", "A.", "(A)",
"A. text" (``option_letter``); other answers are exported unchanged (open questions, or a choice the
grader will count wrong).

Both report only ``answered`` (the number of answers written) in metrics.json.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example

_LETTER = re.compile(r"^\(?([A-I])\)?(?:[.:)]|\s|$)")


def option_letter(text: str) -> str | None:
    m = _LETTER.match(text.strip())
    return m.group(1) if m else None


def mmvet_results(examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {f"v1_{ex.question_id}": rows[ex.key]["text"] for ex in examples if ex.key in rows}


def mmmu_results(examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    texts = {str(ex.question_id): rows[ex.key]["text"] for ex in examples if ex.key in rows}
    return {qid: option_letter(text) or text for qid, text in texts.items()}


def score_mmvet(spec, examples, rows, out_dir: str) -> dict[str, float]:
    results = mmvet_results(examples, rows)
    with open(os.path.join(out_dir, "mmvet_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return {"answered": float(len(results))}


def score_mmmu(spec, examples, rows, out_dir: str) -> dict[str, float]:
    results = mmmu_results(examples, rows)
    with open(os.path.join(out_dir, "mmmu_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return {"answered": float(len(results))}
