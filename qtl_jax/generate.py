"""Batched generation for TinyLLaVA with a KV cache: greedy and temperature / top-p sampling.

One call runs three jit-compiled programs:

1. **encode** (client): images -> connector vectors, prompt token ids -> embedding vectors; with
   :class:`PromptQuantizers` both go through the split quantizers (client encode -> codes -> server
   dequantize -> ``out_proj``), as the paper evaluates: only the *prompt* is quantized.
2. **prefill** (server): the vectors are merged into one left-padded sequence and run through the
   decoder, filling a preallocated :class:`~qtl_jax.models.decoder.KVCache`.
3. **decode** (server): a ``lax.while_loop`` that feeds each chosen token back through the LLM's own
   embedding table, one position per step, until every row emitted a stop token or ``max_new_tokens``.

Shapes are bucketed so that prompts of different lengths reuse the compiled programs: the text
length and the merged length are rounded up to the next entry of ``buckets`` (powers of two and the
midpoints 1.5 x 2^k by default, so at most a third of a prefill is padding), and the cache length to
merged + ``max_new_tokens`` rounded up to a multiple of :data:`CACHE_MULTIPLE` (never beyond the
next bucket). ``max_new_tokens``, the stop ids and the sampling settings are traced values, so
changing them recompiles nothing as long as the cache length stays the same.

Why the cache is sized that tightly: every decode step attends over (and, on XLA:CPU, copies into
the heads-major layout of the attention) the whole cache, so its cost grows with the cache length,
not with the number of tokens written so far; at the demo size a cache of the next power of two
(256 for 81 + 32 positions) made each step ~1.6x slower than one of 128. For the same reason the
prefill attends only over the prompt's own slots and the cache is padded afterwards.

Positions follow HF ``generate``: every real token's position is the number of real tokens before
it, so left padding does not shift them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.data.constants import IMAGE_TOKEN_INDEX
from qtl_jax.data.templates import Template, tokenize_with_images
from qtl_jax.models.decoder import Decoder, KVCache, init_cache
from qtl_jax.models.tinyllava import TinyLlava, TinyLlavaConfig, compute_layout, scatter

Array = jax.Array
Params = dict[str, Any]

# Powers of two and their 1.5x midpoints from 16 (16, 24, 32, 48, 64, 96, ...): two shapes per octave,
# at most 1.5x padding. Plain powers of two padded the demo benchmark's 81-token prompt to 128.
DEFAULT_BUCKETS: tuple[int, ...] = tuple(sorted({2**k for k in range(4, 17)} | {3 * 2**k for k in range(3, 16)}))

# The cache length is merged + max_new_tokens rounded up to a multiple of this (capped by the next bucket).
CACHE_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What :func:`generate` returns.

    sequences: ``[B, max_new_tokens]`` int32 new tokens; after a row's ``length`` they are ``pad_token_id``.
    lengths: ``[B]`` int32 number of generated tokens per row, a stop token included.
    text: the decoded answers (stop tokens and anything from a stop string on removed), or None
      without a tokenizer.
    """

    sequences: np.ndarray
    lengths: np.ndarray
    text: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class PromptQuantizers:
    """The split quantizers of a :class:`~qtl_jax.models.quantized.QuantizedTinyLlavaConfig` model.

    config: the ``QuantizedTinyLlavaConfig``.
    client: the client params (vision tower, connector, the client's embedding table, ``in_proj``s).
    server: the server params (``{image,text}_quantizer`` ``out_proj``s, and ``llm``).
    batch_stats: running statistics of ``scaling='ema'`` quantizers (``{}`` otherwise).

    Build it (and the matching model and params) with :func:`split_model`.
    """

    config: Any
    client: Params
    server: Params
    batch_stats: Params = dataclasses.field(default_factory=dict)


