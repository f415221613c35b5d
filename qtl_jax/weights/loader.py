"""``load_pretrained``: a local TinyLLaVA-style checkpoint directory -> ``(TinyLlava, params)``.

Reads ``config.json`` + safetensors (single file or sharded via the index json; no torch),
detects the layout from the tensor names (:mod:`qtl_jax.weights.layouts`), builds the config from
``config.json`` and converts through the layout's declarative key map. Every tensor must be consumed
and every parameter filled; otherwise one :class:`~qtl_jax.weights.keymap.WeightMismatchError`
lists all problems.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from qtl_jax.data.constants import IMAGE_TOKEN_INDEX
from qtl_jax.models.connector import Connector, ConnectorConfig
from qtl_jax.models.decoder import FAMILIES, dtype_from_name, init_shapes
from qtl_jax.models.tinyllava import TinyLlava, TinyLlavaConfig, abstract_params
from qtl_jax.models.vision import VisionConfig, VisionTower, vision_rules
from qtl_jax.weights import keymap, layouts, safetensors_io
from qtl_jax.weights.hf_config import decoder_config_from_hf
from qtl_jax.weights.keymap import Rule, with_prefix
from qtl_jax.weights.llm_maps import llm_rules

# Config fields callers may override at load time.
_OVERRIDES = ("max_length", "max_images_per_sample", "padding_side", "remat", "scale_image_embeddings")


def _read_json(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json; expected a directory written by save_pretrained")
    with open(file) as f:
        return json.load(f)


def _strategy(cfg: Mapping[str, Any], default: str) -> str:
    return cfg.get("vision_feature_select_strategy") or cfg.get("mm_vision_select_feature") or default


def _layer(cfg: Mapping[str, Any]) -> int:
    layer = cfg.get("vision_feature_layer", cfg.get("mm_vision_select_layer", -2))
    if not isinstance(layer, int):
        raise NotImplementedError(f"only a single vision feature layer is supported, got {layer!r}")
    return layer


def _legacy_text_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Legacy LLaVA configs are the LLM's config with mm_* fields and a model_type like 'llava_llama'."""
    model_type = str(cfg.get("model_type", ""))
    family = cfg.get("llm_family") or next((f for f in FAMILIES if model_type.endswith(f)), None)
    if family is None:
        raise ValueError(
            f"legacy LLaVA config model_type {model_type!r} names no supported LLM family ({', '.join(FAMILIES)}); "
            "add 'llm_family' to config.json"
        )
    return {**cfg, "model_type": family}


def config_from_hf(cfg: Mapping[str, Any], layout: layouts.Layout, vision_config: Mapping | None = None) -> TinyLlavaConfig:
    """A layout's ``config.json`` dict -> :class:`TinyLlavaConfig` (dtype fp32, no remat)."""
    if layout.connector_naming == "llava_hf":
        if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
            raise NotImplementedError("only llava-hf projectors with exact GELU and biases are supported")
        text, vision_cfg = cfg["text_config"], cfg["vision_config"]
        connector_type = "mlp2x_gelu"
        strategy = _strategy(cfg, "default")
        convention = "llava_hf"
        image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
    elif layout.name in ("factory", "quantized_tinyllava"):
        text, vision_cfg = cfg["text_config"], cfg["vision_config"]
        connector_type = cfg.get("connector_type") or "mlp2x_gelu"
        strategy = _strategy(cfg, "patch")
        convention, image_token = "factory", IMAGE_TOKEN_INDEX
    else:  # legacy LLaVA: LLM fields at top level, the vision tower only named by its hub id
        text = _legacy_text_config(cfg)
        vision_cfg = vision_config or cfg.get("vision_config")
        if vision_cfg is None:
            raise ValueError(
                f"legacy LLaVA config names its vision tower only by hub id ({cfg.get('mm_vision_tower')!r}); "
                "pass vision_config=<dict or directory with the vision model's config.json>"
            )
        connector_type = cfg.get("mm_projector_type") or "linear"
        strategy = _strategy(cfg, "patch")
        convention, image_token = "factory", IMAGE_TOKEN_INDEX
    if isinstance(vision_cfg, str):
        vision_cfg = _read_json(vision_cfg)
    llm = decoder_config_from_hf(text)
    if layout.connector_naming == "llava_hf" and llm.lm_head_bias:
        # LlavaForConditionalGeneration owns a bias-free lm_head, so e.g. Phi's head bias does not exist there.
        llm = dataclasses.replace(llm, lm_head_bias=False)
    vision = VisionConfig.from_hf(vision_cfg)
    return TinyLlavaConfig(
        vision=vision,
        connector=ConnectorConfig(connector_type, vision.hidden_size, llm.hidden_size),
        llm=llm,
        vision_feature_layer=_layer(cfg),
        vision_feature_select_strategy=strategy,
        image_token_index=image_token,
        convention=convention,
        padding_side=cfg.get("tokenizer_padding_side", "right"),
    )


