"""Text of the shapes corpus: captions, questions with their answers, and LLaVA conversations.

Every sentence is assembled from the templates and word lists of this module and of ``scene``;
:func:`text_inventory` lists them all, so the word-level tokenizer (``tokenizer``) covers every word by
construction. A new kind of question needs its template here (and a branch in :func:`question`); the
tokenizer then picks its words up without further changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from qtl_jax.data.shapes.scene import ALL_KINDS, ALL_POSITIONS, PALETTE, SIZES, Scene, ShapeObject, ShapesConfig

KIND_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
                "star": "stars"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OPTION_LETTERS = ("A", "B", "C", "D", "E")

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
YES_NO_PROMPT = "Please answer yes or no."
OPTION_PROMPT = "Answer with the option's letter from the given choices directly."
IMAGE_TOKEN = "<image>"

CAPTION_TEMPLATES = (
    "{objects}.",
    "There {is_are} {number_word} {noun} in the image: {objects}.",
    "The image shows {objects}.",
    "A picture of {objects} on a gray background.",
)
DESCRIBE_PROMPTS = ("Describe the image.", "What do you see in the image?", "Describe the shapes in the picture.")

# Question templates: (name, text). Slot values come from the scene and the word lists.
QUESTION_TEMPLATES = {
    "color": "What color is {ref}?",
    "shape": "What shape is {ref}?",
    "count_all": "How many shapes are there in the image?",
    "count_color": "How many {color} shapes are there?",
    "count_kind": "How many {kinds} are there?",
    "position": "Where is the {color} {kind}?",
    "existence": "Is there a {color} {kind} in the image?",
    "size": "Is the {color} {kind} large or small?",
    "left_of": "Is the {color} {kind} to the left of the {color2} {kind2}?",
    "above": "Is the {color} {kind} above the {color2} {kind2}?",
    # Verification questions (one true or false statement about the scene, MME's style) and picking the
    # present object among absent ones (ScienceQA-IMG's style; asked only with lettered options).
    "check_count": "Is the number of {noun} in this image {n}?",
    "check_position": "Is the {color} {kind} {at_position} of this image?",
    "check_color": "Is {ref} {color}?",
    "present": "Which of these shapes is in the image?",
}
# Object references used inside questions and answers.
REF_TEMPLATES = ("the {kind}", "the {kind} at the {position}", "the {kind} in the center",
                 "the {color} shape", "the {color} shape at the {position}", "the {color} shape in the center")
LONG_ANSWER_TEMPLATES = (
    "{Ref} is {color}.",
    "{Ref} is a {kind}.",
    "There are {number} shapes.",
    "There is {number} shape.",
    "There are {number} {color} shapes.",
    "There is {number} {color} shape.",
    "There are no {color} shapes.",
    "There are {number} {kinds}.",
    "There is {number} {kind}.",
    "There are no {kinds}.",
    "The {color} {kind} is at the {position}.",
    "The {color} {kind} is in the center.",
    "Yes, there is a {color} {kind}.",
    "No, there is no {color} {kind}.",
    "The {color} {kind} is {size}.",
    "Yes, the {color} {kind} is to the left of the {color2} {kind2}.",
    "No, the {color} {kind} is to the right of the {color2} {kind2}.",
    "Yes, the {color} {kind} is above the {color2} {kind2}.",
    "No, the {color} {kind} is below the {color2} {kind2}.",
    "Yes, the number of {noun} is {number}.",
    "No, the number of {noun} is {number}.",
    "Yes, the {color} {kind} is {at_position}.",
    "No, the {color} {kind} is {at_position}.",
    "Yes, {ref} is {color}.",
    "No, {ref} is {color}.",
    "The {color} {kind} is in the image.",
)
TEXT_ONLY_TEMPLATES = (
    ("What is {a} plus {b}?", "{a} plus {b} is {c}."),
    ("What is {a} minus {b}?", "{a} minus {b} is {c}."),
    ("How many sides does a {kind} have?", "A {kind} has {c} sides."),
    ("Is {word} a color or a shape?", "{Word} is a {c}."),
    ("Which is bigger, {a} or {b}?", "{c} is bigger."),
)
SIDES = {"triangle": 3, "square": 4, "circle": 0}
YES, NO = "yes", "no"

# The yes/no benchmarks' question templates. The benchmark writers (``benchmarks``) and the stage-2 probes
# (:func:`probe_turn`) both build their prompts with :func:`pope_prompt` / :func:`mme_prompt`, so the
# training mix asks exactly what the benchmarks ask, in their format.
POPE_QUESTION = "Is there a {color} {kind} in the image?"
MME_PERCEPTION = ("existence", "count", "position", "color")
MME_COGNITION = ("numerical_calculation", "commonsense_reasoning")
MME_TEMPLATES = {
    "existence": "Is there a {color} {kind} in this image?",
    "count": "Is the number of {noun} in this image {n}?",
    "position": "Is the {color} {kind} {at_position} of this image?",
    "color": "Is {ref} {color}?",
    "numerical_calculation": "Is the number of {kinds} plus the number of {kinds2} equal to {n}?",
    "left": "Is the {color} {kind} to the left of the {color2} {kind2}?",
    "above": "Is the {color} {kind} above the {color2} {kind2}?",
    "bigger": "Is the {color} {kind} bigger than the {color2} {kind2}?",
}
# Which benchmark format each successive probe pair of the stage-2 mix takes: POPE half of the time, the
# four MME perception subtasks the other half.
PROBE_FORMATS = ("pope", "existence", "pope", "count", "pope", "position", "pope", "color")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def at_position(position: str) -> str:
    """'at the top left' / 'in the center' (the only cell whose preposition differs)."""
    return "in the center" if position == "center" else f"at the {position}"


def object_phrase(o: ShapeObject) -> str:
    return f"a {o.size} {o.color} {o.kind} {at_position(o.position)}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A stage-1 caption listing every object in reading order (size, colour, kind, position)."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    listed = _join([object_phrase(o) for o in objs])
    n = len(objs)
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return _cap(template.format(objects=listed, is_are="is" if n == 1 else "are",
                                number_word=NUMBER_WORDS[n], noun="shape" if n == 1 else "shapes"))


@dataclasses.dataclass(frozen=True)
class QA:
    """One question about a scene: its short answer, a full-sentence answer and the answer domain."""

    task: str
    question: str
    answer: str
    long_answer: str
    choices: tuple[str, ...]


def ref_by_kind(scene: Scene, o: ShapeObject) -> str:
    if scene.count(kind=o.kind) == 1:
        return f"the {o.kind}"
    return f"the {o.kind} {at_position(o.position)}"


def ref_by_color(scene: Scene, o: ShapeObject) -> str:
    if scene.count(color=o.color) == 1:
        return f"the {o.color} shape"
    return f"the {o.color} shape {at_position(o.position)}"


def _count_sentence(n: int, singular: str, plural: str) -> str:
    if n == 0:
        return f"There are no {plural}."
    if n == 1:
        return f"There is 1 {singular}."
    return f"There are {n} {plural}."


def absent_object(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig, hard: bool) -> tuple[str, str]:
    """A (colour, kind) not in the scene; ``hard`` prefers one sharing a colour or kind with a present one."""
    present = {(o.color, o.kind) for o in scene.objects}
    pool = [(c, k) for c in cfg.colors for k in cfg.kinds if (c, k) not in present]
    if hard:
        similar = [(c, k) for c, k in pool if any(c == pc or k == pk for pc, pk in present)]
        pool = similar or pool
    return pool[int(rng.integers(len(pool)))]


def question(task: str, scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> QA | None:
    """A question of type ``task`` (a QUESTION_TEMPLATES key) about ``scene``; None if it does not apply."""
    if task not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown question task {task!r}; expected one of {sorted(QUESTION_TEMPLATES)}.")
    objs = scene.objects
    o = objs[int(rng.integers(len(objs)))]
    q = QUESTION_TEMPLATES[task]
    if task == "color":
        ref = ref_by_kind(scene, o)
        return QA(task, q.format(ref=ref), o.color, f"{_cap(ref)} is {o.color}.", cfg.colors)
    if task == "shape":
        ref = ref_by_color(scene, o)
        return QA(task, q.format(ref=ref), o.kind, f"{_cap(ref)} is a {o.kind}.", cfg.kinds)
    if task.startswith("count"):
        choices = tuple(str(i) for i in range(cfg.max_objects + 1))
        if task == "count_all":
            n = len(objs)
            return QA(task, q, str(n), _count_sentence(n, "shape", "shapes"), choices)
        if task == "count_color":
            color = o.color if rng.random() < 0.8 else cfg.colors[int(rng.integers(len(cfg.colors)))]
            n = scene.count(color=color)
            return QA(task, q.format(color=color), str(n),
                      _count_sentence(n, f"{color} shape", f"{color} shapes"), choices)
        kind = o.kind if rng.random() < 0.8 else cfg.kinds[int(rng.integers(len(cfg.kinds)))]
        n = scene.count(kind=kind)
        return QA(task, q.format(kinds=KIND_PLURALS[kind]), str(n),
                  _count_sentence(n, kind, KIND_PLURALS[kind]), choices)
    if task == "position":
        return QA(task, q.format(color=o.color, kind=o.kind), o.position,
                  f"The {o.name} is {at_position(o.position)}.", ALL_POSITIONS)
    if task == "existence":
        if rng.random() < 0.5:
            color, kind = o.color, o.kind
            return QA(task, q.format(color=color, kind=kind), YES, f"Yes, there is a {color} {kind}.", (YES, NO))
        color, kind = absent_object(scene, rng, cfg, hard=rng.random() < 0.5)
        return QA(task, q.format(color=color, kind=kind), NO, f"No, there is no {color} {kind}.", (YES, NO))
    if task == "size":
        return QA(task, q.format(color=o.color, kind=o.kind), o.size, f"The {o.name} is {o.size}.", SIZES)
    if task in ("left_of", "above"):
        axis = "col" if task == "left_of" else "row"
        pairs = [(a, b) for a in objs for b in objs if getattr(a, axis) != getattr(b, axis)]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        yes = getattr(a, axis) < getattr(b, axis)
        text = q.format(color=a.color, kind=a.kind, color2=b.color, kind2=b.kind)
        if task == "left_of":
            rel = "to the left of" if yes else "to the right of"
        else:
            rel = "above" if yes else "below"
        long = f"{'Yes' if yes else 'No'}, the {a.name} is {rel} the {b.name}."
        return QA(task, text, YES if yes else NO, long, (YES, NO))
    if task in ("check_count", "check_position", "check_color"):
        return _verification(task, q, scene, o, rng, cfg)
    if task == "present":
        absent = tuple(f"{c} {k}" for c in cfg.colors for k in cfg.kinds if f"{c} {k}" not in scene.names())
        return QA(task, q, o.name, f"The {o.name} is in the image.", (o.name,) + absent)
    raise AssertionError(f"QUESTION_TEMPLATES has {task!r} but question() does not handle it")


def _verification(task: str, q: str, scene: Scene, o: ShapeObject, rng: np.random.Generator,
                  cfg: ShapesConfig) -> QA:
    """A yes/no check of one fact about ``o`` or the scene; true or false with probability 1/2 each."""
    yes = bool(rng.random() < 0.5)
    answer, head = (YES, "Yes") if yes else (NO, "No")
    if task == "check_count":
        if rng.random() < 0.5:
            noun, n = "shapes", len(scene.objects)
        else:
            kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
            noun, n = KIND_PLURALS[kind], scene.count(kind=kind)
        wrong = [m for m in range(cfg.max_objects + 1) if m != n]
        asked = n if yes else wrong[int(rng.integers(len(wrong)))]
        return QA(task, q.format(noun=noun, n=asked), answer, f"{head}, the number of {noun} is {n}.", (YES, NO))
    if task == "check_position":
        wrong = [p for p in ALL_POSITIONS if p != o.position]
        asked = o.position if yes else wrong[int(rng.integers(len(wrong)))]
        return QA(task, q.format(color=o.color, kind=o.kind, at_position=at_position(asked)), answer,
                  f"{head}, the {o.name} is {at_position(o.position)}.", (YES, NO))
    ref = ref_by_kind(scene, o)
    wrong = [c for c in cfg.colors if c != o.color]
    asked = o.color if yes else wrong[int(rng.integers(len(wrong)))]
    return QA(task, q.format(ref=ref, color=asked), answer, f"{head}, {ref} is {o.color}.", (YES, NO))


def pick(rng: np.random.Generator, seq):
    """One element of ``seq``, uniformly."""
    return seq[int(rng.integers(len(seq)))]


def pope_prompt(color: str, kind: str) -> str:
    """A POPE question as LLaVA's ``llava_pope_test.jsonl`` asks it (with the short-answer line)."""
    return f"{POPE_QUESTION.format(color=color, kind=kind)}\n{SHORT_ANSWER_PROMPT}"


