"""The LLaVA JSON -> TFDS builder: kept rows round-trip exactly, every bad-row reason is counted."""

import io
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtl_jax.data import llava_tfds as lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _image(mode, size, color, fmt):
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(size))
    # Noise so JPEG/PNG bytes are not trivially small; the exact pixels do not matter.
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = PIL.Image.fromarray(arr).convert(mode)
    im.save(buf, format=fmt)
    return buf.getvalue()


# (row, reason or None). Ids say what each row exercises; each bad reason appears at least once.
def _rows():
    q, a = "<image>\nWhat is this?", "A red square."
    return [
        ({"id": "ok_jpg", "image": "photo.jpg", "conversations": _turns(q, a)}, None),
        ({"id": "ok_png_end_tag", "image": "sub/gray.png",
          "conversations": _turns("Describe.\n<image>", "Gray.", "More?", "No.")}, None),
        ({"id": "ok_gif", "image": "anim.gif", "conversations": _turns(q, a)}, None),
        ({"id": "ok_big", "image": "big.png", "conversations": _turns(q, a)}, None),
        ({"id": "ok_text", "conversations": _turns("Hi", "Hello", "Bye", "Bye.")}, None),
        ({"image": "photo.jpg", "conversations": _turns(q, a)}, None),  # no id: x.json-5
        (["not", "an", "object"], lt.MALFORMED_ROW),
        ({"id": "no_conv", "image": "photo.jpg"}, lt.MALFORMED_ROW),
        ({"id": "bad_turn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
         lt.MALFORMED_ROW),
        ({"id": "bad_image_field", "image": 7, "conversations": _turns(q, a)}, lt.MALFORMED_ROW),
        ({"id": "empty", "image": "photo.jpg", "conversations": []}, lt.EMPTY_CONVERSATION),
        ({"id": "blank_answer", "conversations": _turns("Hi", "  ")}, lt.EMPTY_CONVERSATION),
        ({"id": "role", "conversations": [{"from": "human", "value": "Hi"},
                                          {"from": "assistant", "value": "Yo"}]}, lt.UNKNOWN_ROLE),
        ({"id": "gpt_first", "conversations": [{"from": "gpt", "value": "Hi"},
                                               {"from": "human", "value": "Yo"}]}, lt.BAD_TURN_ORDER),
        ({"id": "unanswered", "conversations": _turns("Hi", "Yo", "And?")}, lt.BAD_TURN_ORDER),
        ({"id": "no_tag", "image": "photo.jpg", "conversations": _turns("What?", a)},
         lt.MISSING_IMAGE_TAG),
        ({"id": "two_tags", "image": "photo.jpg",
          "conversations": _turns("<image><image> what?", a)}, lt.MULTIPLE_IMAGE_TAGS),
        ({"id": "tag_text_only", "conversations": _turns(q, a)}, lt.UNEXPECTED_IMAGE_TAG),
        ({"id": "tag_in_answer", "image": "photo.jpg",
          "conversations": _turns("Look", "<image> here")}, lt.UNEXPECTED_IMAGE_TAG),
        ({"id": "missing_file", "image": "nope.jpg", "conversations": _turns(q, a)},
         lt.MISSING_IMAGE_FILE),
        ({"id": "dir_not_file", "image": "sub", "conversations": _turns(q, a)},
         lt.MISSING_IMAGE_FILE),
        ({"id": "garbage", "image": "garbage.png", "conversations": _turns(q, a)},
         lt.CORRUPT_IMAGE),
        ({"id": "truncated", "image": "truncated.jpg", "conversations": _turns(q, a)},
         lt.CORRUPT_IMAGE),
        # The JSON file itself, one level above image_root: readable, and refused.
        ({"id": "dotdot", "image": "../x.json", "conversations": _turns(q, a)}, lt.IMAGE_OUTSIDE_ROOT),
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    files = {
        "photo.jpg": _image("RGB", (40, 30), 0, "JPEG"),
        "sub/gray.png": _image("L", (17, 23), 0, "PNG"),
        "anim.gif": _image("P", (12, 12), 0, "GIF"),
        "big.png": _image("RGB", (64, 32), 0, "PNG"),
        "garbage.png": b"this is not an image",
    }
    files["truncated.jpg"] = files["photo.jpg"][: len(files["photo.jpg"]) // 2]
    for name, data in files.items():
        (images / name).write_bytes(data)
    rows = _rows()
    (root / "x.json").write_text(json.dumps([r for r, _ in rows]))
    return root, files, rows


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    root, _, _ = corpus
    data_dir = tmp_path_factory.mktemp("tfds")
    out = lt.build(
        str(data_dir), "mixed", {"train": [str(root / "x.json")]},
        image_root=str(root / "images"), kind="instruct", max_image_side=48,
        max_bad_fraction=None,
    )
    return out


def _records(dataset_dir, split="train"):
    src = lt.open_split(dataset_dir, split)
    return {r["id"]: r for r in (lt.decode_record(src[i]) for i in range(len(src)))}


def test_counts_every_reason_in_metadata(built, corpus):
    _, _, rows = corpus
    meta = lt.read_metadata(built)
    report = meta["splits"]["train"]
    expected = {reason: 0 for reason in lt.SKIP_REASONS}
    for _, reason in rows:
        if reason:
            expected[reason] += 1
    assert report["skipped"] == expected
    assert all(expected[r] >= 1 for r in lt.SKIP_REASONS if r != lt.MISSING_IMAGE)
    assert report["rows"] == len(rows)
    assert report["examples"] == sum(reason is None for _, reason in rows) == 6
    assert report["skipped_examples"]["image_outside_root"] == [
        f"x.json#23: '../x.json' climbs out of image_root {corpus[0] / 'images'} through '..'"]
    assert report["skipped_total"] == len(rows) - 6
    # Each skip names the row and why, so a user can find it in the JSON.
    assert report["skipped_examples"]["missing_image_file"] == [
        f"x.json#19: {corpus[0] / 'images' / 'nope.jpg'} does not exist",
        f"x.json#20: {corpus[0] / 'images' / 'sub'} is a directory",
    ]
    assert meta["config"]["kind"] == "instruct"
    assert meta["skip_reasons"] == list(lt.SKIP_REASONS)


def test_kept_rows_round_trip(built, corpus):
    _, files, rows = corpus
    recs = _records(built)
    assert sorted(recs) == sorted(["ok_jpg", "ok_png_end_tag", "ok_gif", "ok_big", "ok_text", "x-5"])
    # JPEG/PNG files are stored byte for byte.
    assert recs["ok_jpg"]["image"] == files["photo.jpg"]
    assert recs["ok_png_end_tag"]["image"] == files["sub/gray.png"]
    assert recs["x-5"]["image"] == files["photo.jpg"]
    assert recs["ok_png_end_tag"]["conversations"] == rows[1][0]["conversations"]
    assert recs["ok_png_end_tag"]["image_path"] == "sub/gray.png"
    assert recs["ok_jpg"]["source"] == "x.json#0"
    # GIF is re-encoded losslessly as PNG.
    gif = PIL.Image.open(io.BytesIO(recs["ok_gif"]["image"]))
    assert gif.format == "PNG"
    np.testing.assert_array_equal(
        np.asarray(gif.convert("RGB")),
        np.asarray(PIL.Image.open(io.BytesIO(files["anim.gif"])).convert("RGB")),
    )
    # Larger than max_image_side=48: shrunk with aspect kept.
    assert PIL.Image.open(io.BytesIO(recs["ok_big"]["image"])).size == (48, 24)
    text = recs["ok_text"]
    assert text["has_image"] is False and text["image"] == b"" and text["image_path"] == ""
    assert recs["ok_jpg"]["has_image"] is True


def test_pretrain_requires_an_image(corpus, tmp_path):
    root, _, rows = corpus
    path = tmp_path / "p.json"
    keep = [rows[0][0], rows[4][0], rows[16][0]]  # ok image row, text-only row, two tags
    path.write_text(json.dumps(keep))
    out = lt.build(str(tmp_path / "d"), "pre", {"train": [str(path)]},
                   image_root=str(root / "images"), kind="pretrain", max_bad_fraction=None)
    skipped = lt.read_metadata(out)["splits"]["train"]["skipped"]
    assert {k: v for k, v in skipped.items() if v} == {"missing_image": 1, "multiple_image_tags": 1}
    assert list(_records(out)) == ["ok_jpg"]


def test_bad_rows_are_logged(corpus, tmp_path, caplog):
    root, _, rows = corpus
    path = tmp_path / "b.json"
    path.write_text(json.dumps([rows[0][0], rows[19][0], rows[21][0]]))
    with caplog.at_level(logging.WARNING, logger="qtl_jax.data.llava_tfds"):
        lt.build(str(tmp_path / "d"), "log", {"train": [str(path)]},
                 image_root=str(root / "images"), max_bad_fraction=None)
    text = caplog.text
    assert "b.json#1 (missing_image_file)" in text
    assert "b.json#2 (corrupt_image)" in text
    assert "kept 1 of 3 rows, skipped 2 (missing_image_file=1, corrupt_image=1)" in text


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_bad_rows": 1, "max_bad_fraction": None}, "more than max_bad_rows=1"),
        ({"max_bad_fraction": 0.25}, "more than max_bad_fraction=0.25 of the split's 4 rows"),
    ],
)
def test_too_many_bad_rows_fails_the_build(corpus, tmp_path, limits, message):
    root, _, rows = corpus
    path = tmp_path / "t.json"
    path.write_text(json.dumps([rows[0][0], rows[4][0], rows[19][0], rows[21][0]]))
    with pytest.raises(lt.TooManyBadRowsError, match=message):
        lt.build(str(tmp_path / "d"), "lim", {"train": [str(path)]},
                 image_root=str(root / "images"), **limits)
    # A failed build leaves no dataset behind that a later run would silently reuse.
    assert not (tmp_path / "d" / "llava_json" / "lim" / "1.0.0").exists()


def test_within_limits_builds(corpus, tmp_path):
    root, _, rows = corpus
    path = tmp_path / "t.json"
    path.write_text(json.dumps([rows[0][0], rows[4][0], rows[19][0], rows[21][0]]))
    out = lt.build(str(tmp_path / "d"), "lim", {"train": [str(path)]},
                   image_root=str(root / "images"), max_bad_rows=2, max_bad_fraction=0.5)
    assert sorted(_records(out)) == ["ok_jpg", "ok_text"]


def test_all_rows_bad_is_an_error(corpus, tmp_path):
    root, _, rows = corpus
    path = tmp_path / "t.json"
    path.write_text(json.dumps([rows[19][0]]))
    with pytest.raises(lt.TooManyBadRowsError, match="none of its 1 rows is usable"):
        lt.build(str(tmp_path / "d"), "none", {"train": [str(path)]},
                 image_root=str(root / "images"), max_bad_fraction=None)


def test_threads_and_multiple_files_and_splits(corpus, tmp_path, built):
    root, _, rows = corpus
    good = [r for r, reason in rows if reason is None]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(good[:3]))
    b.write_text(json.dumps(good[3:]))
    out = lt.build(str(tmp_path / "d"), "multi", {"train": [str(a), str(b)], "val": [str(a)]},
                   image_root=str(root / "images"), max_image_side=48, num_workers=3)
    recs = _records(out)
    reference = _records(built)
    assert sorted(recs) == sorted(["ok_jpg", "ok_png_end_tag", "ok_gif", "ok_big", "ok_text", "b-2"])
    for rid, rec in recs.items():
        ref = reference["x-5" if rid == "b-2" else rid]
        assert rec["image"] == ref["image"] and rec["conversations"] == ref["conversations"]
    assert sorted(_records(out, "val")) == ["ok_gif", "ok_jpg", "ok_png_end_tag"]
    meta = lt.read_metadata(out)["splits"]
    assert (meta["train"]["examples"], meta["val"]["examples"]) == (6, 3)


