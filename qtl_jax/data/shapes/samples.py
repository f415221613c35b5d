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
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from qtl_jax.data.shapes.scene import Scene, ShapesConfig, render, sample_scene
from qtl_jax.data.shapes.text import (IMAGE_TOKEN, MME_PERCEPTION, OPTION_LETTERS, OPTION_PROMPT, PROBE_FORMATS,
                                      SQA_HINTS, caption, image_conversation, mme_prompt, mme_questions, pick,
                                      pope_prompt, sqa_problem, sqa_text, text_conversation)

# Images a hard POPE negative (probe format 'pope_hard') searches for the best shared colour / kind.
HARD_SEARCH = 32
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


def is_probe(index: int, probe_fraction: float) -> bool:
    """Whether stage-2 sample ``index`` is a benchmark-format yes/no probe (:func:`instruct_sample`).

    Probes come in pairs (2m, 2m + 1): the even one is answered Yes, the odd one No, so the probes are
    balanced exactly, and pair m is a probe pair when floor((m + 1) f) > floor(m f), i.e. exactly
    floor(M f) of the first M pairs, evenly spread.
    """
    if not 0.0 <= probe_fraction <= 1.0:
        raise ValueError(f"probe_fraction={probe_fraction} must be in [0, 1].")
    m = index // 2
    return math.floor((m + 1) * probe_fraction) > math.floor(m * probe_fraction)


def instruct_has_image(seed: int, index: int, text_only_fraction: float, probe_fraction: float) -> bool:
    """Whether stage-2 sample ``index`` has an image, without generating it (the text-only coin is the first
    draw of the sample's text generator, as in :func:`instruct_sample`)."""
    if is_probe(index, probe_fraction):
        return True
    return not sample_rngs(seed, "instruct", index)[2].random() < text_only_fraction


def absent_from_other_image(seed: int, index: int, scene: Scene, rng: np.random.Generator, cfg: ShapesConfig,
                            text_only_fraction: float, probe_fraction: float, hard: bool = False) -> tuple[str, str]:
    """A (colour, kind) absent from ``scene`` that is in the image of another stage-2 sample.

    As POPE draws its negatives from objects annotated in other images of the set: the other samples are
    tried in a random order among the earlier indices first (always in the corpus), then the later ones.
    ``hard`` (probe format ``pope_hard``) prefers a negative that shares its colour and its kind with present
    objects, then its colour, then its kind (the best among the first :data:`HARD_SEARCH` images with an absent
    object): "is there a red X?" can then not be answered from the colour alone (nor the kind alone), which is
    how a model answers the benchmark's adversarial negatives wrongly (docs/experiments.md, session 26).
    """
    present = scene.names()
    colours = {o.color for o in scene.objects}
    kinds = {o.kind for o in scene.objects}
    earlier = [int(j) for j in rng.permutation(index)]
    best, best_score, searched = None, -1, 0
    for j in earlier + list(range(index + 1, index + 1 + 64)):
        if best is not None and j > index:  # a later image only when no earlier one has a candidate
            return best
        if not instruct_has_image(seed, j, text_only_fraction, probe_fraction):
            continue
        other = sample_scene(sample_rngs(seed, "instruct", j)[0], cfg)
        absent = [o for o in other.objects if o.name not in present]
        if not absent:
            continue
        if not hard:
            o = pick(rng, absent)
            return o.color, o.kind
        scores = [2 * (o.color in colours) + (o.kind in kinds) for o in absent]
        top = max(scores)
        if top > best_score:
            o = pick(rng, [o for o, sc in zip(absent, scores) if sc == top])
            best, best_score = (o.color, o.kind), top
        searched += 1
        if best_score == 3 or searched == HARD_SEARCH:
            return best
    if best is not None:
        return best
    raise ValueError(f"no image near stage-2 sample {index} has an object absent from it; use more colours or kinds.")


