"""Checkpoint layouts of TinyLLaVA-style models: detection from tensor names, and their key maps.

Every layout is the same three components under different names, so a layout is a small table of
prefixes; its key map is the component maps (:func:`~qtl_jax.models.vision.vision_rules`,
:func:`~qtl_jax.models.connector.connector_rules`, :func:`~qtl_jax.weights.llm_maps.llm_rules`)
moved under those prefixes. Detection looks for each layout's marker prefix in the tensor names
(first match wins, most specific first) and never guesses: an unknown checkpoint is an error that
names the markers it looked for.

==========================  ===================================  ==========================  ======================================
layout                      vision tower                         connector                   LLM (causal-LM keys ``model.*``/``lm_head``)
==========================  ===================================  ==========================  ======================================
``quantized_tinyllava``     as ``factory``                       as ``factory``              as ``factory``; plus ``VQ.quantizer_*``
``factory``                 ``vision_tower._vision_tower.``      ``connector._connector.N``  under ``language_model.``
``legacy_llava``            ``model.vision_tower.vision_tower.`` ``model.mm_projector.N``    as is (``model.*``, ``lm_head``)
``llava_hf``                ``model.vision_tower.``              ``model.multi_modal_        ``model.`` -> ``model.language_model.``,
                                                                 projector.linear_{1,2}``    ``lm_head`` as is
``llava_hf_legacy``         ``vision_tower.``                    ``multi_modal_projector.``  under ``language_model.``
==========================  ===================================  ==========================  ======================================

The vision prefix may be followed by ``vision_model.`` (older transformers, Factory, LLaVA); that is
detected from the names too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from qtl_jax.models.connector import ConnectorConfig, connector_rules
from qtl_jax.models.vision import VisionConfig, vision_rules
from qtl_jax.weights.keymap import Rule, with_prefix


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    marker: str  # a tensor-name prefix only this layout has
    vision_prefix: str
    connector_prefix: str
    connector_naming: str  # 'sequential' or 'llava_hf'
    # (causal-LM key prefix, prefix in this layout) pairs, applied to the LLM key map's sources.
    llm_renames: tuple[tuple[str, str], ...]
    extra_marker: str | None = None  # a second prefix that must also be present


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "quantized_tinyllava",
        "official Quantized-TinyLLaVA (TinyLLaVA Factory + VQ.quantizer_{image,text} projections)",
        marker="VQ.",
        extra_marker="connector._connector.",
        vision_prefix="vision_tower._vision_tower.",
        connector_prefix="connector._connector.",
        connector_naming="sequential",
        llm_renames=(("", "language_model."),),
    ),
    Layout(
        "factory",
        "TinyLLaVA Factory (language_model.*, vision_tower._vision_tower.*, connector._connector.*)",
        marker="connector._connector.",
        vision_prefix="vision_tower._vision_tower.",
        connector_prefix="connector._connector.",
        connector_naming="sequential",
        llm_renames=(("", "language_model."),),
    ),
    Layout(
        "legacy_llava",
        "legacy LLaVA / TinyLLaVABench (model.mm_projector.*, model.vision_tower.vision_tower.*, LLM at model.*)",
        marker="model.mm_projector.",
        vision_prefix="model.vision_tower.vision_tower.",
        connector_prefix="model.mm_projector.",
        connector_naming="sequential",
        llm_renames=(("", ""),),
    ),
    Layout(
        "llava_hf",
        "llava-hf, transformers >= 4.52 naming (model.language_model.*, model.vision_tower.*, lm_head)",
        marker="model.multi_modal_projector.",
        vision_prefix="model.vision_tower.",
        connector_prefix="model.multi_modal_projector.",
        connector_naming="llava_hf",
        llm_renames=(("model.", "model.language_model."), ("lm_head.", "lm_head.")),
    ),
    Layout(
        "llava_hf_legacy",
        "llava-hf, older naming (language_model.model.*, vision_tower.*, multi_modal_projector.*)",
        marker="multi_modal_projector.",
        vision_prefix="vision_tower.",
        connector_prefix="multi_modal_projector.",
        connector_naming="llava_hf",
        llm_renames=(("", "language_model."),),
    ),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}


class UnknownLayoutError(ValueError):
    """The tensor names match none of the supported layouts."""


def detect(keys: Iterable[str], where: str = "checkpoint") -> Layout:
    """The layout whose marker prefixes occur in ``keys``."""
    keys = list(keys)
    for layout in LAYOUTS:
        if any(k.startswith(layout.marker) for k in keys) and (
            layout.extra_marker is None or any(k.startswith(layout.extra_marker) for k in keys)
        ):
            return layout
    sample = ", ".join(sorted(keys)[:8]) or "(no tensors)"
    markers = ", ".join(f"{lay.name}: '{lay.marker}*'" for lay in LAYOUTS)
    raise UnknownLayoutError(
        f"{where}: cannot tell the checkpoint layout from its tensor names (first: {sample}). Known layouts "
        f"and the prefix that identifies them: {markers}. For a vision model + a causal LM use "
        "load_pretrained(vision_dir=..., llm_dir=...); to add a layout see docs/models_vlm.md."
    )


def vision_key_prefix(keys: Iterable[str], prefix: str) -> str:
    """``prefix`` or ``prefix + 'vision_model.'``, whichever the checkpoint uses."""
    nested = prefix + "vision_model."
    return nested if any(k.startswith(nested) for k in keys) else prefix


def rename_llm_rules(rules: Sequence[Rule], renames: Sequence[tuple[str, str]], target_prefix: str) -> list[Rule]:
    """Moves causal-LM rules under a layout's names: each source takes the first matching rename."""
    out = []
    for r in rules:
        for old, new in renames:
            if r.source.startswith(old):
                source = new + r.source[len(old) :]
                break
        else:
            raise ValueError(f"no LLM rename for checkpoint key template {r.source!r} (renames {renames})")
        targets = None if r.target is None else tuple(target_prefix + t for t in r.targets)
        out.append(Rule(source, targets, r.transform))
    return out


