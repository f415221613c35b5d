#!/usr/bin/env bash
# The built-in demo, end to end on CPU: installs everything into .venv, trains a tiny Quantized-TinyLLaVA
# from random initialisation on the procedural shapes corpus (stage 1: captions, stage 2: instructions;
# both through the split train step with L=4 quantizers, 2 bits per value), then evaluates it on the shapes
# benchmarks (MME / POPE / ScienceQA-IMG / TextVQA / VQAv2 layouts) with the bits sweep.
# Usage: bash demo.sh [WORKDIR]   (default /tmp/qtl_demo; a finished stage is resumed, not redone)
set -euo pipefail
cd "$(dirname "$0")"
work="${1:-/tmp/qtl_demo}"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python train.py --config=configs/stage1.py:demo --workdir="$work/stage1"
.venv/bin/python train.py --config=configs/stage2.py:demo --workdir="$work/stage2" \
    --config.init.from_workdir="$work/stage1"
.venv/bin/python eval.py --config=configs/eval.py:demo --workdir="$work/eval" --config.checkpoint="$work/stage2"
echo "demo finished: metrics in $work/eval/metrics.json, table $work/eval/results.md, sweep $work/eval/sweep.png"
