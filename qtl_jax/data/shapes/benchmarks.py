"""Held-out shapes benchmarks written in the file formats the real evaluation kits distribute.

The evaluation code (scorers for MME, POPE, ScienceQA-IMG, TextVQA/VQAv2) reads real benchmark files; these
writers produce the same layouts from shapes scenes, so the exact same readers and scoring rules run on
the demo model. Each benchmark draws its scenes from its own random stream (``samples.STREAMS``), never one
a training split uses. The layouts (all paths relative to the benchmark's folder):

* ``mme/``: ``MME_Benchmark_release_version/<subtask>/<name>.png`` with a sibling ``<name>.txt`` holding two
  ``question<TAB>Yes|No`` lines (one Yes and one No per image, like MME's flat subtasks), the LLaVA question
  file ``llava_mme.jsonl`` (``question_id`` = ``image`` = ``<subtask>/<name>.png``, ``text``, ``category``)
  and ``eval_tool/Your_Results/<subtask>.txt`` (``name<TAB>question<TAB>gt`` rows, the answer-file layout
  that MME's ``calculation.py`` reads once a prediction column is appended).
* ``pope/``: ``images/*.png``, ``llava_pope_test.jsonl`` (``question_id`` from each category's offset as in
  LLaVA's file, ``image``, ``text`` with the short-answer instruction, ``category``) and
  ``coco/coco_pope_<split>.json`` (jsonl: ``question_id`` 1..n, ``image``, ``text``, ``label``) for the
  splits random / popular / adversarial, negatives sampled by the POPE rules.
* ``scienceqa/``: ``problems.json`` (pid -> question, choices, answer index, hint, image, ...),
  ``pid_splits.json`` (``{"test": [...]}``), ``images/test/<pid>/image.png`` and ``llava_test_CQM-A.json``
  (LLaVA conversations, option letters).
* ``vqa/``: ``images/*.png``; VQAv2-layout ``questions.json`` + ``annotations.json`` (10 answers per
  question, some from annotators who phrased it differently or got it wrong) with the LLaVA question file
  ``llava_vqa_shapes.jsonl``; and questions of the same kinds about the images of its own stream
  (``textvqa``) in the TextVQA layout (``textvqa_val.json`` + ``llava_textvqa_shapes.jsonl``, whose
  ``question_id`` is the image id, repeated for the image's questions, as the TextVQA scorer keys answers
  by (image id, question)).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from qtl_jax.data.shapes.samples import STREAMS, save_png, scene_and_image
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.text import (IMAGE_TOKEN, MME_COGNITION, MME_PERCEPTION, MME_TEMPLATES, NO,
                                      OPTION_LETTERS, OPTION_PROMPT, POPE_QUESTION, SHORT_ANSWER_PROMPT, SQA_CONTEXT,
                                      SQA_HINTS, SQA_TEMPLATES, YES, YES_NO_PROMPT, mme_prompt, mme_questions, pick,
                                      pope_prompt, question, sqa_problem, sqa_text)

POPE_SPLITS = ("random", "popular", "adversarial")
# The first question id of each category in LLaVA's llava_pope_test.jsonl (docs/evaluation.md, POPE).
POPE_QID_OFFSETS = {"adversarial": 1, "random": 10000001, "popular": 20000001}

# Ways VQA annotators phrase the same answer (EvalAI normalisation maps number words to digits).
ANSWER_VARIANTS = {
    "purple": ("violet",), "cyan": ("light blue", "turquoise"), "yellow": ("gold",), "red": ("dark red",),
    "green": ("light green",), "blue": ("dark blue",),
    "cross": ("plus", "plus sign"), "square": ("box",), "circle": ("round",), "triangle": ("triangles",),
    "top left": ("upper left", "top left corner"), "top right": ("upper right", "top right corner"),
    "bottom left": ("lower left", "bottom left corner"), "bottom right": ("lower right", "bottom right corner"),
    "center": ("middle", "in the middle"), "top": ("top middle", "up"), "bottom": ("bottom middle", "down"),
    "left": ("left side",), "right": ("right side",), "small": ("little", "tiny"), "large": ("big",),
    "0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",), "4": ("four",),
    "yes": ("yes",), "no": ("no",),
}


def _jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ---------------------------------------------------------------------------------------------------
# MME.

def write_mme(out_dir: str, *, seed: int, cfg: ShapesConfig, n_per_subtask: int = 30) -> dict:
    """MME-style folder: 2 yes/no questions per image (one Yes, one No) per perception/cognition subtask."""
    root = os.path.join(out_dir, "MME_Benchmark_release_version")
    llava_rows, counts = [], {}
    index = 0
    for subtask in MME_PERCEPTION + MME_COGNITION:
        # Relations need two objects; every other subtask uses the training distribution of scenes.
        sub_cfg = cfg if subtask != "commonsense_reasoning" else with_min_objects(cfg, 2)
        gt_rows = []
        for i in range(n_per_subtask):
            scene, image, rng = scene_and_image(seed, "mme", index, sub_cfg)
            index += 1
            name = f"{i:04d}"
            save_png(image, os.path.join(root, subtask, f"{name}.png"))
            q_yes, q_no = mme_questions(subtask, scene, rng, sub_cfg)
            pairs = [(q_yes, "Yes"), (q_no, "No")]
            with open(os.path.join(root, subtask, f"{name}.txt"), "w") as f:
                f.writelines(f"{q} {YES_NO_PROMPT}\t{a}\n" for q, a in pairs)
            for q, a in pairs:
                llava_rows.append({"question_id": f"{subtask}/{name}.png", "image": f"{subtask}/{name}.png",
                                   "text": mme_prompt(q), "category": subtask})
                gt_rows.append(f"{name}.png\t{q} {YES_NO_PROMPT}\t{a}\n")
        tool = os.path.join(out_dir, "eval_tool", "Your_Results")
        os.makedirs(tool, exist_ok=True)
        with open(os.path.join(tool, f"{subtask}.txt"), "w") as f:
            f.writelines(gt_rows)
        counts[subtask] = len(gt_rows)
    _jsonl(os.path.join(out_dir, "llava_mme.jsonl"), llava_rows)
    _json(os.path.join(out_dir, "subtasks.json"), {"Perception": list(MME_PERCEPTION),
                                                   "Cognition": list(MME_COGNITION)})
    return counts


def with_min_objects(cfg: ShapesConfig, n: int) -> ShapesConfig:
    return dataclasses.replace(cfg, min_objects=max(cfg.min_objects, n), max_objects=max(cfg.max_objects, n))


# ---------------------------------------------------------------------------------------------------
# POPE.

def pope_negatives(strategy: str, present: set[str], categories: list[str], frequency: collections.Counter,
                   cooccur: dict[str, collections.Counter], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` absent objects chosen by POPE's rule for ``strategy``.

    random: uniformly among absent categories that occur in other images of the set (as POPE samples from the
    annotated categories of its image set; all absent categories only if fewer than ``k`` occur); popular:
    the most frequent categories of the whole image set that are absent; adversarial: the absent categories
    that co-occur most often with the present ones. Ties break on frequency, then by name, so the files are
    reproducible.
    """
    absent = [c for c in categories if c not in present]
    if len(absent) < k:
        raise ValueError(f"only {len(absent)} absent categories, cannot sample {k} negatives.")
    if strategy == "random":
        seen = [c for c in absent if frequency[c] > 0]
        pool = seen if len(seen) >= k else absent
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    if strategy == "popular":
        return sorted(absent, key=lambda c: (-frequency[c], c))[:k]
    if strategy == "adversarial":
        score = {c: sum(cooccur[p][c] for p in present) for c in absent}
        return sorted(absent, key=lambda c: (-score[c], -frequency[c], c))[:k]
    raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {POPE_SPLITS}.")