def split_model(
    config: Any, params: Params, batch_stats: Params | None = None
) -> tuple[TinyLlava, Params, PromptQuantizers]:
    """``(model, params, quantizers)`` for :func:`generate` from a quantized split model.

    ``config`` is a ``QuantizedTinyLlavaConfig`` and ``params`` its ``{'client': ..., 'server': ...}``
    trees (``init_split_params`` / a training checkpoint). The returned params hold only the server's
    LLM: generated tokens are embedded with the LLM's own table, the prompt with the client's.
    """
    if not isinstance(params, dict) or set(params) != {"client", "server"}:
        raise ValueError(
            f"split_model takes the split params {{'client': ..., 'server': ...}}, got keys {sorted(params)}"
        )
    quantizers = PromptQuantizers(config, params["client"], params["server"], batch_stats or {})
    return TinyLlava(config.model), {"llm": params["server"]["llm"]}, quantizers


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest entry of ``buckets`` that is >= ``n``."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(
        f"length {n} exceeds the largest bucket {max(buckets)}; pass buckets= with a larger entry "
        "(or shorten the prompt / max_new_tokens)"
    )


def cache_length(merged_length: int, max_new_tokens: int, buckets: Sequence[int]) -> int:
    """Cache slots for a ``merged_length`` prompt and ``max_new_tokens``: the needed length rounded up to a
    multiple of :data:`CACHE_MULTIPLE`, or the next bucket when that is shorter."""
    needed = merged_length + max_new_tokens
    return min(bucket(needed, buckets), -(-needed // CACHE_MULTIPLE) * CACHE_MULTIPLE)


def top_p_mask(logits: Array, top_p: Array | float) -> Array:
    """``[..., V]`` bool: the nucleus, the most probable tokens whose total probability first reaches ``top_p``.

    A token is kept when the mass of the tokens ranked above it is below ``top_p``, so the most
    probable token is always kept and ``top_p=1`` keeps everything.
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def greedy_token(logits: Array) -> Array:
    """``[..., V]`` logits -> ``[...]`` int32 ``argmax``: the first index among ties, NaN counting as the largest.

    The same result as ``jnp.argmax`` from two plain reductions. Why: XLA:CPU lowers argmax to one variadic
    (value, index) reduction that does not vectorise; at the demo size it took ~15 % of every decode step.
    """
    best = jnp.max(logits, axis=-1, keepdims=True)  # NaN when the row holds one
    hit = (logits == best) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample_token(logits: Array, key: Array, temperature: Array | float, top_p: Array | float) -> Array:
    """``[B, V]`` logits -> ``[B]`` token ids drawn from ``softmax(logits / temperature)`` over the top-p nucleus."""
    scaled = logits.astype(jnp.float32) / temperature
    scaled = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# The three compiled programs. Configs are static (hashable frozen dataclasses), params are arguments.


def _llm(config: TinyLlavaConfig) -> Decoder:
    # As TinyLlava builds it: embedding scaling happens outside the decoder (see TinyLlava.decode).
    return Decoder(dataclasses.replace(config.llm, dtype=config.dtype, remat=False, embed_scale=None))


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: TinyLlavaConfig, params: Params, input_ids: Array, pixel_values: Array | None):
    model = TinyLlava(config)
    text = model.apply({"params": params}, input_ids, method=TinyLlava.embed_tokens).astype(config.dtype)
    if pixel_values is None:
        return None, text
    return model.apply({"params": params}, pixel_values, method=TinyLlava.encode_images), text


@functools.partial(jax.jit, static_argnums=0)
def _encode_quantized(config: Any, client: Params, server: Params, batch_stats: Params, batch: dict[str, Array]):
    from qtl_jax.models.quantized import client_forward, dequantize
    from qtl_jax.quantizer import Quantizer

    out = client_forward(config, client, batch_stats, batch, train=False)
    vectors = []
    for modality in ("image", "text"):
        qcfg = config.quantizer(modality)
        values = dequantize(getattr(out.uplink, f"{modality}_codes"), config.levels(modality))
        vectors.append(
            Quantizer(qcfg)
            .apply({"params": server[f"{modality}_quantizer"]}, values, method="project_out")
            .astype(config.model.dtype)
        )
    return tuple(vectors)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _prefill(
    config: TinyLlavaConfig,
    llm_params: Params,
    image_vectors: Array | None,
    text_vectors: Array,
    input_ids: Array,
    attention_mask: Array,
    merged_length: int,
    cache_slots: int,
    images_by_sample: bool = False,
) -> tuple[Array, KVCache]:
    left = dataclasses.replace(config, padding_side="left")
    num_images = 0 if image_vectors is None else image_vectors.shape[0]
    layout = compute_layout(
        left, input_ids, attention_mask, num_images=num_images,
        merged_length=merged_length if config.convention == "factory" else None, images_by_sample=images_by_sample,
    )
    merged = scatter(image_vectors, text_vectors, layout)
    if config.scales_images:
        scale = jnp.where(layout.is_image[..., None] > 0, config.llm.embed_scale, 1.0)
        merged = merged * scale.astype(merged.dtype)
    # The prompt fills slots [0, L) of an empty cache, so it attends only over a cache of its own length
    # L; the free slots are appended after (zeros, mask 0), rather than attended over here.
    cache = init_cache(_llm(config).config, merged.shape[0], merged.shape[1])
    logits, cache = _llm(config).apply(
        {"params": llm_params}, merged, layout.attention_mask, cache, layout.position_ids, True,
        method=Decoder.forward_cached,
    )
    return logits[:, -1], _grow_cache(config, cache, cache_slots)


def _grow_cache(config: TinyLlavaConfig, cache: KVCache, slots: int) -> KVCache:
    """``cache`` with empty slots appended up to ``slots``; padding to the shapes of ``init_cache`` keeps
    this independent of the cache's layout (which axis holds the slots)."""
    target = jax.eval_shape(lambda: init_cache(_llm(config).config, cache.mask.shape[0], slots))
    grow = lambda a, t: jnp.pad(a, [(0, n - m) for m, n in zip(a.shape, t.shape)])  # noqa: E731
    return KVCache(
        tuple(map(grow, cache.keys, target.keys)), tuple(map(grow, cache.values, target.values)),
        grow(cache.mask, target.mask), cache.index,
    )


# The cache is donated and returned: XLA donates only into an output of the same shape, and with that
# alias the loop updates the prefill's buffers in place instead of first copying them into its own.
@functools.partial(jax.jit, static_argnums=(0, 10, 11), donate_argnums=3)
def _decode(
    config: TinyLlavaConfig,
    llm_params: Params,
    first_logits: Array,
    cache: KVCache,
    max_new_tokens: Array,
    stop_ids: Array,
    pad_id: Array,
    temperature: Array,
    top_p: Array,
    key: Array,
    width: int,
    greedy: bool,
) -> tuple[Array, Array, KVCache]:
    llm = _llm(config)
    scale = config.llm.embed_scale
    b = first_logits.shape[0]
    keys = None if greedy else jax.random.split(key, width)

    def choose(logits, i):
        if greedy:
            return greedy_token(logits)
        return sample_token(logits, keys[i], temperature, top_p)

    first = choose(first_logits, 0)
    out = jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), first, cache, out, jnp.isin(first, stop_ids), jnp.ones((b,), jnp.int32))

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, cache, out, done, lengths = state
        x = llm.apply({"params": llm_params}, token[:, None], method=Decoder.embed).astype(config.dtype)
        if scale is not None:
            x = x * jnp.asarray(scale, x.dtype)
        logits, cache = llm.apply(
            {"params": llm_params}, x, jnp.ones((b, 1), jnp.int32), cache, method=Decoder.forward_cached
        )
        token = jnp.where(done, pad_id, choose(logits[:, -1], i))
        out = out.at[:, i].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, token, cache, out, done | jnp.isin(token, stop_ids), lengths

    _, _, cache, out, _, lengths = jax.lax.while_loop(cond, body, state)
    return out, lengths, cache


