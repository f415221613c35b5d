"""The built-in shapes corpus: determinism, answer correctness, file formats, disjointness, tokenizer."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtl_jax.data.shapes import benchmarks as B
from qtl_jax.data.shapes import cli, preview
from qtl_jax.data.shapes import corpus as CO
from qtl_jax.data.shapes import samples as SM
from qtl_jax.data.shapes import scene as SC
from qtl_jax.data.shapes import text as TX
from qtl_jax.data.shapes import tokenizer as T

CFG = SC.ShapesConfig()
BENCH = dict(n_mme=4, n_pope=8, n_scienceqa=30, n_vqa=12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    counts = CO.write_corpus(out, seed=3, n_pretrain=40, n_instruct=80, image_size=64, bench_sizes=BENCH)
    return out, counts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    T.build_shapes_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _files_digest(root):
    digest = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                digest[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def _image_hashes(root):
    out = set()
    for d, _, files in os.walk(root):
        for name in files:
            if name.endswith(".png"):
                from PIL import Image

                out.add(hashlib.sha256(np.asarray(Image.open(os.path.join(d, name))).tobytes()).hexdigest())
    return out


# ---------------------------------------------------------------------------------------------------
# Determinism.

def test_sample_is_a_pure_function_of_seed_and_index():
    order_a = {i: SM.instruct_sample(7, i, CFG) for i in (4, 1, 9, 2)}
    order_b = {i: SM.instruct_sample(7, i, CFG) for i in (2, 9, 4, 1)}
    for i in order_a:
        a, b = order_a[i], order_b[i]
        assert a.record == b.record
        assert (a.image is None) == (b.image is None)
        if a.image is not None:
            assert a.image.tobytes() == b.image.tobytes()
    p0, p1 = SM.pretrain_sample(7, 0, CFG), SM.pretrain_sample(8, 0, CFG)
    assert p0.image.tobytes() != p1.image.tobytes()
    assert p0.image.shape == (64, 64, 3) and p0.image.dtype == np.uint8


def test_write_corpus_is_byte_identical_for_the_same_seed(corpus, tmp_path):
    out, _ = corpus
    again = str(tmp_path / "again")
    CO.write_corpus(again, seed=3, n_pretrain=40, n_instruct=80, image_size=64, bench_sizes=BENCH)
    assert _files_digest(out) == _files_digest(again)



def test_write_corpus_in_worker_processes_writes_the_same_bytes(tmp_path, monkeypatch):
    """Several processes, each rendering chunks of samples, write exactly the files one process writes."""
    monkeypatch.setattr(CO, "CHUNK", 7)  # 30 + 45 samples: several chunks per split, the last ones short
    kw = dict(seed=2, n_pretrain=30, n_instruct=45, image_size=48, probe_fraction=0.5, probe_turns=2,
              benchmarks=False)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    counts_one = CO.write_corpus(one, workers=1, **kw)
    counts_two = CO.write_corpus(two, workers=2, **kw)
    assert {k: v for k, v in counts_one.items() if not k.endswith("seconds")} == \
        {k: v for k, v in counts_two.items() if not k.endswith("seconds")}
    assert _files_digest(one) == _files_digest(two)
    assert len(os.listdir(os.path.join(two, "images", "pretrain"))) == 30
    with pytest.raises(ValueError, match="workers=0"):
        CO.write_corpus(str(tmp_path / "bad"), workers=0, **kw)

# Computed with the single-module generator before it was split into qtl_jax/data/shapes/*.py. A deliberate
# change of the corpus (new questions, balanced benchmarks) changes these: update them in the same commit
# and say why. Pixels are hashed decoded, so a zlib/Pillow PNG-encoder change alone does not move them.
# Session 22: corpus_info.json records probe_fraction (0 here; every other file is unchanged).
# Session 24: it records probe_turns too (1 here; every other file is unchanged, checked by diffing the trees).
# Session 25: and probe_formats (the default mix here; again only corpus_info.json changed, trees diffed).
PINNED_CORPUS_DIGEST = "6c714dc8374eeedd6996983f39a7ff90098057b6be49abcdc06a7b983701bae5"
PINNED_VOCABULARY_DIGEST = "19e819c966ae794b37b0ae5ead50480535c934577c4e466e7bfd73561dc76632"


def _content_digest(root):
    from PIL import Image

    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(d, name)
            if name.endswith(".png"):
                a = np.asarray(Image.open(p))
                data = repr(a.shape).encode() + a.tobytes()
            else:
                with open(p, "rb") as f:
                    data = f.read()
            h.update(os.path.relpath(p, root).encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def test_corpus_and_vocabulary_are_pinned(tmp_path):
    out = str(tmp_path / "pinned")
    CO.write_corpus(out, seed=5, n_pretrain=6, n_instruct=12, image_size=48,
                    bench_sizes=dict(n_mme=2, n_pope=3, n_scienceqa=6, n_vqa=4))
    assert _content_digest(out) == PINNED_CORPUS_DIGEST
    assert hashlib.sha256("\n".join(T.vocabulary()).encode()).hexdigest() == PINNED_VOCABULARY_DIGEST


def test_modules_import_only_the_ones_below_them():
    """The package's layering (its docstring): each module imports only modules listed before it, never the
    package's own re-exports, so there is no cycle and a new benchmark or question type has one place to go."""
    import ast
    import importlib.util
    import pkgutil

    import qtl_jax.data.shapes as package

    order = ["scene", "text", "samples", "benchmarks", "corpus", "tokenizer", "preview", "cli", "__main__"]
    found = {m.name for m in pkgutil.iter_modules(package.__path__)}
    assert found == set(order), found
    for i, name in enumerate(order):
        spec = importlib.util.find_spec(f"qtl_jax.data.shapes.{name}")
        with open(spec.origin) as f:
            tree = ast.parse(f.read())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "qtl_jax.data.shapes":
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qtl_jax.data.shapes."):
                used.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                used |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("qtl_jax.data.shapes.")}
        assert used <= set(order[:i]), (name, sorted(used - set(order[:i])))


# ---------------------------------------------------------------------------------------------------
# Scenes and pixels.

def _nearest_palette(rgb):
    names = list(SC.PALETTE)
    d = [np.abs(np.asarray(SC.PALETTE[n]) - rgb).sum() for n in names]
    return names[int(np.argmin(d))], min(d)


