"""Scaled dot-product attention shared by the vision tower and the decoder, with a hand-written VJP.

Why not plain autodiff: on XLA:CPU the attention of a small model is dominated by passes over the
``[B, H, T, S]`` score tensor, not by its GEMMs (demo size, one core: 74 of 94 ms of attention outside the
GEMMs). Autodiff of ``softmax(where(mask, q k^T))`` keeps several such tensors and differentiates
through the max-subtraction and the select. The backward used here is the standard one
(``dS = P * (dP - rowsum(dO * O))``, as in FlashAttention): it needs only the probabilities and two
elementwise passes, and masked entries get an exact zero. Above ``RECOMPUTE_SCORES_ABOVE_BYTES`` the
probabilities are recomputed in the backward pass (one more ``q k^T`` and exponential) from the forward's
row maxima, not kept: kept, each layer's ``[B, K, G*T, S]`` tensor stays alive until its backward, 3.2 GB
over OpenELM-270M's 16 layers at batch 4 and 855 tokens (docs/performance.md). Forward values are the
same function as before (float32 scores and softmax; probabilities cast to the value dtype), so every
parity test against ``transformers`` holds unchanged.

Per backend (``implementation``, a config choice: ``model.attention``): ``'custom'`` is the hand-written VJP
above, which wins on CPU; ``'xla'`` and ``'cudnn'`` are ``jax.nn.dot_product_attention``'s implementations
(cuDNN's fused flash attention on GPU, bf16/fp16 only; XLA's on TPU and elsewhere). ``'auto'`` picks cudnn
on GPU for 16-bit inputs, xla on TPU (and on GPU for float32) and custom on CPU (:func:`resolve`). The KV-cache
path used by generation (:func:`dot_product_attention_heads_major`) is always the custom one.

Shapes: ``q [B,T,H,d]``, ``k``/``v`` ``[B,S,K,d]`` with ``H`` a multiple of ``K`` (grouped-query: query
head ``h`` reads key/value head ``h // (H/K)``, the order of HF's ``repeat_kv``), ``allowed [B,T,S]`` bool
or ``None`` (every key visible). Rows with no allowed key (padding queries) output zeros instead of NaN
and get zero gradients; their outputs are meaningless and must be ignored by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtl_jax.precision import accum_dtype

Array = jax.Array

_MASKED = float(jnp.finfo(jnp.float32).min)
IMPLEMENTATIONS = ("auto", "custom", "xla", "cudnn")


def resolve(implementation: str, dtype=jnp.float32, backend: str | None = None) -> str:
    """The implementation ``'auto'`` stands for on ``backend`` (default: JAX's) for inputs of ``dtype``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "cudnn" if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "xla"
    return "xla" if backend == "tpu" else "custom"


def _where_allowed(allowed: Array | None, x: Array, fill: float) -> Array:
    # x is [B,K,G*T,S]; viewing it as [B,K,G,T,S] is free in row-major and lets allowed [B,T,S] broadcast.
    if allowed is None:
        return x
    b, kv, rows, cols = x.shape
    t = allowed.shape[1]
    return jnp.where(allowed[:, None, None], x.reshape(b, kv, rows // t, t, cols), fill).reshape(x.shape)


def _scores(q: Array, k: Array, allowed: Array | None, scale: float) -> tuple[Array, Array]:
    """``(s, m)``: the float32 scores and their row maxima over the allowed keys."""
    s = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=accum_dtype(q.dtype)) * scale
    return s, jax.lax.stop_gradient(jnp.max(_where_allowed(allowed, s, _MASKED), axis=-1, keepdims=True))


def _forward(q: Array, k: Array, v: Array, allowed: Array | None, scale: float) -> tuple[Array, tuple]:
    # The mask is applied inside the max and the exp rather than to the scores, and the rows are
    # normalised on the [.., rows, d] output rather than on the [.., rows, S] probabilities: two fewer
    # passes over the score tensor, which is what attention costs on CPU at small head dims.
    s, m = _scores(q, k, allowed, scale)
    e = _where_allowed(allowed, jnp.exp(s - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    # Rows with no allowed key (padding queries) have total 0: their output is 0 and their gradient too.
    inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    out = jnp.einsum("bkqs,bksd->bkqd", e.astype(v.dtype), v, preferred_element_type=accum_dtype(v.dtype)) * inv
    return out.astype(v.dtype), (m, inv, e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, allowed: Array | None, scale: float) -> Array:
    return _forward(q, k, v, allowed, scale)[0]


# Above this size a layer's [B,K,G*T,S] exponentials are recomputed in the backward pass rather than kept:
# at the paper's length (855 merged tokens, batch 4) they are 140-234 MB per layer, 3.2 GB over OpenELM's 16
# layers, the largest part of the step's memory. Below it (the demo: ~10 MB) keeping them is cheap and the
# recomputation (one more q k^T and exponential) would cost ~10 % of the server program's time.
RECOMPUTE_SCORES_ABOVE_BYTES = 32 << 20


def _attention_fwd(q, k, v, allowed, scale):
    out, (m, inv, e) = _forward(q, k, v, allowed, scale)
    keep = e.size * e.dtype.itemsize <= RECOMPUTE_SCORES_ABOVE_BYTES
    return out, (q, k, v, allowed, m, inv, out, e if keep else None)


def _attention_bwd(scale, residuals, d_out):
    # With P = E / l: dV = P^T dO = E^T (dO / l), and dS = P * (dP - rowsum(dO * O)); E is 0 wherever
    # a key is masked (whole padding rows included), so no mask is needed here.
    q, k, v, allowed, m, inv, out, e = residuals
    if e is None:
        # The recomputed scores must differ from the forward's to XLA: XLA:CPU drops optimization barriers
        # before common-subexpression elimination, which then merges them with the forward's scores and keeps
        # those alive for every layer (what defeats jax.checkpoint there too). Adding 0 * (a gradient value)
        # is not folded (0 * x is NaN for x = inf/NaN, where this gradient is NaN anyway) and makes the
        # recomputation wait for this layer's incoming gradient, so one layer's scores are alive at a time.
        tie = jnp.zeros((), q.dtype) * d_out.reshape(-1)[0].astype(q.dtype)
        s, _ = _scores(q + tie, k, allowed, scale)
        e = _where_allowed(allowed, jnp.exp(s - (m + tie)), 0.0)  # (XLA materialises m's broadcast: not the forward's)
    d_out32 = d_out.astype(accum_dtype(d_out.dtype))
    dv = jnp.einsum("bkqs,bkqd->bksd", e.astype(v.dtype), (d_out32 * inv).astype(v.dtype))
    dp = jnp.einsum("bkqd,bksd->bkqs", d_out, v, preferred_element_type=accum_dtype(v.dtype))
    delta = jnp.sum(d_out32 * out.astype(d_out32.dtype), axis=-1, keepdims=True)
    ds = e * (dp - delta) * (inv * scale)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds.astype(q.dtype), k)
    dk = jnp.einsum("bkqs,bkqd->bksd", ds.astype(k.dtype), q)
    d_allowed = None if allowed is None else jnp.zeros(allowed.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_allowed


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q: Array, k: Array, v: Array, allowed: Array | None, scale: float,
                          implementation: str = "custom") -> Array:
    """Grouped-query attention ``[B,T,H,d] x [B,S,K,d] -> [B,T,H*d]`` (see the module docstring)."""
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B,S,K,d], got k {k.shape}, v {v.shape}")
    implementation = resolve(implementation, q.dtype)
    if implementation != "custom":
        return library_attention(q, k, v, allowed, scale, implementation,
                                 pad_to=CUDNN_LENGTH_MULTIPLE if implementation == "cudnn" else 1)
    return dot_product_attention_heads_major(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed, scale)


# jax's cuDNN flash attention (jax 0.10-0.11) refuses a training call whose query or key length is odd
# ("Unsupported sequence length"), with or without a mask: SigLIP-so400m has 729 patches and merged LLaVA
# sequences any length. Such lengths are padded by one position, which the mask or the key lengths hide.
CUDNN_LENGTH_MULTIPLE = 2


def library_attention(q: Array, k: Array, v: Array, allowed: Array | None, scale: float, implementation: str,
                      pad_to: int = 1) -> Array:
    """``jax.nn.dot_product_attention`` (``implementation`` ``'xla'`` or ``'cudnn'``) with this module's shapes
    and contract, the query and key lengths padded up to a multiple of ``pad_to``.

    Padded keys are never attended to: they are masked out of ``allowed``, or, with no mask, excluded by
    ``key_value_seq_lengths`` (cuDNN's padding mask, no bias tensor). Padded queries are cut off the output.
    """
    b, t, h, d = q.shape
    s = k.shape[1]
    if allowed is not None and allowed.shape != (b, t, s):
        raise ValueError(f"allowed must be [B,T,S] = {(b, t, s)}, got {allowed.shape}")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    tp, sp = -(-t // pad_to) * pad_to, -(-s // pad_to) * pad_to
    lengths = None
    if (tp, sp) != (t, s):
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (k, v))
        if allowed is None:
            lengths = jnp.full((b,), s, jnp.int32)
        else:
            allowed = jnp.pad(allowed.astype(jnp.bool_), ((0, 0), (0, tp - t), (0, sp - s)))
    mask = None if allowed is None else allowed.astype(jnp.bool_)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=float(scale), key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :t].reshape(b, t, h * d)


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
