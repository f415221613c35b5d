"""Packed batches (``data.pack``): several samples per row, the same function as one sample per row.

``sequence.pack`` packs a loader batch (TinyLLaVA Factory convention: one ``-200`` placeholder per
image sample) into rows of ``capacity`` merged positions. The model restarts positions at each sample and
confines attention to it; the image tensor stays per sample, and the text quantizer weighs its rows into
the official text tensor of the same samples. So a packed batch must give the unpacked batch's loss,
metrics, codes and parameter update, which the float64 tests below check to rounding, and the codes must
be the official quantizer's (method.md §2.2 and §3; the reference is ``test_official_padding.official_codes``,
written from ``tinyllava/model/VQ/quantizer.py`` ``FSQ``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.data import sequence
from qtl_jax.data.constants import IGNORE_INDEX
from qtl_jax.models import quantized as qm
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig
from qtl_jax.models.messages import Uplink
from qtl_jax.models.tinyllava import TinyLlavaConfig, compute_layout
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig
from qtl_jax.split import link as linklib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.mesh import split_meshes
import test_official_padding as official_padding
from test_official_padding import official_codes
from tolerances import adam_update_tolerance, rounding_tolerance

D, VOCAB, LEVELS = official_padding.D, official_padding.VOCAB, official_padding.LEVELS
# Text tokens per sample besides the placeholder; sample 3 is text only (its own tokens, no placeholder).
TEXT_LENGTHS = (5, 11, 3, 8, 6, 2)
HAS_IMAGE = (1, 1, 1, 0, 1, 1)
CAPACITY = 24  # merged positions per packed row
OPTIMIZER = dict(lr=3e-3, weight_decay=0.1, warmup_ratio=0.0, schedule="constant", grad_clip_norm=1.0,
                 no_decay=[".*/bias", ".*norm.*/scale"],
                 param_groups=[("client/vision_tower/.*", "frozen"), (".*", 1.0)])
# The longest reduction (the 64-word vocabulary, ~100 token rows in a weight gradient) and the chained
# reductions a value passes (ViT, connector, quantizer, 2 decoder layers, forward and backward).
REDUCTION, DEPTH = 128, 12
GRAD_TOL = rounding_tolerance(np.float64, REDUCTION, DEPTH)
# One AdamW step may turn a gradient's rounding difference into lr*d/eps of update (tolerances.py).
PARAM_TOL = adam_update_tolerance(GRAD_TOL, OPTIMIZER["lr"], 1) + GRAD_TOL


def config(dtype=jnp.float64) -> qm.QuantizedTinyLlavaConfig:
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8)
    llm = DecoderConfig.make(family="llama", vocab_size=VOCAB, hidden_size=D, num_layers=2, num_heads=2,
                             num_kv_heads=1, intermediate_size=48, head_dim=16, tie_word_embeddings=True,
                             dtype=dtype, param_dtype=dtype)
    model = TinyLlavaConfig(vision=vision, connector=ConnectorConfig("mlp2x_gelu", 16, D), llm=llm, dtype=dtype,
                            max_length=CAPACITY)
    q = QuantizerConfig(dim=D, levels=LEVELS, scaling="batch", bound="linear", dtype=dtype)
    return qm.QuantizedTinyLlavaConfig(model, q, q)


def loader_batch(seed: int = 0) -> dict[str, np.ndarray]:
    return official_padding.loader_batch(seed, TEXT_LENGTHS, HAS_IMAGE)


def packed(batch, t_img, buckets=(), rows=1):
    return sequence.pack(batch, capacity=CAPACITY, num_image_tokens=t_img, length_buckets=buckets,
                               row_multiple=rows)


def sample_of_tokens(batch) -> np.ndarray:
    """[R, T]: the sample each real token of a packed batch belongs to (-1 elsewhere), from its segments."""
    out = np.full(batch["input_ids"].shape, -1)
    tokens = np.asarray(loader_batch()["attention_mask"]).sum(axis=1)
    for r, row in enumerate(batch["segment_ids"]):
        start = 0
        for s in dict.fromkeys(row[row >= 0].tolist()):
            out[r, start:start + tokens[s]] = s
            start += tokens[s]
    return out


# --------------------------------------------------------------------------------------------------
# The packer


def test_pack_places_samples_whole_first_fit():
    t_img = 4
    batch = loader_batch()
    out = packed(batch, t_img, buckets=(8, 16, 20))
    # Merged lengths: n + image + image * (T_img - 1) = 9, 15, 7, 8, 10, 6. First fit into 24: [0, 1], [2, 3, 5]
    # (7 + 8 + 6 = 21), [4].
    assert [list(dict.fromkeys(r[r >= 0].tolist())) for r in out["segment_ids"]] == [[0, 1], [2, 3, 5], [4]]
    assert out["segment_ids"].shape == (3, CAPACITY)  # 3 rows (a row bucket); the longest row: 24 merged
    assert out["input_ids"].shape == (3, 20)  # longest row: 6 + 12 tokens -> the bucket 20
    np.testing.assert_array_equal(out["pixel_values"], batch["pixel_values"])  # images stay per sample
    np.testing.assert_array_equal(out["has_image"], batch["has_image"])
    # Row 1: sample 2 (4 tokens), sample 3 (8, text only), sample 5 (3); each sample's tokens contiguous,
    # its first label ignored, the rest as given.
    row = out["input_ids"][1]
    np.testing.assert_array_equal(row[:4], batch["input_ids"][2, :4])
    np.testing.assert_array_equal(row[4:12], batch["input_ids"][3, :8])
    np.testing.assert_array_equal(row[12:15], batch["input_ids"][5, :3])
    assert out["attention_mask"][1].tolist() == [1] * 15 + [0] * 5
    assert out["labels"][1, 4] == IGNORE_INDEX and out["labels"][1, 12] == IGNORE_INDEX
    np.testing.assert_array_equal(out["labels"][1, 5:12], batch["labels"][3, 1:8])
    assert out["segment_ids"][1].tolist() == [2] * 7 + [3] * 8 + [5] * 6 + [-1] * 3
    # With 4 devices' worth of rows the fourth is empty.
    four = packed(batch, t_img, buckets=(8, 16, 20), rows=4)
    np.testing.assert_array_equal(four["segment_ids"][:3], out["segment_ids"])
    assert (four["segment_ids"][3] == -1).all() and (four["attention_mask"][3] == 0).all()


def test_row_bucket_steps_by_powers_of_two_and_their_halves_capped_at_the_batch():
    assert [sequence.row_bucket(r, 100) for r in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [sequence.row_bucket(r, 64, 4) for r in (1, 5, 9, 13, 17, 25, 33, 49, 64)] == [4, 8, 12, 16, 24, 32, 48, 64, 64]
    assert [sequence.row_bucket(r, 10) for r in (9, 10)] == [10, 10]  # at most the batch
    assert sequence.row_bucket(5, 6, 4) == 8  # the batch rounded up to the device multiple
    # Over every row count of a batch of 64 only 12 shapes occur (13 for 1..100 at batch 100).
    assert len({sequence.row_bucket(r, 64) for r in range(1, 65)}) == 12


def test_pack_adds_an_empty_row_when_no_zero_text_row_exists():
    """Text-only samples filling their rows exactly: the paper's zero rows need one zero row of ours."""
    ids = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
    ids[1, 3:] = 0
    mask = (ids > 0).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.copy(), pixel_values=np.zeros((2, 16, 16, 3)),
                 has_image=np.zeros(2, np.int32))
    out = sequence.pack(batch, capacity=9, num_image_tokens=4)
    assert out["input_ids"].shape == (2, 9) and out["attention_mask"][0].sum() == 9
    assert (out["attention_mask"][1] == 0).all()


