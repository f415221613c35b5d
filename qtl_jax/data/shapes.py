"""The built-in "shapes" vision-language corpus: procedural scenes, captions and instructions.

This machine (and CI) cannot download LLaVA data, so the demo model trains on scenes drawn here: 1-4
coloured shapes on a textured grey background. Everything a question asks about is decided by the scene,
never by the pixels, and the distractors (background texture, pixel noise, thin grey lines under the
shapes) are chosen so they cannot change an answer:

* every object sits in its own cell of a 3x3 grid, so "where" has one answer and shapes never overlap;
* (colour, kind) pairs are unique in a scene, so "the red circle" always names exactly one object;
* the background and lines are neutral grey, far from every palette colour.

Samples are pure functions of ``(seed, stream, index)``: the per-sample RNG comes from
``np.random.SeedSequence([seed, stream, index])``, so any sample can be regenerated alone, in any order,
and the training streams never share a random stream with the benchmark streams (``STREAMS``).

The files written by :func:`write_corpus` use the LLaVA JSON formats (``blip_laion_cc_sbu_558k.json`` for
stage 1, ``llava_v1_5_mix665k.json`` for stage 2) so the real-data code paths read them unchanged;
``qtl_jax.data.benchmark_files`` writes the held-out evaluation sets next to them.

Every sentence is built from the template and word lists in this module; :func:`text_inventory` lists
them so the word-level tokenizer (``qtl_jax.data.shapes_tokenizer``) covers every word by construction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------
# Vocabulary of the scenes.

ALL_KINDS = ("circle", "square", "triangle", "cross", "star")
KIND_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
                "star": "stars"}
# Saturated colours far apart in RGB and far from the neutral greys of the background and lines.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 215),
}
SIZES = ("small", "large")
# Position names of the 3x3 grid cells, indexed [row][col].
POSITIONS = (("top left", "top", "top right"),
             ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
ALL_POSITIONS = tuple(p for row in POSITIONS for p in row)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OPTION_LETTERS = ("A", "B", "C", "D", "E")

# Disjoint random streams: training never shares a SeedSequence with a benchmark, whatever the seeds.
STREAMS = {"pretrain": 0, "instruct": 1, "mme": 2, "pope": 3, "scienceqa": 4, "vqa": 5}

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
YES_NO_PROMPT = "Please answer yes or no."
OPTION_PROMPT = "Answer with the option's letter from the given choices directly."
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """How scenes are drawn. The defaults are the demo's: small, clean and learnable at 64 px."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    kinds: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colors: tuple[str, ...] = tuple(PALETTE)
    # Mildly skewed frequencies so POPE's "popular" split (most frequent absent objects) means something.
    kind_weights: tuple[float, ...] | None = (0.31, 0.27, 0.23, 0.19)
    color_weights: tuple[float, ...] | None = (0.22, 0.2, 0.18, 0.16, 0.13, 0.11)
    # Chance that a new object copies the colour or the kind of an earlier one: objects then co-occur with
    # similar ones, which gives POPE's "adversarial" (co-occurrence) negatives their bite.
    share_prob: float = 0.4
    # Fractions of the image size. At 64 px a small shape is ~13 px wide: a from-scratch tiny ViT (patch 8)
    # told circle/square/cross apart for only ~58 % of ~11 px shapes (99 % of large ones) in a probe.
    small_radius: float = 0.105
    large_radius: float = 0.145
    noise_std: float = 5.0  # per-pixel Gaussian noise, 0-255 scale
    texture_strength: float = 22.0  # amplitude of the smooth background texture
    max_lines: int = 3  # thin grey distractor lines drawn under the shapes
    shade_jitter: int = 12  # per-object colour jitter, small against palette distances

    def __post_init__(self):
        if self.image_size < 24:
            raise ValueError(f"image_size={self.image_size} is too small to draw 3x3 cells of shapes; use >= 24.")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 9 (one object per grid cell), got "
                             f"min_objects={self.min_objects}, max_objects={self.max_objects}.")
        unknown = [k for k in self.kinds if k not in ALL_KINDS] + [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown kinds/colours {unknown}; choose from {ALL_KINDS} and {tuple(PALETTE)}.")
        if len(self.kinds) < 2 or len(self.colors) < 2:
            raise ValueError("need at least 2 kinds and 2 colours so that questions have wrong answers.")
        if self.max_objects > len(self.kinds) * len(self.colors):
            raise ValueError("max_objects exceeds the number of distinct (colour, kind) pairs.")
        for name, weights, values in (("kind_weights", self.kind_weights, self.kinds),
                                      ("color_weights", self.color_weights, self.colors)):
            if weights is not None and (len(weights) != len(values) or min(weights) <= 0):
                raise ValueError(f"{name} must have one positive weight per entry of {values}, got {weights}; "
                                 f"pass {name}=None for uniform frequencies.")
        if not 0 < self.small_radius < self.large_radius <= 0.15:
            raise ValueError("need 0 < small_radius < large_radius <= 0.15 so a large shape fits in its cell.")

    def kind_probs(self) -> np.ndarray:
        w = np.ones(len(self.kinds)) if self.kind_weights is None else np.asarray(self.kind_weights, float)
        return w / w.sum()

    def color_probs(self) -> np.ndarray:
        w = np.ones(len(self.colors)) if self.color_weights is None else np.asarray(self.color_weights, float)
        return w / w.sum()


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn shape. ``bbox`` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    kind: str
    color: str
    size: str
    row: int
    col: int
    center: tuple[float, float]  # (x, y)
    radius: float
    bbox: tuple[int, int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[ShapeObject, ...]

    def count(self, *, color: str | None = None, kind: str | None = None) -> int:
        return sum(1 for o in self.objects
                   if (color is None or o.color == color) and (kind is None or o.kind == kind))

    def names(self) -> set[str]:
        return {o.name for o in self.objects}

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "objects": [dataclasses.asdict(o) for o in self.objects]}


@dataclasses.dataclass(frozen=True)
class Sample:
    """A generated sample: the image (uint8 HxWx3, None for text-only), its scene and its LLaVA record."""

    image: np.ndarray | None
    scene: Scene | None
    record: dict


# ---------------------------------------------------------------------------------------------------
# Scenes and images.

def sample_rngs(seed: int, stream: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent (scene, render, text) generators for one sample, a pure function of its address."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {sorted(STREAMS)}.")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed}, index={index}.")
    children = np.random.SeedSequence([int(seed), STREAMS[stream], int(index)]).spawn(3)
    return tuple(np.random.default_rng(c) for c in children)


