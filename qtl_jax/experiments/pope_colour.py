"""Does a model answer the built-in POPE from the asked colour alone? A tally of its answers by that cue.

    python -m qtl_jax.experiments.pope_colour --workdir=/tmp/fig3 [--models=fp16,L4]

The built-in POPE asks "Is there a <colour> <kind> in the image?". A model that only checks whether the
colour appears says "yes" to every negative whose colour some other object has, and "no" to the rest; one
that recognises the object says "no" to both kinds of negative. The scenes are drawn again from the corpus
seed (``qtl_jax.data.shapes``; every positive must be one of its scene's objects, or the tally stops with an
error), and each model's answers (``<model>/eval/answers/pope.jsonl``) are counted per (label, whether the
asked colour is in the image). Prints one table per model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.data.shapes.benchmarks import with_min_objects
from qtl_jax.data.shapes.samples import scene_and_image
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.text import POPE_QUESTION

# The three kinds of question this tally separates.
GROUPS = (("yes", True), ("no", True), ("no", False))


class PopeColourError(ValueError):
    """The workdir or its files do not hold what the tally needs; the message says what to run."""


def _jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        raise PopeColourError(f"{path} does not exist: run python -m qtl_jax.experiments.figure3 on this workdir "
                              "to the end first.")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _asked(text: str) -> tuple[str, str]:
    """(colour, kind) of a POPE prompt (the question is its first line)."""
    question = text.split("\n")[0]
    head, tail = POPE_QUESTION.split("{color}")[0], POPE_QUESTION.split("{kind}")[1]
    if not (question.startswith(head) and question.endswith(tail)):
        raise PopeColourError(f"not a built-in POPE question: {question!r}")
    color, kind = question[len(head):len(question) - len(tail)].split(" ")
    return color, kind


def tally(pope_dir: str, answers: Sequence[Mapping[str, Any]], *, seed: int,
          cfg: ShapesConfig) -> dict[tuple[str, bool], dict[str, int]]:
    """``{(label, colour in image): {'yes': n, 'total': n}}`` over the POPE files in ``pope_dir``."""
    labels = {}
    for path in sorted(os.listdir(os.path.join(pope_dir, "coco"))):
        split = path[len("coco_pope_"):-len(".json")]
        for row in _jsonl(os.path.join(pope_dir, "coco", path)):
            labels[(split, row["image"], row["text"])] = row["label"].lower()
    said = {int(a["question_id"]): a["text"].strip().lower().startswith("yes") for a in answers}
    pcfg = with_min_objects(cfg, 3)  # as write_pope draws its scenes
    scenes: dict[str, set[str]] = {}
    out = {g: {"yes": 0, "total": 0} for g in GROUPS}
    for q in _jsonl(os.path.join(pope_dir, "llava_pope_test.jsonl")):
        name = q["image"]
        if name not in scenes:
            index = int(os.path.splitext(name)[0].rsplit("_", 1)[-1])
            scenes[name] = set(scene_and_image(seed, "pope", index, pcfg)[0].names())
        color, kind = _asked(q["text"])
        label = labels[(q["category"], name, q["text"].split("\n")[0])]
        if label == "yes" and f"{color} {kind}" not in scenes[name]:
            raise PopeColourError(f"{name}: the positive '{color} {kind}' is not in the scene drawn from seed {seed}; "
                                  "the benchmark was written with another corpus seed or shapes config.")
        if int(q["question_id"]) not in said:
            raise PopeColourError(f"question {q['question_id']} has no answer: the evaluation did not finish.")
        group = (label, any(n.split(" ")[0] == color for n in scenes[name]))
        out[group]["total"] += 1
        out[group]["yes"] += said[int(q["question_id"])]
    return out


def markdown(tables: Mapping[str, Mapping[tuple[str, bool], Mapping[str, int]]]) -> str:
    lines = ["| model | positives: yes | negatives, colour in the image: yes | negatives, colour absent: yes |",
             "|---|---|---|---|"]
    for model, t in tables.items():
        cells = [f"{t[g]['yes']} / {t[g]['total']}" for g in GROUPS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(workdir: str, models: Sequence[str] | None = None) -> dict[str, Any]:
    """The tally of every model of a finished built-in figure3 run (``models``: those only)."""
    path = os.path.join(workdir, "figure3.json")
    if not os.path.exists(path):
        raise PopeColourError(f"{workdir!r} has no figure3.json: run python -m qtl_jax.experiments.figure3 there first.")
    with open(path) as f:
        result = json.load(f)
    config = result["config"]
    if "corpus" not in config or not int(config["corpus"].get("n_pope", 0)):
        raise PopeColourError(f"{workdir!r} is not a built-in run (preset {result.get('preset')!r}): the tally needs "
                              "the shapes corpus' scenes.")
    cfg = ShapesConfig(image_size=int(config["stage1"]["model"]["vision"]["image_size"]))
    pope_dir = os.path.join(workdir, "data", "images", "benchmarks", "pope")
    names = list(models) if models else [r["name"] for r in result["rows"]] + (["blind"] if result.get("blind") else [])
    tables = {}
    for name in names:
        answers = _jsonl(os.path.join(workdir, name, "eval", "answers", "pope.jsonl"))
        tables[name] = tally(pope_dir, answers, seed=int(config["corpus"]["seed"]), cfg=cfg)
    return tables


def main(argv: list[str]) -> None:
    import sys

    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        tables = run(flags.FLAGS.workdir, [m for m in flags.FLAGS.models or [] if m])
    except PopeColourError as e:
        print(f"pope_colour: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown(tables), end="", flush=True)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A finished built-in figure3 workdir.")
    flags.DEFINE_list("models", None, "Models to tally (default: every row and the blind control).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
