"""ScienceQA-IMG: option-letter parsing and accuracy (LLaVA's ``llava/eval/eval_science_qa.py``).

Files (``playground/data/eval/scienceqa``): ``llava_test_CQM-A.json`` (LLaVA conversations: ``id``,
optional ``image``, the human turn with the context, question and lettered options),
``problems.json`` (pid -> choices, answer index, image) and ``pid_splits.json`` (``{"test": [pids]}``),
images under ``images/test/<pid>/``. As ``llava/eval/model_vqa_science.py --single-pred-prompt``, the
prompt gets "Answer with the option's letter from the given choices directly." appended, and the answer
file records the prompt with ``<image>`` and a newline in front for rows that have an ``image`` key.

Parsing an answer to an option: the whole answer is a letter A-E; or it starts with "<letter>. "; or it
contains exactly one "The answer is <capital letter>" followed by any character; otherwise it FAILS. A
letter beyond the problem's number of choices, a failed parse and a problem without an answer are all
wrong. The official script marks these -1 (its random-guess fallback is dead code after a ``return -1``);
we do the same, so no score depends on a random draw.

Metrics (percent): ``accuracy`` over every problem of the split that was asked (all of them, unless
``max_examples`` subsampled the question file), unanswered ones counting as wrong; ``img_accuracy`` over
the *answered* problems whose answer line's prompt contains ``<image>`` (the official rule: an unanswered
problem has no prompt, so it counts in ``accuracy`` but never in ``img_accuracy``). ``count`` and
``img_count`` are the two denominators; with no image question ``img_accuracy`` is 0 (the official script
divides by zero).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json, require_file

OPTIONS = ("A", "B", "C", "D", "E")
OPTION_PROMPT = "Answer with the option's letter from the given choices directly."
IMAGE_TAG = "<image>"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_option(text: str) -> str:
    """The option letter an answer names, or 'FAILED'."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def predicted_index(text: str, num_choices: int) -> int:
    """Index of the chosen option, or -1 (failed parse or a letter past the last choice)."""
    letter = parse_option(text)
    return OPTIONS.index(letter) if letter in OPTIONS[:num_choices] else -1


def load(spec: Mapping[str, Any]) -> list[Example]:
    root = spec["root"]
    path = require_file(os.path.join(root, spec.get("question_file", "llava_test_CQM-A.json")),
                        "ScienceQA question file")
    images = os.path.join(root, spec.get("image_folder", "images/test"))
    out = []
    for row in read_json(path):
        text = row["conversations"][0]["value"].replace(IMAGE_TAG, "").strip()
        record = f"{IMAGE_TAG}\n{text}" if "image" in row else text
        if spec.get("single_pred_prompt", True):
            text, record = f"{text}\n{OPTION_PROMPT}", f"{record}\n{OPTION_PROMPT}"
        image = os.path.join(images, row["image"]) if "image" in row else None
        out.append(Example(key=str(row["id"]), question_id=row["id"], prompt=text, image=image, record=record))
    return out


def accuracy(problems: Mapping[str, Mapping[str, Any]], split: Sequence[str],
             answers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``answers``: pid -> answer line (``text``, ``prompt``); a missing pid is a failed, non-image answer."""
    if not split:
        raise ValueError("the ScienceQA split is empty.")
    right = img_right = img_total = 0
    for pid in split:
        prob = problems[pid]
        line = answers.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        ok = predicted_index(line["text"], len(prob["choices"])) == prob["answer"]
        right += ok
        if IMAGE_TAG in line.get("prompt", ""):
            img_total += 1
            img_right += ok
    return {"accuracy": 100.0 * right / len(split), "count": float(len(split)),
            "img_accuracy": 100.0 * img_right / img_total if img_total else 0.0, "img_count": float(img_total)}


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    root = spec["root"]
    problems = read_json(require_file(os.path.join(root, "problems.json"), "ScienceQA problems.json"))
    split = read_json(require_file(os.path.join(root, "pid_splits.json"), "ScienceQA pid_splits.json"))
    asked = {str(ex.question_id) for ex in examples}
    answers = {str(ex.question_id): rows[ex.key] for ex in examples if ex.key in rows}
    # Only the problems asked count (max_examples may have subsampled the question file).
    return accuracy(problems, [pid for pid in split[spec.get("split", "test")] if pid in asked], answers)
