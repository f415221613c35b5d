"""The input pipeline end to end: shapes corpus -> TFDS -> grain -> fixed-shape batches."""

import io
import json

import numpy as np
import PIL.Image
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qtl_jax.data import llava_tfds, pipeline, sequence, templates
from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
from qtl_jax.data.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from qtl_jax.data.image_processing import ImageProcessor

NUM_IMAGE_TOKENS = 4
PROCESSOR = ImageProcessor(size=(16, 16))


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    dirs = llava_tfds.prepare_shapes_tfds(str(root / "tfds"), seed=2, n_pretrain=8, n_instruct=24,
                                          image_size=32, text_only_fraction=0.25)
    tok = shapes_tokenizer.build_shapes_tokenizer(str(root / "tok"))
    return dirs, tok


def _make(dataset_dir, tok, template="llama", **kw):
    args = dict(tokenizer=tok, template=template, image_processor=PROCESSOR,
                num_image_tokens=NUM_IMAGE_TOKENS, max_length=160, global_batch_size=4, seed=0,
                process_index=0, process_count=1)
    args.update(kw)
    return pipeline.build_input_pipeline(dataset_dir, "train", **args)


def _records(dataset_dir):
    src = llava_tfds.open_split(dataset_dir, "train")
    return [llava_tfds.decode_record(src[i]) for i in range(len(src))]


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("image_token_id", [None, 4])  # TinyLLaVA Factory / llava-hf placeholders
def test_batches_equal_per_sample_reference(shapes_data, image_token_id):
    dirs, tok = shapes_data
    batches = list(_make(dirs["instruct"], tok, shuffle=False, num_epochs=1, drop_remainder=False,
                         image_token_id=image_token_id))
    recs = _records(dirs["instruct"])  # shuffle=False keeps the stored order
    template = templates.get_template("llama")
    assert [len(b["has_image"]) for b in batches] == [4] * 6
    for j, batch in enumerate(batches):
        assert sorted(batch) == ["attention_mask", "has_image", "input_ids", "labels", "pixel_values"]
        for i, rec in enumerate(recs[4 * j: 4 * j + 4]):
            sample = template.tokenize(rec["conversations"], tok, rec["has_image"])
            want = sequence.assemble(sample, num_image_tokens=NUM_IMAGE_TOKENS, max_length=160,
                                     pad_token_id=tok.pad_token_id, image_token_id=image_token_id)
            for key in ("input_ids", "labels", "attention_mask"):
                np.testing.assert_array_equal(batch[key][i], want[key], err_msg=key)
            assert np.any(batch["labels"][i] != IGNORE_INDEX)
            assert batch["has_image"][i] == rec["has_image"]
            if rec["has_image"]:
                # Row i is sample i's image.
                pixels = PROCESSOR(PIL.Image.open(io.BytesIO(rec["image"])))
                np.testing.assert_array_equal(batch["pixel_values"][i], pixels)
            else:
                assert not np.any(batch["pixel_values"][i])  # a text-only sample's zero image
    got = _concat(batches)
    assert got["input_ids"].shape == (24, 160) and got["pixel_values"].shape == (24, 16, 16, 3)
    assert got["pixel_values"].dtype == np.float32 and got["has_image"].dtype == np.int32
    n_text = int(np.sum(got["has_image"] == 0))
    assert n_text == sum(not r["has_image"] for r in recs) > 0
    assert any(0 < b["has_image"].sum() < 4 for b in batches)  # a mixed batch was checked