def _check_scene_and_pixels(scene, image, cfg):
    size = cfg.image_size
    assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
    assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
    assert len({o.name for o in scene.objects}) == len(scene.objects)
    for o in scene.objects:
        cx, cy = o.center
        # The centre lies in the object's grid cell, so position answers follow from the geometry.
        assert int(cx // (size / 3)) == o.col and int(cy // (size / 3)) == o.row
        x0, y0, x1, y1 = o.bbox
        assert 0 <= x0 < cx < x1 <= size and 0 <= y0 < cy < y1 <= size
        colour, dist = _nearest_palette(image[int(cy), int(cx)].astype(int))
        assert colour == o.color and dist < 90, (o, image[int(cy), int(cx)])
    # Pixels outside every bbox are neutral grey: the distractors never look like a palette colour.
    mask = np.ones((size, size), bool)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        mask[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
    bg = image[mask].astype(int)
    assert (bg.max(axis=1) - bg.min(axis=1)).max() < 40


def test_scenes_match_pixels_over_many_samples():
    for i in range(150):
        scene, image, _ = SM.scene_and_image(0, "instruct", i, CFG)
        _check_scene_and_pixels(scene, image, CFG)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 10**6), size=st.sampled_from([32, 48, 64, 96, 128]),
       kinds=st.sampled_from([("circle", "square"), SC.ALL_KINDS, ("triangle", "cross", "star")]))
def test_scene_invariants_hold_for_any_address_and_size(seed, index, size, kinds):
    cfg = SC.ShapesConfig(image_size=size, kinds=kinds, kind_weights=None)
    scene, image, _ = SM.scene_and_image(seed, "pretrain", index, cfg)
    assert image.shape == (size, size, 3)
    _check_scene_and_pixels(scene, image, cfg)


# ---------------------------------------------------------------------------------------------------
# Answers are right about the scene (checked by parsing the question, independently of the generator).

_REF = r"the (?P<kind>\w+)(?: (?:at the|in the) (?P<pos>[a-z ]+))?"


def _by_position(scene, pos):
    return [o for o in scene.objects if o.position == pos]


def _independent_answer(task, text, scene):
    """The answer computed from the question text and the scene alone, or None if unparsed."""
    if task == "color":
        m = re.fullmatch(r"What color is " + _REF + r"\?", text)
        objs = [o for o in scene.objects if o.kind == m["kind"] and (m["pos"] is None or o.position == m["pos"])]
        assert len(objs) == 1, text  # the reference names exactly one object
        return objs[0].color
    if task == "shape":
        m = re.fullmatch(r"What shape is the (?P<c>\w+) shape(?: (?:at the|in the) (?P<pos>[a-z ]+))?\?", text)
        objs = [o for o in scene.objects if o.color == m["c"] and (m["pos"] is None or o.position == m["pos"])]
        assert len(objs) == 1, text
        return objs[0].kind
    if task == "count_all":
        return str(len(scene.objects))
    if task == "count_color":
        return str(scene.count(color=re.fullmatch(r"How many (\w+) shapes are there\?", text)[1]))
    if task == "count_kind":
        plural = re.fullmatch(r"How many (\w+) are there\?", text)[1]
        kind = {v: k for k, v in TX.KIND_PLURALS.items()}[plural]
        return str(scene.count(kind=kind))
    if task in ("position", "size"):
        m = re.fullmatch(r"(?:Where is|Is) the (\w+) (\w+)(?: large or small)?\?", text)
        (o,) = [o for o in scene.objects if (o.color, o.kind) == (m[1], m[2])]
        return o.position if task == "position" else o.size
    if task == "existence":
        m = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", text)
        return "yes" if f"{m[1]} {m[2]}" in scene.names() else "no"
    if task in ("left_of", "above"):
        m = re.fullmatch(r"Is the (\w+) (\w+) (?:to the left of|above) the (\w+) (\w+)\?", text)
        (a,) = [o for o in scene.objects if (o.color, o.kind) == (m[1], m[2])]
        (b,) = [o for o in scene.objects if (o.color, o.kind) == (m[3], m[4])]
        return "yes" if (a.col < b.col if task == "left_of" else a.row < b.row) else "no"
    if task == "check_count":
        m = re.fullmatch(r"Is the number of (\w+) in this image (\d+)\?", text)
        kinds = {v: k for k, v in TX.KIND_PLURALS.items()}
        n = len(scene.objects) if m[1] == "shapes" else scene.count(kind=kinds[m[1]])
        return "yes" if n == int(m[2]) else "no"
    if task == "check_position":
        m = re.fullmatch(r"Is the (\w+) (\w+) (?:at the|in the) ([a-z ]+) of this image\?", text)
        (o,) = [o for o in scene.objects if (o.color, o.kind) == (m[1], m[2])]
        return "yes" if o.position == m[3] else "no"
    if task == "check_color":
        m = re.fullmatch(r"Is " + _REF + r" (?P<c>\w+)\?", text)
        (o,) = [o for o in scene.objects if o.kind == m["kind"] and (m["pos"] is None or o.position == m["pos"])]
        return "yes" if o.color == m["c"] else "no"
    if task == "present":
        assert text == "Which of these shapes is in the image?"
        return None  # checked on the options below
    raise AssertionError(task)


def test_every_question_type_answers_correctly():
    seen = collections.Counter()
    for i in range(120):
        scene, _, rng = SM.scene_and_image(1, "instruct", i, CFG)
        for task in TX.IMAGE_TASKS:
            qa = TX.question(task, scene, rng, CFG)
            if qa is None:
                assert task in ("left_of", "above")
                continue
            if task == "present":  # exactly one option is in the scene: the answer
                assert [c for c in qa.choices if c in scene.names()] == [qa.answer]
            else:
                assert qa.answer == _independent_answer(task, qa.question, scene), qa
            assert qa.answer in qa.choices
            seen[(task, qa.answer)] += 1
    # Both yes and no occur, and counts include zero.
    for task in ("existence", "check_count", "check_position", "check_color"):
        assert seen[(task, "yes")] > 20 and seen[(task, "no")] > 20, task
    assert seen[("count_color", "0")] > 0


def test_multiple_choice_letter_points_at_the_answer():
    rng = np.random.default_rng(0)
    scene, _, _ = SM.scene_and_image(0, "instruct", 3, CFG)
    for _ in range(50):
        qa = TX.question("color", scene, rng, CFG)
        text, letter, options = TX.multiple_choice(qa, rng)
        assert options[TX.OPTION_LETTERS.index(letter)] == qa.answer
        assert len(set(options)) == len(options) == 4
        assert f"\n{letter}. {qa.answer}\n" in text and text.endswith(TX.OPTION_PROMPT)


def test_caption_lists_every_object():
    for i in range(40):
        s = SM.pretrain_sample(2, i, CFG)
        cap = s.record["conversations"][1]["value"]
        for o in s.scene.objects:
            assert f"{o.size} {o.color} {o.kind} {TX.at_position(o.position)}" in cap
        assert cap.count(" a ") + cap.startswith("A ") >= len(s.scene.objects)