@pytest.mark.parametrize("bad, message", [
    (lambda b: b.update(attention_mask=b["attention_mask"][:, ::-1].copy()), "right-padded"),
    (lambda b: b["input_ids"].__setitem__((0, 2), -200), "several image placeholders"),
    (lambda b: b.update(segment_ids=np.zeros((6, 4), np.int32)), "already packed"),
])
def test_pack_refuses_what_it_cannot_pack(bad, message):
    batch = loader_batch()
    bad(batch)
    with pytest.raises(ValueError, match=message):
        packed(batch, 4)
    with pytest.raises(ValueError, match="more than capacity"):
        sequence.pack(loader_batch(), capacity=10, num_image_tokens=4)


def test_layout_restarts_positions_and_takes_each_sample_image():
    cfg = config(jnp.float32).model
    t_img = cfg.num_image_tokens
    batch = packed(loader_batch(), t_img)
    layout = compute_layout(cfg, batch["input_ids"], batch["attention_mask"], batch["labels"],
                            num_images=len(TEXT_LENGTHS), segment_ids=batch["segment_ids"])
    seg = np.asarray(layout.segment_ids)
    np.testing.assert_array_equal(seg, batch["segment_ids"])
    pos, image = np.asarray(layout.position_ids), np.asarray(layout.image_index)
    for r in range(seg.shape[0]):
        for s in set(seg[r][seg[r] >= 0].tolist()):
            where = np.flatnonzero(seg[r] == s)
            assert pos[r, where].tolist() == list(range(len(where)))  # 0, 1, ... within the sample
            if HAS_IMAGE[s]:  # the placeholder at token 1: merged positions 1 .. T_img of the sample
                assert image[r, where].tolist() == [-1] + [s] * t_img + [-1] * (len(where) - 1 - t_img)
            else:
                assert (image[r, where] == -1).all()
    with pytest.raises(ValueError, match="segment_ids must mark exactly"):
        bad = batch["segment_ids"].copy()
        bad[0, -1] = 0 if bad[0, -1] < 0 else -1
        compute_layout(cfg, batch["input_ids"], batch["attention_mask"], num_images=len(TEXT_LENGTHS),
                       segment_ids=bad)


