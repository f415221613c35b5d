"""Privacy evaluation: metrics against references, the attacks on exact cases, the pipeline end to end."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from qtl_jax import quantizer as qlib
from qtl_jax.privacy import inversion, metrics, run, text_attack


def _skimage_ssim(a, b, data_range):
    return structural_similarity(a, b, data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


# ---------------------------------------------------------------------------------------------------
# Metrics.

def test_psnr_hand_computed():
    a = np.zeros((2, 8, 8, 3))
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    b[1, :4] = 0.5  # half the pixels off by 0.5: MSE 0.125 -> 10 log10(8)
    np.testing.assert_allclose(metrics.psnr(a, b), [20.0, 10 * np.log10(8.0)], rtol=1e-12)
    # data_range 255: the same relative error gives the same PSNR.
    np.testing.assert_allclose(metrics.psnr(a * 255, b * 255, data_range=255.0), [20.0, 10 * np.log10(8.0)], rtol=1e-12)
    assert metrics.psnr(a[0], a[0])[0] == np.inf


def test_psnr_matches_skimage():
    rng = np.random.default_rng(0)
    a = rng.random((3, 20, 24, 3))
    b = np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1)
    want = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(metrics.psnr(a, b), want, rtol=1e-12)


def test_gaussian_kernel():
    taps = metrics.gaussian_kernel(1.5)
    assert len(taps) == 11  # radius int(3.5 * 1.5 + 0.5) = 5
    np.testing.assert_allclose(taps.sum(), 1.0, rtol=1e-15)
    np.testing.assert_allclose(taps, taps[::-1])
    np.testing.assert_allclose(taps[6] / taps[5], np.exp(-0.5 / 1.5**2), rtol=1e-12)


@settings(max_examples=12, deadline=None)
@given(h=st.integers(11, 30), w=st.integers(11, 30), c=st.integers(1, 3), noise=st.floats(0.0, 0.5),
       scale=st.sampled_from([1.0, 255.0]), seed=st.integers(0, 2**16))
def test_ssim_matches_skimage(h, w, c, noise, scale, seed):
    rng = np.random.default_rng(seed)
    a = rng.random((2, h, w, c)) * scale
    b = np.clip(a + noise * scale * rng.normal(size=a.shape), 0, scale)
    want = [_skimage_ssim(a[i], b[i], scale) for i in range(2)]
    np.testing.assert_allclose(metrics.ssim(a, b, data_range=scale), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics.ssim(a, a, data_range=scale), 1.0, rtol=1e-12)
    np.testing.assert_allclose(metrics.ssim(a, b, data_range=scale), metrics.ssim(b, a, data_range=scale), rtol=1e-12)


def test_ssim_of_structured_images():
    # A smooth image against a shifted copy: large structural change, a value well inside (-1, 1).
    y, x = np.mgrid[0:32, 0:32] / 31.0
    a = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, x * y], axis=-1)
    b = np.roll(a, 3, axis=1)
    got = metrics.ssim(a, b)[0]
    np.testing.assert_allclose(got, _skimage_ssim(a, b, 1.0), rtol=1e-9)
    assert 0.0 < got < 0.99


@pytest.mark.parametrize("fn", [metrics.psnr, metrics.ssim])
def test_metrics_reject_bad_input(fn):
    a = np.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="same shape"):
        fn(a, np.zeros((1, 16, 15, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        fn(a, np.full_like(a, np.nan))
    with pytest.raises(ValueError, match="data_range"):
        fn(a, a, data_range=0.0)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        fn(np.zeros((16, 16)), np.zeros((16, 16)))


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="smaller than the 11-pixel"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


# ---------------------------------------------------------------------------------------------------
# Text attack.

@pytest.fixture(scope="module")
def table():
    return np.random.default_rng(1).normal(0.0, 0.02, size=(200, 32))


def _quantize_text(x, kernel, bias, levels):
    """The client's text quantizer (the library's own module) with a given in_proj: grid values."""
    cfg = qlib.QuantizerConfig(dim=x.shape[-1], levels=levels)
    params = {"in_proj": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    enc = qlib.Quantizer(cfg).apply({"params": params}, jnp.asarray(x, jnp.float32)[None], method="encode")
    return inversion.wire_values(np.asarray(enc.codes)[0], levels)


def test_fp16_nearest_neighbour_recovers_every_token(table):
    ids = np.random.default_rng(2).integers(0, len(table), size=500)
    received = table[ids].astype(np.float16)  # the 16-bit baseline's wire
    got = text_attack.nearest_neighbour(inversion.wire_values(received, 0), table)
    assert text_attack.token_accuracy(got, ids) == 1.0


def test_known_identity_projection_recovers_every_token(table):
    ids = np.random.default_rng(3).integers(0, len(table), size=400)
    d = table.shape[1]
    values = _quantize_text(table[ids], np.eye(d), np.zeros(d), levels=256)
    got = text_attack.known_projection_attack(values, table, np.eye(d), np.zeros(d))
    np.testing.assert_array_equal(got, ids)


def test_known_random_projection_at_few_levels(table):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, len(table), size=400)
    kernel = rng.normal(0, 0.02, (32, 32))
    bias = np.zeros(32)
    for levels in (4, 2):
        values = _quantize_text(table[ids], kernel, bias, levels=levels)
        got = text_attack.known_projection_attack(values, table, kernel, bias, np.arange(400) // 200)
        # Even 1 bit x 32 channels singles out 200 random embeddings (chance: 1/200) when the token
        # signal fills the scaling range. (A large in_proj bias would not: the scalar batch scaling then
        # spends its range on the per-channel offsets, and few levels erase the token signal.)
        assert text_attack.token_accuracy(got, ids) > 0.98, levels


def test_learned_map_recovers_tokens(table):
    rng = np.random.default_rng(5)
    kernel, bias = rng.normal(0, 0.02, (32, 32)), rng.normal(0, 0.01, 32)
    train_ids, test_ids = rng.integers(0, len(table), size=2000), rng.integers(0, len(table), size=300)
    train_v = _quantize_text(table[train_ids], kernel, bias, levels=256)
    test_v = _quantize_text(table[test_ids], kernel, bias, levels=256)
    linear = text_attack.fit_linear_map(train_v, table[train_ids], ridge=1e-6)
    np.testing.assert_array_equal(text_attack.learned_map_attack(test_v, table, linear), test_ids)


def test_fit_linear_map_is_exact_on_affine_data():
    rng = np.random.default_rng(6)
    v = rng.normal(size=(100, 5))
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    m = text_attack.fit_linear_map(v, v @ w + b, ridge=0.0)
    np.testing.assert_allclose(m.weight, w, atol=1e-10)
    np.testing.assert_allclose(m.bias, b, atol=1e-10)


def test_text_attack_rejects_bad_input(table):
    with pytest.raises(ValueError, match=r"queries must be \[N, 32\]"):
        text_attack.nearest_neighbour(np.zeros((3, 31)), table)
    with pytest.raises(ValueError, match="metric"):
        text_attack.nearest_neighbour(np.zeros((3, 32)), table, metric="cosine")
    with pytest.raises(ValueError, match="in_proj kernel"):
        text_attack.known_projection_attack(np.zeros((3, 32)), table, np.eye(31), np.zeros(31))
    with pytest.raises(ValueError, match="same rows"):
        text_attack.fit_linear_map(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="equal, non-empty"):
        text_attack.token_accuracy(np.zeros(3), np.zeros(2))


# ---------------------------------------------------------------------------------------------------
# Inversion decoder.

def test_wire_values():
    np.testing.assert_array_equal(inversion.wire_values(np.array([[0, 1, 2, 3]], np.uint8), 4),
                                  np.array([[-1.0, -1 / 3, 1 / 3, 1.0]], np.float32))
    half = np.array([0.5, -2.0], np.float16)
    np.testing.assert_array_equal(inversion.wire_values(half, 0), [0.5, -2.0])
    with pytest.raises(ValueError, match="expects float16"):
        inversion.wire_values(np.zeros(2, np.float32), 0)
    with pytest.raises(ValueError, match="integer level indices"):
        inversion.wire_values(half, 4)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        inversion.wire_values(np.array([4], np.uint8), 4)


def test_inversion_config_validation():
    with pytest.raises(ValueError, match="grid\\^2"):
        inversion.InversionConfig(num_tokens=10, dim=4, image_size=16, grid=4, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="power of two"):
        inversion.InversionConfig(num_tokens=16, dim=4, image_size=24, grid=4, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="channels needs 3"):
        inversion.InversionConfig(num_tokens=16, dim=4, image_size=16, grid=4, channels=(8, 8))


def test_decoder_learns_a_decodable_mapping():
    # Tokens of a 4x4 grid (first cell dropped, as TinyLLaVA's 'patch' strategy does) carry their cell's
    # colour plus noise channels; the decoder must learn to paint the cells, far below the mean-image
    # error. The architecture is the tiny end-to-end run's, so both tests share one compilation.
    rng = np.random.default_rng(7)
    n, g, size = 128, 4, 32
    colours = rng.random((n, g * g, 3))
    images = np.repeat(np.repeat(colours.reshape(n, g, g, 3), size // g, axis=1), size // g, axis=2)
    tokens = np.concatenate([colours, rng.normal(size=(n, g * g, 29))], axis=-1)[:, 1:]
    cfg = inversion.InversionConfig(num_tokens=15, dim=32, image_size=size, grid=g, hidden=128, channels=(32, 16, 8, 8),
                                    steps=150, batch_size=16, learning_rate=1e-2)
    trained = inversion.train_inverter(cfg, tokens, images, jax.random.key(0))
    assert trained.losses.shape == (150,) and np.all(np.isfinite(trained.losses))
    recon = inversion.reconstruct(trained, tokens, batch_size=48)
    assert recon.shape == images.shape and recon.min() >= 0 and recon.max() <= 1
    sent = np.ones((g, g), bool)
    sent[0, 0] = False  # the dropped cell's colour never crossed the wire
    pixels = np.repeat(np.repeat(sent, size // g, axis=0), size // g, axis=1)
    mse = np.mean((recon[:, pixels] - images[:, pixels]) ** 2)
    baseline = np.mean((images[:, pixels] - images[:, pixels].mean(axis=0)) ** 2)
    assert mse < 0.2 * baseline, (mse, baseline)
    with pytest.raises(ValueError, match=r"values must be \[N, 15, 32\]"):
        inversion.reconstruct(trained, tokens[:, :2])


def test_learning_rate_schedule():
    cfg = inversion.InversionConfig(num_tokens=4, dim=2, image_size=8, grid=2, channels=(4, 4, 4), steps=10,
                                    learning_rate=0.5)
    assert [inversion.learning_rate(cfg, s) for s in (0, 5, 10)] == pytest.approx([0.5, 0.25, 0.0])
    assert cfg.architecture() == dataclasses.replace(cfg, steps=7, learning_rate=3.0).architecture()


def test_train_inverter_rejects_bad_pairs():
    cfg = inversion.InversionConfig(num_tokens=4, dim=2, image_size=8, grid=2, channels=(4, 4, 4), batch_size=4)
    with pytest.raises(ValueError, match="images must be"):
        inversion.train_inverter(cfg, np.zeros((8, 4, 2)), np.zeros((8, 8, 8, 1)), jax.random.key(0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        inversion.train_inverter(cfg, np.zeros((2, 4, 2)), np.zeros((2, 8, 8, 3)), jax.random.key(0))


# ---------------------------------------------------------------------------------------------------
# The whole evaluation on the test-sized client.

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("privacy"))
    results = run.main([f"--workdir={workdir}", "--model=tiny", "--levels=4", "--n_attacker=64", "--n_victim=16",
                        "--encode_batch=8", "--steps=6", "--batch_size=16", "--grid_examples=4"])
    return workdir, results


def test_run_end_to_end(tiny_run):
    workdir, results = tiny_run
    assert set(results["settings"]) == {"fp16", "L=4"}
    for name, r in results["settings"].items():
        assert 0.0 < r["psnr"] < 60.0 and np.isfinite(r["psnr_std"]), name
        assert -1.0 < r["ssim"] < 1.0, name
        for k in ("token_accuracy_known_in_proj", "token_accuracy_learned_map"):
            assert 0.0 <= r[k] <= 1.0
        assert r["victim_text_tokens"] > 16  # every victim caption has several words
    # The 16-bit baseline sends the embeddings themselves: nearest neighbour recovers every token.
    assert results["settings"]["fp16"]["token_accuracy_known_in_proj"] == 1.0
    assert results["n_victim_images"] == 16 and results["reconstructions"]["L=4"].shape == (16, 32, 32, 3)
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["settings"]["L=4"]["psnr"] == results["settings"]["L=4"]["psnr"]
    assert "victim_images" not in saved
    table = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
    assert table.count("\n") == 5 and "| L=4 | 2 |" in table
    png = open(os.path.join(workdir, "privacy_grid.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_run_attacks_the_same_encoder_with_only_levels_changed(tiny_run):
    # The fp16 baseline and L=4 codes come from the same connector output: rounding the fp16 features'
    # in_proj image through the quantizer gives back the L=4 codes exactly.
    client = run.load_client(None, jax.random.key(0), "tiny")
    corpus = run.make_corpus(client, seed=5, n=8)
    fp16 = run.encode(client, 0, corpus, encode_batch=8)
    l4 = run.encode(client, 4, corpus, encode_batch=8)
    assert fp16.image_values.shape == l4.image_values.shape == (8, 15, 32)
    np.testing.assert_array_equal(fp16.text_tokens, l4.text_tokens)
    assert set(np.unique(l4.image_values)) <= set(qlib.grid(4).tolist())
    qp = client.params["image_quantizer"]
    codes = qlib.Quantizer(qlib.QuantizerConfig(dim=32, levels=4)).apply(
        {"params": qp}, jnp.asarray(fp16.image_values), method="encode").codes
    agree = np.mean(inversion.wire_values(np.asarray(codes), 4) == l4.image_values)
    assert agree > 0.99  # exact up to the fp16 rounding of the features near a decision threshold


def test_bad_arguments():
    with pytest.raises(ValueError, match="attacker_seed must differ"):
        run.PrivacyConfig(attacker_seed=1, victim_seed=1)
    with pytest.raises(ValueError, match="levels must all be >= 2"):
        run.PrivacyConfig(levels=(4, 1))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run.load_client("/nonexistent/workdir", jax.random.key(0))
