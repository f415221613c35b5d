"""MME: per-subtask accuracy and accuracy+, perception and cognition totals (the official calculation).

Official scripts: LLaVA's ``playground/data/eval/MME/convert_answer_to_mme.py`` (shipped in LLaVA's
eval.zip; turns an answer file into MME's results files) and MME's ``eval_tool/calculation.py`` (scores
them).

Files (``playground/data/eval/MME``): ``llava_mme.jsonl`` rows ``{question_id: "<subtask>/<image>",
image, text, category}`` (two questions per image, so answers are keyed by question_id *and* prompt)
and the release folder ``MME_Benchmark_release_version/<subtask>/``: ground truth in ``<stem>.txt`` next
to the image, or in ``questions_answers_YN/<stem>.txt`` when the subtask has an ``images/`` folder; each
line ``question<TAB>Yes|No`` (stripped of surrounding whitespace, as the converter reads it).

Lookup (the converter): subtask = the question id up to the first ``/``; ground-truth file = the id's
last path part up to its *first* ``.``, plus ``.txt``; question = the recorded prompt with LLaVA's
"Answer the question using a single word or phrase." removed and stripped, plus " Please answer yes or
no." when it does not contain that sentence; when that question is not in the ground truth, the same with
two spaces before "Please" (some MME questions have the double space).

Scoring (``calculation.py``): an answer is lower-cased; exactly "yes"/"no" is itself, otherwise "yes" in
its first 4 characters gives yes, else "no" in them gives no, else "other" (always wrong). Per subtask:
acc = right answers / questions; acc+ = images whose two answers are both right / images; score = 100·acc
+ 100·acc+ (max 200). Perception = sum of the perception subtasks' scores (max 2000 for the 10 official
ones), cognition = sum over cognition subtasks (max 800). Subtasks are grouped by the official names, or
by ``subtasks.json`` (``{"Perception": [...], "Cognition": [...]}``) when the benchmark root has one; only
the subtasks present are scored.

The scorer also writes ``mme_results/<subtask>.txt`` (``<stem>.txt<TAB>question<TAB>gt<TAB>answer``),
what the converter writes and ``calculation.py --results_dir`` reads.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json

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
    """The ground-truth question for a recorded LLaVA MME prompt (single-space form; module docstring)."""
    q = prompt.replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in prompt else prompt
    return q if YES_NO in q else f"{q} {YES_NO}"


def gt_file(question_id: str) -> str:
    """The ground-truth .txt name of a question id ``<subtask>/<image>`` (stem up to the first '.')."""
    return str(question_id).split("/")[-1].split(".")[0] + ".txt"


def lookup(gt: Mapping[tuple[str, str, str], str], question_id: str, prompt: str) -> tuple[str, str]:
    """``(question, 'Yes'|'No')`` of one answer, with the converter's double-space retry."""
    subtask, file = str(question_id).split("/")[0], gt_file(question_id)
    q = question_of(prompt)
    if (subtask, file, q) not in gt and YES_NO not in prompt.replace(SHORT_ANSWER, ""):
        q = q.replace(f" {YES_NO}", f"  {YES_NO}")
    if (subtask, file, q) not in gt:
        raise KeyError(f"MME: no ground truth for subtask {subtask!r}, file {file!r}, question {q!r}.")
    return q, gt[subtask, file, q]


def _gt_dir(release: str, subtask: str) -> str:
    base = os.path.join(release, subtask)
    if not os.path.isdir(os.path.join(base, "images")):
        return base
    qa = os.path.join(base, "questions_answers_YN")
    if not os.path.isdir(qa):
        raise FileNotFoundError(f"MME subtask {subtask!r} keeps its images in images/ but has no "
                                f"questions_answers_YN/ folder beside it ({qa}).")
    return qa


def load_ground_truth(release: str) -> dict[tuple[str, str, str], str]:
    """``(subtask, <stem>.txt, question) -> 'Yes'|'No'`` from the release folder's .txt files."""
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
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{os.path.join(folder, name)}:{n} is not 'question<TAB>Yes|No'.")
                    gt[(subtask, name, parts[0])] = parts[1]
    return gt


def score(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
          out_dir: str) -> dict[str, float]:
    root = spec["root"]
    release = os.path.join(root, spec.get("gt_folder", "MME_Benchmark_release_version"))
    gt = load_ground_truth(release)
    by_subtask: dict[str, list[tuple[str, str, str, str]]] = collections.defaultdict(list)
    for ex in examples:
        if ex.key not in rows:
            continue  # not answered (score_only on a partial file); the pair check below catches half pairs
        row = rows[ex.key]
        question, truth = lookup(gt, ex.question_id, row.get("prompt", ex.recorded_prompt))
        # A tab or newline in an answer would break the results file's columns.
        answer = row["text"].replace("\n", " ").replace("\t", " ")
        by_subtask[str(ex.question_id).split("/")[0]].append((gt_file(ex.question_id), question, truth, answer))
    if not by_subtask:
        raise ValueError("MME: no answered question to score.")
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