# --------------------------------------------------------------------------------------------------
# The same function


def fresh_state(cfg, meshes):
    state = steplib.create_train_state(cfg, jax.random.key(0), meshes, OPTIMIZER, total_steps=10)
    cast = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    return state.replace(client=cast(state.client), server=cast(state.server))


def one_step(cfg, batch, mode, meshes):
    state = fresh_state(cfg, meshes)
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 10, {"client": state.client.params,
                                                               "server": state.server.params})
    step = steplib.make_train_step(cfg, meshes, optimizers, mode=mode)
    state, metrics = step(state, batch)
    return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def unpacked_and_packed():
    cfg = config()
    batch = loader_batch()
    with jax.enable_x64(True):
        meshes = split_meshes(0, 0, devices=jax.devices()[:1])
        plain = one_step(cfg, sequence.pad_to_bucket(batch, ()), "fused", meshes)
        pack = one_step(cfg, packed(batch, cfg.model.num_image_tokens), "fused", meshes)
    return cfg, plain, pack


def test_a_packed_step_equals_the_unpacked_step_in_float64(unpacked_and_packed):
    """Loss, every quantizer metric and the whole parameter update are the unpacked batch's."""
    _, (p_state, p_metrics), (k_state, k_metrics) = unpacked_and_packed
    for key in ("loss", "ce", "dist_image", "dist_text", "entropy_image", "entropy_text", "clip_rate_image",
                "clip_rate_text", "mse_text", "feature_mean_text", "feature_std_text", "target_tokens", "tokens",
                "examples"):
        tol = rounding_tolerance(np.float64, REDUCTION, DEPTH, scale=max(abs(p_metrics[key]), 1.0))
        np.testing.assert_allclose(k_metrics[key], p_metrics[key], rtol=0, atol=tol, err_msg=key)
    assert k_metrics["examples"] == len(TEXT_LENGTHS) and k_metrics["target_tokens"] > 0
    for part in ("client", "server"):
        a, b = jax.tree_util.tree_leaves(getattr(p_state, part).params), jax.tree_util.tree_leaves(getattr(k_state, part).params)
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=0, atol=PARAM_TOL)
    # The update itself is far above that tolerance (lr 3e-3 against ~1e-7), so equality says something.
    assert PARAM_TOL < 1e-6
    moved = np.abs(p_state.server.params["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"]
                   - fresh_params_server_kernel()).max()
    assert moved > 1e-4


