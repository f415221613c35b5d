"""The downlink's quantizer (qtl_jax.split.downlink): unbiased stochastic rounding within a derived
statistical bound, the per-element error bound, error feedback and top-k, the key's determinism, the
config keys. Small host arrays; the wire round trip of the messages is in tests/test_wire.py."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.split import downlink as dl

EPS32 = float(np.finfo(np.float32).eps)


def gradients(seed: int, shape, heavy: bool) -> np.ndarray:
    """Gaussian, or heavy-tailed (Student t, 2 dof) as activation gradients are; a few exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(2, size=shape) if heavy else rng.normal(size=shape)
    x = x * 10.0 ** rng.uniform(-8, 2)
    x[rng.random(shape) < 0.1] = 0
    return x.astype(np.float32)


def group_max(x: np.ndarray, rows: np.ndarray, scale: str) -> np.ndarray:
    """max |x| of each element's scale group (its token, or its channel over the real rows), broadcast."""
    x = np.where(rows[..., None], np.abs(x), 0)
    if scale == "token":
        return np.broadcast_to(x.max(axis=-1, keepdims=True), x.shape)
    return np.broadcast_to(x.reshape(-1, x.shape[-1]).max(axis=0), x.shape)


@functools.lru_cache(maxsize=None)
def quantize_fn(spec: dl.DownlinkSpec, draws: bool = False):
    """One jitted quantizer per spec (x, rows and keys are arguments): hypothesis examples reuse the program
    instead of compiling one per example."""
    fn = functools.partial(dl.quantize, spec)
    return jax.jit(jax.vmap(fn, in_axes=(None, None, 0)) if draws else fn)


@given(seed=st.integers(0, 2**20), bits=st.integers(2, 8), scale=st.sampled_from(dl.SCALES), heavy=st.booleans())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stochastic_rounding_is_unbiased(seed, bits, scale, heavy):
    """The mean of N independent draws is within Hoeffding's bound of x: each draw lies in
    {floor(y), floor(y) + 1}·step (a range of one step), so P(|mean - x| >= t) <= 2 exp(-2 N t^2 / step^2);
    with a union bound over the n elements at failure probability 1e-6, t = step·sqrt(ln(2n/1e-6) / 2N).
    Float32 rounding of x/step and of (index - m)·step adds at most a few eps of the group's max |x|."""
    spec = dl.DownlinkSpec("quantized", bits=bits, scale=scale)
    x = gradients(seed, (2, 5, 16), heavy)
    rows = np.array([[True] * 5, [True, True, False, True, False]])
    draws = 4000
    keys = jax.random.split(jax.random.key(seed), draws)
    _, step, values = quantize_fn(spec, draws=True)(x, rows, keys)
    mean = np.asarray(values, np.float64).mean(axis=0)
    step = np.asarray(step[0], np.float64)
    step = step[..., None] if scale == "token" else step
    n = x.size
    t = step * math.sqrt(math.log(2 * n / 1e-6) / (2 * draws)) + 4 * EPS32 * group_max(x, rows, scale)
    want = np.where(rows[..., None], x, 0)
    assert np.all(np.abs(mean - want) <= t), float(np.max(np.abs(mean - want) - t))
    # And each draw is a real random variable: the draws differ wherever x is not on the grid.
    assert np.any(np.asarray(values[0]) != np.asarray(values[1]))


