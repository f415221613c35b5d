"""Describe an image / answer a question from the command line.

    python -m qtl_jax.chat --checkpoint=DIR --image=cat.png --prompt="What is in the image?"

``DIR`` is either a local checkpoint directory that :func:`qtl_jax.load_pretrained` reads (TinyLLaVA
Factory, llava-hf, legacy LLaVA) holding the LLM's tokenizer files and a ``preprocessor_config.json``
(SigLIP / CLIP image processor), or a ``train.py`` workdir (Orbax ``checkpoints/`` + ``config.json``),
whose latest checkpoint is answered with the prompt through the trained quantizers. Without ``--image``
the prompt is answered as text only. The answer goes to stdout; ``--stats`` adds the generation speed
on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import PIL.Image

from qtl_jax import generate as gen
from qtl_jax.data.image_processing import ImageProcessor
from qtl_jax.data.templates import TEMPLATE_NAMES, get_template
from qtl_jax.tokenizer import load_tokenizer
from qtl_jax.weights.loader import load_pretrained

# The Factory's conversation template for each LLM family (OpenELM uses the Llama tokenizer).
DEFAULT_TEMPLATES = {"llama": "llama", "openelm": "llama", "phi": "phi", "gemma": "gemma", "qwen2": "qwen2_base"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qtl_jax.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="local checkpoint directory (weights, tokenizer, preprocessor)")
    p.add_argument("--image", default=None, help="image file; omit for a text-only question")
    p.add_argument("--prompt", required=True, help="the question / instruction")
    p.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                   help="conversation template (default: the one for the checkpoint's LLM family)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (Hugging Face directories; a workdir uses its run's)")
    p.add_argument("--tokenizer_dir", default=None,
                   help="tokenizer directory, if not the checkpoint's (a train.py workdir finds its run's tokenizer)")
    p.add_argument("--stats", action="store_true", help="print tokens and tokens/s to stderr")
    return p.parse_args(argv)


def is_train_workdir(path: str) -> bool:
    """A ``train.py`` workdir: Orbax ``checkpoints/`` plus the run's ``config.json``."""
    return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json"))


def _load_workdir(args: argparse.Namespace):
    """The latest checkpoint of a training run: the quantized split model, the prompt through its quantizers."""
    from qtl_jax.eval.model import load_from_workdir
    from qtl_jax.train.checkpoint import read_config

    name = args.template or read_config(args.checkpoint)["data"]["template"]
    # The key only seeds the abstract init that gives the restore its structure; every weight is restored.
    loaded = load_from_workdir(args.checkpoint, name, args.tokenizer_dir, jax.random.key(0))
    model, params, quantizers = gen.split_model(loaded.qconfig, loaded.params, loaded.batch_stats)
    return model, params, quantizers, loaded.tokenizer, loaded.image_processor, loaded.template


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the CLI; returns the answer (also printed)."""
    args = parse_args(argv)
    if is_train_workdir(args.checkpoint):
        model, params, quantizers, tokenizer, processor, template = _load_workdir(args)
    else:
        model, params = load_pretrained(args.checkpoint, dtype=args.dtype, verbose=False)
        family = model.config.llm.family
        name = args.template or DEFAULT_TEMPLATES.get(family)
        if name is None:
            raise SystemExit(
                f"no default template for a {family} LLM; pass --template (one of {', '.join(TEMPLATE_NAMES)})"
            )
        template = get_template(name)
        tokenizer = load_tokenizer(args.tokenizer_dir or args.checkpoint)
        processor = ImageProcessor.from_hf(args.checkpoint) if args.image is not None else None
        quantizers = None
    pixel_values = None
    if args.image is not None:
        pixel_values = np.asarray(processor(PIL.Image.open(args.image).convert("RGB")), np.float32)[None]
    prompt = template.prompt(args.prompt, has_image=pixel_values is not None)
    start = time.perf_counter()
    out = gen.generate(
        model, params, tokenizer, prompts=[prompt], pixel_values=pixel_values, max_new_tokens=args.max_new_tokens,
        stop_token_ids=gen.stop_token_ids_for(template, tokenizer), stop_strings=[template.stop_str],
        temperature=args.temperature, top_p=args.top_p, rng=jax.random.key(args.seed) if args.temperature > 0 else None,
        quantizers=quantizers,
    )
    elapsed = time.perf_counter() - start
    answer = out.text[0].strip()
    print(answer)
    if args.stats:
        n = int(out.lengths[0])
        print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s, compilation included]", file=sys.stderr)
    return answer

if __name__ == "__main__":
    from qtl_jax import cli

    cli.run(main, prog="python -m qtl_jax.chat")  # bad input: one line and a non-zero exit