def test_text_only_answers_are_right():
    rng = np.random.default_rng(5)
    for _ in range(200):
        q, short, _ = TX.text_only_turn(rng, CFG)
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", q):
            assert int(short) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", q):
            assert int(short) == int(m[1]) - int(m[2]) >= 0
        elif m := re.fullmatch(r"Which is bigger, (\d+) or (\d+)\?", q):
            assert int(short) == max(int(m[1]), int(m[2])) and m[1] != m[2]
        elif m := re.fullmatch(r"How many sides does a (\w+) have\?", q):
            assert int(short) == TX.SIDES[m[1]]
        else:
            w = re.fullmatch(r"Is (\w+) a color or a shape\?", q)[1]
            assert short == ("color" if w in SC.PALETTE else "shape")


# ---------------------------------------------------------------------------------------------------
# LLaVA JSON files.

def test_training_files_are_llava_format(corpus):
    out, counts = corpus
    pre = _load(os.path.join(out, "pretrain.json"))
    ins = _load(os.path.join(out, "instruct.json"))
    assert len(pre) == counts["pretrain"] == 40 and len(ins) == counts["instruct"] == 80
    assert len({r["id"] for r in pre + ins}) == 120
    for r in pre:
        assert set(r) == {"id", "image", "conversations"}
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": "<image>"} and gpt["from"] == "gpt" and gpt["value"]
        assert os.path.isfile(os.path.join(out, "images", r["image"]))
    text_only = 0
    for r in ins:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and 2 <= len(conv) <= 6
        n_image_tags = sum(t["value"].count("<image>") for t in conv)
        if "image" in r:
            assert n_image_tags == 1 and "<image>" in conv[0]["value"]
            assert os.path.isfile(os.path.join(out, "images", r["image"]))
        else:
            text_only += 1
            assert n_image_tags == 0
    assert text_only == counts["instruct_text_only"] > 0
    scenes = _jsonl(os.path.join(out, "pretrain_scenes.jsonl"))
    assert [s["id"] for s in scenes] == [r["id"] for r in pre]


def test_cli_prints_counts_and_timing(tmp_path, capsys):
    cli.main([f"--out={tmp_path}", "--seed=1", "--n_pretrain=5", "--n_instruct=5", "--image_size=48",
            "--no_benchmarks"])
    out = capsys.readouterr().out
    assert re.search(r"pretrain\.json 5 samples, instruct\.json 5 samples \(\d+ text-only\) in [\d.]+ s", out)
    assert "samples/s" in out and re.search(r"total [\d.]+ s", out)
    assert not os.path.exists(tmp_path / "eval")
    from PIL import Image

    assert Image.open(tmp_path / "images" / "pretrain" / "0000000.png").size == (48, 48)


def test_cli_bad_argument_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([f"--out={tmp_path}", "--image_size=10", "--no_benchmarks"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image_size=10 is too small") and err.count("\n") == 1


def test_module_entry_point_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "qtl_jax.data.shapes", f"--out={tmp_path}", "--n_pretrain=2",
                          "--n_instruct=2", "--image_size=32", "--no_benchmarks"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pretrain.json 2 samples" in out.stdout and os.path.isfile(tmp_path / "instruct.json")


# ---------------------------------------------------------------------------------------------------
# Benchmarks.

def test_mme_folder(corpus):
    out, counts = corpus
    root = os.path.join(out, "eval", "mme")
    rows = _jsonl(os.path.join(root, "llava_mme.jsonl"))
    subtasks = _load(os.path.join(root, "subtasks.json"))
    assert subtasks == {"Perception": ["existence", "count", "position", "color"],
                        "Cognition": ["numerical_calculation", "commonsense_reasoning"]}
    assert len(rows) == 6 * 2 * BENCH["n_mme"]
    gt = {}
    for sub in B.MME_PERCEPTION + B.MME_COGNITION:
        folder = os.path.join(root, "MME_Benchmark_release_version", sub)
        names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".png"))
        assert len(names) == BENCH["n_mme"]
        for name in names:
            with open(os.path.join(folder, name + ".txt")) as f:
                lines = f.read().splitlines()
            pairs = [line.split("\t") for line in lines]
            assert [a for _, a in pairs] == ["Yes", "No"]  # one of each per image: acc+ is meaningful
            assert all(q.endswith(" Please answer yes or no.") for q, _ in pairs)
            for q, a in pairs:
                gt[(sub, name, q)] = a
        with open(os.path.join(root, "eval_tool", "Your_Results", f"{sub}.txt")) as f:
            your = [line.rstrip("\n").split("\t") for line in f]
        assert len(your) == 2 * BENCH["n_mme"]
        assert all(gt[(sub, img[:-4], q)] == a for img, q, a in your)
    for r in rows:
        sub, img = r["question_id"].split("/")
        assert r["image"] == r["question_id"] and r["category"] == sub
        q = r["text"].replace("\n" + TX.SHORT_ANSWER_PROMPT, "")
        assert (sub, img[:-4], q) in gt


def _mme_holds(sub, q, scene):
    """Whether the MME question ``q`` of subtask ``sub`` (without its yes/no suffix) is true of ``scene``."""
    kinds = {v: k for k, v in TX.KIND_PLURALS.items()}
    if sub == "existence":
        m = re.fullmatch(r"Is there a (\w+) (\w+) in this image\?", q)
        return f"{m[1]} {m[2]}" in scene.names()
    if sub == "count":
        m = re.fullmatch(r"Is the number of (\w+) in this image (\d+)\?", q)
        n = len(scene.objects) if m[1] == "shapes" else scene.count(kind=kinds[m[1]])
        return n == int(m[2])
    if sub == "numerical_calculation":
        m = re.fullmatch(r"Is the number of (\w+) plus the number of (\w+) equal to (\d+)\?", q)
        return scene.count(kind=kinds[m[1]]) + scene.count(kind=kinds[m[2]]) == int(m[3])
    if sub == "position":
        m = re.fullmatch(r"Is the (\w+) (\w+) (?:at the|in the) ([a-z ]+) of this image\?", q)
        (o,) = [o for o in scene.objects if (o.color, o.kind) == (m[1], m[2])]
        return o.position == m[3]
    if sub == "color":
        m = re.fullmatch(r"Is " + _REF + r" (?P<c>\w+)\?", q)
        (o,) = [o for o in scene.objects if o.kind == m["kind"] and (m["pos"] is None or o.position == m["pos"])]
        return o.color == m["c"]
    m = re.fullmatch(r"Is the (\w+) (\w+) (to the left of|above|bigger than) the (\w+) (\w+)\?", q)
    (a,) = [o for o in scene.objects if (o.color, o.kind) == (m[1], m[2])]
    (b,) = [o for o in scene.objects if (o.color, o.kind) == (m[4], m[5])]
    return {"to the left of": a.col < b.col, "above": a.row < b.row,
            "bigger than": a.size == "large" and b.size == "small"}[m[3]]


