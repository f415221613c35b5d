"""Scaled dot-product attention shared by the vision tower and the decoder, with a hand-written VJP.

Why not plain autodiff: on XLA:CPU the attention of a small model is dominated by passes over the
``[B, H, T, S]`` score tensor, not by its GEMMs (demo size, one core: 74 of 94 ms of attention outside the
GEMMs). Autodiff of ``softmax(where(mask, q k^T))`` keeps several such tensors and differentiates
through the max-subtraction and the select. The backward used here is the standard one
(``dS = P * (dP - rowsum(dO * O))``, as in FlashAttention): it needs only the probabilities from the
forward pass and two elementwise passes, and masked entries get an exact zero. Forward values are the
same function as before (float32 scores and softmax; probabilities cast to the value dtype), so every
parity test against ``transformers`` holds unchanged.

Shapes: ``q [B,T,H,d]``, ``k``/``v`` ``[B,S,K,d]`` with ``H`` a multiple of ``K`` (grouped-query: query
head ``h`` reads key/value head ``h // (H/K)``, the order of HF's ``repeat_kv``), ``allowed [B,T,S]`` bool
or ``None`` (every key visible). Rows with no allowed key get a uniform distribution instead of NaN;
their outputs are meaningless (padding queries) and their gradients are zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

_MASKED = float(jnp.finfo(jnp.float32).min)


def _masked(s: Array, allowed: Array | None, fill: float) -> Array:
    # s is [B,K,G*T,S]; viewing it as [B,K,G,T,S] is free in row-major and lets allowed [B,T,S] broadcast.
    if allowed is None:
        return s
    b, kv, rows, cols = s.shape
    t = allowed.shape[1]
    s = jnp.where(allowed[:, None, None], s.reshape(b, kv, rows // t, t, cols), fill)
    return s.reshape(b, kv, rows, cols)


def _forward(q: Array, k: Array, v: Array, allowed: Array | None, scale: float) -> tuple[Array, Array]:
    s = _masked(jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * scale, allowed, _MASKED)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    probs = e / jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v)
    return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, allowed: Array | None, scale: float) -> Array:
    return _forward(q, k, v, allowed, scale)[0]


def _attention_fwd(q, k, v, allowed, scale):
    out, probs = _forward(q, k, v, allowed, scale)
    return out, (q, k, v, allowed, probs, out)


def _attention_bwd(scale, residuals, d_out):
    q, k, v, allowed, probs, out = residuals
    dv = jnp.einsum("bkqs,bkqd->bksd", probs.astype(v.dtype), d_out.astype(v.dtype))
    dp = jnp.einsum("bkqd,bksd->bkqs", d_out, v, preferred_element_type=jnp.float32)
    # rowsum(dO * O) == rowsum(P * dP): the softmax Jacobian's correction term, from [.., rows, d] tensors.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    # Masked entries already have probability 0, except in rows with no allowed key at all.
    ds = _masked(probs * (dp - delta) * scale, allowed, 0.0)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds.astype(q.dtype), k)
    dk = jnp.einsum("bkqs,bkqd->bksd", ds.astype(k.dtype), q)
    d_allowed = None if allowed is None else jnp.zeros(allowed.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_allowed


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q: Array, k: Array, v: Array, allowed: Array | None, scale: float) -> Array:
    """Grouped-query attention ``[B,T,H,d] x [B,S,K,d] -> [B,T,H*d]`` (see the module docstring)."""
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B,S,K,d], got k {k.shape}, v {v.shape}")
    return dot_product_attention_heads_major(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed, scale)


def dot_product_attention_heads_major(q: Array, k: Array, v: Array, allowed: Array | None, scale: float) -> Array:
    """As :func:`dot_product_attention` with keys/values already heads-major, ``[B,K,S,d]``: a KV cache kept
    in this layout is read in place by every decode step instead of being transposed (copied) per step."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    if k.ndim != 4 or h % kv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"attention shapes do not fit: q {q.shape}, heads-major k {k.shape}, v {v.shape}; expected "
            "q [B,T,H,d] and k = v [B,K,S,d] (i.e. [B,S,K,d] before the transpose) with H a multiple of K"
        )
    if allowed is not None and allowed.shape != (b, t, k.shape[2]):
        raise ValueError(f"allowed must be [B,T,S] = {(b, t, k.shape[2])}, got {allowed.shape}")
    if allowed is not None:
        allowed = allowed.astype(jnp.bool_)
    g = h // kv
    # Heads-major layouts, with a key/value head's G query heads stacked along the rows: every product is
    # then a plain batched GEMM over B*K and every softmax reduction runs along the contiguous last axis.
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    out = _attention(qh, k, v, allowed, float(scale))
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)
