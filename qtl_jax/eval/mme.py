"""MME: per-subtask accuracy and accuracy+, perception and cognition totals (the official calculation).

Files (MME release + LLaVA question file): ``llava_mme.jsonl`` rows ``{question_id: "<subtask>/<image>",
image, text, category}`` (two questions per image, so answers are keyed by question_id *and* text) and the
ground truth under ``MME_Benchmark_release_version/<subtask>/``: ``<stem>.txt`` next to the image, or
``questions_answers_YN/<stem>.txt`` when the subtask keeps its images in ``images/``; each line
``question<TAB>Yes|No``. The question is the prompt without LLaVA's "Answer the question using a single
word or phrase." line, as LLaVA's converter does.

Rules (``eval_tool/calculation.py``): an answer is lower-cased; exactly "yes"/"no" is itself, otherwise
"yes" in its first 4 characters gives yes, else "no" in them gives no, else "other" (always wrong).
Per subtask: acc = right answers / questions; acc+ = images whose two answers are both right / images;
score = 100·acc + 100·acc+ (max 200). Perception = sum of the perception subtasks' scores (max 2000 for
the 10 official ones), cognition = sum over cognition subtasks (max 800). Subtasks are grouped by the
official names, or by ``subtasks.json`` (``{"Perception": [...], "Cognition": [...]}``) when the release
folder's parent has one; only the subtasks present are scored.

The runner also writes ``mme_results/<subtask>.txt`` (``image<TAB>question<TAB>gt<TAB>answer``), the
layout the official ``calculation.py --results_dir`` reads.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json
from qtl_jax.eval.vqa import load_llava_questions

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def parse_yes_no(text: str) -> str:
    """'yes', 'no' or 'other' by the official rule (module docstring)."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def subtask_scores(rows: Sequence[tuple[str, str, str, str]]) -> dict[str, float]:
    """``rows``: (image, question, ground truth, answer) of one subtask -> acc, acc_plus (%), score."""
    if not rows:
        raise ValueError("an MME subtask with no questions cannot be scored.")
    per_image: dict[str, list[bool]] = collections.defaultdict(list)
    right = 0
    for image, _, gt, answer in rows:
        ok = parse_yes_no(answer) == gt.strip().lower()
        right += ok
        per_image[image].append(ok)
    bad = {k: len(v) for k, v in per_image.items() if len(v) != 2}
    if bad:
        raise ValueError(f"MME pairs two questions per image; these images have {bad} (first 3: "
                         f"{dict(list(bad.items())[:3])}).")
    acc = right / len(rows)
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": 100.0 * acc, "acc_plus": 100.0 * acc_plus, "score": 100.0 * (acc + acc_plus)}


def totals(per_subtask: Mapping[str, Mapping[str, float]],
           groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """``perception`` and ``cognition``: sums of the subtask scores of each group that are present."""
    groups = groups or {"Perception": PERCEPTION, "Cognition": COGNITION}
    unknown = set(per_subtask) - {s for g in groups.values() for s in g}
    if unknown:
        raise ValueError(f"MME subtasks {sorted(unknown)} are in neither group {dict(groups)}.")
    return {name.lower(): sum(per_subtask[s]["score"] for s in members if s in per_subtask)
            for name, members in groups.items()}


def question_of(prompt: str) -> str:
    """The ground-truth file's question for a LLaVA MME prompt."""
    q = prompt.replace(SHORT_ANSWER, "").strip()
    if YES_NO not in q:
        q = f"{q} {YES_NO}"
    return q


def _gt_dir(release: str, subtask: str) -> str:
    base = os.path.join(release, subtask)
    qa = os.path.join(base, "questions_answers_YN")
    return qa if os.path.isdir(os.path.join(base, "images")) and os.path.isdir(qa) else base


def load_ground_truth(release: str) -> dict[tuple[str, str, str], str]:
    """``(subtask, image stem, question) -> 'Yes'|'No'`` from the release folder's .txt files."""
    if not os.path.isdir(release):
        raise FileNotFoundError(f"MME release folder {release} does not exist; set the benchmark's gt_folder.")
    gt = {}
    for subtask in sorted(os.listdir(release)):
        if not os.path.isdir(os.path.join(release, subtask)):
            continue
        folder = _gt_dir(release, subtask)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        question, answer = line.rstrip("\n").split("\t")
                        gt[(subtask, name[:-4], question)] = answer
    return gt


def load(spec: Mapping[str, Any]) -> list[Example]:
    return load_llava_questions(spec, key_fn=lambda row: f"{row['question_id']}|{row['text']}")


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    root = spec["root"]
    release = os.path.join(root, spec.get("gt_folder", "MME_Benchmark_release_version"))
    gt = load_ground_truth(release)
    by_subtask: dict[str, list[tuple[str, str, str, str]]] = collections.defaultdict(list)
    for ex in examples:
        subtask, image = str(ex.question_id).split("/", 1)
        image = os.path.basename(image)
        question = question_of(ex.prompt)
        k = (subtask, os.path.splitext(image)[0], question)
        if k not in gt:
            raise ValueError(f"MME: no ground truth for {k} in {release}.")
        answer = rows[ex.key]["text"].replace("\n", " ").replace("\t", " ")
        by_subtask[subtask].append((image, question, gt[k], answer))
    results = os.path.join(out_dir, "mme_results")
    os.makedirs(results, exist_ok=True)
    for subtask, items in by_subtask.items():
        with open(os.path.join(results, f"{subtask}.txt"), "w", encoding="utf-8") as f:
            f.writelines("\t".join(item) + "\n" for item in items)
    per = {s: subtask_scores(items) for s, items in by_subtask.items()}
    groups_file = os.path.join(root, "subtasks.json")
    groups = read_json(groups_file) if os.path.isfile(groups_file) else None
    out = totals(per, groups)
    for s, m in sorted(per.items()):
        out.update({f"{s}/{k}": v for k, v in m.items()})
    return out
