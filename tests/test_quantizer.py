"""The split quantizer: rounding test vectors and properties, every variant's forward, the split VJP."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import rounding_tolerance

from qtl_jax.quantizer import (
    Quantizer,
    QuantizerConfig,
    code_stats,
    cosine_distortion,
    decoder_gain,
    dequantize,
    linear_scale,
    moments,
    round_to_levels,
    tanh_bound,
)

Z_VECTOR = np.array([-1, -0.7, -0.5, -0.2, 0, 0.2, 0.5, 0.7, 1], np.float32)
EXPECTED = {
    4: [0, 0, 1, 1, 2, 2, 2, 3, 3],
    8: [0, 1, 2, 3, 4, 4, 5, 6, 7],
    16: [0, 2, 4, 6, 8, 9, 11, 13, 15],
}
DIM = 8

# (bound, scaling) pairs that behave differently; scaling is ignored by 'tanh' and 'none'.
VARIANTS = [("linear", "batch"), ("linear", "ema"), ("linear", "token"), ("tanh", "batch"), ("none", "batch")]


# ---------------------------------------------------------------------------------------------------
# round_to_levels


@pytest.mark.parametrize("levels", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_to_levels_test_vectors(levels, dtype):
    z_hat, k = round_to_levels(jnp.asarray(Z_VECTOR, dtype), levels)
    assert k.dtype == jnp.uint8
    assert k.tolist() == EXPECTED[levels]
    assert z_hat.dtype == jnp.float32
    h = (levels - 1) / 2
    exact = ((np.asarray(EXPECTED[levels], np.float64) - h) / h).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(z_hat), exact)


def test_round_half_to_even_at_ties():
    # L=4: z=0 gives s=-0.5 -> 0 (k=2); z=2/3 gives s=0.5 -> 0 (k=2), z=-2/3 gives s=-1.5 -> -2 (k=0).
    _, k = round_to_levels(jnp.array([0.0, 2 / 3, -2 / 3]), 4)
    assert k.tolist() == [2, 2, 0]


def test_ste_gradient_is_identity():
    z = jnp.linspace(-1, 1, 101)
    w = jnp.arange(101.0)
    for levels in (2, 3, 4, 7, 16):
        g = jax.grad(lambda z: jnp.sum(w * round_to_levels(z, levels)[0]))(z)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    g16 = jax.grad(lambda z: jnp.sum(round_to_levels(z, 4)[0]))(z.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16 and bool(jnp.all(g16 == 1))


def test_out_of_range_and_nan_map_to_valid_levels():
    z = jnp.array([-100.0, -1.5, 1.5, 100.0, jnp.nan, jnp.inf, -jnp.inf])
    for levels in (2, 3, 4, 5, 256, 257, 1000):
        _, k = round_to_levels(z, levels)
        k = np.asarray(k).astype(np.int64)
        assert k.tolist() == [0, 0, levels - 1, levels - 1, levels // 2, levels - 1, 0]
    assert round_to_levels(z, 257)[1].dtype == jnp.uint16


@pytest.mark.parametrize("bad", [1, 0, -4, True, 4.0, "4", (1 << 16) + 1])
def test_round_to_levels_rejects_bad_levels(bad):
    with pytest.raises(ValueError, match="levels"):
        round_to_levels(jnp.zeros(3), bad)


def test_round_to_levels_rejects_integer_input():
    with pytest.raises(ValueError, match="floating-point"):
        round_to_levels(jnp.arange(3), 4)


_LEVELS = st.sampled_from([2, 3, 4, 5, 7, 8, 16, 33, 256, 1000])
_Z = st.lists(st.floats(-1, 1, width=32), min_size=32, max_size=32)


@settings(max_examples=60, deadline=None)
@given(levels=_LEVELS, values=_Z)
def test_rounding_properties(levels, values):
    z = np.asarray(values, np.float32)
    z_hat, k = round_to_levels(jnp.asarray(z), levels)
    k = np.asarray(k).astype(np.int64)
    z_hat = np.asarray(z_hat)
    # Index range and grid membership.
    assert k.min() >= 0 and k.max() <= levels - 1
    np.testing.assert_array_equal(z_hat, np.asarray(dequantize(k, levels)))
    # Nearest level: no grid point is closer (up to float32 rounding at the midpoints).
    grid = np.asarray(dequantize(np.arange(levels), levels), np.float64)
    best = np.min(np.abs(z[:, None].astype(np.float64) - grid[None, :]), axis=1)
    assert np.all(np.abs(z - z_hat) <= best + 1e-6)
    # Monotone: sorting z sorts the indices.
    order = np.argsort(z, kind="stable")
    assert np.all(np.diff(k[order]) >= 0)
    # Round trip: the grid values map back to their own indices.
    _, k2 = round_to_levels(jnp.asarray(z_hat), levels)
    np.testing.assert_array_equal(np.asarray(k2).astype(np.int64), k)


@settings(max_examples=15, deadline=None)
@given(
    variant=st.sampled_from([vs for vs in VARIANTS if vs[0] != "none"]),
    levels=st.sampled_from([3, 4, 7, 16]),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-100, 100),
)
def test_module_properties(variant, levels, scale, offset):
    q = Quantizer(QuantizerConfig(dim=DIM, levels=levels, bound=variant[0], scaling=variant[1]))
    x = jax.random.normal(jax.random.key(3), (3, 4, DIM)) * scale + offset
    v = q.init(jax.random.key(1), x)
    out, _ = q.apply(v, x, MASK, train=True, mutable=["batch_stats"])
    codes = np.asarray(out.codes).astype(np.int64)
    assert codes.min() >= 0 and codes.max() <= levels - 1
    np.testing.assert_array_equal(np.asarray(out.y), np.asarray(q.apply(v, out.codes, method="decode")))
    hist = np.asarray(out.stats["histogram"])
    assert hist.shape == (levels,) and abs(hist.sum() - 1) < 1e-5
    assert 0 <= float(out.stats["entropy_bits"]) <= math.log2(levels) + 1e-5
    assert np.isfinite(float(out.loss)) and float(out.loss) >= 0


# ---------------------------------------------------------------------------------------------------
# Pure pieces against the official formulas (numpy, float64)


def test_linear_scale_matches_official_formula():
    rng = np.random.default_rng(0)
    u = (rng.standard_normal((3, 5, DIM)) * 2 + 0.5).astype(np.float32)
    u[0, 0, 0] = 40.0  # force a clip
    mean, std = moments(jnp.asarray(u))
    mu, sd = u.astype(np.float64).mean(), u.astype(np.float64).std(ddof=1)
    # float32 sums of 120 values against float64 (tests/tolerances.py); the std adds a second reduction.
    np.testing.assert_allclose([float(mean), float(std)], [mu, sd], rtol=0, atol=rounding_tolerance(np.float32, u.size, 2, np.abs(u).max()))
    z, clipped = linear_scale(jnp.asarray(u), mean, std)
    lo, hi = mu - 3 * sd, mu + 3 * sd
    ref = 2 * (np.clip(u, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1
    np.testing.assert_allclose(np.asarray(z), ref, rtol=0, atol=rounding_tolerance(np.float32, u.size, 3, 1.0) / (hi - lo))
    np.testing.assert_array_equal(np.asarray(clipped), (u < lo) | (u > hi))
    assert bool(clipped[0, 0, 0]) and float(z[0, 0, 0]) == 1.0


def test_masked_moments_ignore_padding():
    u = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, DIM)), jnp.float32)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    mean, std = moments(u, mask)
    kept = np.asarray(u)[np.asarray(mask, bool)]
    np.testing.assert_allclose([float(mean), float(std)], [kept.mean(), kept.std(ddof=1)], rtol=0,
                               atol=rounding_tolerance(np.float32, kept.size, 2, np.abs(kept).max()))


def test_cosine_distortion_formula_and_gradient_path():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((6, DIM)).astype(np.float32)
    zq = rng.standard_normal((6, DIM)).astype(np.float32)
    ref = np.mean(1 - (z * zq).sum(-1) / (np.linalg.norm(z, axis=-1) * np.linalg.norm(zq, axis=-1) + 1e-3))
    tol = rounding_tolerance(np.float32, DIM, 3, 1.0)  # dot and norms over DIM, then the mean over rows
    np.testing.assert_allclose(float(cosine_distortion(jnp.asarray(z), jnp.asarray(zq))), ref, rtol=0, atol=tol)
    # Only z is differentiated: the quantized argument is behind stop_gradient.
    g = jax.grad(lambda b: cosine_distortion(jnp.asarray(z), b))(jnp.asarray(zq))
    assert float(jnp.abs(g).max()) == 0.0
    mask = jnp.array([1, 1, 1, 0, 0, 0])
    ref_masked = np.mean((1 - (z * zq).sum(-1) / (np.linalg.norm(z, axis=-1) * np.linalg.norm(zq, axis=-1) + 1e-3))[:3])
    np.testing.assert_allclose(float(cosine_distortion(jnp.asarray(z), jnp.asarray(zq), mask)), ref_masked, rtol=0, atol=tol)


@pytest.mark.parametrize("levels", [3, 4, 5, 8])
def test_tanh_bound_reproduces_canonical_fsq(levels):
    u = np.linspace(-4, 4, 401).astype(np.float32)
    h, o = (levels - 1) / 2, ((levels - 1) % 2) / 2
    half_l = h * (1 + 1e-3)
    s = np.tanh(u.astype(np.float64) + np.arctanh(o / half_l)) * half_l - o
    k_ref = np.round(s) + levels // 2
    _, k = round_to_levels(tanh_bound(jnp.asarray(u), levels), levels)
    np.testing.assert_array_equal(np.asarray(k), k_ref)
    # u = 0 sits on a level (the point of the atanh shift), and both ends are reachable.
    assert int(round_to_levels(tanh_bound(jnp.zeros(()), levels), levels)[1]) == levels // 2
    assert set(np.asarray(k).tolist()) == set(range(levels))


def test_code_stats_histogram_and_entropy():
    k = jnp.array([[[0, 1], [1, 1]], [[3, 3], [2, 0]]], jnp.uint8)
    mask = jnp.array([[1, 1], [1, 0]])
    s = code_stats(k, 4, mask)
    np.testing.assert_allclose(np.asarray(s["histogram"]), [1 / 6, 3 / 6, 0, 2 / 6], rtol=1e-6)
    p = np.array([1, 3, 2]) / 6
    np.testing.assert_allclose(float(s["entropy_bits"]), -(p * np.log2(p)).sum(), rtol=1e-6)
    assert float(code_stats(jnp.zeros((4, 2), jnp.uint8), 4)["entropy_bits"]) == 0.0


@settings(max_examples=30, deadline=None)
@given(levels=st.integers(2, 40), rows=st.integers(1, 6), dim=st.integers(1, 9), seed=st.integers(0, 2**16),
       masked=st.booleans())
def test_code_stats_counts_equal_a_numpy_histogram(levels, rows, dim, seed, masked):
    """Both counting paths (comparisons up to ONE_HOT_COUNT_MAX_LEVELS, bincount beyond) give the exact
    weighted histogram; the masked rows' indices do not count."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, levels, (2, rows, dim)).astype(np.uint8)
    mask = rng.integers(0, 2, (2, rows)) if masked else np.ones((2, rows), np.int64)
    s = code_stats(jnp.asarray(k), levels, jnp.asarray(mask) if masked else None)
    counts = np.bincount(k[mask.astype(bool)].reshape(-1), minlength=levels).astype(np.float64)
    expected = counts / max(counts.sum(), 1.0)
    # Counts below 2^24 are exact in float32; the division rounds once.
    np.testing.assert_allclose(np.asarray(s["histogram"]), expected, rtol=2 ** -23, atol=0)