def mme_prompt(q: str) -> str:
    """An MME question as LLaVA's ``llava_mme.jsonl`` asks it: the yes/no suffix, then the short-answer line."""
    return f"{q} {YES_NO_PROMPT}\n{SHORT_ANSWER_PROMPT}"


def obj_text(o) -> dict:
    return {"color": o.color, "kind": o.kind}


def mme_questions(subtask: str, scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> tuple[str, str]:
    """(question answered Yes, question answered No) for one image, without the yes/no suffix."""
    objs = scene.objects
    o = pick(rng, objs)
    t = MME_TEMPLATES
    if subtask == "existence":
        color, kind = absent_object(scene, rng, cfg, hard=rng.random() < 0.5)
        return (t["existence"].format(**obj_text(o)), t["existence"].format(color=color, kind=kind))
    if subtask == "count":
        if rng.random() < 0.5:
            noun, n = "shapes", len(objs)
        else:
            kind = pick(rng, cfg.kinds)
            noun, n = KIND_PLURALS[kind], scene.count(kind=kind)
        wrong = pick(rng, [m for m in range(cfg.max_objects + 1) if m != n])
        return t["count"].format(noun=noun, n=n), t["count"].format(noun=noun, n=wrong)
    if subtask == "position":
        wrong = pick(rng, [p for p in ALL_POSITIONS if p != o.position])
        return (t["position"].format(**obj_text(o), at_position=at_position(o.position)),
                t["position"].format(**obj_text(o), at_position=at_position(wrong)))
    if subtask == "color":
        ref = ref_by_kind(scene, o)
        wrong = pick(rng, [c for c in cfg.colors if c != o.color])
        return t["color"].format(ref=ref, color=o.color), t["color"].format(ref=ref, color=wrong)
    if subtask == "numerical_calculation":
        k1, k2 = rng.choice(len(cfg.kinds), size=2, replace=False)
        k1, k2 = cfg.kinds[k1], cfg.kinds[k2]
        n = scene.count(kind=k1) + scene.count(kind=k2)
        wrong = pick(rng, [m for m in (n - 2, n - 1, n + 1, n + 2) if m >= 0])
        kw = dict(kinds=KIND_PLURALS[k1], kinds2=KIND_PLURALS[k2])
        return (t["numerical_calculation"].format(**kw, n=n), t["numerical_calculation"].format(**kw, n=wrong))
    if subtask == "commonsense_reasoning":
        # A relation that holds for an ordered pair (a, b) and fails for (b, a).
        rels = [(name, a, b) for a in objs for b in objs if a is not b
                for name, holds in (("left", a.col < b.col), ("above", a.row < b.row),
                                    ("bigger", a.size == "large" and b.size == "small")) if holds]
        if not rels:
            raise ValueError("commonsense_reasoning needs a scene with two objects in different cells")
        name, a, b = pick(rng, rels)

        def fmt(x, y):
            return t[name].format(color=x.color, kind=x.kind, color2=y.color, kind2=y.kind)

        return fmt(a, b), fmt(b, a)
    raise ValueError(f"unknown MME subtask {subtask!r}; expected one of {MME_PERCEPTION + MME_COGNITION}.")


# ---------------------------------------------------------------------------------------------------
# ScienceQA-IMG (the benchmark files, and the probes asked in its format).

SQA_TEMPLATES = {
    "color": "Which color is {ref}?",
    "shape": "Which shape is {color}?",
    "count": "How many shapes are in the image?",
    "present": "Which of these shapes is in the image?",
    "position": "Where is the {color} {kind}?",
    "sides": "How many sides does a {kind} have?",
    "is_color": "Which of these words is a color?",
    "sum": "What is {a} plus {b}?",
}
SQA_CONTEXT = "Context: {hint}"
SQA_HINTS = ("The image shows simple shapes on a gray background.", "N/A")


def sqa_problem(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig, with_image: bool) -> dict:
    """One multiple-choice problem: question, choices (2-4), answer index."""
    t = SQA_TEMPLATES
    if with_image:
        task = pick(rng, ("color", "shape", "count", "present", "position"))
        o = pick(rng, scene.objects)
        if task == "color":
            q, answer, domain = t["color"].format(ref=ref_by_kind(scene, o)), o.color, cfg.colors
        elif task == "shape":
            # The colour must name one object for the question to have one answer.
            uniq = [x for x in scene.objects if scene.count(color=x.color) == 1]
            if not uniq:
                task, q, answer, domain = "count", t["count"], str(len(scene.objects)), [
                    str(i) for i in range(1, cfg.max_objects + 1)]
            else:
                o = pick(rng, uniq)
                q, answer, domain = t["shape"].format(color=o.color), o.kind, cfg.kinds
        elif task == "count":
            q, answer, domain = t["count"], str(len(scene.objects)), [str(i) for i in range(1, cfg.max_objects + 1)]
        elif task == "present":
            absent = [f"{c} {k}" for c in cfg.colors for k in cfg.kinds if f"{c} {k}" not in scene.names()]
            q, answer, domain = t["present"], o.name, [o.name] + absent
        else:
            q, answer, domain = t["position"].format(color=o.color, kind=o.kind), o.position, ALL_POSITIONS
    else:
        task = pick(rng, ("sides", "is_color", "sum"))
        if task == "sides":
            kind = pick(rng, ("triangle", "square"))
            q, answer, domain = t["sides"].format(kind=kind), str(SIDES[kind]), ["2", "3", "4", "5", "6"]
        elif task == "is_color":
            q, answer = t["is_color"], pick(rng, cfg.colors)
            domain = [answer] + list(cfg.kinds)
        else:
            a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
            q, answer = t["sum"].format(a=a, b=b), str(a + b)
            domain = [str(v) for v in range(max(0, a + b - 3), a + b + 4)]
    n_choices = int(rng.integers(2, 5))
    distractors = [d for d in domain if d != answer]
    picked = [distractors[i] for i in rng.choice(len(distractors), size=min(n_choices - 1, len(distractors)),
                                                 replace=False)]
    choices = picked + [answer]
    choices = [choices[i] for i in rng.permutation(len(choices))]
    return {"task": task, "question": q, "choices": choices, "answer": choices.index(answer)}


def sqa_text(question: str, choices: Sequence[str], hint: str) -> str:
    """A ScienceQA problem's text as LLaVA's ``llava_test_CQM-A.json`` holds it (the evaluation appends
    :data:`OPTION_PROMPT`); as the LLaVA converter does, an empty hint becomes "N/A"."""
    options = "\n".join(f"{OPTION_LETTERS[j]}. {c}" for j, c in enumerate(choices))
    return f"{SQA_CONTEXT.format(hint=hint or 'N/A')}\n{question}\n{options}"


def multiple_choice(qa: QA, rng: np.random.Generator, n_options: int = 4) -> tuple[str, str, tuple[str, ...]]:
    """(question with lettered options, correct letter, options) in the LLaVA-1.5 option-only format."""
    distractors = [c for c in qa.choices if c != qa.answer]
    k = min(n_options - 1, len(distractors))
    picked = [distractors[i] for i in rng.choice(len(distractors), size=k, replace=False)]
    options = picked + [qa.answer]
    order = rng.permutation(len(options))
    options = tuple(options[i] for i in order)
    letter = OPTION_LETTERS[options.index(qa.answer)]
    lines = "\n".join(f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return f"{qa.question}\n{lines}\n{OPTION_PROMPT}", letter, options


def _format_turn(qa: QA, style: str, rng: np.random.Generator) -> tuple[str, str]:
    if style == "short":
        return f"{qa.question}\n{SHORT_ANSWER_PROMPT}", qa.answer
    if style == "yesno":
        return f"{qa.question} {YES_NO_PROMPT}", _cap(qa.answer)
    if style == "choice":
        text, letter, _ = multiple_choice(qa, rng)
        return text, letter
    if style == "free":
        return qa.question, qa.long_answer
    raise ValueError(f"unknown answer style {style!r}")


IMAGE_TASKS = ("color", "shape", "count_all", "count_color", "count_kind", "position", "existence", "size",
               "left_of", "above", "check_count", "check_position", "check_color", "present")
# Tasks asked only with lettered options (their short answer alone would not say which options were offered).
CHOICE_ONLY_TASKS = ("present",)


def image_conversation(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> list[dict]:
    """A 1-3 turn LLaVA conversation about ``scene``; the first human turn carries ``<image>``."""
    n_turns = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.12:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        turns.append((prompt, caption(scene, rng)))
    while len(turns) < n_turns:
        qa = question(IMAGE_TASKS[int(rng.integers(len(IMAGE_TASKS)))], scene, rng, cfg)
        if qa is None:
            continue
        if qa.task in CHOICE_ONLY_TASKS:
            style = "choice"
        else:
            styles = ["short", "choice", "free"] + (["yesno"] if qa.choices == (YES, NO) else [])
            probs = [0.5, 0.2, 0.3] + ([0.25] if len(styles) == 4 else [])
            style = styles[int(rng.choice(len(styles), p=np.asarray(probs) / sum(probs)))]
        turns.append(_format_turn(qa, style, rng))
    first = turns[0][0]
    # Real LLaVA files put <image> before or (less often) after the first question.
    first = f"{IMAGE_TOKEN}\n{first}" if rng.random() < 0.85 else f"{first}\n{IMAGE_TOKEN}"
    turns[0] = (first, turns[0][1])
    return _to_conversation(turns)


def text_only_turn(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[str, str, str]:
    """(question, short answer, sentence answer) about arithmetic or the corpus' own words; no image."""
    which = int(rng.integers(len(TEXT_ONLY_TEMPLATES)))
    q, long = TEXT_ONLY_TEMPLATES[which]
    if which in (0, 1, 4):
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        if which == 1 and b > a:
            a, b = b, a
        if which == 4 and a == b:
            b = (a + 1) % 10
        c = {0: a + b, 1: a - b, 4: max(a, b)}[which]
        return q.format(a=a, b=b), str(c), long.format(a=a, b=b, c=c)
    if which == 2:
        kind = ("triangle", "square", "circle")[int(rng.integers(3))]
        c = SIDES[kind]
        return q.format(kind=kind), str(c), long.format(kind=kind, c=c)
    if rng.random() < 0.5:
        word, c = cfg.colors[int(rng.integers(len(cfg.colors)))], "color"
    else:
        word, c = cfg.kinds[int(rng.integers(len(cfg.kinds)))], "shape"
    return q.format(word=word), c, long.format(Word=_cap(word), c=c)


def text_conversation(rng: np.random.Generator, cfg: ShapesConfig) -> list[dict]:
    """A 1-2 turn text-only conversation (like the ShareGPT rows of mix665k: no image key)."""
    turns = []
    for _ in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
        q, short, long = text_only_turn(rng, cfg)
        turns.append((f"{q}\n{SHORT_ANSWER_PROMPT}", short) if rng.random() < 0.6 else (q, long))
    return _to_conversation(turns)


def _to_conversation(turns: Iterable[tuple[str, str]]) -> list[dict]:
    conv = []
    for human, gpt in turns:
        conv.append({"from": "human", "value": human})
        conv.append({"from": "gpt", "value": gpt})
    return conv


def text_inventory() -> tuple[str, ...]:
    """Every template and word this module can emit (the tokenizer's vocabulary is derived from it)."""
    words = list(ALL_KINDS) + list(KIND_PLURALS.values()) + list(PALETTE) + list(SIZES) + list(ALL_POSITIONS)
    words += list(NUMBER_WORDS) + list(OPTION_LETTERS) + [str(i) for i in range(21)] + [YES, NO, "color", "shape"]
    texts = list(CAPTION_TEMPLATES) + list(DESCRIBE_PROMPTS) + list(QUESTION_TEMPLATES.values())
    texts += list(REF_TEMPLATES) + list(LONG_ANSWER_TEMPLATES)
    texts += [t for pair in TEXT_ONLY_TEMPLATES for t in pair]
    texts += [SHORT_ANSWER_PROMPT, YES_NO_PROMPT, OPTION_PROMPT, "a an is are shape shapes at the in center , and"]
    return tuple(words + texts)

