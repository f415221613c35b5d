"""Config sections -> the model: ``config.model`` + ``config.quantizer`` -> TinyLLaVA config -> the quantized
split model's config, and the image processor that goes with it.

:func:`build_model` is the one place where this happens (training, the split server, evaluation, the
privacy attacks). It takes plain dicts (``config.model.to_dict()``, ``config.quantizer.to_dict()``), so the
models layer does not read ``ml_collections`` configs. The weights are not its business: for
``model.source='random'`` the architecture comes from the section itself (``vision``, ``llm``,
``connector_type``, ...); for loaded weights (``source='components'``, a converted checkpoint) pass the
loaded model's :class:`TinyLlavaConfig` as ``base`` (:mod:`qtl_jax.train.setup` does the loading).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qtl_jax.data.constants import IMAGE_TOKEN_INDEX
from qtl_jax.data.image_processing import ImageProcessor
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig, dtype_from_name
from qtl_jax.models.quantized import QuantizedTinyLlavaConfig
from qtl_jax.models.tinyllava import TinyLlavaConfig
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """What :func:`build_model` returns: the quantized model's config and its image processor."""

    config: QuantizedTinyLlavaConfig
    image_processor: ImageProcessor


def tinyllava_config(model: Mapping[str, Any], vocab_size: int | None = None) -> TinyLlavaConfig:
    """The architecture a ``model.source='random'`` section describes (``configs/common.py`` ``demo_model``).

    ``llm.vocab_size`` 0 takes ``vocab_size`` (the tokenizer's size). Precision, ``max_length`` and
    ``remat*`` are not applied here (:func:`build_model` applies them to any base).
    """
    missing = [k for k in ("vision", "llm", "connector_type") if k not in model]
    if missing:
        raise KeyError(f"the model section lacks {missing}; a model.source='random' section needs vision, llm and "
                       "connector_type (see configs/common.py demo_model).")
    vision = VisionConfig(**dict(model["vision"]))
    llm_kwargs = dict(model["llm"])
    if not llm_kwargs.get("vocab_size"):
        if not vocab_size:
            raise ValueError("model.llm.vocab_size is 0 (take the tokenizer's) but no vocab_size was given.")
        llm_kwargs["vocab_size"] = int(vocab_size)
    llm = DecoderConfig.make(**llm_kwargs)
    optional = {k: model[k] for k in ("vision_feature_layer", "vision_feature_select_strategy") if k in model}
    return TinyLlavaConfig(vision=vision, connector=ConnectorConfig(model["connector_type"], vision.hidden_size,
                                                                    llm.hidden_size), llm=llm, **optional)


def quantized_config(base: TinyLlavaConfig, quantizer: Mapping[str, Any]) -> QuantizedTinyLlavaConfig:
    """``base`` with one quantizer of the ``quantizer`` section per modality (D = the LLM width).

    The section's keys are :class:`~qtl_jax.quantizer.QuantizerConfig` fields (``levels``, ``scaling``,
    ``bound``, ``init``, ...; missing ones take its defaults), except the per-modality calibration of
    ``init='identity'``: ``init_image_mean``, ``init_image_std``, ``init_text_mean``, ``init_text_std`` become
    each modality's ``init_mean`` / ``init_std``. The projections compute in ``base.dtype``.
    """
    section = dict(quantizer)
    per_modality = {}
    for modality in ("image", "text"):
        per_modality[modality] = {f"init_{s}": float(section.pop(f"init_{modality}_{s}"))
                                  for s in ("mean", "std") if f"init_{modality}_{s}" in section}
    misplaced = [k for k in ("init_mean", "init_std") if k in section]
    if misplaced:
        raise ValueError(f"quantizer.{misplaced[0]}: the calibration is per modality; set quantizer.init_image_mean, "
                         "init_image_std, init_text_mean and init_text_std.")

    def make(modality: str) -> QuantizerConfig:
        try:
            return QuantizerConfig(dim=base.llm.hidden_size, dtype=base.dtype, **section, **per_modality[modality])
        except ValueError as e:
            raise ValueError(f"the {modality} quantizer: {e}") from None

    return QuantizedTinyLlavaConfig(model=base, image_quantizer=make("image"), text_quantizer=make("text"))


def image_processor(model: Mapping[str, Any], image_size: int) -> ImageProcessor:
    """Resize to the tower's square input, rescale 1/255, normalise with the section's ``image_mean`` / ``image_std``."""
    return ImageProcessor(size=(int(image_size), int(image_size)), image_mean=tuple(model["image_mean"]),
                          image_std=tuple(model["image_std"]))


def build_model(model: Mapping[str, Any], quantizer: Mapping[str, Any], *, vocab_size: int | None = None,
                base: TinyLlavaConfig | None = None) -> BuiltModel:
    """The quantized split model of a ``model`` + ``quantizer`` config section, and its image processor.

    Args:
      model: the ``model`` section as a dict. Read: ``dtype``, ``max_length``, ``remat``, ``remat_policy``,
        ``attention``, ``scan_layers``, ``loss_chunk_rows`` (optional), ``image_mean``/``image_std`` and, without ``base``, the architecture
        (:func:`tinyllava_config`).
      quantizer: the ``quantizer`` section as a dict (:func:`quantized_config`).
      vocab_size: the tokenizer's size, for a random architecture whose ``llm.vocab_size`` is 0.
      base: the TinyLLaVA of loaded weights; its architecture wins over the section's (a llava-hf one is
        switched to the Factory placeholder convention the split model needs: same weights, other ids).
    """
    if base is None:
        base = tinyllava_config(model, vocab_size)
    if base.convention != "factory":
        # The split model and the input pipeline use the Factory convention (one -200 placeholder per image,
        # expanded by the model); a llava-hf checkpoint's weights are the same, only its ids differ.
        base = dataclasses.replace(base, convention="factory", image_token_index=IMAGE_TOKEN_INDEX,
                                   scale_image_embeddings=base.scales_images)
    base = dataclasses.replace(base, dtype=dtype_from_name(model.get("dtype", "float32")),
                               max_length=None if model.get("max_length") is None else int(model["max_length"]),
                               remat=bool(model.get("remat", False)),
                               remat_policy=str(model.get("remat_policy", "nothing_saveable")),
                               attention=str(model.get("attention", "auto")),
                               scan_layers=bool(model.get("scan_layers", False)))
    quantized = quantized_config(base, quantizer)
    if model.get("loss_chunk_rows"):
        quantized = dataclasses.replace(quantized, loss_chunk_rows=int(model["loss_chunk_rows"]))
    return BuiltModel(quantized, image_processor(model, base.vision.image_size))
