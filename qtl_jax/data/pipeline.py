"""The training input pipeline: stored LLaVA records -> fixed-shape model batches.

Per example, as a chain of grain map transforms (so they can run in worker processes):

1. ``DecodeRecord``: the TFDS record -> text fields, the conversation list and a decoded PIL image.
2. ``PreprocessImage``: the image processor -> ``pixel_values float32 [H, W, 3]``; text-only samples
   get zeros of the same shape so that every batch has the same shapes.
3. ``Tokenize``: the chat template -> ``input_ids`` / ``labels``. A malformed conversation or a
   tokenisation mismatch becomes a counted skip, never a sample with all labels masked.
4. ``Assemble``: image placeholder expansion, truncation to ``max_length`` and padding
   (``sequence.assemble``). A sample whose image would be cut, or that truncation leaves with no
   trained token, is a counted skip.

``collate_batch`` then stacks every field, so row ``i`` of every array belongs to sample ``i``:
``pixel_values[i]`` is sample ``i``'s image (zeros for a text-only sample) and ``has_image[i]`` says
whether it has one. Batches therefore always have ``global_batch_size / process_count`` images,
text-only or not, so one jit compilation serves every step; the model indexes images by sample row
(``qtl_jax.models.tinyllava.compute_layout(..., images_by_sample=True)``) and never reads the zero rows.

Skips are counted by reason on the loader (``loader.skipped`` / ``loader.metrics()``) and saved with
its state. ``build_input_pipeline`` is the one call training makes.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
import PIL.Image

from qtl_jax.data import llava_tfds, sequence, templates
from qtl_jax.data.constants import IGNORE_INDEX
from qtl_jax.data.loader import DataLoader, LoaderConfig, SkippedExample

# Skip reasons added by this pipeline (the template adds its ConversationError reasons and
# 'tokenization_mismatch').
UNREADABLE_IMAGE = "unreadable_image"
NO_TRAINED_TOKENS = "no_trained_tokens"


class DecodeRecord(grain.transforms.Map):
    """A stored record -> ``{'id', 'conversations', 'has_image', 'image': PIL.Image | None}``."""

    def map(self, record: Mapping[str, Any]) -> dict[str, Any] | SkippedExample:
        rec = llava_tfds.decode_record(record)
        image = None
        if rec["has_image"]:
            try:
                image = PIL.Image.open(io.BytesIO(rec["image"]))
                image.load()
            except (OSError, ValueError, SyntaxError) as e:
                # The builder decoded every image once, so this means the records were damaged.
                return SkippedExample(UNREADABLE_IMAGE, rec["id"], f"{type(e).__name__}: {e}")
        return {
            "id": rec["id"],
            "conversations": rec["conversations"],
            "has_image": rec["has_image"],
            "image": image,
        }


class PreprocessImage(grain.transforms.Map):
    """Adds ``pixel_values`` (zeros for text-only samples) and drops the PIL image."""

    def __init__(self, image_processor: Callable[[PIL.Image.Image], np.ndarray], image_shape):
        self.image_processor = image_processor
        self.image_shape = tuple(image_shape)

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        example = dict(example)
        image = example.pop("image")
        if example["has_image"]:
            pixels = np.asarray(self.image_processor(image), dtype=np.float32)
            if pixels.shape != self.image_shape:
                raise ValueError(
                    f"the image processor returned {pixels.shape} for {example['id']!r}, expected "
                    f"{self.image_shape}; batches need one fixed size, so configure it to resize "
                    "or crop to a fixed size."
                )
        else:
            pixels = np.zeros(self.image_shape, np.float32)
        example["pixel_values"] = pixels
        return example


class Tokenize(grain.transforms.Map):
    """Renders and tokenises the conversation with a chat template; mismatches become skips."""

    def __init__(self, template: Any, tokenizer: Any):
        self.template = template
        self.tokenizer = tokenizer
        # Fast tokenizers reconfigure their Rust backend on every call and raise "Already borrowed"
        # when two threads do it at once.
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def map(self, example: dict[str, Any]) -> dict[str, Any] | SkippedExample:
        try:
            with self._lock:
                sample = self.template.tokenize(
                    example["conversations"], self.tokenizer, example["has_image"], strict=False
                )
        except templates.ConversationError as e:
            return SkippedExample(e.reason, example["id"], str(e))
        if sample is None:
            return SkippedExample(
                templates.TokenizationMismatchError.reason,
                example["id"],
                f"template {self.template.name!r}: segment tokens are not a prefix of the full "
                "tokenisation (details in the template's warning log)",
            )
        example = dict(example)
        del example["conversations"]
        example["tokens"] = sample
        return example


class Assemble(grain.transforms.Map):
    """Expands the image placeholder, truncates and pads to ``max_length``; adds ``has_image``."""

    def __init__(self, *, num_image_tokens: int, max_length: int, pad_token_id: int,
                 image_token_id: int | None):
        self.kwargs = dict(
            num_image_tokens=num_image_tokens,
            max_length=max_length,
            pad_token_id=pad_token_id,
            image_token_id=image_token_id,
        )

    def map(self, example: dict[str, Any]) -> dict[str, Any] | SkippedExample:
        try:
            out = dict(sequence.assemble(example["tokens"], **self.kwargs))
        except sequence.ImageTruncatedError as e:
            return SkippedExample(e.reason, example["id"], str(e))
        if not np.any(out["labels"] != IGNORE_INDEX):
            return SkippedExample(
                NO_TRAINED_TOKENS,
                example["id"],
                f"no answer token left within max_length={self.kwargs['max_length']}",
            )
        out["pixel_values"] = example["pixel_values"]
        out["has_image"] = np.int32(example["has_image"])
        return out


def collate_batch(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks assembled examples: row ``i`` of every array is ``examples[i]`` (module docstring)."""
    return sequence.collate(examples)


