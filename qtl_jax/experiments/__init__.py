"""The paper's experiments, each one command over the project's own training, evaluation and analysis code.

* ``inputs``: the data, tokenizer and benchmark files of an experiment (the built-in corpus, or checked paths);
* ``measure``: what is measured on one trained model (scores with bootstrap intervals, uplink bytes, the
  entropy rule's features, the inversion attack);
* ``report``: the knee, the rule's check, ``figure3.{json,md,png}`` and ``figureA1.png``;
* ``figure3``: ``python -m qtl_jax.experiments.figure3 --config=configs/figure3.py:builtin --workdir=DIR``;
* ``seeds``: finished runs that differ only in their seed, compared (``python -m qtl_jax.experiments.seeds
  --workdirs=W0,W1 --out=DIR``): spreads, the knee and the rule per seed, τ refitted on one and checked on another.

Each imports only the ones listed before it (docs/experiments.md); ``seeds`` imports only ``report``.
"""
