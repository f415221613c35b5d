"""Questions to answer and the answers jsonl files that make an evaluation resumable.

Every benchmark reader turns its question file into :class:`Example` rows with a ``key`` unique within the
benchmark. Answers are appended to ``<workdir>/answers/<benchmark>.jsonl`` one line per question, flushed
after every batch, in the LLaVA answer-file layout (``question_id``, ``prompt``, ``text``) plus that
``key``. A rerun reads the file back and only asks the questions whose key is missing, so an evaluation
killed at any point resumes where it stopped; a line cut short by the kill is dropped and asked again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Example:
    """One question of a benchmark.

    key: unique within the benchmark (resume and scoring match answers by it).
    question_id: the question file's id, written back unchanged into the answer file.
    prompt: the user turn without the image token (what the official scripts store as ``prompt``).
    image: absolute path of the image, or None for a text-only question.
    """

    key: str
    question_id: Any
    prompt: str
    image: str | None


def answers_path(workdir: str, benchmark: str) -> str:
    return os.path.join(workdir, "answers", f"{benchmark}.jsonl")


def read_answers(path: str) -> dict[str, dict[str, Any]]:
    """``key -> row`` of an answers file; a missing file is empty and a torn last line is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
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
        if "key" not in row or "text" not in row:
            raise ValueError(f"{path}:{i + 1} lacks 'key' or 'text'; it was not written by qtl_jax.eval.")
        rows[str(row["key"])] = row
    return rows


def rewrite_answers(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes ``rows`` atomically (used to drop a torn line before appending)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(r)) + "\n" for r in rows)
    os.replace(tmp, path)


def append_answers(path: str, examples: Sequence[Example], texts: Sequence[str], model_id: str) -> None:
    if len(examples) != len(texts):
        raise ValueError(f"{len(examples)} examples but {len(texts)} answers.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for ex, text in zip(examples, texts):
            row = {"key": ex.key, "question_id": ex.question_id, "prompt": ex.prompt, "text": text,
                   "model_id": model_id}
            f.write(json.dumps(row) + "\n")
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


def missing_answers(examples: Sequence[Example], rows: Mapping[str, Any], benchmark: str) -> None:
    """Raises if some questions have no answer (scoring a partial file would silently inflate nothing)."""
    missing = [ex.key for ex in examples if ex.key not in rows]
    if missing:
        raise ValueError(f"{benchmark}: {len(missing)} of {len(examples)} questions have no answer "
                         f"(first: {missing[:3]}); run the evaluation to completion before scoring.")