def _finish(config: TinyLlavaConfig, dtype: Any, overrides: Mapping[str, Any]) -> TinyLlavaConfig:
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise TypeError(f"unknown load_pretrained options {sorted(unknown)}; allowed: dtype, {', '.join(_OVERRIDES)}")
    return dataclasses.replace(config, dtype=dtype_from_name(dtype), **overrides)


def _convert(checkpoint, rules, config: TinyLlavaConfig, where: str) -> dict[str, Any]:
    flat = keymap.convert(checkpoint, rules, keymap.shapes(abstract_params(config)), config=config, name=where)
    return jax.tree.map(jnp.asarray, keymap.unflatten(flat))


def load_pretrained(
    path: str | tuple[str, str] | None = None,
    *,
    vision_dir: str | None = None,
    llm_dir: str | None = None,
    key: jax.Array | None = None,
    connector_type: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "patch",
    vision_config: Mapping[str, Any] | str | None = None,
    drop_quantizer: bool = False,
    dtype: Any = jnp.float32,
    verbose: bool = True,
    **overrides: Any,
) -> tuple[TinyLlava, dict[str, Any]]:
    """Loads a local checkpoint; prints which layout it detected (``verbose``).

    * ``load_pretrained(dir)``: a TinyLLaVA Factory, official Quantized-TinyLLaVA, legacy LLaVA or
      llava-hf (both namings) directory.
    * ``load_pretrained(vision_dir=..., llm_dir=...)`` (or ``load_pretrained((vision_dir, llm_dir))``):
      a SigLIP/CLIP vision checkpoint and a causal LM, for stage 1. The connector
      (``connector_type``) is freshly initialised N(0, 0.02^2) with zero bias from ``key`` (required).
    * ``dtype`` is the compute dtype (params are always fp32); ``overrides``: ``max_length``,
      ``max_images_per_sample``, ``padding_side``, ``remat``, ``scale_image_embeddings``.
    * Quantized-TinyLLaVA checkpoints carry quantizer projections this loader does not load yet:
      pass ``drop_quantizer=True`` to load the base model and skip them explicitly.
    """
    if isinstance(path, tuple):
        vision_dir, llm_dir = path
        path = None
    if path is None:
        if vision_dir is None or llm_dir is None:
            raise TypeError("give a checkpoint directory, or both vision_dir= and llm_dir=")
        return load_components(
            vision_dir, llm_dir, key=key, connector_type=connector_type, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, dtype=dtype, verbose=verbose, **overrides,
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a local directory (qtl_jax never downloads checkpoints)")
    cfg = _read_json(path)
    checkpoint = safetensors_io.read_dir(path)
    layout = layouts.detect(checkpoint, where=path)
    if verbose:
        print(f"qtl_jax: {path}: detected layout '{layout.name}': {layout.description}")
    extra: list[Rule] = []
    if layout.name == "quantized_tinyllava":
        if not drop_quantizer:
            raise NotImplementedError(
                f"{path} is an official Quantized-TinyLLaVA checkpoint: load_pretrained returns the base model only "
                "and cannot consume its VQ.quantizer_* projections (the TinyLlava module has no quantizer yet). "
                "Pass drop_quantizer=True to load the base model (vision tower, connector, LLM) and skip them, "
                "and load_quantizer_params(path) for the projections."
            )
        extra = layouts.quantizer_rules()
    config = _finish(config_from_hf(cfg, layout, vision_config), dtype, overrides)
    rules = extra + layouts.layout_rules(layout, config.vision, config.connector, llm_rules(config.llm), checkpoint)
    params = _convert(checkpoint, rules, config, f"{layout.name} checkpoint {path}")
    return TinyLlava(config), params


# Tensors of a full SigLIP / CLIP dual encoder that the vision tower does not use.
_DUAL_ENCODER_EXTRAS = [
    Rule("text_model.{rest:.+}", None),
    Rule("logit_scale", None),
    Rule("logit_bias", None),
    Rule("text_projection.{rest:.+}", None),
    Rule("visual_projection.{rest:.+}", None),
]


def load_vision(path: str) -> tuple[VisionConfig, dict[str, Any]]:
    """A SigLIP/CLIP vision (or full dual-encoder) checkpoint -> ``(VisionConfig, VisionTower params)``."""
    config = VisionConfig.from_hf(_read_json(path))
    checkpoint = safetensors_io.read_dir(path)
    prefix = layouts.vision_key_prefix(checkpoint, "")
    rules = with_prefix(vision_rules(config), prefix) + _DUAL_ENCODER_EXTRAS
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    expected = keymap.shapes(jax.eval_shape(VisionTower(config).init, jax.random.key(0), x)["params"])
    flat = keymap.convert(checkpoint, rules, expected, config=config, name=f"vision checkpoint {path}")
    return config, jax.tree.map(jnp.asarray, keymap.unflatten(flat))


def load_components(
    vision_dir: str,
    llm_dir: str,
    *,
    key: jax.Array | None,
    connector_type: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "patch",
    dtype: Any = jnp.float32,
    verbose: bool = True,
    **overrides: Any,
) -> tuple[TinyLlava, dict[str, Any]]:
    """Stage-1 start: pretrained vision tower + pretrained causal LM + a fresh connector from ``key``."""
    if key is None:
        raise TypeError("loading component checkpoints initialises the connector: pass key=jax.random.key(seed)")
    vision, vision_params = load_vision(vision_dir)
    llm = decoder_config_from_hf(_read_json(llm_dir))
    llm_flat = keymap.convert(
        safetensors_io.read_dir(llm_dir), llm_rules(llm), keymap.shapes(init_shapes(llm)), config=llm,
        name=f"causal LM checkpoint {llm_dir}",
    )
    connector = ConnectorConfig(connector_type, vision.hidden_size, llm.hidden_size)
    config = _finish(
        TinyLlavaConfig(
            vision=vision, connector=connector, llm=llm, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
        ),
        dtype,
        overrides,
    )
    if verbose:
        print(
            f"qtl_jax: components: {vision.kind} vision tower from {vision_dir}, {llm.family} LLM from {llm_dir}, "
            f"fresh {connector_type} connector"
        )
    connector_params = Connector(connector).init(key, jnp.zeros((1, vision.hidden_size)))["params"]
    params = {
        "vision_tower": vision_params,
        "connector": connector_params,
        "llm": jax.tree.map(jnp.asarray, keymap.unflatten(llm_flat)),
    }
    expected = keymap.shapes(abstract_params(config))
    got = keymap.shapes(params)
    if got != expected:  # a programming error, not a user one: the pieces must compose exactly
        raise keymap.WeightMismatchError(f"component params do not compose: {sorted(set(got) ^ set(expected))}")
    return TinyLlava(config), params


def load_quantizer_params(path: str) -> dict[str, Any]:
    """The official Quantized-TinyLLaVA quantizer projections -> ``{'image': p, 'text': p}``.

    Each ``p`` is ``{'in_proj': {kernel, bias}, 'out_proj': {kernel, bias}}``, the params of
    :class:`qtl_jax.quantizer.Quantizer` (``QuantizerConfig(dim=D, ...)``). Every ``VQ.*`` tensor must map;
    the base-model tensors are ignored here (load them with ``load_pretrained(path, drop_quantizer=True)``).
    """
    checkpoint = safetensors_io.read_dir(path)
    vq = {k: checkpoint[k] for k in checkpoint if k.startswith("VQ.")}  # reads only these tensors
    if not vq:
        raise ValueError(f"{path} has no VQ.* tensors; it is not an official Quantized-TinyLLaVA checkpoint")
    widths = {v.shape[0] for k, v in vq.items() if k.endswith(".bias")}
    if len(widths) != 1:
        raise keymap.WeightMismatchError(f"{path}: quantizer projections of different widths {sorted(widths)}")
    d = widths.pop()
    expected = {
        f"{m}/{p}/{leaf}": (d, d) if leaf == "kernel" else (d,)
        for m in ("image", "text") for p in ("in_proj", "out_proj") for leaf in ("kernel", "bias")
    }
    flat = keymap.convert(vq, layouts.official_quantizer_rules(), expected, name=f"quantizer tensors of {path}")
    return jax.tree.map(jnp.asarray, keymap.unflatten(flat))
