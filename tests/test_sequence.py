"""Sequence assembly: image expansion, truncation counting image tokens, padding, collation (packing: test_packing)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtl_jax.data.constants import IGNORE_INDEX as IGN
from qtl_jax.data.constants import IMAGE_TOKEN_INDEX as IMG
from qtl_jax.data import sequence
from qtl_jax.data.sequence import ImageTruncatedError, assemble, collate, expanded_length
from qtl_jax.data.templates import TokenizedSample

PAD = 0


def _sample(ids, labels):
    return TokenizedSample(np.asarray(ids, np.int32), np.asarray(labels, np.int32))


# BOS, two prompt tokens, the image, a prompt token, then a trained answer and EOS.
WITH_IMAGE = _sample([1, 5, 6, IMG, 7, 8, 2], [IGN, IGN, IGN, IGN, IGN, 8, 2])
TEXT_ONLY = _sample([1, 5, 6, 8, 2], [IGN, IGN, IGN, 8, 2])


def _assert_arrays(out, **expected):
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].dtype == np.int32, key
        np.testing.assert_array_equal(out[key], value, err_msg=key)


def test_factory_convention_keeps_one_placeholder_and_pads():
    out = assemble(WITH_IMAGE, num_image_tokens=3, max_length=12, pad_token_id=PAD, image_token_id=None)
    _assert_arrays(
        out,
        input_ids=[1, 5, 6, IMG, 7, 8, 2, 0, 0, 0, 0, 0],
        labels=[IGN, IGN, IGN, IGN, IGN, 8, 2, IGN, IGN, IGN, IGN, IGN],
        attention_mask=[1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    )
    assert expanded_length(WITH_IMAGE, 3) == 9


def test_llava_hf_convention_repeats_the_image_token():
    out = assemble(WITH_IMAGE, num_image_tokens=3, max_length=12, pad_token_id=PAD, image_token_id=99)
    _assert_arrays(
        out,
        input_ids=[1, 5, 6, 99, 99, 99, 7, 8, 2, 0, 0, 0],
        labels=[IGN, IGN, IGN, IGN, IGN, IGN, IGN, 8, 2, IGN, IGN, IGN],
        attention_mask=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    )


def test_truncation_counts_image_tokens():
    # Expanded, the sample needs 9 positions; with 7 the last two text tokens go.
    factory = assemble(WITH_IMAGE, num_image_tokens=3, max_length=7, pad_token_id=PAD, image_token_id=None)
    _assert_arrays(
        factory,
        input_ids=[1, 5, 6, IMG, 7, 0, 0],
        labels=[IGN] * 7,
        attention_mask=[1, 1, 1, 1, 1, 0, 0],
    )
    hf = assemble(WITH_IMAGE, num_image_tokens=3, max_length=7, pad_token_id=PAD, image_token_id=99)
    _assert_arrays(hf, input_ids=[1, 5, 6, 99, 99, 99, 7], labels=[IGN] * 7, attention_mask=[1] * 7)
    # Exactly room for the image: everything after it is cut.
    hf6 = assemble(WITH_IMAGE, num_image_tokens=3, max_length=6, pad_token_id=PAD, image_token_id=99)
    _assert_arrays(hf6, input_ids=[1, 5, 6, 99, 99, 99], labels=[IGN] * 6, attention_mask=[1] * 6)


@pytest.mark.parametrize("image_token_id", [None, 99])
@pytest.mark.parametrize("max_length", [1, 3, 5])
def test_an_image_is_never_cut(image_token_id, max_length):
    with pytest.raises(ImageTruncatedError, match="raise max_length") as info:
        assemble(WITH_IMAGE, num_image_tokens=3, max_length=max_length, pad_token_id=PAD, image_token_id=image_token_id)
    assert info.value.reason == "image_truncated"


def test_text_only_and_pad_equal_to_eos():
    # Phi / Qwen2 pad with their EOS id; the mask comes from the length, so the trained EOS stays.
    out = assemble(TEXT_ONLY, num_image_tokens=729, max_length=8, pad_token_id=2, image_token_id=None)
    _assert_arrays(
        out,
        input_ids=[1, 5, 6, 8, 2, 2, 2, 2],
        labels=[IGN, IGN, IGN, 8, 2, IGN, IGN, IGN],
        attention_mask=[1, 1, 1, 1, 1, 0, 0, 0],
    )
    cut = assemble(TEXT_ONLY, num_image_tokens=729, max_length=4, pad_token_id=2, image_token_id=7)
    _assert_arrays(cut, input_ids=[1, 5, 6, 8], labels=[IGN, IGN, IGN, 8], attention_mask=[1, 1, 1, 1])


def test_two_images_expand_in_place():
    sample = _sample([1, IMG, 5, IMG, 6], [IGN, IGN, IGN, IGN, 6])
    out = assemble(sample, num_image_tokens=2, max_length=8, pad_token_id=PAD, image_token_id=9)
    _assert_arrays(
        out,
        input_ids=[1, 9, 9, 5, 9, 9, 6, 0],
        labels=[IGN, IGN, IGN, IGN, IGN, IGN, 6, IGN],
        attention_mask=[1, 1, 1, 1, 1, 1, 1, 0],
    )
    with pytest.raises(ImageTruncatedError):
        assemble(sample, num_image_tokens=2, max_length=5, pad_token_id=PAD, image_token_id=9)


def test_assemble_rejects_bad_arguments():
    kwargs = dict(num_image_tokens=3, max_length=8, pad_token_id=PAD, image_token_id=None)
    for bad, match in [
        (dict(num_image_tokens=0), "num_image_tokens"),
        (dict(max_length=0), "max_length"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(image_token_id=IMG), "image_token_id"),
    ]:
        with pytest.raises(ValueError, match=match):
            assemble(WITH_IMAGE, **{**kwargs, **bad})


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.integers(0, 6),
    suffix=st.integers(1, 8),
    has_image=st.booleans(),
    num_image_tokens=st.integers(1, 5),
    max_length=st.integers(1, 20),
    image_token_id=st.sampled_from([None, 77]),
)
def test_property_assemble(prefix, suffix, has_image, num_image_tokens, max_length, image_token_id):
    ids = list(range(10, 10 + prefix)) + ([IMG] if has_image else []) + list(range(40, 40 + suffix))
    labels = [IGN] * (len(ids) - suffix) + list(range(40, 40 + suffix))
    sample = _sample(ids, labels)
    image_end = prefix + num_image_tokens
    try:
        out = assemble(
            sample, num_image_tokens=num_image_tokens, max_length=max_length, pad_token_id=PAD,
            image_token_id=image_token_id,
        )
    except ImageTruncatedError:
        assert has_image and image_end > max_length
        return
    assert not (has_image and image_end > max_length)
    # Reference: expand every placeholder, cut at max_length, then map back to the convention.
    expanded = [i for i in ids for _ in range(num_image_tokens if i == IMG else 1)][:max_length]
    expanded_labels = [IGN if i == IMG else l for i, l in zip(ids, labels) for _ in range(num_image_tokens if i == IMG else 1)]
    expanded_labels = expanded_labels[:max_length]
    if image_token_id is None:
        kept = [i for n, i in enumerate(expanded) if i != IMG or n == prefix]
        kept_labels = [l for n, (i, l) in enumerate(zip(expanded, expanded_labels)) if i != IMG or n == prefix]
    else:
        kept = [image_token_id if i == IMG else i for i in expanded]
        kept_labels = expanded_labels
    n = len(kept)
    np.testing.assert_array_equal(out["input_ids"], kept + [PAD] * (max_length - n))
    np.testing.assert_array_equal(out["labels"], kept_labels + [IGN] * (max_length - n))
    np.testing.assert_array_equal(out["attention_mask"], [1] * n + [0] * (max_length - n))


def test_collate_stacks_and_checks():
    a = assemble(WITH_IMAGE, num_image_tokens=3, max_length=12, pad_token_id=PAD, image_token_id=None)
    b = assemble(TEXT_ONLY, num_image_tokens=3, max_length=12, pad_token_id=PAD, image_token_id=None)
    batch = collate([a, b])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (2, 12) and batch[key].dtype == np.int32
        np.testing.assert_array_equal(batch[key][1], b[key])
    with pytest.raises(ValueError, match="shapes"):
        collate([a, assemble(TEXT_ONLY, num_image_tokens=3, max_length=6, pad_token_id=PAD, image_token_id=None)])
    with pytest.raises(ValueError, match="keys"):
        collate([a, {"input_ids": a["input_ids"]}])
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def _right_padded(lengths, width):
    mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask > 0, np.arange(1, width + 1)[None], 0).astype(np.int32)
    return {"input_ids": ids, "labels": np.where(mask > 0, ids, -100).astype(np.int32), "attention_mask": mask,
            "pixel_values": np.zeros((len(lengths), 2, 2, 3), np.float32)}


@pytest.mark.parametrize("lengths, buckets, expected", [
    ((3, 7, 5), (4, 8, 16), 8),      # the longest (7) rounded up to the next bucket
    ((3, 8, 5), (4, 8, 16), 8),      # a bucket holds its own length
    ((3, 17, 5), (4, 8, 16), 20),    # past every bucket: the batch's own length (max_length) is the last
    ((3, 7, 5), (), 20),             # no buckets: unchanged
    ((3, 7, 5), (64, 8), 8),         # order does not matter
    ((0, 0, 0), (4, 8), 4),          # all padding: the smallest bucket
])
def test_pad_to_bucket_cuts_to_longest_rounded_up(lengths, buckets, expected):
    batch = _right_padded(lengths, 20)
    out = sequence.pad_to_bucket(batch, buckets)
    for key in ("input_ids", "labels", "attention_mask"):
        assert out[key].shape == (3, expected)
        np.testing.assert_array_equal(out[key], batch[key][:, :expected])  # only padding was cut
    assert out["pixel_values"] is batch["pixel_values"]  # not a sequence field
    assert sequence.bucket_length(7, (4, 8, 16), 20) == 8


def test_pad_to_bucket_errors():
    batch = _right_padded((3, 5), 8)
    batch["attention_mask"][0, 1] = 0  # a hole: not right-padded
    with pytest.raises(ValueError, match="right-padded"):
        sequence.pad_to_bucket(batch, (4,))
    with pytest.raises(ValueError, match="positive"):
        sequence.pad_to_bucket(_right_padded((3, 5), 8), (0, 4))
    with pytest.raises(ValueError, match="exceeds max_length"):
        sequence.bucket_length(9, (4,), 8)
