"""The vision-to-language connector: ``linear`` or ``mlpNx_gelu`` (TinyLLaVA Factory / LLaVA names).

``mlpNx_gelu`` is N Linear layers with exact (erf) GELU between them, as torch ``nn.GELU()``:
Linear(vision -> llm), then N-1 times GELU -> Linear(llm -> llm). ``mlp2x_gelu`` is the paper's.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
_MLP = re.compile(r"mlp(\d+)x_gelu")
# Stage 1 starts the connector from scratch; LLaVA / Factory use torch's Linear init, we use the
# conventional N(0, 0.02^2) with zero bias (the project's decision, see docs/models_vlm.md).
CONNECTOR_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """``connector_type`` ('linear' or 'mlp{N}x_gelu'), input (vision) and output (LLM) widths."""

    connector_type: str = "mlp2x_gelu"
    vision_hidden_size: int = 1152
    hidden_size: int = 1280

    def __post_init__(self):
        self.depth  # validates the type

    @property
    def depth(self) -> int:
        """Number of Linear layers."""
        if self.connector_type == "linear":
            return 1
        m = _MLP.fullmatch(self.connector_type)
        if not m or int(m.group(1)) < 1:
            raise ValueError(
                f"unsupported connector_type {self.connector_type!r}; use 'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')."
            )
        return int(m.group(1))


class Connector(nn.Module):
    """[..., vision_hidden_size] -> [..., hidden_size]. Params ``fc_0 .. fc_{N-1}``."""

    config: ConnectorConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        for j in range(self.config.depth):
            if j:
                x = jax.nn.gelu(x, approximate=False)
            x = nn.Dense(
                self.config.hidden_size,
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(CONNECTOR_INIT_STD),
                bias_init=nn.initializers.zeros,
                name=f"fc_{j}",
            )(x)
        return x


def connector_rules(config: ConnectorConfig, naming: str):
    """Key map for the connector. ``naming``: 'sequential' (Factory/LLaVA ``{0,2,4..}``) or 'llava_hf'
    (``linear_1``, ``linear_2``; only ``mlp2x_gelu`` exists there)."""
    from qtl_jax.weights.keymap import LINEAR, Rule

    if naming == "sequential":
        # nn.Sequential(Linear, GELU, Linear, ...): the Linears sit at even indices.
        names = [str(2 * j) for j in range(config.depth)]
    elif naming == "llava_hf":
        if config.connector_type != "mlp2x_gelu":
            raise ValueError(
                f"llava-hf's multi_modal_projector is mlp2x_gelu only; connector_type {config.connector_type!r} "
                "cannot be expressed in that layout."
            )
        names = ["linear_1", "linear_2"]
    else:
        raise ValueError(f"unknown connector naming {naming!r}; use 'sequential' or 'llava_hf'.")
    rules = []
    for j, name in enumerate(names):
        rules.append(Rule(f"{name}.weight", f"fc_{j}/kernel", LINEAR))
        rules.append(Rule(f"{name}.bias", f"fc_{j}/bias"))
    return rules
