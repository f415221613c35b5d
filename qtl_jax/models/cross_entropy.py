"""Next-token cross-entropy: from logits, and fused with the output head so ``[B, T, V]`` never exists.

Both average ``-log softmax(logits)[target]`` over the targets that are not ``IGNORE_INDEX`` (-100), with
the targets of position ``t`` being ``labels[t + 1]`` (the labels are shifted, not the logits: a slice of a
``[B, T, V]`` tensor is a copy).

* :func:`from_logits`: ``optax.softmax_cross_entropy_with_integer_labels`` and autodiff. A hand-written VJP
  (``softmax - onehot`` in one pass) was measured against it at vocabulary 32000 and gained nothing
  (docs/cpu_optimisation.md), so the library function is used.
* :func:`fused_head`: the loss from the final hidden states and the output head's weights. The logits are
  computed ``chunk_rows`` rows at a time, and the gradients w.r.t. the hidden states and the head are
  accumulated in the same pass (the custom VJP's forward rule computes them; the backward rule only scales
  them by the incoming cotangent), so neither the ``[B, T, V]`` logits nor their float32 softmax are ever
  stored, and nothing is recomputed. The rows with a target are gathered first and only they are
  processed: in a LLaVA batch most positions are image tokens, prompt or padding (stage 1 at the paper's
  shapes: ~50 of ~790 positions per sample carry a target), so the head costs what the targets need, up to
  a static bound (``max_targets``; the server passes its text length) that fixes the number of chunks at
  trace time. With a count read from the device instead, XLA on a GPU ran the loop from the host, which
  waited mid-program for the LLM's forward pass and then left the GPU idle while it prepared the backward
  pass's command buffer (7.4 ms of a 109 ms paper-size stage-2 step on an H200, docs/performance.md).
  Gradients of an input nobody differentiates (a frozen head) are not computed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from qtl_jax.data.constants import IGNORE_INDEX
from qtl_jax.precision import accum_dtype, upcast

Array = jax.Array
# Rows of logits one chunk of fused_head holds ([chunk_rows, V] float32 logits, softmax and gradient).
DEFAULT_CHUNK_ROWS = 1024


def shifted_targets(labels: Array) -> tuple[Array, Array]:
    """``(targets, valid)`` ``[B, T]``: position t predicts ``labels[t + 1]``; the last predicts nothing."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    valid = targets != IGNORE_INDEX
    return jnp.where(valid, targets, 0), valid