def test_mme_answers_are_right():
    for sub in B.MME_PERCEPTION + B.MME_COGNITION:
        cfg = B.with_min_objects(CFG, 2) if sub == "commonsense_reasoning" else CFG
        for i in range(30):
            scene, _, rng = SM.scene_and_image(0, "mme", 1000 + i, cfg)
            q_yes, q_no = B.mme_questions(sub, scene, rng, cfg)
            assert q_yes != q_no
            assert _mme_holds(sub, q_yes, scene) and not _mme_holds(sub, q_no, scene)


def test_pope_files_follow_the_pope_rules(corpus):
    out, counts = corpus
    root = os.path.join(out, "eval", "pope")
    llava = _jsonl(os.path.join(root, "llava_pope_test.jsonl"))
    n = BENCH["n_pope"]
    pcfg = B.with_min_objects(CFG, 3)
    scenes = {f"shapes_pope_{i:06d}.png": SM.scene_and_image(3, "pope", i, pcfg)[0] for i in range(n)}
    freq = collections.Counter(x for s in scenes.values() for x in s.names())
    all_ids = [r["question_id"] for r in llava]
    assert len(all_ids) == len(set(all_ids)) == 3 * 6 * n
    # LLaVA's file: the categories in offset order, each numbered from its own offset.
    assert [r["category"] for r in llava] == [c for c in ("adversarial", "random", "popular") for _ in range(6 * n)]
    negatives = {}
    for split in B.POPE_SPLITS:
        rows = _jsonl(os.path.join(root, "coco", f"coco_pope_{split}.json"))
        assert counts["eval"]["pope"][split] == len(rows) == 6 * n
        cat_rows = [r for r in llava if r["category"] == split]
        # The official scorer zips a split's answers with its label file in order.
        assert [r["question_id"] for r in rows] == list(range(1, 6 * n + 1))
        assert [r["question_id"] for r in cat_rows] == [B.POPE_QID_OFFSETS[split] + i for i in range(6 * n)]
        assert [(f"{r['text']}\n{TX.SHORT_ANSWER_PROMPT}", r["image"]) for r in rows] == \
               [(r["text"], r["image"]) for r in cat_rows]
        assert [r["label"] for r in rows] == ["yes", "no"] * (3 * n)
        for r in rows:
            color, kind = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", r["text"]).groups()
            assert (f"{color} {kind}" in scenes[r["image"]].names()) == (r["label"] == "yes")
        negatives[split] = [r["text"] for r in rows if r["label"] == "no"]
        # Every absent object asked about is one that other images of the set show (POPE's sampling).
        assert all(freq[re.fullmatch(r"Is there a (\w+ \w+) in the image\?", t)[1]] > 0 for t in negatives[split])
        if split == "popular":
            for image, scene in scenes.items():
                neg = [re.fullmatch(r"Is there a (\w+ \w+) in the image\?", r["text"])[1]
                       for r in rows if r["image"] == image and r["label"] == "no"]
                absent_freqs = sorted((freq[f"{c} {k}"] for c in CFG.colors for k in CFG.kinds
                                       if f"{c} {k}" not in scene.names()), reverse=True)
                assert sorted((freq[x] for x in neg), reverse=True) == absent_freqs[:3]
    assert negatives["random"] != negatives["popular"] != negatives["adversarial"]


def test_pope_adversarial_picks_most_cooccurring():
    cats = ["a", "b", "c", "d", "e"]
    freq = collections.Counter({"a": 5, "b": 4, "c": 3, "d": 2, "e": 1})
    co = collections.defaultdict(collections.Counter, {"a": collections.Counter({"d": 3, "e": 2, "c": 1})})
    rng = np.random.default_rng(0)
    assert B.pope_negatives("adversarial", {"a"}, cats, freq, co, 2, rng) == ["d", "e"]
    assert B.pope_negatives("popular", {"a"}, cats, freq, co, 2, rng) == ["b", "c"]
    assert set(B.pope_negatives("random", {"a"}, cats, freq, co, 4, rng)) == {"b", "c", "d", "e"}
    # random prefers categories seen in the image set; unseen ones only when too few are seen.
    seen_two = collections.Counter({"a": 2, "b": 1, "c": 1})
    for _ in range(10):
        assert set(B.pope_negatives("random", {"a"}, cats, seen_two, co, 2, rng)) == {"b", "c"}
    assert set(B.pope_negatives("random", {"a"}, cats, seen_two, co, 4, rng)) == {"b", "c", "d", "e"}
    with pytest.raises(ValueError, match="absent categories"):
        B.pope_negatives("random", {"a"}, cats, freq, co, 5, rng)
    with pytest.raises(ValueError, match="unknown POPE strategy"):
        B.pope_negatives("hard", {"a"}, cats, freq, co, 1, rng)


def test_scienceqa_files(corpus):
    out, _ = corpus
    root = os.path.join(out, "eval", "scienceqa")
    problems = _load(os.path.join(root, "problems.json"))
    splits = _load(os.path.join(root, "pid_splits.json"))
    llava = _load(os.path.join(root, "llava_test_CQM-A.json"))
    assert splits["test"] == list(problems) and len(problems) == BENCH["n_scienceqa"] == len(llava)
    n_img = 0
    for row in llava:
        p = problems[row["id"]]
        assert 2 <= len(p["choices"]) <= 4 and 0 <= p["answer"] < len(p["choices"])
        assert len(set(p["choices"])) == len(p["choices"])
        human, gpt = row["conversations"]
        assert gpt["value"] == TX.OPTION_LETTERS[p["answer"]]
        for j, c in enumerate(p["choices"]):
            assert f"\n{TX.OPTION_LETTERS[j]}. {c}" in human["value"]
        assert human["value"].count("Context: ") == 1 and p["question"] in human["value"]
        if p["image"] is not None:
            n_img += 1
            assert row["image"] == f"{row['id']}/image.png" and human["value"].startswith("<image>\n")
            assert os.path.isfile(os.path.join(root, "images", "test", row["id"], "image.png"))
        else:
            assert "image" not in row and "<image>" not in human["value"]
    assert 0 < n_img < len(llava)  # ScienceQA-IMG is the image subset of a mixed file


def _check_sqa_answer(task, q, choices, answer_index, scene):
    """Asserts that the option ``answer_index`` of an image problem is the one right for ``scene``."""
    answer = choices[answer_index]
    if task == "count":
        assert answer == str(len(scene.objects))
    elif task == "present":
        assert [c for c in choices if c in scene.names()] == [answer]
    elif task == "shape":
        (o,) = [o for o in scene.objects if o.color == re.fullmatch(r"Which shape is (\w+)\?", q)[1]]
        assert answer == o.kind
    elif task == "color":
        assert answer == _independent_answer("color", q.replace("Which color", "What color"), scene)
    else:
        assert task == "position" and answer == _independent_answer("position", q, scene)


