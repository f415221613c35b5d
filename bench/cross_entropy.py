"""Loss + gradient of the output head and next-token cross-entropy at vocabulary 32000: fused vs plain.

    python -m bench.cross_entropy [--batch=4] [--length=800] [--hidden=1280] [--vocab=32000] [--rounds=9]

``fused`` is ``qtl_jax.models.cross_entropy.fused_head`` (the head's logits a chunk of target rows at a time,
gradients accumulated in the same pass; ``[B, T, V]`` never exists). ``plain`` is the head matmul to
``[B, T, V]`` float32 logits followed by ``cross_entropy.from_logits`` (optax + autodiff). Both are jitted
``value_and_grad`` with respect to the hidden states and the tied table, under the XLA options train.py uses;
a quarter of the positions are a prompt without targets. The rounds interleave the two and each round's ratio
compares neighbours, so load from other processes cancels out; the median ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import time

from qtl_jax import xla_flags


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.cross_entropy", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=800)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=3, help="calls per variant per round (their median is the round's time)")
    a = p.parse_args(argv)
    xla_flags.apply_defaults()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from qtl_jax.data.constants import IGNORE_INDEX
    from qtl_jax.models import cross_entropy

    def plain(hidden, table, labels):
        logits = jnp.einsum("btd,vd->btv", hidden, table, preferred_element_type=jnp.float32)
        return cross_entropy.from_logits(logits, labels)

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(a.batch, a.length, a.hidden)).astype(np.float32))
    table = jnp.asarray(rng.normal(size=(a.vocab, a.hidden)).astype(np.float32) * 0.02)
    labels = rng.integers(0, a.vocab, (a.batch, a.length))
    labels[:, : a.length // 4] = IGNORE_INDEX  # a prompt whose tokens are not trained, as in the LLaVA data
    labels = jnp.asarray(labels)
    fns = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
           for name, fn in (("fused", cross_entropy.fused_head), ("plain", plain))}
    args = (hidden, table, labels)
    out = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}  # compile + warm up
    (loss_a, _), grad_a = out["fused"]
    (loss_b, _), grad_b = out["plain"]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(a.rounds):
        for name, fn in fns.items():
            calls = []
            for _ in range(a.calls):
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                calls.append(time.perf_counter() - t)
            times[name].append(float(np.median(calls)))
    ratios = [o / x for o, x in zip(times["fused"], times["plain"])]
    temp = {name: fn.lower(*args).compile().memory_analysis() for name, fn in fns.items()}
    report = {
        "shape": [a.batch, a.length, a.hidden, a.vocab],
        "fused_ms": 1000 * float(np.median(times["fused"])),
        "plain_ms": 1000 * float(np.median(times["plain"])),
        "ratio_fused_over_plain_median": float(np.median(ratios)),
        "ratio_min": float(min(ratios)),
        "ratio_max": float(max(ratios)),
        "loss_abs_diff": float(abs(loss_a - loss_b)),
        "grad_max_abs_diff": max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(grad_a, grad_b)),
        "rounds": a.rounds,
        "temp_mb": {name: (m.temp_size_in_bytes / 2**20 if m is not None else None) for name, m in temp.items()},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