def test_cli_prints_counts(corpus, tmp_path, capsys):
    root, _, rows = corpus
    path = tmp_path / "c.json"
    path.write_text(json.dumps([rows[0][0], rows[4][0], rows[21][0]]))
    lt.main([f"--json={path}", f"--image_root={root / 'images'}", f"--data_dir={tmp_path / 'd'}",
             "--name=cli", "--num_workers=1"])
    out = capsys.readouterr().out
    assert f"dataset: {tmp_path / 'd' / 'llava_json' / 'cli' / '1.0.0'}" in out
    assert "split train: 2 examples from 3 rows, 1 skipped\n  corrupt_image: 1\n" in out
    with pytest.raises(SystemExit) as exit_info:
        lt.main([f"--json={path}", f"--image_root={root / 'images'}",
                 f"--data_dir={tmp_path / 'd'}", "--name=strict", "--max_bad_rows=0"])
    assert exit_info.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and re.match(r"error: split 'train': 1 bad rows .* max_bad_rows=0", errors[0])


def _error_lines(stderr):
    # TFDS's progress bars share stderr (carriage returns, not newlines).
    return re.findall(r"error: [^\r\n]*", stderr)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qtl_jax.data.llava_tfds", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_input_errors_print_one_line_and_exit_2(corpus, tmp_path, capsys):
    """Every input error: status 2 and one 'error: ...' line on stderr, no traceback."""
    root, _, rows = corpus
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,')
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"id": 1}')
    good = tmp_path / "good.json"
    good.write_text(json.dumps([rows[0][0]]))
    images, data = f"--image_root={root / 'images'}", f"--data_dir={tmp_path / 'd'}"
    cases = [
        ((f"--json={broken}", images, data, "--name=a"), f"error: {broken} is not valid JSON (Expecting"),
        ((f"--json={tmp_path / 'nope.json'}", images, data, "--name=c"),
         f"error: LLaVA JSON file '{tmp_path / 'nope.json'}' does not exist"),
        ((f"--json={good}", f"--image_root={tmp_path / 'nowhere'}", data, "--name=d"),
         f"error: image_root '{tmp_path / 'nowhere'}' is not a directory"),
    ]
    for args, message in cases:
        proc = _cli(*args)
        errors = _error_lines(proc.stderr)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(errors) == 1 and errors[0].startswith(message), (args, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
    # The same handler in-process (saves a TFDS import per case).
    for args, message in [((f"--json={not_list}", images, data, "--name=b"),
                           f"error: {not_list} holds a dict; expected a JSON list"),
                          ((f"--json={good}", images, data, "--name=e", "--max_image_side=0"),
                           "error: max_image_side must be >= 1 or None, got 0.")]:
        with pytest.raises(SystemExit) as exit_info:
            lt.main(list(args))
        errors = _error_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith(message)


def test_image_paths_cannot_leave_the_root(tmp_path, caplog):
    """A row's image that is absolute, climbs out through '..', or is (or lies under) a symlink leading out
    of image_root is skipped as image_outside_root, counted and logged; nothing outside the root is stored.
    Symlinks that stay inside the root, and a root that is itself a symlink, are fine."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    photo, secret = _image("RGB", (20, 10), 0, "PNG"), _image("RGB", (12, 34), 0, "PNG")
    (images / "photo.png").write_bytes(photo)
    (images / "sub" / "inner.png").write_bytes(photo)
    (tmp_path / "secret.png").write_bytes(secret)
    (tmp_path / "outside" / "secret.png").write_bytes(secret)
    os.symlink(images / "photo.png", images / "link_in.png")
    os.symlink(tmp_path / "secret.png", images / "link_out.png")
    os.symlink(tmp_path / "outside", images / "linkdir")
    os.symlink(images, tmp_path / "images_link")
    q, a = "<image>\nWhat is this?", "A square."
    ok = ["photo.png", "sub/../photo.png", "link_in.png", "./sub/inner.png"]
    bad = ["../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "link_out.png",
           "linkdir/secret.png", "/etc/hostname"]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"id": f"r{i}", "image": im, "conversations": _turns(q, a)}
                                for i, im in enumerate(ok + bad)]))
    with caplog.at_level(logging.WARNING, logger="qtl_jax.data.llava_tfds"):
        out = lt.build(str(tmp_path / "d"), "safe", {"train": [str(path)]}, image_root=str(images),
                       max_bad_fraction=None)
    report = lt.read_metadata(out)["splits"]["train"]
    assert report["examples"] == len(ok)
    assert {k: v for k, v in report["skipped"].items() if v} == {"image_outside_root": len(bad)}
    recs = _records(out)
    assert sorted(recs) == [f"r{i}" for i in range(len(ok))]
    assert all(r["image"] == photo for r in recs.values())
    logged = [r.getMessage() for r in caplog.records if "(image_outside_root)" in r.getMessage()]
    assert len(logged) == 5  # log_examples
    details = report["skipped_examples"]["image_outside_root"]
    assert "climbs out of image_root" in details[0] and "climbs out of image_root" in details[1]
    assert "is an absolute path" in details[2]
    assert f"leading to {tmp_path / 'secret.png'}" in details[3]
    assert f"leading to {tmp_path / 'outside' / 'secret.png'}" in details[4]
    # The root may itself be a symlink: paths are checked against its real location.
    path.write_text(json.dumps([{"id": "via_link", "image": "link_in.png", "conversations": _turns(q, a)}]))
    linked = lt.build(str(tmp_path / "d"), "linked_root", {"train": [str(path)]},
                      image_root=str(tmp_path / "images_link"))
    assert _records(linked)["via_link"]["image"] == photo


def test_clear_errors_for_bad_setup(corpus, tmp_path):
    root, _, _ = corpus
    with pytest.raises(FileNotFoundError, match="does not exist; check the split's json paths"):
        lt.build(str(tmp_path), "e1", {"train": [str(tmp_path / "missing.json")]})
    with pytest.raises(FileNotFoundError, match="image_root .* is not a directory"):
        lt.build(str(tmp_path), "e2", {"train": [str(root / "x.json")]},
                 image_root=str(tmp_path / "nowhere"))
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="holds a dict; expected a JSON list of rows"):
        lt.build(str(tmp_path), "e3", {"train": [str(not_list)]})
    with pytest.raises(ValueError, match="kind must be one of"):
        lt.LlavaJsonConfig(name="k", splits={"train": ["x.json"]}, kind="finetune")
    with pytest.raises(ValueError, match="must be a non-empty list of JSON paths"):
        lt.LlavaJsonConfig(name="k", splits={"train": "x.json"})
    with pytest.raises(ValueError, match=r"max_bad_fraction must be in \[0, 1\]"):
        lt.LlavaJsonConfig(name="k", splits={"train": ["x.json"]}, max_bad_fraction=2.0)
    with pytest.raises(FileNotFoundError, match="not a built TFDS dataset directory"):
        lt.open_split(str(tmp_path), "train")


def test_existing_build_is_reused_only_with_the_same_settings(built, corpus):
    root, _, _ = corpus
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(built)))
    same = lt.build(data_dir, "mixed", {"train": [str(root / "x.json")]},
                    image_root=str(root / "images"), kind="instruct", max_image_side=48,
                    max_bad_fraction=None)
    assert same == built
    with pytest.raises(ValueError, match="already exists at .* built with other settings"):
        lt.build(data_dir, "mixed", {"train": [str(root / "x.json")]},
                 image_root=str(root / "images"), kind="pretrain", max_bad_fraction=None)


def test_open_split_unknown_split(built):
    with pytest.raises(ValueError, match=r"split 'test' not in .* it has \['train'\]"):
        lt.open_split(built, "test")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.sampled_from(["human", "gpt", "<image>", "x <image>"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["id", "image", "conversations", "from", "value"]), inner,
                      max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(row=_json, kind=st.sampled_from(lt.KINDS))
def test_check_row_never_raises(row, kind):
    skip = lt.check_row(row, kind)
    assert skip is None or skip.reason in lt.SKIP_REASONS
    if skip is None:
        # Whatever passes is a well-formed alternating conversation with a consistent image tag.
        conv = row["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == [lt.ROLES[i % 2] for i in range(len(conv))]
        tags = sum(t["value"].count("<image>") for t in conv)
        assert tags == (1 if "image" in row else 0)


def test_prepare_shapes_tfds(tmp_path):
    corpus = tmp_path / "corpus"
    out = lt.prepare_shapes_tfds(str(tmp_path / "d"), seed=1, n_pretrain=6, n_instruct=10,
                                 image_size=32, text_only_fraction=0.3, corpus_dir=str(corpus))
    assert out == {
        "pretrain": str(tmp_path / "d" / "llava_json" / "shapes_pretrain_s1_32px_n6" / "1.0.0"),
        "instruct": str(tmp_path / "d" / "llava_json" / "shapes_instruct_s1_32px_n10_text30pct"
                        / "1.0.0"),
    }
    for kind, n in (("pretrain", 6), ("instruct", 10)):
        rows = json.loads((corpus / f"{kind}.json").read_text())
        report = lt.read_metadata(out[kind])["splits"]["train"]
        assert (report["rows"], report["examples"], report["skipped_total"]) == (n, n, 0)
        recs = _records(out[kind])
        assert sorted(recs) == sorted(r["id"] for r in rows)
        for row in rows:
            rec = recs[row["id"]]
            assert rec["conversations"] == row["conversations"]
            assert rec["has_image"] == ("image" in row)
            if "image" in row:
                assert rec["image"] == (corpus / "images" / row["image"]).read_bytes()
    text_only = sum(not r["has_image"] for r in _records(out["instruct"]).values())
    info = json.loads((corpus / "corpus_info.json").read_text())
    assert text_only == info["counts"]["instruct_text_only"] > 0
    stamp = os.path.getmtime(os.path.join(out["pretrain"], "dataset_info.json"))
    assert lt.prepare_shapes_tfds(str(tmp_path / "d"), seed=1, n_pretrain=6, n_instruct=10,
                                  image_size=32, text_only_fraction=0.3) == out
    assert os.path.getmtime(os.path.join(out["pretrain"], "dataset_info.json")) == stamp
    # Stage 2 with probes in the same data_dir: a new instruct build, stage 1's pretrain build reused as is
    # (it once failed here: the pretrain name clashed with a build from the other corpus folder).
    probes = lt.prepare_shapes_tfds(str(tmp_path / "d"), seed=1, n_pretrain=6, n_instruct=10,
                                    image_size=32, text_only_fraction=0.3, probe_fraction=0.5)
    assert probes["pretrain"] == out["pretrain"]
    assert probes["instruct"] == out["instruct"].replace("text30pct", "text30pct_probe50pct")
    assert os.path.getmtime(os.path.join(out["pretrain"], "dataset_info.json")) == stamp
    assert lt.read_metadata(probes["instruct"])["splits"]["train"]["examples"] == 10


def test_prepare_shapes_tfds_blank_is_the_same_text_on_grey_images(tmp_path):
    """data.shapes.blank: the image-blind control's corpus: every image one flat grey (the scene's
    BLANK_GREY), conversations identical to the corpus with images, built under its own names."""
    from qtl_jax.data.shapes.scene import BLANK_GREY

    kw = dict(seed=3, n_pretrain=4, n_instruct=6, image_size=32)
    seen = lt.prepare_shapes_tfds(str(tmp_path / "d"), **kw)
    blind = lt.prepare_shapes_tfds(str(tmp_path / "d"), blank=True, **kw)
    assert blind == {k: v.replace("_32px_", "_32px_blank_") for k, v in seen.items()}
    for kind in ("pretrain", "instruct"):
        a, b = _records(seen[kind]), _records(blind[kind])
        assert sorted(a) == sorted(b)
        with_image = [i for i in a if a[i]["has_image"]]
        assert with_image
        for i in a:
            assert a[i]["conversations"] == b[i]["conversations"] and a[i]["has_image"] == b[i]["has_image"]
        for i in with_image:
            grey = np.asarray(PIL.Image.open(io.BytesIO(b[i]["image"])))
            assert grey.shape[:2] == (32, 32) and (grey == BLANK_GREY).all()
            assert not (np.asarray(PIL.Image.open(io.BytesIO(a[i]["image"]))) == BLANK_GREY).all()