def test_scienceqa_image_answers_are_right():
    for i in range(80):
        scene, _, rng = SM.scene_and_image(0, "scienceqa", 500 + i, CFG)
        p = TX.sqa_problem(scene, rng, CFG, with_image=True)
        _check_sqa_answer(p["task"], p["question"], p["choices"], p["answer"], scene)


def test_scienceqa_probes_ask_as_the_benchmark_does_and_are_right(tmp_path):
    """Probe format 'scienceqa': the text of a row of LLaVA's llava_test_CQM-A.json (as its ScienceQA converter
    writes it: 'Context: <hint or N/A>', the question, 'A. ...' options) plus the option prompt that LLaVA's
    model_vqa_science.py appends, answered with the letter of the option right for the image."""
    out = str(tmp_path)
    CO.write_corpus(out, seed=3, n_pretrain=0, n_instruct=24, image_size=48, probe_fraction=1.0, probe_turns=2,
                    probe_formats=("scienceqa", "pope"), benchmarks=False)
    records = _load(os.path.join(out, "instruct.json"))
    cfg = SC.ShapesConfig(image_size=48)
    scenes = {r["id"]: SM.scene_and_image(3, "instruct", i, cfg)[0] for i, r in enumerate(records)}
    tasks = {re.sub(r"\\\{\w+\\\}", "[a-z ]+", re.escape(t)): k for k, t in TX.SQA_TEMPLATES.items()}
    seen, hints, letters = collections.Counter(), collections.Counter(), collections.Counter()
    for i, r in enumerate(records):
        conv = r["conversations"]
        prompts = [conv[0]["value"][len(TX.IMAGE_TOKEN) + 1:]] + [c["value"] for c in conv[2::2]]
        for prompt, gpt in zip(prompts, conv[1::2]):
            if not prompt.startswith("Context: "):
                _check_probe_turn(prompt, gpt["value"], "pope", scenes[r["id"]], records, i, scenes)
                seen["pope"] += 1
                continue
            context, q, *options, tail = prompt.split("\n")
            assert tail == TX.OPTION_PROMPT and 2 <= len(options) <= 4
            assert [o[:3] for o in options] == [f"{x}. " for x in TX.OPTION_LETTERS[:len(options)]]
            choices = [o[3:] for o in options]
            hint = context.removeprefix("Context: ")
            assert hint in ("N/A", TX.SQA_HINTS[0])
            assert prompt == f"{TX.sqa_text(q, choices, '' if hint == 'N/A' else hint)}\n{TX.OPTION_PROMPT}"
            (task,) = [k for pattern, k in tasks.items() if re.fullmatch(pattern, q)]
            _check_sqa_answer(task, q, choices, TX.OPTION_LETTERS.index(gpt["value"]), scenes[r["id"]])
            seen[task] += 1
            hints[hint] += 1
            letters[gpt["value"]] += 1
    assert seen["pope"] == 24 and sum(seen.values()) == 48
    assert set(seen) - {"pope"} <= {"color", "shape", "count", "present", "position"} and len(seen) >= 4
    assert len(hints) == 2 and len(letters) >= 3


def test_hard_pope_probes_cannot_be_answered_from_colour_or_kind_alone(tmp_path):
    """Probe format 'pope_hard': POPE's own question (as llava_pope_test.jsonl asks it), whose negatives are,
    as POPE's, objects of other training images, chosen to share their colour (and where possible their kind)
    with objects in the image. With format 'pope' on the same corpus most negatives have a colour absent from
    the image, so "yes iff the colour is there" answers them right; with 'pope_hard' it cannot."""
    cfg = SC.ShapesConfig(image_size=48)

    def negatives(formats):
        out = str(tmp_path / formats[0])
        CO.write_corpus(out, seed=6, n_pretrain=0, n_instruct=200, image_size=48, probe_fraction=1.0, probe_turns=3,
                        probe_formats=formats, benchmarks=False)
        records = _load(os.path.join(out, "instruct.json"))
        scenes = {r["id"]: SM.scene_and_image(6, "instruct", i, cfg)[0] for i, r in enumerate(records)}
        shared = collections.Counter()
        for i, r in enumerate(records):
            conv = r["conversations"]
            prompts = [conv[0]["value"][len(TX.IMAGE_TOKEN) + 1:]] + [c["value"] for c in conv[2::2]]
            for prompt, gpt in zip(prompts, conv[1::2]):
                _check_probe_turn(prompt, gpt["value"], "pope", scenes[r["id"]], records, i, scenes)
                if gpt["value"] == "No":
                    color, kind = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", prompt[:-len(SUFFIX_POPE)]).groups()
                    scene = scenes[r["id"]]
                    shared["colour"] += any(o.color == color for o in scene.objects)
                    shared["kind"] += any(o.kind == kind for o in scene.objects)
                    shared["n"] += 1
        return shared

    easy, hard = negatives(("pope",)), negatives(("pope_hard",))
    assert easy["n"] == hard["n"] == 300  # 200 rows x 3 turns, half of them No
    assert hard["colour"] >= 0.95 * hard["n"] and hard["kind"] >= easy["kind"]  # 98 % and 55 % (48 %) at seed 6
    assert easy["colour"] <= 0.4 * easy["n"]  # 27 % at seed 6
    with pytest.raises(ValueError, match="pope, pope_hard, existence"):
        SM.parse_probe_formats("pope,hard_pope")


