"""Key maps from Hugging Face causal-LM checkpoints to :class:`~qtl_jax.models.decoder.Decoder` params.

Sources are the keys ``AutoModelForCausalLM.save_pretrained`` writes (``model.layers.{i}...``,
``lm_head.weight``; Apple's OpenELM: ``transformer.layers.{i}...``). Targets are Decoder param paths
without a prefix; LLaVA-style layouts re-prefix them with :func:`qtl_jax.weights.keymap.with_prefix`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from qtl_jax.models.decoder import Decoder, DecoderConfig, init_shapes
from qtl_jax.weights import keymap, safetensors_io
from qtl_jax.weights.hf_config import decoder_config_from_hf
from qtl_jax.weights.keymap import IDENTITY, LINEAR, Rule, Split


def _dense(source: str, target: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{source}.weight", f"{target}/kernel", LINEAR)]
    if bias:
        rules.append(Rule(f"{source}.bias", f"{target}/bias", IDENTITY))
    return rules


def _norm(source: str, target: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{source}.weight", f"{target}/scale", IDENTITY)]
    if bias:
        rules.append(Rule(f"{source}.bias", f"{target}/bias", IDENTITY))
    return rules


def _head(config: DecoderConfig) -> list[Rule]:
    if config.tie_word_embeddings:
        # Some tied checkpoints still store a copy of the table; it must equal the embedding, so drop it.
        return [Rule("lm_head.weight", None)]
    return _dense("lm_head", "lm_head", config.lm_head_bias)


def _hf_rules(config: DecoderConfig) -> list[Rule]:
    layer, dst = "model.layers.{i}", "layers_{i}"
    phi = config.family == "phi"
    rules = [Rule("model.embed_tokens.weight", "embed_tokens/embedding")]
    for x in ("q", "k", "v"):
        rules += _dense(f"{layer}.self_attn.{x}_proj", f"{dst}/attn/{x}_proj", config.qkv_bias)
    rules += _dense(f"{layer}.self_attn.{'dense' if phi else 'o_proj'}", f"{dst}/attn/o_proj", config.o_bias)
    if config.gated_mlp:
        rules += _dense(f"{layer}.mlp.gate_proj", f"{dst}/mlp/gate_proj", config.mlp_bias)
        rules += _dense(f"{layer}.mlp.up_proj", f"{dst}/mlp/up_proj", config.mlp_bias)
        rules += _dense(f"{layer}.mlp.down_proj", f"{dst}/mlp/down_proj", config.mlp_bias)
    else:
        up, down = ("fc1", "fc2") if phi else ("up_proj", "down_proj")
        rules += _dense(f"{layer}.mlp.{up}", f"{dst}/mlp/up_proj", config.mlp_bias)
        rules += _dense(f"{layer}.mlp.{down}", f"{dst}/mlp/down_proj", config.mlp_bias)
    rules += _norm(f"{layer}.input_layernorm", f"{dst}/input_norm", config.norm_bias)
    if not config.parallel_residual:
        rules += _norm(f"{layer}.post_attention_layernorm", f"{dst}/post_attention_norm", config.norm_bias)
    if config.qk_norm == "layer":  # Phi: one LayerNorm shared by all heads
        rules += _norm(f"{layer}.self_attn.q_layernorm", f"{dst}/attn/q_norm", True)
        rules += _norm(f"{layer}.self_attn.k_layernorm", f"{dst}/attn/k_norm", True)
    elif config.qk_norm == "layer_per_head":  # StableLM: one bias-free LayerNorm per head
        rules.append(Rule(f"{layer}.self_attn.q_layernorm.norms.{{h}}.weight", f"{dst}/attn/q_norm/head_{{h}}/scale"))
        rules.append(Rule(f"{layer}.self_attn.k_layernorm.norms.{{h}}.weight", f"{dst}/attn/k_norm/head_{{h}}/scale"))
    elif config.qk_norm != "none":
        raise ValueError(f"{config.family} checkpoints have no {config.qk_norm!r} qk-norm; check the config")
    rules += _norm("model.final_layernorm" if phi else "model.norm", "norm", config.norm_bias)
    rules += _head(config)
    # Rotary caches some older checkpoints serialised; they are recomputed from the config.
    rules += [Rule(f"{layer}.self_attn.rotary_emb.{{name:\\w+}}", None), Rule("model.rotary_emb.{name:\\w+}", None)]
    return rules


def _openelm_rules(config: DecoderConfig) -> list[Rule]:
    layer, dst = "transformer.layers.{i}", "layers_{i}"
    d = config.head_dim

    def qkv_sizes(ctx: keymap.Context) -> tuple[int, int, int]:
        i = ctx.int("i")
        return config.num_heads[i] * d, config.num_kv_heads[i] * d, config.num_kv_heads[i] * d

    def ffn_sizes(ctx: keymap.Context) -> tuple[int, int]:
        width = config.intermediate_size[ctx.int("i")]
        return width, width

    rules = [
        Rule("transformer.token_embeddings.weight", "embed_tokens/embedding"),
        # Fused rows: all query heads, then key heads, then value heads.
        Rule(
            f"{layer}.attn.qkv_proj.weight",
            tuple(f"{dst}/attn/{x}_proj/kernel" for x in "qkv"),
            Split(0, qkv_sizes, LINEAR),
        ),
        *_dense(f"{layer}.attn.out_proj", f"{dst}/attn/o_proj", False),
        # Fused rows: gate half first, then up.
        Rule(f"{layer}.ffn.proj_1.weight", (f"{dst}/mlp/gate_proj/kernel", f"{dst}/mlp/up_proj/kernel"),
             Split(0, ffn_sizes, LINEAR)),
        *_dense(f"{layer}.ffn.proj_2", f"{dst}/mlp/down_proj", False),
        *_norm(f"{layer}.attn_norm", f"{dst}/input_norm", False),
        *_norm(f"{layer}.ffn_norm", f"{dst}/post_attention_norm", False),
        *_norm("transformer.norm", "norm", False),
        *_head(config),
        Rule(f"{layer}.attn.pos_embedding.{{name:\\w+}}", None),
    ]
    if config.qk_norm == "rms":
        rules += _norm(f"{layer}.attn.q_norm", f"{dst}/attn/q_norm", False)
        rules += _norm(f"{layer}.attn.k_norm", f"{dst}/attn/k_norm", False)
    return rules


def llm_rules(config: DecoderConfig) -> list[Rule]:
    """Checkpoint-key -> Decoder-param rules for ``config``'s family (no prefixes)."""
    if config.family == "openelm":
        return _openelm_rules(config)
    return _hf_rules(config)


def read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no config.json; expected a causal-LM directory from save_pretrained")
    with open(file) as f:
        return json.load(f)


def load_causal_lm(path: str, **overrides: Any) -> tuple[Decoder, dict[str, Any]]:
    """Loads a plain causal-LM directory (``config.json`` + safetensors) -> ``(Decoder, params)``.

    ``overrides`` go to :func:`~qtl_jax.weights.hf_config.decoder_config_from_hf` (e.g. ``dtype='bfloat16'``, ``remat=True``).
    Params are float32 (``param_dtype``) jax arrays; every checkpoint tensor must map to a parameter.
    """
    config = decoder_config_from_hf(read_config(path), **overrides)
    checkpoint = safetensors_io.read_dir(path)
    flat = keymap.convert(
        checkpoint,
        llm_rules(config),
        keymap.shapes(init_shapes(config)),
        config=config,
        dtype=config.param_dtype,
        name=f"causal LM checkpoint {path}",
    )
    params = jax.tree.map(jnp.asarray, keymap.unflatten(flat))
    return Decoder(config), params
