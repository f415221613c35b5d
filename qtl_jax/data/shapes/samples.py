"""Samples of the shapes corpus: their addresses, random streams and LLaVA records.

Samples are pure functions of ``(seed, stream, index)``: the per-sample generators come from
``np.random.SeedSequence([seed, stream, index])``, so any sample can be regenerated alone, in any order,
and the training streams never share a random stream with the benchmark streams (``STREAMS``; a new
benchmark gets a new stream number here).

The records use the LLaVA JSON formats (``blip_laion_cc_sbu_558k.json`` for stage 1,
``llava_v1_5_mix665k.json`` for stage 2), so the real-data code paths read them unchanged.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from qtl_jax.data.shapes.scene import Scene, ShapesConfig, render, sample_scene
from qtl_jax.data.shapes.text import IMAGE_TOKEN, caption, image_conversation, text_conversation

# Disjoint random streams: training never shares a SeedSequence with a benchmark, whatever the seeds.
STREAMS = {"pretrain": 0, "instruct": 1, "mme": 2, "pope": 3, "scienceqa": 4, "vqa": 5, "textvqa": 6}


@dataclasses.dataclass(frozen=True)
class Sample:
    """A generated sample: the image (uint8 HxWx3, None for text-only), its scene and its LLaVA record."""

    image: np.ndarray | None
    scene: Scene | None
    record: dict


def sample_rngs(seed: int, stream: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent (scene, render, text) generators for one sample, a pure function of its address."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {sorted(STREAMS)}.")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed}, index={index}.")
    children = np.random.SeedSequence([int(seed), STREAMS[stream], int(index)]).spawn(3)
    return tuple(np.random.default_rng(c) for c in children)


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