def test_code_stats_of_a_scalar_and_of_every_level_count():
    assert float(code_stats(jnp.uint8(3), 4)["histogram"][3]) == 1.0
    k = jnp.arange(32, dtype=jnp.uint8).reshape(4, 8)
    np.testing.assert_array_equal(np.asarray(code_stats(k, 32)["histogram"]), np.full(32, 1 / 32, np.float32))


# ---------------------------------------------------------------------------------------------------
# The module


def _make(bound="linear", scaling="batch", levels=5, dtype=jnp.float32, **kw):
    cfg = QuantizerConfig(dim=DIM, levels=levels, scaling=scaling, bound=bound, dtype=dtype, **kw)
    q = Quantizer(cfg)
    x = jax.random.normal(jax.random.key(0), (3, 4, DIM)) * 2.0 + 0.3
    variables = q.init(jax.random.key(1), x)
    return q, variables, x


MASK = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def test_init_matches_official_model():
    q = Quantizer(QuantizerConfig(dim=64))
    v = q.init(jax.random.key(0), jnp.zeros((1, 2, 64)))
    for name in ("in_proj", "out_proj"):
        kernel, bias = v["params"][name]["kernel"], v["params"][name]["bias"]
        assert kernel.shape == (64, 64) and abs(float(kernel.std()) - 0.02) < 0.002
        assert float(jnp.abs(bias).max()) == 0.0
    assert "batch_stats" not in v
    v_none = Quantizer(QuantizerConfig(dim=64, bound="none")).init(jax.random.key(0), jnp.zeros((1, 2, 64)))
    assert v_none == {}