def from_logits(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` over labels != -100: ``(mean, number of targets)``."""
    logits = upcast(logits)
    targets, valid = shifted_targets(labels)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1).astype(logits.dtype), count


def fused_head(hidden: Array, weight: Array, labels: Array, bias: Array | None = None, *,
               vocab_major: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               max_targets: int | None = None) -> tuple[Array, Array]:
    """The cross-entropy of the head ``logits = hidden @ W (+ bias)`` without materialising the logits.

    Args:
      hidden: ``[B, T, D]`` final (normalised) hidden states, in the compute dtype.
      weight: the head: ``[V, D]`` (``vocab_major``, a tied embedding table) or ``[D, V]`` (a Dense kernel).
      labels: ``[B, T]`` int labels, -100 where no loss is taken (shifted here, as :func:`from_logits`).
      bias: optional ``[V]`` head bias.
      chunk_rows: target rows per chunk; memory is ``O(chunk_rows * V)``.
      max_targets: a static bound on the number of targets (the server's: the text tokens, ``B * T_text``,
        since image positions carry none); ``None`` bounds them by ``B * T``. Only that many rows are
        gathered and the chunks' loop has a static trip count: a count read from the device (the real
        number of targets) would make an accelerator's host wait for the forward pass in mid-program. A
        batch with more targets than the bound gets a NaN loss rather than a silently partial one.

    Returns:
      ``(mean over targets, number of targets)``, equal to :func:`from_logits` of the full logits (the
      logits are accumulated in float32, float64 for float64 inputs, as :meth:`Decoder._logits` does).
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"fused_head takes hidden [B, T, D] and labels [B, T]; got {hidden.shape} and {labels.shape}")
    d = hidden.shape[-1]
    w_d = weight.shape[1] if vocab_major else weight.shape[0]
    if weight.ndim != 2 or w_d != d:
        raise ValueError(f"the head weight {weight.shape} does not fit hidden width {d} (vocab_major={vocab_major})")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = labels.size
    if max_targets is not None and (isinstance(max_targets, bool) or int(max_targets) < 1):
        raise ValueError(f"max_targets must be a positive int or None, got {max_targets!r}")
    rows = n if max_targets is None else min(int(max_targets), n)
    targets, valid = shifted_targets(labels)
    total = _nll_sum(hidden.reshape(-1, d), weight, bias, targets.reshape(-1), valid.reshape(-1),
                     bool(vocab_major), min(int(chunk_rows), max(rows, 1)), rows)
    count = jnp.sum(valid)
    total = jnp.where(count > rows, jnp.nan, total)
    return total / jnp.maximum(count, 1).astype(total.dtype), count


def _logits(rows: Array, weight: Array, bias: Array | None, vocab_major: bool) -> Array:
    acc = accum_dtype(rows.dtype)
    w = weight.astype(rows.dtype)
    if vocab_major:
        out = jnp.einsum("nd,vd->nv", rows, w, preferred_element_type=acc)
    else:
        out = jnp.einsum("nd,dv->nv", rows, w, preferred_element_type=acc)
    return out if bias is None else out + bias.astype(acc)


def _pass(x, weight, bias, targets, valid, vocab_major: bool, chunk: int, rows_max: int, grad_x: bool,
          grad_w: bool, grad_b: bool):
    """Loss sum and (as asked) the gradients of the loss sum w.r.t. ``x``, ``weight`` and ``bias``, over the
    first ``rows_max`` rows with a target (the caller checks that no target is left out)."""
    n, d = x.shape
    acc = accum_dtype(x.dtype)
    n_chunks = max(math.ceil(rows_max / chunk), 1)
    padded = n_chunks * chunk
    # Rows with a target first (stable): the first rows_max of them, padded to whole chunks.
    order = jnp.argsort(~valid, stable=True)
    kept = order[:rows_max]
    xs = jnp.pad(jnp.take(x, kept, axis=0), ((0, padded - rows_max), (0, 0)))
    ts = jnp.pad(jnp.take(targets, kept), (0, padded - rows_max))
    vs = jnp.pad(jnp.take(valid, kept), (0, padded - rows_max))
    vocab = weight.shape[0] if vocab_major else weight.shape[1]

    def body(i, carry):
        total, dxs, dw, db = carry
        start = i * chunk
        rows = jax.lax.dynamic_slice_in_dim(xs, start, chunk)
        tgt = jax.lax.dynamic_slice_in_dim(ts, start, chunk)
        keep = jax.lax.dynamic_slice_in_dim(vs, start, chunk)
        logits = _logits(rows, weight, bias, vocab_major)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
        total = total + jnp.sum(jnp.where(keep, lse - picked, 0.0))
        if grad_x or grad_w or grad_b:
            onehot = jnp.arange(vocab, dtype=tgt.dtype)[None, :] == tgt[:, None]
            g = jnp.where(keep[:, None], jnp.exp(logits - lse[:, None]) - onehot.astype(acc), 0.0)
            if grad_x:
                w = weight.astype(x.dtype)
                spec = "nv,vd->nd" if vocab_major else "nv,dv->nd"
                dx = jnp.einsum(spec, g.astype(x.dtype), w, preferred_element_type=acc)
                dxs = jax.lax.dynamic_update_slice_in_dim(dxs, dx.astype(dxs.dtype), start, axis=0)
            if grad_w:
                spec = "nv,nd->vd" if vocab_major else "nv,nd->dv"
                dw = dw + jnp.einsum(spec, g.astype(x.dtype), rows, preferred_element_type=acc)
            if grad_b:
                db = db + jnp.sum(g, axis=0)
        return total, dxs, dw, db

    init = (jnp.zeros((), acc),
            jnp.zeros((padded, d), x.dtype) if grad_x else None,
            jnp.zeros(weight.shape, acc) if grad_w else None,
            jnp.zeros((vocab,), acc) if grad_b else None)
    total, dxs, dw, db = jax.lax.fori_loop(0, n_chunks, body, init)
    dx = None
    if grad_x:
        # Back to the input order (a gather by the inverse permutation); rows not processed get 0.
        in_order = jnp.concatenate([dxs[:rows_max], jnp.zeros((n - rows_max, d), dxs.dtype)], axis=0)
        dx = jnp.take(in_order, jnp.argsort(order), axis=0)
    return total, dx, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _nll_sum(x, weight, bias, targets, valid, vocab_major, chunk, rows_max):
    return _pass(x, weight, bias, targets, valid, vocab_major, chunk, rows_max, False, False, False)[0]


def _nll_sum_fwd(x, weight, bias, targets, valid, vocab_major, chunk, rows_max):
    # symbolic_zeros: each input arrives as CustomVJPPrimal(value, perturbed); what nobody differentiates
    # (a frozen head in stage 1) gets no gradient computed.
    bias_value = None if bias is None else bias.value
    grad_b = bias is not None and bias.perturbed
    total, dx, dw, db = _pass(x.value, weight.value, bias_value, targets.value, valid.value, vocab_major, chunk,
                              rows_max, x.perturbed, weight.perturbed, grad_b)
    dw = None if dw is None else dw.astype(weight.value.dtype)
    db = None if db is None else db.astype(bias_value.dtype)
    return total, (dx, dw, db)


def _nll_sum_bwd(vocab_major, chunk, rows_max, residuals, g):
    dx, dw, db = residuals
    scale = lambda a: None if a is None else (a * g.astype(a.dtype)).astype(a.dtype)  # noqa: E731
    return scale(dx), scale(dw), scale(db), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)

