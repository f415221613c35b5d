"""Model inputs from tokenised samples: image expansion, truncation, padding, bucketing, packing.

Two conventions for where the image goes (both count the image's full token budget):

* ``image_token_id=None`` (TinyLLaVA Factory): the sample keeps one ``IMAGE_TOKEN_INDEX`` (-200) per
  image and the model splices ``num_image_tokens`` vision vectors in its place. Arrays are
  ``[max_length]`` and the sample is truncated so that *after* that expansion it still fits in
  ``max_length``; the model's merged sequence is ``max_length + num_image_tokens - 1`` long, and
  everything past ``max_length`` in it is padding.
* ``image_token_id=k`` (llava-hf): the placeholder becomes ``k`` repeated ``num_image_tokens`` times, so
  the arrays already have one position per vision vector.

Truncation cuts text from the right. It never cuts an image: a sample whose image would not fit
whole raises :class:`ImageTruncatedError`, which a training pipeline counts as a skipped sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qtl_jax.data.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from qtl_jax.data.templates import TokenizedSample


class ImageTruncatedError(ValueError):
    """Truncating the sample to ``max_length`` would cut into (or drop) its image.

    Attributes:
      reason: ``'image_truncated'``, for counting skips.
    """

    reason = "image_truncated"


def expanded_length(sample: TokenizedSample, num_image_tokens: int) -> int:
    """The sample's length once every image placeholder stands for ``num_image_tokens`` positions."""
    return len(sample) + sample.num_images * (num_image_tokens - 1)