def test_vqa_files(corpus):
    out, _ = corpus
    root = os.path.join(out, "eval", "vqa")
    qs = _load(os.path.join(root, "questions.json"))["questions"]
    anns = _load(os.path.join(root, "annotations.json"))["annotations"]
    llava = _jsonl(os.path.join(root, "llava_vqa_shapes.jsonl"))
    tv = _load(os.path.join(root, "textvqa_val.json"))["data"]
    tv_rows = _jsonl(os.path.join(root, "llava_textvqa_shapes.jsonl"))
    assert len(qs) == len(anns) == len(llava) == 2 * BENCH["n_vqa"]
    # TextVQA: its own images, two questions each under the image id (repeated, as in LLaVA's file).
    assert len(tv) == len(tv_rows) == 2 * BENCH["n_vqa"]
    assert collections.Counter(r["question_id"] for r in tv_rows) == {
        f"shapes_textvqa_{i:06d}": 2 for i in range(BENCH["n_vqa"])}
    assert all(r["image"] == f"{r['question_id']}.png" for r in tv_rows)
    assert not {r["image"] for r in tv_rows} & {r["image"] for r in llava}
    assert len({q["question_id"] for q in qs}) == len(qs)
    varied = 0
    for q, a, row in zip(qs, anns, llava):
        assert q["question_id"] == a["question_id"] == row["question_id"]
        assert row["text"] == f"{q['question']}\n{TX.SHORT_ANSWER_PROMPT}"
        answers = [x["answer"] for x in a["answers"]]
        assert len(answers) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert collections.Counter(answers).most_common(1)[0] == (a["multiple_choice_answer"],
                                                                 answers.count(a["multiple_choice_answer"]))
        assert answers.count(a["multiple_choice_answer"]) >= 7
        assert a["answer_type"] in ("yes/no", "number", "other")
        varied += len(set(answers)) > 1
    assert varied > 0
    # The TextVQA scorer finds annotations by (image id, lower-cased question) from the answer's question_id.
    keys = {(d["image_id"], d["question"].lower()) for d in tv}
    assert len(keys) == len(tv)
    for row, d in zip(tv_rows, tv):
        assert (row["question_id"], row["text"].split("\n")[0].lower()) == (d["image_id"], d["question"].lower())
        assert len(d["answers"]) == 10


def test_vqa_ground_truth_is_right():
    for i in range(40):
        scene, _, rng = SM.scene_and_image(0, "vqa", 900 + i, CFG)
        qa = TX.question(B.VQA_TASKS[i % len(B.VQA_TASKS)], scene, rng, CFG)
        answers = B.annotator_answers(qa.answer, qa.choices, rng)
        assert answers.count(qa.answer) >= 7


def test_train_and_benchmark_images_are_disjoint(corpus):
    out, _ = corpus
    train = _image_hashes(os.path.join(out, "images"))
    assert len(train) == 40 + 80 - sum(1 for r in _load(os.path.join(out, "instruct.json")) if "image" not in r)
    for bench in ("mme", "pope", "scienceqa", "vqa"):
        imgs = _image_hashes(os.path.join(out, "eval", bench))
        assert imgs and not imgs & train, bench
    assert len(set(SM.STREAMS.values())) == len(SM.STREAMS)