@pytest.mark.parametrize("bound,scaling", VARIANTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_of_encode_equals_fused_forward(bound, scaling, dtype):
    q, v, x = _make(bound, scaling, dtype=dtype)
    x = x.astype(dtype)
    for train in (False, True):
        out, _ = q.apply(v, x, MASK, train=train, mutable=["batch_stats"])
        enc, _ = q.apply(v, x, MASK, train=train, method="encode", mutable=["batch_stats"])
        y = q.apply(v, enc.codes, method="decode")
        np.testing.assert_array_equal(np.asarray(out.codes), np.asarray(enc.codes))
        np.testing.assert_array_equal(np.asarray(out.y, np.float32), np.asarray(y, np.float32))
        assert out.y.dtype == dtype and out.y.shape == x.shape
        if bound == "none":
            assert enc.codes.dtype == jnp.float16
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(jnp.float16).astype(dtype)))
        else:
            codes = np.asarray(enc.codes)
            assert enc.codes.dtype == jnp.uint8 and codes.min() >= 0 and codes.max() <= 4
            assert enc.z.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(round_to_levels(enc.z, 5)[1]), codes)


def test_split_parties_need_only_their_own_parameters():
    q, v, x = _make()
    client = {"params": {"in_proj": v["params"]["in_proj"]}}
    server = {"params": {"out_proj": v["params"]["out_proj"]}}
    enc = q.apply(client, x, method="encode")
    y = q.apply(server, enc.codes, method="decode")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(q.apply(v, x).y))


