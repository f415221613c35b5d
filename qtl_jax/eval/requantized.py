"""Greedy answers that send the generated tokens through the quantizers too (no KV cache).

The paper's evaluation (and :func:`qtl_jax.generate.generate_answers`) quantizes only the prompt: tokens
the model generates are embedded with the LLM's own table. That suits the paper's model, whose LLM was
pretrained on raw embeddings. A model trained *from scratch* through the quantizers (the shapes demo) has
only ever seen ``out_proj(dequantize(codes))`` vectors: its first answer token, computed from the
quantized prompt, is fine, but raw embeddings of its own tokens are out of distribution and the
continuation degrades. ``config.generation='requantized'`` picks this answerer instead: at every step it
reruns the whole fused quantized forward (:func:`qtl_jax.models.quantized.forward`) on the prompt plus
the tokens generated so far, so every input position takes the path training used. It costs one full
forward per new token (quadratic in the answer length), which is fine for short benchmark answers on
small models. Rows are right-padded to a width rounded up to a multiple of 16 (one compile per width);
with scaling='batch' the zero padding enters the statistics exactly as in training batches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.eval.answers import Example
from qtl_jax.eval.model import LoadedModel
from qtl_jax.models import quantized as qm

_WIDTH_STEP = 16


@functools.partial(jax.jit, static_argnums=0)
def _next_token(qconfig, params, batch_stats, batch):
    logits, layout, _ = qm.forward(qconfig, params, batch_stats, batch, train=False)
    mask = layout.attention_mask
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last real merged position (right padding)
    return jnp.argmax(logits[jnp.arange(logits.shape[0]), last], axis=-1)


def _images(loaded: LoadedModel, batch: Sequence[Example]) -> np.ndarray:
    import PIL.Image

    v = loaded.base.vision
    pixels = np.zeros((len(batch), v.image_size, v.image_size, v.num_channels), np.float32)
    for i, ex in enumerate(batch):  # row i is example i's image (zeros without one), as the model takes them
        if ex.image is not None:
            with PIL.Image.open(ex.image) as im:
                pixels[i] = loaded.image_processor(im.convert("RGB"))
    return pixels


def make_requantized_answerer(loaded: LoadedModel, max_new_tokens: int):
    """An answerer (``Sequence[Example] -> list[str]``) for :func:`qtl_jax.eval.harness.run_benchmarks`."""
    from qtl_jax.generate import stop_token_ids_for

    if loaded.qconfig is None:
        raise ValueError("generation='requantized' needs a model with quantizers; use generation='kv_cache'.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    tok, template = loaded.tokenizer, loaded.template
    stops = set(stop_token_ids_for(template, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def answer(batch: Sequence[Example]) -> list[str]:
        prompts = [list(template.tokenize_prompt(ex.prompt, tok, ex.image is not None)) for ex in batch]
        longest = max(len(p) for p in prompts) + max_new_tokens
        width = -(-longest // _WIDTH_STEP) * _WIDTH_STEP
        fixed = {"pixel_values": _images(loaded, batch),
                 "has_image": np.asarray([int(ex.image is not None) for ex in batch], np.int32),
                 "labels": np.full((len(batch), width), -100, np.int32)}
        generated: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for _ in range(max_new_tokens):
            ids = np.full((len(batch), width), pad, np.int32)
            mask = np.zeros((len(batch), width), np.int32)
            for i, (p, g) in enumerate(zip(prompts, generated)):
                row = p + g
                ids[i, :len(row)] = row
                mask[i, :len(row)] = 1
            nxt = np.asarray(_next_token(loaded.qconfig, loaded.params, loaded.batch_stats,
                                         {**fixed, "input_ids": ids, "attention_mask": mask}))
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                else:
                    generated[i].append(int(t))
            if all(done):
                break
        texts = []
        for g in generated:
            text = tok.decode(g, skip_special_tokens=True)
            if template.stop_str and template.stop_str in text:
                text = text[:text.index(template.stop_str)]
            texts.append(text.strip())
        return texts

    return answer
