"""qtl_jax.experiments.pope_colour: the tally of POPE answers by whether the asked colour is in the image."""

import json
import os

import pytest

from qtl_jax.data.shapes.benchmarks import with_min_objects, write_pope
from qtl_jax.data.shapes.samples import scene_and_image
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.experiments import pope_colour


def _workdir(tmp_path, seed=3, image_size=48, n_images=12):
    """A finished built-in run as far as the tally reads it: figure3.json, the POPE files, two models' answers
    (one answering from the colour alone, one from the object)."""
    cfg = ShapesConfig(image_size=image_size)
    pope = tmp_path / "data" / "images" / "benchmarks" / "pope"
    write_pope(str(pope), seed=seed, cfg=cfg, n_images=n_images)
    scenes = {}
    for i in range(n_images):
        scenes[f"shapes_pope_{i:06d}.png"] = set(scene_and_image(seed, "pope", i, with_min_objects(cfg, 3))[0].names())
    questions = [json.loads(x) for x in (pope / "llava_pope_test.jsonl").read_text().splitlines()]
    for model, rule in (("colour", "colour"), ("object", "object")):
        rows = []
        for q in questions:
            color, kind = q["text"].split("\n")[0][len("Is there a "):-len(" in the image?")].split(" ")
            names = scenes[q["image"]]
            yes = (any(n.split(" ")[0] == color for n in names) if rule == "colour" else f"{color} {kind}" in names)
            rows.append({"question_id": q["question_id"], "text": "Yes" if yes else "No"})
        (tmp_path / model / "eval" / "answers").mkdir(parents=True)
        (tmp_path / model / "eval" / "answers" / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"corpus": {"seed": seed, "n_pope": n_images}, "stage1": {"model": {"vision": {"image_size": image_size}}}}
    (tmp_path / "figure3.json").write_text(json.dumps({"preset": "builtin", "config": config, "blind": None,
                                                        "rows": [{"name": "colour"}, {"name": "object"}]}))
    return questions


def test_colour_rule_and_object_rule_are_told_apart(tmp_path):
    questions = _workdir(tmp_path)
    tables = pope_colour.run(str(tmp_path))
    assert list(tables) == ["colour", "object"]
    positives = tables["object"][("yes", True)]["total"]
    near, far = tables["object"][("no", True)]["total"], tables["object"][("no", False)]["total"]
    # 3 splits x 12 images x 3 positives, and as many negatives; the seeded corpus has both kinds of negative.
    assert positives == 3 * 12 * 3 == near + far == len(questions) // 2 and near > 0 and far > 0
    assert tables["object"] == {("yes", True): {"yes": positives, "total": positives},
                                ("no", True): {"yes": 0, "total": near}, ("no", False): {"yes": 0, "total": far}}
    assert tables["colour"] == {("yes", True): {"yes": positives, "total": positives},
                                ("no", True): {"yes": near, "total": near}, ("no", False): {"yes": 0, "total": far}}
    md = pope_colour.markdown(tables)
    assert f"| colour | {positives} / {positives} | {near} / {near} | 0 / {far} |" in md


def test_a_wrong_seed_or_missing_answers_is_a_clear_error(tmp_path):
    _workdir(tmp_path)
    result = json.loads((tmp_path / "figure3.json").read_text())
    result["config"]["corpus"]["seed"] = 4
    (tmp_path / "figure3.json").write_text(json.dumps(result))
    with pytest.raises(pope_colour.PopeColourError, match="is not in the scene drawn from seed 4"):
        pope_colour.run(str(tmp_path), ["colour"])
    result["config"]["corpus"]["seed"] = 3
    (tmp_path / "figure3.json").write_text(json.dumps(result))
    path = tmp_path / "object" / "eval" / "answers" / "pope.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(pope_colour.PopeColourError, match="has no answer: the evaluation did not finish"):
        pope_colour.run(str(tmp_path), ["object"])
    os.remove(tmp_path / "figure3.json")
    with pytest.raises(pope_colour.PopeColourError, match="has no figure3.json"):
        pope_colour.run(str(tmp_path))
