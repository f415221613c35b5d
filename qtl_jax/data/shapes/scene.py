"""Scenes of the shapes corpus: what a scene is, how one is drawn at random, and how it is rendered.

A scene holds 1-4 coloured shapes on a textured grey background. Everything a question asks about is
decided by the scene, never by the pixels, and the distractors (background texture, pixel noise, thin grey
lines under the shapes) are chosen so they cannot change an answer:

* every object sits in its own cell of a 3x3 grid, so "where" has one answer and shapes never overlap;
* (colour, kind) pairs are unique in a scene, so "the red circle" always names exactly one object;
* the background and lines are neutral grey, far from every palette colour.

Both functions take an explicit generator; ``samples.sample_rngs`` gives each sample its own.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

ALL_KINDS = ("circle", "square", "triangle", "cross", "star")
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
BLANK_GREY = 128  # the pixel value of every image when ShapesConfig.blank is set


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
    # Image-blind control: every image is one flat grey (128, which the SigLIP normalisation maps to ~0) while
    # scenes and text stay exactly those of blank=False (the text has its own generator).
    blank: bool = False

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
    """Draws ``scene`` over a noisy textured grey background; returns uint8 (H, W, 3).

    With ``cfg.blank`` the image is flat grey: nothing of the scene is drawn.
    """
    s = scene.image_size
    if cfg.blank:
        return np.full((s, s, 3), BLANK_GREY, np.uint8)
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

