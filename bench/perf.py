"""Performance benchmark: our train step and generation side by side with a PyTorch reference.

Measured in one run, on this machine, with the same model dimensions and the same batch shape:

* ``matmul_peak_flops``: a jitted fp32 ``jnp.dot`` of two n x n matrices (2 n^3 FLOP), median of runs:
  the roofline the train step is compared against.
* ``ours_step_s`` / ``ours_fused_step_s``: median time of our jitted train step (``mode='split'``: the
  three programs with the in-process link, bytes not measured; ``mode='fused'``: one program), after
  warm-up (the compile is not timed). Every parameter trains (AdamW), as in the reference.
* ``torch_eager_step_s`` (and ``torch_compile_step_s`` when ``torch.compile`` works): a
  ``transformers`` ``LlavaForConditionalGeneration`` (SigLIP tower + Llama decoder, same dims, random
  init, fp32) with the paper's quantizer written in torch for each modality (in_proj -> mean +- 3 sigma
  clip and rescale -> round with a straight-through estimator -> out_proj, cosine distortion loss with
  weight 0.25), cross entropy, backward and ``torch.optim.AdamW``.
* ``fraction_of_matmul_peak``: analytic train-step FLOPs / ``ours_step_s`` / ``matmul_peak_flops``. The
  FLOP count is ``6 * N * tokens`` per component (vision tower over the patches, connector and image
  quantizer over the image tokens, text quantizer over the text tokens, decoder with its tied output head
  over the merged sequence; N excludes the embedding lookup) plus ``12 * layers * seq^2 * width`` for the
  attention scores and values (forward + backward).
* ``gen_tokens_per_s_{ours,torch}`` (batch 8) and ``..._b1`` (batch 1): greedy generation of
  ``gen_new_tokens`` tokens without a stop token, ours (:func:`qtl_jax.generate.generate`) vs
  ``transformers`` ``generate``, on one tiny llava-hf checkpoint saved offline and loaded with
  :func:`qtl_jax.load_pretrained`. Median of runs after two warm-up calls (the first call of
  ``transformers`` ``generate`` was measured 4-7x slower than later ones on this machine).

Usage (from the repository root)::

    python -m bench.perf [--sizes=demo,mid] [--out=DIR] [--steps=10] [--no-torch-compile]

writes ``DIR/perf.json`` (one object per size, plus the machine) and ``DIR/perf.md`` (a table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_PLACEHOLDER = -200  # the factory convention: one placeholder per image in input_ids
DIST_WEIGHT = 0.25
CLIP_SIGMA = 3.0


@dataclasses.dataclass(frozen=True)
class Size:
    """Model dims and batch shape of one benchmark size (vision: SigLIP-style ViT; llm: Llama-style)."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    head_dim: int
    vocab: int
    batch: int
    text_len: int  # input ids per sample, the image placeholder included
    levels: int = 4
    gen_prompt_text: int = 16  # text tokens of a generation prompt (plus the image tokens)
    gen_new_tokens: int = 32

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def merged_len(self) -> int:
        return self.text_len - 1 + self.image_tokens


# demo: configs/common.py demo_model() (the tokenizer sets its vocabulary at run time; 512 here).
SIZES: dict[str, Size] = {
    "micro": Size(32, 64, 1, 2, 32, 8, 32, 64, 1, 2, 1, 16, 128, batch=2, text_len=12, gen_prompt_text=4,
                  gen_new_tokens=4),
    "demo": Size(64, 128, 2, 2, 64, 8, 128, 256, 4, 4, 2, 32, 512, batch=16, text_len=64),
    # 12-layer d=768 LLM, 12-layer ViT-B/16 at 224 px (196 image tokens), merged sequence 511.
    "mid": Size(768, 3072, 12, 12, 224, 16, 768, 2048, 12, 12, 4, 64, 32000, batch=4, text_len=316),
}


