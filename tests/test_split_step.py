"""The split train step: split == fused across device counts, what crosses to the server half, bytes, errors.

A tiny random TinyLLaVA (2-layer ViT, 2-layer Llama-style decoder, D=32) with both quantizers at L=4:
the image one as the paper (scalar batch statistics), the text one with running ('ema') statistics so
that client batch_stats are covered too. The batch has a text-only sample and a padded sample.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax import codec, rules
from qtl_jax.models import quantized as qm
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig
from qtl_jax.models.tinyllava import TinyLlavaConfig
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig
from qtl_jax.models.messages import Downlink, Uplink, check_uplink
from qtl_jax.split import link as linklib
from qtl_jax.split.downlink import DownlinkSpec
from qtl_jax.split import step as steplib
from qtl_jax.split.mesh import split_meshes
from tolerances import adam_update_tolerance, rounding_tolerance

D, VOCAB, B, T, LEVELS = 32, 64, 6, 10, 4
STEPS = 2
# The longest reduction in the tiny model (B*T = 60 token rows in a weight gradient, the 64-word vocabulary)
# and the number of chained reductions a value passes through (2 ViT + connector + quantizer + 2 decoder
# layers, each forward and backward).
REDUCTION, DEPTH = 64, 12
OPTIMIZER = dict(
    lr=3e-3, weight_decay=0.1, warmup_ratio=0.0, schedule="constant", grad_clip_norm=1.0,
    no_decay=[".*/bias", ".*norm.*/scale"],
    param_groups=[("client/vision_tower/.*", "frozen"), ("server/llm/layers_0/.*", 0.5), (".*", 1.0)],
)
SHARDING = [("server/llm/.*", "fsdp"), ("client/connector/.*", "fsdp"), (".*", "replicate")]


def tiny_config(text_scaling: str = "ema", **quantizer) -> qm.QuantizedTinyLlavaConfig:
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8)
    llm = DecoderConfig.make(family="llama", vocab_size=VOCAB, hidden_size=D, num_layers=2, num_heads=2,
                             num_kv_heads=1, intermediate_size=48, head_dim=16, tie_word_embeddings=True)
    model = TinyLlavaConfig(vision=vision, connector=ConnectorConfig("mlp2x_gelu", 16, D), llm=llm)
    return qm.QuantizedTinyLlavaConfig(
        model, QuantizerConfig(dim=D, levels=LEVELS, **quantizer),
        QuantizerConfig(dim=D, levels=LEVELS, scaling=text_scaling, **quantizer),
    )


def make_batch(seed: int) -> dict[str, np.ndarray]:
    """6 samples: one placeholder at position 1 except sample 2 (text only); samples 3 and 5 padded.

    pixel_values[i] is sample i's image (zeros for the text-only sample).
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    has_image = np.ones(B, np.int32)
    ids[:, 1] = -200
    has_image[2] = 0
    ids[2, 1] = 7
    mask[3, 6:] = 0
    mask[5, 8:] = 0
    ids[mask == 0] = 0
    labels = np.where(np.arange(T) >= 4, ids, -100).astype(np.int32)
    labels[mask == 0] = -100
    pixels = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
    pixels[2] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels, has_image=has_image)


BATCHES = [make_batch(s) for s in range(STEPS)]


class RecordingServer(linklib.ServerHalf):
    """Keeps a host copy of every message, then lets the in-process server half apply the step."""

    in_process = True

    def __init__(self, inner):
        self.inner, self.up, self.down = inner, [], []

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value

    def exchange(self, step, msg):
        self.up.append((step, jax.device_get(msg)))
        down, metrics = self.inner.exchange(step, msg)
        self.down.append((step, jax.device_get(down)))
        return down, metrics