def _task_loss(y):
    # Any smooth downstream loss stands in for the LLM's cross-entropy.
    return jnp.mean(jnp.sin(y) * jnp.cos(3 * y)) + jnp.mean(y**2)


@pytest.mark.parametrize("scaling", ["batch", "ema"])
def test_split_vjp_equals_fused_gradients(scaling):
    q, v, x = _make("linear", scaling, levels=4)
    params, state = v["params"], {k: val for k, val in v.items() if k != "params"}

    def fused(p):
        out, new_state = q.apply({"params": p, **state}, x, MASK, train=True, mutable=["batch_stats"])
        return _task_loss(out.y) + out.loss, new_state

    g_fused, fused_state = jax.grad(fused, has_aux=True)(params)

    # Client: encode, keep the VJP of (z, regulariser) w.r.t. its own parameters.
    def client(p_in):
        enc, new_state = q.apply({"params": {"in_proj": p_in}, **state}, x, MASK, train=True,
                                 method="encode", mutable=["batch_stats"])
        return (enc.z, enc.loss), (enc.codes, new_state)

    (z, _), client_vjp, (codes, client_state) = jax.vjp(client, params["in_proj"], has_aux=True)

    # Server: from the indices alone; gradient w.r.t. its parameters and the dequantized values.
    z_hat = dequantize(codes, 4)

    def server(p_out, z_hat):
        return _task_loss(q.apply({"params": {"out_proj": p_out}}, z_hat, method="project_out"))

    g_out, g_zhat = jax.grad(server, argnums=(0, 1))(params["out_proj"], z_hat)

    # Client again: the server's gradient is z's cotangent (STE); the regulariser's cotangent is 1.
    (g_in,) = client_vjp((g_zhat, jnp.ones(())))

    for name, g in (("in_proj", g_in), ("out_proj", g_out)):
        # Two differently ordered programs (tests/tolerances.py): projections of width DIM, statistics
        # and the loss over the 3*4 rows.
        tol = rounding_tolerance(np.float32, 3 * 4 * DIM, 4, float(jnp.abs(g_fused[name]["kernel"]).max()))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=tol), g, g_fused[name])
        assert float(jnp.abs(g["kernel"]).max()) > 0
    jax.tree.map(np.testing.assert_array_equal, client_state, fused_state)


