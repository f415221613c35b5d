"""Hugging Face ``config.json`` <-> :class:`~qtl_jax.models.decoder.DecoderConfig`.

The decoder module knows only its own options; this module knows how each family's ``config.json``
spells them (Llama, Qwen2, Phi, Gemma, StableLM in ``transformers``; Apple's OpenELM with its per-layer
multipliers) and refuses what the decoder cannot reproduce (scaled RoPE, sliding windows) instead of
ignoring it. :func:`decoder_config_to_hf` is the inverse for the families ``transformers`` has, checked
by a round trip so that nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from qtl_jax.models.decoder import FAMILIES, DecoderConfig, dtype_from_name

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi": "PhiForCausalLM",
    "gemma": "GemmaForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "openelm": "OpenELMForCausalLM",
}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _rope(cfg: Mapping[str, Any], default_partial: float) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from either the v5 ``rope_parameters`` or the older flat keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported (only the default, unscaled RoPE); "
            "remove rope_scaling from config.json only if the checkpoint was trained without it"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial))
    return float(theta), float(partial)


def _extras(cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    out = []
    for key in _TOKEN_KEYS:
        value = cfg.get(key)
        if value is not None:
            out.append((key, tuple(value) if isinstance(value, list) else value))
    return tuple(out)


def make_divisible(v: float, divisor: int) -> int:
    """OpenELM's channel rounding: nearest multiple of ``divisor``, never more than 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _openelm_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Apple's OpenELM config: per-layer heads from ``qkv_multipliers`` and FFN widths from ``ffn_multipliers``."""
    n, dim, head_dim = cfg["num_transformer_layers"], cfg["model_dim"], cfg["head_dim"]

    def spread(values: Any) -> list[float]:
        # A two-entry list is a (first, last) range interpolated over the layers, as Apple's config does.
        if isinstance(values, (int, float)):
            return [float(values)] * n
        if len(values) == 2 and n != 2:
            lo, hi = float(values[0]), float(values[1])
            return [round(lo + (hi - lo) * k / (n - 1), 2) for k in range(n)]
        return [float(v) for v in values]

    heads = cfg.get("num_query_heads")
    kv_heads = cfg.get("num_kv_heads")
    if heads is None or kv_heads is None:
        groups = cfg.get("num_gqa_groups", 1)
        q_dims = [make_divisible(dim * m, head_dim * groups) for m in spread(cfg["qkv_multipliers"])]
        heads = [q // head_dim for q in q_dims]
        kv_heads = [h // groups for h in heads]
    divisor = cfg.get("ffn_dim_divisor", 256)
    widths = [make_divisible(m * dim, divisor) for m in spread(cfg["ffn_multipliers"])]
    if not cfg.get("ffn_with_glu", True):
        raise NotImplementedError("OpenELM with ffn_with_glu=false is not supported (no released checkpoint uses it)")
    if cfg.get("normalization_layer_name", "rms_norm") != "rms_norm":
        raise NotImplementedError(f"OpenELM normalization {cfg['normalization_layer_name']!r} is not supported")
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=dim,
        num_layers=n,
        num_heads=tuple(heads),
        num_kv_heads=tuple(kv_heads),
        intermediate_size=tuple(widths),
        head_dim=head_dim,
        norm="rms",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation=cfg.get("activation_fn_name", "swish"),
        gated_mlp=True,
        qk_norm="rms" if cfg.get("normalize_qk_projections", True) else "none",
        rope_theta=float(cfg.get("rope_freq_constant", 10000)),
        tie_word_embeddings=cfg.get("share_input_output_layers", True),
        max_position_embeddings=cfg.get("max_context_length", 2048),
    )


def _decoder_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"unsupported causal-LM model_type {family!r}; supported: {', '.join(FAMILIES)}. "
            "To add a family see docs/models_llm.md"
        )
    extra = {"family": family, "extras": _extras(cfg)}
    if family == "openelm":
        return {**_openelm_kwargs(cfg), **extra}
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    kw = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=d,
        num_layers=cfg["num_hidden_layers"],
        num_heads=h,
        num_kv_heads=cfg.get("num_key_value_heads") or h,
        intermediate_size=cfg["intermediate_size"],
        head_dim=cfg.get("head_dim") or d // h,
        activation=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", family == "gemma"),
    )
    if family in ("llama", "qwen2", "gemma"):
        kw.update(norm="rms", norm_eps=cfg.get("rms_norm_eps", 1e-6))
        kw["rope_theta"], kw["partial_rotary_factor"] = _rope(cfg, 1.0)
    if family == "llama":
        bias = cfg.get("attention_bias", False)
        kw.update(qkv_bias=bias, o_bias=bias, mlp_bias=cfg.get("mlp_bias", False))
    elif family == "qwen2":
        if cfg.get("use_sliding_window", False):
            raise NotImplementedError("Qwen2 with use_sliding_window=true is not supported (full attention only)")
        kw.update(qkv_bias=True)
    elif family == "gemma":
        bias = cfg.get("attention_bias", False)
        # Older Gemma configs name the activation `hidden_activation` and keep an unused `hidden_act`.
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "gelu_pytorch_tanh")
        kw.update(
            qkv_bias=bias, o_bias=bias, norm_offset=1.0, activation=act, embed_scale=math.sqrt(d),
            head_dim=cfg.get("head_dim") or 256,
        )
    elif family == "phi":
        kw["rope_theta"], kw["partial_rotary_factor"] = _rope(cfg, 0.5)
        kw.update(
            norm="layer", norm_bias=True, norm_eps=cfg.get("layer_norm_eps", 1e-5),
            activation=cfg.get("hidden_act", "gelu_new"), gated_mlp=False, qkv_bias=True, o_bias=True,
            mlp_bias=True, lm_head_bias=True, parallel_residual=True,
            qk_norm="layer" if cfg.get("qk_layernorm", False) else "none",
        )
    elif family == "stablelm":
        kw["rope_theta"], kw["partial_rotary_factor"] = _rope(cfg, 0.25)
        kw.update(
            norm="layer", norm_bias=True, norm_eps=cfg.get("layer_norm_eps", 1e-5), head_dim=d // h,
            qkv_bias=cfg.get("use_qkv_bias", False), parallel_residual=cfg.get("use_parallel_residual", False),
            qk_norm="layer_per_head" if cfg.get("qk_layernorm", False) else "none",
        )
    return {**kw, **extra}


def _uniform(config: DecoderConfig, name: str) -> int:
    values = set(getattr(config, name))
    if len(values) != 1:
        raise NotImplementedError(f"{config.family}: transformers needs the same {name} in every layer, got {values}")
    return values.pop()


def decoder_config_from_hf(cfg: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
    """Reads a causal-LM ``config.json`` dict; ``overrides`` (e.g. ``dtype``, ``remat``) win."""
    kwargs = {**_decoder_kwargs(cfg), **overrides}
    kwargs["dtype"] = dtype_from_name(kwargs.get("dtype", jnp.float32))
    kwargs["param_dtype"] = dtype_from_name(kwargs.get("param_dtype", jnp.float32))
    return DecoderConfig.make(**kwargs)


def decoder_config_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """The ``config.json`` dict ``transformers`` builds this model from (not for OpenELM)."""
    family = config.family
    if family == "openelm":
        raise NotImplementedError(
            "OpenELM is not in transformers, so there is no config to export it to; save the params with "
            "qtl_jax.weights.llm_maps rules and Apple's config.json instead"
        )
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if family in ("phi", "stablelm"):
        rope_parameters["partial_rotary_factor"] = config.partial_rotary_factor
    out: dict[str, Any] = dict(
        model_type=family,
        architectures=[_ARCHITECTURES[family]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=_uniform(config, "num_heads"),
        num_key_value_heads=_uniform(config, "num_kv_heads"),
        intermediate_size=_uniform(config, "intermediate_size"),
        head_dim=config.head_dim,
        hidden_act=config.activation,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope_parameters,
    )
    if family in ("llama", "qwen2", "gemma"):
        out["rms_norm_eps"] = config.norm_eps
    else:
        out["layer_norm_eps"] = config.norm_eps
    if family in ("llama", "gemma"):
        out["attention_bias"] = config.qkv_bias
    if family == "llama":
        out["mlp_bias"] = config.mlp_bias
    if family == "phi":
        out["qk_layernorm"] = config.qk_norm == "layer"
    if family == "stablelm":
        out.update(
            use_qkv_bias=config.qkv_bias,
            qk_layernorm=config.qk_norm == "layer_per_head",
            use_parallel_residual=config.parallel_residual,
        )
    for key, value in config.extras:
        out[key] = list(value) if isinstance(value, tuple) else value
    # Options HF's class for this family cannot express would be silently lost: refuse instead.
    back = decoder_config_from_hf(out, dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat)
    if back != config:
        diff = {
            f.name: (getattr(config, f.name), getattr(back, f.name))
            for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(back, f.name)
        }
        raise NotImplementedError(f"transformers' {family} config cannot express these settings (ours, theirs): {diff}")
    return out

