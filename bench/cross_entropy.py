"""Loss + gradient of the next-token cross-entropy at vocabulary 32000: the hand-written VJP against optax.

    python -m bench.cross_entropy [--batch=4] [--length=800] [--vocab=32000] [--rounds=9]

``ours`` is ``qtl_jax.models.quantized.cross_entropy`` (``_token_nll`` with its custom VJP: ``softmax -
onehot`` in one pass). ``optax`` is the same function (shifted labels, -100 ignored, mean over targets) with
``optax.softmax_cross_entropy_with_integer_labels`` and autodiff. Both are jitted ``value_and_grad`` with
respect to float32 logits, under the XLA options train.py uses. The rounds interleave the two (ours, optax,
ours, ...) and each round's ratio compares neighbours, so load from other processes cancels out; the median
ratio is the figure to read.
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
    from qtl_jax.models.quantized import cross_entropy

    def optax_cross_entropy(logits, labels):
        logits = logits.astype(jnp.float32)
        targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
        valid = targets != IGNORE_INDEX
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
        count = jnp.sum(valid)
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32), count

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(a.batch, a.length, a.vocab)).astype(np.float32) * 3)
    labels = rng.integers(0, a.vocab, (a.batch, a.length))
    labels[:, : a.length // 4] = IGNORE_INDEX  # a prompt whose tokens are not trained, as in the LLaVA data
    labels = jnp.asarray(labels)
    fns = {name: jax.jit(jax.value_and_grad(fn, has_aux=True))
           for name, fn in (("ours", cross_entropy), ("optax", optax_cross_entropy))}
    out = {name: jax.block_until_ready(fn(logits, labels)) for name, fn in fns.items()}  # compile + warm up
    (loss_a, _), grad_a = out["ours"]
    (loss_b, _), grad_b = out["optax"]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(a.rounds):
        for name, fn in fns.items():
            calls = []
            for _ in range(a.calls):
                t = time.perf_counter()
                jax.block_until_ready(fn(logits, labels))
                calls.append(time.perf_counter() - t)
            times[name].append(float(np.median(calls)))
    ratios = [o / x for o, x in zip(times["ours"], times["optax"])]
    temp = {name: fn.lower(logits, labels).compile().memory_analysis() for name, fn in fns.items()}
    report = {
        "shape": [a.batch, a.length, a.vocab],
        "ours_ms": 1000 * float(np.median(times["ours"])),
        "optax_ms": 1000 * float(np.median(times["optax"])),
        "ratio_ours_over_optax_median": float(np.median(ratios)),
        "ratio_min": float(min(ratios)),
        "ratio_max": float(max(ratios)),
        "loss_abs_diff": float(abs(loss_a - loss_b)),
        "grad_max_abs_diff": float(jnp.max(jnp.abs(grad_a - grad_b))),
        "rounds": a.rounds,
        "temp_mb": {name: (m.temp_size_in_bytes / 2**20 if m is not None else None) for name, m in temp.items()},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
