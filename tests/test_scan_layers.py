"""``scan_layers``: identical layers as one ``jax.lax.scan`` compute the unrolled model's function, values and
gradients, from the same parameter tree (qtl_jax.models.scan)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.models import scan as layer_scan
from qtl_jax.models.decoder import Decoder, DecoderConfig
from qtl_jax.models.vision import VisionConfig, VisionTower
from tolerances import layers_tolerance

VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      image_size=16, patch_size=4)
LLAMA = DecoderConfig.make(family="llama", vocab_size=32, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2,
                           intermediate_size=24, head_dim=4)


def _close(ours, reference, *, width, layers):
    # One scale for the whole tree: some gradients are sums that cancel to ~0 (a key bias's, under softmax's
    # shift invariance), so their rounding error is that of the terms, not of the result.
    scale = max(float(np.max(np.abs(np.asarray(leaf)))) for leaf in jax.tree.leaves(reference))
    tol = layers_tolerance(np.array([scale]), width=width, layers=layers)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol)


@pytest.mark.parametrize("remat", [False, True])
def test_vision_tower_scan_matches_unrolled(remat):
    pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    unrolled = VisionTower(VISION, remat=remat)
    scanned = VisionTower(VISION, remat=remat, scan_layers=True)
    params = unrolled.init(jax.random.key(0), pixels)["params"]
    # The option does not change the parameter tree (checkpoints and key maps stay as they are).
    scanned_params = scanned.init(jax.random.key(0), pixels)["params"]
    assert jax.tree.structure(scanned_params) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, scanned_params, params)

    def loss(model, p):
        hidden, last = model.apply({"params": p}, pixels)
        return jnp.sum(hidden[-2] ** 2) + jnp.sum(last), (hidden, last)

    (l_ref, out_ref), g_ref = jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True)(params)
    (l_scan, out_scan), g_scan = jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True)(params)
    assert len(out_scan[0]) == VISION.num_hidden_layers + 1
    width = max(VISION.intermediate_size, VISION.num_patches)
    _close(out_scan, out_ref, width=width, layers=VISION.num_hidden_layers)
    # The backward pass chains the forward's reductions and its own.
    _close(g_scan, g_ref, width=width, layers=2 * VISION.num_hidden_layers + 2)


@pytest.mark.parametrize("remat", [False, True])
def test_uniform_decoder_scan_matches_unrolled(remat):
    unrolled = Decoder(dataclasses.replace(LLAMA, remat=remat))
    scanned = Decoder(dataclasses.replace(LLAMA, remat=remat, scan_layers=True))
    assert scanned.config.scans_layers
    x = jax.random.normal(jax.random.key(2), (2, 7, LLAMA.hidden_size))
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2], jnp.int32)
    params = unrolled.init(jax.random.key(0), x, mask)["params"]
    assert jax.tree.structure(scanned.init(jax.random.key(0), x, mask)["params"]) == jax.tree.structure(params)

    def loss(model, p, x):
        logits = model.apply({"params": p}, x, mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

    (_, ref), g_ref = jax.value_and_grad(lambda p, x: loss(unrolled, p, x), argnums=(0, 1), has_aux=True)(params, x)
    (_, ours), g_ours = jax.value_and_grad(lambda p, x: loss(scanned, p, x), argnums=(0, 1), has_aux=True)(params, x)
    width = max(*LLAMA.intermediate_size, LLAMA.vocab_size)
    _close(ours, ref, width=width, layers=LLAMA.num_layers + 1)
    _close(g_ours, g_ref, width=width, layers=2 * LLAMA.num_layers + 4)


def test_openelm_shaped_decoder_stays_unrolled():
    # Per-layer head counts and FFN widths differ: the layers cannot share one scanned body.
    cfg = DecoderConfig.make(family="openelm", vocab_size=32, hidden_size=16, num_layers=2, num_heads=(2, 4),
                             num_kv_heads=(1, 2), intermediate_size=(16, 32), head_dim=4, qk_norm="rms",
                             scan_layers=True)
    assert not cfg.scans_layers
    assert dataclasses.replace(LLAMA, scan_layers=True).scans_layers
    assert not LLAMA.scans_layers


def test_missing_layer_params_is_a_clear_error():
    with pytest.raises(KeyError, match=r"layers_1"):
        layer_scan.layer_params({"layers_0": {}, "layers_2": {}}, 3)