def check_probe_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` as a tuple, or a ValueError naming the bad entry and the valid ones."""
    formats = tuple(formats)
    valid = ("pope", "pope_hard") + MME_PERCEPTION + ("scienceqa",)
    bad = [f for f in formats if f not in valid]
    if not formats or bad:
        raise ValueError(f"probe_formats={','.join(formats)!r}: give one or more of {', '.join(valid)} "
                         f"(comma-separated; a format may repeat to weight it).")
    return formats


def parse_probe_formats(text: str) -> tuple[str, ...]:
    """Formats from a comma-separated config / CLI value (``''``: the default mix, :data:`PROBE_FORMATS`)."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return check_probe_formats(parts or PROBE_FORMATS)


def probe_conversation(seed: int, index: int, scene: Scene, rng: np.random.Generator, cfg: ShapesConfig,
                       text_only_fraction: float, probe_fraction: float, turns: int = 1,
                       formats: Sequence[str] = PROBE_FORMATS) -> list[dict]:
    """``turns`` questions about ``scene``, each exactly as a benchmark asks it, the first with the image: yes/no
    questions (POPE, or an MME perception subtask; ``pope_hard``: POPE's question whose negatives share a colour
    or kind with present objects, see :func:`absent_from_other_image`) or, format ``scienceqa``, a
    ScienceQA-IMG lettered-option problem (its file's text plus the option prompt the evaluation appends,
    answered with the letter; such a turn ignores the yes/no pattern below).

    Turn j takes the ``formats`` (default :data:`PROBE_FORMATS`) in turn from the pair's own offset. The first
    turn is answered Yes for an even ``index``; the later turns follow a random pattern drawn once per pair (2m, 2m + 1), Yes/No for the even
    sample and its complement for the odd one, so the pair is balanced exactly turn by turn while no answer
    can be predicted from the earlier answers of its sample (a fixed alternation could). A later turn never
    repeats an earlier prompt of the sample (it could be answered by copying): when the scene leaves only
    repeats in a format, the next format is tried. Only when every format has only repeats left is a question
    asked again (with ``formats`` POPE and existence alone, a one-object scene has two Yes questions: about 8 %
    of such rows).
    """
    if turns < 1:
        raise ValueError(f"probe_turns={turns} must be >= 1 (yes/no questions per probe sample).")
    formats = check_probe_formats(formats)
    pair = math.floor((index // 2) * probe_fraction)  # how many probe pairs come before this one
    pattern = np.random.default_rng((seed, index // 2, 0x70B3)).random(turns) < 0.5
    pattern[0] = True
    conversation: list[dict] = []
    asked: set[str] = set()
    for j in range(turns):
        yes = bool(pattern[j]) == (index % 2 == 0)
        for attempt in range(4 * len(formats)):
            fmt = formats[(pair + j + attempt // 4) % len(formats)]
            if fmt == "scienceqa":  # a lettered-option problem, as ScienceQA-IMG asks it (yes is not used)
                problem = sqa_problem(scene, rng, cfg, with_image=True)
                hint = SQA_HINTS[0] if rng.random() < 0.5 else ""
                prompt = f"{sqa_text(problem['question'], problem['choices'], hint)}\n{OPTION_PROMPT}"
                answer = OPTION_LETTERS[problem["answer"]]
            elif fmt in ("pope", "pope_hard"):
                if yes:
                    o = pick(rng, scene.objects)
                    color, kind = o.color, o.kind
                else:
                    color, kind = absent_from_other_image(seed, index, scene, rng, cfg, text_only_fraction,
                                                          probe_fraction, hard=fmt == "pope_hard")
                prompt, answer = pope_prompt(color, kind), "Yes" if yes else "No"
            else:
                q_yes, q_no = mme_questions(fmt, scene, rng, cfg)
                prompt, answer = mme_prompt(q_yes if yes else q_no), "Yes" if yes else "No"
            if prompt not in asked:
                break
        asked.add(prompt)
        conversation += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}" if j == 0 else prompt},
                         {"from": "gpt", "value": answer}]
    return conversation


def instruct_sample(seed: int, index: int, cfg: ShapesConfig = ShapesConfig(),
                    text_only_fraction: float = 0.1, probe_fraction: float = 0.0, probe_turns: int = 1,
                    probe_formats: Sequence[str] = PROBE_FORMATS) -> Sample:
    """Stage-2 sample (``llava_v1_5_mix665k.json`` style).

    A ``probe_fraction`` of the samples are yes/no probes in the benchmarks' own formats
    (:func:`probe_conversation`, ``probe_turns`` questions each, formats taken in turn from ``probe_formats``);
    of the others a ``text_only_fraction`` have no image.
    """
    scene, image, rng = scene_and_image(seed, "instruct", index, cfg)
    sid = sample_id(seed, "instruct", index)
    if is_probe(index, probe_fraction):
        record = {"id": sid, "image": image_path("instruct", index), "conversations": probe_conversation(
            seed, index, scene, rng, cfg, text_only_fraction, probe_fraction, probe_turns, probe_formats)}
        return Sample(image=image, scene=scene, record=record)
    if rng.random() < text_only_fraction:
        return Sample(image=None, scene=None, record={"id": sid, "conversations": text_conversation(rng, cfg)})
    record = {"id": sid, "image": image_path("instruct", index),
              "conversations": image_conversation(scene, rng, cfg)}
    return Sample(image=image, scene=scene, record=record)


def save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")

