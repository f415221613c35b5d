"""One ViT vision tower for SigLIP and CLIP, and the TinyLLaVA / llava-hf feature selection.

The two towers differ only in a few switches, so one module covers both:

=================  ==========================  ==============================
                   SigLIP                      CLIP
=================  ==========================  ==============================
class token        none                        learned ``class_embedding``
patch-conv bias    yes                         no
pre-LayerNorm      none                        ``pre_layrnorm``
activation         ``gelu_pytorch_tanh``       ``quick_gelu``
LayerNorm eps      1e-6                        1e-5
=================  ==========================  ==============================

Pixels are **channels-last** (``[N, H, W, C]`` float32, already normalised) everywhere in qtl_jax,
because that is what the data pipeline produces; HF ``pixel_values`` (NCHW) must be transposed with
``np.transpose(x, (0, 2, 3, 1))`` before they come in.

``hidden_states`` are indexed as in Hugging Face: index 0 is the input of the first encoder layer
(the patch embeddings, after ``pre_layrnorm`` for CLIP), index ``i`` the output of layer ``i``. The
post-LayerNorm output is *not* one of them, so feature layer -2 is the penultimate layer's raw output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from qtl_jax.models.attention import dot_product_attention
from qtl_jax.models.remat import remat_module
from qtl_jax.models import scan as layer_scan
from qtl_jax.precision import accum_dtype

Array = jax.Array

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
# Which HF config model_types are which tower; the full dual-encoder types carry a vision_config.
_KINDS = {
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "clip_vision_model": "clip",
    "clip": "clip",
}
FeatureStrategy = Literal["patch", "full"]
# TinyLLaVA Factory says 'patch' / 'cls_patch', llava-hf says 'default' / 'full'.
_STRATEGY_ALIASES = {"patch": "patch", "default": "patch", "full": "full", "cls_patch": "full"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape and flavour of a SigLIP or CLIP vision tower (the fields of the HF vision config)."""

    kind: Literal["siglip", "clip"] = "siglip"
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.kind not in ("siglip", "clip"):
            raise ValueError(f"VisionConfig.kind must be 'siglip' or 'clip', got {self.kind!r}.")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}."
            )

    @property
    def num_patches(self) -> int:
        # 'VALID' patching drops a remainder strip: SigLIP 384 px / 14 px -> 27 x 27.
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens the encoder sees: the patches, plus CLIP's class token."""
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "VisionConfig":
        """From an HF ``config.json`` dict: a vision config, or a full SigLIP/CLIP config (its vision half)."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type in ("siglip", "clip") and "vision_config" in cfg:
            cfg = dict(cfg["vision_config"], model_type=f"{model_type}_vision_model")
            model_type = cfg["model_type"]
        if model_type not in _KINDS:
            raise ValueError(
                f"not a SigLIP or CLIP vision config (model_type={model_type!r}); expected one of {sorted(_KINDS)}."
            )
        kind = _KINDS[model_type]
        # HF config classes fill these defaults when a field is absent from config.json.
        defaults = (
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
            if kind == "siglip"
            else dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")
        )
        get = lambda k: cfg.get(k, defaults.get(k))  # noqa: E731
        return cls(
            kind=kind,
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"),
            image_size=get("image_size"),
            patch_size=get("patch_size"),
            num_channels=cfg.get("num_channels", 3),
            layer_norm_eps=get("layer_norm_eps"),
            hidden_act=get("hidden_act"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF vision config dict (``SiglipVisionConfig`` / ``CLIPVisionConfig`` fields)."""
        out = dict(
            model_type=f"{self.kind}_vision_model",
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
        )
        if self.kind == "siglip":
            # The pooling head is never used for LLaVA features and qtl_jax does not keep it.
            out["vision_use_head"] = False
        return out


def normalize_strategy(strategy: str) -> FeatureStrategy:
    """Maps the Factory ('patch'/'cls_patch') and llava-hf ('default'/'full') names to 'patch'/'full'."""
    if strategy not in _STRATEGY_ALIASES:
        raise ValueError(
            f"unknown vision feature strategy {strategy!r}; use 'patch' (drop token 0, alias 'default') "
            "or 'full' (keep every token, alias 'cls_patch')."
        )
    return _STRATEGY_ALIASES[strategy]


def resolve_layer(layer: int, num_hidden_layers: int) -> int:
    """A (possibly negative) hidden_states index -> a non-negative one; hidden_states has layers+1 entries."""
    n = num_hidden_layers + 1
    if not -n <= layer < n:
        raise ValueError(f"vision feature layer {layer} is out of range for {num_hidden_layers} layers (+ embeddings).")
    return layer % n


def num_feature_tokens(config: VisionConfig, strategy: str) -> int:
    """Tokens per image after selection: SigLIP-384/14 gives 729 ('full') or 728 ('patch')."""
    return config.num_positions - (1 if normalize_strategy(strategy) == "patch" else 0)


