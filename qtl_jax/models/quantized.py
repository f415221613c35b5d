"""Quantized TinyLLaVA: the TinyLLaVA halves with one split quantizer per modality between them.

Parameters are two trees, identical in split and fused training::

    client: vision_tower, connector, embed_tokens (the client's copy of the LLM input table),
            image_quantizer/in_proj, text_quantizer/in_proj
    server: image_quantizer/out_proj, text_quantizer/out_proj, llm (the whole decoder, with its own
            embed_tokens: the output head of tied LLMs, and unused input rows otherwise)

The input-embedding table therefore exists twice, as in the paper's split code (the client builds a
whole LLM but only uses its embeddings) and its fine-tuning: the two copies start equal and drift apart
when both are trained. ``scaling='ema'`` quantizers keep running statistics on the client
(``batch_stats``: ``image_quantizer`` / ``text_quantizer``).

Data flow of one batch (the ``factory`` convention: one -200 placeholder per image in ``input_ids``):

* client (:func:`client_forward`): row ``i`` of every batch array is sample ``i``: images ``[B, H, W, 3]``
  with ``pixel_values[i]`` the image of sample ``i`` (zeros for a text-only sample, ``has_image[i] = 0``,
  as the input pipeline yields them); tower -> connector -> image quantizer -> ``image_codes [B, T_img, D]``
  (row ``i`` again sample ``i``'s image; ``image_valid = has_image``). Token ids -> the client's embedding table -> vectors ``[B, T, D]``
  with the placeholder and padding positions set to zero (the paper's zero padding) -> text quantizer
  -> ``text_codes [B, T, D]``. The paper's batch statistics include padding and dummy images: the image
  quantizer's are over every image row, the text quantizer's over the rows of the official text tensor
  (each sample's text padded to the batch's longest, :func:`paper_text_rows`), whatever padding ``T`` has
  beyond that; their ``mask`` (real images, real text tokens) is used by the non-paper scalings and by the
  diagnostics.
* server (:func:`server_loss`): codes -> dequantized grid values -> ``out_proj`` -> merged into one
  sequence by the layout rebuilt from the placeholder mask, attention mask and labels (no token ids
  reach the server; sample ``i``'s placeholder takes image row ``i``) -> decoder -> shifted
  cross-entropy over labels != -100.

A packed batch (``segment_ids``, several samples per text row) keeps the images per sample and the paper's
statistics per sample: the text quantizer weighs its rows so that they form the same multiset as the
unpacked batch's official text tensor (:func:`packed_text_weights`), and the server's layout restarts
positions and confines attention to each sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax import quantizer as qlib
from qtl_jax.precision import accum_dtype
from qtl_jax.models import cross_entropy
from qtl_jax.models.decoder import head_of
from qtl_jax.models.tinyllava import TinyLlava, TinyLlavaConfig, compute_layout, init_params, scatter
from qtl_jax.quantizer import Quantizer, QuantizerConfig
from qtl_jax.models.messages import Uplink

Array = jax.Array
Params = dict[str, Any]
MODALITIES = ("image", "text")
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "has_image")
# A packed batch (qtl_jax.data.sequence.pack) adds the sample of every merged position.
PACKED_KEY = "segment_ids"


def batch_keys(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of ``batch`` the split model reads: :data:`BATCH_KEYS`, and :data:`PACKED_KEY` when packed."""
    return BATCH_KEYS + ((PACKED_KEY,) if PACKED_KEY in batch else ())