def _shape_extent(kind: str) -> float:
    # Half-extent of each drawn kind in units of its radius (used for bbox and the in-cell jitter).
    return {"circle": 1.0, "square": 0.9, "triangle": 1.0, "cross": 1.0, "star": 1.0}[kind]


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig) -> Scene:
    """Draws 1-4 objects (cfg bounds) with unique (colour, kind), one per grid cell."""
    s = cfg.image_size
    cell = s / 3
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    kp, cp = cfg.kind_probs(), cfg.color_probs()
    used: set[tuple[str, str]] = set()
    objects = []
    for i, c in enumerate(cells):
        while True:
            color = cfg.colors[rng.choice(len(cfg.colors), p=cp)]
            kind = cfg.kinds[rng.choice(len(cfg.kinds), p=kp)]
            if objects and rng.random() < cfg.share_prob:
                other = objects[int(rng.integers(len(objects)))]
                if rng.random() < 0.5:
                    color = other.color
                else:
                    kind = other.kind
            if (color, kind) not in used:
                break
        used.add((color, kind))
        size = SIZES[int(rng.integers(2))]
        radius = (cfg.small_radius if size == "small" else cfg.large_radius) * s
        row, col = divmod(int(c), 3)
        half = radius * _shape_extent(kind)
        jitter = max(0.0, cell / 2 - half - 1.0)
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        bbox = (max(0, math.floor(cx - half)), max(0, math.floor(cy - half)),
                min(s, math.ceil(cx + half) + 1), min(s, math.ceil(cy + half) + 1))
        objects.append(ShapeObject(kind=kind, color=color, size=size, row=row, col=col,
                                   center=(float(cx), float(cy)), radius=float(radius), bbox=bbox))
    return Scene(image_size=s, objects=tuple(objects))


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        # Equilateral, pointing up, centroid at the centre (so the centre pixel is inside).
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if kind == "cross":
        t = 0.3 * r  # half arm thickness: thin arms keep small crosses unlike circles
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"no polygon for kind {kind!r}")