def test_ema_statistics_update_and_freeze():
    q, v, x = _make("linear", "ema", ema_momentum=0.9)
    x2 = x * 3.0 - 1.0
    state = v["batch_stats"]
    assert int(state["count"]) == 0
    u = [q.apply(v, xx, method=lambda m, a: m.in_proj(a)) for xx in (x, x2)]
    (m1, s1), (m2, s2) = moments(u[0], MASK), moments(u[1], MASK)
    _, upd = q.apply({"params": v["params"], "batch_stats": state}, x, MASK, train=True, mutable=["batch_stats"])
    state = upd["batch_stats"]
    np.testing.assert_allclose([float(state["mean"]), float(state["var"])], [float(m1), float(s1) ** 2], rtol=1e-6)
    _, upd = q.apply({"params": v["params"], "batch_stats": state}, x2, MASK, train=True, mutable=["batch_stats"])
    state = upd["batch_stats"]
    assert int(state["count"]) == 2
    np.testing.assert_allclose(float(state["mean"]), 0.9 * float(m1) + 0.1 * float(m2), rtol=1e-5)
    np.testing.assert_allclose(float(state["var"]), 0.9 * float(s1) ** 2 + 0.1 * float(s2) ** 2, rtol=1e-5)
    # Evaluation reads the running statistics and changes nothing.
    _, after_eval = q.apply({"params": v["params"], "batch_stats": state}, x2, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, after_eval["batch_stats"], state)


def test_ema_eval_codes_do_not_depend_on_the_batch():
    q, v, x = _make("linear", "ema")
    _, upd = q.apply(v, x, MASK, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], **upd}
    # The same sample in two batches (same shape, other mates at very different scales).
    others = jax.random.normal(jax.random.key(7), x.shape) * 50.0 - 20.0
    batch_b = jnp.stack([others[0], x[0], others[1]])
    a = q.apply(v, x, method="encode").codes[0]
    b = q.apply(v, batch_b, method="encode").codes[1]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Contrast: the paper's batch statistics do change a sample's codes with its batch mates.
    qb, vb, _ = _make("linear", "batch")
    a = qb.apply(vb, x, method="encode").codes[0]
    b = qb.apply(vb, batch_b, method="encode").codes[1]
    assert np.any(np.asarray(a) != np.asarray(b))


@pytest.mark.parametrize("bound,scaling", [("linear", "ema"), ("linear", "token")])
def test_padding_does_not_enter_non_paper_statistics(bound, scaling):
    q, v, x = _make(bound, scaling)
    noisy = jnp.where(MASK[..., None] == 1, x, 1e3)
    for train in (True, False):
        a, _ = q.apply(v, x, MASK, train=train, method="encode", mutable=["batch_stats"])
        b, _ = q.apply(v, noisy, MASK, train=train, method="encode", mutable=["batch_stats"])
        keep = np.asarray(MASK, bool)
        np.testing.assert_array_equal(np.asarray(a.codes)[keep], np.asarray(b.codes)[keep])
        np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-6)
        for key in ("histogram", "entropy_bits", "clip_rate"):
            np.testing.assert_allclose(np.asarray(a.stats[key]), np.asarray(b.stats[key]), rtol=1e-6)


