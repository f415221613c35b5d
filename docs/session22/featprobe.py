"""Is colour/kind of each grid cell linearly decodable from the image tokens the LLM gets (connector output)?
usage: featprobe.py STAGE_DIR SIZE"""
import os, sys, json, numpy as np
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
from qtl_jax.eval.model import load_from_workdir
from qtl_jax.models.tinyllava import TinyLlava
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.samples import scene_and_image
stage, size = sys.argv[1], int(sys.argv[2])
lm = load_from_workdir(stage, "llama", "/tmp/f3x/e1/data/tokenizer", jax.random.PRNGKey(0))
q = lm.qconfig; client = lm.params["client"]
model = TinyLlava(q.model)
enc = jax.jit(lambda px: model.apply({"params": {"vision_tower": client["vision_tower"], "connector": client["connector"]}}, px, method=TinyLlava.encode_images))
cfg = ShapesConfig(image_size=size)
def data(seed, n):
    X, C, K = [], [], []
    for i in range(n):
        scene, img, _ = scene_and_image(seed, "instruct", i, cfg)
        X.append(lm.image_processor(img))
        c = np.zeros(9, int); k = np.zeros(9, int)
        for o in scene.objects:
            cell = o.row * 3 + o.col
            c[cell] = 1 + cfg.colors.index(o.color); k[cell] = 1 + cfg.kinds.index(o.kind)
        C.append(c); K.append(k)
    X = np.stack(X).astype(np.float32)
    F = np.concatenate([np.asarray(enc(X[i:i+256])) for i in range(0, n, 256)])
    return F, np.stack(C), np.stack(K)
Ftr, Ctr, Ktr = data(11, 2000); Fte, Cte, Kte = data(12, 500)
T = Ftr.shape[1]; print("tokens", T, "dim", Ftr.shape[2])
# Per cell: which token? With T==9 token t = cell t; else use all tokens concatenated (flatten).
def fit(Xtr, ytr, Xte, yte, ncls, steps=500):
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr = (Xtr - mu) / sd; Xte = (Xte - mu) / sd
    W = jnp.zeros((Xtr.shape[1], ncls)); b = jnp.zeros(ncls)
    def loss(p):
        lg = Xtr @ p[0] + p[1]
        return -jnp.mean(jax.nn.log_softmax(lg)[jnp.arange(len(ytr)), ytr]) + 1e-3 * jnp.sum(p[0] ** 2)
    g = jax.jit(jax.value_and_grad(loss))
    p = (W, b); m = jax.tree.map(jnp.zeros_like, p); v = jax.tree.map(jnp.zeros_like, p)
    for t in range(1, steps + 1):
        l, gr = g(p)
        m = jax.tree.map(lambda a, b_: 0.9 * a + 0.1 * b_, m, gr); v = jax.tree.map(lambda a, b_: 0.999 * a + 0.001 * b_ ** 2, v, gr)
        p = jax.tree.map(lambda a, mm, vv: a - 0.05 * (mm / (1 - 0.9 ** t)) / (jnp.sqrt(vv / (1 - 0.999 ** t)) + 1e-8), p, m, v)
    acc = float(jnp.mean(jnp.argmax(Xte @ p[0] + p[1], -1) == yte))
    maj = float(np.mean(yte == np.bincount(ytr).argmax()))
    return acc, maj
for name, Ytr, Yte, n in (("colour", Ctr, Cte, len(cfg.colors) + 1), ("kind", Ktr, Kte, len(cfg.kinds) + 1)):
    if T == 8:  # 'patch' strategy drops the first (top-left) patch: token t is cell t + 1
        Xtr = Ftr.reshape(-1, Ftr.shape[2]); Xte = Fte.reshape(-1, Fte.shape[2]); ytr = Ytr[:, 1:].reshape(-1); yte = Yte[:, 1:].reshape(-1)
    elif T == 9:
        Xtr = Ftr.reshape(-1, Ftr.shape[2]); Xte = Fte.reshape(-1, Fte.shape[2]); ytr = Ytr.reshape(-1); yte = Yte.reshape(-1)
    else:
        Xtr = np.repeat(Ftr.reshape(len(Ftr), -1), 9, 0); Xte = np.repeat(Fte.reshape(len(Fte), -1), 9, 0)
        Xtr = np.concatenate([Xtr, np.tile(np.eye(9), (len(Ftr), 1))], 1); Xte = np.concatenate([Xte, np.tile(np.eye(9), (len(Fte), 1))], 1)
        ytr = Ytr.reshape(-1); yte = Yte.reshape(-1)
    acc, maj = fit(Xtr, ytr, Xte, yte, n)
    print(f"{name}: linear probe test accuracy {acc:.3f} (majority {maj:.3f})", flush=True)
