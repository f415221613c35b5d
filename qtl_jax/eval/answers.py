"""Questions to answer and the answer files, in LLaVA's answer-file format both ways.

Every benchmark reader turns its question file into :class:`Example` rows. An answer file holds one JSON
line per answer in the layout LLaVA's ``llava/eval/model_vqa_loader.py`` (and ``model_vqa_science.py``)
write: ``question_id``, ``prompt`` (the prompt the official script records), ``text`` (the answer,
stripped), ``answer_id``, ``model_id``, ``metadata``. So the official scoring scripts read our answer
files, and answer files written by the official PyTorch code are scored here without a model
(``config.score_only``).

An answer is matched to its question by a *key*: the question id, or for benchmarks whose ids repeat
(TextVQA keys questions by image id, MME by image) the question id and the recorded prompt together.
A line that repeats a key gets ``#2``, ``#3``, ... in order of appearance, in the question file and in
an answer file alike, so identical repeated questions are answered and scored one by one.

Answers are appended after every batch and flushed, so an evaluation killed at any point resumes where
it stopped: a rerun reads the file back and asks only the questions whose key is missing; a last line
cut short by the kill is dropped and asked again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Example:
    """One question of a benchmark.

    key: unique within the benchmark (resume and scoring match answers by it; :func:`assign_keys`).
    question_id: the question file's id, written back unchanged into the answer file.
    prompt: the user turn the model is asked, without the image token.
    image: absolute path of the image, or None for a text-only question.
    record: the ``prompt`` the official answer script records for this question (ScienceQA's starts
        with ``<image>`` for image questions); None means ``prompt``.
    """

    key: str
    question_id: Any
    prompt: str
    image: str | None
    record: str | None = None

    @property
    def recorded_prompt(self) -> str:
        return self.prompt if self.record is None else self.record


# What answers a batch of questions (a model, or a script in tests): one answer text per question.
Answerer = Callable[[Sequence[Example]], list[str]]


def base_key(question_id: Any, prompt: str, by_prompt: bool) -> str:
    return f"{question_id}|{prompt}" if by_prompt else str(question_id)


def assign_keys(pairs: Iterable[tuple[Any, str]], by_prompt: bool) -> list[str]:
    """Keys of ``(question_id, recorded prompt)`` pairs in order; the n-th repeat (n >= 2) gets ``#n``."""
    seen: collections.Counter[str] = collections.Counter()
    keys = []
    for qid, prompt in pairs:
        k = base_key(qid, prompt, by_prompt)
        seen[k] += 1
        keys.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    return keys


def _refuse_repeated_ids(rows: Sequence[Mapping[str, Any]], path: str, problem: str) -> None:
    repeated = [k for k, n in collections.Counter(str(r["question_id"]) for r in rows).items() if n > 1]
    if repeated:
        raise ValueError(f"{path}: question ids {repeated[:3]} {problem}")


def answers_path(directory: str, benchmark: str) -> str:
    """``<directory>/<benchmark>.jsonl``: the layout of ``<workdir>/answers`` and of ``config.answers_dir``."""
    return os.path.join(directory, f"{benchmark}.jsonl")


def read_answers(path: str, by_prompt: bool) -> dict[str, dict[str, Any]]:
    """``key -> row`` of an answer file in file order; a missing file is empty, a torn last line ignored."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # Only the last line can be torn by a kill mid-write; anything else is a corrupted file.
            if i >= len(lines) - 2:
                continue
            raise ValueError(f"{path}:{i + 1} is not JSON; delete the file to re-run this benchmark from scratch.")
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row or \
                (by_prompt and "prompt" not in row):
            need = "'question_id', 'prompt' and 'text'" if by_prompt else "'question_id' and 'text'"
            raise ValueError(f"{path}:{i + 1} lacks {need}; expected LLaVA answer lines "
                             "(question_id, prompt, text, answer_id, model_id, metadata).")
        rows.append(row)
    if not by_prompt:
        _refuse_repeated_ids(rows, path, "are answered more than once; keep one answer per question.")
    return dict(zip(assign_keys(((r["question_id"], r.get("prompt", "")) for r in rows), by_prompt), rows))


def answer_row(example: Example, text: str, model_id: str) -> dict[str, Any]:
    """One answer line as ``model_vqa_loader.py`` writes it (the answer stripped, as it strips outputs)."""
    return {"question_id": example.question_id, "prompt": example.recorded_prompt, "text": text.strip(),
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}


def rewrite_answers(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes ``rows`` atomically (used to drop a torn line, and to put answers in question order)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(r)) + "\n" for r in rows)
    os.replace(tmp, path)


def append_answers(path: str, examples: Sequence[Example], texts: Sequence[str], model_id: str) -> None:
    if len(examples) != len(texts):
        raise ValueError(f"{len(examples)} examples but {len(texts)} answers.")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for ex, text in zip(examples, texts):
            f.write(json.dumps(answer_row(ex, text, model_id)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist; check the benchmark's root/question_file settings.")
    return path


def load_llava_questions(spec: Mapping[str, Any], by_prompt: bool = False) -> list[Example]:
    """A LLaVA question jsonl (question_id, image, text) -> examples; images under ``image_folder``.

    ``model_vqa_loader.py`` records the question's ``text`` as the answer's ``prompt``. Without
    ``by_prompt`` the question ids must be unique (the official scorers look questions up by id).
    """
    root = spec["root"]
    path = require_file(os.path.join(root, spec["question_file"]), f"{spec['kind']} question file")
    images = os.path.join(root, spec.get("image_folder", ""))
    rows = read_jsonl(path)
    if not by_prompt:
        _refuse_repeated_ids(rows, path, "repeat; every question needs its own id.")
    keys = assign_keys(((r["question_id"], r["text"]) for r in rows), by_prompt)
    return [Example(key=k, question_id=r["question_id"], prompt=r["text"],
                    image=os.path.join(images, r["image"]) if r.get("image") else None)
            for k, r in zip(keys, rows)]


def missing_answers(examples: Sequence[Example], rows: Mapping[str, Any], benchmark: str) -> None:
    """Raises if some questions have no answer (after generation every asked question must have one)."""
    missing = [ex.key for ex in examples if ex.key not in rows]
    if missing:
        raise ValueError(f"{benchmark}: {len(missing)} of {len(examples)} questions have no answer "
                         f"(first: {missing[:3]}); run the evaluation to completion before scoring.")
