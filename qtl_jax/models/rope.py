"""Rotary position embeddings in the non-interleaved ("rotate half") form every supported family uses.

Only the leading ``rotary_dim`` channels of each head rotate (partial rotary, Phi / StableLM); the rest
pass through unchanged. Frequencies and angles are computed in float32 whatever the compute dtype, as
the Hugging Face implementations do, and cos/sin are cast to the activations' dtype afterwards.
"""

from __future__ import annotations

import jax.numpy as jnp


def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """Number of rotated channels per head: ``int(head_dim * factor)``, as HF truncates it."""
    dim = int(head_dim * partial_rotary_factor)
    if dim % 2 or dim <= 0:
        raise ValueError(
            f"rotary dim int({head_dim} * {partial_rotary_factor}) = {dim} must be a positive even number; "
            "fix head_dim or partial_rotary_factor"
        )
    return dim


def inverse_frequencies(dim: int, theta: float) -> jnp.ndarray:
    """``1 / theta^(2k/dim)`` for k in [0, dim/2), float32."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def cos_sin(position_ids: jnp.ndarray, dim: int, theta: float, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables ``[B, T, dim]`` for integer positions ``[B, T]``."""
    angles = position_ids.astype(jnp.float32)[..., None] * inverse_frequencies(dim, theta)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates the first ``cos.shape[-1]`` channels of ``x`` ``[B, T, heads, head_dim]``."""
    dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = x[..., :dim], x[..., dim:]
    rot = rot * cos + _rotate_half(rot) * sin
    return jnp.concatenate([rot, rest], axis=-1) if rest.shape[-1] else rot
