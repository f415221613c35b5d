"""The paper's configuration in bench.perf (``--sizes=paper``): our split step vs a PyTorch eager reference.

Per stage (``configs/stage1.py:paper_random``, ``configs/stage2.py:paper_random``: SigLIP-so400m-patch14-384,
MLP connector, OpenELM-270M, random weights, each stage's frozen/trainable split):

* **One real batch.** The built-in shapes corpus rendered at 384 px, read by the training input pipeline
  (``qtl_jax.train.loop.make_loader``) and padded to its longest sample rounded up to a length bucket
  (``qtl_jax.data.sequence.pad_to_bucket``), exactly what ``train.py`` feeds its first step; both frameworks
  train on that batch. Reading it also gives the loader's examples/s per core (examples / process CPU seconds).
* **Ours** in a fresh process (``--_paper_worker=ours``): the model from the config through
  ``qtl_jax.models.builder`` (``train.setup.build_setup``), the state and optimizers as ``train.py`` makes them,
  the split step with the in-process server half. ``compile_s`` is the first call minus a steady step; timed
  steps without byte measurement (``ours_step_s``), then (at least 2) steps measuring every step's bytes with
  the ANS codec on background threads (``codec_busy_s`` / ``codec_exposed_s`` / ``codec_hidden_s``, as
  :func:`bench.perf.codec_overlap_phases` measures them). Peak RSS of the process (compile included).
* **PyTorch eager** in a fresh process (``--_paper_worker=torch``): ``transformers`` ``SiglipVisionModel``
  (random init from its config; the 26 layers feature layer -2 reads, under ``torch.no_grad`` since it is
  frozen, feature select ``patch``), the ``mlp2x_gelu`` connector, the paper's quantizer per modality
  (:func:`bench.perf.torch_quantizer`, the text one's batch statistics over the official text rows) and
  :class:`bench.torch_openelm.OpenELM`; merged by the same layout as ours (the Factory's per-sample splice,
  padded to the longest merged sample), full-logits cross-entropy, ``torch.optim.AdamW`` over the parameters
  that train (frozen ones have ``requires_grad=False``). Peak RSS of the process.

The workers run one after the other, so their peaks are their own; ``docs/performance.md`` has the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

STAGES = (1, 2)
# The paper's global batches on an accelerator (method.md §5.1); batch 4 on this CPU.
GPU_BATCHES = {1: 64, 2: 16}
CPU_BATCH = 4
BATCH_FILE = "paper_stage{stage}_batch.npz"


def stage_config(stage: int, batch: int, dtype: str = "float32", data_dir: str | None = None,
                 preset: str = "paper_random", attention: str = "auto"):
    """``configs/stage{stage}.py:<preset>`` at global batch ``batch`` in compute ``dtype`` (``tiny``: the same
    code path at test size) with attention kernel ``attention`` (``model.attention``)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage}: use 1 or 2")
    from configs import stage1, stage2

    c = (stage1 if stage == 1 else stage2).get_config(preset)
    if preset != "paper_random":  # the paper's frozen/trainable split whatever the preset
        from configs import common

        c.optimizer.param_groups = common.STAGE1_GROUPS if stage == 1 else common.STAGE2_GROUPS
        c.init.from_workdir = None
    c.global_batch_size = int(batch)
    c.model.dtype = dtype
    c.model.attention = attention
    # Enough examples for one batch of either stream, whatever the batch.
    c.data.shapes.n_pretrain = c.data.shapes.n_instruct = max(int(c.data.shapes.n_pretrain), int(batch))
    c.data.data_dir = data_dir
    return c


def vision_layers_used(model) -> int:
    """Encoder layers the features need: feature layer -2 of 27 is the output of layer 26."""
    n = model.vision.num_hidden_layers
    layer = model.vision_feature_layer
    return layer if layer >= 0 else n + 1 + layer


