"""TinyLLaVA: vision tower -> connector -> causal LM, with explicit client and server halves.

The model is cut the way split learning cuts it. The **client** turns images into connector vectors
(:meth:`TinyLlava.encode_images`), token ids into embedding vectors (:meth:`TinyLlava.embed_tokens`)
and computes a :class:`MergeLayout` from the token ids (where every merged position's vector comes
from). The **server** scatters the two vector sets into one sequence (:func:`scatter`) and runs the
decoder (:meth:`TinyLlava.decode`). The quantizers sit between the two halves, so the image and text
vectors stay separate until :func:`scatter`.

Image placeholders come in two conventions:

* ``'factory'`` (TinyLLaVA Factory / LLaVA): one ``image_token_index`` (-200) per image in
  ``input_ids``; the model expands it to the image's ``T_img`` tokens. As in the Factory, padding
  (``attention_mask == 0``) is removed, each sample is rebuilt, truncated to the merged length and
  re-padded on ``padding_side`` with zero vectors. The **static merged length** is
  ``T_text + min(max_images_per_sample, N_img) * (T_img - 1)`` (so a text-only batch keeps ``T_text``),
  capped at ``config.max_length`` when set (the Factory's truncation limit). A batch padded to its longest
  sample thus gets a merged sequence as long as its longest merged sample (plus the bucket rounding of
  ``qtl_jax.data.sequence.bucket_length``), as the Factory pads it.
* ``'llava_hf'``: the image token id is already repeated ``T_img`` times; the sequence keeps its
  length and padding, and the k-th image token (row-major over the batch) takes image vector k.

In both, images are consumed in row-major order of their placeholders: ``pixel_values[g]`` belongs
to the g-th placeholder of the flattened batch (what transformers does, for several images per sample).
With at most one image per sample the layout can instead index images by sample row
(``compute_layout(..., images_by_sample=True)``): image row ``i`` belongs to sample ``i``, and the rows
of text-only samples are never read. The quantized split model and the input pipeline use that. Text-only
samples (no placeholder) and text-only batches (``pixel_values=None``) work. Labels come back with -100
over image and padding positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qtl_jax.data.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from qtl_jax.models.connector import Connector, ConnectorConfig
from qtl_jax.models.decoder import Decoder, DecoderConfig
from qtl_jax.models.vision import VisionConfig, VisionTower, normalize_strategy, num_feature_tokens, select_features

Array = jax.Array
Convention = Literal["factory", "llava_hf"]


@dataclasses.dataclass(frozen=True)
class TinyLlavaConfig:
    """The whole model. ``dtype`` (compute; params stay fp32) and ``remat`` apply to tower, connector
    and decoder alike and override the ones inside ``llm``."""

    vision: VisionConfig
    connector: ConnectorConfig
    llm: DecoderConfig
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "patch"
    image_token_index: int = IMAGE_TOKEN_INDEX
    convention: Convention = "factory"
    # Cap of the static merged sequence length ('factory'), the truncation limit; the length itself is derived
    # from the text length (see the module docstring). None: no cap.
    max_length: int | None = None
    max_images_per_sample: int = 1
    padding_side: Literal["right", "left"] = "right"
    # Only for LLMs that scale embeddings (Gemma: sqrt(hidden)). transformers 5.x scales inside the token
    # embedding, so llava-hf image features are NOT scaled; the Factory ran on transformers 4.x, whose
    # GemmaModel scaled all inputs_embeds, images included. None picks by convention (llava_hf: no, factory: yes).
    scale_image_embeddings: bool | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    # Attention kernel of tower and decoder (qtl_jax.models.attention.IMPLEMENTATIONS; 'auto': by backend).
    attention: str = "auto"
    # Scan the tower's layers, and the decoder's when they are identical (qtl_jax.models.scan).
    scan_layers: bool = False

    def __post_init__(self):
        problems = []
        normalize_strategy(self.vision_feature_select_strategy)
        if self.convention not in ("factory", "llava_hf"):
            problems.append(f"convention must be 'factory' or 'llava_hf', got {self.convention!r}")
        if self.padding_side not in ("right", "left"):
            problems.append(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.connector.vision_hidden_size != self.vision.hidden_size:
            problems.append(
                f"connector input {self.connector.vision_hidden_size} != vision hidden_size {self.vision.hidden_size}"
            )
        if self.connector.hidden_size != self.llm.hidden_size:
            problems.append(f"connector output {self.connector.hidden_size} != LLM hidden_size {self.llm.hidden_size}")
        if self.convention == "llava_hf" and not 0 <= self.image_token_index < self.llm.vocab_size:
            problems.append(
                f"llava_hf convention needs an image token id inside the vocabulary [0, {self.llm.vocab_size}), "
                f"got {self.image_token_index}; the Factory's -200 placeholder needs convention='factory'"
            )
        if self.max_length is not None and self.max_length < 1:
            problems.append(f"max_length must be positive, got {self.max_length}")
        if problems:
            raise ValueError("invalid TinyLlavaConfig:\n  " + "\n  ".join(problems))

    @property
    def scales_images(self) -> bool:
        if self.llm.embed_scale is None:
            return False
        if self.scale_image_embeddings is None:
            return self.convention == "factory"
        return self.scale_image_embeddings

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image after feature selection (``T_img``)."""
        return num_feature_tokens(self.vision, self.vision_feature_select_strategy)

    def merged_length(self, text_length: int, num_images: int = 1) -> int:
        """The static merged sequence length for ``text_length`` input tokens and ``num_images`` images."""
        if self.convention == "llava_hf":
            return text_length
        slots = min(self.max_images_per_sample, num_images)  # a text-only batch keeps its length
        derived = text_length + slots * (self.num_image_tokens - 1)
        return derived if self.max_length is None else min(derived, self.max_length)