# ---------------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=16), "too small"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(kinds=("circle", "hexagon"), kind_weights=None), "unknown kinds"),
    (dict(colors=("red",), color_weights=None), "at least 2"),
    (dict(kind_weights=(1.0, 1.0)), "kind_weights"),
    (dict(small_radius=0.2, large_radius=0.3), "small_radius"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SC.ShapesConfig(**kwargs)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown stream"):
        SM.sample_rngs(0, "test", 0)
    with pytest.raises(ValueError, match="non-negative"):
        SM.sample_rngs(-1, "pretrain", 0)
    with pytest.raises(ValueError, match="sample counts"):
        CO.write_corpus(str(tmp_path), n_pretrain=-1, n_instruct=0)
    with pytest.raises(ValueError, match="disagrees"):
        CO.write_corpus(str(tmp_path), n_pretrain=1, n_instruct=1, image_size=64, cfg=SC.ShapesConfig(image_size=96))
    with pytest.raises(ValueError, match=r"probe_fraction=-0.1 must be in \[0, 1\]"):
        CO.write_corpus(str(tmp_path), n_pretrain=0, n_instruct=0, probe_fraction=-0.1)
    with pytest.raises(ValueError, match="n_pope=0"):
        B.write_benchmarks(str(tmp_path), n_pope=0)
    with pytest.raises(ValueError, match="unknown question task"):
        TX.question("colour", SM.scene_and_image(0, "pretrain", 0, CFG)[0], np.random.default_rng(0), CFG)


# ---------------------------------------------------------------------------------------------------
# Tokenizer.

def _all_texts(n_instruct=1500, n_pretrain=300):
    texts = []
    for i in range(n_instruct):
        texts += [t["value"] for t in SM.instruct_sample(11, i, CFG).record["conversations"]]
    for i in range(n_pretrain):
        texts += [t["value"] for t in SM.pretrain_sample(11, i, CFG).record["conversations"]]
    return texts


def test_tokenizer_covers_the_corpus_and_the_chat_template(tokenizer, corpus):
    out, _ = corpus
    from qtl_jax.data.templates import VICUNA_SYSTEM

    texts = _all_texts() + [VICUNA_SYSTEM, "USER: <image>\nWhat? ASSISTANT: red</s>"]
    for r in _jsonl(os.path.join(out, "eval", "mme", "llava_mme.jsonl")) + \
            _jsonl(os.path.join(out, "eval", "pope", "llava_pope_test.jsonl")) + \
            _jsonl(os.path.join(out, "eval", "vqa", "llava_vqa_shapes.jsonl")):
        texts.append(r["text"])
    for r in _load(os.path.join(out, "eval", "scienceqa", "llava_test_CQM-A.json")):
        texts += [t["value"] for t in r["conversations"]] + [TX.OPTION_PROMPT]
    unk = tokenizer.unk_token_id
    missing = {t for t in texts if unk in tokenizer(t).input_ids}
    assert not missing, sorted(missing)[:5]
    assert len(texts) > 3000


def test_tokenizer_round_trips_answers_and_captions(tokenizer):
    for i in range(400):
        for turn in SM.instruct_sample(12, i, CFG).record["conversations"]:
            if turn["from"] == "gpt":
                ids = tokenizer(turn["value"]).input_ids
                assert tokenizer.decode(ids, skip_special_tokens=True) == turn["value"]
    cap = SM.pretrain_sample(12, 0, CFG).record["conversations"][1]["value"]
    assert tokenizer.decode(tokenizer(cap).input_ids, skip_special_tokens=True) == cap
    system = T.CHAT_TEMPLATE_TEXTS[0]
    assert tokenizer.decode(tokenizer(system).input_ids, skip_special_tokens=True) == system


def test_tokenizer_specials_bos_and_layout(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in T.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.unk_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == \
           ("<unk>", "<pad>", "<s>", "</s>")
    ids = tokenizer("<image>\nWhat color is the circle? ASSISTANT: red</s>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "<image>", "What", "color", "is", "the", "circle", "?",
                                                    "ASSISTANT", ":", "red", "</s>"]
    assert tokenizer("red", add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids("red")]
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra").input_ids) == ["<s>", "<unk>"]
    assert len(tokenizer) == len(T.vocabulary()) < 600
    # The vocabulary comes from the generator's lists, so it does not depend on any sampling.
    assert T.vocabulary() == T.vocabulary()


def test_llama_template_tokenizes_corpus_without_mismatch(tokenizer):
    from qtl_jax.data.templates import get_template

    llama = get_template("llama")
    pretrain = get_template("pretrain")
    for i in range(60):
        s = SM.instruct_sample(13, i, CFG)
        sample = llama.tokenize(s.record["conversations"], tokenizer, has_image="image" in s.record)
        trained = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != -100]
        answers = " ".join(t["value"] for t in s.record["conversations"] if t["from"] == "gpt")
        # Only the answers and their </s> are trained.
        assert tokenizer.decode(trained, skip_special_tokens=True) == answers
        assert trained.count(tokenizer.eos_token_id) == len(s.record["conversations"]) // 2
    p = SM.pretrain_sample(13, 0, CFG)
    assert pretrain.tokenize(p.record["conversations"], tokenizer, has_image=True) is not None


def test_preview_grid_writes_a_png(tmp_path):
    from PIL import Image

    path = str(tmp_path / "grid.png")
    preview.preview_grid(path, seed=0, n=4, columns=2)
    w, h = Image.open(path).size
    assert w > 400 and h > 400


# ---------------------------------------------------------------------------------------------------
# Stage-2 probes: yes/no questions in the benchmarks' own formats.

def test_probe_pairs_are_exactly_balanced_and_spread():
    # floor(M f) of the first M pairs are probe pairs; in each, the even sample is Yes and the odd one No.
    for f, n in ((0.5, 400), (0.3, 1000), (1.0, 20), (0.0, 50)):
        probes = [i for i in range(n) if SM.is_probe(i, f)]
        assert len(probes) == 2 * int((n // 2) * f + 1e-9)
        assert all(SM.is_probe(i ^ 1, f) for i in probes)  # both samples of a pair
    with pytest.raises(ValueError, match=r"probe_fraction=1.5 must be in \[0, 1\]"):
        SM.is_probe(0, 1.5)


@pytest.fixture(scope="module")
def probe_corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("probes"))
    counts = CO.write_corpus(out, seed=4, n_pretrain=2, n_instruct=160, image_size=48, probe_fraction=0.5,
                             bench_sizes=dict(n_mme=3, n_pope=3, n_scienceqa=4, n_vqa=2))
    return out, counts


SUFFIX_POPE = "\n" + TX.SHORT_ANSWER_PROMPT
SUFFIX_MME = f" {TX.YES_NO_PROMPT}\n{TX.SHORT_ANSWER_PROMPT}"


def _check_probe_turn(prompt, answer, sub, scene, records, i, scenes):
    """Asserts that one probe question is in format ``sub``, asked as the benchmark asks it and answered right."""
    if sub != "pope":
        assert prompt.endswith(SUFFIX_MME), prompt
        q = prompt[:-len(SUFFIX_MME)]
        slots = {"ref": "[a-z ]+", "at_position": "[a-z ]+"}
        template = re.sub(r"\\\{(\w+)\\\}", lambda m: slots.get(m[1], r"\w+"), re.escape(B.MME_TEMPLATES[sub]))
        assert re.fullmatch(template, q), (sub, q)
        assert _mme_holds(sub, q, scene) == (answer == "Yes")
        assert prompt == TX.mme_prompt(q)
        return
    m = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", prompt[:-len(SUFFIX_POPE)])
    assert prompt == TX.pope_prompt(m[1], m[2])
    name = f"{m[1]} {m[2]}"
    assert (name in scene.names()) == (answer == "Yes")
    if answer == "No":  # POPE's negatives: objects annotated in other images of the set
        others = set().union(*(scenes[o["id"]].names() for j, o in enumerate(records) if j != i and "image" in o))
        assert name in others


def test_probes_ask_as_the_benchmarks_do_and_are_right(probe_corpus):
    out, counts = probe_corpus
    records = _load(os.path.join(out, "instruct.json"))
    cfg = SC.ShapesConfig(image_size=48)
    scenes = {r["id"]: SM.scene_and_image(4, "instruct", i, cfg)[0] for i, r in enumerate(records)}
    # The benchmark files end their prompts the same way (LLaVA's llava_pope_test.jsonl / llava_mme.jsonl).
    assert all(r["text"].endswith(SUFFIX_POPE) and " yes or no" not in r["text"]
               for r in _jsonl(os.path.join(out, "eval", "pope", "llava_pope_test.jsonl")))
    assert all(r["text"].endswith(SUFFIX_MME) for r in _jsonl(os.path.join(out, "eval", "mme", "llava_mme.jsonl")))
    answers, formats = collections.Counter(), collections.Counter()
    for i, r in enumerate(records):
        if not SM.is_probe(i, 0.5):
            continue
        human, gpt = r["conversations"]
        assert r["image"] == SM.image_path("instruct", i) and len(r["conversations"]) == 2
        assert human["value"].startswith(TX.IMAGE_TOKEN + "\n")
        prompt, answer = human["value"][len(TX.IMAGE_TOKEN) + 1:], gpt["value"]
        assert answer == ("Yes" if i % 2 == 0 else "No")
        answers[answer] += 1
        sub = TX.PROBE_FORMATS[(i // 2 // 2) % len(TX.PROBE_FORMATS)]  # pairs take the formats in turn
        _check_probe_turn(prompt, answer, sub, scenes[r["id"]], records, i, scenes)
        formats[sub] += 1
    assert counts["instruct_probes"] == sum(answers.values()) == 80
    assert answers["Yes"] == answers["No"] == 40
    assert formats == {"pope": 40, "existence": 10, "count": 10, "position": 10, "color": 10}  # samples, 2 per pair


def test_multi_turn_probes_are_balanced_right_and_never_repeat_a_question(tmp_path):
    out = str(tmp_path)
    counts = CO.write_corpus(out, seed=5, n_pretrain=0, n_instruct=120, image_size=48, probe_fraction=0.5,
                             probe_turns=4, benchmarks=False)
    records = _load(os.path.join(out, "instruct.json"))
    cfg = SC.ShapesConfig(image_size=48)
    scenes = {r["id"]: SM.scene_and_image(5, "instruct", i, cfg)[0] for i, r in enumerate(records)}
    answers, formats, patterns = collections.Counter(), collections.Counter(), collections.Counter()
    for i, r in enumerate(records):
        if not SM.is_probe(i, 0.5):
            assert r == SM.instruct_sample(5, i, cfg, 0.1, 0.5).record  # probe_turns touches the probes only
            continue
        conv = r["conversations"]
        assert len(conv) == 8 and [c["from"] for c in conv] == ["human", "gpt"] * 4
        assert conv[0]["value"].startswith(TX.IMAGE_TOKEN + "\n")
        assert not any(TX.IMAGE_TOKEN in c["value"] for c in conv[1:])  # one image, in the first turn
        prompts = [conv[0]["value"][len(TX.IMAGE_TOKEN) + 1:]] + [c["value"] for c in conv[2::2]]
        assert len(set(prompts)) == 4  # a later turn is never answerable by copying an earlier one
        pattern = [g["value"] for g in conv[1::2]]
        assert pattern[0] == ("Yes" if i % 2 == 0 else "No")
        partner = records[i ^ 1]["conversations"][1::2]  # the pair's other sample answers the complement
        assert [("Yes", "No")[a == "Yes"] for a in pattern] == [g["value"] for g in partner]
        patterns[tuple(pattern[1:]) if i % 2 == 0 else ()] += 1
        for j, (prompt, gpt) in enumerate(zip(prompts, conv[1::2])):
            answer = gpt["value"]
            sub = _probe_format(prompt)
            _check_probe_turn(prompt, answer, sub, scenes[r["id"]], records, i, scenes)
            answers[answer] += 1
            formats[sub] += 1
    assert counts["instruct_probes"] == 60 and sum(answers.values()) == 240
    assert answers["Yes"] == answers["No"] == 120  # exactly balanced, turn by turn over each pair
    # The later answers are not a function of the first (no fixed alternation to learn instead of the image):
    # the 30 even samples show several of the 8 patterns of turns 2-4, none in most of them.
    del patterns[()]
    assert len(patterns) >= 5 and max(patterns.values()) <= 12
    # The formats in turn (POPE half of them); a repeat moves a turn to the next format, which is rare.
    assert set(formats) == set(TX.PROBE_FORMATS) and formats["pope"] >= 100
    assert min(formats[f] for f in TX.PROBE_FORMATS if f != "pope") >= 25
    with open(os.path.join(out, "corpus_info.json")) as f:
        assert json.load(f)["probe_turns"] == 4
    with pytest.raises(ValueError, match=r"probe_turns=0 must be >= 1"):
        CO.write_corpus(out, n_pretrain=0, n_instruct=2, probe_turns=0, benchmarks=False)


def _probe_format(prompt):
    """The benchmark format a probe prompt is in: 'pope' or the MME subtask whose template it fills."""
    if prompt.endswith(SUFFIX_POPE) and not prompt.endswith(SUFFIX_MME):
        return "pope"
    return next(f for f in TX.MME_PERCEPTION if re.fullmatch(
        re.sub(r"\\\{(\w+)\\\}", lambda m: r"[a-z0-9 ]+", re.escape(B.MME_TEMPLATES[f])), prompt[:-len(SUFFIX_MME)]))


def test_probe_formats_choose_the_questions_of_a_probe_only_corpus(tmp_path):
    """A curriculum's first phase (configs/figure3.py probe_phase): every sample a probe, POPE and MME-existence
    questions only, still balanced and right."""
    out = str(tmp_path)
    counts = CO.write_corpus(out, seed=7, n_pretrain=0, n_instruct=40, image_size=48, probe_fraction=1.0,
                             probe_turns=4, probe_formats=("pope", "existence"), benchmarks=False)
    records = _load(os.path.join(out, "instruct.json"))
    cfg = SC.ShapesConfig(image_size=48)
    scenes = {r["id"]: SM.scene_and_image(7, "instruct", i, cfg)[0] for i, r in enumerate(records)}
    answers, formats, repeats = collections.Counter(), collections.Counter(), 0
    for i, r in enumerate(records):
        conv = r["conversations"]
        assert "image" in r and len(conv) == 8
        prompts = [conv[0]["value"][len(TX.IMAGE_TOKEN) + 1:]] + [c["value"] for c in conv[2::2]]
        if len(set(prompts)) < 4:  # only when no format has a new question: a one-object scene's third Yes
            repeats += 1
            assert len(scenes[r["id"]].objects) == 1 and [g["value"] for g in conv[1::2]].count("Yes") >= 3
        for prompt, gpt in zip(prompts, conv[1::2]):
            sub = _probe_format(prompt)
            _check_probe_turn(prompt, gpt["value"], sub, scenes[r["id"]], records, i, scenes)
            answers[gpt["value"]] += 1
            formats[sub] += 1
    assert counts["instruct_probes"] == 40 and answers["Yes"] == answers["No"] == 80 and repeats <= 6
    assert set(formats) == {"pope", "existence"} and min(formats.values()) >= 60
    with open(os.path.join(out, "corpus_info.json")) as f:
        assert json.load(f)["probe_formats"] == ["pope", "existence"]
    # The default mix, spelled or not, is the corpus without the option.
    assert SM.parse_probe_formats("") == SM.parse_probe_formats(",".join(TX.PROBE_FORMATS)) == TX.PROBE_FORMATS
    assert SM.parse_probe_formats(" pope, existence ") == ("pope", "existence")
    with pytest.raises(ValueError, match=r"probe_formats='pope,size': give one or more of pope, pope_hard, existence, count"):
        SM.parse_probe_formats("pope,size")
    with pytest.raises(ValueError, match=r"probe_formats='': give one or more of"):
        CO.write_corpus(out, n_pretrain=0, n_instruct=2, probe_formats=(), benchmarks=False)


def test_probe_formats_cli_and_dataset_name(tmp_path, capsys):
    from qtl_jax.data import llava_tfds
    from qtl_jax.data.shapes import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "c"), "--probe_fraction=0.5", "--probe_formats=pope,colour",
                  "--no_benchmarks"])
    assert e.value.code == 2
    assert "probe_formats='pope,colour': give one or more of" in capsys.readouterr().err
    cli.main(["--out", str(tmp_path / "c"), "--n_pretrain=0", "--n_instruct=4", "--probe_fraction=1",
              "--probe_formats=existence", "--no_benchmarks"])
    records = _load(str(tmp_path / "c" / "instruct.json"))
    assert {_probe_format(r["conversations"][0]["value"].split("\n", 1)[1]) for r in records} == {"existence"}
    dirs = llava_tfds.prepare_shapes_tfds(str(tmp_path / "tfds"), n_pretrain=2, n_instruct=4, image_size=32,
                                          probe_fraction=1.0, probe_turns=2, probe_formats="pope,existence")
    assert "_probe100pctx2_pope-existence/" in dirs["instruct"]
    with pytest.raises(ValueError, match=r"probe_formats='pope,x'"):  # before anything is written
        llava_tfds.prepare_shapes_tfds(str(tmp_path / "bad"), probe_fraction=1.0, probe_formats="pope,x")
    assert not os.path.exists(tmp_path / "bad")


def test_no_probes_leave_the_corpus_as_it_was(tmp_path):
    # probe_fraction=0 is the corpus before probes existed (the pinned digest above holds it too).
    a = [SM.instruct_sample(3, i, CFG, 0.1).record for i in range(30)]
    b = [SM.instruct_sample(3, i, CFG, 0.1, 0.0).record for i in range(30)]
    assert a == b
    assert any(SM.instruct_sample(3, i, CFG, 0.1, 0.5).record != a[i] for i in range(30))
