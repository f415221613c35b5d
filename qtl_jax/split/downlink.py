"""Downlink compression: what the server sends back instead of the float32 gradients ∂loss/∂ẑ.

The paper's official code sends ∂loss/∂ẑ as float32; at its shapes that is ~99 % of a step's bytes
(docs/network_split.md). :class:`DownlinkSpec` (``split.downlink*`` in the training config) picks:

* ``fp32``: the paper; the client receives exactly the server's gradients.
* ``bf16``: rounded to bfloat16 (round to nearest even), half the bytes.
* ``quantized``: unbiased stochastic rounding onto ``2**bits - 1`` symmetric levels
  ``{-m, ..., 0, ..., m}·step`` (``m = 2**(bits-1) - 1``; zero is a level, so small gradients code as
  the most frequent symbol and the entropy coder removes most of their cost), one ``step = max|g| / m``
  per token (``scale='token'``) or per channel (``'channel'``, over the message's tokens), indices
  entropy coded with :mod:`qtl_jax.codec` and the steps sent as float32. ``bits=2`` is ternary
  (TernGrad's grid). Optional:

  - ``topk`` < 1: per token only the ``ceil(topk·D)`` largest magnitudes are kept, the rest are zero
    (biased; meant to be used with error feedback);
  - ``error_feedback``: the server keeps, per client, the residual ``g + e - ĝ`` of the last step (at
    that step's real positions, row i = batch row i) and adds it to the next step's gradient before
    quantizing. Note that in split learning consecutive steps carry *different samples*: row i's
    residual goes to another sample's activations, so this is error feedback on the client's parameter
    gradient only through the client's Jacobian of the next batch (measured in docs/network_split.md).

Stochastic rounding draws its uniforms from :func:`step_key` (``config.seed``, the client's index and
the step id): reruns and resumed runs send the same bits, and the in-process server half and a gRPC
server compute the same message (the same jitted program, :func:`compress`).

The rounding of a value ``x`` with ``y = x/step``: ``floor(y) + 1`` with probability ``y - floor(y)``,
else ``floor(y)``, so ``E[ĝ] = x`` and ``|ĝ - x| < step`` (up to float32 rounding of ``x/step``).
Decoding is one multiply, ``ĝ = (index - m)·step`` (:func:`expand`), done by the same program on both
kinds of server half. Positions that do not travel (padding, the image placeholder, dummy images) are
zero gradients; their indices are ``m`` and their per-token steps 0, so they expand to exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax import codec
from qtl_jax.models.messages import Downlink, Uplink

KINDS = ("fp32", "bf16", "quantized")
SCALES = ("token", "channel")
MIN_BITS, MAX_BITS = 2, 8
# The residuals of error feedback live in the server partition's ``batch_stats`` under this key, one
# entry per client (its turn index as a string: '0' for a single client).
RESIDUAL_KEY = "downlink_residual"
# Folded into the seed's key so the downlink's random stream is its own.
_STREAM = 0x444C


@dataclasses.dataclass(frozen=True)
class DownlinkSpec:
    """How the server sends ∂loss/∂ẑ back (see the module docstring).

    Attributes:
      kind: 'fp32' | 'bf16' | 'quantized'.
      bits: quantized only: 2..8 bits, ``2**bits - 1`` levels.
      scale: quantized only: 'token' (one step per token) or 'channel' (one per feature channel).
      error_feedback: quantized only: the server keeps the residual per client for the next step.
      topk: quantized only: fraction of each token's values kept (largest magnitudes), in (0, 1].
      seed: the run's seed (the stochastic rounding's key derives from it).
    """

    kind: str = "fp32"
    bits: int = 4
    scale: str = "token"
    error_feedback: bool = False
    topk: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"split.downlink={self.kind!r}: use one of {KINDS}.")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or \
                not MIN_BITS <= int(self.bits) <= MAX_BITS:
            raise ValueError(f"split.downlink_bits={self.bits!r}: use an integer from {MIN_BITS} to {MAX_BITS}.")
        if self.scale not in SCALES:
            raise ValueError(f"split.downlink_scale={self.scale!r}: use one of {SCALES}.")
        if not 0.0 < float(self.topk) <= 1.0:
            raise ValueError(f"split.downlink_topk={self.topk!r}: the fraction of values kept per token must be "
                             "in (0, 1] (1: no sparsification).")
        if self.kind != "quantized" and (self.error_feedback or float(self.topk) < 1.0):
            raise ValueError(f"split.downlink={self.kind!r} sends every gradient exactly as computed; error feedback "
                             "and top-k apply to split.downlink='quantized' only.")

    @classmethod
    def from_config(cls, split: Mapping[str, Any], seed: int = 0) -> DownlinkSpec:
        """From a training config's ``split`` section (``config.split``) and ``config.seed``."""
        if split.get("downlink_dtype") is not None:
            raise ValueError(
                f"split.downlink_dtype={split['downlink_dtype']!r} was replaced by split.downlink: use "
                "--config.split.downlink=fp32 (was float32), bf16 (was bfloat16) or quantized "
                "(with split.downlink_bits).")
        return cls(kind=str(split["downlink"]), bits=int(split["downlink_bits"]), scale=str(split["downlink_scale"]),
                   error_feedback=bool(split["downlink_error_feedback"]), topk=float(split["downlink_topk"]),
                   seed=int(seed))

    @property
    def half_levels(self) -> int:
        """``m``: the largest index magnitude, ``2**(bits-1) - 1``."""
        return (1 << (int(self.bits) - 1)) - 1

    @property
    def levels(self) -> int:
        """Number of quantization levels, ``2m + 1``: the alphabet of the coded indices."""
        return 2 * self.half_levels + 1

    def describe(self) -> str:
        if self.kind != "quantized":
            return self.kind
        extra = (", error feedback" if self.error_feedback else "") + (f", top-{self.topk:g}" if self.topk < 1 else "")
        return f"quantized {self.bits} bits ({self.levels} levels), per-{self.scale} scale{extra}"