class _Attention(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # noqa: E731
        q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        # Softmax in fp32 even for bf16 compute: the reference does the same and it is what keeps bf16 close.
        out = dot_product_attention(q, k, v, None, head_dim**-0.5, self.implementation)
        return dense("out_proj")(out)


class _EncoderLayer(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=accum_dtype(self.dtype), name=name)  # noqa: E731
        h = norm("layer_norm1")(x).astype(self.dtype)
        x = x + _Attention(cfg, self.dtype, self.attention, name="self_attn")(h)
        h = norm("layer_norm2")(x).astype(self.dtype)
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(h)
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(_ACTIVATIONS[cfg.hidden_act](h))
        return x + h


class VisionTower(nn.Module):
    """SigLIP / CLIP ViT. ``__call__(pixels NHWC) -> (hidden_states tuple, post-LN last hidden state)``.

    The second output is SigLIP's ``last_hidden_state``; CLIP's ``pooler_output`` is its token 0.

    ``dtype`` is the compute dtype (params stay fp32); ``remat`` recomputes each encoder layer in
    the backward pass instead of storing its activations, keeping what ``remat_policy`` names
    (``qtl_jax.models.remat.REMAT_POLICIES``). ``scan_layers`` runs the (identical) encoder layers as
    one ``jax.lax.scan`` (``qtl_jax.models.scan``): one layer compiled instead of all of them, the same
    parameter tree and the same function.
    """

    config: VisionConfig
    dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "auto"  # qtl_jax.models.attention.IMPLEMENTATIONS
    scan_layers: bool = False

    @nn.compact
    def __call__(self, pixel_values: Array) -> tuple[tuple[Array, ...], Array]:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"pixel_values must be channels-last [N, H, W, {cfg.num_channels}], got shape {pixel_values.shape}; "
                "HF NCHW pixel_values need np.transpose(x, (0, 2, 3, 1))."
            )
        if pixel_values.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must be {cfg.image_size}x{cfg.image_size} (position embeddings are not interpolated), "
                f"got {pixel_values.shape[1]}x{pixel_values.shape[2]}."
            )
        x = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=cfg.kind == "siglip",
            dtype=self.dtype,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)  # row-major patch order, as torch's flatten(2)
        if cfg.kind == "clip":
            cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        pos = nn.Embed(cfg.num_positions, cfg.hidden_size, name="position_embedding").embedding
        x = x + pos.astype(x.dtype)[None]
        if cfg.kind == "clip":
            x = nn.LayerNorm(cfg.layer_norm_eps, dtype=accum_dtype(self.dtype), name="pre_layrnorm")(x).astype(self.dtype)
        hidden_states = [x]
        if self.scan_layers and not self.is_initializing():
            # Init stays unrolled so that it creates the same layers_{i} tree the scan then stacks.
            layer = _EncoderLayer(cfg, self.dtype, self.attention, parent=None)
            per_layer = layer_scan.layer_params(self.variables["params"], cfg.num_hidden_layers)
            x, outputs = layer_scan.scan_layers(layer, per_layer, x, remat=self.remat, remat_policy=self.remat_policy,
                                                keep_outputs=True)
            hidden_states += list(outputs)
        else:
            layer_cls = remat_module(_EncoderLayer, self.remat, self.remat_policy)
            for i in range(cfg.num_hidden_layers):
                x = layer_cls(cfg, self.dtype, self.attention, name=f"layers_{i}")(x)
                hidden_states.append(x)
        # Kept so the checkpoint round-trips losslessly; under jit it is dead code for LLaVA features.
        last = nn.LayerNorm(cfg.layer_norm_eps, dtype=accum_dtype(self.dtype), name="post_layernorm")(x)
        return tuple(hidden_states), last


def select_features(hidden_states: tuple[Array, ...], layer: int, strategy: str) -> Array:
    """``hidden_states[layer]``, minus token 0 for 'patch' (Factory; drops a real patch for SigLIP)."""
    h = hidden_states[resolve_layer(layer, len(hidden_states) - 1)]
    return h[:, 1:] if normalize_strategy(strategy) == "patch" else h


def vision_rules(config: VisionConfig):
    """Key map HF vision-model keys (no ``vision_model.`` prefix) <-> :class:`VisionTower` params."""
    from qtl_jax.weights.keymap import CONV2D, IDENTITY, LINEAR, Rule

    rules = [
        Rule("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV2D),
        Rule("embeddings.position_embedding.weight", "position_embedding/embedding"),
    ]
    if config.kind == "siglip":
        rules.append(Rule("embeddings.patch_embedding.bias", "patch_embedding/bias"))
        # The attention-pooling head makes SigLIP's image embedding for contrastive training;
        # LLaVA features are taken from hidden_states, so it is deliberately not loaded.
        rules.append(Rule("head.{rest:.+}", None))
    else:
        rules.append(Rule("embeddings.class_embedding", "class_embedding"))
        rules += [Rule(f"pre_layrnorm.{a}", f"pre_layrnorm/{b}") for a, b in (("weight", "scale"), ("bias", "bias"))]
    # transformers registers position_ids as a buffer; older checkpoints saved it. It is arange(n).
    rules.append(Rule("embeddings.position_ids", None))
    rules += [Rule(f"post_layernorm.{a}", f"post_layernorm/{b}") for a, b in (("weight", "scale"), ("bias", "bias"))]
    layer = "encoder.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules.append(Rule(f"{layer}self_attn.{name}.weight", f"layers_{{i}}/self_attn/{name}/kernel", LINEAR))
        rules.append(Rule(f"{layer}self_attn.{name}.bias", f"layers_{{i}}/self_attn/{name}/bias", IDENTITY))
    for name in ("fc1", "fc2"):
        rules.append(Rule(f"{layer}mlp.{name}.weight", f"layers_{{i}}/{name}/kernel", LINEAR))
        rules.append(Rule(f"{layer}mlp.{name}.bias", f"layers_{{i}}/{name}/bias"))
    for name in ("layer_norm1", "layer_norm2"):
        rules.append(Rule(f"{layer}{name}.weight", f"layers_{{i}}/{name}/scale"))
        rules.append(Rule(f"{layer}{name}.bias", f"layers_{{i}}/{name}/bias"))
    return rules