def float64_config(config: qm.QuantizedTinyLlavaConfig) -> qm.QuantizedTinyLlavaConfig:
    """``config`` computing in float64 everywhere (use under ``jax.experimental.enable_x64``)."""
    model = dataclasses.replace(config.model, dtype=jnp.float64,
                                llm=dataclasses.replace(config.model.llm, dtype=jnp.float64, param_dtype=jnp.float64))
    return dataclasses.replace(config, model=model,
                               image_quantizer=dataclasses.replace(config.image_quantizer, dtype=jnp.float64),
                               text_quantizer=dataclasses.replace(config.text_quantizer, dtype=jnp.float64))


def to_float64(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def in_process(config, meshes, optimizers, **kwargs):
    return linklib.InProcessServerHalf(meshes, steplib.server_update_fn(config, optimizers), **kwargs)


def run(config, meshes, mode, record=False, steps=STEPS, key=0):
    """``steps`` steps from a fresh state; with ``record`` the server half is wrapped in a :class:`RecordingServer`
    (returned last)."""
    state = steplib.create_train_state(config, jax.random.key(key), meshes, OPTIMIZER, total_steps=10,
                                       sharding_rules=SHARDING)
    float64 = config.model.dtype == jnp.float64
    if float64:  # params, moments and statistics too (they start equal in both modes, so the cast is exact)
        state = state.replace(client=to_float64(state.client), server=to_float64(state.server))
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 10, {"client": state.client.params,
                                                               "server": state.server.params})
    server = RecordingServer(in_process(config, meshes, optimizers)) if record else None
    step = steplib.make_train_step(config, meshes, optimizers, mode=mode, server=server)
    initial = jax.device_get((state.client.params, state.server.params))
    history = []
    for i in range(steps):
        state, metrics = step(state, to_float64(BATCHES[i]) if float64 else BATCHES[i])
        history.append(metrics)
    devices = {name: {d.id for x in jax.tree_util.tree_leaves(getattr(state, name)) for d in x.devices()}
               for name in ("client", "server")}
    kernel = state.server.params["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    layout = (kernel.sharding.spec, kernel.addressable_shards[0].data.shape)
    out = (initial, jax.device_get(state), history, devices, layout)
    return out + (server,) if record else out


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def fused(config):
    return run(config, split_meshes(0, 0, devices=jax.devices()[:6]), "fused")


@pytest.fixture(scope="module")
def split_2_6(config):
    meshes = split_meshes(2, 6, server_fsdp=2)
    out = run(config, meshes, "split", record=True)
    return out[:5], out[5], meshes


def assert_trees_close(a, b, tol=0.0):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0, err_msg=rules.path_str(path))


def assert_metrics_close(split_history, fused_history, dtype, keys):
    for s, f in zip(split_history, fused_history):
        for k in keys:
            tol = rounding_tolerance(dtype, REDUCTION, DEPTH, scale=max(abs(f[k]), 1.0))
            np.testing.assert_allclose(s[k], f[k], rtol=0, atol=tol, err_msg=k)


SPLIT_LAYOUTS = {"client2_server6_fsdp2": dict(client=2, server=6, server_fsdp=2),
                 "client6_fsdp3_server2": dict(client=6, server=2, client_fsdp=3, server_fsdp=2)}
