"""The model an evaluation runs: loaded from a train.py workdir (Orbax), a Hugging Face directory, or
randomly initialised from a model section (tests and smoke runs).

Whatever the source, the result is a :class:`LoadedModel`: the quantized split model's config and params
(``{'client', 'server'}`` trees, as training holds them) or, for a plain Hugging Face TinyLLaVA without
quantizers, the :class:`TinyLlava` config and params; plus the tokenizer, image processor and template.
:meth:`LoadedModel.with_levels` gives the same weights with the quantizers at another number of levels
(the projections do not depend on L, only the rounding grid does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax

from qtl_jax.data import image_processing, templates
from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
from qtl_jax.models import builder
from qtl_jax.models.quantized import QuantizedTinyLlavaConfig, init_split_params
from qtl_jax.models.tinyllava import TinyLlavaConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for :mod:`qtl_jax.generate`.

    qconfig: the quantized split model (None for a plain TinyLLaVA without quantizers).
    base: the TinyLLaVA config.
    params: ``{'client', 'server'}`` with ``qconfig``, else the TinyLlava params.
    batch_stats: quantizer running statistics (``{}`` unless scaling='ema').
    source: where the weights came from (for people and for the results table).
    """

    qconfig: QuantizedTinyLlavaConfig | None
    base: TinyLlavaConfig
    params: Params
    batch_stats: Params
    tokenizer: Any
    image_processor: image_processing.ImageProcessor
    template: templates.Template
    source: str

    def levels(self) -> int | None:
        """L of the quantizers (0 for the fp16 pass-through), None without quantizers."""
        return None if self.qconfig is None else self.qconfig.levels("image")

    def with_levels(self, levels: int) -> LoadedModel:
        """The same weights with both quantizers rounding to ``levels`` levels (a post-hoc change of L)."""
        if self.qconfig is None or self.qconfig.image_quantizer.bound == "none":
            raise ValueError(
                f"{self.source} has no quantizer projections (no quantizers or bound='none'), so its levels cannot be "
                "changed; the bits sweep needs a model trained with quantizers."
            )
        q = self.qconfig
        qconfig = dataclasses.replace(q, image_quantizer=dataclasses.replace(q.image_quantizer, levels=int(levels)),
                                      text_quantizer=dataclasses.replace(q.text_quantizer, levels=int(levels)))
        return dataclasses.replace(self, qconfig=qconfig)