def compiled_programs() -> dict[str, Callable]:
    """The jitted programs, e.g. to count compilations with ``f._cache_size()``."""
    return {"encode": _encode, "encode_quantized": _encode_quantized, "prefill": _prefill, "decode": _decode}


# ----------------------------------------------------------------------------------------------------
# Host-side preparation


def _left_align(
    input_ids: np.ndarray, attention_mask: np.ndarray, width: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's real tokens to the right end of a ``width``-wide row (left padding)."""
    b = input_ids.shape[0]
    ids = np.full((b, width), pad_id, np.int32)
    mask = np.zeros((b, width), np.int32)
    for r in range(b):
        real = input_ids[r][attention_mask[r] > 0]
        if real.size:
            ids[r, width - real.size :] = real
            mask[r, width - real.size :] = 1
    return ids, mask


# Host inputs go to the jitted programs as numpy values: jit transfers them in its C++ path, where each
# jnp.asarray / jnp.int32 beforehand is a Python-level dispatch (together ~1.4 ms a call, 15-20 % of a
# batch-1 generation at the demo size).


def _as_dtype(values: Any, dtype: Any) -> Any:
    if values is None or isinstance(values, jax.Array):
        return None if values is None else values.astype(dtype)
    return np.asarray(values, dtype)


@functools.cache
def _default_key() -> Array:
    # Unused by greedy decoding, but an argument of the program; made once rather than once a call.
    return jax.random.key(0)


def _check_mask(mask: np.ndarray) -> None:
    rows = mask.sum(axis=1)
    if np.any(rows == 0):
        raise ValueError(f"rows {np.nonzero(rows == 0)[0].tolist()} have no real token (attention_mask all 0)")
    for r, m in enumerate(mask):
        real = np.nonzero(m)[0]
        if real[-1] - real[0] + 1 != real.size:
            raise ValueError(
                f"row {r}: attention_mask has holes ({m.tolist()}); padding must be on the left or the right only"
            )


def _expand_placeholders(ids: list[int], config: TinyLlavaConfig) -> list[int]:
    """Tokenised prompts carry one -200 per image; llava-hf checkpoints want T_img image tokens instead."""
    if config.convention != "llava_hf":
        return ids
    out = []
    for i in ids:
        out.extend([config.image_token_index] * config.num_image_tokens if i == IMAGE_TOKEN_INDEX else [i])
    return out


def _tokenize(prompts: Sequence[str], tokenizer: Any, config: TinyLlavaConfig) -> tuple[np.ndarray, np.ndarray]:
    rows = [_expand_placeholders(tokenize_with_images(p, tokenizer), config) for p in prompts]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _stop_ids(stop_token_ids: Iterable[int] | int | None, tokenizer: Any) -> np.ndarray:
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        stop_token_ids = [] if eos is None else [eos]
    elif isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = [stop_token_ids]
    ids = sorted({int(i) for i in stop_token_ids})
    # Fixed size (padded with -1, never a token), so a different number of stop ids does not recompile.
    if len(ids) > 8:
        raise ValueError(f"at most 8 stop token ids are supported, got {len(ids)}")
    return np.asarray(ids + [-1] * (8 - len(ids)), np.int32)


def _decode_text(
    tokenizer: Any, rows: np.ndarray, lengths: np.ndarray, stop_ids: np.ndarray, stop_strings: Sequence[str]
) -> list[str]:
    texts = []
    stops = set(int(i) for i in stop_ids if i >= 0)
    for row, n in zip(rows, lengths):
        tokens = [int(t) for t in row[: int(n)]]
        if tokens and tokens[-1] in stops:
            tokens = tokens[:-1]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop_strings:
            if s and s in text:
                text = text[: text.index(s)]
        texts.append(text)
    return texts


def generate(
    model: TinyLlava,
    params: Params,
    tokenizer: Any = None,
    *,
    input_ids: Any = None,
    prompts: Sequence[str] | None = None,
    pixel_values: Any = None,
    attention_mask: Any = None,
    max_new_tokens: int = 32,
    stop_token_ids: Iterable[int] | int | None = None,
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: Array | None = None,
    quantizers: PromptQuantizers | None = None,
    pad_token_id: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> GenerationOutput:
    """Generates up to ``max_new_tokens`` tokens for each prompt of a batch.

    Args:
      model: a :class:`TinyLlava` (its config picks the image convention).
      params: its params; only ``llm`` is needed with ``quantizers`` (see :func:`split_model`).
      tokenizer: needed for ``prompts`` and to return ``text``; may be None with ``input_ids``.
      input_ids: ``[B, T]`` token ids in the model's convention (``factory``: one -200 per image;
        ``llava_hf``: the image token repeated ``T_img`` times), padded on either side.
      prompts: alternatively, already-templated prompt strings with ``<image>`` tags.
      pixel_values: ``[N_img, H, W, C]`` preprocessed images in placeholder order, or None.
      attention_mask: ``[B, T]`` 1/0, default all ones.
      stop_token_ids: a row stops after emitting one of them (None: the tokenizer's eos, if any).
      stop_strings: ``text`` is cut at the first occurrence of any of them.
      temperature: 0 is greedy; > 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus sampling threshold in (0, 1].
      rng: a PRNG key, required when sampling.
      quantizers: pass the prompt through the split quantizers (:func:`split_model`).
      pad_token_id: fills ``sequences`` after a row stops (default the tokenizer's pad id, else 0).
      buckets: allowed padded lengths for the prompt, the merged sequence and the cache.
    """
    config: TinyLlavaConfig = model.config
    if (input_ids is None) == (prompts is None):
        raise ValueError("pass exactly one of input_ids= (token ids) or prompts= (strings)")
    if prompts is not None:
        if tokenizer is None:
            raise ValueError("prompts= needs a tokenizer; pass one, or pass token ids as input_ids=")
        if attention_mask is not None:
            raise ValueError("attention_mask= goes with input_ids=; prompts are padded internally")
        ids, mask = _tokenize(list(prompts), tokenizer, config)
    else:
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {ids.shape}, got {mask.shape}")
    mask = (mask > 0).astype(np.int32)
    _check_mask(mask)
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: pass rng=jax.random.key(seed)")
    if quantizers is not None and config.convention != "factory":
        raise ValueError("quantizers need the factory convention (one -200 placeholder per image)")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad_token_id = 0 if pad_token_id is None else pad_token_id

    t_img = config.num_image_tokens
    placeholders = ((ids == config.image_token_index) & (mask > 0)).sum(axis=1)
    if quantizers is not None and np.any(placeholders > 1):
        raise ValueError(
            f"prompts {np.flatnonzero(placeholders > 1).tolist()} hold several images; the split quantizers take one "
            "image per prompt"
        )
    per_image = 1 if config.convention == "factory" else t_img
    n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    if int(placeholders.sum()) != n_images * per_image:
        raise ValueError(
            f"the prompts hold {int(placeholders.sum())} image tokens (id {config.image_token_index}) but "
            f"{n_images} images were given; the {config.convention} convention needs {per_image} per image"
        )
    if pixel_values is not None:
        v = config.vision
        expected = (v.image_size, v.image_size, v.num_channels)
        if tuple(np.shape(pixel_values)[1:]) != expected:
            raise ValueError(
                f"pixel_values must be [N_img, {expected[0]}, {expected[1]}, {expected[2]}] (channels last), "
                f"got {np.shape(pixel_values)}"
            )

    real = mask.sum(axis=1)
    merged_real = real + (placeholders * (t_img - 1) if config.convention == "factory" else 0)
    text_length = bucket(int(real.max()), buckets)
    merged_length = bucket(int(merged_real.max()), buckets) if config.convention == "factory" else text_length
    cache_len = cache_length(merged_length, int(max_new_tokens), buckets)
    ids_b, mask_b = _left_align(ids, mask, text_length, 0)
    ids_b = np.where(mask_b > 0, ids_b, 0).astype(np.int32)

    if quantizers is None:
        image_vectors, text_vectors = _encode(config, params, ids_b, _as_dtype(pixel_values, config.dtype))
    else:
        image_vectors, text_vectors = _quantized_vectors(quantizers, ids, mask, placeholders, pixel_values, text_length)

    stop_ids = _stop_ids(stop_token_ids, tokenizer)
    # The quantized client encodes one image slot per prompt (row i = prompt i); otherwise the images come
    # in placeholder order.
    first_logits, cache = _prefill(
        config, params["llm"], image_vectors, text_vectors, ids_b, mask_b,
        merged_length, cache_len, quantizers is not None,
    )
    key = _default_key() if rng is None else rng
    sequences, lengths, _ = _decode(
        config, params["llm"], first_logits, cache, np.int32(max_new_tokens), stop_ids,
        np.int32(pad_token_id), np.float32(max(temperature, 1e-6)), np.float32(top_p), key,
        cache_len - merged_length, bool(greedy),
    )
    sequences = np.asarray(sequences)[:, : int(max_new_tokens)]
    lengths = np.asarray(lengths)
    text = None
    if tokenizer is not None:
        text = _decode_text(tokenizer, sequences, lengths, stop_ids, stop_strings)
    return GenerationOutput(sequences, lengths, text)


def _quantized_vectors(
    quantizers: PromptQuantizers, ids: np.ndarray, mask: np.ndarray, placeholders: np.ndarray, pixel_values: Any,
    text_length: int,
) -> tuple[Array, Array]:
    """Client encode -> codes -> server decode of the prompt's image and text vectors.

    The client sees the batch as given (left-aligned but not padded to the bucket): with the paper's
    ``scaling='batch'`` the quantizer statistics include padding, so bucket padding would change the codes.
    """
    qcfg = quantizers.config
    cfg = qcfg.model
    b = ids.shape[0]
    ids_l, mask_l = _left_align(ids, mask, ids.shape[1], 0)
    has_image = (placeholders > 0).astype(np.int32)
    v = cfg.vision
    # One image slot per prompt: row i is prompt i's image (zeros without one), as the split model takes them.
    pixels = np.zeros((b, v.image_size, v.image_size, v.num_channels), np.float32)
    if pixel_values is not None:
        pixels[np.flatnonzero(has_image)] = np.asarray(pixel_values, np.float32)
    batch = {
        "input_ids": jnp.asarray(ids_l), "attention_mask": jnp.asarray(mask_l),
        "labels": jnp.full(ids_l.shape, -100, jnp.int32), "pixel_values": jnp.asarray(pixels),
        "has_image": jnp.asarray(has_image),
    }
    image_vectors, text_vectors = _encode_quantized(
        qcfg, quantizers.client, quantizers.server, quantizers.batch_stats, batch
    )
    pad = text_length - ids.shape[1]
    text_vectors = jnp.pad(text_vectors, ((0, 0), (pad, 0), (0, 0)))
    return image_vectors, text_vectors


def stop_token_ids_for(template: Template, tokenizer: Any) -> list[int]:
    """The template's end token (when it is one token) and the tokenizer's eos."""
    ids = []
    token_id = tokenizer.convert_tokens_to_ids(template.stop_str)
    single_token = token_id is not None and token_id != tokenizer.unk_token_id
    if single_token and tokenizer.convert_ids_to_tokens(token_id) == template.stop_str:
        ids.append(int(token_id))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def generate_answers(
    model: TinyLlava,
    params: Params,
    tokenizer: Any,
    template: Template,
    image_processor: Callable[[Any], np.ndarray],
    examples: Sequence[tuple[Any, str]],
    batch_size: int = 8,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: Array | None = None,
    quantizers: PromptQuantizers | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers ``examples`` = ``[(PIL image or None, question), ...]`` in batches; returns one string each.

    Each question is put in ``template``'s prompt (an image tag is added for image examples), images
    go through ``image_processor``; generation stops at the template's end token or the eos, and
    the text is cut at ``template.stop_str`` and stripped. ``progress(n)`` is called after each batch
    with the number of examples it answered. Sampling uses ``jax.random.fold_in(rng, batch_index)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = stop_token_ids_for(template, tokenizer)
    answers: list[str] = []
    for index, start in enumerate(range(0, len(examples), batch_size)):
        chunk = examples[start : start + batch_size]
        prompts, images = [], []
        for image, question in chunk:
            prompts.append(template.prompt(question, has_image=image is not None))
            if image is not None:
                images.append(np.asarray(image_processor(image), np.float32))
        out = generate(
            model, params, tokenizer, prompts=prompts, pixel_values=np.stack(images) if images else None,
            max_new_tokens=max_new_tokens, stop_token_ids=stops,
            stop_strings=[template.stop_str] if template.stop_str else (),
            temperature=temperature, top_p=top_p, rng=None if rng is None else jax.random.fold_in(rng, index),
            quantizers=quantizers, buckets=buckets,
        )
        answers.extend(t.strip() for t in out.text)
        if progress is not None:
            progress(len(chunk))
    return answers


__all__: Sequence[str] = (
    "CACHE_MULTIPLE",
    "DEFAULT_BUCKETS",
    "GenerationOutput",
    "PromptQuantizers",
    "bucket",
    "cache_length",
    "compiled_programs",
    "generate",
    "generate_answers",
    "greedy_token",
    "sample_token",
    "split_model",
    "stop_token_ids_for",
    "top_p_mask",
)