# The second layout (FSDP on the client side) runs with -m slow: each layout costs CI ~1 min of compiles, and
# the default run keeps one layout with both sides sharded.
LAYOUT_PARAMS = [pytest.param("client2_server6_fsdp2"),
                 pytest.param("client6_fsdp3_server2", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def fused64(config):
    with jax.enable_x64(True):
        return run(float64_config(config), split_meshes(0, 0, devices=jax.devices()[:6]), "fused")


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_split_equals_fused_in_float64(config, fused64, layout):
    """The claim itself: the split step computes the fused step's function, on any device layout.

    In float64 the two programs' different reduction orders (their shardings, the CPU's vector width)
    cost ~1e-16 relative, so everything is compared: every step's metrics, and the parameters, Adam
    moments and quantizer statistics after two steps of the real optimizer (frozen groups, per-group
    learning rates, weight decay, clipping). Gradients are at most 1 (clipped by norm); Adam may turn
    their rounding difference into lr*d/eps of update (tolerances.adam_update_tolerance).
    """
    k = SPLIT_LAYOUTS[layout]
    meshes = split_meshes(k["client"], k["server"], client_fsdp=k.get("client_fsdp", 1),
                          server_fsdp=k.get("server_fsdp", 1))
    with jax.enable_x64(True):
        _, s_state, s_hist, *_ = run(float64_config(config), meshes, "split")
    _, f_state, f_hist, *_ = fused64
    assert s_state.server.params["llm"]["norm"]["scale"].dtype == np.float64
    assert_metrics_close(s_hist, f_hist, np.float64, ("loss", "ce", "dist_image", "dist_text", "entropy_image",
                                                      "entropy_text", "mse_image", "mse_text", "tokens"))
    grad_tol = rounding_tolerance(np.float64, REDUCTION, DEPTH)
    tol = adam_update_tolerance(grad_tol, OPTIMIZER["lr"], STEPS) + grad_tol
    assert tol < 1e-6  # far below any real mismatch (one step moves a parameter by ~lr = 3e-3)
    for part in ("client", "server"):
        assert_trees_close(getattr(s_state, part).params, getattr(f_state, part).params, tol)
        assert_trees_close(getattr(s_state, part).opt_state, getattr(f_state, part).opt_state, tol)
    assert_trees_close(s_state.client.batch_stats, f_state.client.batch_stats, grad_tol)
    assert int(s_state.step) == int(f_state.step) == STEPS


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_split_equals_fused_in_float32(config, fused, split_2_6, layout):
    """The production dtype: the same losses as the fused step, within float32 rounding.

    Parameters are compared in float64 (above): in float32, Adam's division by the gradient's own size
    makes a rounding difference in a ~0 gradient entry worth up to lr*1e-6/1e-8 of update, so a float32
    parameter tolerance would have to be as large as the update itself.
    """
    if layout == "client2_server6_fsdp2":
        s_hist = split_2_6[0][2]
    else:
        k = SPLIT_LAYOUTS[layout]
        meshes = split_meshes(k["client"], k["server"], client_fsdp=k.get("client_fsdp", 1), server_fsdp=k["server_fsdp"])
        s_hist = run(config, meshes, "split")[2]
    assert_metrics_close(s_hist, fused[2], np.float32, ("loss", "ce", "dist_image", "dist_text", "tokens"))
    # The training actually moved the trained parameters.
    initial, final, hist, *_ = fused
    assert not np.allclose(initial[1]["llm"]["layers_1"]["mlp"]["up_proj"]["kernel"],
                           final.server.params["llm"]["layers_1"]["mlp"]["up_proj"]["kernel"])
    assert hist[0]["target_tokens"] > 0 and hist[0]["examples"] == B


def test_partitions_live_on_their_own_disjoint_devices(split_2_6):
    (_, _, _, devices, (spec, shard_shape)), _, meshes = split_2_6
    client_ids = {d.id for d in meshes.client.devices.flat}
    server_ids = {d.id for d in meshes.server.devices.flat}
    assert len(client_ids) == 2 and len(server_ids) == 6 and not client_ids & server_ids
    # Every leaf of each partition's state (params, optimizer state, statistics) after two steps.
    assert devices == {"client": client_ids, "server": server_ids}
    # FSDP over the server's fsdp axis (size 2), per the rules: the [32, 48] kernel is split in two.
    assert spec == jax.sharding.PartitionSpec(None, "fsdp") and shard_shape == (D, 24)


def test_only_integer_arrays_go_up_and_float32_cotangents_come_down(split_2_6):
    _, link, _ = split_2_6
    assert [s for s, _ in link.up] == [0, 1] and [s for s, _ in link.down] == [0, 1]
    for _, up in link.up:
        leaves = jax.tree_util.tree_leaves(up)
        assert len(leaves) == 6 and all(np.issubdtype(x.dtype, np.integer) for x in leaves)
        assert up.image_codes.dtype == up.text_codes.dtype == np.uint8
        assert up.image_codes.shape == (B, 3, D) and up.text_codes.shape == (B, T, D)
        assert up.image_codes.max() < LEVELS and up.text_codes.max() < LEVELS
        np.testing.assert_array_equal(up.image_valid, BATCHES[0]["has_image"])  # row i = sample i
        np.testing.assert_array_equal(up.image_valid, [1, 1, 0, 1, 1, 1])
    for _, down in link.down:
        assert down.image_grad.dtype == down.text_grad.dtype == np.float32
        # Nothing comes back for positions the server never read: placeholder, padding, the dummy image.
        up = link.up[0][1]
        unread = ~up.text_positions()
        assert np.all(down.text_grad[unread] == 0) and np.any(down.text_grad[~unread] != 0)
        assert np.all(down.image_grad[2] == 0) and all(np.any(down.image_grad[i] != 0) for i in (0, 1, 3, 4, 5))


def test_a_float_uplink_is_refused():
    up = Uplink(np.zeros((1, 2, 3), np.float32), np.zeros((1, 4, 3), np.uint8), np.ones((1, 4), np.uint8),
                np.zeros((1, 4), np.uint8), np.ones(1, np.uint8), np.zeros((1, 4), np.int32), 4, 4)
    with pytest.raises(TypeError, match="only integer arrays may cross.*image_codes must be integer"):
        check_uplink(up)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        check_uplink(up.replace(image_codes=np.zeros((1, 2, 3), np.uint8), labels=np.zeros((1, 4), np.float32)))


def test_byte_counts_are_the_codec_output_of_the_real_positions(split_2_6):
    (_, _, hist, *_), link, _ = split_2_6
    for (step, up), (_, down), metrics in zip(link.up, link.down, hist):
        real_images = up.image_codes[up.image_valid > 0]
        assert real_images.shape == (5, 3, D)
        real_text = up.text_codes[up.text_positions()]
        n_text = B * T - B + 1 - 4 - 2  # minus 5 placeholders, 4 + 2 padding positions
        assert real_text.shape == (n_text, D)
        side = 2 * B * T + B + 4 * B * T  # two uint8 masks, uint8 image_valid, int32 labels
        assert metrics["uplink_bytes_side"] == side
        for method in ("packed", "ans"):
            expected = side + sum(len(codec.encode(c, LEVELS, method=method)) for c in (real_images, real_text))
            assert metrics[f"uplink_bytes_{method}"] == expected
        values = real_images.size + real_text.size
        assert metrics["uplink_values"] == values
        header = len(codec.encode_fp16(np.zeros((0,), np.float16)))
        assert header < 64
        fp16 = metrics["uplink_bytes_fp16"] - side
        assert 2 * values < fp16 < 2 * values + 2 * 64
        assert metrics["uplink_bytes_packed"] - side < fp16 / 7  # 2 bits vs 16 bits per value, plus headers
        assert metrics["downlink_bytes"] == 4 * values
        assert metrics["uplink_bytes"] == metrics["uplink_bytes_ans"]


def test_measure_every_and_bf16_downlink():
    """The in-process server half's transport and accounting, around a stand-in server program."""
    meshes = split_meshes(0, 0, devices=jax.devices()[:2])
    rng = np.random.default_rng(0)
    grads = Downlink(rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 5, 4)).astype(np.float32))
    seen = []

    def update(server, uplink):
        seen.append(uplink)  # traced once, on the server mesh
        return server, grads, {"ce": jnp.float32(1.5)}

    server = linklib.InProcessServerHalf(meshes, update, codec_method="packed", measure_every=2,
                                         downlink=DownlinkSpec("bf16"))
    server.state = steplib.PartitionState({}, {}, {})
    # Sample 0 has an image and 3 real text tokens; sample 1 is text only with 4.
    up = Uplink(rng.integers(0, 8, (2, 3, 4)).astype(np.uint8), rng.integers(0, 8, (2, 5, 4)).astype(np.uint8),
                np.array([[1, 1, 1, 1, 0]] * 2, np.uint8), np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.uint8),
                np.array([1, 0], np.uint8), np.zeros((2, 5), np.int32), 8, 8)
    for step in range(3):
        back, metrics = server.exchange(step, up)
        assert ("uplink_bytes" in metrics) == (step % 2 == 0) and float(metrics["ce"]) == 1.5
    assert len(seen) == 1 and seen[0].text_codes.dtype == np.uint8
    assert {d.id for d in back.text_grad.devices()} == {0, 1} and back.text_grad.dtype == jnp.float32
    _, counts = server.exchange(4, up)
    assert counts["uplink_bytes"] == counts["uplink_bytes_packed"]
    assert counts["uplink_values"] == 1 * 3 * 4 + (3 + 4) * 4  # one real image, 3 + 4 real text tokens
    assert counts["downlink_bytes"] == 2 * counts["uplink_values"]
    assert counts["downlink_bytes_fp32"] == 4 * counts["uplink_values"] and counts["batch_samples"] == 2
    assert counts["roundtrip_bytes_per_sample"] == (counts["uplink_bytes"] + counts["downlink_bytes"]) / 2
    assert counts["roundtrip_bytes_per_sample_paper"] == (counts["uplink_bytes_fp16"] + 4 * counts["uplink_values"]) / 2
    np.testing.assert_array_equal(np.asarray(back.text_grad),
                                  np.asarray(jnp.asarray(grads.text_grad).astype(jnp.bfloat16).astype(jnp.float32)))
    with pytest.raises(ValueError, match="measure_every must be >= 1"):
        linklib.InProcessServerHalf(meshes, update, measure_every=0)
    with pytest.raises(ValueError, match="state is not set"):
        linklib.InProcessServerHalf(meshes, update).exchange(0, up)