def _plain(section: Any) -> dict[str, Any]:
    """A config section (ConfigDict or mapping) as a plain dict."""
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _init(qconfig: QuantizedTinyLlavaConfig, key: jax.Array) -> tuple[Params, Params]:
    # One compiled program instead of thousands of eagerly dispatched initialiser ops.
    return jax.jit(init_split_params, static_argnums=0)(qconfig, key)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _train_model_section(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A run's model settings; a run started from a previous stage took that stage's architecture."""
    m = dict(train_cfg["model"])
    previous = (train_cfg.get("init") or {}).get("from_workdir")
    if previous and os.path.isfile(os.path.join(previous, "config.json")):
        m = {**_read_json(os.path.join(previous, "config.json"))["model"], "dtype": m["dtype"], "remat": m["remat"]}
    return m


def _tokenizer(kind: str, m: Mapping[str, Any], candidates: list[str | None]) -> Any:
    if kind == "shapes":
        return shapes_tokenizer.build_shapes_tokenizer(model_max_length=int(m["max_length"]))
    from transformers import AutoTokenizer

    for path in candidates:
        if path and os.path.isdir(path):
            return AutoTokenizer.from_pretrained(path)
    raise FileNotFoundError(f"no tokenizer directory among {candidates}; set --config.tokenizer_dir=/local/dir.")


def load_from_workdir(workdir: str, template: str, tokenizer_dir: str | None, key: jax.Array) -> LoadedModel:
    """The latest Orbax checkpoint of a ``train.py`` workdir, with the model its ``config.json`` describes."""
    from qtl_jax.split.step import PartitionState, TrainState
    from qtl_jax.train import checkpoint as ckptlib

    train_cfg = ckptlib.read_config(workdir)
    m = _train_model_section(train_cfg)
    data_kind = train_cfg["data"]["kind"]
    init_ckpt = (train_cfg.get("init") or {}).get("checkpoint")
    tok = _tokenizer(data_kind, m, [tokenizer_dir, m.get("tokenizer_dir"), init_ckpt, m.get("llm_dir")])
    base = None
    if m["source"] != "random" or init_ckpt:
        from qtl_jax.train.setup import load_checkpoint
        from qtl_jax.weights import loader

        # Only the architecture is needed; the weights come from the checkpoint.
        kwargs = dict(dtype=m["dtype"], max_length=int(m["max_length"]), verbose=False)
        if init_ckpt:
            model, _, _ = load_checkpoint(init_ckpt, **kwargs)
        else:
            model, _ = loader.load_pretrained(
                vision_dir=m["vision_dir"], llm_dir=m["llm_dir"], key=key, connector_type=m["connector_type"],
                vision_feature_layer=m["vision_feature_layer"],
                vision_feature_select_strategy=m["vision_feature_select_strategy"], **kwargs)
        base = model.config
    built = builder.build_model({**m, "remat": False}, train_cfg["quantizer"], vocab_size=len(tok), base=base)
    params, stats = _init(built.config, key)
    like = TrainState(step=None, client=PartitionState(params["client"], None, stats),
                      server=PartitionState(params["server"], None, {}), rng=None)
    client, server, stats, step = ckptlib.restore_params(workdir, like)
    return LoadedModel(built.config, built.config.model, {"client": client, "server": server}, stats, tok,
                       built.image_processor, templates.get_template(template), f"{os.path.abspath(workdir)} (step {step})")


def load_from_hf(path: str, config: Any, key: jax.Array) -> LoadedModel:
    """A converted Hugging Face directory (``load_pretrained``); an official Quantized-TinyLLaVA one keeps its
    quantizer projections (at ``config.quantizer.levels``), any other is evaluated without quantizers."""
    from qtl_jax.train.setup import load_checkpoint

    tok = _tokenizer("hf", {}, [config.tokenizer_dir, path])
    model, base_params, quantizer_params = load_checkpoint(path, dtype=config.dtype, verbose=False)
    base = model.config
    section = {"dtype": config.dtype, "max_length": base.max_length, "image_mean": config.image_mean,
               "image_std": config.image_std}
    built = builder.build_model(section, _plain(config.quantizer), base=base)
    processor = built.image_processor
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        processor = image_processing.ImageProcessor.from_hf(path)
    template = templates.get_template(config.template)
    if quantizer_params is None:
        return LoadedModel(None, base, base_params, {}, tok, processor, template, os.path.abspath(path))
    qconfig = built.config
    params, stats = init_split_params(qconfig, key, pretrained=base_params)
    for modality in ("image", "text"):
        params["client"][f"{modality}_quantizer"] = {"in_proj": quantizer_params[modality]["in_proj"]}
        params["server"][f"{modality}_quantizer"] = {"out_proj": quantizer_params[modality]["out_proj"]}
    return LoadedModel(qconfig, base, params, stats, tok, processor, template, os.path.abspath(path))


def load_random(config: Any, key: jax.Array) -> LoadedModel:
    """A randomly initialised quantized model from ``config.model`` (a train-style model section)."""
    m = _plain(config.model)
    if m.get("source", "random") != "random":
        raise ValueError("without --config.checkpoint the model section must be model.source='random'.")
    tok = shapes_tokenizer.build_shapes_tokenizer(model_max_length=int(m["max_length"]))
    built = builder.build_model({**m, "remat": False}, _plain(config.quantizer), vocab_size=len(tok))
    params, stats = _init(built.config, key)
    return LoadedModel(built.config, built.config.model, params, stats, tok, built.image_processor,
                       templates.get_template(config.template), f"random init (seed {config.seed})")


def load_model(config: Any) -> LoadedModel:
    """Dispatches on ``config.checkpoint``: a train.py workdir, a Hugging Face directory, or unset (random)."""
    key = jax.random.key(int(config.seed))
    path = config.checkpoint
    if not path:
        return load_random(config, key)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--config.checkpoint={path!r} is not a local directory (nothing is downloaded).")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json")):
        return load_from_workdir(path, config.template, config.tokenizer_dir, key)
    if any(n.endswith(".safetensors") for n in os.listdir(path)):
        return load_from_hf(path, config, key)
    raise FileNotFoundError(
        f"--config.checkpoint={path!r} is neither a train.py workdir (checkpoints/ + config.json) nor a Hugging Face "
        "directory (*.safetensors + config.json)."
    )


__all__ = ["LoadedModel", "load_model", "load_from_workdir", "load_from_hf", "load_random"]
