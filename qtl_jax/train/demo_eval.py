"""The demo's evaluation: answer exact match and token accuracy under teacher forcing, quantizers in place.

Each evaluation batch takes the same path as training (client encode to integer codes -> server decode ->
decoder logits; :func:`qtl_jax.split.step.make_eval_step`). For every target token (labels != -100) the
prediction is the argmax of the logits at the previous position. An *answer* is one maximal run of
consecutive target tokens (one assistant turn with its closing ``</s>``, or one caption); it counts as
an exact match when every one of its tokens is the argmax.

Why this equals greedy-decoding exact match: greedy decoding feeds the model its own previous argmax.
As long as every argmax so far equalled the reference token, the decoded prefix *is* the reference
prefix, so the next argmax is the one computed here under teacher forcing; by induction the greedy
answer reproduces the reference, ``</s>`` included (so it also stops there), exactly when all answer
tokens are the teacher-forced argmax. A single wrong token makes both fail. (Earlier turns of a
multi-turn conversation are the reference turns in both.) One caveat specific to this model: the
paper's quantizer scales with scalar statistics of the whole batch tensor (scaling='batch'), so each
code depends very weakly on every other position of the batch; with scaling='ema' evaluation uses
frozen running statistics and the equivalence is exact.

Baselines, on the same answers: ``majority_exact_match`` is the share of the most frequent answer (the
best any constant answer can score) and ``majority_token_accuracy`` the share of the most frequent
target token.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from qtl_jax.data.constants import IGNORE_INDEX


def answer_spans(targets: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of each maximal run of target positions (``targets != -100``) in ``[B, T]``."""
    spans = []
    valid = np.asarray(targets) != IGNORE_INDEX
    for row in range(valid.shape[0]):
        v = np.concatenate([[False], valid[row], [False]]).astype(np.int8)
        edges = np.diff(v)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        spans.extend((row, int(s), int(e)) for s, e in zip(starts, ends))
    return spans


class Tally:
    """Accumulates predictions over batches; :meth:`results` gives the figures."""

    def __init__(self):
        self.tokens = 0
        self.correct_tokens = 0
        self.answers = 0
        self.exact = 0
        self.answer_counts: collections.Counter = collections.Counter()
        self.token_counts: collections.Counter = collections.Counter()
        self.ce_sum = 0.0
        self.batches = 0

    def add(self, logits: np.ndarray, labels: np.ndarray, ce: float | None = None) -> None:
        """``logits [B, T, V]`` and ``labels [B, T]`` in the same (merged) coordinates."""
        logits, labels = np.asarray(logits), np.asarray(labels)
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree on [B, T]")
        pred = np.argmax(logits[:, :-1], axis=-1)
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        hit = (pred == targets) & valid
        self.tokens += int(valid.sum())
        self.correct_tokens += int(hit.sum())
        self.token_counts.update(targets[valid].tolist())
        for row, s, e in answer_spans(targets):
            self.answers += 1
            self.exact += int(hit[row, s:e].all())
            self.answer_counts[tuple(targets[row, s:e].tolist())] += 1
        if ce is not None:
            self.ce_sum += float(ce)
            self.batches += 1

    def results(self) -> dict[str, float]:
        if not self.answers:
            raise ValueError("the evaluation saw no answer tokens (labels all -100); check the eval data and template")
        out = {
            "exact_match": self.exact / self.answers,
            "token_accuracy": self.correct_tokens / self.tokens,
            "majority_exact_match": self.answer_counts.most_common(1)[0][1] / self.answers,
            "majority_token_accuracy": self.token_counts.most_common(1)[0][1] / self.tokens,
            "answers": self.answers,
            "target_tokens": self.tokens,
        }
        if self.batches:
            out["ce"] = self.ce_sum / self.batches
        return out


def evaluate(eval_step: Callable[[Any, Mapping[str, Any]], Mapping[str, Any]], state: Any,
             batches: Iterable[Mapping[str, Any]], max_batches: int | None = None) -> dict[str, float]:
    """Runs ``eval_step`` (``make_eval_step``) over ``batches`` and scores them (module docstring)."""
    import jax

    tally = Tally()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = jax.device_get(eval_step(state, batch))
        tally.add(out["logits"], out["labels"], out.get("ce"))
    return tally.results()


def prepare_shapes_eval(data_dir: str, *, seed: int, stream: str, num_examples: int, image_size: int,
                        blank: bool = False) -> str:
    """Builds a held-out shapes split (``validation``) drawn with ``seed``; returns its dataset directory.

    ``stream`` is 'instruct' (questions, the llama template) or 'pretrain' (captions). The training
    corpus uses ``data.shapes.seed``; pass a different seed so no sample is shared. ``blank``: flat grey
    images (an image-blind run is evaluated as it was trained).
    """
    from qtl_jax.data import llava_tfds, shapes

    if stream not in ("instruct", "pretrain"):
        raise ValueError(f"eval.shapes_stream={stream!r}: use 'instruct' or 'pretrain'.")
    name = f"shapes_eval_{stream}_s{seed}_{image_size}px_n{num_examples}" + ("_blank" if blank else "")
    corpus = os.path.join(data_dir, "downloads", name)
    built = os.path.join(data_dir, llava_tfds.DATASET_NAME, name, "1.0.0")
    if os.path.isfile(os.path.join(built, "dataset_info.json")):
        return built
    shapes.write_corpus(corpus, seed=seed, n_pretrain=num_examples if stream == "pretrain" else 0,
                        n_instruct=num_examples if stream == "instruct" else 0, image_size=image_size,
                        cfg=shapes.ShapesConfig(image_size=image_size, blank=blank), benchmarks=False,
                        with_scenes=False)
    return llava_tfds.build(data_dir, name, {"validation": [os.path.join(corpus, f"{stream}.json")]},
                            image_root=os.path.join(corpus, "images"), kind=stream, max_bad_rows=0,
                            max_bad_fraction=0.0)
