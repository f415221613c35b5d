"""qtl_jax: Quantized-TinyLLaVA in JAX/Flax, a small vision-language model built for split learning.

A client runs the vision tower, the connector and the LLM's embedding table and sends low-bit integer
codes; a server reconstructs features from them and runs the LLM. See README.md.
"""

from typing import Any

__version__ = "0.1.0"


def load_pretrained(path: Any = None, **kwargs: Any):
    """Loads a local checkpoint directory (any supported layout): returns ``(model, params)``.

    ``load_pretrained(dir)`` for a whole checkpoint, or ``load_pretrained(vision_dir=..., llm_dir=...)``
    for separately pretrained parts (stage 1). Imported lazily so ``import qtl_jax`` stays cheap; see
    ``qtl_jax.weights.loader.load_pretrained`` for every option.
    """
    from qtl_jax.weights.loader import load_pretrained as _load_pretrained

    return _load_pretrained(path, **kwargs)