def _median_time(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# Roofline


def matmul_peak(n: int = 2048, runs: int = 5) -> float:
    """FLOP/s of a jitted fp32 n x n matmul on the default device (median of ``runs``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2.0 * n**3 / _median_time(lambda: dot(a, b).block_until_ready(), runs)


def step_flops(s: Size) -> dict[str, float]:
    """Analytic FLOPs of one train step (forward + backward = 3x forward) and the parameter counts used."""
    dv, dl = s.vision_hidden, s.llm_hidden
    kv = s.llm_kv_heads * s.head_dim
    q = s.llm_heads * s.head_dim
    vision = s.vision_layers * (4 * dv * dv + 2 * dv * s.vision_intermediate) + 3 * s.patch_size**2 * dv
    connector = dv * dl + dl * dl
    quantizer = 2 * dl * dl  # in_proj + out_proj
    decoder = s.llm_layers * (2 * dl * q + 2 * dl * kv + 3 * dl * s.llm_intermediate) + dl * s.vocab  # + tied head
    b, p, m = s.batch, s.image_tokens, s.merged_len
    flops = 6.0 * b * (vision * p + (connector + quantizer) * p + quantizer * s.text_len + decoder * m)
    attention = 12.0 * b * (s.vision_layers * p * p * dv + s.llm_layers * m * m * q)
    return dict(train_step_flops=flops + attention, params_vision=vision, params_connector=connector,
                params_quantizers=2 * quantizer, params_decoder_with_head=decoder)


# ----------------------------------------------------------------------------------------------------
# Batch (one image per sample, placeholder at position 1, last quarter of sample 0 padded)


def make_batch(s: Size, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, s.vocab, (s.batch, s.text_len)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[:, 1] = IMAGE_PLACEHOLDER
    pad_from = s.text_len - s.text_len // 4
    mask[0, pad_from:] = 0
    ids[mask == 0] = 0
    labels = np.where((np.arange(s.text_len) >= 2) & (mask > 0), ids, -100).astype(np.int32)
    pixels = rng.normal(size=(s.batch, s.image_size, s.image_size, 3)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                has_image=np.ones(s.batch, np.int32))


# ----------------------------------------------------------------------------------------------------
# Ours: the jitted split / fused train step


def quantized_config(s: Size):
    from qtl_jax.models import quantized as qm
    from qtl_jax.models.connector import ConnectorConfig
    from qtl_jax.models.decoder import DecoderConfig
    from qtl_jax.models.tinyllava import TinyLlavaConfig
    from qtl_jax.models.vision import VisionConfig
    from qtl_jax.quantizer import QuantizerConfig

    vision = VisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                          num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                          image_size=s.image_size, patch_size=s.patch_size)
    llm = DecoderConfig.make(family="llama", vocab_size=s.vocab, hidden_size=s.llm_hidden, num_layers=s.llm_layers,
                             num_heads=s.llm_heads, num_kv_heads=s.llm_kv_heads, intermediate_size=s.llm_intermediate,
                             head_dim=s.head_dim, tie_word_embeddings=True)
    model = TinyLlavaConfig(vision=vision, connector=ConnectorConfig("mlp2x_gelu", s.vision_hidden, s.llm_hidden),
                            llm=llm, max_length=s.merged_len)
    q = dict(dim=s.llm_hidden, levels=s.levels, dist_weight=DIST_WEIGHT, clip_sigma=CLIP_SIGMA)
    return qm.QuantizedTinyLlavaConfig(model, QuantizerConfig(**q), QuantizerConfig(**q))


OPTIMIZER = dict(lr=1e-4, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", grad_clip_norm=0.0,
                 no_decay=[], param_groups=[(".*", 1.0)])


def time_ours(s: Size, mode: str, steps: int, warmup: int = 2) -> float:
    """Median seconds of our jitted train step (every parameter trains), compile excluded."""
    from qtl_jax.split import link as linklib
    from qtl_jax.split import step as steplib
    from qtl_jax.split.mesh import split_meshes

    config = quantized_config(s)
    # One device: the reference runs on one process too, and sharding a tiny model only adds collectives.
    meshes = split_meshes(0, 0, devices=jax.devices()[:1])
    state = steplib.create_train_state(config, jax.random.key(0), meshes, OPTIMIZER, total_steps=1000)
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 1000, {"client": state.client.params,
                                                                 "server": state.server.params})
    link = linklib.InProcessLink(meshes, measure=False) if mode == "split" else None
    step = steplib.make_train_step(config, meshes, optimizers, mode=mode, link=link)
    batch = make_batch(s)
    for _ in range(warmup):
        state, _ = step(state, batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"our {mode} step gave a non-finite loss {metrics['loss']}")
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference


def hf_llava(s: Size, seed: int = 0, image_token_index: int | None = None):
    """A random-init fp32 transformers LLaVA (SigLIP + Llama) with this size's dims."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlavaConfig(
        vision_config=T.SiglipVisionConfig(
            hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate, num_hidden_layers=s.vision_layers,
            num_attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch_size),
        text_config=T.LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.llm_hidden, intermediate_size=s.llm_intermediate,
            num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads, num_key_value_heads=s.llm_kv_heads,
            head_dim=s.head_dim, tie_word_embeddings=True, max_position_embeddings=max(2048, s.merged_len + 64)),
        image_token_index=s.vocab - 1 if image_token_index is None else image_token_index,
        vision_feature_layer=-2, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    return T.LlavaForConditionalGeneration(cfg)


