"""ScienceQA-IMG: option-letter parsing and accuracy (LLaVA's ``eval_science_qa.py`` rules).

Files: ``llava_test_CQM-A.json`` (LLaVA conversations: ``id``, optional ``image``, the human turn with the
context, question and lettered options), ``problems.json`` (pid -> choices, answer index, image) and
``pid_splits.json`` (``{"test": [pids]}``), images under ``images/test/<pid>/``. As ``--single-pred-prompt``,
the prompt gets "Answer with the option's letter from the given choices directly." appended.

Parsing an answer to an option: the whole answer is a letter A-E; or it starts with "<letter>. "; or it
contains exactly one "The answer is <capital letter>" followed by any character; otherwise it FAILS. A
letter beyond the problem's number of choices, a failed parse and a problem without an answer are all
wrong. The official script marks these -1 (its random-guess fallback is dead code after a ``return -1``);
we do the same, so no score depends on a random draw.

Metrics (percent): ``accuracy`` over every problem of the split and ``img_accuracy`` over the problems
that have an image (the official script reads "<image>" in the stored prompt; we read the problem's
``image`` field, which marks the same problems).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json, require_file

OPTIONS = ("A", "B", "C", "D", "E")
OPTION_PROMPT = "Answer with the option's letter from the given choices directly."
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
        text = row["conversations"][0]["value"].replace("<image>", "").strip()
        if spec.get("single_pred_prompt", True):
            text = f"{text}\n{OPTION_PROMPT}"
        image = os.path.join(images, row["image"]) if row.get("image") else None
        out.append(Example(key=str(row["id"]), question_id=str(row["id"]), prompt=text, image=image))
    return out


def accuracy(problems: Mapping[str, Mapping[str, Any]], split: Sequence[str],
             answers: Mapping[str, str]) -> dict[str, float]:
    """``answers``: pid -> raw answer text (missing pids count as failed)."""
    if not split:
        raise ValueError("the ScienceQA split is empty.")
    right = img_right = img_total = 0
    for pid in split:
        prob = problems[pid]
        ok = predicted_index(answers.get(pid, "FAILED"), len(prob["choices"])) == prob["answer"]
        right += ok
        if prob.get("image"):
            img_total += 1
            img_right += ok
    out = {"accuracy": 100.0 * right / len(split), "count": float(len(split))}
    out["img_accuracy"] = 100.0 * img_right / img_total if img_total else 0.0
    out["img_count"] = float(img_total)
    return out


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    root = spec["root"]
    problems = read_json(require_file(os.path.join(root, "problems.json"), "ScienceQA problems.json"))
    split = read_json(require_file(os.path.join(root, "pid_splits.json"), "ScienceQA pid_splits.json"))
    answers = {str(ex.question_id): rows[ex.key]["text"] for ex in examples}
    # Only the problems asked count (max_examples may have subsampled the question file).
    split = [pid for pid in split[spec.get("split", "test")] if pid in answers]
    return accuracy(problems, split, answers)