@flax.struct.dataclass
class QuantizedDownlink:
    """A quantized downlink in the step's static shapes (row i = sample i).

    ``*_index``: uint8 in [0, 2m] (``m`` = zero gradient); ``*_step``: float32 per token ``[B, T_img]`` /
    ``[B, T]`` or per channel ``[D]``. ``half_levels`` (m) is static.
    """

    image_index: Any
    image_step: Any
    text_index: Any
    text_step: Any
    half_levels: int = flax.struct.field(pytree_node=False, default=1)


def step_key(seed: int, client: int, step: int) -> jax.Array:
    """The stochastic rounding's key of step ``step`` of client ``client`` in a run seeded ``seed``."""
    # Once per client, then one compiled fold per step: done op by op, this was ~7 dispatches on the
    # step's critical path (~5 ms of host time per step on the GPU machine).
    return _fold_in(_client_key(int(seed), int(client)), int(step))


@functools.lru_cache(maxsize=64)
def _client_key(seed: int, client: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), client)


_fold_in = jax.jit(jax.random.fold_in)


def quantize(spec: DownlinkSpec, x: jax.Array, rows: jax.Array, key: jax.Array):
    """One modality's gradients ``x`` [..., D] at the real ``rows`` [...] (bool) -> ``(index, step, values)``:
    uint8 indices in [0, 2m], the steps (per token ``[...]`` or per channel ``[D]``) and the dequantized
    values ``(index - m)·step`` the client will compute (zero outside ``rows``). Pure and traceable."""
    return _quantize(x, rows, key, spec.half_levels, spec.scale, float(spec.topk))


def _quantize(x: jax.Array, rows: jax.Array, key: jax.Array, m: int, scale: str, topk: float):
    x = jnp.where(rows[..., None], x, 0)
    mag = jnp.abs(x)
    d = x.shape[-1]
    if topk < 1.0:
        k = max(1, math.ceil(topk * d))
        threshold = jax.lax.top_k(mag, k)[0][..., -1:]
        x = jnp.where(mag >= threshold, x, 0)
        mag = jnp.abs(x)
    if scale == "token":
        step = mag.max(axis=-1) / m
        wide = step[..., None]
    else:
        step = mag.reshape(-1, d).max(axis=0) / m
        wide = step
    y = jnp.where(wide > 0, x / jnp.where(wide > 0, wide, 1), 0)
    low = jnp.floor(y)
    up = jax.random.uniform(key, x.shape, x.dtype) < (y - low)
    # x/step can exceed m by a rounding of float32: clip (probability ~eps, at the extreme value only).
    q = jnp.clip(low + up.astype(x.dtype), -m, m)
    return (q + m).astype(jnp.uint8), step, q * wide


def _expand(index: jax.Array, step: jax.Array, m: int) -> jax.Array:
    wide = step[..., None] if step.ndim == index.ndim - 1 else step
    return (index.astype(step.dtype) - m) * wide


