"""Does the answer-position distribution depend on the image? Real vs blank vs shuffled images, teacher forced.
usage: seeimg.py CKPT_DIR DATASET_DIR TEMPLATE"""
import os, sys, numpy as np
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
from qtl_jax.eval.model import load_from_workdir
from qtl_jax.models.quantized import forward
from qtl_jax.data.pipeline import build_input_pipeline
ck, ds, tmpl = sys.argv[1], sys.argv[2], sys.argv[3]
lm = load_from_workdir(ck, "llama", "/tmp/f3x/e1/data/tokenizer", jax.random.PRNGKey(0))
q = lm.qconfig
dl = build_input_pipeline(ds, "train", tokenizer=lm.tokenizer, template=tmpl, image_processor=lm.image_processor,
                          num_image_tokens=q.model.num_image_tokens, max_length=160, global_batch_size=32, seed=0,
                          process_index=0, process_count=1)
b = next(iter(dl))
def nll(batch):
    logits, layout, _ = forward(q, lm.params, lm.batch_stats, batch)
    lab = layout.labels
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tgt = lab[:, 1:]
    m = tgt >= 0
    tok = jnp.take_along_axis(lp, jnp.where(m, tgt, 0)[..., None], -1)[..., 0]
    return float(-(tok * m).sum() / m.sum()), np.asarray(logits)
keys = {k: jnp.asarray(v) for k, v in b.items()}
base, L0 = nll(keys)
blank = dict(keys); blank["pixel_values"] = jnp.zeros_like(keys["pixel_values"])
nb, L1 = nll(blank)
shuf = dict(keys); shuf["pixel_values"] = keys["pixel_values"][::-1]
ns, L2 = nll(shuf)
print(f"NLL per target token: real {base:.4f} blank {nb:.4f} shuffled {ns:.4f}; max |logit diff| real-blank {np.abs(L0-L1).max():.4f} real-shuffled {np.abs(L0-L2).max():.4f}")