def write_pope(out_dir: str, *, seed: int, cfg: ShapesConfig, n_images: int = 50, k: int = 3) -> dict:
    """POPE-style files: per image ``k`` present objects (yes) and ``k`` absent ones (no) per split.

    As in LLaVA's ``llava_pope_test.jsonl``, each category's question ids start at its own offset
    (:data:`POPE_QID_OFFSETS`) and each prompt ends with the short-answer instruction, while POPE's label
    files ``coco/coco_pope_<category>.json`` number their rows 1..n and hold the bare question.
    """
    # POPE only uses images with at least 3 annotated objects.
    pcfg = with_min_objects(cfg, k)
    scenes, names = [], []
    for i in range(n_images):
        scene, image, _ = scene_and_image(seed, "pope", i, pcfg)
        name = f"shapes_pope_{i:06d}.png"
        save_png(image, os.path.join(out_dir, "images", name))
        scenes.append(scene)
        names.append(name)
    categories = [f"{c} {k_}" for c in cfg.colors for k_ in cfg.kinds]
    frequency = collections.Counter(n for s in scenes for n in s.names())
    cooccur: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in scenes:
        for a in s.names():
            for b in s.names():
                if a != b:
                    cooccur[a][b] += 1
    llava_rows, counts = {}, {}
    for split_i, split in enumerate(POPE_SPLITS):
        rows, llava_rows[split] = [], []
        for i, (scene, name) in enumerate(zip(scenes, names)):
            # One generator per (split, image): the splits differ only in how negatives are chosen.
            rng = np.random.default_rng(np.random.SeedSequence([seed, STREAMS["pope"], 1_000_000 + split_i, i]))
            present = sorted(scene.names())
            positives = [present[j] for j in rng.choice(len(present), size=k, replace=False)]
            negatives = pope_negatives(split, set(present), categories, frequency, cooccur, k, rng)
            for pos, neg in zip(positives, negatives):  # POPE alternates yes / no
                for obj, label in ((pos, YES), (neg, NO)):
                    color, kind = obj.split(" ")
                    text = POPE_QUESTION.format(color=color, kind=kind)
                    rows.append({"question_id": len(rows) + 1, "image": name, "text": text, "label": label})
                    llava_rows[split].append({"question_id": POPE_QID_OFFSETS[split] + len(rows) - 1, "image": name,
                                              "text": pope_prompt(color, kind), "category": split})
        _jsonl(os.path.join(out_dir, "coco", f"coco_pope_{split}.json"), rows)
        counts[split] = len(rows)
    # LLaVA's file lists the categories in the order of their offsets.
    order = sorted(POPE_SPLITS, key=POPE_QID_OFFSETS.get)
    _jsonl(os.path.join(out_dir, "llava_pope_test.jsonl"), [r for split in order for r in llava_rows[split]])
    return counts


