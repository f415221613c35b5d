"""Session 24: stage 2 (and the benchmarks) of one figure3-builtin model from a given stage-1 (or earlier
stage-2) workdir, with config overrides KEY=VALUE; FORMATS=a,b,... replaces the probe formats, BLIND=1 trains
and scores on the blank corpus. Usage: python stage2_from.py WORKDIR NAME START_WORKDIR [KEY=VALUE ...]"""
import json, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from qtl_jax import xla_flags
xla_flags.apply_defaults()
from configs import figure3 as f3cfg
from qtl_jax.experiments import figure3 as f3, inputs as inputs_lib
from qtl_jax.data.shapes import samples as S

workdir, name, stage1 = sys.argv[1], sys.argv[2], sys.argv[3]
c = f3cfg.get_config("builtin")
for a in sys.argv[4:]:
    k, v = a.split("=", 1)
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
        node = node[p]
    old = node[parts[-1]]
    node[parts[-1]] = v if isinstance(old, str) else type(old)(eval(v))
if os.environ.get("FORMATS"):
    S.PROBE_FORMATS = tuple(os.environ["FORMATS"].split(","))
os.makedirs(os.path.join(workdir, name), exist_ok=True)
if not os.path.exists(os.path.join(workdir, name, "stage1")):
    os.symlink(stage1, os.path.join(workdir, name, "stage1"))
timings = f3.Timings(workdir)
given = inputs_lib.prepare_builtin(os.path.join(workdir, "data"), c.corpus.to_dict(),
                                   int(c.stage1.model.vision.image_size), blank=bool(os.environ.get("BLIND")))
model = {"fp16": f3.Model("fp16", 0), "blind": f3.Model("blind", 0, blind=True)}.get(name) or f3.Model(name, int(name[1:]))
g = given["blank" if os.environ.get("BLIND") else "images"]
if os.environ.get("BLIND"):
    model = f3.Model("blind", 0, blind=True)
f3.train_stage(c, model, "stage2", g, workdir, timings)
out = f3.measure_model(c, model, g, workdir, timings)
print(json.dumps({b: (round(v["value"], 1), [round(x, 1) for x in v["ci95"]]) for b, v in out["scores"].items()}))
m = out["metrics"]
print({k: round(v, 1) for k, v in m["mme"].items() if "/acc" in k})
print({k: round(v, 1) for k, v in m["pope"].items() if "accuracy" in k or "yes_ratio" in k})