@functools.partial(jax.jit, static_argnames=("m", "scale", "topk"))
def _compress(down: Downlink, image_rows, text_rows, residual, key, *, m: int, scale: str, topk: float):
    k_image, k_text = jax.random.split(key)
    grads = {"image": down.image_grad, "text": down.text_grad}
    rows = {"image": jnp.broadcast_to(image_rows[:, None], down.image_grad.shape[:2]), "text": text_rows}
    keys = {"image": k_image, "text": k_text}
    out, new_residual = {}, {}
    for name in ("image", "text"):
        g = grads[name]
        if residual is not None:
            r = residual[name]
            g = g + jnp.where(rows[name][..., None], r[:, : g.shape[1]], 0).astype(g.dtype)
        index, step, sent = _quantize(g, rows[name], keys[name], m, scale, topk)
        out[name] = (index, step)
        if residual is not None:
            left = jnp.where(rows[name][..., None], g - sent, 0)
            # The residual keeps the longest shape seen (a batch may be shorter: bucketed lengths).
            new_residual[name] = jnp.zeros_like(residual[name]).at[:, : g.shape[1]].set(left.astype(residual[name].dtype))
    payload = QuantizedDownlink(out["image"][0], out["image"][1], out["text"][0], out["text"][1], half_levels=m)
    return payload, (new_residual if residual is not None else None)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _expand_program(payload: QuantizedDownlink, dtype=None) -> Downlink:
    m = payload.half_levels
    image = _expand(payload.image_index, payload.image_step, m)
    text = _expand(payload.text_index, payload.text_step, m)
    if dtype is not None:
        image, text = image.astype(dtype), text.astype(dtype)
    return Downlink(image_grad=image, text_grad=text)


def compress(spec: DownlinkSpec, down: Downlink, uplink: Uplink, residual: Mapping[str, Any] | None,
             key: jax.Array) -> tuple[Any, dict[str, Any] | None]:
    """The message the server sends for ``down`` and the next residual (None without error feedback).

    Returns ``down`` itself (fp32), ``down`` in bfloat16 (bf16) or a :class:`QuantizedDownlink`
    (quantized) computed by one jitted program, so every server half sends the same bits. ``uplink``
    supplies the real positions (its masks); ``residual`` is this client's ``{'image', 'text'}``.
    """
    if spec.kind == "fp32":
        return down, None
    if spec.kind == "bf16":
        return jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16), down), None
    image_rows = jnp.asarray(uplink.image_valid) > 0
    text_rows = (jnp.asarray(uplink.attention_mask) > 0) & (jnp.asarray(uplink.image_mask) == 0)
    if spec.error_feedback and residual is None:
        raise ValueError("error feedback needs the client's residual: the server state has none (create it with "
                         "downlink.initial_residual).")
    return _compress(down, image_rows, text_rows, dict(residual) if spec.error_feedback else None, key,
                     m=spec.half_levels, scale=spec.scale, topk=float(spec.topk))


def expand(message: Any, dtype: Any = jnp.float32) -> Downlink:
    """The gradients the client uses: a :class:`QuantizedDownlink` decoded (one jitted multiply), or a
    Downlink cast to ``dtype`` (the receiver's dtype: float32, float64 in the tests' float64 runs)."""
    if isinstance(message, QuantizedDownlink):
        return _expand_program(message, dtype=jnp.dtype(dtype).name)
    return jax.tree_util.tree_map(lambda g: jnp.asarray(g).astype(dtype), message)


def initial_residual(spec: DownlinkSpec, batch_size: int, image_tokens: int, seq_len: int, dim: int,
                     clients: int = 1) -> dict[str, Any]:
    """The server partition's ``batch_stats`` for ``spec``: zero residuals per client, or ``{}``."""
    if not spec.error_feedback:
        return {}
    zeros = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    return {RESIDUAL_KEY: {str(k): {"image": zeros(batch_size, image_tokens, dim), "text": zeros(batch_size, seq_len, dim)}
                           for k in range(max(int(clients), 1))}}


# ---------------------------------------------------------------------------------------------------
# Host side: the bytes of a message, as sent


def real_rows(up: Uplink) -> tuple[np.ndarray, np.ndarray]:
    """(image_valid [B] bool, text positions [B, T] bool): the rows that travel."""
    return np.asarray(up.image_valid) > 0, up.text_positions()


def encode_quantized(message: QuantizedDownlink, up: Uplink, method: str = "ans") -> dict[str, bytes]:
    """``{'image_grad', 'text_grad', 'image_step', 'text_step'}``: the coded indices at the real rows
    (codec messages ``[n_images, T_img, D]``, ``[n_text, D]``) and the float32 steps (raw little-endian:
    per token at the real rows, or ``[D]`` per channel)."""
    image_rows, text_rows = real_rows(up)
    levels = 2 * int(message.half_levels) + 1
    out = {}
    for name, rows in (("image", image_rows), ("text", text_rows)):
        index = np.asarray(getattr(message, f"{name}_index"))[rows]
        step = np.asarray(getattr(message, f"{name}_step"), np.float32)
        if step.ndim > 1:  # per token
            step = step[rows]
        out[f"{name}_grad"] = codec.encode(index, levels, method=method)
        out[f"{name}_step"] = step.astype("<f4").tobytes()
    return out


def quantized_bytes(message: QuantizedDownlink, up: Uplink, method: str = "ans") -> int:
    """Bytes of :func:`encode_quantized`'s output (what a transport sends, framing excluded)."""
    return sum(len(v) for v in encode_quantized(message, up, method).values())