def real_batch(stage: int, batch: int, dtype: str, workdir: str, loader_batches: int = 8,
               preset: str = "paper_random") -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The first batch ``train.py`` would train on (bucketed) plus the layout the torch reference merges with,
    and the loader's throughput over ``loader_batches`` more batches."""
    from qtl_jax.data import sequence
    from qtl_jax.models.quantized import paper_text_rows
    from qtl_jax.models.tinyllava import compute_layout
    from qtl_jax.train import loop
    from qtl_jax.train.setup import build_setup, seed_keys

    config = stage_config(stage, batch, dtype, data_dir=os.path.join(workdir, "data"), preset=preset)
    # Enough records for the throughput batches too.
    config.data.shapes.n_pretrain = config.data.shapes.n_instruct = max(64, (loader_batches + 1) * batch)
    setup = build_setup(config, workdir, seed_keys(config)[1])
    loader = loop.make_loader(setup, config, setup.dataset_dir, config.data.split, config.data.template,
                              global_batch_size=batch, shuffle=True, num_epochs=None, seed=int(config.seed))
    buckets = tuple(config.data.length_buckets)
    b = sequence.pad_to_bucket(next(loader), buckets)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(loader_batches):
        next(loader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = loader_batches * batch
    stats = dict(loader_examples_per_s=n / wall, loader_examples_per_cpu_s=n / cpu,
                 loader_image_size=float(setup.model.model.vision.image_size))
    model = setup.model.model
    layout = compute_layout(model, b["input_ids"], b["attention_mask"], b["labels"], num_images=batch,
                            images_by_sample=True)
    placeholder = (b["input_ids"] == model.image_token_index) & (b["attention_mask"] > 0)
    text_real = (b["attention_mask"] > 0) & ~placeholder
    out = dict(b, text_real=text_real, text_rows=np.asarray(paper_text_rows(text_real)),
               source=np.asarray(layout.source), merged_mask=np.asarray(layout.attention_mask),
               positions=np.asarray(layout.position_ids), merged_labels=np.asarray(layout.labels))
    return out, stats


def flops(model, batch: dict[str, np.ndarray], stage: int) -> float:
    """Analytic FLOPs of one train step at this batch: 2 per weight and token forward, the backward 2 more
    for the input gradient (where something upstream trains) and 2 more for the weight gradient (where it
    trains); attention scores and values 4·T²·width per layer forward."""
    return float(sum(flops_parts(model, batch, stage).values()))


PARTS = ("client_begin", "exchange", "client_finish")


def flops_parts(model, batch: dict[str, np.ndarray], stage: int) -> dict[str, float]:
    """:func:`flops` by the split step's parts (``SplitStep.time_programs``): ``client_begin`` (the tower, the
    connector and the client's quantizer projections forward), ``exchange`` (the server: the quantizer's
    output projection and the LLM, forward and backward) and ``client_finish`` (the connector's and client
    projections' backward)."""
    b, t = batch["input_ids"].shape
    merged = batch["source"].shape[1]
    v, llm = model.vision, model.llm
    p = (v.image_size // v.patch_size) ** 2
    d, dl = v.hidden_size, llm.hidden_size
    layers = vision_layers_used(model)
    vision = 2 * b * p * (layers * (4 * d * d + 2 * d * v.intermediate_size) + 3 * v.patch_size**2 * d)
    vision += 4 * b * layers * p * p * d
    t_img = model.num_image_tokens
    connector = 2 * b * t_img * (d * dl + dl * dl)
    quant = 2 * b * (t_img + t) * 2 * dl * dl
    hd = llm.head_dim
    dec = sum(dl * hd * (2 * h + 2 * k) + 3 * dl * w for h, k, w in  # q, o; k, v; gate, up, down
              zip(llm.num_heads, llm.num_kv_heads, llm.intermediate_size))
    decoder = 2 * b * merged * (dec + dl * llm.vocab_size)
    decoder += 4 * b * merged * merged * sum(h * hd for h in llm.num_heads)
    llm_factor = 2 if stage == 1 else 3  # stage 1: input gradient only (frozen); stage 2: weights too
    # The quantizers' projections: half on the client (in_proj), half on the server (out_proj).
    return {"client_begin": float(vision + connector + quant / 2),
            "exchange": float(3 * quant / 2 + llm_factor * decoder),
            "client_finish": float(2 * (connector + quant / 2))}


# ----------------------------------------------------------------------------------------------------
# Workers (each in a fresh process: the peak RSS is the step's own)


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def ours_worker(stage: int, batch_file: str, steps: int, dtype: str, preset: str = "paper_random",
                attention: str = "auto", codec_threads: int | None = None,
                measure_every: int | None = None, codec_pool: str | None = None,
                trace: bool = False) -> dict[str, Any]:
    """Our split step on the saved batch: compile, step time, codec hidden/exposed, the parts' times, peak RSS.

    ``trace``: last, ``steps`` more steps under ``jax.profiler.trace`` into ``trace_stage{n}/`` beside the
    batch file, summarised by :mod:`bench.profile_summary` into ``trace_stage{n}_summary.{json,md}``.

    The codec is timed measuring every step and, when ``measure_every`` (default: the config's
    ``split.measure_every``) is above 1, also measuring every n-th step over 2n steps against the same number
    unmeasured (``codec_every_n_*``): the share training with that setting pays."""
    from bench import perf
    from qtl_jax.models.quantized import BATCH_KEYS
    from qtl_jax.split import link as linklib
    from qtl_jax.split import step as steplib
    from qtl_jax.split.mesh import split_meshes
    from qtl_jax.split.meter import resolve_pool
    from qtl_jax.train.setup import build_setup, create_state, seed_keys

    data = _load(batch_file)
    batch = {k: data[k] for k in BATCH_KEYS}
    config = stage_config(stage, len(batch["input_ids"]), dtype, preset=preset, attention=attention)
    with perf._RssSampler(interval=0.01) as sampler:
        build = time.perf_counter()
        setup = build_setup(config, "/nonexistent-unused", seed_keys(config)[1], data=False)
        meshes = split_meshes(0, 0, devices=jax.devices()[:1])
        state = create_state(config, setup, meshes, total_steps=1000)
        optimizers = steplib.make_split_optimizers(config.optimizer.to_dict(), 1000,
                                                   {"client": state.client.params, "server": state.server.params})
        server = linklib.InProcessServerHalf(meshes, steplib.server_update_fn(setup.model, optimizers),
                                             codec_method=config.split.codec_method, measure=True, codec_threads=0)
        step = steplib.make_train_step(setup.model, meshes, optimizers, mode="split", server=server)
        # On the devices once, as the PyTorch reference moves its batch once: both time the step, not the copy.
        batch = steplib.device_batch(batch, meshes.client)
        jax.block_until_ready((state, batch))
        build = time.perf_counter() - build
        base = perf._rss_bytes()
        server.measure = False
        first = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        first = time.perf_counter() - first
        off = perf.codec_overlap_phases(step, state, batch, steps, ("off",))
        # At least 2 steps: the last step's coding has no next step to overlap with.
        # The host codec's threads as train.py runs them (split.codec_threads) unless the bench sets them.
        threads = int(config.split.codec_threads) if codec_threads is None else int(codec_threads)
        pool = resolve_pool(str(config.split.codec_pool) if codec_pool is None else codec_pool, jax.default_backend())
        overlap = perf.codec_overlap_phases(step, off["state"], batch, max(steps, 2), ("overlap",), threads=threads,
                                            pool=pool)
        every = int(config.split.measure_every) if measure_every is None else int(measure_every)
        amortised = None
        if every > 1:
            amortised = perf.codec_overlap_phases(step, overlap["state"], batch, max(steps, 2 * every),
                                                  ("off", "overlap"), threads=threads, measure_every=every, pool=pool)
        # Where the step's time goes: each part waited for before the next starts (bytes not measured).
        state = (amortised or overlap)["state"]
        server.measure, step.time_programs = False, True
        parts: dict[str, list[float]] = {p: [] for p in PARTS}
        for _ in range(steps):
            state, m = step(state, batch)
            for p in PARTS:
                parts[p].append(m[f"time_{p}_s"])
        step.time_programs = False
        # As train.py runs: no wait between steps, each step's metrics read after the next is queued, so the
        # host's dispatch of step k+1 overlaps step k's device work (the figures above wait after each step,
        # as the PyTorch reference does).
        step.defer_metrics, held = True, None
        pipelined = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
            if held is not None:
                steplib.host_metrics(held)
            held = m
        steplib.host_metrics(held)
        jax.block_until_ready(state)
        pipelined = (time.perf_counter() - pipelined) / steps
        step.defer_metrics = False
        if trace:
            from bench import profile_summary

            where = os.path.join(os.path.dirname(os.path.abspath(batch_file)), f"trace_stage{stage}")
            with jax.profiler.trace(where):
                for _ in range(steps):
                    state, m = step(state, batch)
                    jax.block_until_ready(state)
            prefix = where + "_summary"
            profile_summary.write(where, prefix)
    r = {**off["figures"], **overlap["figures"]}
    if trace:
        r["trace_summary"] = prefix + ".md"
    r.update({f"ours_{p}_s": float(np.median(t)) for p, t in parts.items()})
    r["ours_pipelined_step_s"] = pipelined
    r["codec_overlap_added_share"] = r["codec_overlap_step_s"] / r["codec_off_step_s"] - 1.0
    if amortised is not None:
        a = amortised["figures"]
        r.update(codec_every_n=float(every), codec_every_n_added_share=a["codec_overlap_added_share"],
                 codec_every_n_off_step_s=a["codec_off_step_s"], codec_every_n_step_s=a["codec_overlap_step_s"],
                 codec_every_n_exposed_s=a["codec_exposed_s"], codec_every_n_measured_steps=a["codec_measured_steps"])
    times = off["times"]["off"]
    r.update(ours_step_s=float(np.median(times)), ours_step_times=times, ours_first_step_s=first,
             ours_build_s=build, ours_peak_rss_bytes=float(max(sampler.peak, perf._maxrss_bytes())),
             ours_rss_after_build_bytes=float(base), ours_loss=float(metrics["loss"]),
             clip_rate_text=float(metrics.get("clip_rate_text", np.nan)),
             clip_rate_image=float(metrics.get("clip_rate_image", np.nan)))
    r["ours_compile_s"] = first - r["ours_step_s"]
    if perf.on_gpu():
        r["ours_device_peak_bytes"] = float(jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0))
    if not np.isfinite(r["ours_loss"]):
        raise FloatingPointError(f"our stage-{stage} step gave a non-finite loss {r['ours_loss']}")
    return r


def torch_model(model, stage: int):
    """The reference modules at ``model``'s (our TinyLlavaConfig) shapes; stage's frozen parts frozen."""
    import torch
    import transformers as T
    from torch import nn

    from bench import perf
    from bench.torch_openelm import OpenELM

    v, llm = model.vision, model.llm
    dl = llm.hidden_size

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = T.SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                       image_size=v.image_size, patch_size=v.patch_size)
            self.vision = T.SiglipVisionModel(cfg)
            self.connector = nn.Sequential(nn.Linear(v.hidden_size, dl), nn.GELU(), nn.Linear(dl, dl))
            self.image_q = perf.torch_quantizer(dl, 4)
            self.text_q = perf.torch_quantizer(dl, 4)
            self.llm = OpenELM(llm.vocab_size, dl, llm.head_dim, llm.num_heads, llm.num_kv_heads,
                               llm.intermediate_size, eps=llm.norm_eps, rope_theta=llm.rope_theta)
            self.layers_used = vision_layers_used(model)

        def features(self, pixels):
            vm = getattr(self.vision, "vision_model", self.vision)  # transformers 5 flattened the wrapper
            h = vm.embeddings(pixels)
            for layer in vm.encoder.layers[: self.layers_used]:
                h = layer(h, None)
                h = h[0] if isinstance(h, tuple) else h
            return h[:, 1:]  # feature select 'patch'

        def forward(self, pixels, ids, text_real, text_rows, source, merged_mask, positions, labels):
            with torch.no_grad():  # frozen tower: the official code keeps no activations for it either
                feats = self.features(pixels)
            image, dist_image = self.image_q(self.connector(feats))
            text = self.llm.embed(ids.clamp(min=0)) * text_real[..., None]
            text, dist_text = self.text_q(text, text_rows)
            d = text.shape[-1]
            table = torch.cat([text.reshape(-1, d), image.reshape(-1, d), text.new_zeros(1, d)])
            logits = self.llm.logits(self.llm(table[source], merged_mask, positions))
            ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
            return ce + dist_image + dist_text

    ref = Reference()
    frozen = [ref.vision] if stage == 2 else [ref.vision, ref.llm]
    for module in frozen:
        module.requires_grad_(False)
    return ref


