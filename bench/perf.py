"""Performance benchmark: our train step and generation side by side with a PyTorch reference.

Measured in one run, on this machine, with the same model dimensions and the same batch shape:

* ``matmul_peak_flops``: a jitted fp32 ``jnp.dot`` of two n x n matrices (2 n^3 FLOP) for n = matmul_n/2,
  matmul_n and 2 matmul_n, the fastest of several runs of each, measured before and after the steps; the
  best of all of them is the roofline the train step is compared against (``matmul_peak_before_flops`` /
  ``matmul_peak_after_flops`` show the drift; one median at one size, on a shared machine, can land far
  below the peak and give fractions above 1).
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

    python -m bench.perf [--sizes=demo,mid,paper] [--out=DIR] [--steps=10] [--no-torch-compile]

``paper``: the paper's configuration per stage, on one real bucketed batch (:mod:`bench.paper`).

writes ``DIR/perf.json`` (one object per size, plus the machine) and ``DIR/perf.md`` (a table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
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


def _spread(times: list[float]) -> dict[str, float]:
    """Median and interquartile range of timings (the IQR shows this machine's drift within one run)."""
    q = np.percentile(np.asarray(times), [25, 50, 75])
    return dict(median=float(q[1]), iqr=float(q[2] - q[0]))


def _error(e: BaseException) -> str:
    """One line naming the failure, stored as ``*_error`` so the other measurements still run."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:300]


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _sync_torch() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_device() -> str:
    """'cuda' when JAX runs on a GPU (both frameworks then share the card), else 'cpu'.

    ``QTL_BENCH_TORCH_DEVICE`` overrides it: the torch memory worker sets it so that it never starts
    JAX's GPU backend (which would reserve most of the card's memory in that process).
    """
    import torch

    forced = os.environ.get("QTL_BENCH_TORCH_DEVICE")
    if forced:
        return forced
    return "cuda" if on_gpu() and torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------
# Roofline


def matmul_peak(n: int = 2048, runs: int = 5, dtype: Any = jnp.float32) -> float:
    """FLOP/s of a jitted n x n matmul in ``dtype`` on the default device (the fastest of ``runs``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def matmul_peak_best(n: int, runs: int = 5, dtype: Any = jnp.float32) -> dict[int, float]:
    """:func:`matmul_peak` at n/2, n and 2n (a peak is a best case: sizes and repeats, not one median)."""
    return {m: matmul_peak(m, runs, dtype) for m in sorted({max(n // 2, 16), n, 2 * n})}


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


def quantized_config(s: Size, dtype: Any = jnp.float32):
    """Our model at size ``s``; ``dtype`` is the compute dtype (parameters stay fp32)."""
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
                            llm=llm, max_length=s.merged_len, dtype=dtype)
    # The quantizers' projections follow the compute dtype; their scaling and rounding stay fp32.
    q = dict(dim=s.llm_hidden, levels=s.levels, dist_weight=DIST_WEIGHT, clip_sigma=CLIP_SIGMA, dtype=dtype)
    return qm.QuantizedTinyLlavaConfig(model, QuantizerConfig(**q), QuantizerConfig(**q))


OPTIMIZER = dict(lr=1e-4, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", grad_clip_norm=0.0,
                 no_decay=[], param_groups=[(".*", 1.0)])


def build_ours(s: Size, mode: str, dtype: Any = jnp.float32, codec_threads: int | None = None):
    """(step, state, batch) of our jitted train step at size ``s`` (every parameter trains); split mode
    measures bytes only with ``codec_threads`` set (0: in the step, n: on n background threads)."""
    from qtl_jax.split import link as linklib
    from qtl_jax.split import step as steplib
    from qtl_jax.split.mesh import split_meshes

    config = quantized_config(s, dtype)
    # One device: the reference runs on one process too, and sharding a tiny model only adds collectives.
    meshes = split_meshes(0, 0, devices=jax.devices()[:1])
    state = steplib.create_train_state(config, jax.random.key(0), meshes, OPTIMIZER, total_steps=1000)
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 1000, {"client": state.client.params,
                                                                 "server": state.server.params})
    server = None
    if mode == "split":
        server = linklib.InProcessServerHalf(meshes, steplib.server_update_fn(config, optimizers),
                                             measure=codec_threads is not None, codec_threads=codec_threads or 0)
    step = steplib.make_train_step(config, meshes, optimizers, mode=mode, server=server)
    return step, state, make_batch(s)


def time_ours(s: Size, mode: str, steps: int, warmup: int = 2, dtype: Any = jnp.float32) -> list[float]:
    """Seconds of each timed step of our jitted train step (every parameter trains), compile excluded."""
    step, state, batch = build_ours(s, mode, dtype)
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
    return times


def xla_step_bytes(s: Size) -> dict[str, int]:
    """XLA's own memory figure for our fused step program: argument + output + temp bytes (aliased excluded).

    The fused program is the one jitted function of ``make_train_step(mode='fused')``; it is taken from
    the step's closure after one call (the factory does not expose it), lowered on the same device batch
    and compiled again, so nothing here changes the step.
    """
    from qtl_jax.split import step as steplib

    step, state, batch = build_ours(s, "fused")
    state, _ = step(state, batch)
    programs = next((c.cell_contents for c in step.__closure__ or ()
                     if isinstance(c.cell_contents, dict) and "fused" in c.cell_contents), None)
    if programs is None:
        raise LookupError("make_train_step(mode='fused') no longer keeps its program in a 'programs' dict; "
                          "update bench.perf.xla_step_bytes to reach the jitted step")
    from qtl_jax.split.mesh import split_meshes

    meshes = split_meshes(0, 0, devices=jax.devices()[:1])
    m = programs["fused"].lower(state, steplib.device_batch(batch, meshes.client)).compile().memory_analysis()
    if m is None:
        raise RuntimeError("this backend's compiled.memory_analysis() returned None")
    out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, temp=m.temp_size_in_bytes,
               alias=m.alias_size_in_bytes)
    # Donated state aliases its outputs: count those bytes once.
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# ----------------------------------------------------------------------------------------------------
# Quantizers and codec at the step's shapes


def quantizer_time(s: Size, runs: int = 10) -> float:
    """Median seconds of forward + backward of both quantizers at the step's shapes, jitted standalone.

    The image quantizer sees [batch, image_tokens, D], the text quantizer [batch, text_len, D] (the step
    quantizes every text position), in the paper's configuration (batch scaling, straight-through, cosine
    distortion); the gradient is taken w.r.t. both projections and the input, as in the step.
    """
    from qtl_jax.quantizer import Quantizer, QuantizerConfig

    cfg = QuantizerConfig(dim=s.llm_hidden, levels=s.levels, dist_weight=DIST_WEIGHT, clip_sigma=CLIP_SIGMA)
    q = Quantizer(cfg)
    shapes = {"image": (s.batch, s.image_tokens, s.llm_hidden), "text": (s.batch, s.text_len, s.llm_hidden)}
    keys = dict(zip(shapes, jax.random.split(jax.random.key(0), 2)))
    xs = {m: jax.random.normal(keys[m], shp) for m, shp in shapes.items()}
    params = {m: q.init(jax.random.key(1), xs[m])["params"] for m in shapes}
    cts = {m: jax.random.normal(jax.random.key(2), shp) for m, shp in shapes.items()}

    def loss(p, x):
        total = 0.0
        for m in shapes:
            out = q.apply({"params": p[m]}, x[m], train=True)
            total = total + jnp.sum(out.y * cts[m]) + out.loss  # a fixed cotangent for the reconstruction
        return total

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(params, xs))
    return _median_time(lambda: jax.block_until_ready(grad(params, xs)), runs)


def step_codes(s: Size) -> dict[str, np.ndarray]:
    """The integer codes one step sends (image and text), from the paper's quantizer at a fresh init."""
    from qtl_jax.quantizer import Quantizer, QuantizerConfig

    q = Quantizer(QuantizerConfig(dim=s.llm_hidden, levels=s.levels, dist_weight=DIST_WEIGHT, clip_sigma=CLIP_SIGMA))
    out = {}
    for i, (m, n) in enumerate((("image", s.image_tokens), ("text", s.text_len))):
        x = jax.random.normal(jax.random.key(10 + i), (s.batch, n, s.llm_hidden))
        variables = q.init(jax.random.key(1), x)
        out[m] = np.asarray(q.apply(variables, x, method="encode").codes)
    return out


def codec_figures(s: Size, runs: int = 5) -> dict[str, float]:
    """Host seconds to encode + decode one step's codes (packed and ANS), bits per index and entropy."""
    from qtl_jax import codec

    codes = step_codes(s)
    n = sum(c.size for c in codes.values())
    r: dict[str, float] = {}
    for method in ("packed", "ans"):
        messages = {m: codec.encode(c, s.levels, method) for m, c in codes.items()}
        for m, c in codes.items():
            if not np.array_equal(codec.decode(messages[m]), c):
                raise RuntimeError(f"codec {method} did not round-trip the {m} codes")

        def roundtrip(method=method):
            for c in codes.values():
                codec.decode(codec.encode(c, s.levels, method))

        r[f"codec_{method}_s"] = _median_time(roundtrip, runs)
        r[f"codec_{method}_bits_per_index"] = 8.0 * sum(len(b) for b in messages.values()) / n
    r["codec_bits_per_index"] = r["codec_ans_bits_per_index"]
    # Each modality is one message with its own histogram: the entropy target is per message, summed.
    r["entropy_bits_per_index"] = sum(codec.empirical_entropy_bits(c, s.levels) for c in codes.values()) / n
    r["codec_overhead_vs_entropy"] = r["codec_bits_per_index"] / r["entropy_bits_per_index"] - 1.0
    r["codec_indices_per_step"] = float(n)
    return r


CODEC_THREADS = 2


def codec_overlap_figures(s: Size, steps: int, threads: int = CODEC_THREADS) -> dict[str, float]:
    """Our split step measuring every step's bytes with the real codec: in the step vs in the background.

    One split step (one compile), run after one warm-up in the phases of :func:`codec_overlap_phases`:
    off, sync, overlap, overlap, sync, off, each ``max(steps // 2, 2)`` steps, so that a linear drift of the
    machine cancels.
    """
    step, state, batch = build_ours(s, "split", codec_threads=0)
    state, _ = step(state, batch)  # compiles
    phases = ("off", "sync", "overlap", "overlap", "sync", "off")
    return codec_overlap_phases(step, state, batch, max(steps // 2, 2), phases, threads)["figures"]


def codec_overlap_phases(step, state, batch, n_steps: int, phases: tuple[str, ...],
                         threads: int = CODEC_THREADS, measure_every: int = 1, pool: str = "threads") -> dict[str, Any]:
    """Runs a compiled split ``step`` (its server half an ``InProcessServerHalf``) ``n_steps`` times per phase.

    Phases: bytes not measured (``off``: ``codec_off_step_s``), measured inside the step (``sync``,
    ``codec_threads=0``: ``codec_sync_step_s``) and measured on ``threads`` background workers (``pool``:
    threads or processes, ``split.codec_pool``; the processes are started before the phase is timed) with each
    step's counts merged one step later, as ``train.py`` does (``overlap``: ``codec_overlap_step_s``). The
    measuring phases measure every ``measure_every``-th step (``split.measure_every``), so the added share is
    the codec's cost amortised over the steps as training pays it. Per measured step of the overlapped phase:
    ``codec_busy_s`` (host codec time), ``codec_exposed_s`` (time the step loop waited for it) and
    ``codec_hidden_s`` (the rest); ``codec_measured_steps`` counts them. Wall times are means over each phase
    (a step's coding ends in the next), so the overlap needs at least 2 steps per phase to show (the last
    step's coding has no next step to hide behind). Returns ``{'figures': {...}, 'times': {phase: [seconds of
    each step]}, 'state': the state after the last step}`` (the state passed in is donated).
    """
    from qtl_jax.split.link import PENDING_COUNTS
    from qtl_jax.split.meter import ByteMeter

    if int(measure_every) < 1:
        raise ValueError(f"measure_every must be >= 1, got {measure_every}")
    server = step.server
    wall = {p: 0.0 for p in phases}
    runs = {p: 0 for p in phases}
    times: dict[str, list[float]] = {p: [] for p in phases}
    busy = exposed = 0.0
    measured_overlap = 0
    server.measure_every = int(measure_every)
    for phase in phases:
        n = threads if phase == "overlap" else 0
        server.measure, server.meter, step.defer_counts = phase != "off", ByteMeter(n, pool=pool), n > 0
        server.meter.wait_ready()
        measured = 0
        try:
            pending, start = None, time.perf_counter()
            for _ in range(n_steps):
                t0 = time.perf_counter()
                state, metrics = step(state, batch)
                if pending is not None:
                    pending.result()
                pending = metrics.pop(PENDING_COUNTS, None)
                measured += pending is not None or "uplink_bytes" in metrics
                if phase == "off":
                    jax.block_until_ready(state)
                times[phase].append(time.perf_counter() - t0)
            if pending is not None:
                pending.result()
            jax.block_until_ready(state)
            wall[phase] += time.perf_counter() - start
            runs[phase] += n_steps
            if phase != "off" and not measured:
                raise RuntimeError(f"the {phase} phase measured no bytes in {n_steps} steps (measure_every="
                                   f"{measure_every}): run at least measure_every steps")
            if phase == "overlap":
                st = server.meter.stats()
                busy, exposed = busy + st["codec_seconds"], exposed + st["exposed_seconds"]
                measured_overlap += measured
        finally:
            server.meter.close()
    r: dict[str, Any] = {"codec_threads": float(threads), "codec_measure_every": float(measure_every),
                         "codec_pool": pool}
    r.update({f"codec_{phase}_step_s": t / runs[phase] for phase, t in wall.items()})
    if "overlap" in runs:
        r["codec_measured_steps"] = float(measured_overlap)
        r["codec_busy_s"], r["codec_exposed_s"] = busy / measured_overlap, exposed / measured_overlap
        r["codec_hidden_s"] = max(r["codec_busy_s"] - r["codec_exposed_s"], 0.0)
    for phase in ("sync", "overlap"):
        if phase in runs and "off" in runs:
            r[f"codec_{phase}_added_share"] = r[f"codec_{phase}_step_s"] / r["codec_off_step_s"] - 1.0
    return {"figures": r, "times": times, "state": state}


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

        def forward(self, x, rows=None):
            """``rows`` ([B, T] bool, optional): the rows the batch statistics and the distortion loss are
            over (the official text tensor's, ``qtl_jax.models.quantized.paper_text_rows``); default all."""
            u = self.in_proj(x)
            seen = u if rows is None else u[rows]
            mean, std = seen.mean(), seen.std()  # scalars over the whole tensor, gradients flow through them
            lo, hi = mean - CLIP_SIGMA * std, mean + CLIP_SIGMA * std
            z = 2 * (torch.clamp(u, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1
            h, o = (levels - 1) / 2, ((levels - 1) % 2) / 2
            shifted = h * z - o
            zhat = (shifted + (torch.round(shifted) - shifted).detach() + o) / h
            target = zhat.detach()
            cos = (z * target).sum(-1) / (z.norm(dim=-1) * target.norm(dim=-1) + 1e-3)
            return self.out_proj(zhat), DIST_WEIGHT * (1 - (cos if rows is None else cos[rows])).mean()

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


def build_torch(s: Size, compile_: bool = False, bf16: bool = False):
    """A zero-argument reference train step (on ``torch_device()``) and the model it trains."""
    import torch

    device = torch_device()
    torch.manual_seed(0)
    model = torch_reference(s).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    b = make_batch(s)
    args = tuple(t.to(device) for t in (
        torch.from_numpy(b["input_ids"]).long(), torch.from_numpy(b["attention_mask"]).long(),
        torch.from_numpy(b["labels"]).long(), torch.from_numpy(b["pixel_values"].transpose(0, 3, 1, 2).copy())))
    forward = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        # bf16 compute with fp32 parameters and optimizer, as ours with dtype=bfloat16.
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = forward(*args)
        loss.backward()
        opt.step()
        return loss

    return step, model


def time_torch(s: Size, steps: int, compile_: bool, warmup: int = 3, bf16: bool = False) -> tuple[list[float], float]:
    """(seconds of each timed step, seconds spent in the warm-up steps: the compile for torch.compile)."""
    import torch

    step, _ = build_torch(s, compile_, bf16)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync_torch()
    warm = time.perf_counter() - start
    loss = None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        _sync_torch()  # CUDA launches are asynchronous: wait for the step before reading the clock
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the torch reference gave a non-finite loss {float(loss)}")
    del step
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the cached blocks back: JAX shares the card in this process
    return times, warm


# ----------------------------------------------------------------------------------------------------
# Peak memory, each framework in a fresh process


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; the high-water mark alone cannot give a baseline)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


class _RssSampler:
    """Samples the current RSS every ``interval`` seconds in a thread; ``peak`` is the largest sample.

    ``ru_maxrss`` alone cannot isolate the step: it also holds the imports' transient peak, which can
    exceed everything after it. XLA and torch release the GIL while they compute, so the thread runs.
    """

    def __init__(self, interval: float = 5e-4):
        import threading

        self.interval, self.peak = interval, _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def memory_worker(framework: str, size: str, steps: int = 2) -> dict[str, Any]:
    """Runs ``steps`` train steps (after one warm-up) of one framework in this process; its peak memory.

    ``rss_growth_bytes``: peak RSS during the steps minus the RSS after imports + model build (ours: params
    and AdamW state, which ``create_train_state`` makes; torch: params, AdamW state is made lazily in the
    first step). The peak is ``ru_maxrss`` when the steps raised it, else the largest RSS sampled every
    0.5 ms during the steps. It so counts activations, gradients, torch's optimizer state and, for ours, the XLA
    compiler's working memory and executables. ``device_peak_bytes`` (GPU only): the device allocator's
    peak over the whole process (parameters and optimizer state included).
    """
    s = SIZES[size]
    if framework == "ours":
        step, state, batch = build_ours(s, "split")
        jax.block_until_ready(state)
        base, base_max = _rss_bytes(), _maxrss_bytes()
        with _RssSampler() as sampler:
            for _ in range(1 + steps):
                state, _ = step(state, batch)
            jax.block_until_ready(state)
        stats = jax.devices()[0].memory_stats() if on_gpu() else None
        device_peak = stats.get("peak_bytes_in_use") if stats else None
    elif framework == "torch":
        import torch

        step, _ = build_torch(s)
        _sync_torch()
        base, base_max = _rss_bytes(), _maxrss_bytes()
        if torch.cuda.is_available() and torch_device() == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with _RssSampler() as sampler:
            for _ in range(1 + steps):
                step()
            _sync_torch()
        device_peak = torch.cuda.max_memory_allocated() if torch_device() == "cuda" else None
    else:
        raise ValueError(f"unknown framework {framework!r}: use 'ours' or 'torch'")
    end_max = _maxrss_bytes()
    peak = end_max if end_max > base_max else sampler.peak
    return dict(rss_growth_bytes=peak - base, peak_rss_bytes=peak, base_rss_bytes=base,
                device_peak_bytes=device_peak)


def measure_memory(framework: str, size: str, timeout_s: float = 900.0) -> dict[str, Any]:
    """:func:`memory_worker` in a fresh ``python -m bench.perf --_worker`` process (peaks are per process)."""
    cmd = [sys.executable, "-m", "bench.perf", f"--_worker={framework}", f"--sizes={size}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    # The parent holds its own buffers on the same GPU: the worker must not reserve most of the card.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if framework == "torch":
        env.update(QTL_BENCH_TORCH_DEVICE=torch_device(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory worker for {framework} exited {proc.returncode}: {tail}")
    return json.loads(lines[-1])


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


def _guarded_base(r: dict[str, Any], name: str, fn: Callable[[], None], log: Callable[[str], None],
             checkpoint: Callable[[], None] = lambda: None) -> None:
    """Runs one measurement; a failure is recorded as ``r[name + '_error']`` and the benchmark goes on.

    ``checkpoint`` (writing the JSON) runs after each one, so a run killed part way keeps what it measured.
    """
    log(f"[{r['size']}] {name}")
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- recorded, the rest of the benchmark still runs
        r[f"{name}_error"] = _error(e)
        log(f"[{r['size']}] {name} FAILED: {r[f'{name}_error']}\n{traceback.format_exc(limit=4)}")
    r.setdefault("wall_s", {})[name] = round(time.perf_counter() - start, 2)
    checkpoint()


def bench_size(name: str, s: Size, steps: int, torch_compile: bool, gen_runs: int, peak: float,
               log: Callable[[str], None], gen: bool = True, memory: bool = True,
               peak_bf16: float | None = None, mem_workers: bool = True, r: dict[str, Any] | None = None,
               checkpoint: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every measurement of one size into ``r`` (a new dict if None), which is returned."""
    import functools

    r = {} if r is None else r
    r.update(size=name, config=dataclasses.asdict(s), image_tokens=s.image_tokens, merged_len=s.merged_len,
             timed_steps=steps)
    _guarded = functools.partial(_guarded_base, checkpoint=checkpoint)
    r.update(step_flops(s))

    def put_times(prefix: str, times: list[float]) -> None:
        sp = _spread(times)
        r[f"{prefix}_step_s"], r[f"{prefix}_step_s_iqr"] = sp["median"], sp["iqr"]

    def ours():
        put_times("ours", time_ours(s, "split", steps))
        r["ours_examples_per_s"] = s.batch / r["ours_step_s"]
        r["ours_step_flops_per_s"] = r["train_step_flops"] / r["ours_step_s"]
        r["fraction_of_matmul_peak"] = r["ours_step_flops_per_s"] / peak

    def fused():
        put_times("ours_fused", time_ours(s, "fused", steps))

    def eager():
        times, _ = time_torch(s, steps, compile_=False)
        put_times("torch_eager", times)
        r["torch_eager_examples_per_s"] = s.batch / r["torch_eager_step_s"]
        r["torch_eager_fraction_of_matmul_peak"] = r["train_step_flops"] / r["torch_eager_step_s"] / peak

    def compiled():
        times, r["torch_compile_warmup_s"] = time_torch(s, steps, compile_=True)
        put_times("torch_compile", times)

    _guarded(r, "ours", ours, log)
    _guarded(r, "ours_fused", fused, log)
    _guarded(r, "torch_eager", eager, log)
    if torch_compile:
        _guarded(r, "torch_compile", compiled, log)
    else:
        r["torch_compile_error"] = "skipped (--no-torch-compile)"
    if "ours_step_s" in r and "torch_eager_step_s" in r:
        r["ratio_vs_torch_eager"] = r["ours_step_s"] / r["torch_eager_step_s"]
    if "ours_fused_step_s" in r and "torch_eager_step_s" in r:
        r["ratio_fused_vs_torch_eager"] = r["ours_fused_step_s"] / r["torch_eager_step_s"]

    if peak_bf16 is not None:  # GPU: bf16 compute (fp32 params and optimizer) in both frameworks, and MFU
        def ours_bf16():
            put_times("ours_bf16", time_ours(s, "split", steps, dtype=jnp.bfloat16))
            r["mfu"] = r["train_step_flops"] / r["ours_bf16_step_s"] / peak_bf16

        def torch_bf16():
            put_times("torch_bf16", time_torch(s, steps, compile_=False, bf16=True)[0])
            r["torch_bf16_mfu"] = r["train_step_flops"] / r["torch_bf16_step_s"] / peak_bf16

        _guarded(r, "ours_bf16", ours_bf16, log)
        _guarded(r, "torch_bf16", torch_bf16, log)
        if "ours_bf16_step_s" in r and "torch_bf16_step_s" in r:
            r["ratio_bf16_vs_torch"] = r["ours_bf16_step_s"] / r["torch_bf16_step_s"]

    def quantizer():
        r["quantizer_step_s"] = quantizer_time(s)
        r["quantizer_share_of_step"] = r["quantizer_step_s"] / r["ours_step_s"]

    def codec_():
        r.update(codec_figures(s))
        r["codec_share_of_step"] = r["codec_ans_s"] / r["ours_step_s"]
        r["codec_packed_share_of_step"] = r["codec_packed_s"] / r["ours_step_s"]

    def codec_overlap():
        r.update(codec_overlap_figures(s, steps))

    if "ours_step_s" in r:
        _guarded(r, "quantizer", quantizer, log)
        _guarded(r, "codec", codec_, log)
        _guarded(r, "codec_overlap", codec_overlap, log)
        if "quantizer_share_of_step" in r and "codec_share_of_step" in r:
            r["quantizer_and_codec_share_of_step"] = r["quantizer_share_of_step"] + r["codec_share_of_step"]

    if memory:
        def mem(framework: str, key: str):
            m = measure_memory(framework, name)
            r[f"{key}_peak_rss_growth_bytes"] = float(m["rss_growth_bytes"])
            r[f"{key}_peak_rss_bytes"] = float(m["peak_rss_bytes"])
            if m["device_peak_bytes"] is not None:
                r[f"{key}_device_peak_bytes"] = float(m["device_peak_bytes"])
            # The headline figure: the device allocator's peak on GPU, the RSS growth on CPU.
            r[f"{key}_peak_mem_bytes"] = float(m["device_peak_bytes"] if m["device_peak_bytes"] is not None
                                               else m["rss_growth_bytes"])

        def xla():
            b = xla_step_bytes(s)
            r["ours_xla_step_bytes"] = float(b["total"])
            r.update({f"ours_xla_{k}_bytes": float(v) for k, v in b.items() if k != "total"})

        r["peak_mem_kind"] = "device allocator peak" if on_gpu() else "RSS growth over imports + model build"
        if mem_workers:
            _guarded(r, "ours_mem", lambda: mem("ours", "ours"), log)
            _guarded(r, "torch_eager_mem", lambda: mem("torch", "torch_eager"), log)
        else:
            r["ours_mem_error"] = r["torch_eager_mem_error"] = "skipped (--no-mem-workers)"
        _guarded(r, "ours_xla_mem", xla, log)

    if gen:
        def generation():
            r.update(time_generation(s, (1, 8), gen_runs))

        _guarded(r, "gen", generation, log)
    else:
        r["gen_error"] = "skipped (--no-gen)"
    try:
        import torch

        r["torch_threads"], r["torch_device"] = torch.get_num_threads(), torch_device()
    except ImportError:
        pass  # the torch measurements above already recorded the failure
    return r


TABLE_ROWS = [
    ("batch_size", "batch (paper: real bucketed lengths)"),
    ("text_len", "input ids per sample (the batch's bucket)"),
    ("merged_len", "merged sequence (image tokens spliced in)"),
    ("attention", "our attention kernel (paper: model.attention resolved)"),
    ("ours_xla_flags", "XLA options added in our worker (--paper-xla-flags)"),
    ("ours_step_s", "our split train step (s, median)"),
    ("ours_pipelined_step_s", "our split step as train.py runs it: no wait between steps (s, mean)"),
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
    ("ours_step_s_iqr", "our split step, interquartile range (s)"),
    ("torch_eager_step_s_iqr", "PyTorch eager step, interquartile range (s)"),
    ("ours_peak_mem_bytes", "our peak memory (bytes; see peak_mem_kind)"),
    ("torch_eager_peak_mem_bytes", "PyTorch eager peak memory (bytes)"),
    ("ours_xla_step_bytes", "XLA's fused-step memory: args + outputs + temps - aliased (bytes)"),
    ("ours_peak_rss_bytes", "our peak RSS, whole worker process, compile included (bytes)"),
    ("torch_eager_peak_rss_bytes", "PyTorch eager peak RSS, whole worker process (bytes)"),
    ("ours_compile_s", "our compile: first step - a steady step (s)"),
    ("ours_client_begin_s", "part 1, client begin: batch to device, tower, connector, quantizer (s, each part waited for)"),
    ("ours_exchange_s", "part 2, exchange: the server half, LLM forward and backward (s)"),
    ("ours_client_finish_s", "part 3, client finish: connector backward, optimizer (s)"),
    ("mfu_client_begin", "MFU of part 1 (analytic FLOPs of the part / its time / bf16 peak)"),
    ("mfu_exchange", "MFU of part 2"),
    ("mfu_client_finish", "MFU of part 3"),
    ("loader_examples_per_s_per_core", "input pipeline examples per CPU-second"),
    ("loader_examples_per_s", "input pipeline examples/s (wall)"),
    ("quantizer_share_of_step", "both quantizers fwd+bwd / our split step"),
    ("codec_share_of_step", "ANS encode+decode of the step's codes (host) / our split step"),
    ("codec_packed_share_of_step", "packed encode+decode / our split step"),
    ("codec_sync_added_share", "bytes measured in the step: step time / unmeasured - 1"),
    ("codec_overlap_added_share", "bytes measured in background workers: step time / unmeasured - 1"),
    ("codec_pool", "the background workers: threads or processes (split.codec_pool)"),
    ("codec_every_n_added_share", "bytes measured every n-th step in background: step time / unmeasured - 1"),
    ("codec_every_n", "n of the row above (--paper-measure-every, split.measure_every)"),
    ("codec_busy_s", "host codec seconds per measured step"),
    ("codec_exposed_s", "of which the step loop waited for (s)"),
    ("codec_hidden_s", "of which overlapped with device work (s)"),
    ("codec_bits_per_index", "ANS bits per index (headers included)"),
    ("entropy_bits_per_index", "empirical entropy, bits per index"),
    ("codec_overhead_vs_entropy", "ANS bits / entropy - 1"),
    ("ours_bf16_step_s", "our split step, bf16 compute (s, median)"),
    ("torch_bf16_step_s", "PyTorch eager, bf16 autocast (s, median)"),
    ("mfu", "our bf16 step, MFU (vs measured bf16 matmul peak)"),
    ("torch_bf16_mfu", "PyTorch bf16 step, MFU"),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3) else f"{v:.4g}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    head = (f"Machine: {report['machine']}; matmul peak (fp32, jnp, best of n = {report['matmul_n']}/2, x1, x2, "
            f"before and after the steps): {report['matmul_peak_flops']:.3e} FLOP/s")
    if "matmul_peak_bf16_flops" in report:
        head += (f"; bf16 matmul peak ({report['matmul_bf16_n']}^2): {report['matmul_peak_bf16_flops']:.3e} FLOP/s. "
                 "fp32 rows: TF32 allowed for fp32 matmuls in both frameworks")
    if report.get("xla_flags"):
        head += f"; XLA_FLAGS: `{report['xla_flags']}`"
    lines = [head, "",
             "| metric | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for key, label in TABLE_ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(sizes[n].get(key, "n/a")) for n in sizes) + " |")
    for n, r in sizes.items():
        for key in sorted(k for k in r if k.endswith("_error")):
            lines.append(f"\n{n}: {key[:-len('_error')]} not measured: {r[key]}")
    return "\n".join(lines) + "\n"


def _size_set(value: str | None, sizes: list[str]) -> set[str]:
    """``--flag`` alone means every size; ``--flag=mid,demo`` those sizes only."""
    if value is None:
        return set()
    return set(sizes) if value == "all" else {v.strip() for v in value.split(",") if v.strip()}


def run(sizes: list[str], out: str, steps: int = 10, torch_compile: bool = True, gen_runs: int = 3,
        matmul_n: int = 2048, log: Callable[[str], None] = print, steps_per_size: dict[str, int] | None = None,
        no_torch_compile: set[str] = frozenset(), no_gen: set[str] = frozenset(), no_mem: set[str] = frozenset(),
        matmul_bf16_n: int = 8192, mem_workers: bool = True, paper_batches: dict[int, int] | None = None,
        paper_dtype: str | None = None, paper_preset: str = "paper_random",
        paper_attention: str = "auto", paper_stages: tuple[int, ...] = (1, 2),
        paper_codec_threads: int | None = None, paper_measure_every: int | None = None,
        paper_codec_pool: str | None = None, paper_trace: bool = False) -> dict[str, Any]:
    """Runs the benchmark for ``sizes`` (keys of :data:`SIZES`, or ``paper``), writes ``out/perf.{json,md}``,
    returns the JSON.

    ``steps_per_size`` overrides ``steps`` for some sizes; ``no_*`` name sizes that skip torch.compile,
    generation or the memory workers. ``paper`` (:mod:`bench.paper`) reports one entry per stage
    (``paper_stage1``, ``paper_stage2``) at ``paper_batches`` (default: batch 4 on a CPU, the paper's 64 / 16 on
    an accelerator) in ``paper_dtype`` (default float32 on a CPU, bfloat16 on an accelerator) with our attention
    kernel ``paper_attention`` (``model.attention``), for the stages in ``paper_stages``; ``paper_preset`` ``tiny`` runs the same code at test size. The JSON is
    written even when a measurement failed (its ``*_error`` key says why) or the run is interrupted part way
    (the sizes finished so far).
    """
    unknown = [n for n in sizes if n not in SIZES and n != "paper"]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}: choose from {sorted(SIZES) + ['paper']}")
    steps_per_size = steps_per_size or {}
    if min([steps, *steps_per_size.values()]) < 1:
        raise ValueError(f"steps must be >= 1, got {steps} (per size: {steps_per_size})")
    gpu = on_gpu()
    try:
        import torch

        if gpu:
            # fp32 matmuls may use TF32 in both frameworks (JAX's default precision on GPU already does).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch_text = f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch_device()})"
    except ImportError as e:  # ours is still measured; every torch figure records its own error
        torch_text = f"torch not importable ({_error(e)})"
    log(f"matmul peak (fp32, n = {matmul_n} / 2, x 1, x 2; before the steps)")
    before = matmul_peak_best(matmul_n)
    peak = max(before.values())
    report: dict[str, Any] = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}"
                f" ({jax.devices()[0].device_kind}), {torch_text}",
        matmul_n=matmul_n, matmul_peak_flops=peak, matmul_peak_before_flops={str(k): v for k, v in before.items()},
        xla_flags=os.environ.get("XLA_FLAGS", ""), sizes={})
    peak_bf16 = None
    if gpu:
        log(f"matmul peak ({matmul_bf16_n}^2 bf16)")
        try:
            peak_bf16 = matmul_peak(matmul_bf16_n, runs=10, dtype=jnp.bfloat16)
            report.update(matmul_bf16_n=matmul_bf16_n, matmul_peak_bf16_flops=peak_bf16)
        except Exception as e:  # noqa: BLE001 -- recorded; the fp32 figures still run
            report["matmul_peak_bf16_error"] = _error(e)
    os.makedirs(out, exist_ok=True)

    def write() -> None:
        with open(os.path.join(out, "perf.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "perf.md"), "w") as f:
            f.write(markdown(report))

    try:
        for name in sizes:
            if name == "paper":
                import functools

                from bench import paper

                batches = paper_batches or paper.default_batches()
                dtype = paper_dtype or ("float32" if not gpu else "bfloat16")
                for stage in paper_stages:
                    r = report["sizes"][f"paper_stage{stage}"] = {}
                    paper.bench_stage(stage, batches[stage], steps_per_size.get(name, steps), dtype, out, peak, r, log,
                                      functools.partial(_guarded_base, checkpoint=write), preset=paper_preset,
                                      attention=paper_attention, codec_threads=paper_codec_threads,
                                      measure_every=paper_measure_every, codec_pool=paper_codec_pool,
                                      trace=paper_trace)
                    if peak_bf16 and dtype == "bfloat16":  # bf16 compute: MFU against the bf16 matmul peak
                        for key, step in (("mfu", "ours_step_s"), ("torch_bf16_mfu", "torch_eager_step_s")):
                            if step in r and "train_step_flops" in r:
                                r[key] = r["train_step_flops"] / r[step] / peak_bf16
                        for part in paper.PARTS:
                            if f"ours_{part}_flops_per_s" in r:
                                r[f"mfu_{part}"] = r[f"ours_{part}_flops_per_s"] / peak_bf16
                    write()
                continue
            report["sizes"][name] = {}
            bench_size(name, SIZES[name], steps_per_size.get(name, steps),
                       torch_compile and name not in no_torch_compile, gen_runs, peak, log,
                       gen=name not in no_gen, memory=name not in no_mem, peak_bf16=peak_bf16, mem_workers=mem_workers,
                       r=report["sizes"][name], checkpoint=write)
        log("matmul peak (after the steps)")
        after = matmul_peak_best(matmul_n)
        report["matmul_peak_after_flops"] = {str(k): v for k, v in after.items()}
        report["matmul_peak_flops"] = peak = max(peak, *after.values())
        for r in report["sizes"].values():  # the fractions against the best peak of the run
            if "ours_step_flops_per_s" in r:
                r["fraction_of_matmul_peak"] = r["ours_step_flops_per_s"] / peak
            if "torch_eager_step_s" in r and "train_step_flops" in r:
                r["torch_eager_fraction_of_matmul_peak"] = r["train_step_flops"] / r["torch_eager_step_s"] / peak
    finally:
        write()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="demo", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--out", default="bench_out", help="directory for perf.json and perf.md")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed train steps (after 2 warm-up steps for ours, 3 for torch)")
    parser.add_argument("--steps-mid", type=int, default=3, help="timed train steps for the mid size (slow on CPU)")
    parser.add_argument("--gen-runs", type=int, default=5, help="timed generation calls per batch size")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--matmul-bf16-n", type=int, default=8192, help="GPU only: the bf16 peak for MFU")
    parser.add_argument("--no-torch-compile", nargs="?", const="all", default=None,
                        help="skip torch.compile (its compile is slow): every size, or '=mid,demo'")
    parser.add_argument("--no-gen", nargs="?", const="all", default=None, help="skip generation: every size, or '=mid'")
    parser.add_argument("--no-mem", nargs="?", const="all", default=None,
                        help="skip the peak-memory subprocesses: every size, or '=mid'")
    parser.add_argument("--no-mem-workers", action="store_true",
                        help="keep XLA's memory figure but skip the two peak-memory subprocesses")
    parser.add_argument("--steps-paper", type=int, default=2,
                        help="timed train steps per stage for the paper size (~30-90 s each on a 2-core CPU)")
    parser.add_argument("--paper-batches", default=None,
                        help="paper size: global batch of stage 1,2 (default 4,4 on a CPU; 64,16 on an accelerator)")
    parser.add_argument("--paper-dtype", default=None, choices=("float32", "bfloat16"),
                        help="paper size: compute dtype (default float32 on a CPU, bfloat16 on an accelerator)")
    parser.add_argument("--paper-preset", default="paper_random", choices=("paper_random", "tiny"),
                        help="paper size: the configs' preset (tiny: the same code path at test size)")
    parser.add_argument("--paper-codec-threads", type=int, default=None,
                        help="paper size: host threads of the overlapped codec (default: the config's split.codec_threads)")
    parser.add_argument("--paper-codec-pool", default=None, choices=("auto", "threads", "processes"),
                        help="paper size: whether the overlapped codec's workers are threads or processes (default: "
                             "the config's split.codec_pool, auto: processes on an accelerator)")
    parser.add_argument("--paper-trace", action="store_true",
                        help="paper size: also profile our steps (jax.profiler) and summarise where the device time went "
                             "(trace_stage{n}/ and trace_stage{n}_summary.{json,md} in --out; bench/profile_summary.py)")
    parser.add_argument("--paper-measure-every", type=int, default=None,
                        help="paper size: also time the overlapped codec measuring every n-th step, as training with "
                             "split.measure_every=n pays it (default: the config's split.measure_every; 1 adds nothing)")
    parser.add_argument("--paper-stages", default="1,2", choices=("1,2", "1", "2"),
                        help="paper size: the stages to measure (one alone fits a short accelerator call)")
    parser.add_argument("--paper-xla-flags", default="",
                        help="paper size: XLA options added to XLA_FLAGS in our worker process only (recorded as "
                             "ours_xla_flags), e.g. --paper-xla-flags=--xla_gpu_enable_command_buffer= on a GPU")
    parser.add_argument("--paper-attention", default="auto", choices=("auto", "custom", "xla", "cudnn"),
                        help="paper size: our attention kernel (model.attention; auto: cuDNN on a GPU in bf16, "
                             "the hand-written VJP on a CPU)")
    parser.add_argument("--_worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--_paper_worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--_paper_stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_paper_batch_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # the XLA options train.py uses (qtl_jax/xla_flags.py), before any computation
    # `timeout` sends SIGTERM: turn it into an exception so run()'s finally still writes the JSON.
    import signal

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        sizes = [n.strip() for n in args.sizes.split(",") if n.strip()]
        if args._paper_worker:  # internal: one framework's paper-size step in a fresh process (bench.paper)
            from bench import paper

            r = paper.WORKERS[args._paper_worker](args._paper_stage, args._paper_batch_file, args.steps,
                                                  args.paper_dtype or "float32", args.paper_preset,
                                                  **({"attention": args.paper_attention,
                                                      "codec_threads": args.paper_codec_threads,
                                                      "codec_pool": args.paper_codec_pool,
                                                      "trace": args.paper_trace,
                                                      "measure_every": args.paper_measure_every}
                                                     if args._paper_worker == "ours" else {}))
            print(json.dumps(r), flush=True)
            return
        paper_batches = None
        if args.paper_batches:
            try:
                values = [int(v) for v in args.paper_batches.split(",")]
            except ValueError:
                values = []
            if len(values) != 2 or min(values) < 1:
                parser.error(f"--paper-batches={args.paper_batches!r}: give two positive batches, stage 1 and 2 (e.g. 64,16)")
            paper_batches = {1: values[0], 2: values[1]}
        if args._worker:  # internal: one framework's peak memory in a fresh process (see measure_memory)
            print(json.dumps(memory_worker(args._worker, sizes[0])), flush=True)
            return
        if args.paper_xla_flags.strip():
            from bench import paper

            os.environ[paper.OURS_XLA_FLAGS_ENV] = args.paper_xla_flags.strip()
        report = run(sizes, args.out, args.steps, True, args.gen_runs, args.matmul_n,
                     steps_per_size={"mid": args.steps_mid, "paper": args.steps_paper},
                     no_torch_compile=_size_set(args.no_torch_compile, sizes),
                     no_gen=_size_set(args.no_gen, sizes), no_mem=_size_set(args.no_mem, sizes),
                     matmul_bf16_n=args.matmul_bf16_n, mem_workers=not args.no_mem_workers,
                     paper_batches=paper_batches, paper_dtype=args.paper_dtype, paper_preset=args.paper_preset,
                     paper_attention=args.paper_attention,
                     paper_stages=tuple(int(v) for v in args.paper_stages.split(",")),
                     paper_codec_threads=args.paper_codec_threads, paper_measure_every=args.paper_measure_every,
                     paper_codec_pool=args.paper_codec_pool, paper_trace=args.paper_trace)
        print(markdown(report))
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may be called in-process (the test)


if __name__ == "__main__":
    main()
