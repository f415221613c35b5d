"""``python -m qtl_jax.selfcheck``: verifies an installation offline and prints what it found.

Checks the pinned libraries import, JAX sees its devices, and a jitted computation runs.
"""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    import jax
    import jax.numpy as jnp

    for name in ["flax", "optax", "orbax.checkpoint", "transformers", "tensorflow_datasets", "grain", "constriction"]:
        mod = importlib.import_module(name)
        print(f"{name:22s} {getattr(mod, '__version__', 'ok')}")
    print(f"{'jax':22s} {jax.__version__}  backend={jax.default_backend()}  devices={jax.device_count()}")
    y = jax.jit(lambda x: (x @ x.T).sum())(jnp.ones((4, 4)))
    if float(y) != 64.0:
        print(f"jit check FAILED: got {float(y)}, expected 64.0")
        return 1
    print("qtl_jax selfcheck: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
