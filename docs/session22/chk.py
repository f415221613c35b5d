# Diagnostic scripts of docs/experiments.md, "Session 22", committed as run (from /tmp/f17/); not part of the package.
import json, os, sys, numpy as np
sys.path.insert(0, os.getcwd())
from PIL import Image
from qtl_jax.data.pipeline import build_input_pipeline
from qtl_jax.data.image_processing import ImageProcessor
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/f3x/e1/data/tokenizer")
ip = ImageProcessor(size=(48, 48), image_mean=(0.5,)*3, image_std=(0.5,)*3)
dl = build_input_pipeline("/tmp/f17/p1/tfds/llava_json/probe/1.0.0", "train", tokenizer=tok, template="llama",
                          image_processor=ip, num_image_tokens=9, max_length=160, global_batch_size=4, seed=0,
                          process_index=0, process_count=1)
b = next(iter(dl))
recs = json.load(open("/tmp/f17/p1/corpus/instruct.json"))
arrs = {}
for r in recs:
    a = ip(Image.open(os.path.join("/tmp/f17/p1/corpus/images", r["image"])))
    arrs[r["id"]] = (np.asarray(a), r)
for i in range(4):
    pv = b["pixel_values"][i]
    ids = [t for t in b["input_ids"][i] if t >= 0]
    print(tok.decode(ids)[:300].replace("\n", "|"))
    lab = [t for t in b["labels"][i] if t >= 0]
    print("  labels:", tok.decode(lab), "has_image", b["has_image"][i], "pix std", pv.std())
    match = [k for k, (a, r) in arrs.items() if np.allclose(a, pv, atol=1e-5)]
    print("  matching image ids", match, [t["value"] for t in arrs[match[0]][1]["conversations"]] if match else None)
