"""Diagnostic (session 22): train stage 2 on image-grounded yes/no probes only, then score POPE + MME.
usage: probe.py WORK N_SAMPLES STEPS [key=value ...]   (keys on configs/figure3.py:builtin's stage2 / root)
Probe samples: 1-3 turns, each a POPE-format or MME-format yes/no question about a fresh 48 px scene
(seed 7, instruct stream: disjoint from every benchmark stream); answer yes with p=0.5, absent objects
taken from the scene of another sample."""
import ast, json, os, sys, time
sys.path.insert(0, os.getcwd())
from qtl_jax import xla_flags
xla_flags.apply_defaults()
import numpy as np
from configs import figure3 as f3c
from qtl_jax.experiments import figure3 as f3, inputs as inputs_lib, measure
from qtl_jax.data import llava_tfds
from qtl_jax.data.shapes.scene import ShapesConfig, sample_scene
from qtl_jax.data.shapes.samples import scene_and_image, save_png, sample_rngs
from qtl_jax.data.shapes.text import SHORT_ANSWER_PROMPT, YES_NO_PROMPT, IMAGE_TOKEN
from qtl_jax.data.shapes.benchmarks import POPE_QUESTION, MME_TEMPLATES

work, n, steps = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
args = sys.argv[4:]
blind = "blind" in args
S1 = os.environ.get("S1", "/tmp/f3x/e2/fp16/stage1")
BENCH = os.environ.get("BENCH", "/tmp/f3x/e1/data/images/benchmarks")
TOK = "/tmp/f3x/e1/data/tokenizer"
cfg = ShapesConfig(image_size=48, blank=blind)
ds_dir = os.path.join(work, "tfds")
corpus = os.path.join(work, "corpus")
fmt = os.environ.get("FMT", "both")
if not os.environ.get("DS") and not os.path.exists(os.path.join(corpus, "instruct.json")):
    recs = []
    for i in range(n):
        scene, image, rng = scene_and_image(7, "instruct", i, cfg)
        present = scene.names()
        turns = []
        for t in range(int(rng.choice([1, 2, 3]))):
            if rng.random() < 0.5:
                o = scene.objects[int(rng.integers(len(scene.objects)))]
                c, k, a = o.color, o.kind, "Yes"
            else:
                while True:  # an object of another sample's scene that is absent here
                    j = int(rng.integers(n))
                    other = sample_scene(sample_rngs(7, "instruct", j)[0], cfg)
                    cand = [x for x in other.names() if x not in present]
                    if j != i and cand:
                        break
                c, k = cand[int(rng.integers(len(cand)))].split(" ")
                a = "No"
            use_pope = fmt == "pope" or (fmt == "both" and rng.random() < 0.5)
            if use_pope:
                q = f"{POPE_QUESTION.format(color=c, kind=k)}\n{SHORT_ANSWER_PROMPT}"
            else:
                q = f"{MME_TEMPLATES['existence'].format(color=c, kind=k)} {YES_NO_PROMPT}\n{SHORT_ANSWER_PROMPT}"
            turns.append((q, a))
        conv = []
        for ti, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": ((f"{q}\n{IMAGE_TOKEN}" if os.environ.get("IMG_AFTER") else f"{IMAGE_TOKEN}\n{q}") if ti == 0 else q)}, {"from": "gpt", "value": a}]
        p = f"instruct/{i:07d}.png"
        save_png(image, os.path.join(corpus, "images", p))
        recs.append({"id": f"probe-{i}", "image": p, "conversations": conv})
    os.makedirs(corpus, exist_ok=True)
    json.dump(recs, open(os.path.join(corpus, "instruct.json"), "w"))
    ans = [t["value"] for r in recs for t in r["conversations"] if t["from"] == "gpt"]
    print("probe corpus", n, "turns", len(ans), "yes frac", ans.count("Yes") / len(ans), flush=True)
built = os.environ.get("DS") or llava_tfds.build(ds_dir, "probe", {"train": [os.path.join(corpus, "instruct.json")]},
                         image_root=os.path.join(corpus, "images"), kind="instruct", max_bad_rows=0, max_bad_fraction=0.0)
c = f3c.get_config("builtin")
c.stage2.model.vision.image_size = 48
c.stage2.model.vision.patch_size = 16
c.stage2.total_steps = steps
c.stage2.checkpoint_every = steps
c.stage2.global_batch_size = 16
for a in args:
    if "=" not in a: continue
    k, v = a.split("=", 1); v = ast.literal_eval(v); node = c; parts = k.split(".")
    for p in parts[:-1]: node = node[p]
    node[parts[-1]] = v
given = inputs_lib.Inputs(stage1_data="", stage2_data=built, tokenizer_dir=TOK,
                          benchmark_dir=BENCH.replace("/images/", "/blank/").replace("/e1/", "/e1_aborted/") if blind or os.environ.get("BLANK_EVAL") else BENCH)
m = f3.Model("m", 0)
sc = f3.stage_config(c, m, 2, given, work)
sc.init.from_workdir = S1
from qtl_jax.train.loop import train_and_evaluate
t0 = time.time()
d = os.path.join(work, "stage2")
if not os.path.exists(os.path.join(d, "done")):
    train_and_evaluate(sc, d); open(os.path.join(d, "done"), "w").close()
print("train s", round(time.time() - t0), flush=True)
rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
losses = [r["loss"] for r in rows if "loss" in r]
print("loss first20 %.3f last20 %.3f" % (np.mean(losses[:20]), np.mean(losses[-20:])), flush=True)
ecfg = f3.eval_config(c, m, given, work)
ecfg.checkpoint = d
import ml_collections
ecfg.benchmarks = ml_collections.ConfigDict({k: dict(ecfg.benchmarks[k]) for k in ("mme", "pope")})
from qtl_jax.eval.model import load_model
t0 = time.time()
loaded = load_model(ecfg)
scores, met = measure.benchmark_scores(loaded, ecfg, os.path.join(work, "eval"), c.bootstrap)
print("eval s", round(time.time() - t0))
print("RESULT", json.dumps({b: (round(v["value"], 2), [round(x, 2) for x in v["ci95"]], v["n"]) for b, v in scores.items()}))
print("  pope", {k: round(v, 1) for k, v in met["pope"].items() if k in ("accuracy", "f1") or "accuracy" in k or "yes_ratio" in k})
print("  mme", {k: round(v, 1) for k, v in met["mme"].items() if k.endswith("/acc") or k.endswith("acc_plus") or k == "perception"})