def test_paper_scaling_includes_padding_like_the_official_code():
    q, v, x = _make("linear", "batch")
    noisy = jnp.where(MASK[..., None] == 1, x, 1e3)
    a = q.apply(v, x, MASK, method="encode")
    b = q.apply(v, noisy, MASK, method="encode")
    keep = np.asarray(MASK, bool)
    assert np.any(np.asarray(a.codes)[keep] != np.asarray(b.codes)[keep])
    # Statistics over the whole tensor: the codes equal those computed without any mask.
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(q.apply(v, x, method="encode").codes))


def test_stats_match_numpy():
    q, v, x = _make("linear", "batch", levels=4)
    enc = q.apply(v, x, MASK, method="encode")
    codes = np.asarray(enc.codes)[np.asarray(MASK, bool)]
    hist = np.bincount(codes.ravel(), minlength=4) / codes.size
    np.testing.assert_allclose(np.asarray(enc.stats["histogram"]), hist, rtol=1e-6)
    p = hist[hist > 0]
    np.testing.assert_allclose(float(enc.stats["entropy_bits"]), -(p * np.log2(p)).sum(), rtol=1e-5)
    u = np.asarray(q.apply(v, x, method=lambda m, a: m.in_proj(a)), np.float64)
    lo, hi = u.mean() - 3 * u.std(ddof=1), u.mean() + 3 * u.std(ddof=1)
    clip = ((u < lo) | (u > hi))[np.asarray(MASK, bool)].mean()
    np.testing.assert_allclose(float(enc.stats["clip_rate"]), clip, atol=1e-7)
    z_hat = np.asarray(dequantize(enc.codes, 4))
    np.testing.assert_allclose(float(enc.loss), 0.25 * float(cosine_distortion(enc.z, z_hat)), rtol=1e-6)


def test_none_bound_is_fp16_passthrough_with_identity_gradient():
    q, v, x = _make("none")
    out = q.apply(v, x)
    np.testing.assert_array_equal(np.asarray(out.y), np.asarray(x.astype(jnp.float16).astype(jnp.float32)))
    assert float(out.loss) == 0.0
    g = jax.grad(lambda a: jnp.sum(q.apply(v, a).y * 2.0))(x)
    np.testing.assert_array_equal(np.asarray(g), 2.0)


def test_jit_vmap_and_grad():
    q, v, x = _make("linear", "batch")
    eager = q.apply(v, x, MASK)
    jitted = jax.jit(lambda v, x, m: q.apply(v, x, m))(v, x, MASK)
    np.testing.assert_array_equal(np.asarray(eager.codes), np.asarray(jitted.codes))
    # Same codes; jit may fuse the projections differently (tests/tolerances.py).
    tol = rounding_tolerance(np.float32, DIM, 2, float(jnp.abs(eager.y).max()))
    np.testing.assert_allclose(np.asarray(eager.y), np.asarray(jitted.y), rtol=0, atol=tol)
    # vmap over independent batches equals applying each batch on its own (statistics per batch).
    xs = jnp.stack([x, x * 2 + 1])
    mapped = jax.vmap(lambda xb: q.apply(v, xb).codes)(xs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(mapped[i]), np.asarray(q.apply(v, xs[i]).codes))
    grads = jax.grad(lambda p: _task_loss(q.apply({"params": p}, x).y))(v["params"])
    for name in ("in_proj", "out_proj"):
        assert np.all(np.isfinite(np.asarray(grads[name]["kernel"])))
        assert float(jnp.abs(grads[name]["kernel"]).max()) > 0