def test_frozen_parameters_do_not_move_and_the_embedding_copies_are_separate(split_2_6, fused):
    for (initial, final, *_) in (split_2_6[0], fused):
        assert_trees_close(initial[0]["vision_tower"], final.client.params["vision_tower"], tol=0)
        # The two embedding copies start equal and are trained independently.
        np.testing.assert_array_equal(initial[0]["embed_tokens"]["embedding"], initial[1]["llm"]["embed_tokens"]["embedding"])
        assert not np.allclose(final.client.params["embed_tokens"]["embedding"],
                               final.server.params["llm"]["embed_tokens"]["embedding"])
        assert not np.allclose(initial[0]["connector"]["fc_0"]["kernel"], final.client.params["connector"]["fc_0"]["kernel"])


def test_frozen_vision_tower_gets_no_gradient(config, fused):
    """The stop_gradient on frozen leaves: no gradient (and no backward residuals) for the tower weights."""
    client, server = fused[0]
    params, stats = {"client": client, "server": server}, fused[1].client.batch_stats
    opts = steplib.make_split_optimizers(OPTIMIZER, 10, params)
    assert all(jax.tree_util.tree_leaves(opts.client_frozen["vision_tower"]))
    assert not any(jax.tree_util.tree_leaves(opts.client_frozen["connector"]))

    @jax.jit
    @jax.grad
    def grads_of(cp):
        cp = steplib.without_frozen(cp, opts.client_frozen)
        return qm.client_forward(config, cp, stats, BATCHES[0]).loss

    grads = grads_of(params["client"])
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads["vision_tower"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads["connector"]))


