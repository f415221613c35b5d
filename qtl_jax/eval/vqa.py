"""VQAv2 and TextVQA: VQA soft accuracy, with the m4c (EvalAI) answer processor and the official VQA tool.

Official scripts: LLaVA's ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``,
``TextVQAAccuracyEvaluator``), ``llava/eval/eval_textvqa.py``, ``scripts/convert_vqav2_for_submission.py``,
and the VQA evaluation ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (GT-Vision-Lab/VQA), which
EvalAI runs on a VQAv2 submission.

m4c normalisation of an answer (both the prediction and each of the ten human answers), in the official
order: lower-case, drop ``,`` and ``?``, split off ``'s``; newlines/tabs to spaces; punctuation (each of
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it touches a space or when the text has a
digit-comma-digit run, otherwise replaced by a space); periods not followed by a digit removed (at most
32: the official call passes ``re.UNICODE`` (= 32) as the *count*, reproduced on purpose); number words
zero..ten and "none" to digits; articles a/an/the dropped; unapostrophised contractions restored
(``dont`` -> ``don't``).

The official VQA tool (``vqa_eval_accuracy``) normalises differently: newlines/tabs to spaces and strip
on both sides; then, *only when the ten human answers are not all the same*, the punctuation and
digit/article steps above on both sides (no lower-casing and no ``'s`` split before the punctuation step,
and its digit-comma-digit test takes exactly one comma); when all ten agree, the strings are compared as
they are.

Soft accuracy of a prediction against ten human answers: for each of the ten leave-one-out subsets of
nine, ``min(1, #matches in the subset / 3)``; the score is the mean over the ten subsets. A benchmark's
accuracy is the mean score over questions, reported in percent.

Files (``playground/data/eval``):
  VQAv2: ``vqav2/llava_vqav2_mscoco_test-dev2015.jsonl`` (question_id, image, text). test-dev has no
    public answers, so the scorer writes the EvalAI submission ``vqav2_submission.json``
    (``[{"question_id", "answer": m4c-normalised text}]``, as ``convert_vqav2_for_submission.py``; when
    ``llava_vqav2_mscoco_test2015.jsonl`` is beside the question file, every test2015 question is listed
    and the unanswered ones get ``""``, as that script does). With a VQA-format ``annotation_file``
    (``{"annotations": [{"question_id", "answer_type", "answers": [{"answer"}] x 10}]}``) it also scores
    locally: ``accuracy`` (m4c on both sides, LLaVA's local convention) and ``official_accuracy`` (the
    official VQA tool on the submitted answer, the number EvalAI reports; ``official_accuracy/<answer
    type>`` per answer type).
  TextVQA: ``textvqa/llava_textvqa_val_v051_ocr.jsonl``, whose ``question_id`` is the *image* id and
    repeats for different questions on one image (answers are keyed by id and prompt), and
    ``TextVQA_0.5.1_val.json`` (``{"data": [{"image_id", "question", "answers": [10]}]}``). As
    ``eval_textvqa.py``: an answer's annotation is the one with (image id, ``question.lower()``) equal to
    (its ``question_id``, the question taken from its prompt, lower-cased); the question is the text
    between "Question: " and " Short answer:" for prompts starting "OCR tokens: ", the line that is not
    the "Reference OCR token: " line for 3-line prompts holding one, the first line of 2-line prompts.
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
_OFFICIAL_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")  # vqaEval.py's test: exactly one comma
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


def _punctuation(text: str, digit_commas: re.Pattern = _COMMA_BETWEEN_DIGITS) -> str:
    out = text
    has_digit_commas = digit_commas.search(text) is not None
    for p in _PUNCTUATION:
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if (touches_space or has_digit_commas) else " ")
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
    return _leave_one_out(normalize_answer(prediction), [normalize_answer(a) for a in human_answers])


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    matches = sum(g == pred for g in gts)
    # Leaving out annotator i removes one match exactly when annotator i agreed with the prediction.
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


def accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean soft accuracy in percent."""
    if not predictions:
        raise ValueError("no predictions to score.")
    return 100.0 * sum(soft_accuracy(p, h) for p, h in zip(predictions, human_answers, strict=True)) / len(predictions)