# ---------------------------------------------------------------------------------------------------
# ScienceQA-IMG.

def write_scienceqa(out_dir: str, *, seed: int, cfg: ShapesConfig, n: int = 200,
                    image_fraction: float = 0.8) -> dict:
    """ScienceQA-style ``problems.json`` / ``pid_splits.json`` / images and the LLaVA ``llava_test_CQM-A.json``."""
    problems, llava = {}, []
    for i in range(n):
        scene, image, rng = scene_and_image(seed, "scienceqa", i, cfg)
        pid = str(i + 1)
        with_image = bool(rng.random() < image_fraction)
        p = sqa_problem(scene, rng, cfg, with_image)
        hint = SQA_HINTS[0] if with_image and rng.random() < 0.5 else ""
        problems[pid] = {
            "question": p["question"], "choices": p["choices"], "answer": p["answer"], "hint": hint,
            "image": "image.png" if with_image else None, "task": "closed choice", "choice": None,
            "grade": "grade1", "subject": "natural science", "topic": "shapes", "category": p["task"],
            "skill": p["task"], "lecture": "", "solution": "", "split": "test"}
        if with_image:
            save_png(image, os.path.join(out_dir, "images", "test", pid, "image.png"))
        text = sqa_text(p["question"], p["choices"], hint)
        row = {"id": pid, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{text}" if with_image else text},
            {"from": "gpt", "value": OPTION_LETTERS[p["answer"]]}]}
        if with_image:
            row["image"] = f"{pid}/image.png"
        llava.append(row)
    _json(os.path.join(out_dir, "problems.json"), problems)
    _json(os.path.join(out_dir, "pid_splits.json"), {"test": list(problems)})
    _json(os.path.join(out_dir, "llava_test_CQM-A.json"), llava)
    return {"problems": n, "with_image": sum(1 for p in problems.values() if p["image"])}