def torch_quantizer(dim: int, levels: int):
    """The paper's quantizer (method.md section 3) as a torch module: returns (reconstruction, dist loss)."""
    import torch
    from torch import nn

    class Quantizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj = nn.Linear(dim, dim)
            self.out_proj = nn.Linear(dim, dim)

        def forward(self, x):
            u = self.in_proj(x)
            mean, std = u.mean(), u.std()  # scalars over the whole tensor, gradients flow through them
            lo, hi = mean - CLIP_SIGMA * std, mean + CLIP_SIGMA * std
            z = 2 * (torch.clamp(u, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1
            h, o = (levels - 1) / 2, ((levels - 1) % 2) / 2
            shifted = h * z - o
            zhat = (shifted + (torch.round(shifted) - shifted).detach() + o) / h
            target = zhat.detach()
            cos = (z * target).sum(-1) / (z.norm(dim=-1) * target.norm(dim=-1) + 1e-3)
            return self.out_proj(zhat), DIST_WEIGHT * (1 - cos).mean()

    return Quantizer()


def torch_reference(s: Size):
    """(module, loss_fn(batch) -> loss) for the reference train step on the same batch shape."""
    import torch
    from torch import nn

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.llava = hf_llava(s)
            self.image_q = torch_quantizer(s.llm_hidden, s.levels)
            self.text_q = torch_quantizer(s.llm_hidden, s.levels)

        def forward(self, ids, mask, labels, pixels):
            m = self.llava.model
            vision = m.vision_tower(pixel_values=pixels, output_hidden_states=True)
            image = m.multi_modal_projector(vision.hidden_states[-2])
            text = m.get_input_embeddings()(ids.clamp(min=0))
            image, dist_image = self.image_q(image)
            text, dist_text = self.text_q(text)
            # Placeholder at position 1 of every sample: splice the image tokens in there.
            embeds = torch.cat([text[:, :1], image, text[:, 2:]], dim=1)
            n_img = image.shape[1]
            full_mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]).expand(-1, n_img), mask[:, 2:]], 1)
            full_labels = torch.cat([labels[:, :1], torch.full_like(labels[:, :1], -100).expand(-1, n_img),
                                     labels[:, 2:]], 1)
            hidden = m.language_model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
            logits = self.llava.lm_head(hidden)
            ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             full_labels[:, 1:].reshape(-1), ignore_index=-100)
            return ce + dist_image + dist_text

    return Reference()