@dataclasses.dataclass(frozen=True)
class QuantizedTinyLlavaConfig:
    """TinyLLaVA plus the image and text quantizers at the split (both D = the LLM width)."""

    model: TinyLlavaConfig
    image_quantizer: QuantizerConfig
    text_quantizer: QuantizerConfig
    # Target rows per chunk of the fused head + cross-entropy (memory O(rows x vocabulary)).
    loss_chunk_rows: int = cross_entropy.DEFAULT_CHUNK_ROWS

    def __post_init__(self):
        problems = []
        d = self.model.llm.hidden_size
        for name in ("image_quantizer", "text_quantizer"):
            q = getattr(self, name)
            if q.dim != d:
                problems.append(f"{name}.dim={q.dim} but the LLM width is {d}: set {name}.dim={d}")
        if self.model.convention != "factory":
            problems.append(
                f"model.convention={self.model.convention!r}: the split model needs 'factory' input ids (one -200 "
                "placeholder per image) so that text codes carry no image positions"
            )
        if self.model.max_images_per_sample != 1:
            problems.append(
                f"model.max_images_per_sample={self.model.max_images_per_sample}: batches carry one image slot "
                "per sample (pixel_values [B, H, W, 3] with has_image), so use 1"
            )
        if problems:
            raise ValueError("invalid QuantizedTinyLlavaConfig:\n  " + "\n  ".join(problems))

    def quantizer(self, modality: str) -> QuantizerConfig:
        return getattr(self, f"{modality}_quantizer")

    def levels(self, modality: str) -> int:
        """L, or 0 for the fp16 pass-through baseline (bound='none')."""
        q = self.quantizer(modality)
        return 0 if q.bound == "none" else q.levels


class ClientOutput(NamedTuple):
    """What :func:`client_forward` produces.

    uplink: the message for the server (codes, masks, labels).
    z: ``{'image': [B, T_img, D], 'text': [B, T, D]}`` float32 pre-rounding values; the server's gradient
      w.r.t. the dequantized values is their cotangent (straight-through).
    loss: the client's regulariser, sum of both weighted distortion losses.
    metrics: per-modality ``dist_*``, ``entropy_*``, ``usage_*``, ``clip_rate_*``, ``mse_*``, ``feature_mean_*`` and
      ``feature_std_*`` (the quantizer input's moments over the paper's rows) scalars.
    batch_stats: updated running statistics (``{}`` unless a quantizer uses scaling='ema').
    """

    uplink: Uplink
    z: dict[str, Array]
    loss: Array
    metrics: dict[str, Array]
    batch_stats: Params


def _split_llm(llm: Params) -> tuple[Params, Params]:
    return {"embedding": llm["embed_tokens"]["embedding"]}, llm


def init_split_params(
    config: QuantizedTinyLlavaConfig, key: Array, pretrained: Params | None = None
) -> tuple[Params, Params]:
    """``({'client': ..., 'server': ...}, batch_stats)`` with fresh quantizers.

    ``pretrained``: the params of a :class:`TinyLlava` (e.g. from ``load_pretrained``) to copy in;
    without it the base model is randomly initialised from ``key`` too. The quantizer projections get
    N(0, 0.02^2) kernels and zero biases (the paper's ``post_init``).
    """
    k_model, k_img, k_txt = jax.random.split(key, 3)
    base = init_params(config.model, k_model) if pretrained is None else pretrained
    missing = {"vision_tower", "connector", "llm"} - set(base)
    if missing:
        raise ValueError(f"pretrained params lack {sorted(missing)}; pass the params of a TinyLlava model")
    embed, llm = _split_llm(base["llm"])
    client = {"vision_tower": base["vision_tower"], "connector": base["connector"], "embed_tokens": embed}
    server = {"llm": llm}
    batch_stats = {}
    for modality, k in (("image", k_img), ("text", k_txt)):
        qcfg = config.quantizer(modality)
        variables = Quantizer(qcfg).init(k, jnp.zeros((1, 2, qcfg.dim), jnp.float32), None, False)
        qp = variables.get("params", {})
        client[f"{modality}_quantizer"] = {k: v for k, v in qp.items() if k == "in_proj"}
        server[f"{modality}_quantizer"] = {k: v for k, v in qp.items() if k == "out_proj"}
        if "batch_stats" in variables:
            batch_stats[f"{modality}_quantizer"] = variables["batch_stats"]
    return {"client": client, "server": server}, batch_stats


