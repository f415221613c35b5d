"""VQAv2 and TextVQA: VQA soft accuracy with the EvalAI answer normalisation (the m4c evaluator's rules).

Normalisation of an answer (both the prediction and each of the ten human answers), in the official
order: lower-case, drop ``,`` and ``?``, split off ``'s``; newlines/tabs to spaces; punctuation (each of
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it touches a space or when the text has a
digit-comma-digit run, otherwise replaced by a space); periods not followed by a digit removed (at most
32: the official call passes ``re.UNICODE`` (= 32) as the *count*, reproduced on purpose); number words
zero..ten and "none" to digits; articles a/an/the dropped; unapostrophised contractions restored
(``dont`` -> ``don't``).

Soft accuracy of a prediction against ten human answers: for each of the ten leave-one-out subsets of
nine, ``min(1, #matches in the subset / 3)``; the score is the mean over the ten subsets. A benchmark's
accuracy is the mean score over questions, reported in percent.

Files (LLaVA eval kit layout; names configurable):
  VQAv2: ``llava_vqav2_mscoco_test-dev2015.jsonl`` (question_id, image, text) and, for a local score, a
    VQA-format ``annotations`` file (``{"annotations": [{"question_id", "answers": [{"answer"}] x 10}]}``).
    test-dev has no public answers, so the runner also writes the EvalAI submission file
    ``vqav2_submission.json`` (``[{"question_id": int, "answer": normalised text}]``, as LLaVA's converter).
  TextVQA: ``llava_textvqa_val_v051_ocr.jsonl`` (question_id = image id; the prompt may carry OCR tokens)
    and ``TextVQA_0.5.1_val.json`` (``{"data": [{"image_id", "question", "answers": [10]}]}``); answers
    are matched by (image id, lower-cased question extracted from the prompt), as ``eval_textvqa.py``.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.eval.answers import Example, read_json, read_jsonl, require_file

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32  # the official sub(..., re.UNICODE) passes 32 as count
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Contracted forms whose apostrophe-less spellings the official table restores. Each form maps from every
# spelling with exactly one of its apostrophes removed (or all, for single-apostrophe forms). The capital
# "I" forms are kept as in the official table, where they can never match (matching runs on lower case).
_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "I'd've", "I'm",
    "I've", "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've",
    "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
    "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's",
    "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've",
    "you'll", "you're", "you've",
)


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTED:
        positions = [i for i, ch in enumerate(form) if ch == "'"]
        if len(positions) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in positions:
                table[form[:i] + form[i + 1:]] = form
    # The official table also maps "somebody'd" to "somebodyd" (an inverted entry); kept for identical scores.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def _punctuation(text: str) -> str:
    out = text
    digit_commas = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if (touches_space or digit_commas) else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The EvalAI / m4c answer normalisation (module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def soft_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
    if len(human_answers) != 10:
        raise ValueError(f"VQA soft accuracy needs exactly 10 human answers, got {len(human_answers)}.")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in human_answers]
    matches = sum(g == pred for g in gts)
    # Leaving out annotator i removes one match exactly when annotator i agreed with the prediction.
    total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


def accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean soft accuracy in percent."""
    if not predictions:
        raise ValueError("no predictions to score.")
    return 100.0 * sum(soft_accuracy(p, h) for p, h in zip(predictions, human_answers, strict=True)) / len(predictions)


# ------------------------------------------------------------------------------------------ readers


def load_llava_questions(spec: Mapping[str, Any], key_fn=None) -> list[Example]:
    """A LLaVA question jsonl (question_id, image, text) -> examples; images under ``image_folder``."""
    root = spec["root"]
    path = require_file(os.path.join(root, spec["question_file"]), f"{spec['kind']} question file")
    images = os.path.join(root, spec.get("image_folder", ""))
    out = []
    for row in read_jsonl(path):
        key = key_fn(row) if key_fn else str(row["question_id"])
        image = os.path.join(images, row["image"]) if row.get("image") else None
        out.append(Example(key=key, question_id=row["question_id"], prompt=row["text"], image=image))
    keys = collections.Counter(ex.key for ex in out)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ValueError(f"{path}: question ids {dup[:3]} repeat; every question needs its own id.")
    return out


def load(spec: Mapping[str, Any]) -> list[Example]:
    return load_llava_questions(spec)


def score_vqav2(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
                out_dir: str) -> dict[str, float]:
    """Writes the EvalAI submission; scores locally when ``annotation_file`` is set (VQA format)."""
    submission = [{"question_id": _int_or_str(ex.question_id), "answer": normalize_answer(rows[ex.key]["text"])}
                  for ex in examples]
    with open(os.path.join(out_dir, "vqav2_submission.json"), "w", encoding="utf-8") as f:
        json.dump(submission, f)
    if not spec.get("annotation_file"):
        return {"answered": float(len(examples))}
    path = require_file(os.path.join(spec["root"], spec["annotation_file"]), "VQAv2 annotations")
    by_id = {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in read_json(path)["annotations"]}
    missing = [ex.question_id for ex in examples if str(ex.question_id) not in by_id]
    if missing:
        raise ValueError(f"{path} has no annotation for question ids {missing[:3]} ({len(missing)} in all).")
    preds = [rows[ex.key]["text"] for ex in examples]
    return {"accuracy": accuracy(preds, [by_id[str(ex.question_id)] for ex in examples])}


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt (drops OCR-token lines and the answer-format suffix)."""
    lines = [ln for ln in prompt.split("\n") if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("OCR tokens:", "Reference OCR token:"))]
    if not lines:
        raise ValueError(f"no question in TextVQA prompt {prompt!r}.")
    return lines[0].strip().lower()


def score_textvqa(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
                  out_dir: str) -> dict[str, float]:
    path = require_file(os.path.join(spec["root"], spec["annotation_file"]), "TextVQA annotations")
    table = {(str(a["image_id"]), a["question"].strip().lower()): a["answers"] for a in read_json(path)["data"]}
    preds, gts = [], []
    for ex in examples:
        k = (str(ex.question_id), textvqa_question(ex.prompt))
        if k not in table:
            raise ValueError(f"{path} has no annotation for image {k[0]!r} and question {k[1]!r}.")
        preds.append(rows[ex.key]["text"])
        gts.append(table[k])
    return {"accuracy": accuracy(preds, gts)}


def _int_or_str(v: Any) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        return v
