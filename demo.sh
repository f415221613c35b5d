#!/usr/bin/env bash
# The built-in demo, end to end on CPU: installs everything into .venv, then trains and evaluates one
# Quantized-TinyLLaVA at L=4 (2 bits per value) on the procedural shapes corpus with the Figure-3 recipe
# (configs/figure3.py:demo): a short 16-bit pretraining from random initialisation stands in for the
# pretrained SigLIP / OpenELM the paper starts from; then the paper's stage 1 (connector and fresh
# quantizers, started as the identity) and stage 2 (the instruction mix), every step through the split
# train step; then the five shapes benchmarks (MME / POPE / ScienceQA-IMG / TextVQA / VQAv2 layouts, about 250
# questions each, 95 % bootstrap intervals), the uplink with the real codec and the entropy rule.
# Usage: bash demo.sh [WORKDIR]   (default /tmp/qtl_demo; a finished phase is resumed, not redone)
set -euo pipefail
cd "$(dirname "$0")"
work="${1:-/tmp/qtl_demo}"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m qtl_jax.experiments.figure3 --config=configs/figure3.py:demo --workdir="$work"
echo "demo finished: table $work/figure3.md, scores $work/figure3.json, model $work/L4/stage2"