def render(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> np.ndarray:
    """Draws ``scene`` over a noisy textured grey background; returns uint8 (H, W, 3)."""
    s = scene.image_size
    base = rng.uniform(50.0, 100.0)
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4)).astype(np.float32) * cfg.texture_strength
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((s, s), Image.BILINEAR))
    tint = rng.uniform(-4.0, 4.0, size=3)  # keeps the background grey, never a palette hue
    bg = np.clip(base + texture[..., None] + tint, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, mode="RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, cfg.max_lines + 1))):
        g = int(rng.integers(110, 171))
        x0, y0, x1, y1 = rng.uniform(0, s, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=1)
    for o in scene.objects:
        fill = tuple(int(np.clip(v + rng.integers(-cfg.shade_jitter, cfg.shade_jitter + 1), 0, 255))
                     for v in PALETTE[o.color])
        cx, cy = o.center
        r = o.radius
        if o.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.kind == "square":
            h = 0.9 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(_polygon(o.kind, cx, cy, r), fill=fill)
    # Mostly luminance noise (shared by the channels) so the background stays grey pixel by pixel.
    noise = rng.normal(0.0, cfg.noise_std, size=(s, s, 1)) + rng.normal(0.0, 1.5, size=(s, s, 3))
    noisy = np.asarray(img, dtype=np.float32) + noise
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Text. Every sentence below is assembled from these templates and the word lists above.

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
    raise AssertionError(f"QUESTION_TEMPLATES has {task!r} but question() does not handle it")


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
               "left_of", "above")


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


# ---------------------------------------------------------------------------------------------------
# Samples and files.

def image_path(split: str, index: int) -> str:
    """Image path relative to the image root (``<out_dir>/images``), like LLaVA's relative paths."""
    return f"{split}/{index:07d}.png"


def sample_id(seed: int, split: str, index: int) -> str:
    return f"shapes-s{seed}-{split}-{index:07d}"


def scene_and_image(seed: int, stream: str, index: int, cfg: ShapesConfig) -> tuple[Scene, np.ndarray,
                                                                                   np.random.Generator]:
    """The scene and image of sample ``index`` of ``stream``, and that sample's text generator."""
    scene_rng, render_rng, text_rng = sample_rngs(seed, stream, index)
    scene = sample_scene(scene_rng, cfg)
    return scene, render(scene, render_rng, cfg), text_rng


def pretrain_sample(seed: int, index: int, cfg: ShapesConfig = ShapesConfig()) -> Sample:
    """Stage-1 sample (``blip_laion_cc_sbu_558k.json`` style: one ``<image>`` turn and a caption)."""
    scene, image, rng = scene_and_image(seed, "pretrain", index, cfg)
    record = {"id": sample_id(seed, "pretrain", index), "image": image_path("pretrain", index),
              "conversations": [{"from": "human", "value": IMAGE_TOKEN},
                                {"from": "gpt", "value": caption(scene, rng)}]}
    return Sample(image=image, scene=scene, record=record)


def instruct_sample(seed: int, index: int, cfg: ShapesConfig = ShapesConfig(),
                    text_only_fraction: float = 0.1) -> Sample:
    """Stage-2 sample (``llava_v1_5_mix665k.json`` style); a ``text_only_fraction`` have no image."""
    scene, image, rng = scene_and_image(seed, "instruct", index, cfg)
    sid = sample_id(seed, "instruct", index)
    if rng.random() < text_only_fraction:
        return Sample(image=None, scene=None, record={"id": sid, "conversations": text_conversation(rng, cfg)})
    record = {"id": sid, "image": image_path("instruct", index),
              "conversations": image_conversation(scene, rng, cfg)}
    return Sample(image=image, scene=scene, record=record)