def test_server_reads_nothing_but_real_positions(config, split_2_6):
    """Garbage at placeholder, padding and dummy-image positions leaves the server's loss bit-identical."""
    _, link, _ = split_2_6
    up = link.up[0][1]
    final = split_2_6[0][1]
    sp = final.server.params
    loss = jax.jit(lambda p, u: qm.server_loss(config, p, u)[0])
    rng = np.random.default_rng(3)
    noisy_text = np.where(up.text_positions()[..., None], up.text_codes, rng.integers(0, LEVELS, up.text_codes.shape))
    noisy_img = up.image_codes.copy()
    noisy_img[2] = rng.integers(0, LEVELS, noisy_img[2].shape)  # the text-only sample's dummy image
    noisy = up.replace(text_codes=noisy_text.astype(np.uint8), image_codes=noisy_img)
    assert float(loss(sp, up)) == float(loss(sp, noisy))
    changed = noisy.replace(text_codes=(up.text_codes + 1) % LEVELS)
    assert float(loss(sp, up)) != float(loss(sp, changed))


def test_eval_step_equals_fused_forward(config, fused, fused64):
    meshes = split_meshes(0, 0, devices=jax.devices()[:6])
    final = fused[1]
    state = jax.device_put(final, jax.sharding.NamedSharding(meshes.client, jax.sharding.PartitionSpec()))
    out = steplib.make_eval_step(config, meshes)(state, BATCHES[0])
    params = {"client": final.client.params, "server": final.server.params}
    forward = jax.jit(lambda p, s, b: qm.forward(config, p, s, b)[:2])
    logits, layout = forward(params, final.client.batch_stats, BATCHES[0])
    mask = np.asarray(layout.attention_mask) > 0
    scale = float(np.abs(np.asarray(logits)[mask]).max())
    tol = rounding_tolerance(np.float32, REDUCTION, DEPTH // 2, scale)  # forward only
    np.testing.assert_allclose(np.asarray(out["logits"])[mask], np.asarray(logits)[mask], atol=tol, rtol=0)
    np.testing.assert_array_equal(out["labels"], layout.labels)
    assert out["logits"].shape == (B, T + 2, VOCAB) and np.isfinite(float(out["ce"]))
    # Each sample's image reaches its own placeholder: permuting the samples (the text-only one first)
    # permutes the outputs. The quantizer statistics are permutation invariant up to the order of their
    # sums, so this runs in float64, where that order cannot move a code across a decision threshold.
    perm = np.array([2, 5, 0, 4, 1, 3])
    with jax.enable_x64(True):
        config64, final64 = float64_config(config), fused64[1]
        params64 = {"client": final64.client.params, "server": final64.server.params}
        forward64 = jax.jit(lambda p, s, b: qm.forward(config64, p, s, b)[:2])
        batch = to_float64(BATCHES[0])
        logits, layout = forward64(params64, final64.client.batch_stats, batch)
        p_logits, p_layout = forward64(params64, final64.client.batch_stats, {k: v[perm] for k, v in batch.items()})
    np.testing.assert_array_equal(p_layout.attention_mask, np.asarray(layout.attention_mask)[perm])
    tol = rounding_tolerance(np.float64, REDUCTION, DEPTH // 2, scale)
    np.testing.assert_allclose(np.asarray(p_logits)[mask[perm]], np.asarray(logits)[perm][mask[perm]], atol=tol, rtol=0)


def test_param_paths_for_rules(config):
    paths = rules.paths(jax.eval_shape(lambda k: qm.init_split_params(config, k)[0], jax.random.key(0)))
    assert "client/embed_tokens/embedding" in paths and "server/llm/embed_tokens/embedding" in paths
    assert {p for p in paths if "quantizer" in p} == {
        f"{side}/{m}_quantizer/{proj}/{w}" for side, proj in (("client", "in_proj"), ("server", "out_proj"))
        for m in ("image", "text") for w in ("kernel", "bias")
    }
    assert all(p.startswith(("client/vision_tower/", "client/connector/", "client/embed_tokens/", "client/image_q",
                             "client/text_q", "server/llm/", "server/image_q", "server/text_q")) for p in paths)


def test_fp16_baseline_sends_float16_and_counts_two_bytes_per_value(fused):
    config = tiny_config(text_scaling="batch", bound="none")
    shapes = jax.eval_shape(lambda k: qm.init_split_params(config, k), jax.random.key(0))
    assert shapes[0]["client"]["image_quantizer"] == {} and shapes[0]["server"]["text_quantizer"] == {}
    assert shapes[1] == {}
    # The base model's params are those of the quantized model, minus the projections.
    client = {k: v for k, v in fused[0][0].items() if not k.endswith("quantizer")}
    client.update(image_quantizer={}, text_quantizer={})
    out = jax.jit(lambda p, b: qm.client_forward(config, p, {}, b))(client, BATCHES[0])
    assert out.uplink.image_codes.dtype == jnp.float16 and out.uplink.image_levels == 0
    check_uplink(out.uplink)
    counts = linklib.uplink_counts(jax.device_get(out.uplink))
    assert counts["uplink_bytes_packed"] == counts["uplink_bytes_ans"] == counts["uplink_bytes_fp16"]


def test_bad_configs_batches_and_modes_are_clear_errors(config):
    with pytest.raises(ValueError, match="image_quantizer.dim=16 but the LLM width is 32"):
        dataclasses.replace(config, image_quantizer=QuantizerConfig(dim=16))
    with pytest.raises(ValueError, match="needs 'factory' input ids"):
        dataclasses.replace(config, model=dataclasses.replace(config.model, convention="llava_hf", image_token_index=5))
    bad = dict(BATCHES[0], has_image=np.ones(B, np.int32))
    with pytest.raises(ValueError, match=r"samples \[2\] have \[0\] image placeholders"):
        qm.check_batch(config, bad)
    with pytest.raises(KeyError, match="batch lacks \\['has_image'\\]"):
        qm.check_batch(config, {k: v for k, v in BATCHES[0].items() if k != "has_image"})
    meshes = split_meshes(2, 6)
    shapes = jax.eval_shape(lambda k: qm.init_split_params(config, k)[0], jax.random.key(0))
    opts = steplib.make_split_optimizers(OPTIMIZER, 10, shapes)
    with pytest.raises(ValueError, match="build them with split_meshes\\(0, 0\\)"):
        steplib.make_train_step(config, meshes, opts, mode="fused")
    with pytest.raises(ValueError, match="mode='both'"):
        steplib.make_train_step(config, meshes, opts, mode="both")
    with pytest.raises(ValueError, match="no param_groups rule covers"):
        steplib.make_split_optimizers(dict(OPTIMIZER, param_groups=[("client/.*", 1.0)]), 10, shapes)


@pytest.mark.slow
def test_bf16_compute_with_remat_trains_close_to_fp32(fused):
    """bf16 compute + remat through the split step: params stay fp32, the wire stays integer / fp32."""
    base = tiny_config()
    config = dataclasses.replace(
        base, model=dataclasses.replace(base.model, dtype=jnp.bfloat16, remat=True),
        image_quantizer=dataclasses.replace(base.image_quantizer, dtype=jnp.bfloat16),
        text_quantizer=dataclasses.replace(base.text_quantizer, dtype=jnp.bfloat16),
    )
    meshes = split_meshes(2, 6, server_fsdp=2)
    _, final, hist, *_, link = run(config, meshes, "split", record=True)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(final.server.params))
    assert link.up[0][1].text_codes.dtype == np.uint8 and link.down[0][1].text_grad.dtype == np.float32
    for bf16, fp32 in zip(hist, fused[2]):
        assert np.isfinite(bf16["loss"]) and abs(bf16["ce"] - fp32["ce"]) < 0.25


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_each_program_compiles_once(config, mode, caplog):
    # The initial state must already be laid out (committed) like the step's outputs: otherwise the
    # second step misses jit's cache and recompiles the whole program (seen on one-device meshes).
    meshes = split_meshes(0, 0, devices=jax.devices()[:1])
    state = steplib.create_train_state(config, jax.random.key(0), meshes, OPTIMIZER, total_steps=10)
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 10, {"client": state.client.params,
                                                               "server": state.server.params})
    step = steplib.make_train_step(config, meshes, optimizers, mode=mode)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for i in range(3):
            state, _ = step(state, BATCHES[i % len(BATCHES)])
    compiled = [r.getMessage().split(" ")[1] for r in caplog.records if r.getMessage().startswith("Compiling jit(")]
    programs = ["jit(fused)"] if mode == "fused" else ["jit(client_begin)", "jit(server_update)", "jit(client_finish)"]
    for name in programs:
        assert compiled.count(name) == 1, compiled