def layout_rules(
    layout: Layout,
    vision: VisionConfig,
    connector: ConnectorConfig,
    llm_rules: Sequence[Rule],
    keys: Iterable[str] = (),
) -> list[Rule]:
    """The full key map of ``layout`` onto :class:`~qtl_jax.models.tinyllava.TinyLlava` params.

    Vision and connector rules come first: the LLM rules of the legacy layout share its ``model.``
    prefix and must not see the vision keys.
    """
    keys = list(keys)
    rules = with_prefix(vision_rules(vision), vision_key_prefix(keys, layout.vision_prefix), "vision_tower/")
    rules += with_prefix(connector_rules(connector, layout.connector_naming), layout.connector_prefix, "connector/")
    rules += rename_llm_rules(llm_rules, layout.llm_renames, "llm/")
    return rules


def quantizer_rules() -> list[Rule]:
    """Rules that knowingly skip the official quantizer tensors (``load_pretrained(drop_quantizer=True)``)."""
    return [Rule("VQ.{rest:.+}", None)]


def official_quantizer_rules() -> list[Rule]:
    """Official ``VQ.quantizer_{image,text}.quantizer.*`` (FSQ / FSQ_old blocks) -> ``{modality}/{in,out}_proj``.

    Targets are :class:`qtl_jax.quantizer.Quantizer` params (flax ``Dense`` kernel/bias). The official
    ``in_proj`` is an ``nn.Sequential`` (Linear first), ``out_proj`` a bare Linear.
    """
    from qtl_jax.weights.keymap import IDENTITY, LINEAR

    src, dst = "VQ.quantizer_{m:image|text}.quantizer.", "{m}/"
    return [
        Rule(src + "in_proj.0.weight", dst + "in_proj/kernel", LINEAR),
        Rule(src + "in_proj.0.bias", dst + "in_proj/bias", IDENTITY),
        Rule(src + "out_proj.weight", dst + "out_proj/kernel", LINEAR),
        Rule(src + "out_proj.bias", dst + "out_proj/bias", IDENTITY),
    ]