# ---------------------------------------------------------------------------------------------------
# VQA (VQAv2 and TextVQA layouts).

VQA_TASKS = ("color", "shape", "count_all", "count_color", "count_kind", "position", "existence", "size")


def _answer_type(task: str) -> str:
    return "yes/no" if task == "existence" else "number" if task.startswith("count") else "other"


def annotator_answers(answer: str, domain: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    """Ten human answers: mostly ``answer``, sometimes rephrased (a variant) or, rarely, wrong.

    At least 7 of 10 are ``answer`` itself, so the majority answer is always the ground truth.
    """
    answers = [answer] * 10
    if rng.random() < 0.5:
        for j in rng.choice(10, size=int(rng.integers(1, 4)), replace=False):
            if rng.random() < 0.7:
                answers[j] = pick(rng, ANSWER_VARIANTS.get(answer, (answer,)))
            else:
                answers[j] = pick(rng, [d for d in domain if d != answer])
    return answers


def _vqa_image(out_dir: str, seed: int, stream: str, i: int, cfg: ShapesConfig, per_image: int):
    """Image ``i`` of ``stream`` saved under ``images/``; its stem and ``per_image`` distinct questions, each
    with its task and ten annotator answers."""
    scene, image, rng = scene_and_image(seed, stream, i, cfg)
    stem = f"shapes_{stream}_{i:06d}"
    save_png(image, os.path.join(out_dir, "images", f"{stem}.png"))
    seen, out, tries = set(), [], 0
    while len(out) < per_image and tries < 50:
        tries += 1
        task = pick(rng, VQA_TASKS)
        qa = question(task, scene, rng, cfg)
        if qa is None or qa.question in seen:  # TextVQA keys answers by (image, question)
            continue
        seen.add(qa.question)
        out.append((task, qa, annotator_answers(qa.answer, qa.choices, rng)))
    return stem, out


def write_vqa(out_dir: str, *, seed: int, cfg: ShapesConfig, n_images: int = 200, per_image: int = 2) -> dict:
    """VQAv2-layout questions/annotations (+ LLaVA jsonl) on the ``vqa`` stream's images, and TextVQA-layout
    files on as many images of the ``textvqa`` stream (the same kinds of questions, other images)."""
    questions, annotations, llava_rows = [], [], []
    qid = 0
    for i in range(n_images):
        stem, items = _vqa_image(out_dir, seed, "vqa", i, cfg, per_image)
        for task, qa, answers in items:
            qid += 1
            majority = collections.Counter(answers).most_common(1)[0][0]
            qtype = " ".join(qa.question.lower().rstrip("?").split()[:3])
            questions.append({"image_id": i, "question": qa.question, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": i, "question_type": qtype, "answer_type": _answer_type(task),
                "multiple_choice_answer": majority,
                "answers": [{"answer": a, "answer_confidence": "yes" if a == qa.answer else "maybe",
                             "answer_id": j + 1} for j, a in enumerate(answers)]})
            llava_rows.append({"question_id": qid, "image": f"{stem}.png",
                               "text": f"{qa.question}\n{SHORT_ANSWER_PROMPT}", "category": task})
    textvqa, textvqa_rows = [], []
    for i in range(n_images):
        stem, items = _vqa_image(out_dir, seed, "textvqa", i, cfg, per_image)
        for task, qa, answers in items:
            textvqa.append({"question_id": len(textvqa), "image_id": stem, "question": qa.question,
                            "answers": answers, "image_width": cfg.image_size, "image_height": cfg.image_size,
                            "set_name": "val"})
            # As LLaVA's TextVQA question file: question_id is the image id, repeated for each of its questions.
            textvqa_rows.append({"question_id": stem, "image": f"{stem}.png",
                                 "text": f"{qa.question}\n{SHORT_ANSWER_PROMPT}", "category": "default"})
    info = {"description": "qtl_jax shapes VQA (procedural)", "version": "1.0"}
    _json(os.path.join(out_dir, "questions.json"), {
        "info": info, "task_type": "Open-Ended", "data_type": "shapes", "data_subtype": "test",
        "license": {}, "questions": questions})
    _json(os.path.join(out_dir, "annotations.json"), {
        "info": info, "license": {}, "data_subtype": "test", "annotations": annotations})
    _jsonl(os.path.join(out_dir, "llava_vqa_shapes.jsonl"), llava_rows)
    _json(os.path.join(out_dir, "textvqa_val.json"), {
        "dataset_name": "shapes", "dataset_version": "0.5.1", "dataset_type": "val", "data": textvqa})
    _jsonl(os.path.join(out_dir, "llava_textvqa_shapes.jsonl"), textvqa_rows)
    return {"questions": len(questions), "images": n_images, "textvqa_questions": len(textvqa),
            "textvqa_images": n_images}


# ---------------------------------------------------------------------------------------------------

def write_benchmarks(out_dir: str, *, seed: int = 0, cfg: ShapesConfig | None = None, n_mme: int = 30,
                     n_pope: int = 50, n_scienceqa: int = 200, n_vqa: int = 200) -> dict:
    """Writes ``mme/``, ``pope/``, ``scienceqa/`` and ``vqa/`` under ``out_dir``; returns question counts."""
    cfg = cfg or ShapesConfig()
    for name, n in (("n_mme", n_mme), ("n_pope", n_pope), ("n_scienceqa", n_scienceqa), ("n_vqa", n_vqa)):
        if n < 1:
            raise ValueError(f"{name}={n}: every benchmark needs at least one image.")
    writers: dict[str, Callable[[], dict]] = {
        "mme": lambda: write_mme(os.path.join(out_dir, "mme"), seed=seed, cfg=cfg, n_per_subtask=n_mme),
        "pope": lambda: write_pope(os.path.join(out_dir, "pope"), seed=seed, cfg=cfg, n_images=n_pope),
        "scienceqa": lambda: write_scienceqa(os.path.join(out_dir, "scienceqa"), seed=seed, cfg=cfg, n=n_scienceqa),
        "vqa": lambda: write_vqa(os.path.join(out_dir, "vqa"), seed=seed, cfg=cfg, n_images=n_vqa),
    }
    return {name: write() for name, write in writers.items()}


def text_inventory() -> tuple[str, ...]:
    """Every template these benchmarks put in a prompt (the tokenizer's vocabulary includes them)."""
    texts = list(MME_TEMPLATES.values()) + list(SQA_TEMPLATES.values()) + [POPE_QUESTION, SQA_CONTEXT]
    texts += list(SQA_HINTS) + [YES_NO_PROMPT, SHORT_ANSWER_PROMPT, OPTION_PROMPT, "Yes No of this image in the"]
    texts += [v for vs in ANSWER_VARIANTS.values() for v in vs] + list(MME_PERCEPTION + MME_COGNITION)
    return tuple(texts)