@given(seed=st.integers(0, 2**20), bits=st.integers(2, 8), scale=st.sampled_from(dl.SCALES), heavy=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_error_is_below_one_step(seed, bits, scale, heavy):
    """|(index - m)·step - x| < step, plus float32 rounding (a few eps of the group's max |x|); indices in
    [0, 2m]; zero rows come back exactly zero; the client's expand gives the server's values bit for bit."""
    spec = dl.DownlinkSpec("quantized", bits=bits, scale=scale)
    x = gradients(seed, (3, 4, 24), heavy)
    rows = np.random.default_rng(seed).random((3, 4)) < 0.8
    index, step, values = quantize_fn(spec)(x, rows, jax.random.key(seed))
    index, step, values = np.asarray(index), np.asarray(step), np.asarray(values)
    assert index.dtype == np.uint8 and index.max() <= 2 * spec.half_levels
    wide = step[..., None] if scale == "token" else step
    bound = wide * (1 + 4 * EPS32) + 4 * EPS32 * group_max(x, rows, scale)
    assert np.all(np.abs(values - np.where(rows[..., None], x, 0)) <= bound)
    assert not np.any(values[~rows]) and np.all(index[~rows] == spec.half_levels)
    message = dl.QuantizedDownlink(index, step, index, step, half_levels=spec.half_levels)
    np.testing.assert_array_equal(np.asarray(dl.expand(message).image_grad), values)


def uplink(b=2, t=6, t_img=3, d=8):
    attention = np.ones((b, t), np.uint8)
    attention[1, 4:] = 0
    image_mask = np.zeros((b, t), np.uint8)
    image_mask[0, 1] = 1
    return Uplink(np.zeros((b, t_img, d), np.uint8), np.zeros((b, t, d), np.uint8), attention, image_mask,
                  np.array([1, 0], np.uint8), np.zeros((b, t), np.int32), 4, 4)


def real_grads(up, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=np.shape(up.image_codes)).astype(np.float32) * np.asarray(up.image_valid)[:, None, None]
    text = rng.normal(size=np.shape(up.text_codes)).astype(np.float32) * up.text_positions()[..., None]
    return Downlink(image, text)


def test_error_feedback_carries_the_residual_to_the_next_step():
    """e' = (g + e) - ĝ at the step's real positions (0 elsewhere); the next step quantizes g + e'."""
    up = uplink()
    spec = dl.DownlinkSpec("quantized", bits=2, error_feedback=True)
    residual = dl.initial_residual(spec, 2, 3, 6, 8)[dl.RESIDUAL_KEY]["0"]
    g1, g2 = real_grads(up, 1), real_grads(up, 2)
    m1, r1 = dl.compress(spec, g1, up, residual, dl.step_key(0, 0, 0))
    sent1 = dl.expand(m1)
    text_rows = up.text_positions()[..., None]
    np.testing.assert_allclose(np.asarray(r1["text"]), np.where(text_rows, g1.text_grad - np.asarray(sent1.text_grad), 0),
                               atol=4 * EPS32 * np.abs(g1.text_grad).max())
    assert not np.any(np.asarray(r1["image"])[1])  # sample 1 has no image: nothing kept for it
    # Step 2 quantizes g2 + r1: the same as compressing that sum without feedback, with the same key.
    m2, _ = dl.compress(spec, g2, up, r1, dl.step_key(0, 0, 1))
    plain = dl.DownlinkSpec("quantized", bits=2)
    summed = Downlink(g2.image_grad + np.asarray(r1["image"]), g2.text_grad + np.asarray(r1["text"]))
    want, _ = dl.compress(plain, summed, up, None, dl.step_key(0, 0, 1))
    for a, b in zip(jax.tree_util.tree_leaves(m2), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Over many steps the running sum of what was sent tracks the running sum of the gradients within one
    # step's error (the residual), which is what error feedback is for.
    total_g, total_sent, r = 0, 0, residual
    for i in range(30):
        g = real_grads(up, 100 + i)
        msg, r = dl.compress(spec, g, up, r, dl.step_key(0, 0, i))
        total_g = total_g + g.text_grad
        total_sent = total_sent + np.asarray(dl.expand(msg).text_grad)
    np.testing.assert_allclose(total_g - total_sent, np.asarray(r["text"]), atol=1e-4)


def test_topk_keeps_the_largest_magnitudes_of_each_token():
    up = uplink()
    spec = dl.DownlinkSpec("quantized", bits=8, topk=0.25)
    g = real_grads(up)
    values = np.asarray(dl.expand(dl.compress(spec, g, up, None, dl.step_key(0, 0, 0))[0]).text_grad)
    rows = up.text_positions()
    kept = values[rows] != 0
    assert np.all(kept.sum(axis=-1) <= 2)  # ceil(0.25 * 8) per token (a value can round to 0)
    top = np.argsort(-np.abs(g.text_grad[rows]), axis=-1)[:, :2]
    assert np.all(np.take_along_axis(np.ones_like(kept), top, -1) >= np.take_along_axis(kept, top, -1))
    assert not np.any(kept & (np.abs(g.text_grad[rows]) < np.sort(np.abs(g.text_grad[rows]), -1)[:, -2:-1]))


def test_the_key_is_a_function_of_seed_client_and_step():
    up, g = uplink(), real_grads(uplink())
    spec = dl.DownlinkSpec("quantized", bits=3)

    def sent(seed, client, step):
        return np.asarray(dl.compress(spec, g, up, None, dl.step_key(seed, client, step))[0].text_index)

    np.testing.assert_array_equal(sent(0, 0, 5), sent(0, 0, 5))
    for other in ((1, 0, 5), (0, 1, 5), (0, 0, 6)):
        assert np.any(sent(*other) != sent(0, 0, 5)), other


def test_fp32_and_bf16_messages():
    up, g = uplink(), real_grads(uplink())
    same, _ = dl.compress(dl.DownlinkSpec("fp32"), g, up, None, None)
    assert same is g
    half, _ = dl.compress(dl.DownlinkSpec("bf16"), g, up, None, None)
    assert half.text_grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dl.expand(half).text_grad),
                                  np.asarray(jnp.asarray(g.text_grad).astype(jnp.bfloat16).astype(jnp.float32)))