def torch_worker(stage: int, batch_file: str, steps: int, dtype: str, preset: str = "paper_random") -> dict[str, Any]:
    """The eager reference on the saved batch: step time and peak RSS (GPU: device peak)."""
    import torch

    from bench import perf

    data = _load(batch_file)
    batch_size = len(data["input_ids"])
    tcfg = tinyllava_of(stage_config(stage, batch_size, dtype, preset=preset))
    device = perf.torch_device()
    bf16 = dtype == "bfloat16"
    with perf._RssSampler(interval=0.01) as sampler:
        build = time.perf_counter()
        torch.manual_seed(0)
        ref = torch_model(tcfg, stage).train().to(device)
        trainable = [p for p in ref.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        pixels = torch.from_numpy(data["pixel_values"].transpose(0, 3, 1, 2).copy())
        args = [pixels, torch.from_numpy(data["input_ids"]).long(), torch.from_numpy(data["text_real"]).float(),
                torch.from_numpy(data["text_rows"]), torch.from_numpy(data["source"]).long(),
                torch.from_numpy(data["merged_mask"]), torch.from_numpy(data["positions"]).long(),
                torch.from_numpy(data["merged_labels"]).long()]
        args = [a.to(device) for a in args]
        build = time.perf_counter() - build
        base = perf._rss_bytes()

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                loss = ref(*args)
            loss.backward()
            opt.step()
            return loss

        first = time.perf_counter()
        step()
        perf._sync_torch()
        first = time.perf_counter() - first
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            perf._sync_torch()
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the torch reference gave a non-finite loss {float(loss)}")
    r = dict(torch_eager_step_s=float(np.median(times)), torch_eager_step_times=times, torch_eager_first_step_s=first,
             torch_eager_build_s=build, torch_eager_peak_rss_bytes=float(max(sampler.peak, perf._maxrss_bytes())),
             torch_eager_rss_after_build_bytes=float(base), torch_eager_loss=float(loss),
             torch_params=float(sum(p.numel() for p in ref.parameters())),
             torch_trainable_params=float(sum(p.numel() for p in trainable)), torch_threads=torch.get_num_threads())
    if device == "cuda":
        r["torch_eager_device_peak_bytes"] = float(torch.cuda.max_memory_allocated())
    return r


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {"ours": ours_worker, "torch": torch_worker}


def tinyllava_of(config):
    """The TinyLLaVA architecture a stage config builds (its tokenizer's size for a vocabulary left at 0)."""
    from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
    from qtl_jax.models import builder

    m = config.model.to_dict()
    vocab = None if m["llm"].get("vocab_size") else len(shapes_tokenizer.build_shapes_tokenizer(model_max_length=m["max_length"]))
    return builder.tinyllava_config(m, vocab)


# XLA options for our worker alone (bench.perf --paper-xla-flags sets it), added to XLA_FLAGS there.
OURS_XLA_FLAGS_ENV = "QTL_BENCH_OURS_XLA_FLAGS"


def run_worker(framework: str, stage: int, batch_file: str, steps: int, dtype: str, timeout_s: float,
               preset: str = "paper_random", attention: str = "auto",
               codec_threads: int | None = None, measure_every: int | None = None,
               codec_pool: str | None = None, trace: bool = False) -> dict[str, Any]:
    """:data:`WORKERS` [framework] in a fresh ``python -m bench.perf`` process; its JSON line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench.perf", f"--_paper_worker={framework}", f"--_paper_stage={stage}",
           f"--_paper_batch_file={batch_file}", f"--steps={steps}", f"--paper-dtype={dtype}",
           f"--paper-preset={preset}", f"--paper-attention={attention}"]
    if framework == "ours" and codec_threads is not None:
        cmd.append(f"--paper-codec-threads={codec_threads}")
    if framework == "ours" and measure_every is not None:
        cmd.append(f"--paper-measure-every={measure_every}")
    if framework == "ours" and codec_pool is not None:
        cmd.append(f"--paper-codec-pool={codec_pool}")
    if framework == "ours" and trace:
        cmd.append("--paper-trace")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    extra_flags = os.environ.get(OURS_XLA_FLAGS_ENV, "").strip() if framework == "ours" else ""
    if extra_flags:  # XLA reads its flags once per process: an A/B of XLA options needs a worker each
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", "").strip(), extra_flags) if f)
    if framework == "torch":
        from bench import perf

        env.update(QTL_BENCH_TORCH_DEVICE=perf.torch_device(), JAX_PLATFORMS="cpu")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-3:]
        raise RuntimeError(f"paper {framework} worker (stage {stage}) exited {proc.returncode}: {' | '.join(tail)}")
    # The machine's 1-minute load average before and after: on a shared machine it says how fair a run was.
    key = "ours" if framework == "ours" else "torch_eager"
    result = {**json.loads(lines[-1]), f"{key}_load_avg_1m": [load, os.getloadavg()[0]]}
    if extra_flags:
        result["ours_xla_flags"] = extra_flags
    return result


def bench_stage(stage: int, batch: int, steps: int, dtype: str, out: str, peak: float, r: dict[str, Any],
                log: Callable[[str], None], guarded: Callable, timeout_s: float = 2400.0,
                preset: str = "paper_random", attention: str = "auto", codec_threads: int | None = None,
                measure_every: int | None = None, codec_pool: str | None = None, trace: bool = False) -> None:
    """Every figure of one stage into ``r`` (see the module docstring); failures are ``*_error`` keys."""
    from qtl_jax.models.attention import resolve

    r.update(size=f"paper_stage{stage}", stage=stage, batch_size=batch, dtype=dtype, timed_steps=steps, preset=preset,
             attention=resolve(attention, dtype))
    path = os.path.join(out, BATCH_FILE.format(stage=stage))

    def data():
        b, stats = real_batch(stage, batch, dtype, os.path.join(out, "paper_work"), preset=preset)
        np.savez(path, **b)
        r.update(stats)
        r["loader_examples_per_s_per_core"] = r.pop("loader_examples_per_cpu_s")
        r.update(text_len=int(b["input_ids"].shape[1]), merged_len=int(b["source"].shape[1]),
                 real_text_tokens=[int(x) for x in b["text_real"].sum(1)],
                 real_merged_tokens=[int(x) for x in b["merged_mask"].sum(1)],
                 images=int(b["has_image"].sum()))
        parts = flops_parts(tinyllava_of(stage_config(stage, batch, dtype, preset=preset)), b, stage)
        r["train_step_flops"] = float(sum(parts.values()))
        r.update({f"flops_{p}": v for p, v in parts.items()})

    def ours():
        r.update(run_worker("ours", stage, path, steps, dtype, timeout_s, preset, attention, codec_threads,
                            measure_every, codec_pool, trace))
        for p in PARTS:  # each part's analytic FLOPs over its own time (the parts timed one after the other)
            if f"ours_{p}_s" in r and f"flops_{p}" in r:
                r[f"ours_{p}_flops_per_s"] = r[f"flops_{p}"] / r[f"ours_{p}_s"]
        r["ours_examples_per_s"] = batch / r["ours_step_s"]
        r["fraction_of_matmul_peak"] = r["train_step_flops"] / r["ours_step_s"] / peak
        r["ours_step_flops_per_s"] = r["train_step_flops"] / r["ours_step_s"]

    def eager():
        r.update(run_worker("torch", stage, path, steps, dtype, timeout_s, preset))
        r["torch_eager_examples_per_s"] = batch / r["torch_eager_step_s"]
        r["torch_eager_fraction_of_matmul_peak"] = r["train_step_flops"] / r["torch_eager_step_s"] / peak

    guarded(r, "data", data, log)
    if "data_error" in r:
        return
    guarded(r, "ours", ours, log)
    guarded(r, "torch_eager", eager, log)
    if "ours_step_s" in r and "torch_eager_step_s" in r:
        r["ratio_vs_torch_eager"] = r["ours_step_s"] / r["torch_eager_step_s"]
    for key in ("ours", "torch_eager"):
        if f"{key}_peak_rss_bytes" in r:
            r[f"{key}_peak_mem_bytes"] = r.get(f"{key}_device_peak_bytes", r[f"{key}_peak_rss_bytes"])
    r["peak_mem_kind"] = "device allocator peak" if "ours_device_peak_bytes" in r else "peak RSS of the worker process"


def default_batches() -> dict[int, int]:
    """The paper's batches on an accelerator, batch 4 on a CPU."""
    return dict(GPU_BATCHES) if jax.default_backend() != "cpu" else {s: CPU_BATCH for s in STAGES}
