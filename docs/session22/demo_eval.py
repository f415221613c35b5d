"""MME + POPE (200 / 180 questions) of a demo stage-2 workdir on shapes benchmarks at 64 px.
usage: [BLANK_EVAL=1] demo_eval.py CKPT OUTDIR"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from qtl_jax import xla_flags
xla_flags.apply_defaults()
import ml_collections
from configs import eval as eval_configs
from qtl_jax.experiments import measure
from qtl_jax.eval.model import load_model
from qtl_jax.data.shapes.benchmarks import write_benchmarks
from qtl_jax.data.shapes.scene import ShapesConfig
ck, out = sys.argv[1], os.path.abspath(sys.argv[2])
blank = bool(os.environ.get("BLANK_EVAL"))  # the same questions on blank images (what the text alone gives)
bench = "/tmp/f17/bench64" + ("_blank" if blank else "")
if not os.path.isdir(os.path.join(bench, "pope")):
    write_benchmarks(bench, seed=0, cfg=ShapesConfig(image_size=64, blank=blank), n_mme=25, n_pope=10, n_scienceqa=2, n_vqa=2)
c = eval_configs.get_config("demo")
c.checkpoint = ck
c.benchmark_dir = bench
c.shapes_benchmarks.enabled = False
c.sweep.enabled = False
c.max_examples = 0
c.progress = False
c.benchmarks = ml_collections.ConfigDict({k: dict(eval_configs.SHAPES_BENCHMARKS[k]) for k in ("mme", "pope")})
t0 = time.time()
loaded = load_model(c)
scores, met = measure.benchmark_scores(loaded, c, out, dict(samples=2000, seed=0, level=0.95))
print("eval s", round(time.time() - t0))
print("RESULT", json.dumps({b: (round(v["value"], 2), [round(x, 2) for x in v["ci95"]], v["n"]) for b, v in scores.items()}))
print("  pope", {k: round(v, 1) for k, v in met["pope"].items() if "accuracy" in k or "yes_ratio" in k or k == "f1"})
print("  mme", {k: round(v, 1) for k, v in met["mme"].items() if k.endswith("/acc") or k.endswith("acc_plus") or k == "perception"})
