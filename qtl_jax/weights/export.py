"""Writes a :class:`~qtl_jax.models.tinyllava.TinyLlava` as a llava-hf directory ``transformers`` loads.

``transformers.LlavaForConditionalGeneration.from_pretrained(out_dir)`` then computes the same logits
(round trip proven in tests/test_export.py). Names follow transformers 5.x: ``naming='llava_hf'``
writes the in-memory names (``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``lm_head.weight``), ``'llava_hf_legacy'`` the names
``save_pretrained`` itself writes (``language_model.model.*``, ``vision_tower.*``, ...); 5.x reads both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from qtl_jax.models.tinyllava import TinyLlava, TinyLlavaConfig
from qtl_jax.models.vision import normalize_strategy
from qtl_jax.weights import keymap, layouts, safetensors_io
from qtl_jax.weights.hf_config import decoder_config_to_hf
from qtl_jax.weights.llm_maps import llm_rules


def llava_hf_config(config: TinyLlavaConfig, image_token_index: int | None = None) -> dict[str, Any]:
    """The llava ``config.json`` dict for ``config``."""
    token = config.image_token_index if image_token_index is None else image_token_index
    if not 0 <= token < config.llm.vocab_size:
        raise ValueError(
            f"llava-hf needs an image token id inside the vocabulary [0, {config.llm.vocab_size}); this model uses "
            f"{token} (the Factory's placeholder). Pass image_token_index=<id of '<image>' in your tokenizer>."
        )
    if config.llm.lm_head_bias:
        raise ValueError(
            "LlavaForConditionalGeneration's lm_head has no bias, so this model (lm_head_bias=True, e.g. a Phi "
            "loaded from a causal-LM checkpoint) cannot be exported to llava-hf without changing its logits"
        )
    text = decoder_config_to_hf(config.llm)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": config.vision.to_hf(),
        "image_token_index": token,
        "image_seq_length": config.num_image_tokens,
        "vision_feature_layer": config.vision_feature_layer,
        # llava-hf's 'default' drops token 0 exactly like the Factory's 'patch'.
        "vision_feature_select_strategy": "default" if normalize_strategy(config.vision_feature_select_strategy) == "patch" else "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def export_llava_hf(
    model: TinyLlava | TinyLlavaConfig,
    params: Mapping[str, Any],
    out_dir: str,
    *,
    naming: str = "llava_hf",
    image_token_index: int | None = None,
) -> str:
    """Writes ``config.json`` + ``model.safetensors`` (fp32) to ``out_dir``; returns ``out_dir``."""
    config = model.config if isinstance(model, TinyLlava) else model
    if naming not in ("llava_hf", "llava_hf_legacy"):
        raise ValueError(f"naming must be 'llava_hf' or 'llava_hf_legacy', got {naming!r}")
    hf_config = llava_hf_config(config, image_token_index)
    layout = layouts.BY_NAME[naming]
    rules = layouts.layout_rules(layout, config.vision, config.connector, llm_rules(config.llm))
    flat = {k: np.asarray(v, np.float32) for k, v in keymap.flatten(params).items()}
    tensors = keymap.export(flat, rules, config=config, name="TinyLlava")
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.write_file(os.path.join(out_dir, safetensors_io.SINGLE_NAME), tensors, {"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return out_dir
