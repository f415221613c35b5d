"""Identical layers run as one ``jax.lax.scan`` over their stacked parameters (compile once, not N times).

The parameter tree keeps one subtree per layer (``layers_0``, ``layers_1``, ...), exactly as the unrolled
model has it, so checkpoints, the Hugging Face key maps and the freezing/sharding regex rules do not depend
on the option: the per-layer subtrees are stacked on a leading axis inside the jitted program, at the
boundary of the scan. The price is one transient copy of those layers' weights while the stack runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from qtl_jax.models.remat import REMAT_POLICIES


def layer_params(params: Mapping[str, Any], num_layers: int, prefix: str = "layers_") -> list[Any]:
    """The per-layer subtrees ``params[f'{prefix}{i}']`` in order; a missing one is an error naming it."""
    missing = [f"{prefix}{i}" for i in range(num_layers) if f"{prefix}{i}" not in params]
    if missing:
        raise KeyError(f"scan over layers needs the parameters of {missing} (have {sorted(params)}).")
    return [params[f"{prefix}{i}"] for i in range(num_layers)]


def scan_layers(
    layer: nn.Module,
    per_layer: Sequence[Any],
    x: jax.Array,
    *args: Any,
    remat: bool = False,
    remat_policy: str = "nothing_saveable",
    keep_outputs: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Applies ``layer`` (unbound: constructed with ``parent=None``) once per entry of ``per_layer`` (its params), feeding each output on.

    ``args`` are passed unchanged to every layer (masks, RoPE tables). Returns ``(last output, outputs)``
    where ``outputs`` stacks every layer's output on axis 0 when ``keep_outputs`` (a tower's
    ``hidden_states``), else None. ``remat`` recomputes each layer in the backward pass keeping what
    ``remat_policy`` (:data:`~qtl_jax.models.remat.REMAT_POLICIES`) names, as the unrolled option does.
    """
    if remat and remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} is not one of {REMAT_POLICIES}")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)

    def apply(h: jax.Array, params: Any) -> jax.Array:
        return layer.apply({"params": params}, h, *args)

    if remat:
        apply = jax.checkpoint(apply, policy=getattr(jax.checkpoint_policies, remat_policy))

    def body(h: jax.Array, params: Any) -> tuple[jax.Array, jax.Array | None]:
        out = apply(h, params)
        return out, (out if keep_outputs else None)

    last, outputs = jax.lax.scan(body, x, stacked)
    return last, outputs


def uniform(*per_layer_fields: Sequence[Any]) -> bool:
    """True when every per-layer field has one value for all layers (the layers can be scanned)."""
    return all(len(set(field)) <= 1 for field in per_layer_fields)


__all__: Sequence[str] = ("layer_params", "scan_layers", "uniform")
