"""Attention per backend: the library implementations against the hand-written VJP, and the 'auto' choice.

On a CPU the paths that run there are compared (``custom`` and ``xla``); ``cudnn`` is compared on a GPU only
(the last test; ``bench/device_run.sh`` runs this file there before the benchmark). Inputs are float64, but the library's XLA
implementation takes its softmax in float32 whatever the input dtype, so the tolerance is float32 rounding
of the chained reductions (scores over d, softmax over S, output over S), scaled by the values compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.models import attention
from tolerances import SAFETY, rounding_tolerance

B, T, H, K, D = 2, 7, 4, 2, 8


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, n, D)) for n in (H, K, K))
    lengths = np.array([T, 4])  # sample 1 right-padded after 4 positions
    valid = np.arange(T)[None] < lengths[:, None]
    causal = np.tril(np.ones((T, T), bool))
    allowed = causal[None] & valid[:, None, :] & valid[:, :, None]
    return q, k, v, allowed, valid


@pytest.mark.parametrize("masked", [True, False], ids=["causal_padded", "no_mask"])
def test_xla_equals_custom_values_and_gradients_in_float64(masked):
    q, k, v, allowed, valid = problem()
    rows = valid if masked else np.ones_like(valid)  # rows with no allowed key are meaningless by contract
    weights = np.random.default_rng(1).normal(size=(B, T, H * D)) * rows[..., None]

    def loss(impl, q, k, v):
        mask = jnp.asarray(allowed) if masked else None
        if impl == "xla_padded":  # the cuDNN path's even-length padding (T = 7 is odd), run by XLA's kernel
            out = attention.library_attention(q, k, v, mask, D**-0.5, "xla", pad_to=attention.CUDNN_LENGTH_MULTIPLE)
        else:
            out = attention.dot_product_attention(q, k, v, mask, D**-0.5, impl)
        return jnp.sum(out * weights), out

    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v))
        results = {impl: jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(impl, *args)
                   for impl in ("custom", "xla", "xla_padded")}
    (_, out_c), grads_c = results["custom"]

    def close(actual, desired, depth=3):
        tol = rounding_tolerance(np.float32, max(T, D), depth, float(np.abs(desired).max()))
        np.testing.assert_allclose(actual, desired, rtol=0, atol=tol)

    assert T % attention.CUDNN_LENGTH_MULTIPLE  # the padding is exercised
    for impl in ("xla", "xla_padded"):
        (_, out_x), grads_x = results[impl]
        assert out_x.shape == out_c.shape
        close(np.asarray(out_x)[rows], np.asarray(out_c)[rows])
        for gx, gc in zip(grads_x, grads_c):  # backward: three more chained reductions
            close(np.asarray(gx), np.asarray(gc), depth=6)


def test_auto_picks_by_backend_and_dtype():
    assert attention.resolve("auto", jnp.float32, "cpu") == "custom"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN's fused kernel is 16-bit only
    assert attention.resolve("auto", jnp.bfloat16, "tpu") == "xla"
    assert attention.resolve("xla", jnp.float32, "cpu") == "xla"
    with pytest.raises(ValueError, match="not one of"):
        attention.resolve("flash", jnp.float32, "cpu")


def test_decoder_with_xla_attention_equals_custom():
    """The whole decoder forward with either kernel (selected by DecoderConfig.attention)."""
    from qtl_jax.models.decoder import Decoder, DecoderConfig

    with jax.enable_x64(True):
        configs = {impl: DecoderConfig.make(family="llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=4,
                                            num_kv_heads=2, intermediate_size=24, head_dim=4, dtype=jnp.float64,
                                            param_dtype=jnp.float64, attention=impl)
                   for impl in ("custom", "xla")}
        x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 16)))
        mask = jnp.asarray([[1] * 6, [1] * 3 + [0] * 3])
        positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
        params = Decoder(configs["custom"]).init(jax.random.key(0), x, mask, positions)
        out = {impl: np.asarray(Decoder(c).apply(params, x, mask, positions)) for impl, c in configs.items()}
    real = np.asarray(mask) > 0
    # Two layers of attention at float32 softmax, then the MLP and the head (reductions over 16..32 terms).
    tol = rounding_tolerance(np.float32, 32, 2 * 6, float(np.abs(out["custom"]).max()))
    np.testing.assert_allclose(out["xla"][real], out["custom"][real], rtol=0, atol=tol)
    with pytest.raises(ValueError, match="attention 'flash'"):
        DecoderConfig.make(family="llama", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=24, head_dim=8, attention="flash")


def test_custom_backward_keeps_no_score_sized_residual(monkeypatch):
    """Above RECOMPUTE_SCORES_ABOVE_BYTES the hand-written VJP keeps O(T*d) residuals, not the [B, K, G*T, S]
    exponentials; below it, it keeps them."""
    b, t, h, kv, d = 2, 32, 4, 2, 4  # t > d: a score tensor (b*h*t*t) is larger than q (b*t*h*d)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    allowed = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
    def kept():
        _, backward = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, allowed, d**-0.5, "custom"),
                              q, k, v)
        return max(x.size for x in jax.tree.leaves(backward) if hasattr(x, "size"))

    assert kept() == b * h * t * t  # 32 KB: kept
    monkeypatch.setattr(attention, "RECOMPUTE_SCORES_ABOVE_BYTES", 0)
    assert kept() == max(b * t * h * d, allowed.size)  # q and the output (or the mask), not b*h*t*t


@pytest.mark.parametrize("masked", [True, False], ids=["causal_padded", "no_mask"])
def test_recomputed_and_kept_scores_give_the_same_gradients(masked, monkeypatch):
    q, k, v, allowed, _ = problem()
    mask = jnp.asarray(allowed) if masked else None
    g = np.random.default_rng(2).normal(size=(B, T, H * D))

    def grads():
        with jax.enable_x64(True):
            f = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, D**-0.5, "custom")  # noqa: E731
            return jax.vjp(f, q, k, v)[1](g)

    kept = grads()
    monkeypatch.setattr(attention, "RECOMPUTE_SCORES_ABOVE_BYTES", 0)
    for a, r in zip(kept, grads()):  # the same operations on the same inputs: rounding alone, if XLA fuses otherwise
        np.testing.assert_allclose(r, a, rtol=0, atol=rounding_tolerance(np.float64, T * D, 2, float(np.max(np.abs(a)))))


def test_layers_backward_holds_one_layers_scores_at_a_time(monkeypatch):
    """L stacked attention layers: XLA's temporaries hold the score-sized tensors of one layer's backward (the
    scores, dP, dS and a product: at most 4) plus O(T*d) residuals per layer, not L layers' worth of scores.
    Before the recomputation (and with jax.checkpoint, whose recomputation XLA:CPU merges with the forward's)
    they grew by one score tensor per layer: 10.7 score tensors here."""
    b, t, h, d, layers = 2, 256, 2, 4, 8
    score_bytes = b * h * t * t * 4
    monkeypatch.setattr(attention, "RECOMPUTE_SCORES_ABOVE_BYTES", score_bytes - 1)
    x_bytes = b * t * h * d * 4
    allowed = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)

    def loss(ws, x):
        for w in ws:
            y = (x @ w).reshape(b, t, 3, h, d)
            x = x + attention.dot_product_attention(y[:, :, 0], y[:, :, 1], y[:, :, 2], allowed, d**-0.5, "custom")
        return jnp.sum(x)

    ws = [jax.ShapeDtypeStruct((h * d, 3 * h * d), jnp.float32)] * layers
    compiled = jax.jit(jax.grad(loss)).lower(ws, jax.ShapeDtypeStruct((b, t, h * d), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # 16 x-sized residuals per layer (q, k, v, output, x, their cotangents...): 1/16 of a score tensor here.
    assert temp <= 4 * score_bytes + 16 * x_bytes * layers, (temp / score_bytes, layers)


# The two attention shapes of the paper's configuration: SigLIP-so400m (16 heads of 72, 729 patches, no mask)
# and OpenELM-270M's first layers (12 query heads over 3 KV heads of 64; causal, the second sample right-padded).
CUDNN_SHAPES = {"siglip_so400m": (2, 729, 16, 16, 72, False), "openelm_270m_gqa": (2, 855, 12, 3, 64, True)}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on an NVIDIA GPU only "
                    "(bench/device_run.sh runs this file there)")
@pytest.mark.parametrize("name", sorted(CUDNN_SHAPES))
def test_cudnn_in_bfloat16_equals_custom_in_float32_on_gpu(name):
    """``'cudnn'`` (what ``'auto'`` picks on a GPU in bf16) against the hand-written VJP in float32 on the same
    bf16 inputs: values and the three input gradients, on the rows that are real.

    Tolerance from the arithmetic: cuDNN accumulates in float32 but rounds the probabilities (before P V), the
    output and the gradients to bf16, each a relative error of at most eps/2 per term (eps = 2^-7). A weighted
    sum of terms each off by a relative eps/2 is off by at most eps/2 of the sum of magnitudes, so the error of
    every output, norm-wise, is a few eps/2 (one per rounding in its chain: 2 forward, 4 backward), with
    SAFETY standard deviations on top. A wrong mask, a wrong grouped-query order or a transposed layout
    moves the result by a large fraction of its norm, far beyond that bound.
    """
    import ml_dtypes

    b, t, h, kv, d, masked = CUDNN_SHAPES[name]
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(b, t, n, d)).astype(ml_dtypes.bfloat16) for n in (h, kv, kv))
    lengths = np.array([t, t * 2 // 3])
    valid = np.arange(t)[None] < lengths[:, None]
    allowed = (np.tril(np.ones((t, t), bool))[None] & valid[:, None, :] & valid[:, :, None]) if masked else None
    rows = valid if masked else np.ones_like(valid)
    g = (rng.normal(size=(b, t, h * d)) * rows[..., None]).astype(np.float32)

    def run(impl, dtype):
        args = tuple(jnp.asarray(np.asarray(a, np.float32), dtype) for a in (q, k, v))
        mask = None if allowed is None else jnp.asarray(allowed)
        f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, d**-0.5, impl))
        out, backward = jax.vjp(f, *args)
        return [np.asarray(x, np.float32) for x in (out, *backward(jnp.asarray(g, dtype)))]

    eps_half = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps) / 2
    for what, got, ref, roundings in zip(("out", "dq", "dk", "dv"), run("cudnn", jnp.bfloat16),
                                         run("custom", jnp.float32), (2, 4, 4, 4)):
        if what == "out":  # padding rows' outputs are meaningless by contract
            got, ref = got[rows], ref[rows]
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= SAFETY * roundings * eps_half, f"{name} {what}: relative error {err:.4f}"
