"""The answer function of a loaded model: ``Sequence[Example] -> list[str]``, greedy decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qtl_jax.eval.answers import Answerer, Example
from qtl_jax.eval.model import LoadedModel


def make_answerer(loaded: LoadedModel, config: Any) -> Answerer:
    """Greedy answers: ``config.generation='kv_cache'`` (the paper: :func:`qtl_jax.generate.generate_answers`,
    only the prompt through the quantizers) or ``'requantized'`` (every token through them, see
    :mod:`qtl_jax.eval.requantized`)."""
    import PIL.Image

    if config.generation == "requantized":
        from qtl_jax.eval.requantized import make_requantized_answerer

        return make_requantized_answerer(loaded, int(config.max_new_tokens))
    if config.generation != "kv_cache":
        raise ValueError(f"generation={config.generation!r}: use 'kv_cache' (the paper) or 'requantized'.")

    from qtl_jax import generate

    if loaded.qconfig is not None:
        model, params, quantizers = generate.split_model(loaded.qconfig, loaded.params, loaded.batch_stats)
    else:
        from qtl_jax.models.tinyllava import TinyLlava

        model, params, quantizers = TinyLlava(loaded.base), loaded.params, None

    def answer(batch: Sequence[Example]) -> list[str]:
        items = []
        for ex in batch:
            image = None
            if ex.image is not None:
                with PIL.Image.open(ex.image) as im:
                    image = im.convert("RGB")
            items.append((image, ex.prompt))
        return generate.generate_answers(model, params, loaded.tokenizer, loaded.template, loaded.image_processor,
                                         items, batch_size=len(items), max_new_tokens=int(config.max_new_tokens),
                                         quantizers=quantizers)

    return answer