def test_each_sample_has_its_placeholder_exactly_when_it_has_an_image(shapes_data):
    dirs, tok = shapes_data
    for batch in _make(dirs["instruct"], tok, num_epochs=1, seed=5):
        placeholders = (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(axis=1)
        np.testing.assert_array_equal(placeholders, batch["has_image"])
        text_only = batch["has_image"] == 0
        assert not np.any(batch["pixel_values"][text_only])
        assert all(np.any(p) for p in batch["pixel_values"][~text_only])


def test_template_conversation_errors_are_counted_skips(shapes_data):
    dirs, tok = shapes_data
    recs = _records(dirs["instruct"])
    text_only = sum(not r["has_image"] for r in recs)
    multi_turn = sum(r["has_image"] and len(r["conversations"]) > 2 for r in recs)
    single = len(recs) - text_only - multi_turn
    it = _make(dirs["instruct"], tok, template="pretrain", num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert it.skipped == {"no_image_tag": text_only, "multi_turn_pretrain": multi_turn}
    assert sum(len(b["has_image"]) for b in batches) == single
    assert it.metrics()["skipped_total"] == text_only + multi_turn


def test_tokenization_mismatch_is_a_counted_skip(tmp_path):
    # A word-level tokenizer that does not treat "</s>" as special and has a word spanning the end
    # of one answer and the next question: the template's segment boundaries then move. "</s>" is in
    # the vocabulary (templates require their end token) but not special, so it does not split words.
    words = ["<unk>", "<pad>", "<image>", "USER:", "ASSISTANT:", "hi", "yes</s>", "yes</s>USER:",
             "more", "no</s>", "</s>"] + templates.VICUNA_SYSTEM.split()
    tok_obj = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok_obj.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_obj, unk_token="<unk>", pad_token="<pad>")
    rows = [
        {"id": "one", "conversations": [{"from": "human", "value": "hi"},
                                        {"from": "gpt", "value": "yes"}]},
        {"id": "two", "conversations": [{"from": "human", "value": "hi"},
                                        {"from": "gpt", "value": "yes"},
                                        {"from": "human", "value": "more"},
                                        {"from": "gpt", "value": "no"}]},
    ]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    out = llava_tfds.build(str(tmp_path / "d"), "mm", {"train": [str(tmp_path / "t.json")]})
    it = _make(out, tok, global_batch_size=1, num_epochs=1, max_length=64)
    batches = list(it)
    assert len(batches) == 1 and it.skipped == {"tokenization_mismatch": 1}
    with pytest.raises(templates.TokenizationMismatchError):
        templates.get_template("llama").tokenize(rows[1]["conversations"], tok, False)


def test_truncation_that_leaves_no_answer_is_skipped(shapes_data):
    dirs, tok = shapes_data
    # pretrain: <s> <image>x4 caption... ; 5 positions hold only BOS and the image.
    it = _make(dirs["pretrain"], tok, template="pretrain", max_length=1 + NUM_IMAGE_TOKENS,
               num_epochs=1, global_batch_size=2)
    assert list(it) == []
    assert it.skipped == {"no_trained_tokens": 8}
    cut = _make(dirs["pretrain"], tok, template="pretrain", max_length=NUM_IMAGE_TOKENS,
                num_epochs=1, global_batch_size=2)
    assert list(cut) == [] and cut.skipped == {"image_truncated": 8}
    kept = _make(dirs["pretrain"], tok, template="pretrain", max_length=2 + NUM_IMAGE_TOKENS,
                 num_epochs=1, global_batch_size=2)
    batches = list(kept)
    assert len(batches) == 4 and kept.skipped == {}
    assert np.all(np.sum(_concat(batches)["labels"] != IGNORE_INDEX, axis=1) == 1)


def test_resume_mid_stream_gives_identical_batches(shapes_data):
    dirs, tok = shapes_data
    kw = dict(num_epochs=2, seed=7, template="llama")
    full = list(_make(dirs["instruct"], tok, **kw))
    first = _make(dirs["instruct"], tok, **kw)
    head = [next(first) for _ in range(5)]  # crosses into the second epoch (6 batches per epoch)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _make(dirs["instruct"], tok, **kw)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(full) == 12
    for want, got in zip(full, head + rest):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_host_share_of_the_global_batch(shapes_data):
    dirs, tok = shapes_data
    batch = next(_make(dirs["instruct"], tok, global_batch_size=4, process_index=1, process_count=2))
    assert batch["input_ids"].shape == (2, 160) and batch["pixel_values"].shape == (2, 16, 16, 3)


def test_bad_arguments(shapes_data):
    dirs, tok = shapes_data
    with pytest.raises(ValueError, match="output size depends on the input image"):
        _make(dirs["instruct"], tok, image_processor=ImageProcessor(size=None, do_resize=False))
    with pytest.raises(ValueError, match="Unknown chat template 'vicuna'"):
        _make(dirs["instruct"], tok, template="vicuna")

    class NoPad:
        pad_token_id = None

    with pytest.raises(ValueError, match="the tokenizer has no pad token; pass pad_token_id="):
        _make(dirs["instruct"], NoPad())


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(shapes_data):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags in its workers
    dirs, tok = shapes_data
    kw = dict(num_epochs=1, seed=3, template="llama")
    local = list(_make(dirs["instruct"], tok, **kw))
    workers = _make(dirs["instruct"], tok, worker_count=2, **kw)
    remote = list(workers)
    assert len(remote) == len(local) == 6
    for want, got in zip(local, remote):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
