"""The optimizer a config declares: AdamW per learning-rate group, frozen groups, decay masks.

Freezing and learning-rate groups come from ``config.param_groups`` — ordered ``(regex, value)``
rules where value is ``"frozen"`` or a learning-rate multiplier — and weight decay is skipped where
``config.no_decay`` patterns match (biases and norm scales, as TinyLLaVA/HF Trainer do). Each group is
its own AdamW under :func:`optax.multi_transform`; frozen groups get ``set_to_zero`` and carry no
optimizer state, which matters when the frozen part is a 400M-parameter vision tower.

In the split step each partition builds its own optimizer over its own parameters, so gradient
clipping is per partition (a global norm across partitions would need an extra round trip). The fused
step does the same per partition so both modes stay identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qtl_jax import rules

FROZEN = "frozen"


def learning_rate_schedule(config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine (or constant/linear) decay to 0."""
    lr = float(config["lr"])
    warmup = int(round(float(config.get("warmup_ratio", 0.0)) * total_steps))
    kind = config.get("schedule", "cosine")
    rest = max(total_steps - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, rest)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, rest)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optimizer.schedule={kind!r}: use 'cosine', 'linear' or 'constant'.")
    if warmup == 0:
        return decay

    # Warmup reaches lr/warmup on the first step rather than 0, so no step is wasted at lr=0.
    def schedule(step):
        step = jnp.asarray(step)
        return jnp.where(step < warmup, lr * (step + 1) / warmup, decay(jnp.maximum(step - warmup, 0)))

    return schedule


def param_labels(params: Any, config: Mapping[str, Any]) -> Any:
    """Each leaf's group label: ``"frozen"`` or ``"lr_x<multiplier>"``."""
    groups = config.get("param_groups") or [(".*", 1.0)]

    def label(v):
        if v == FROZEN:
            return FROZEN
        if isinstance(v, (int, float)) and v > 0:
            return f"lr_x{float(v):g}"
        raise ValueError(f"param_groups value {v!r}: use 'frozen' or a positive learning-rate multiplier.")

    labels = rules.assign(params, [(p, label(v)) for p, v in groups], default="", strict=False)
    missing = [p for p, lab in zip(rules.paths(params), jax.tree_util.tree_leaves(labels)) if not lab]
    if missing:
        raise ValueError(
            f"no param_groups rule covers {missing[:10]}; end the list with ('.*', 1.0) or ('.*', 'frozen')."
        )
    return labels


def make_optimizer(config: Mapping[str, Any], total_steps: int, params: Any) -> optax.GradientTransformation:
    """The optimizer for one partition's parameters, as ``config`` (an ``optimizer`` ConfigDict) declares."""
    labels = param_labels(params, config)
    schedule = learning_rate_schedule(config, total_steps)
    no_decay = list(config.get("no_decay", []))

    # A callable mask: multi_transform hands each group a tree with the other groups' leaves masked out,
    # so the mask must be computed on that tree, not on the full one.
    def decay_mask(p):
        return jax.tree_util.tree_map(lambda s: not s, rules.select(p, no_decay))

    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for lab in set(jax.tree_util.tree_leaves(labels)) - {FROZEN}:
        mult = float(lab.removeprefix("lr_x"))
        transforms[lab] = optax.adamw(
            lambda step, m=mult: schedule(step) * m,
            b1=float(config.get("b1", 0.9)),
            b2=float(config.get("b2", 0.999)),
            eps=float(config.get("eps", 1e-8)),
            weight_decay=float(config.get("weight_decay", 0.0)),
            mask=decay_mask,
        )
    frozen = jax.tree_util.tree_map(lambda lab: lab == FROZEN, labels)
    # Frozen gradients are zeroed before clipping so they never shrink the trainable ones.
    chain = [optax.masked(optax.set_to_zero(), frozen)]
    clip = config.get("grad_clip_norm")
    if clip:
        chain.append(optax.clip_by_global_norm(float(clip)))
    chain.append(optax.multi_transform(transforms, labels))
    tx = optax.chain(*chain)
    accum = int(config.get("accum_steps", 1))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx
