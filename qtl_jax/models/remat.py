"""Rematerialisation policies by name, for the vision tower's and the decoder's blocks.

On XLA:CPU remat saves next to nothing (0.17 of 8.46 GB in the paper's stage-2 server program): XLA:CPU
drops the optimization barriers ``jax.checkpoint`` places before common-subexpression elimination, which
merges the recomputation with the forward pass. The attention and gated-MLP backward passes
(``qtl_jax.models.attention``, ``qtl_jax.models.decoder.silu_gate``) recompute what they need themselves,
tied to the incoming gradient so that the merge cannot happen (docs/performance.md, "Paper-size memory").
"""

from __future__ import annotations

import flax.linen as nn
import jax

# jax.checkpoint_policies a rematerialised block may use: 'nothing_saveable' keeps only the block's input
# (least memory, the whole block recomputed); 'dots_with_no_batch_dims_saveable' keeps the outputs of the
# weight matmuls and recomputes the rest (norms, RoPE, activations and the attention core, whose [B,H,T,S]
# tensors are the largest); 'dots_saveable' keeps attention's matmuls too.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "everything_saveable")


def remat_module(module: type, remat: bool, policy: str) -> type:
    """``module`` rematerialised by ``policy`` (one of :data:`REMAT_POLICIES`) when ``remat``, else itself."""
    if not remat:
        return module
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {policy!r} is not one of {REMAT_POLICIES}")
    return nn.remat(module, policy=getattr(jax.checkpoint_policies, policy))
