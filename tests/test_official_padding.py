"""Bucketed batches quantize as the official code does on the same batch padded to its longest sample.

The official quantizer is written here independently, in numpy float64, from method.md §2.2 and §3
(``anonymous-1742/Quantized-TinyLLaVA`` ``tinyllava/model/VQ/quantizer.py`` ``FSQ`` and
``modeling_tinyllava.py``): the image tensor is every sample's connector output ``[B, T_img, D]``; the
text tensor is the merged sequence without its image positions, each sample right-padded with zero
vectors to the batch's longest (``seq[~image_mask].view(B, -1, D)``); per tensor ``u = x W + b``, one
scalar mean and unbiased std over all of ``u`` (padding included), clip to ``mean +- 3 std``, rescale to
[-1, 1], round ``h z - o`` half to even, index ``r + o + h``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.data import sequence
from qtl_jax.models import quantized as qm
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig
from qtl_jax.models.tinyllava import TinyLlava, TinyLlavaConfig
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig

D, VOCAB, LEVELS = 32, 64, 4
TEXT_LENGTHS = (5, 11, 3, 8)  # text tokens per sample besides the one image placeholder
MAX_LENGTH = 40  # the loader's fixed length; the bucket the batch is cut to is 16


def paper_config() -> qm.QuantizedTinyLlavaConfig:
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8)
    llm = DecoderConfig.make(family="llama", vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=2,
                             num_kv_heads=1, intermediate_size=48, head_dim=16, tie_word_embeddings=True,
                             dtype=jnp.float64, param_dtype=jnp.float64)
    model = TinyLlavaConfig(vision=vision, connector=ConnectorConfig("mlp2x_gelu", 16, D), llm=llm, dtype=jnp.float64)
    q = QuantizerConfig(dim=D, levels=LEVELS, scaling="batch", bound="linear", dtype=jnp.float64)
    return qm.QuantizedTinyLlavaConfig(model, q, q)


def loader_batch(seed: int = 0, lengths=TEXT_LENGTHS, has_image=None) -> dict[str, np.ndarray]:
    """Right-padded to MAX_LENGTH as the loader yields them: BOS, the placeholder at position 1 (samples with an
    image; ``has_image`` default: all), then text; ``lengths[i]`` text tokens besides the placeholder."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    images = np.ones(b, np.int32) if has_image is None else np.asarray(has_image, np.int32)
    ids = np.zeros((b, MAX_LENGTH), np.int32)
    mask = np.zeros((b, MAX_LENGTH), np.int32)
    for i, (n, image) in enumerate(zip(lengths, images)):
        ids[i, : n + image] = rng.integers(1, VOCAB, n + image)
        if image:
            ids[i, 1] = -200
        mask[i, : n + image] = 1
    labels = np.where((mask > 0) & (np.arange(MAX_LENGTH) >= 2) & (ids != -200), ids, -100).astype(np.int32)
    pixels = rng.normal(size=(b, 16, 16, 3))
    pixels[images == 0] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels, has_image=images)


def official_codes(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, levels: int):
    """The official FSQ encoder on one modality's whole tensor ``x [B, N, D]`` -> (indices, clipped,
    distortion): the cosine distortion averaged over every row, padding included (method.md §3.4)."""
    u = x @ kernel + bias
    mean, std = u.mean(), u.std(ddof=1)
    lo, hi = mean - 3 * std, mean + 3 * std
    clipped = (u < lo) | (u > hi)
    z = 2 * (np.clip(u, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1
    h, o = (levels - 1) / 2, ((levels - 1) % 2) / 2
    r = np.round(h * z - o)  # half to even, as torch.round
    z_hat = (r + o) / h
    cos = (z * z_hat).sum(-1) / (np.linalg.norm(z, axis=-1) * np.linalg.norm(z_hat, axis=-1) + 1e-3)
    return (r + o + h).astype(np.int64), clipped, float(np.mean(1 - cos))


def official_text_tensor(table: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``seq[~image_mask].view(B, -1, D)``: each sample's text embeddings, zero-padded to the longest; and
    the [B, N] mask of real rows."""
    rows = [table[ids[(m > 0) & (ids != -200)]] for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    longest = max(len(r) for r in rows)
    out = np.zeros((len(rows), longest, table.shape[1]))
    real = np.zeros((len(rows), longest), bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        real[i, : len(r)] = True
    return out, real


# The max_length case (the loader's fixed padding, statistics over the official rows only) runs with -m slow.
@pytest.mark.parametrize("buckets", [pytest.param((16,), id="bucket16"),
                                     pytest.param((), id="max_length", marks=pytest.mark.slow)])
def test_codes_equal_official_quantizer_on_batch_padded_to_longest(buckets):
    """Our codes (and clip rate, distortion) on a bucket- or max_length-padded batch are the official ones.

    The official text tensor holds 11 rows per sample (the longest sample's text); ours holds 16 or 40
    positions per sample (placeholder and padding as zero vectors), so our batch statistics and distortion
    must be taken over the official rows only. float64 on both sides: equality is exact (no tie is near).
    """
    config = paper_config()
    batch = sequence.pad_to_bucket(loader_batch(), buckets)
    assert batch["input_ids"].shape[1] == (buckets[0] if buckets else MAX_LENGTH)
    with jax.enable_x64(True):
        params, stats = qm.init_split_params(config, jax.random.key(0))
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        client = params["client"]
        out = jax.device_get(qm.client_forward(config, client, stats, batch, train=True))
        image_x = np.asarray(jax.device_get(TinyLlava(config.model).apply(
            {"params": {"vision_tower": client["vision_tower"], "connector": client["connector"]}},
            jnp.asarray(batch["pixel_values"]), method=TinyLlava.encode_images)), np.float64)
    table = np.asarray(client["embed_tokens"]["embedding"], np.float64)

    qi = client["image_quantizer"]["in_proj"]
    k_img, clip_img, dist_img = official_codes(image_x, np.asarray(qi["kernel"], np.float64), np.asarray(qi["bias"], np.float64), LEVELS)
    np.testing.assert_array_equal(np.asarray(out.uplink.image_codes), k_img)
    assert out.metrics["clip_rate_image"] == pytest.approx(clip_img.mean(), abs=1e-12)
    # The metrics carry the weighted term (0.25 x distortion) that enters the loss. Our grid values are float32
    # by design (quantizer.round_to_levels), so the cosine is off by at most ~1 float32 rounding relative.
    grid_rel = 2 * float(np.finfo(np.float32).eps)
    assert out.metrics["dist_image"] == pytest.approx(config.image_quantizer.dist_weight * dist_img, rel=grid_rel)

    text_x, text_real = official_text_tensor(table, batch)
    assert text_x.shape[1] == max(TEXT_LENGTHS)
    qt = client["text_quantizer"]["in_proj"]
    k_txt, clip_txt, dist_txt = official_codes(text_x, np.asarray(qt["kernel"], np.float64), np.asarray(qt["bias"], np.float64), LEVELS)
    ours_real = (batch["attention_mask"] > 0) & (batch["input_ids"] != -200)
    # Row order: sample by sample, left to right, in both.
    np.testing.assert_array_equal(np.asarray(out.uplink.text_codes)[ours_real], k_txt[text_real])
    # clip_rate is reported over the real text tokens (the official tensor's padding rows excluded).
    assert out.metrics["clip_rate_text"] == pytest.approx(clip_txt[text_real].mean(), abs=1e-12)
    assert out.metrics["dist_text"] == pytest.approx(config.text_quantizer.dist_weight * dist_txt, rel=grid_rel)
    assert 0 < k_txt[text_real].std()  # the codes are not one constant, so equality says something
