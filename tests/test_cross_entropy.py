"""cross_entropy.from_logits against torch's next-token cross-entropy; fused_head (the head and the loss in
chunks of target rows, never [B, T, V]) against from_logits of the full logits, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import pytest

from qtl_jax.models.cross_entropy import fused_head
from qtl_jax.models.cross_entropy import from_logits as cross_entropy
from tolerances import rounding_tolerance


def torch_reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    t = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        t[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(labels[:, 1:]).reshape(-1).long(), ignore_index=-100
    )
    loss.backward()
    return float(loss.detach()), t.grad.numpy()


def test_value_and_gradient_match_torch():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 11, 29)) * 4).astype(np.float32)
    labels = rng.integers(0, 29, (3, 11))
    labels[0, :5] = -100
    labels[1, -3:] = -100
    (loss, count), grad = jax.value_and_grad(lambda x: cross_entropy(x, jnp.asarray(labels)), has_aux=True)(
        jnp.asarray(logits)
    )
    ref, ref_grad = torch_reference(logits, labels)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    # Two chained reductions (logsumexp over 29 classes, the mean over <= 33 targets) in another order.
    np.testing.assert_allclose(float(loss), ref, rtol=0, atol=rounding_tolerance(np.float32, 33, 2, abs(ref)))
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=0,
                               atol=rounding_tolerance(np.float32, 33, 2, np.abs(ref_grad).max()))
    assert not np.asarray(grad)[:, -1].any()  # the last position predicts nothing


def test_no_targets_gives_zero_loss_and_zero_gradient():
    logits = jnp.ones((2, 4, 5))
    labels = jnp.full((2, 4), -100)
    (loss, count), grad = jax.value_and_grad(lambda x: cross_entropy(x, labels), has_aux=True)(logits)
    assert float(loss) == 0.0 and int(count) == 0
    assert not np.asarray(grad).any()


def _head_problem(vocab_major: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, t, d, v = 3, 9, 8, 23
    hidden = rng.normal(size=(b, t, d))
    weight = rng.normal(size=(v, d) if vocab_major else (d, v))
    bias = rng.normal(size=(v,))
    labels = rng.integers(0, v, (b, t))
    labels[0, :4] = -100
    labels[2, -2:] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_fused_head_equals_full_logits_in_float64(vocab_major, chunk_rows):
    """Value and gradients (hidden, weight, bias) of the fused head equal the plain head + from_logits.

    float64: the chunked sums run in another order; with 24 target rows and a vocabulary of 23 the rounding
    is ~1e-15, far below any real difference."""
    hidden, weight, bias, labels = _head_problem(vocab_major)
    spec = "btd,vd->btv" if vocab_major else "btd,dv->btv"

    def plain(h, w, c):
        return cross_entropy(jnp.einsum(spec, h, w) + c, jnp.asarray(labels))

    def fused(h, w, c):
        return fused_head(h, w, jnp.asarray(labels), c, vocab_major=vocab_major, chunk_rows=chunk_rows)

    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (hidden, weight, bias))
        (ref, ref_count), ref_grads = jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True)(*args)
        (loss, count), grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(*args)
    assert int(count) == int(ref_count) == int((labels[:, 1:] != -100).sum())
    tol = rounding_tolerance(np.float64, 24 * 23, 3, 10.0)
    np.testing.assert_allclose(float(loss), float(ref), rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=tol)


@pytest.mark.parametrize("slack", [0, 3, None])
def test_fused_head_with_a_target_bound_equals_full_logits(slack):
    """``max_targets`` at the exact number of targets, above it, or none: the same value and gradients."""
    hidden, weight, bias, labels = _head_problem(True, seed=2)
    count = int((labels[:, 1:] != -100).sum())
    bound = None if slack is None else count + slack

    def plain(h, w, c):
        return cross_entropy(jnp.einsum("btd,vd->btv", h, w) + c, jnp.asarray(labels))

    def fused(h, w, c):
        return fused_head(h, w, jnp.asarray(labels), c, chunk_rows=5, max_targets=bound)

    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (hidden, weight, bias))
        (ref, _), ref_grads = jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True)(*args)
        (loss, _), grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(*args)
    tol = rounding_tolerance(np.float64, 24 * 23, 3, 10.0)
    np.testing.assert_allclose(float(loss), float(ref), rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=tol)


def test_fused_head_over_its_target_bound_is_nan_not_partial():
    hidden, weight, _, labels = _head_problem(True, seed=3)
    count = int((labels[:, 1:] != -100).sum())
    loss, n = fused_head(jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels), max_targets=count - 1)
    assert int(n) == count and np.isnan(float(loss))
    with pytest.raises(ValueError, match="max_targets must be a positive int"):
        fused_head(jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels), max_targets=0)


def test_fused_head_loop_count_is_static():
    """No data-dependent loop: on a GPU, XLA runs a while loop whose trip count is read from the device
    from the host, which then waits for the forward pass in mid-program (docs/performance.md)."""
    hidden, weight, _, labels = _head_problem(True, seed=4)
    loss = lambda h, w: fused_head(h, w, jnp.asarray(labels), chunk_rows=5, max_targets=30)[0]  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(hidden), jnp.asarray(weight)))
    assert " while[" not in jaxpr and "scan[" in jaxpr


def test_fused_head_frozen_head_gets_no_gradient_work():
    """Differentiating only the hidden states gives the same hidden gradient (the head's is never built)."""
    hidden, weight, _, labels = _head_problem(True, seed=1)
    with jax.enable_x64(True):
        h, w = jnp.asarray(hidden), jnp.asarray(weight)
        g_only = jax.grad(lambda x: fused_head(x, w, jnp.asarray(labels), chunk_rows=4)[0])(h)
        g_both = jax.grad(lambda x, y: fused_head(x, y, jnp.asarray(labels), chunk_rows=4)[0], argnums=(0, 1))(h, w)[0]
    np.testing.assert_array_equal(np.asarray(g_only), np.asarray(g_both))
    assert not np.asarray(g_only)[:, -1].any()  # the last position predicts nothing


def test_fused_head_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not fit hidden width"):
        fused_head(jnp.ones((1, 2, 4)), jnp.ones((5, 3)), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        fused_head(jnp.ones((1, 2, 4)), jnp.ones((5, 4)), jnp.zeros((1, 2), jnp.int32), chunk_rows=0)