@pytest.mark.parametrize("bound,scaling", [vs for vs in VARIANTS if vs[0] != "none"])
@pytest.mark.parametrize("levels", [3, 300])
def test_indices_in_range_for_extreme_inputs(bound, scaling, levels):
    q, v, _ = _make(bound, scaling, levels=levels)
    x = jnp.concatenate([jnp.full((1, 4, DIM), 1e4), jnp.full((1, 4, DIM), -1e4), jnp.zeros((1, 4, DIM))])
    for train in (True, False):
        enc, _ = q.apply(v, x, train=train, method="encode", mutable=["batch_stats"])
        codes = np.asarray(enc.codes).astype(np.int64)
        assert codes.min() >= 0 and codes.max() <= levels - 1
        assert enc.codes.dtype == (jnp.uint8 if levels <= 256 else jnp.uint16)


def test_bad_config_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="scaling"):
        QuantizerConfig(dim=4, scaling="minmax")
    with pytest.raises(ValueError, match="bound"):
        QuantizerConfig(dim=4, bound="sigmoid")
    with pytest.raises(ValueError, match="levels=2"):
        QuantizerConfig(dim=4, levels=2, bound="tanh")
    with pytest.raises(ValueError, match="levels"):
        QuantizerConfig(dim=4, levels=1)
    with pytest.raises(ValueError, match="dim"):
        QuantizerConfig(dim=0)
    with pytest.raises(ValueError, match="dist_weight"):
        QuantizerConfig(dim=4, dist_weight=-1.0)
    q, v, x = _make()
    with pytest.raises(ValueError, match="features"):
        q.apply(v, jnp.zeros((2, DIM + 1)))
    with pytest.raises(ValueError, match="mask shape"):
        q.apply(v, x, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="integer level indices"):
        q.apply(v, jnp.zeros((2, DIM)), method="decode")
    qe, ve, _ = _make("linear", "ema")
    with pytest.raises(ValueError, match="batch_stats"):
        qe.apply({"params": ve["params"]}, x, method="encode")


def test_every_level_is_reachable():
    z = jnp.linspace(-1, 1, 1200)
    for levels in (2, 3, 4, 5, 8, 300):
        _, k = round_to_levels(z, levels)
        assert sorted(set(np.asarray(k).tolist())) == list(range(levels))


# ---------------------------------------------------------------------------------------------------
# init='identity': quantizers added to a model trained without them


def _rounded(x: np.ndarray, levels: int, clip_sigma: float) -> np.ndarray:
    """q(x): the grid value of x/clip_sigma (clipped to [-1, 1]) rounded to ``levels`` levels."""
    return np.asarray(round_to_levels(jnp.asarray(np.clip(x / clip_sigma, -1, 1), jnp.float32), levels)[0], np.float64)


def _gaussian_moments(levels: int, clip_sigma: float, n: int = 2_000_000, seed: int = 0):
    """Monte Carlo E[X q] and E[q^2] for X ~ N(0, 1), with their standard errors."""
    x = np.random.default_rng(seed).normal(size=n)
    q = _rounded(x, levels, clip_sigma)
    return (x * q).mean(), (x * q).std() / math.sqrt(n), (q * q).mean(), (q * q).std() / math.sqrt(n)


def test_decoder_gain_is_the_least_squares_gain_of_gaussian_features():
    assert decoder_gain(2) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-12)  # E|X|: q = sign(X)
    for levels, clip_sigma in ((3, 3.0), (4, 3.0), (8, 3.0), (16, 2.0)):
        xq, xq_se, qq, qq_se = _gaussian_moments(levels, clip_sigma)
        # The ratio's error from the two Monte Carlo means, 6 standard errors each.
        bound = 6 * (xq_se / qq + xq * qq_se / qq ** 2)
        assert abs(decoder_gain(levels, clip_sigma) - xq / qq) < bound
    gains = [decoder_gain(v) for v in (2, 3, 4, 8, 16, 32, 256, 4096)]
    assert gains == sorted(gains)  # finer grids use their end levels more, up to the clip width
    assert 2.99 < gains[-1] < 3.01