def fresh_params_server_kernel():
    with jax.enable_x64(True):
        state = fresh_state(config(), split_meshes(0, 0, devices=jax.devices()[:1]))
    return np.asarray(state.server.params["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_a_packed_split_step_equals_the_fused_one_and_counts_its_side_information():
    """The uplink of a packed batch (rows, per-sample images, segments) through the in-process server half."""
    cfg = config()
    with jax.enable_x64(True):
        batch = packed(loader_batch(), cfg.model.num_image_tokens)
        meshes = split_meshes(0, 0, devices=jax.devices()[:1])
        f_state, f_metrics = one_step(cfg, batch, "fused", meshes)
        s_state, s_metrics = one_step(cfg, batch, "split", meshes)
    for key in ("loss", "ce", "dist_image", "dist_text"):
        np.testing.assert_allclose(s_metrics[key], f_metrics[key], rtol=0,
                                   atol=rounding_tolerance(np.float64, REDUCTION, DEPTH, scale=abs(f_metrics[key])))
    for x, y in zip(jax.tree_util.tree_leaves(f_state.client.params), jax.tree_util.tree_leaves(s_state.client.params)):
        np.testing.assert_allclose(y, x, rtol=0, atol=PARAM_TOL)
    # Side information: masks and labels of the rows, image_valid, and the runs (4 counts, 2 per sample).
    rows, t = batch["input_ids"].shape
    assert s_metrics["uplink_bytes_side"] == rows * t * (1 + 1 + 4) + len(TEXT_LENGTHS) + 4 * (rows + 2 * len(TEXT_LENGTHS))


def test_packed_codes_are_the_official_quantizer_codes_of_the_same_samples():
    """Per sample, the packed batch's text codes are the official tensor's (each sample's text padded with
    zero rows to the longest; one scalar mean/std over it), and its image codes the official image codes."""
    cfg = config()
    batch = loader_batch()
    with jax.enable_x64(True):
        params, stats = qm.init_split_params(cfg, jax.random.key(0))
        client = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)["client"]
        forward = jax.jit(lambda b: qm.client_forward(cfg, client, stats, b, train=True))  # (eager: 10 s per call)
        plain = jax.device_get(forward(sequence.pad_to_bucket(batch, ())))
        rows = packed(batch, cfg.model.num_image_tokens, rows=2)
        pack = jax.device_get(forward(rows))
    np.testing.assert_array_equal(pack.uplink.image_codes, plain.uplink.image_codes)
    # The official text tensor of these samples (method.md §2.2 step 5), quantized by the official FSQ.
    table = np.asarray(client["embed_tokens"]["embedding"], np.float64)
    texts = [table[ids[(m > 0) & (ids != -200)]] for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    longest = max(len(x) for x in texts)
    official = np.zeros((len(texts), longest, D))
    for i, x in enumerate(texts):
        official[i, : len(x)] = x
    qt = client["text_quantizer"]["in_proj"]
    k_txt, _, dist_txt = official_codes(official, np.asarray(qt["kernel"], np.float64), np.asarray(qt["bias"], np.float64), LEVELS)
    owner = sample_of_tokens(rows)
    text_pos = (rows["attention_mask"] > 0) & (rows["input_ids"] != -200)
    codes = np.asarray(pack.uplink.text_codes)
    for i, x in enumerate(texts):
        np.testing.assert_array_equal(codes[text_pos & (owner == i)], k_txt[i, : len(x)])
    assert pack.metrics["dist_text"] == pytest.approx(cfg.text_quantizer.dist_weight * dist_txt,
                                                      rel=2 * float(np.finfo(np.float32).eps))
    # The same weighted mean over differently ordered rows: float64 rounding of one reduction over the tensor.
    assert plain.metrics["dist_text"] == pytest.approx(
        pack.metrics["dist_text"], abs=rounding_tolerance(np.float64, codes.size, 2, pack.metrics["dist_text"]))
    assert 0 < k_txt.std()


def test_segment_runs_describe_the_segments():
    seg = np.array([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, 2], [-1] * 6], np.int32)
    msg = Uplink(image_codes=np.zeros((3, 1, 1), np.uint8), text_codes=np.zeros((3, 2, 1), np.uint8),
                 attention_mask=np.ones((3, 2), np.uint8), image_mask=np.zeros((3, 2), np.uint8),
                 image_valid=np.zeros(3, np.uint8), labels=np.zeros((3, 2), np.int32), segment_ids=seg)
    assert msg.segment_runs().tolist() == [2, 1, 0, 0, 3, 1, 2, 2, 6]
    assert msg.side_arrays()["segment_runs"].dtype == np.int32
    with pytest.raises(ValueError, match="packed uplink"):
        wire.uplink_to_proto(msg, step=0, client_id="c", geometry=None)


def test_check_batch_refuses_a_packed_batch_whose_images_do_not_match():
    cfg = config(jnp.float32)
    batch = packed(loader_batch(), cfg.model.num_image_tokens)
    qm.check_batch(cfg, batch)
    broken = dict(batch, has_image=np.ones(len(TEXT_LENGTHS), np.int32))
    with pytest.raises(ValueError, match="image placeholders"):
        qm.check_batch(cfg, broken)
    with pytest.raises(ValueError, match="sample indices"):
        qm.check_batch(cfg, dict(batch, segment_ids=batch["segment_ids"] + 10))
    # Packed with one image token too many (the tower's count, not the model's): refused before the step.
    wrong = packed(loader_batch(), cfg.model.num_image_tokens + 1)
    with pytest.raises(ValueError, match="num_image_tokens"):
        qm.check_batch(cfg, wrong)


def test_a_packed_split_step_on_disjoint_sharded_meshes_equals_one_device():
    """Rows a multiple of both meshes' devices (client 2, server 6: 6 rows, so two empty ones more than on
    one device): samples' images and rows land on different devices, and empty rows change nothing."""
    cfg = config()
    batch = loader_batch()
    with jax.enable_x64(True):
        one = one_step(cfg, packed(batch, cfg.model.num_image_tokens), "fused", split_meshes(0, 0, devices=jax.devices()[:1]))
        six_rows = packed(batch, cfg.model.num_image_tokens, rows=6)
        assert six_rows["input_ids"].shape[0] == 6
        split = one_step(cfg, six_rows, "split", split_meshes(2, 6))
    tol = rounding_tolerance(np.float64, REDUCTION, DEPTH)
    for key in ("loss", "ce", "dist_text", "tokens", "target_tokens"):
        np.testing.assert_allclose(split[1][key], one[1][key], rtol=0, atol=tol * max(abs(one[1][key]), 1.0), err_msg=key)
    for part in ("client", "server"):
        for x, y in zip(jax.tree_util.tree_leaves(getattr(one[0], part).params),
                        jax.tree_util.tree_leaves(getattr(split[0], part).params)):
            np.testing.assert_allclose(y, x, rtol=0, atol=PARAM_TOL)