@flax.struct.dataclass
class MergeLayout:
    """Where each merged position's vector comes from; all fields are ``[B, L]`` int32 arrays.

    ``source`` indexes the row-stacked table ``[text_vectors.reshape(-1, D); image_vectors.reshape(-1, D);
    zeros(1, D)]``: text token ``(b, i)`` is row ``b * T_text + i``, image ``g`` token ``k`` is row
    ``B * T_text + g * T_img + k``, and the last row is the zero vector padding gets.
    """

    source: Array
    is_image: Array  # 1 where the vector is an image token
    image_index: Array  # which image (-1 elsewhere)
    image_token: Array  # which token of that image (-1 elsewhere)
    text_index: Array  # which input token (-1 elsewhere)
    attention_mask: Array
    position_ids: Array
    labels: Array | None = None
    # Packed rows (several samples per row): the sample of every merged position, -1 on padding; positions
    # restart at each sample and attention stays within it. None: one sample per row.
    segment_ids: Array | None = None


@flax.struct.dataclass
class TinyLlavaOutput:
    logits: Array  # [B, L, V] float32
    attention_mask: Array  # [B, L] the merged mask: compare / take the loss where it is 1
    labels: Array | None  # [B, L] with -100 over image and padding positions (None without labels)
    position_ids: Array
    layout: MergeLayout


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def compute_layout(
    config: TinyLlavaConfig,
    input_ids: Array,
    attention_mask: Array | None = None,
    labels: Array | None = None,
    *,
    num_images: int,
    merged_length: int | None = None,
    images_by_sample: bool = False,
    segment_ids: Array | None = None,
) -> MergeLayout:
    """The merge layout for ``input_ids`` [B, T] holding placeholders for ``num_images`` images.

    Static shapes under jit: ``[B, merged_length]`` (default ``config.merged_length(T, num_images)``). Called on
    concrete arrays it also checks that placeholders and images agree and nothing is truncated
    unintentionally; under jit those checks cannot run, so check the data pipeline's output once.

    ``images_by_sample`` ('factory' only): image row ``i`` is sample ``i``'s image (``num_images`` must be
    B; each sample has at most one placeholder; rows of text-only samples are unused). Otherwise the
    g-th placeholder in row-major order takes image row g.

    ``segment_ids`` ('factory' only; packed rows from :func:`qtl_jax.data.sequence.pack`): ``[B, L]``, the
    sample of every merged position (``-1`` on padding). It sets the merged length ``L``; a placeholder takes
    the image row of its sample (``num_images`` = the number of samples); position ids restart at 0 at every
    sample, and the layout carries the segments for the decoder's attention (within a sample only).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, t = input_ids.shape
    t_img = config.num_image_tokens
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if mask.shape != (b, t):
        raise ValueError(f"attention_mask must have input_ids' shape {(b, t)}, got {mask.shape}")
    if labels is not None and labels.shape != (b, t):
        raise ValueError(f"labels must have input_ids' shape {(b, t)}, got {labels.shape}")
    if images_by_sample and (config.convention != "factory" or num_images != b):
        raise ValueError(
            f"images_by_sample needs the factory convention and one image row per sample (num_images={num_images}, "
            f"batch {b}, convention {config.convention!r})"
        )
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if config.convention != "factory" or config.padding_side != "right" or images_by_sample:
            raise ValueError("packed rows (segment_ids) need the factory convention with right padding, and take "
                             "images by segment (not images_by_sample)")
        if segment_ids.ndim != 2 or segment_ids.shape[0] != b:
            raise ValueError(f"segment_ids must be [batch, merged length] with batch {b}, got {segment_ids.shape}")
        if merged_length is not None and merged_length != segment_ids.shape[1]:
            raise ValueError(f"merged_length={merged_length} disagrees with segment_ids' length {segment_ids.shape[1]}")
        merged_length = segment_ids.shape[1]
    length = config.merged_length(t, num_images) if merged_length is None else merged_length
    if config.convention == "llava_hf" and length != t:
        raise ValueError(f"the llava_hf convention keeps the sequence length ({t}); got merged_length={length}")
    is_img = (input_ids == config.image_token_index) & mask
    text_rows = b * t
    zero_row = text_rows + num_images * t_img
    if images_by_sample:  # the image of a sample's placeholder is the sample's own row
        rank = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    else:  # row-major rank of every placeholder among the batch's placeholders
        rank = (jnp.cumsum(is_img.reshape(-1)) - 1).reshape(b, t)
    # Inside jit / make_jaxpr even ops on constants are staged out, so test the derived values.
    concrete = _is_concrete(is_img)
    n_placeholders = int(is_img.sum()) if concrete else None

    if config.convention == "llava_hf":
        if concrete and n_placeholders != num_images * t_img:
            raise ValueError(
                f"{n_placeholders} image tokens (id {config.image_token_index}) in input_ids but {num_images} images x "
                f"{t_img} tokens = {num_images * t_img}; the llava_hf convention repeats the image token once per "
                "image feature"
            )
        token_of = jnp.broadcast_to(jnp.arange(t), (b, t))
        row_of = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        image_row = jnp.where(rank < num_images * t_img, text_rows + rank, zero_row)
        # Padding keeps its own token embedding, as in transformers (its outputs are garbage either way).
        source = jnp.where(is_img, image_row, row_of * t + token_of)
        image_index = jnp.where(is_img, rank // t_img, -1)
        image_token = jnp.where(is_img, rank % t_img, -1)
        text_index = jnp.where(is_img, -1, token_of)
        out_mask = mask
        position_ids = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        out_labels = None if labels is None else jnp.where(is_img | ~mask, IGNORE_INDEX, labels)
    else:
        if concrete and images_by_sample and int(jnp.max(is_img.sum(axis=1))) > 1:
            raise ValueError(
                f"samples {np.flatnonzero(np.asarray(is_img.sum(axis=1)) > 1).tolist()} have several image "
                f"placeholders ({config.image_token_index}); images_by_sample allows one image per sample"
            )
        if concrete and segment_ids is None and not images_by_sample and n_placeholders != num_images:
            raise ValueError(
                f"{n_placeholders} image placeholders ({config.image_token_index}) in input_ids but {num_images} "
                "images in pixel_values; the factory convention needs exactly one placeholder per image"
            )
        width = jnp.where(mask, jnp.where(is_img, t_img, 1), 0)  # merged positions each input token takes
        end = jnp.cumsum(width, axis=1)
        real = end[:, -1]
        if _is_concrete(real) and merged_length is None and config.max_length is None and int(real.max()) > length:
            raise ValueError(
                f"a sample needs {int(real.max())} merged positions but the derived merged length is {length} "
                f"(max_images_per_sample={config.max_images_per_sample}); raise max_images_per_sample or set "
                "max_length to truncate like the Factory's tokenizer_model_max_length"
            )
        kept = jnp.minimum(real, length)
        offset = (length - kept) if config.padding_side == "left" else jnp.zeros_like(kept)
        q = jnp.arange(length)[None, :] - offset[:, None]  # position inside the real (unpadded) sequence
        valid = (q >= 0) & (q < kept[:, None])
        qc = jnp.clip(q, 0, None)
        # compare_all: the default method is a while loop, which XLA on a GPU runs from the host, reading
        # the condition back each iteration (a host-device sync at the start of the server's program).
        tok = jax.vmap(lambda e, qq: jnp.searchsorted(e, qq, side="right", method="compare_all"))(end, qc)
        tok = jnp.clip(tok, 0, t - 1)
        take = lambda a: jnp.take_along_axis(a, tok, axis=1)  # noqa: E731
        k = qc - (take(end) - take(width))
        tok_is_img = take(is_img) & valid
        g = take(rank) if segment_ids is None else segment_ids
        image_row = jnp.where(g < num_images, text_rows + g * t_img + k, zero_row)
        text_row = jnp.arange(b)[:, None] * t + tok
        source = jnp.where(valid, jnp.where(tok_is_img, image_row, text_row), zero_row)
        image_index = jnp.where(tok_is_img, g, -1)
        image_token = jnp.where(tok_is_img, k, -1)
        text_index = jnp.where(valid & ~tok_is_img, tok, -1)
        out_mask = valid
        position_ids = jnp.where(valid, q, 0)
        if segment_ids is not None:
            if _is_concrete(segment_ids, valid) and not bool(jnp.all((segment_ids >= 0) == valid)):
                raise ValueError("segment_ids must mark exactly the merged positions the tokens fill (-1 elsewhere); "
                                 "build packed batches with qtl_jax.data.sequence.pack")
            segment_ids = jnp.where(valid, segment_ids, -1)
            # Positions restart at each sample: subtract the merged index where the sample's run begins.
            previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
            index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
            begins = jax.lax.cummax(jnp.where(segment_ids != previous, index, 0), axis=1)
            position_ids = jnp.where(valid, index - begins, 0)
        out_labels = None
        if labels is not None:
            out_labels = jnp.where(valid & ~tok_is_img, take(jnp.asarray(labels, jnp.int32)), IGNORE_INDEX)

    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    return MergeLayout(
        source=i32(source),
        is_image=i32(is_img if config.convention == "llava_hf" else tok_is_img),
        image_index=i32(image_index),
        image_token=i32(image_token),
        text_index=i32(text_index),
        attention_mask=i32(out_mask),
        position_ids=i32(position_ids),
        labels=None if out_labels is None else i32(out_labels),
        segment_ids=None if segment_ids is None else i32(segment_ids),
    )


def scatter(image_vectors: Array | None, text_vectors: Array, layout: MergeLayout) -> Array:
    """Server side: ``[N_img, T_img, D]`` image and ``[B, T_text, D]`` text vectors -> ``[B, L, D]``.

    A gather from the stacked table, so gradients flow back to both vector sets (scatter-add).
    """
    d = text_vectors.shape[-1]
    parts = [text_vectors.reshape(-1, d)]
    if image_vectors is not None and image_vectors.size:
        if image_vectors.shape[-1] != d:
            raise ValueError(f"image vectors have width {image_vectors.shape[-1]} but text vectors {d}")
        parts.append(image_vectors.reshape(-1, d).astype(text_vectors.dtype))
    parts.append(jnp.zeros((1, d), text_vectors.dtype))
    return jnp.concatenate(parts, axis=0)[layout.source]


class TinyLlava(nn.Module):
    """``apply({'params': p}, input_ids=..., pixel_values=..., attention_mask=..., labels=...)``.

    Params: ``vision_tower`` (:class:`VisionTower`), ``connector`` (:class:`Connector`), ``llm``
    (:class:`Decoder`). ``pixel_values`` are channels-last ``[N_img, H, W, C]``.
    """

    config: TinyLlavaConfig

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, cfg.dtype, cfg.remat, cfg.remat_policy, cfg.attention,
                                        cfg.scan_layers)
        self.connector = Connector(cfg.connector, cfg.dtype)
        # Embedding scaling (Gemma) is done here, not in the decoder, because text and image vectors
        # are scaled differently by the two references (see TinyLlavaConfig.scale_image_embeddings).
        self.llm = Decoder(dataclasses.replace(cfg.llm, dtype=cfg.dtype, remat=cfg.remat, remat_policy=cfg.remat_policy,
                                               attention=cfg.attention, scan_layers=cfg.scan_layers,
                                               embed_scale=None))

    # ---- client ----
    def encode_images(self, pixel_values: Array) -> Array:
        """``[N_img, H, W, C]`` -> ``[N_img, T_img, D]``: tower, feature selection, connector."""
        hidden_states, _ = self.vision_tower(pixel_values)
        cfg = self.config
        return self.connector(select_features(hidden_states, cfg.vision_feature_layer, cfg.vision_feature_select_strategy))

    def embed_tokens(self, input_ids: Array) -> Array:
        """``[B, T]`` -> ``[B, T, D]`` text vectors; placeholder ids (-200) embed as id 0 and are never used.

        For Gemma the vectors are already multiplied by sqrt(hidden), as transformers 5.x embeds them.
        """
        x = self.llm.embed(jnp.where(input_ids < 0, 0, input_ids))
        scale = self.config.llm.embed_scale
        return x if scale is None else x * jnp.asarray(scale, x.dtype)

    def layout(self, input_ids, attention_mask=None, labels=None, *, num_images: int, merged_length=None) -> MergeLayout:
        return compute_layout(
            self.config, input_ids, attention_mask, labels, num_images=num_images, merged_length=merged_length
        )

    # ---- server ----
    def decode(self, inputs_embeds: Array, layout: MergeLayout) -> Array:
        """Merged ``[B, L, D]`` embeddings -> ``[B, L, V]`` float32 logits."""
        return self.llm(self._scaled(inputs_embeds, layout), layout.attention_mask, layout.position_ids,
                        layout.segment_ids)

    def decode_hidden(self, inputs_embeds: Array, layout: MergeLayout) -> Array:
        """As :meth:`decode` up to the LLM's final norm (``[B, L, D]``); the head is ``decoder.head_of``'s."""
        return self.llm.final_hidden(self._scaled(inputs_embeds, layout), layout.attention_mask, layout.position_ids,
                                     layout.segment_ids)

    def _scaled(self, inputs_embeds: Array, layout: MergeLayout) -> Array:
        cfg = self.config
        if cfg.scales_images:
            scale = jnp.where(layout.is_image[..., None] > 0, cfg.llm.embed_scale, 1.0)
            inputs_embeds = inputs_embeds * scale.astype(inputs_embeds.dtype)
        return inputs_embeds

    def __call__(
        self,
        input_ids: Array,
        pixel_values: Array | None = None,
        attention_mask: Array | None = None,
        labels: Array | None = None,
        merged_length: int | None = None,
    ) -> TinyLlavaOutput:
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        layout = self.layout(input_ids, attention_mask, labels, num_images=num_images, merged_length=merged_length)
        image_vectors = self.encode_images(pixel_values) if num_images else None
        text_vectors = self.embed_tokens(jnp.asarray(input_ids, jnp.int32))
        logits = self.decode(scatter(image_vectors, text_vectors.astype(self.config.dtype), layout), layout)
        return TinyLlavaOutput(logits, layout.attention_mask, layout.labels, layout.position_ids, layout)


def dummy_inputs(config: TinyLlavaConfig, batch: int = 1, text_length: int = 2):
    """Minimal inputs that touch every parameter (for ``init`` / ``jax.eval_shape``)."""
    ids = np.zeros((batch, text_length), np.int32)
    ids[0, 0] = config.image_token_index
    t_img = config.num_image_tokens
    if config.convention == "llava_hf":
        ids = np.full((batch, t_img + 1), 0, np.int32)
        ids[0, :t_img] = config.image_token_index
    v = config.vision
    return jnp.asarray(ids), jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)


def abstract_params(config: TinyLlavaConfig) -> dict[str, Any]:
    """Param shapes (``jax.ShapeDtypeStruct`` tree) without allocating weights."""
    ids, pixels = dummy_inputs(config)
    return jax.eval_shape(TinyLlava(config).init, jax.random.key(0), ids, pixels)["params"]


def init_params(config: TinyLlavaConfig, key: Array) -> dict[str, Any]:
    """Freshly initialised params (every submodule's own initialisers)."""
    ids, pixels = dummy_inputs(config)
    return TinyLlava(config).init(key, ids, pixels)["params"]
