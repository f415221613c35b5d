"""Decoder pieces without a reference model: config mapping and validation, RoPE, attention, padding,
param layout, and the errors bad input gets. Parity with the reference models is in
test_decoder_parity.py."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.models import rope
from qtl_jax.models.decoder import Decoder, DecoderConfig, dot_product_attention, init_shapes
from qtl_jax.weights import keymap, safetensors_io
from qtl_jax.weights.hf_config import decoder_config_from_hf, decoder_config_to_hf
from qtl_jax.weights.llm_maps import llm_rules, load_causal_lm
from tolerances import layers_tolerance, rounding_tolerance

LLAMA_HF = dict(
    model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=10000.0,
)

# Apple's OpenELM-270M config.json fields that determine shapes (per-layer lists are derived).
OPENELM_270M = dict(
    model_type="openelm", num_transformer_layers=16, model_dim=1280, head_dim=64, vocab_size=32000,
    qkv_multipliers=[0.5, 1.0], num_gqa_groups=4, ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=256,
    normalize_qk_projections=True, share_input_output_layers=True, rope_freq_constant=10000,
    max_context_length=2048,
)


# ---- config mapping --------------------------------------------------------------------------------


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unsupported causal-LM model_type 'mistral'.*llama, qwen2, phi, gemma"):
        decoder_config_from_hf({**LLAMA_HF, "model_type": "mistral"})


def test_bad_head_counts_are_reported_per_layer():
    with pytest.raises(ValueError, match="layer 1: 6 query heads is not a multiple of 4 key/value heads"):
        DecoderConfig.make(family="llama", vocab_size=8, hidden_size=16, num_layers=2, num_heads=(4, 6),
                           num_kv_heads=(2, 4), intermediate_size=8, head_dim=4)
    with pytest.raises(ValueError, match="num_heads has 3 entries but the model has 2 layers"):
        DecoderConfig.make(family="llama", vocab_size=8, hidden_size=16, num_layers=2, num_heads=(4, 4, 4),
                           num_kv_heads=2, intermediate_size=8, head_dim=4)


def test_odd_rotary_dim_is_rejected():
    with pytest.raises(ValueError, match=r"rotary dim int\(16 \* 0.1\) = 1 must be a positive even number"):
        rope.rotary_dim(16, 0.1)


def test_scaled_rope_and_sliding_window_are_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="rope type 'llama3'"):
        decoder_config_from_hf({**LLAMA_HF, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(NotImplementedError, match="sliding_window"):
        decoder_config_from_hf({**LLAMA_HF, "model_type": "qwen2", "use_sliding_window": True})


def test_v4_and_v5_rope_fields_read_the_same():
    old = decoder_config_from_hf({**LLAMA_HF, "model_type": "phi", "rope_theta": 500.0, "partial_rotary_factor": 0.4,
                                 "hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 2})
    new = decoder_config_from_hf({
        **{k: v for k, v in LLAMA_HF.items() if k != "rope_theta"}, "model_type": "phi", "hidden_size": 40,
        "num_attention_heads": 2, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.4},
    })
    assert old == new
    assert (old.rope_theta, old.partial_rotary_factor, old.rotary_dim) == (500.0, 0.4, 8)


def test_family_specific_options():
    gemma = decoder_config_from_hf({**LLAMA_HF, "model_type": "gemma", "head_dim": 24, "hidden_act": "gelu",
                                   "hidden_activation": "gelu_pytorch_tanh"})
    assert (gemma.norm_offset, gemma.embed_scale, gemma.head_dim) == (1.0, math.sqrt(32), 24)
    assert gemma.activation == "gelu_pytorch_tanh" and gemma.tie_word_embeddings
    phi = decoder_config_from_hf({**LLAMA_HF, "model_type": "phi"})
    assert phi.parallel_residual and not phi.gated_mlp and phi.lm_head_bias and phi.norm == "layer"
    assert phi.partial_rotary_factor == 0.5 and phi.activation == "gelu_new"
    stablelm = decoder_config_from_hf({**LLAMA_HF, "model_type": "stablelm", "qk_layernorm": True})
    assert stablelm.qk_norm == "layer_per_head" and stablelm.partial_rotary_factor == 0.25
    qwen2 = decoder_config_from_hf({**LLAMA_HF, "model_type": "qwen2"})
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.tie_word_embeddings


def test_openelm_270m_shapes_from_apples_config():
    cfg = decoder_config_from_hf(OPENELM_270M)
    assert cfg.num_heads == (12,) * 5 + (16,) * 7 + (20,) * 4
    assert cfg.num_kv_heads == (3,) * 5 + (4,) * 7 + (5,) * 4
    assert cfg.intermediate_size[0] == 768 and cfg.intermediate_size[-1] == 5120
    assert all(w % 256 == 0 for w in cfg.intermediate_size)
    assert cfg.qk_norm == "rms" and cfg.tie_word_embeddings and cfg.activation == "swish"
    # Explicit per-layer lists, as the saved config.json carries them, win over the multipliers.
    listed = decoder_config_from_hf({**OPENELM_270M, "num_query_heads": list(cfg.num_heads),
                                    "num_kv_heads": list(cfg.num_kv_heads)})
    assert listed == cfg
    # ~270M parameters, computed without allocating them.
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(init_shapes(cfg)))
    assert 265e6 < n < 280e6, n


def test_to_hf_round_trips_and_refuses_what_transformers_cannot_express():
    cfg = decoder_config_from_hf({**LLAMA_HF, "attention_bias": True, "bos_token_id": 1, "eos_token_id": [2, 3]})
    out = decoder_config_to_hf(cfg)
    assert out["architectures"] == ["LlamaForCausalLM"] and out["eos_token_id"] == [2, 3]
    assert decoder_config_from_hf(out) == cfg
    with pytest.raises(NotImplementedError, match="OpenELM is not in transformers"):
        decoder_config_to_hf(decoder_config_from_hf(OPENELM_270M))
    mixed = DecoderConfig.make(family="llama", vocab_size=8, hidden_size=16, num_layers=2, num_heads=(4, 2),
                               num_kv_heads=2, intermediate_size=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="same num_heads in every layer"):
        decoder_config_to_hf(mixed)
    import dataclasses

    odd = dataclasses.replace(cfg, lm_head_bias=True)  # llama has no lm_head bias option
    with pytest.raises(NotImplementedError, match="lm_head_bias"):
        decoder_config_to_hf(odd)


# ---- building blocks --------------------------------------------------------------------------------


def test_rotary_is_a_rotation_of_the_leading_channels_only():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cos, sin = rope.cos_sin(pos, 8, 10.0, jnp.float32)
    y = rope.apply_rotary(x, cos, sin)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])  # pass-through channels
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0 is the identity
    # Each (k, k + dim/2) pair is rotated, so its norm is preserved.
    pair = lambda a: a[..., :4] ** 2 + a[..., 4:8] ** 2  # noqa: E731
    np.testing.assert_allclose(pair(y), pair(x), rtol=1e-5)
    # Relative-position property: <R(p)q, R(p')k> depends only on p - p'.
    q, k = x[0, 0, 0], x[0, 1, 0]
    def dot(p1, p2):
        c, s = rope.cos_sin(jnp.array([[p1, p2]]), 8, 10.0, jnp.float32)
        r = rope.apply_rotary(jnp.stack([q, k])[None, :, None], c, s)[0, :, 0]
        return float(r[0] @ r[1])
    assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-4)


def test_grouped_attention_equals_repeated_kv_heads():
    rng = np.random.default_rng(1)
    b, t, h, kv, d = 2, 6, 6, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    mask = np.ones((b, t), bool)
    mask[1, :2] = False
    allowed = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :]
    out = np.asarray(dot_product_attention(q, k, v, allowed, d**-0.5)).reshape(b, t, h, d)
    # Reference: HF repeat_kv order (query head i reads kv head i // (h / kv)), plain softmax.
    kr, vr = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kr) * d**-0.5
    s = np.where(allowed[:, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bshd->bthd", p, vr)
    real = mask[:, :, None, None] & np.ones_like(ref, bool)
    # Two reductions (over d = 8, then t = 6 keys) in float32 against numpy float64 (tests/tolerances.py).
    tol = rounding_tolerance(np.float32, d, 2, np.abs(ref).max())
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=tol, rtol=0)
    assert np.isfinite(out).all()  # fully masked (padding) rows do not produce NaN


# ---- the module --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    cfg = decoder_config_from_hf(LLAMA_HF)
    model = Decoder(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 32)), jnp.ones((1, 4), jnp.int32))["params"]
    # Unit-scale weights so logits are not ~0.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) + (x if x.ndim == 1 else 0)
                                       for k, x in zip(keys, leaves)])
    forward = jax.jit(lambda p, e, m: model.apply({"params": p}, e, m))
    return cfg, model, params, forward


def test_init_creates_every_parameter_with_stable_names(llama):
    cfg, _, params, _ = llama
    flat = keymap.shapes(params)
    assert flat["embed_tokens/embedding"] == (64, 32)
    assert flat["lm_head/kernel"] == (32, 64)
    assert flat["layers_1/attn/k_proj/kernel"] == (32, 2 * 8)
    assert flat["layers_0/mlp/gate_proj/kernel"] == (32, 48)
    assert flat["layers_0/post_attention_norm/scale"] == (32,)
    assert flat["norm/scale"] == (32,)
    assert flat == keymap.shapes(init_shapes(cfg))
    assert len(flat) == 3 + 2 * 9
    tied_flat = keymap.shapes(init_shapes(decoder_config_from_hf({**LLAMA_HF, "tie_word_embeddings": True})))
    assert "lm_head/kernel" not in tied_flat and "embed_tokens/embedding" in tied_flat


def test_padding_on_either_side_leaves_real_token_logits_unchanged(llama):
    _, model, params, forward = llama
    ids = np.random.default_rng(2).integers(0, 64, (1, 7))
    embeds = model.apply({"params": params}, ids, method=Decoder.embed)
    alone = np.asarray(forward(params, embeds, jnp.ones((1, 7), jnp.int32)))[0]
    pad = jnp.zeros((1, 3, 32))
    batch = jnp.concatenate([jnp.concatenate([pad, embeds], 1), jnp.concatenate([embeds, pad], 1)])
    mask = np.array([[0] * 3 + [1] * 7, [1] * 7 + [0] * 3])
    out = np.asarray(forward(params, batch, mask))
    # Padding changes the reduction lengths (and so their order), nothing else.
    tol = layers_tolerance(alone, width=LLAMA_HF["intermediate_size"], layers=LLAMA_HF["num_hidden_layers"])
    np.testing.assert_allclose(out[0, 3:], alone, atol=tol, rtol=0)
    np.testing.assert_allclose(out[1, :7], alone, atol=tol, rtol=0)
    assert alone.std() > 0.1


def test_explicit_position_ids_override_the_default(llama):
    _, model, params, forward = llama
    embeds = model.apply({"params": params}, np.arange(7)[None], method=Decoder.embed)
    mask = jnp.ones((1, 7), jnp.int32)
    with_positions = jax.jit(lambda p, e, m, pos: model.apply({"params": p}, e, m, pos))
    default = forward(params, embeds, mask)
    same = with_positions(params, embeds, mask, jnp.arange(7)[None])
    shifted = with_positions(params, embeds, mask, jnp.arange(7)[None] + 3)
    np.testing.assert_array_equal(same, default)  # the same program on the same positions
    # RoPE is relative: a constant shift changes nothing in exact arithmetic, so only rounding differs: of
    # the angles (position * frequency, up to 10 rad, so ~10 eps absolute) and then of the layers.
    tol = layers_tolerance(default, width=LLAMA_HF["intermediate_size"], layers=LLAMA_HF["num_hidden_layers"]) * 10
    np.testing.assert_allclose(shifted, default, atol=tol, rtol=0)
    assert not np.array_equal(np.asarray(shifted), np.asarray(default))


def test_gemma_scales_inputs_in_call_not_in_embed():
    cfg = decoder_config_from_hf({**LLAMA_HF, "model_type": "gemma", "head_dim": 8})
    model = Decoder(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2, 32)), jnp.ones((1, 2)))["params"]
    table = params["embed_tokens"]["embedding"]
    got = model.apply({"params": params}, jnp.array([[3, 5]]), method=Decoder.embed)
    np.testing.assert_array_equal(got[0], table[jnp.array([3, 5])])


def test_bad_inputs_are_clear_errors(llama):
    _, model, params, _ = llama
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, 32\].*Decoder.embed"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq\] = \(1, 4\)"):
        model.apply({"params": params}, jnp.zeros((1, 4, 32)), jnp.ones((1, 5)))


# ---- loading --------------------------------------------------------------------------------------


def _write_causal_lm(path, config_dict, tensors):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f)
    safetensors_io.write_file(os.path.join(path, "model.safetensors"), tensors)


def test_load_round_trips_exported_params_and_ignores_rotary_buffers(llama, tmp_path):
    cfg, _, params, _ = llama
    tensors = keymap.export(keymap.flatten(jax.tree.map(np.asarray, params)), llm_rules(cfg))
    assert "model.layers.1.self_attn.o_proj.weight" in tensors and "lm_head.weight" in tensors
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    _write_causal_lm(tmp_path, LLAMA_HF, tensors)
    model, loaded = load_causal_lm(str(tmp_path))
    assert model.config == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_load_lists_every_unmapped_and_missing_tensor(llama, tmp_path):
    cfg, _, params, _ = llama
    tensors = keymap.export(keymap.flatten(jax.tree.map(np.asarray, params)), llm_rules(cfg))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(2, np.float32)
    _write_causal_lm(tmp_path, LLAMA_HF, tensors)
    with pytest.raises(keymap.WeightMismatchError) as err:
        load_causal_lm(str(tmp_path))
    msg = str(err.value)
    for name in ("model.layers.0.self_attn.extra.weight", "layers_1/mlp/up_proj/kernel", "norm/scale"):
        assert name in msg


def test_load_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_causal_lm(str(tmp_path))


def test_silu_gate_gradients_equal_autodiff_and_keep_only_its_inputs():
    from qtl_jax.models.decoder import silu_gate
    from tolerances import rounding_tolerance

    rng = np.random.default_rng(0)
    gate, up, g = (rng.normal(size=(2, 5, 12)) * 4 for _ in range(3))  # gates deep in both tails too
    with jax.enable_x64(True):
        want = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)[1](g)
        out, backward = jax.vjp(silu_gate, gate, up)
        got = backward(g)
        np.testing.assert_array_equal(out, jax.nn.silu(gate) * up)
        for w, x in zip(want, got):  # the same formula, ordered differently: float64 rounding
            np.testing.assert_allclose(x, w, rtol=0, atol=rounding_tolerance(np.float64, 4, scale=float(np.max(np.abs(w)))))
    # The backward keeps gate and up, not the sigmoid, silu or their product as autodiff does.
    gate32, up32 = jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32)
    kept = [x for x in jax.tree.leaves(jax.vjp(silu_gate, gate32, up32)[1]) if hasattr(x, "shape")]
    assert len(kept) == 2 and all(x.shape == gate.shape for x in kept)
