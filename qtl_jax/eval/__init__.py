"""Evaluation: benchmark readers and official scoring rules, the resumable runner and the bits sweep.

``python eval.py --config=configs/eval.py --workdir=DIR`` runs :func:`qtl_jax.eval.runner.evaluate`;
with ``--config.score_only=True --config.answers_dir=ANSWERS`` it scores answer files (LLaVA's answer-file
format) without a model. docs/evaluation.md describes the outputs, the scoring rules and the sweep.
"""
