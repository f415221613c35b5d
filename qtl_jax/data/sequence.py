"""Fixed-length model inputs from tokenised samples: image expansion, truncation, padding, packing.

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


def pack(
    samples: Sequence[Mapping[str, np.ndarray]], max_length: int, *, pad_token_id: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Packs short assembled samples into rows of ``max_length`` (first fit, in input order).

    Each sample is placed whole into the first row with room, so image tokens are never split. Rows
    carry ``segment_ids`` (1, 2, ... per sample, 0 on padding) and ``positions`` (restarting at 0 for
    every sample). A model must then (a) let token i attend to token j only if
    ``segment_ids[i] == segment_ids[j] != 0`` and ``j <= i``, and (b) use ``positions`` as position
    ids. The label of each sample's first token is set to ``IGNORE_INDEX`` so that a shifted
    next-token loss never trains one sample's last token to predict the next sample's first.

    Args:
      samples: outputs of :func:`assemble` made with ``image_token_id`` set (the llava-hf
        convention), right-padded, any length up to ``max_length``.
      max_length: the row length.
      pad_token_id: id for the padding of the rows; None takes it from the samples' own padding.

    Returns:
      Rows with ``input_ids``, ``labels``, ``attention_mask``, ``segment_ids``, ``positions``, all
      ``int32 [max_length]``.

    Raises:
      ValueError: a sample still has ``IMAGE_TOKEN_INDEX`` placeholders (in the Factory convention
        the model inserts the image, so packed positions could not cover it), is longer than
        ``max_length``, or is not right-padded; or no pad id is given or found.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    pieces = []
    for index, sample in enumerate(samples):
        mask = np.asarray(sample["attention_mask"])
        length = int(mask.sum())
        if not np.all(mask[:length] == 1):
            raise ValueError(f"Sample {index} is not right-padded (attention_mask {mask.tolist()}).")
        input_ids = np.asarray(sample["input_ids"], dtype=np.int32)
        if np.any(input_ids[:length] == IMAGE_TOKEN_INDEX):
            raise ValueError(
                f"Sample {index} holds IMAGE_TOKEN_INDEX placeholders; packing needs the image "
                f"positions expanded: assemble with image_token_id=<the image token id>."
            )
        if length > max_length:
            raise ValueError(f"Sample {index} has {length} tokens, more than max_length={max_length}.")
        if pad_token_id is None and length < len(input_ids):
            pad_token_id = int(input_ids[length])
        labels = np.asarray(sample["labels"], dtype=np.int32)[:length].copy()
        labels[:1] = IGNORE_INDEX
        pieces.append((input_ids[:length], labels))

    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    room: list[int] = []
    for piece in pieces:
        length = len(piece[0])
        for r, free in enumerate(room):
            if length <= free:
                rows[r].append(piece)
                room[r] -= length
                break
        else:
            rows.append([piece])
            room.append(max_length - length)

    if rows and pad_token_id is None:
        raise ValueError("None of the samples has padding to take the pad id from; pass pad_token_id.")
    out = []
    for row in rows:
        ids = np.full(max_length, pad_token_id, dtype=np.int32)
        labels = np.full(max_length, IGNORE_INDEX, dtype=np.int32)
        segment_ids = np.zeros(max_length, dtype=np.int32)
        positions = np.zeros(max_length, dtype=np.int32)
        start = 0
        for segment, (piece_ids, piece_labels) in enumerate(row, start=1):
            stop = start + len(piece_ids)
            ids[start:stop] = piece_ids
            labels[start:stop] = piece_labels
            segment_ids[start:stop] = segment
            positions[start:stop] = np.arange(len(piece_ids))
            start = stop
        out.append({
            "input_ids": ids,
            "labels": labels,
            "attention_mask": (segment_ids > 0).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": positions,
        })
    return out


# Fields of an assembled or packed example that run along the sequence (trimmed by pad_to_bucket).
SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "positions")


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