@pytest.mark.parametrize("levels", [2, 4, 32, 256])
def test_identity_init_reconstructs_features_up_to_the_rounding(levels):
    mean, std = 0.3, 0.7
    cfg = QuantizerConfig(dim=DIM, levels=levels, init="identity", init_mean=mean, init_std=std)
    x = mean + std * jax.random.normal(jax.random.key(0), (64, 16, DIM))
    q = Quantizer(cfg)
    v = q.init(jax.random.key(1), x)
    p = v["params"]
    gain = decoder_gain(levels) * std
    np.testing.assert_array_equal(np.asarray(p["in_proj"]["kernel"]), np.eye(DIM, dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(p["in_proj"]["bias"]), 0.0)
    np.testing.assert_allclose(np.asarray(p["out_proj"]["kernel"]), gain * np.eye(DIM), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p["out_proj"]["bias"]), mean, rtol=1e-6)
    out = q.apply(v, x)
    # The server's reconstruction is the calibrated decoder of the codes: gain·grid value + mean.
    expected = gain * np.asarray(dequantize(out.codes, levels), np.float64) + mean
    np.testing.assert_allclose(np.asarray(out.y), expected, atol=rounding_tolerance(np.float32, 1, scale=3.0))
    # So its error is the rounding's: E[(X - g q)^2] in stds for Gaussian features (2 % at 256 levels). Both
    # sides are sample means (this batch's 8192 values; 400k reference draws): 10 % apart at most.
    ref = np.random.default_rng(1).normal(size=400_000)
    theory = math.sqrt(np.mean((ref - decoder_gain(levels) * _rounded(ref, levels, 3.0)) ** 2))
    rel = float(jnp.sqrt(jnp.mean(jnp.square(out.y - x)))) / std
    assert abs(rel - theory) < 0.1 * theory, (rel, theory)
    assert float(out.stats["feature_mean"]) == pytest.approx(float(jnp.mean(x)), abs=1e-5)


def test_feature_moments_are_taken_over_the_paper_rows():
    x = jax.random.normal(jax.random.key(0), (3, 4, DIM)) * 2.0 + 1.0
    rows = MASK.astype(bool)
    for bound in ("linear", "none"):
        q = Quantizer(QuantizerConfig(dim=DIM, bound=bound))
        v = q.init(jax.random.key(1), x)
        enc = q.apply(v, x, MASK, stat_mask=MASK, method="encode")
        kept = np.asarray(x, np.float64)[np.asarray(rows)]
        np.testing.assert_allclose(float(enc.stats["feature_mean"]), kept.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(enc.stats["feature_std"]), kept.std(ddof=1), rtol=1e-5)


def test_identity_init_rejects_what_it_cannot_invert():
    for kwargs, match in (
        (dict(bound="none"), "init='identity' needs bound='linear'"),
        (dict(bound="tanh"), "init='identity' needs bound='linear'"),
        (dict(scaling="token"), "init='identity' needs bound='linear' with scaling 'batch' or 'ema'"),
        (dict(init_std=0.0), "init_std > 0"),
        (dict(init_mean=float("nan")), "finite init_mean"),
    ):
        with pytest.raises(ValueError, match=match):
            QuantizerConfig(dim=DIM, init="identity", **kwargs)
    with pytest.raises(ValueError, match=r"QuantizerConfig.init='eye': use one of \('normal', 'identity'\)"):
        QuantizerConfig(dim=DIM, init="eye")


def test_builder_calibrates_each_modality():
    from configs import common
    from qtl_jax.models import builder

    base = builder.tinyllava_config(common.tiny_model(), vocab_size=64)
    section = dict(levels=8, init="identity", init_image_mean=0.5, init_image_std=2.0, init_text_mean=0.0,
                   init_text_std=0.25)
    qc = builder.quantized_config(base, section)
    assert (qc.image_quantizer.init_mean, qc.image_quantizer.init_std) == (0.5, 2.0)
    assert (qc.text_quantizer.init_mean, qc.text_quantizer.init_std) == (0.0, 0.25)
    assert qc.image_quantizer.levels == qc.text_quantizer.levels == 8
    with pytest.raises(ValueError, match="the calibration is per modality"):
        builder.quantized_config(base, dict(init="identity", init_std=1.0))
    with pytest.raises(ValueError, match="the text quantizer: .*init_std > 0"):
        builder.quantized_config(base, dict(section, init_text_std=-1.0))
