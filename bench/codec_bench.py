"""Wire-codec benchmark: bits per index and throughput on realistic code streams.

Streams are made by the paper's quantizer math (``qtl_jax.quantizer``): features u -> one scalar
mean/std over the tensor -> clip to ±3σ, rescale to [-1, 1] -> nearest of L levels. Two feature models:

* ``gaussian``: i.i.d. N(0, 1) features (what a freshly initialised in_proj gives);
* ``skewed``: per-channel offsets and widths (N(0, 1) offsets, log-normal widths), as after a learned
  in_proj: a single scalar scaling then leaves each channel with its own level distribution.

For each L it prints bits/index (message bytes·8 / n, headers included) for ``packed``, ``ans``
(global, channel and auto model), zstd on the uint8 indices and on the packed bytes, and the empirical
entropy H of the message; then encode/decode throughput in million indices per second.

Last, what a measured step's coding costs the training loop's thread (``--loop-images`` images of
``rows x channels`` codes at L = 4, sized as the byte meter does, ANS and packed): the codec runs in a
:class:`~qtl_jax.split.meter.ByteMeter` on threads or processes (``split.codec_pool``) while another thread
sleeps 1 ms at a time, as the loop waits on the devices, and records how late each wake-up is. A thread
can only wake once it holds the GIL, which the ANS coder keeps for the whole of each call.

Usage (from the repository root): python -m bench.codec_bench [--rows 728] [--channels 1280] [--levels 2-32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import zstandard

from qtl_jax import codec
from qtl_jax.codec_pool import CodecJob
from qtl_jax.quantizer import linear_scale, moments, round_to_levels
from qtl_jax.split.meter import ByteMeter


def code_stream(kind: str, levels: int, rows: int, channels: int, seed: int) -> np.ndarray:
    """uint8/uint16 indices [rows, channels] from the paper's ±3σ scaling and L-level rounding."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((rows, channels)).astype(np.float32)
    if kind == "skewed":
        width = np.exp(rng.normal(0.0, 0.75, channels)).astype(np.float32)
        offset = rng.normal(0.0, 1.0, channels).astype(np.float32)
        u = u * width + offset
    elif kind != "gaussian":
        raise ValueError(f"unknown stream kind {kind!r}: use 'gaussian' or 'skewed'.")
    u = jnp.asarray(u)
    mean, std = moments(u)
    z, _ = linear_scale(u, mean, std)
    _, indices = round_to_levels(z, levels)
    return np.asarray(indices)


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def loop_wakeup_delay(work, interval_s: float = 1e-3) -> dict[str, float]:
    """Runs ``work()`` on a thread while this one sleeps ``interval_s`` at a time until it ends; returns the
    work's wall time and how late this thread's wake-ups were (mean, 99th percentile, max; seconds)."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (work(), done.set()))
    late = []
    start = time.perf_counter()
    worker.start()
    while not done.is_set():
        t0 = time.perf_counter()
        time.sleep(interval_s)
        late.append(time.perf_counter() - t0 - interval_s)
    wall = time.perf_counter() - start
    worker.join()
    a = np.asarray(late)
    return {"wall_s": wall, "late_mean_s": float(a.mean()), "late_p99_s": float(np.percentile(a, 99)),
            "late_max_s": float(a.max()), "wakeups": float(a.size)}


def loop_figures(jobs: list[CodecJob], workers: list[int], repeat: int) -> list[tuple[str, dict[str, float]]]:
    """:func:`loop_wakeup_delay` while nothing runs, then while ``jobs`` are sized on each pool and worker
    count (the run with the lowest 99th percentile of ``repeat``, after one untimed warm-up)."""
    rows = [("nothing", min((loop_wakeup_delay(lambda: time.sleep(0.2)) for _ in range(repeat)),
                            key=lambda r: r["late_p99_s"]))]
    for pool in ("threads", "processes"):
        for n in workers:
            meter = ByteMeter(n, pool=pool)
            try:
                meter.wait_ready()
                meter.encoded_sizes(jobs)
                runs = [loop_wakeup_delay(lambda: meter.encoded_sizes(jobs)) for _ in range(repeat)]
            finally:
                meter.close()
            rows.append((f"{n} {pool}", min(runs, key=lambda r: r["late_p99_s"])))
    return rows


def _parse_levels(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=728, help="tokens (728 image tokens per image in the paper)")
    parser.add_argument("--channels", type=int, default=1280, help="feature width (1280 for OpenELM-270M)")
    parser.add_argument("--levels", default="2-32", help="'2-32' or a list '2,4,8'")
    parser.add_argument("--throughput-levels", default="2,3,4,8,16,32")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-images", type=int, default=16,
                        help="images per measured step in the loop figures (16: the paper's stage-2 batch; 0 skips them)")
    parser.add_argument("--loop-workers", default="1,2", help="codec worker counts of the loop figures")
    args = parser.parse_args()
    n = args.rows * args.channels
    zc = zstandard.ZstdCompressor(level=3)
    print(f"jax {jax.__version__}, {args.rows} x {args.channels} = {n} indices per message, headers included")

    for kind in ("gaussian", "skewed"):
        print(f"\n## {kind} features: bits per index")
        print("|  L | log2 L | entropy H | packed | ans global | ans channel | ans auto | zstd uint8 | zstd packed |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for levels in _parse_levels(args.levels):
            k = code_stream(kind, levels, args.rows, args.channels, args.seed)
            entropy = codec.empirical_entropy_bits(k, levels) / n
            packed = codec.encode(k, levels, "packed")
            sizes = [len(packed)] + [len(codec.encode(k, levels, "ans", model=m)) for m in ("global", "channel", "auto")]
            dtype = np.uint8 if levels <= 256 else np.uint16
            sizes += [len(zc.compress(k.astype(dtype).tobytes())), len(zc.compress(packed))]
            cells = " | ".join(f"{8 * s / n:.4f}" for s in sizes)
            print(f"| {levels:2d} | {np.log2(levels):.4f} | {entropy:.4f} | {cells} |")

    print("\n## throughput, skewed features (million indices per second, best of repeats)")
    print("|  L | packed enc | packed dec | ans enc | ans dec | ans channel enc | ans channel dec | zstd enc | zstd dec |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    zd = zstandard.ZstdDecompressor()
    for levels in _parse_levels(args.throughput_levels):
        k = code_stream("skewed", levels, args.rows, args.channels, args.seed)
        row = []
        for method, model in (("packed", "auto"), ("ans", "global"), ("ans", "channel")):
            msg = codec.encode(k, levels, method, model=model)
            row.append(_best_time(lambda: codec.encode(k, levels, method, model=model), args.repeat))
            row.append(_best_time(lambda: codec.decode(msg), args.repeat))
            assert np.array_equal(codec.decode(msg), k)
        raw = k.tobytes()
        comp = zc.compress(raw)
        row.append(_best_time(lambda: zc.compress(raw), args.repeat))
        row.append(_best_time(lambda: zd.decompress(comp), args.repeat))
        print(f"| {levels:2d} | " + " | ".join(f"{n / t / 1e6:.1f}" for t in row) + " |")

    if args.loop_images > 0:
        k = code_stream("skewed", 4, args.rows, args.channels, args.seed)
        images = np.broadcast_to(k, (args.loop_images, *k.shape))
        jobs = [CodecJob(images, 4, "ans"), CodecJob(images, 4, "packed")]
        print(f"\n## the loop's thread while a step of {args.loop_images} images is coded "
              f"({images.size / 1e6:.1f} M indices, L = 4, ANS and packed; best of {args.repeat})")
        print("| codec workers | coding wall (s) | wake-ups | late, mean (ms) | late, p99 (ms) | late, max (ms) |")
        print("|---|---:|---:|---:|---:|---:|")
        workers = [int(v) for v in args.loop_workers.split(",")]
        for name, r in loop_figures(jobs, workers, args.repeat):
            wall = "-" if name == "nothing" else f"{r['wall_s']:.3f}"
            print(f"| {name} | {wall} | {r['wakeups']:.0f} | {1e3 * r['late_mean_s']:.2f} | "
                  f"{1e3 * r['late_p99_s']:.2f} | {1e3 * r['late_max_s']:.2f} |")


if __name__ == "__main__":
    main()
