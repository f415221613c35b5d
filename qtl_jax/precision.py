"""The precision policy: norms, softmax, logits, losses and the quantizer's statistics run in at least float32.

``accum_dtype(d)`` is float32 for bfloat16/float16/float32 compute and float64 for float64. Writing
``x.astype(accum_dtype(x.dtype))`` rather than ``x.astype(jnp.float32)`` keeps every result of a float32 or
bfloat16 model unchanged, and lets a float64 run (``jax.experimental.enable_x64``, float64 params and
compute dtype) stay float64 end to end. Tests use that to compare two differently ordered programs (the
split and the fused step, several device layouts) at float64 precision, where the comparison does not
depend on the CPU's vector width.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def accum_dtype(dtype: Any) -> jnp.dtype:
    """The dtype to accumulate ``dtype`` values in: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(x: Any) -> Any:
    """``x`` in :func:`accum_dtype` of its own dtype (float32 for bf16/fp16/fp32, float64 stays)."""
    x = jnp.asarray(x)
    return x.astype(accum_dtype(x.dtype))