def split_section(**changes):
    c = ml_collections.ConfigDict(dict(downlink="quantized", downlink_bits=4, downlink_scale="token",
                                       downlink_error_feedback=False, downlink_topk=1.0, downlink_dtype=None))
    c.update(changes)
    return c


def test_config_keys_and_their_errors():
    spec = dl.DownlinkSpec.from_config(split_section(downlink_bits=2, downlink_scale="channel"), seed=3)
    assert (spec.kind, spec.bits, spec.levels, spec.half_levels, spec.scale, spec.seed) == ("quantized", 2, 3, 1,
                                                                                          "channel", 3)
    assert dl.DownlinkSpec(bits=8).levels == 255
    with pytest.raises(ValueError, match="split.downlink_dtype='bfloat16' was replaced by split.downlink"):
        dl.DownlinkSpec.from_config(split_section(downlink_dtype="bfloat16"))
    cases = [(dict(downlink="int4"), "split.downlink='int4'"), (dict(downlink_bits=9), "split.downlink_bits=9"),
             (dict(downlink_bits=1), "from 2 to 8"), (dict(downlink_scale="row"), "split.downlink_scale='row'"),
             (dict(downlink_topk=0.0), "in \\(0, 1\\]"),
             (dict(downlink="bf16", downlink_error_feedback=True), "apply to split.downlink='quantized' only")]
    for changes, match in cases:
        with pytest.raises(ValueError, match=match):
            dl.DownlinkSpec.from_config(split_section(**changes))
    with pytest.raises(ValueError, match="needs the client's residual"):
        dl.compress(dl.DownlinkSpec("quantized", error_feedback=True), real_grads(uplink()), uplink(), None,
                    dl.step_key(0, 0, 0))


@pytest.mark.parametrize("seed,client,step", [(0, 0, 0), (7, 3, 41), (2**31 - 1, 1, 2**31 - 1)])
def test_step_key_is_the_documented_fold_of_seed_client_and_step(seed, client, step):
    """The cached, compiled key equals the op-by-op fold (checkpointed runs resume with the same roundings)."""
    want = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x444C), client), step)  # 0x444C: "DL"
    got = dl.step_key(seed, client, step)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got)), np.asarray(jax.random.key_data(want)))