def save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def _write_split(out_dir: str, split: str, n: int, make, with_scenes: bool) -> list[dict]:
    records = []
    scenes = []
    for i in range(n):
        sample = make(i)
        if sample.image is not None:
            save_png(sample.image, os.path.join(out_dir, "images", sample.record["image"]))
        records.append(sample.record)
        if with_scenes:
            scenes.append({"id": sample.record["id"],
                           "scene": None if sample.scene is None else sample.scene.to_json()})
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(records, f, indent=1)
    if with_scenes:
        with open(os.path.join(out_dir, f"{split}_scenes.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in scenes)
    return records


def write_corpus(out_dir: str, *, seed: int = 0, n_pretrain: int = 2000, n_instruct: int = 2000,
                 image_size: int = 64, cfg: ShapesConfig | None = None, text_only_fraction: float = 0.1,
                 benchmarks: bool = True, bench_sizes: dict | None = None, with_scenes: bool = True) -> dict:
    """Writes the corpus under ``out_dir`` and returns the counts written.

    Layout: ``images/{pretrain,instruct}/*.png``, ``pretrain.json`` and ``instruct.json`` (LLaVA JSON,
    image paths relative to ``images/``), ``*_scenes.jsonl`` (the ground-truth scene per id) and, with
    ``benchmarks``, the held-out evaluation sets under ``eval/`` (see ``benchmark_files.write_benchmarks``).
    """
    if n_pretrain < 0 or n_instruct < 0:
        raise ValueError(f"sample counts must be >= 0, got n_pretrain={n_pretrain}, n_instruct={n_instruct}.")
    if cfg is None:
        cfg = ShapesConfig(image_size=image_size)
    elif cfg.image_size != image_size:
        raise ValueError(f"image_size={image_size} disagrees with cfg.image_size={cfg.image_size}; pass one.")
    os.makedirs(out_dir, exist_ok=True)
    counts: dict = {}
    t0 = time.perf_counter()
    pre = _write_split(out_dir, "pretrain", n_pretrain, lambda i: pretrain_sample(seed, i, cfg), with_scenes)
    counts["pretrain"] = len(pre)
    ins = _write_split(out_dir, "instruct", n_instruct,
                       lambda i: instruct_sample(seed, i, cfg, text_only_fraction), with_scenes)
    counts["instruct"] = len(ins)
    counts["instruct_text_only"] = sum(1 for r in ins if "image" not in r)
    counts["train_seconds"] = time.perf_counter() - t0
    if benchmarks:
        from qtl_jax.data import benchmark_files  # local import: benchmark_files imports this module

        t1 = time.perf_counter()
        counts["eval"] = benchmark_files.write_benchmarks(os.path.join(out_dir, "eval"), seed=seed, cfg=cfg,
                                                          **(bench_sizes or {}))
        counts["eval_seconds"] = time.perf_counter() - t1
    with open(os.path.join(out_dir, "corpus_info.json"), "w") as f:
        json.dump({"seed": seed, "config": dataclasses.asdict(cfg), "text_only_fraction": text_only_fraction,
                   "counts": {k: v for k, v in counts.items() if not k.endswith("seconds")}}, f, indent=1)
    return counts


def text_inventory() -> tuple[str, ...]:
    """Every template and word this module can emit (the tokenizer's vocabulary is derived from it)."""
    words = list(ALL_KINDS) + list(KIND_PLURALS.values()) + list(PALETTE) + list(SIZES) + list(ALL_POSITIONS)
    words += list(NUMBER_WORDS) + list(OPTION_LETTERS) + [str(i) for i in range(21)] + [YES, NO, "color", "shape"]
    texts = list(CAPTION_TEMPLATES) + list(DESCRIBE_PROMPTS) + list(QUESTION_TEMPLATES.values())
    texts += list(REF_TEMPLATES) + list(LONG_ANSWER_TEMPLATES)
    texts += [t for pair in TEXT_ONLY_TEMPLATES for t in pair]
    texts += [SHORT_ANSWER_PROMPT, YES_NO_PROMPT, OPTION_PROMPT, "a an is are shape shapes at the in center , and"]
    return tuple(words + texts)


def preview_grid(path: str, *, seed: int = 0, n: int = 8, cfg: ShapesConfig = ShapesConfig(),
                 columns: int = 4) -> None:
    """Saves a PNG of ``n`` instruction samples (image, caption, first QA) to look at what the corpus is."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 5.2 * rows))
    shown, index = 0, 0
    for ax in np.asarray(axes).reshape(-1):
        ax.axis("off")
    while shown < n:
        sample = instruct_sample(seed, index, cfg)
        index += 1
        if sample.image is None:
            continue
        # A caption of the same scene, so the picture shows both training stages' text.
        cap = caption(sample.scene, np.random.default_rng([seed, index]))
        ax = np.asarray(axes).reshape(-1)[shown]
        ax.imshow(sample.image, interpolation="nearest")
        conv = sample.record["conversations"]
        q = conv[0]["value"].replace(IMAGE_TOKEN, "").strip().replace("\n", " ")
        text = (textwrap.fill("caption: " + cap, 44) + "\n" + textwrap.fill("Q: " + q, 44) + "\n"
                + textwrap.fill("A: " + conv[1]["value"], 44))
        ax.set_title(sample.record["id"], fontsize=8)
        ax.text(0, 1.02 * cfg.image_size, text, fontsize=6.5, va="top", ha="left", family="monospace",
                transform=ax.transData)
        shown += 1
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# CLI.

def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m qtl_jax.data.shapes",
                                description="Write the built-in shapes corpus and its benchmark files.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_pretrain", type=int, default=2000)
    p.add_argument("--n_instruct", type=int, default=2000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--text_only_fraction", type=float, default=0.1)
    p.add_argument("--n_mme", type=int, default=30, help="images per MME subtask (2 questions each)")
    p.add_argument("--n_pope", type=int, default=50, help="POPE images (6 questions each per split)")
    p.add_argument("--n_scienceqa", type=int, default=200)
    p.add_argument("--n_vqa", type=int, default=200, help="VQA images (2 questions each)")
    p.add_argument("--no_benchmarks", action="store_true")
    p.add_argument("--tokenizer", action="store_true", help="also write the word-level tokenizer to OUT/tokenizer")
    p.add_argument("--preview", default=None, help="also save a PNG grid of samples to this path")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = write_corpus(a.out, seed=a.seed, n_pretrain=a.n_pretrain, n_instruct=a.n_instruct,
                          image_size=a.image_size, text_only_fraction=a.text_only_fraction,
                          benchmarks=not a.no_benchmarks,
                          bench_sizes=dict(n_mme=a.n_mme, n_pope=a.n_pope, n_scienceqa=a.n_scienceqa, n_vqa=a.n_vqa))
    n_train = counts["pretrain"] + counts["instruct"]
    print(f"wrote {a.out}: pretrain.json {counts['pretrain']} samples, instruct.json {counts['instruct']} samples "
          f"({counts['instruct_text_only']} text-only) in {counts['train_seconds']:.2f} s "
          f"({n_train / max(counts['train_seconds'], 1e-9):.0f} samples/s)")
    for name, value in counts.get("eval", {}).items():
        print(f"  eval/{name}: {value}")
    if "eval_seconds" in counts:
        print(f"  benchmarks written in {counts['eval_seconds']:.2f} s")
    if a.tokenizer:
        from qtl_jax.data.shapes_tokenizer import build_shapes_tokenizer

        tok = build_shapes_tokenizer(os.path.join(a.out, "tokenizer"))
        print(f"  tokenizer: {len(tok)} tokens -> {os.path.join(a.out, 'tokenizer')}")
    if a.preview:
        preview_grid(a.preview, seed=a.seed, n=8, cfg=ShapesConfig(image_size=a.image_size))
        print(f"  preview: {a.preview}")
    print(f"total {time.perf_counter() - t0:.2f} s")
    return counts


if __name__ == "__main__":
    main()