def check_batch(config: QuantizedTinyLlavaConfig, batch: Mapping[str, Any]) -> None:
    """Raises a clear error for a batch the split model cannot take (called on host arrays)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(
            f"batch lacks {missing}; the split model takes {list(BATCH_KEYS)} as build_input_pipeline yields them"
        )
    b, t = np.shape(batch["input_ids"])
    for k in ("attention_mask", "labels"):
        if np.shape(batch[k]) != (b, t):
            raise ValueError(f"batch['{k}'] has shape {np.shape(batch[k])}, expected input_ids' {(b, t)}")
    if PACKED_KEY in batch:
        _check_packed(config, batch)
        return
    if np.shape(batch["has_image"]) != (b,) or np.ndim(batch["pixel_values"]) != 4 or len(batch["pixel_values"]) != b:
        raise ValueError(
            f"pixel_values must be [B, H, W, C] and has_image [B] with B={b}; got {np.shape(batch['pixel_values'])} "
            f"and {np.shape(batch['has_image'])}"
        )
    ids = np.asarray(batch["input_ids"])
    image_token = config.model.image_token_index
    placeholders = ((ids == image_token) & (np.asarray(batch["attention_mask"]) > 0)).sum(axis=1)
    has_image = np.asarray(batch["has_image"]) > 0
    bad = np.nonzero(placeholders != has_image)[0]
    if bad.size:
        raise ValueError(
            f"samples {bad.tolist()} have {placeholders[bad].tolist()} image placeholders ({image_token}) but "
            f"has_image={has_image[bad].astype(int).tolist()}; each sample needs exactly one placeholder if it has an "
            "image and none otherwise"
        )


def _check_packed(config: QuantizedTinyLlavaConfig, batch: Mapping[str, Any]) -> None:
    rows = np.shape(batch["input_ids"])[0]
    segments = np.asarray(batch[PACKED_KEY])
    n = len(batch["has_image"])
    if segments.ndim != 2 or len(segments) != rows:
        raise ValueError(f"segment_ids must be [rows, merged length] with {rows} rows, got {segments.shape}")
    if np.shape(batch["has_image"]) != (n,) or np.ndim(batch["pixel_values"]) != 4 or len(batch["pixel_values"]) != n:
        raise ValueError(f"a packed batch has pixel_values [B, H, W, C] and has_image [B] per sample; got "
                         f"{np.shape(batch['pixel_values'])} and {np.shape(batch['has_image'])}")
    if segments.min(initial=0) < -1 or segments.max(initial=-1) >= n:
        raise ValueError(f"segment_ids must be sample indices in [0, {n}) or -1 (padding)")
    image = config.model.image_token_index
    real = np.asarray(batch["attention_mask"]) > 0
    per_row = ((np.asarray(batch["input_ids"]) == image) & real).sum(axis=1)
    if int(per_row.sum()) != int((np.asarray(batch["has_image"]) > 0).sum()):
        raise ValueError(f"the packed rows hold {int(per_row.sum())} image placeholders ({image}) but has_image marks "
                         f"{int((np.asarray(batch['has_image']) > 0).sum())} samples; pack with sequence.pack")
    # Under jit a layout that disagrees with the segments cannot be detected: it would silently mix samples.
    merged = real.sum(axis=1) + per_row * (config.model.num_image_tokens - 1)
    marked = segments >= 0
    if np.any(marked.sum(axis=1) != merged) or np.any(marked[:, 1:] & ~marked[:, :-1]):
        raise ValueError(f"segment_ids mark {marked.sum(axis=1).tolist()} merged positions per row, but the rows' tokens "
                         f"fill {merged.tolist()} ({config.model.num_image_tokens} per image); pack with "
                         "sequence.pack(num_image_tokens=<the model's num_image_tokens>)")


def paper_text_rows(text_real: Array) -> Array:
    """``[B, T]`` bool: the rows of the official text tensor, each sample's text padded to the batch's longest.

    The official code quantizes ``seq[~image_mask].view(B, -1, D)``: the merged sequence without its image
    positions, every sample padded with zero vectors to the batch's longest, so sample ``i`` contributes its
    ``n_i`` real tokens and ``max(n) - n_i`` zero rows (method.md §2.2 step 5). Our ``[B, T]`` text tensor
    has zeros at the image placeholder and at every padding position up to the (bucketed) length ``T``; all
    of them are zero vectors, hence equal to the official zero rows after ``in_proj``. Row ``i`` keeps its
    real tokens and its first ``max(n) - n_i`` zero rows: the official tensor's rows as a multiset, whatever
    ``T`` is, so the batch statistics and the distortion loss are the official ones.
    """
    real = text_real.astype(bool)
    n = jnp.sum(real, axis=1, keepdims=True)
    rank = jnp.cumsum(~real, axis=1)  # 1, 2, ... over each row's zero rows
    return real | (~real & (rank <= jnp.max(n) - n))


def packed_text_weights(text_real: Array, segment_ids: Array, has_image: Array, image_tokens: int) -> Array:
    """``[R, T]`` float32 weights over a packed text tensor that make its rows the official text tensor of
    the same samples (each sample's text padded with zero rows to the longest), as a weighted multiset.

    Real text tokens weigh 1. The official tensor's ``sum(max(n) - n_i)`` zero rows all equal ``in_proj(0)``,
    so one zero row of ours (the first placeholder or padding position) carries that count; mean, std and
    the distortion loss over the weights are then the official ones. ``n_i`` (sample ``i``'s text tokens)
    is its merged length less its image's ``image_tokens`` positions.
    """
    real = text_real.astype(bool)
    samples = has_image.shape[0]
    merged = jnp.sum(segment_ids[..., None] == jnp.arange(samples), axis=(0, 1))
    n = merged - jnp.where(has_image > 0, image_tokens, 0)
    zero_rows = jnp.sum(jnp.max(n) - n)
    flat = (~real).reshape(-1)
    first_zero = (jnp.cumsum(flat) == 1) & flat
    return jnp.where(real, 1.0, jnp.where(first_zero.reshape(real.shape), zero_rows, 0.0)).astype(jnp.float32)


def _quantizer_apply(qcfg: QuantizerConfig, params: Params, stats: Params | None, x, mask, train: bool,
                     stat_mask=None):
    variables = {"params": params}
    ema = qcfg.bound == "linear" and qcfg.scaling == "ema"
    if ema:
        variables["batch_stats"] = stats
    if ema and train:
        enc, updated = Quantizer(qcfg).apply(variables, x, mask, train, stat_mask, method="encode",
                                             mutable=["batch_stats"])
        return enc, updated["batch_stats"]
    enc = Quantizer(qcfg).apply(variables, x, mask, train, stat_mask, method="encode")
    return enc, stats


def client_forward(
    config: QuantizedTinyLlavaConfig, client_params: Params, batch_stats: Params, batch: Mapping[str, Any],
    train: bool = True,
) -> ClientOutput:
    """The client half: pixels and token ids -> codes (see the module docstring). Traceable."""
    cfg = config.model
    model = TinyLlava(cfg)
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    attention = jnp.asarray(batch["attention_mask"], jnp.int32)
    image_valid = jnp.asarray(batch["has_image"], jnp.int32)
    pixels = jnp.asarray(batch["pixel_values"], jnp.float32)
    image_vectors = model.apply(
        {"params": {"vision_tower": client_params["vision_tower"], "connector": client_params["connector"]}},
        pixels, method=TinyLlava.encode_images,
    )
    placeholder = (ids == cfg.image_token_index) & (attention > 0)
    text_real = (attention > 0) & ~placeholder
    text_vectors = model.apply(
        {"params": {"llm": {"embed_tokens": client_params["embed_tokens"]}}}, ids, method=TinyLlava.embed_tokens
    )
    text_vectors = jnp.where(text_real[..., None], text_vectors, 0).astype(cfg.dtype)

    image_mask = jnp.broadcast_to(image_valid[:, None], image_vectors.shape[:2])
    packed = batch.get(PACKED_KEY)
    segment_ids = None if packed is None else jnp.asarray(packed, jnp.int32)
    if segment_ids is None:
        text_stat = paper_text_rows(text_real)
    else:
        text_stat = packed_text_weights(text_real, segment_ids, image_valid, cfg.num_image_tokens)
    # (features, real rows, the paper's rows for its batch statistics): every image row, dummies included.
    inputs = {"image": (image_vectors, image_mask, None), "text": (text_vectors, text_real, text_stat)}
    codes, z, metrics, new_stats = {}, {}, {}, {}
    loss = jnp.zeros((), jnp.float32)
    for modality in MODALITIES:
        qcfg = config.quantizer(modality)
        name = f"{modality}_quantizer"
        x, mask, stat_mask = inputs[modality]
        enc, stats = _quantizer_apply(qcfg, client_params[name], batch_stats.get(name), x, mask, train, stat_mask)
        if stats is not None:
            new_stats[name] = stats
        codes[modality], z[modality] = enc.codes, enc.z
        loss = loss + enc.loss
        metrics[f"dist_{modality}"] = enc.loss
        if qcfg.bound != "none":
            metrics[f"entropy_{modality}"] = enc.stats["entropy_bits"]
            metrics[f"usage_{modality}"] = jnp.mean((enc.stats["histogram"] > 0).astype(jnp.float32))
            metrics[f"clip_rate_{modality}"] = enc.stats["clip_rate"]
        metrics[f"mse_{modality}"] = enc.stats["mse"]
        metrics[f"feature_mean_{modality}"] = enc.stats["feature_mean"]
        metrics[f"feature_std_{modality}"] = enc.stats["feature_std"]
    uplink = Uplink(
        image_codes=codes["image"],
        text_codes=codes["text"],
        attention_mask=attention.astype(jnp.uint8),
        image_mask=placeholder.astype(jnp.uint8),
        image_valid=image_valid.astype(jnp.uint8),
        labels=jnp.asarray(batch["labels"], jnp.int32),
        image_levels=config.levels("image"),
        text_levels=config.levels("text"),
        segment_ids=segment_ids,
    )
    return ClientOutput(uplink, z, loss, metrics, new_stats)


def dequantize(codes: Array, levels: int, dtype: Any = jnp.float32) -> Array:
    """Grid values (or the fp16 baseline's values, levels=0) as ``dtype``: what the server decodes."""
    if levels == 0:
        return jnp.asarray(codes).astype(dtype)
    return qlib.dequantize(codes, levels).astype(dtype)


def server_values(config: QuantizedTinyLlavaConfig, uplink: Uplink) -> dict[str, Array]:
    """``{'image', 'text'}`` dequantized values of an uplink, in the model's accumulation dtype.

    float32 for float32/bf16 models (the values' gradient, the downlink, is then float32 too); float64
    for a float64 model, so that a float64 run stays float64 across the cut.
    """
    dtype = accum_dtype(config.model.dtype)
    return {
        "image": dequantize(uplink.image_codes, uplink.image_levels, dtype),
        "text": dequantize(uplink.text_codes, uplink.text_levels, dtype),
    }


def straight_through(z: Array, codes: Array, levels: int) -> Array:
    """The fused path's server input: forward value exactly the server's, gradient the identity to z."""
    values = dequantize(codes, levels)
    return jax.lax.stop_gradient(values) + (z - jax.lax.stop_gradient(z))


def server_layout(config: QuantizedTinyLlavaConfig, uplink: Uplink):
    """The merge layout, rebuilt from the placeholder mask alone (the server never sees token ids); sample
    ``i``'s placeholder takes image row ``i`` (the rows of text-only samples are never read). Packed rows:
    the placeholder of each segment takes its sample's image row."""
    cfg = config.model
    ids = jnp.where(jnp.asarray(uplink.image_mask) > 0, cfg.image_token_index, 0).astype(jnp.int32)
    packed = uplink.segment_ids is not None
    return compute_layout(cfg, ids, jnp.asarray(uplink.attention_mask, jnp.int32), jnp.asarray(uplink.labels),
                          num_images=uplink.image_codes.shape[0], images_by_sample=not packed,
                          segment_ids=uplink.segment_ids)


def _server_decode(config: QuantizedTinyLlavaConfig, server_params: Params, values: Mapping[str, Array],
                   uplink: Uplink, method):
    cfg = config.model
    decoded = {}
    for modality in MODALITIES:
        qcfg = config.quantizer(modality)
        decoded[modality] = Quantizer(qcfg).apply(
            {"params": server_params[f"{modality}_quantizer"]}, values[modality], method="project_out"
        ).astype(cfg.dtype)
    layout = server_layout(config, uplink)
    merged = scatter(decoded["image"], decoded["text"], layout)
    return TinyLlava(cfg).apply({"params": {"llm": server_params["llm"]}}, merged, layout, method=method), layout


def server_logits(config: QuantizedTinyLlavaConfig, server_params: Params, values: Mapping[str, Array], uplink: Uplink):
    """Dequantized values ``{'image', 'text'}`` -> ``(logits [B, L, V], layout)``."""
    return _server_decode(config, server_params, values, uplink, TinyLlava.decode)


def server_loss_from_values(
    config: QuantizedTinyLlavaConfig, server_params: Params, values: Mapping[str, Array], uplink: Uplink
) -> tuple[Array, dict[str, Array]]:
    """Cross-entropy from dequantized values; differentiable w.r.t. params and values.

    The loss is taken from the LLM's final hidden states with the head fused in
    (:func:`qtl_jax.models.cross_entropy.fused_head`): the ``[B, L, V]`` logits are never formed.
    """
    hidden, layout = _server_decode(config, server_params, values, uplink, TinyLlava.decode_hidden)
    weight, bias, vocab_major = head_of(config.model.llm, server_params["llm"])
    # Only text positions carry a label, so the uplink's text labels bound the targets statically.
    ce, targets = cross_entropy.fused_head(hidden, weight, layout.labels, bias, vocab_major=vocab_major,
                                           chunk_rows=config.loss_chunk_rows, max_targets=uplink.labels.size)
    metrics = {
        "ce": ce,
        "target_tokens": targets,
        "tokens": jnp.sum(layout.attention_mask),
        "examples": jnp.asarray(uplink.image_valid.shape[0], jnp.int32),  # samples (packed: not rows)
    }
    return ce, metrics


def server_loss(config: QuantizedTinyLlavaConfig, server_params: Params, uplink: Uplink) -> tuple[Array, dict[str, Array]]:
    """The server half from the codes alone: dequantize -> out_proj -> merge -> decoder -> CE."""
    return server_loss_from_values(config, server_params, server_values(config, uplink), uplink)


def forward(
    config: QuantizedTinyLlavaConfig, params: Mapping[str, Params], batch_stats: Params, batch: Mapping[str, Any],
    train: bool = False,
) -> tuple[Array, Any, ClientOutput]:
    """The fused forward with the quantizers in place: ``(logits [B, L, V], layout, client output)``.

    ``layout.labels`` and ``layout.attention_mask`` are in merged coordinates, like the logits.
    """
    out = client_forward(config, params["client"], batch_stats, batch, train)
    values = {m: straight_through(out.z[m], getattr(out.uplink, f"{m}_codes"), config.levels(m)) for m in MODALITIES}
    logits, layout = server_logits(config, params["server"], values, out.uplink)
    return logits, layout, out
