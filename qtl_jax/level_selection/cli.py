"""``python -m qtl_jax.level_selection (--features=FILE.npz | --synthetic[=KIND]) --out=DIR``.

Estimates the scaled-feature entropy over the batches, applies the rule and writes ``levels.json``,
``levels.md`` and ``levels.png`` into ``--out``. The output directory is required: a run never writes into
whatever directory it was started from.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from qtl_jax.cli import print_error
from qtl_jax.level_selection.features import SYNTHETIC_KINDS, load_feature_batches, synthetic_feature_batches
from qtl_jax.level_selection.report import write_report
from qtl_jax.level_selection.rule import DEFAULT_TOLERANCE_BITS, estimate_over_batches


def _parse_levels(spec: str) -> tuple[int, ...]:
    try:
        if "-" in spec or ".." in spec:
            a, b = spec.replace("..", "-").split("-")
            return tuple(range(int(a), int(b) + 1))
        return tuple(int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--levels must look like '2-32' or '2,4,8,16', got {spec!r}.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status (2: bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m qtl_jax.level_selection",
        description="Estimate the scaled-feature entropy over batches and choose the number of levels L.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="npz with batch_0..batch_7 (or one [8, ...] array) of pre-scaling features")
    src.add_argument("--synthetic", nargs="?", const="outlier", choices=SYNTHETIC_KINDS, help="generate features")
    parser.add_argument("--out", required=True, help="output directory for levels.json, levels.md and levels.png")
    parser.add_argument("--levels", default="2-32", help="candidate L: a range '2-32' or a list '2,4,8'")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE_BITS, help="resolution-gap tolerance, bits"
    )
    parser.add_argument("--bandwidth", default="plugin", help="plugin | silverman | scott | a number (z units)")
    parser.add_argument("--max-samples", type=int, default=1_000_000, help="KDE subsample size per batch")
    parser.add_argument("--batches", type=int, default=8, help="number of synthetic batches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        bandwidth: str | float = float(args.bandwidth)
    except ValueError:
        bandwidth = args.bandwidth
    try:
        if args.features:
            batches = load_feature_batches(args.features)
        else:
            batches = synthetic_feature_batches(args.synthetic, num_batches=args.batches, seed=args.seed)
        estimate = estimate_over_batches(
            batches,
            _parse_levels(args.levels),
            args.tolerance,
            bandwidth=bandwidth,
            max_samples=args.max_samples,
            seed=args.seed,
        )
    except ValueError as e:
        print_error(e)
        return 2
    paths = write_report(estimate, args.out)
    print(estimate.to_markdown())
    print("wrote " + ", ".join(paths.values()))
    return 0
