#!/usr/bin/env bash
# bench.perf on the GPU machine, in one call (see docs/performance.md, "On a GPU").
#
# From the repository root, on the device machine, with `.whl` carried (it holds the wheels of the
# packages bench.perf imports that the GPU image lacks: constriction, zstandard):
#     bash bench/device_run.sh               (demo and mid)
#     MODE=paper bash bench/device_run.sh    (the paper's configuration, stage 1 at batch 64, stage 2 at 16, bf16)
# WHEELS, BENCH_ARGS and BENCH_TIMEOUT_S override the defaults below.
# Writes $OUT/perf/perf.{json,md}, $OUT/perf.log (everything printed), $OUT/env.txt and, for MODE=paper,
# $OUT/preflight.log (the attention parity tests on the GPU; PREFLIGHT=0 skips them); with --paper-trace in
# BENCH_ARGS also $OUT/perf/trace_stage{n}_summary.{json,md} and the raw trace (gzipped when over 16 MB).
# Budget on an H200: demo and mid ~7.5 min; MODE=paper ~4.5 min per stage (session 31: data, random init and
# compile dominate), so a 10-minute call holds one stage (--paper-stages). The benchmark is killed (SIGTERM, which
# bench.perf turns into writing its JSON) at BENCH_TIMEOUT_S seconds (default: CALL_LIMIT_S = 560 s less what came before it),
# so the call ends inside the 10-minute limit with whatever was measured.
set -u -o pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT/perf"
export PYTHONUNBUFFERED=1
# JAX and torch share the card in one process, and the memory workers run beside it: no preallocation
# (peak_bytes_in_use still reports what was really used).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 - <<'PY'
import importlib
import importlib.metadata
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy", "constriction", "zstandard"):
    try:
        importlib.import_module(name)
        print(name, importlib.metadata.version(name))
    except Exception as e:  # a missing package is reported here, and bench.perf's own error says where
        print(name, "MISSING:", type(e).__name__, e)
import jax
print("jax backend", jax.default_backend(), jax.devices())
PY
} 2>&1 | tee "$OUT/env.txt"

# demo: 20 timed steps, torch.compile included (its compile is the slowest part here, ~1 min).
# mid: 10 timed steps, no torch.compile and no generation (each would cost minutes of compile).
# MODE=paper (a call of its own): the paper's configuration per stage on one real bucketed batch, at the
# paper's batches on an accelerator (stage 1: 64, stage 2: 16) in bf16 (bench.paper's defaults there), 5 timed
# steps each. BENCH_ARGS replaces either (a dry run on a CPU:
# BENCH_ARGS="--sizes=paper --paper-preset=tiny --paper-batches=64,16 --paper-dtype=bfloat16 --steps-paper=2").
if [ "${MODE:-}" = paper ]; then
  DEFAULT_ARGS="--sizes=paper --matmul-n=8192 --steps-paper=5"
else
  DEFAULT_ARGS="--sizes=demo,mid --matmul-n=8192 --steps=20 --steps-mid=10 --gen-runs=5 --no-torch-compile=mid --no-gen=mid"
fi
if [ "${MODE:-}" = paper ] && [ "${PREFLIGHT:-1}" = 1 ]; then
  # The kernels 'auto' picks here, checked before they are timed: tests/test_attention.py compares cuDNN's
  # fused attention (bf16) with the hand-written VJP at SigLIP's and OpenELM's shapes on this GPU. If cuDNN
  # fails, the benchmark times XLA's attention instead, and perf.json says which kernel ran.
  timeout 120 python3 -m pytest tests/test_attention.py -q -p no:cacheprovider -o addopts="" 2>&1 \
    | tee "$OUT/preflight.log"
  [ "${PIPESTATUS[0]}" = 0 ] || DEFAULT_ARGS="$DEFAULT_ARGS --paper-attention=xla"
fi
BENCH_ARGS=${BENCH_ARGS:-$DEFAULT_ARGS}
# The call's limit is 600 s (CALL_LIMIT_S: set it lower when less device time is left): whatever the
# preflight took comes off the benchmark's share.
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-$((${CALL_LIMIT_S:-560} - SECONDS))}
# The benchmark works outside $OUT (the paper size's batch files are ~100 MB, its corpus a deep folder tree,
# neither of which comes back); its two reports are copied into $OUT/perf at the end.
WORK=${BENCH_WORK:-/tmp/qtl_bench}
mkdir -p "$WORK"
echo "bench.perf $BENCH_ARGS (timeout ${BENCH_TIMEOUT_S} s)" | tee "$OUT/perf.log"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout --signal=TERM "$BENCH_TIMEOUT_S" python3 -m bench.perf --out="$WORK" $BENCH_ARGS 2>&1 \
  | tee -a "$OUT/perf.log"
rc=$?
echo "bench.perf exit status: $rc" | tee -a "$OUT/perf.log"
cp "$WORK"/perf.json "$WORK"/perf.md "$OUT/perf/" 2>/dev/null
# --paper-trace: the summaries of where the device time went, and each raw trace when it is small enough to
# come back (bench/profile_summary.py reads either).
cp "$WORK"/trace_stage*_summary.json "$WORK"/trace_stage*_summary.md "$OUT/perf/" 2>/dev/null
for t in "$WORK"/trace_stage*/; do
  [ -d "$t" ] || continue
  # Files come back up to 16 MiB each: a larger trace travels gzipped (a 5-step stage-2 trace is ~38 MB raw).
  for pb in $(find "$t" -name '*.xplane.pb' -size -200M); do
    dest="$OUT/perf/$(basename "$t").xplane.pb"
    if [ "$(stat -c %s "$pb")" -lt 16000000 ]; then cp "$pb" "$dest"; else gzip -c "$pb" > "$dest.gz"; fi
  done 2>/dev/null
done
ls -la "$WORK" "$OUT/perf" | tee -a "$OUT/perf.log"
exit $rc