def time_torch(s: Size, steps: int, compile_: bool, warmup: int = 3) -> tuple[float, float]:
    """(median step seconds, seconds spent in the warm-up steps: the compile for torch.compile)."""
    import torch

    torch.manual_seed(0)
    model = torch_reference(s).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    b = make_batch(s)
    args = (torch.from_numpy(b["input_ids"]).long(), torch.from_numpy(b["attention_mask"]).long(),
            torch.from_numpy(b["labels"]).long(), torch.from_numpy(b["pixel_values"].transpose(0, 3, 1, 2).copy()))
    forward = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward(*args)
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - start
    loss = None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the torch reference gave a non-finite loss {float(loss)}")
    return statistics.median(times), warm


# ----------------------------------------------------------------------------------------------------
# Generation


def time_generation(s: Size, batches: tuple[int, ...], runs: int) -> dict[str, float]:
    """Greedy tokens/s, ours vs transformers, on one tiny llava-hf checkpoint; keys per batch size."""
    import torch

    from qtl_jax import generate as gen
    from qtl_jax import load_pretrained

    image_id = s.vocab - 1
    hf = hf_llava(s, seed=1, image_token_index=image_id).eval()
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        model, params = load_pretrained(path, vision_feature_select_strategy="full", verbose=False)
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    new = s.gen_new_tokens
    for b in batches:
        ids = rng.integers(1, s.vocab - 1, (b, 1 + s.image_tokens + s.gen_prompt_text)).astype(np.int64)
        ids[:, 1 : 1 + s.image_tokens] = image_id
        pixels = rng.normal(size=(b, 3, s.image_size, s.image_size)).astype(np.float32)
        mask = np.ones_like(ids)

        def ours():
            return gen.generate(model, params, input_ids=ids.astype(np.int32), attention_mask=mask,
                                pixel_values=pixels.transpose(0, 2, 3, 1), max_new_tokens=new, stop_token_ids=[])

        def theirs():
            with torch.no_grad():
                return hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                   pixel_values=torch.from_numpy(pixels), do_sample=False, max_new_tokens=new,
                                   min_new_tokens=new, pad_token_id=0, eos_token_id=None)

        produced = ours().sequences
        ref = theirs()[:, ids.shape[1]:].numpy()
        # A second warm-up: torch (oneDNN) is still 3-6x slower on its second call of a shape sequence here.
        ours(), theirs()
        if produced.shape != (b, new) or ref.shape != (b, new):
            raise RuntimeError(f"generation made {produced.shape} (ours) / {ref.shape} (torch), expected {(b, new)}")
        suffix = "" if b == 8 else f"_b{b}"
        out[f"gen_tokens_per_s_ours{suffix}"] = b * new / _median_time(ours, runs)
        out[f"gen_tokens_per_s_torch{suffix}"] = b * new / _median_time(theirs, runs)
        # Same weights, greedy: agreement is a sanity check that both ran the same model.
        out[f"gen_token_agreement{suffix}"] = float((produced == ref).mean())
    return out


# ----------------------------------------------------------------------------------------------------
# Driver