def test_the_step_counter_it_returned_is_not_read_back_from_the_device(config, monkeypatch):
    """The split step knows the counter it returned: reading it back would wait for the whole previous step
    before the next could be queued. A counter it did not return (a restored state) is read."""
    meshes = split_meshes(0, 0, devices=jax.devices()[:2])
    state = steplib.create_train_state(config, jax.random.key(0), meshes, OPTIMIZER, total_steps=10,
                                       sharding_rules=SHARDING)
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 10, {"client": state.client.params,
                                                               "server": state.server.params})
    server = RecordingServer(in_process(config, meshes, optimizers))
    step = steplib.make_train_step(config, meshes, optimizers, mode="split", server=server)
    read, device_get = [], jax.device_get

    def spy(tree):
        read.append(tree)
        return device_get(tree)

    monkeypatch.setattr(jax, "device_get", spy)
    counters = []
    for i in range(3):
        counters.append(state.step)
        state, _ = step(state, BATCHES[i % STEPS])
    assert [s for s, _ in server.up] == [0, 1, 2]
    assert sum(any(x is c for c in counters) for x in read) == 1  # the first, given counter only
    restored = state.replace(step=jax.device_put(np.int32(7), state.step.sharding))
    state, metrics = step(restored, BATCHES[0])
    assert server.up[-1][0] == 7 and any(x is restored.step for x in read)
    assert not any(k.startswith("time_") for k in metrics)
    # time_programs: each part waited for and timed, inside the step's own wall time.
    step.time_programs = True
    t0 = time.perf_counter()
    state, metrics = step(state, BATCHES[1])
    wall = time.perf_counter() - t0
    parts = [metrics[f"time_{p}_s"] for p in ("client_begin", "exchange", "client_finish")]
    assert all(t > 0 for t in parts) and sum(parts) <= wall
    assert server.up[-1][0] == 8
    # defer_metrics: the same step's metrics as the devices' arrays, read later by host_metrics to the same numbers.
    step.time_programs = False
    twins = [steplib.create_train_state(config, jax.random.key(1), meshes, OPTIMIZER, total_steps=10,
                                        sharding_rules=SHARDING) for _ in range(2)]
    _, now = step(twins[0], BATCHES[0])
    step.defer_metrics = True
    _, later = step(twins[1], BATCHES[0])
    assert "loss" not in later and all(isinstance(later[k], jax.Array) for k in ("ce", "dist_image", "tokens"))
    assert steplib.host_metrics(later) == now and np.isfinite(now["loss"])


def test_device_batch_places_host_arrays_and_keeps_placed_ones():
    """Host arrays go onto the mesh split along the batch; arrays already there are returned as they are
    (the bench and a prefetching loop put a batch on the devices once; mesh.on_batch_sharding, which the
    link's messages also go through); arrays elsewhere are moved."""
    from qtl_jax.split.mesh import batch_sharding

    meshes = split_meshes(0, 0, devices=jax.devices()[:2])
    batch = {k: np.zeros((4, 3), np.int32) for k in qm.BATCH_KEYS}
    batch["pixel_values"] = np.ones((4, 2, 2, 3), np.float32)
    placed = steplib.device_batch(batch, meshes.client)
    for k, x in placed.items():
        assert x.sharding == batch_sharding(meshes.client, x.ndim), k
        np.testing.assert_array_equal(np.asarray(x), batch[k])
    again = steplib.device_batch(placed, meshes.client)
    assert all(again[k] is placed[k] for k in qm.BATCH_KEYS)
    elsewhere = {k: jax.device_put(v, jax.devices()[3]) for k, v in placed.items()}
    moved = steplib.device_batch(elsewhere, meshes.client)
    assert all(moved[k].sharding == placed[k].sharding for k in qm.BATCH_KEYS)