def _official_process(text: str) -> str:
    return _digits_and_articles(_punctuation(text, _OFFICIAL_DIGIT_COMMA))


def vqa_eval_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's accuracy as the official VQA tool (vqaEval.py) computes it (module docstring)."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer.")

    def clean(t: str) -> str:
        return t.replace("\n", " ").replace("\t", " ").strip()

    gts, pred = [clean(a) for a in human_answers], clean(prediction)
    if len(set(gts)) > 1:
        gts, pred = [_official_process(g) for g in gts], _official_process(pred)
    return _leave_one_out(pred, gts)


def textvqa_question(prompt: str) -> str:
    """The lower-cased question of a TextVQA prompt, by ``eval_textvqa.py``'s three prompt forms."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise ValueError(f"TextVQA prompt {prompt!r} starts with 'OCR tokens: ' but has no "
                             "'Question: ... Short answer:'.")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"TextVQA prompt {prompt!r} has none of the forms eval_textvqa.py reads (question + "
                         "answer-format line, optionally a 'Reference OCR token: ' line, or 'OCR tokens: ...').")
    return question.lower()


def score_vqav2(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
                out_dir: str) -> dict[str, float]:
    """Writes the EvalAI submission; scores locally when ``annotation_file`` is set (VQA format)."""
    answered = [ex for ex in examples if ex.key in rows]
    submitted = {str(ex.question_id): normalize_answer(rows[ex.key]["text"]) for ex in answered}
    full = os.path.join(spec["root"], spec.get("submission_question_file", "llava_vqav2_mscoco_test2015.jsonl"))
    ids = [r["question_id"] for r in read_jsonl(full)] if os.path.isfile(full) else [ex.question_id for ex in examples]
    with open(os.path.join(out_dir, "vqav2_submission.json"), "w", encoding="utf-8") as f:
        json.dump([{"question_id": _int_or_str(q), "answer": submitted.get(str(q), "")} for q in ids], f)
    if not spec.get("annotation_file"):
        return {"answered": float(len(answered))}
    path = require_file(os.path.join(spec["root"], spec["annotation_file"]), "VQAv2 annotations")
    by_id = {str(a["question_id"]): a for a in read_json(path)["annotations"]}
    missing = [ex.question_id for ex in answered if str(ex.question_id) not in by_id]
    if missing:
        raise ValueError(f"{path} has no annotation for question ids {missing[:3]} ({len(missing)} in all).")
    if not answered:
        raise ValueError("VQAv2: no answered question to score.")
    humans = [[x["answer"] for x in by_id[str(ex.question_id)]["answers"]] for ex in answered]
    official = [vqa_eval_accuracy(submitted[str(ex.question_id)], h) for ex, h in zip(answered, humans)]
    out = {"accuracy": accuracy([rows[ex.key]["text"] for ex in answered], humans),
           "official_accuracy": 100.0 * sum(official) / len(official), "count": float(len(answered))}
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for ex, acc in zip(answered, official):
        by_type[str(by_id[str(ex.question_id)].get("answer_type", "unknown"))].append(acc)
    out.update({f"official_accuracy/{t}": 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())})
    return out


def score_textvqa(spec: Mapping[str, Any], examples: Sequence[Example], rows: Mapping[str, Mapping[str, Any]],
                  out_dir: str) -> dict[str, float]:
    path = require_file(os.path.join(spec["root"], spec["annotation_file"]), "TextVQA annotations")
    # A repeated (image, question) keeps its last annotation, as the official dict does.
    table = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in read_json(path)["data"]}
    preds, gts = [], []
    for ex in examples:
        if ex.key not in rows:
            continue  # not answered (score_only on a partial file): not scored, as the official script
        k = (str(ex.question_id), textvqa_question(rows[ex.key].get("prompt", ex.recorded_prompt)))
        if k not in table:
            raise ValueError(f"{path} has no annotation for image {k[0]!r} and question {k[1]!r}.")
        preds.append(rows[ex.key]["text"])
        gts.append(table[k])
    if not preds:
        raise ValueError("TextVQA: no answered question to score.")
    return {"accuracy": accuracy(preds, gts), "count": float(len(preds))}


def _int_or_str(v: Any) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        return v