def bench_size(name: str, s: Size, steps: int, torch_compile: bool, gen_runs: int, peak: float,
               log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    r: dict[str, Any] = dict(size=name, config=dataclasses.asdict(s), image_tokens=s.image_tokens,
                             merged_len=s.merged_len, timed_steps=steps)
    log(f"[{name}] ours split step")
    r["ours_step_s"] = time_ours(s, "split", steps)
    log(f"[{name}] ours fused step")
    r["ours_fused_step_s"] = time_ours(s, "fused", steps)
    log(f"[{name}] torch eager step")
    r["torch_eager_step_s"], _ = time_torch(s, steps, compile_=False)
    if torch_compile:
        log(f"[{name}] torch.compile step")
        try:
            r["torch_compile_step_s"], r["torch_compile_warmup_s"] = time_torch(s, steps, compile_=True)
        except Exception as e:  # noqa: BLE001 -- recorded, the rest of the benchmark still runs
            r["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    else:
        r["torch_compile_error"] = "skipped (--no-torch-compile)"
    r["ratio_vs_torch_eager"] = r["ours_step_s"] / r["torch_eager_step_s"]
    r["ratio_fused_vs_torch_eager"] = r["ours_fused_step_s"] / r["torch_eager_step_s"]
    r["ours_examples_per_s"] = s.batch / r["ours_step_s"]
    r["torch_eager_examples_per_s"] = s.batch / r["torch_eager_step_s"]
    r.update(step_flops(s))
    r["ours_step_flops_per_s"] = r["train_step_flops"] / r["ours_step_s"]
    r["fraction_of_matmul_peak"] = r["ours_step_flops_per_s"] / peak
    r["torch_eager_fraction_of_matmul_peak"] = r["train_step_flops"] / r["torch_eager_step_s"] / peak
    log(f"[{name}] generation")
    r.update(time_generation(s, (1, 8), gen_runs))
    r["torch_threads"] = torch.get_num_threads()
    return r


TABLE_ROWS = [
    ("ours_step_s", "our split train step (s, median)"),
    ("ours_fused_step_s", "our fused train step (s, median)"),
    ("torch_eager_step_s", "PyTorch eager train step (s, median)"),
    ("torch_compile_step_s", "torch.compile train step (s, median)"),
    ("ratio_vs_torch_eager", "ratio ours split / torch eager (lower is better)"),
    ("ratio_fused_vs_torch_eager", "ratio ours fused / torch eager"),
    ("ours_examples_per_s", "our examples/s (split)"),
    ("torch_eager_examples_per_s", "torch eager examples/s"),
    ("train_step_flops", "analytic train-step FLOPs"),
    ("fraction_of_matmul_peak", "our split step, fraction of matmul peak"),
    ("torch_eager_fraction_of_matmul_peak", "torch eager, fraction of matmul peak"),
    ("gen_tokens_per_s_ours_b1", "generation tokens/s, ours, batch 1"),
    ("gen_tokens_per_s_torch_b1", "generation tokens/s, transformers, batch 1"),
    ("gen_tokens_per_s_ours", "generation tokens/s, ours, batch 8"),
    ("gen_tokens_per_s_torch", "generation tokens/s, transformers, batch 8"),
    ("gen_token_agreement", "greedy tokens equal to transformers' (batch 8)"),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3) else f"{v:.4g}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    lines = [f"Machine: {report['machine']}; matmul peak (fp32 {report['matmul_n']}^2, jnp): "
             f"{report['matmul_peak_flops']:.3e} FLOP/s", "",
             "| metric | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for key, label in TABLE_ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(sizes[n].get(key, "n/a")) for n in sizes) + " |")
    for n, r in sizes.items():
        if "torch_compile_error" in r:
            lines.append(f"\n{n}: torch.compile not measured: {r['torch_compile_error']}")
    return "\n".join(lines) + "\n"


def run(sizes: list[str], out: str, steps: int = 10, torch_compile: bool = True, gen_runs: int = 3,
        matmul_n: int = 2048, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the benchmark for ``sizes`` (keys of :data:`SIZES`), writes ``out/perf.{json,md}``, returns the JSON."""
    unknown = [n for n in sizes if n not in SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}: choose from {sorted(SIZES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    import torch

    log(f"matmul peak ({matmul_n}^2 fp32)")
    peak = matmul_peak(matmul_n)
    report: dict[str, Any] = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, "
                f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        matmul_n=matmul_n, matmul_peak_flops=peak, sizes={})
    for name in sizes:
        report["sizes"][name] = bench_size(name, SIZES[name], steps, torch_compile, gen_runs, peak, log)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "perf.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "perf.md"), "w") as f:
        f.write(markdown(report))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="demo", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--out", default="bench_out", help="directory for perf.json and perf.md")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (after 2 warm-up steps for ours, 3 for torch)")
    parser.add_argument("--gen-runs", type=int, default=5, help="timed generation calls per batch size")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (its compile is slow)")
    args = parser.parse_args()
    report = run([n.strip() for n in args.sizes.split(",") if n.strip()], args.out, args.steps,
                 not args.no_torch_compile, args.gen_runs, args.matmul_n)
    print(markdown(report))


if __name__ == "__main__":
    main()