def image_shape_of(image_processor: Any) -> tuple[int, int, int]:
    """``(H, W, 3)`` every processed image has; errors when the processor's output size varies."""
    size = getattr(image_processor, "output_size", None)
    if size is None:
        raise ValueError(
            "the image processor's output size depends on the input image (no fixed resize or "
            "crop), but batches need one size; set size=(H, W) or a center crop."
        )
    return (int(size[0]), int(size[1]), 3)


def build_input_pipeline(
    dataset_dir: str | os.PathLike,
    split: str,
    *,
    tokenizer: Any,
    template: Any,
    image_processor: Any,
    num_image_tokens: int,
    max_length: int,
    global_batch_size: int,
    seed: int,
    image_token_id: int | None = None,
    pad_token_id: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_threads: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataLoader:
    """Opens a built LLaVA dataset split and returns this host's batch iterator.

    Args:
        dataset_dir: a dataset built by ``llava_tfds.build`` (``<data_dir>/llava_json/<name>/1.0.0``).
        split: e.g. ``"train"``.
        tokenizer: a Hugging Face tokenizer.
        template: a chat template object or its name (``qtl_jax.data.templates.get_template``).
        image_processor: maps a PIL image to ``float32 [H, W, 3]`` of a fixed size, e.g.
            ``qtl_jax.data.image_processing.ImageProcessor``.
        num_image_tokens: positions one image takes in the sequence (the tower's token count).
        max_length: sequence length of every batch, image tokens included.
        global_batch_size: examples per step over all hosts.
        seed: shuffling seed.
        image_token_id: None keeps one ``IMAGE_TOKEN_INDEX`` (-200) per image (TinyLLaVA Factory
            convention, the model expands it); an id repeats that id ``num_image_tokens`` times
            (llava-hf convention). See ``sequence.assemble``.
        pad_token_id: padding id; defaults to the tokenizer's.
        num_epochs, shuffle, drop_remainder, worker_count, read_threads: see ``LoaderConfig``.
        process_index, process_count: host layout; default to JAX's.

    Returns:
        A ``DataLoader`` yielding dicts of numpy arrays with a leading batch dimension of
        ``B = global_batch_size / process_count``, row ``i`` = sample ``i``: ``input_ids``, ``labels``,
        ``attention_mask`` (``int32 [B, max_length]``), ``pixel_values float32 [B, H, W, 3]`` (zeros
        for a text-only sample) and ``has_image int32 [B]`` (see the module docstring). It has
        ``get_state`` / ``set_state`` for checkpoints and ``skipped`` / ``metrics()`` for the skip
        counts.
    """
    if isinstance(template, str):
        template = templates.get_template(template)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; pass pad_token_id= (any id works: padded "
                "positions are masked out of attention and loss)."
            )
    source = llava_tfds.open_split(os.fspath(dataset_dir), split)
    operations = [
        DecodeRecord(),
        PreprocessImage(image_processor, image_shape_of(image_processor)),
        Tokenize(template, tokenizer),
        Assemble(
            num_image_tokens=num_image_tokens,
            max_length=max_length,
            pad_token_id=int(pad_token_id),
            image_token_id=None if image_token_id is None else int(image_token_id),
        ),
    ]
    config = LoaderConfig(
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        worker_count=worker_count,
        read_threads=read_threads,
    )
    return DataLoader(
        source,
        operations,
        config,
        collate=collate_batch,
        process_index=process_index,
        process_count=process_count,
    )