def assemble(
    sample: TokenizedSample,
    *,
    num_image_tokens: int,
    max_length: int,
    pad_token_id: int,
    image_token_id: int | None,
) -> dict[str, np.ndarray]:
    """Expands, truncates and right-pads one sample.

    Args:
      sample: the output of ``Template.tokenize``.
      num_image_tokens: vision vectors per image after the connector (e.g. 728 for TinyLLaVA's
        SigLIP-so400m with the ``patch`` strategy, 729 with ``full``).
      max_length: the sequence budget, image positions included.
      pad_token_id: written into ``input_ids`` at padding positions. It may equal the EOS id (Phi,
        Qwen2): padding is identified by ``attention_mask``, never by comparing ids.
      image_token_id: llava-hf image token id to repeat, or None to keep one ``IMAGE_TOKEN_INDEX``.

    Returns:
      ``input_ids``, ``labels`` and ``attention_mask``, each ``int32 [max_length]``; labels are
      ``IGNORE_INDEX`` over image and padding positions.

    Raises:
      ImageTruncatedError: the image would not fit whole in ``max_length``.
      ValueError: invalid arguments.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}.")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    if pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a vocabulary id (>= 0), got {pad_token_id}.")
    if image_token_id is not None and image_token_id < 0:
        raise ValueError(f"image_token_id must be a vocabulary id (>= 0) or None, got {image_token_id}.")

    input_ids = sample.input_ids.astype(np.int32)
    labels = np.where(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX, sample.labels).astype(np.int32)
    is_image = input_ids == IMAGE_TOKEN_INDEX
    # Positions each token occupies once images are expanded.
    width = np.where(is_image, num_image_tokens, 1)
    end = np.cumsum(width)
    keep = int(np.searchsorted(end, max_length, side="right"))
    if is_image.any():
        last_image = int(np.flatnonzero(is_image)[-1])
        if keep <= last_image:
            raise ImageTruncatedError(
                f"The sample needs {int(end[-1])} positions ({sample.num_images} image(s) of "
                f"{num_image_tokens}), and its image ends at position {int(end[last_image])}, past "
                f"max_length={max_length}; raise max_length or shorten the text before the image."
            )
    input_ids, labels, is_image = input_ids[:keep], labels[:keep], is_image[:keep]

    if image_token_id is not None:
        repeats = np.where(is_image, num_image_tokens, 1)
        input_ids = np.repeat(np.where(is_image, image_token_id, input_ids), repeats)
        labels = np.repeat(labels, repeats)

    length = len(input_ids)
    out_ids = np.full(max_length, pad_token_id, dtype=np.int32)
    out_labels = np.full(max_length, IGNORE_INDEX, dtype=np.int32)
    out_mask = np.zeros(max_length, dtype=np.int32)
    out_ids[:length] = input_ids
    out_labels[:length] = labels
    out_mask[:length] = 1
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask}


# Fields of an assembled example that run along the sequence (trimmed by pad_to_bucket).
SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask")


def bucket_length(n: int, buckets: Sequence[int], max_length: int) -> int:
    """The smallest of ``buckets`` that is >= ``n``; ``max_length`` is the last bucket (and caps the others).

    Raises:
      ValueError: ``n`` exceeds ``max_length``, or a bucket is not a positive int.
    """
    if any(int(b) < 1 for b in buckets):
        raise ValueError(f"length buckets must be positive, got {tuple(buckets)}.")
    if n > max_length:
        raise ValueError(f"a sample of {n} positions exceeds max_length={max_length}; assemble truncates to it.")
    for b in sorted(int(b) for b in buckets):
        if n <= b <= max_length:
            return b
    return int(max_length)


def pad_to_bucket(batch: Mapping[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """A right-padded batch cut to its longest sample rounded up by :func:`bucket_length`.

    TinyLLaVA Factory pads each batch to its longest sample; rounding that up to one of a few ``buckets``
    keeps the number of distinct shapes (jit compilations) small. The batch's current length is the last
    bucket (its ``max_length``); ``buckets=()`` keeps it. Only the padding is cut: every sample keeps all its
    positions (``attention_mask`` says which are real).
    """
    if "segment_ids" in batch:
        raise ValueError("pad_to_bucket takes one sample per row; this batch is packed (pack buckets its rows).")
    batch = dict(batch)
    length = batch["attention_mask"].shape[1]
    real = batch["attention_mask"].astype(bool)
    if np.any(real[:, 1:] & ~real[:, :-1]):
        raise ValueError("pad_to_bucket needs right-padded samples (attention_mask 1...1 0...0).")
    longest = int(real.sum(axis=1).max()) if real.size else 0
    target = bucket_length(max(longest, 1), buckets, length)
    for key in SEQUENCE_KEYS:
        if key in batch:
            batch[key] = np.ascontiguousarray(batch[key][:, :target])
    return batch


def row_bucket(rows: int, batch_size: int, row_multiple: int = 1) -> int:
    """Rows a packed batch is given: ``rows`` rounded up to ``row_multiple`` times 1, 2, 3, 4, 6, 8, 12, ... (a
    power of two or three times one), at most ``batch_size`` rounded up to ``row_multiple``: a bounded set of
    shapes (one jit program each) that wastes less than a third of the rows. On a long-tailed length mix
    powers of two alone computed 39 % more positions than exact row counts, these steps 11 %
    (docs/performance.md, "Packing")."""
    if rows < 1 or row_multiple < 1:
        raise ValueError(f"rows and row_multiple must be >= 1, got {rows} and {row_multiple}.")
    top = -(-batch_size // row_multiple) * row_multiple
    need = -(-rows // row_multiple)
    sizes = sorted({1 << k for k in range(need.bit_length() + 1)} | {3 << k for k in range(need.bit_length())})
    size = next(n for n in sizes if n >= need)
    return max(min(size * row_multiple, top), need * row_multiple)


def pack(
    batch: Mapping[str, np.ndarray],
    *,
    capacity: int,
    num_image_tokens: int,
    length_buckets: Sequence[int] = (),
    row_multiple: int = 1,
    image_token_id: int = IMAGE_TOKEN_INDEX,
) -> dict[str, np.ndarray]:
    """Packs a collated batch of right-padded samples (TinyLLaVA Factory convention: at most one
    ``IMAGE_TOKEN_INDEX`` placeholder each) into rows of at most ``capacity`` merged positions.

    Samples are placed whole, in order, into the first row with room (first fit); a sample's merged length
    is its token count plus ``num_image_tokens - 1`` if it has an image. The samples stay the batch's samples:
    ``pixel_values`` and ``has_image`` are returned unchanged (image row ``i`` is sample ``i``), so the image
    quantizer's statistics see exactly what they see unpacked.

    Returns the batch with ``input_ids``, ``labels``, ``attention_mask`` as ``int32 [R, T]`` (the packed rows,
    each sample's tokens contiguous) and ``segment_ids`` ``int32 [R, L]``: for each *merged* position (image
    expanded), the index of the sample it belongs to, ``-1`` on padding. ``T`` and ``L`` are the longest
    row's token and merged lengths rounded up by :func:`bucket_length` (``capacity`` is the last bucket);
    ``R`` is :func:`row_bucket` of the rows used. The model then restarts positions at every sample and lets
    a position attend only within its sample (``qtl_jax.models.tinyllava.compute_layout(segment_ids=...)``).
    Each sample's first label becomes ``IGNORE_INDEX``: unpacked it is never a target (nothing precedes
    it), and packed it must not become the target of the previous sample's last position.

    When the packed text tensor would hold no zero row at all (no placeholder, no padding position), one
    more block of ``row_multiple`` empty rows is added: the paper's text statistics count padding rows, which
    the quantizer then weighs onto one zero row (``qtl_jax.models.quantized.packed_text_weights``).

    Raises:
      ValueError: not right-padded, several placeholders in a sample, a sample longer than ``capacity``, or
        invalid arguments.
    """
    if capacity < 1 or num_image_tokens < 1:
        raise ValueError(f"capacity and num_image_tokens must be >= 1, got {capacity} and {num_image_tokens}.")
    ids = np.asarray(batch["input_ids"], np.int32)
    labels = np.asarray(batch["labels"], np.int32)
    real = np.asarray(batch["attention_mask"]).astype(bool)
    if "segment_ids" in batch:
        raise ValueError("this batch is already packed (it has segment_ids).")
    if np.any(real[:, 1:] & ~real[:, :-1]):
        raise ValueError("pack needs right-padded samples (attention_mask 1...1 0...0).")
    placeholders = ((ids == image_token_id) & real).sum(axis=1)
    if np.any(placeholders > 1):
        raise ValueError(f"samples {np.flatnonzero(placeholders > 1).tolist()} hold several image placeholders; "
                         "packing takes at most one image per sample.")
    tokens = real.sum(axis=1)
    merged = tokens + placeholders * (num_image_tokens - 1)
    if np.any(merged > capacity):
        i = int(np.argmax(merged))
        raise ValueError(f"sample {i} needs {int(merged[i])} merged positions, more than capacity={capacity} "
                         "(model.max_length); assemble truncates samples to it.")
    pad_id = int(ids[~real][0]) if (~real).any() else 0

    rows: list[list[int]] = []
    room: list[int] = []
    for i, need in enumerate(merged.tolist()):
        for r, free in enumerate(room):
            if need <= free:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(capacity - need)

    row_tokens = [int(sum(tokens[i] for i in row)) for row in rows]
    row_merged = [capacity - free for free in room]
    t = bucket_length(max(max(row_tokens), 1), length_buckets, capacity)
    length = bucket_length(max(max(row_merged), 1), length_buckets, capacity)
    n_rows = row_bucket(len(rows), len(tokens), row_multiple)
    has_zero_row = n_rows > len(rows) or placeholders.any() or min(row_tokens) < t
    if not has_zero_row:
        n_rows += row_multiple
    out_ids = np.full((n_rows, t), pad_id, np.int32)
    out_labels = np.full((n_rows, t), IGNORE_INDEX, np.int32)
    out_mask = np.zeros((n_rows, t), np.int32)
    segments = np.full((n_rows, length), -1, np.int32)
    for r, row in enumerate(rows):
        start = merged_start = 0
        for i in row:
            n = int(tokens[i])
            out_ids[r, start:start + n] = ids[i, :n]
            out_labels[r, start:start + n] = labels[i, :n]
            out_labels[r, start] = IGNORE_INDEX
            out_mask[r, start:start + n] = 1
            segments[r, merged_start:merged_start + int(merged[i])] = i
            start += n
            merged_start += int(merged[i])
    out = dict(batch)
    out.update(input_ids=out_ids, labels=out_labels, attention_mask=out_mask, segment_ids=segments)
    return out


def collate(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks equally shaped examples into a batch: ``{key: [B, ...]}``.

    Raises:
      ValueError: no examples, or examples with different keys or shapes.
    """
    if not examples:
        raise ValueError("collate needs at least one example.")
    keys = set(examples[0])
    for i, example in enumerate(examples):
        if set(example) != keys:
            raise ValueError(f"Example {i} has keys {sorted(example)}, example 0 has {sorted(keys)}.")
    batch = {}
    for key in examples[0]:
        values = [np.asarray(example[key]) for example in examples]
        shapes = {value.shape for value in values}
        if len(shapes) != 1:
            raise ValueError(
                f"Cannot stack {key!r}: shapes {sorted(shapes)} differ; assemble every example with "
                f"the same max_length (and images with the same processor)."
            )
        batch[key] = np.stack(values)
    return batch
