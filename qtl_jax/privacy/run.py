"""The privacy evaluation: inversion attacks on what crosses the wire, for fp16 and L = 16, 8, 4, 2.

    python -m qtl_jax.privacy.run --workdir=/tmp/qtl_privacy [--checkpoint=/tmp/qtl_demo/stage1]

``--checkpoint`` is the workdir of a ``train.py`` run on the shapes corpus (e.g. the stage-1 demo): its
latest checkpoint's client half (vision tower, connector, embedding table, both ``in_proj``) is attacked.
Without it the client half is randomly initialised (``--model=demo`` or ``tiny`` sizes). Every setting
uses the same client weights; only the number of levels changes (the fp16 baseline sends the connector
outputs and token embeddings as float16, with no projection).

For each setting the attacker encodes its own shapes images and captions (seed ``--attacker_seed``)
through the client encoder, trains an inversion decoder on (image codes -> image) pairs and a linear map
on (text codes -> embedding) pairs, and attacks the victim's messages (seed ``--victim_seed``, disjoint
images). Writes ``results.json`` and ``privacy_grid.png`` into ``--workdir`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.data import image_processing, sequence, shapes, templates
from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
from qtl_jax.data.constants import IMAGE_TOKEN_INDEX
from qtl_jax.models import builder
from qtl_jax.models import quantized as qm
from qtl_jax.models.tinyllava import TinyLlavaConfig
from qtl_jax.privacy import inversion, metrics, text_attack
from qtl_jax.split import step as steplib
from qtl_jax.train import checkpoint as ckptlib

FP16 = 0  # the "levels" of the 16-bit baseline (bound='none')

# Random-init client sizes (no checkpoint): the stage-1 demo's model, and a test-sized one.
RANDOM_MODELS = {
    "demo": dict(
        vision=dict(kind="siglip", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=64, patch_size=8),
        llm=dict(family="llama", vocab_size=0, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 intermediate_size=256, head_dim=32, tie_word_embeddings=True),
        connector_type="mlp2x_gelu", max_length=160),
    "tiny": dict(
        vision=dict(kind="siglip", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=32, patch_size=8),
        llm=dict(family="llama", vocab_size=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                 intermediate_size=64, head_dim=16, tie_word_embeddings=True),
        connector_type="mlp2x_gelu", max_length=96),
}


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """One evaluation run.

    Attributes:
      levels: the quantized settings L (the fp16 baseline is always evaluated too).
      attacker_seed, victim_seed: shapes-corpus seeds of the attacker's and the victim's data (must differ).
      n_attacker, n_victim: samples in each set.
      encode_batch: samples per client message (the paper's scaling statistics are per message).
      steps, batch_size, learning_rate, hidden, channels: the inversion decoder (see InversionConfig);
        ``channels=None`` halves 32 channels per up-convolution, at least 8.
      ridge: the text attacker's ridge penalty.
      grid_examples: victim images shown in the picture.
      seed: PRNG seed of the decoders' init and minibatches.
    """

    levels: tuple[int, ...] = (16, 8, 4, 2)
    attacker_seed: int = 101
    victim_seed: int = 202
    n_attacker: int = 2048
    n_victim: int = 256
    encode_batch: int = 32
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 2e-3
    hidden: int = 128
    channels: tuple[int, ...] | None = None
    ridge: float = 1e-3
    grid_examples: int = 8
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.attacker_seed == self.victim_seed:
            problems.append("attacker_seed must differ from victim_seed (the attacker's data is disjoint)")
        if any(int(l) < 2 for l in self.levels):
            problems.append(f"levels must all be >= 2 (the fp16 baseline is always included), got {self.levels}")
        if self.n_victim < 1 or self.n_attacker < self.batch_size:
            problems.append(f"need n_victim >= 1 and n_attacker >= batch_size, got {self.n_victim}, {self.n_attacker}")
        if self.encode_batch < 2:
            problems.append("encode_batch must be >= 2 (batch statistics over one sample are degenerate)")
        if problems:
            raise ValueError("invalid PrivacyConfig:\n  " + "\n  ".join(problems))


class Client(NamedTuple):
    """The client half under attack and how its inputs are made."""

    model: TinyLlavaConfig
    quantizer: Mapping[str, Any]  # the trained quantizer settings (scaling, clip_sigma, ...)
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    tokenizer: Any
    processor: image_processing.ImageProcessor
    source: str  # what the weights are, for the report


class Corpus(NamedTuple):
    """Shapes samples as the client's batches: raw images plus the model inputs."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    inputs: dict[str, np.ndarray]  # input_ids, attention_mask, labels, pixel_values, has_image


class Wire(NamedTuple):
    """What one setting puts on the wire for a corpus, decoded to float32 values as the server would."""

    image_values: np.ndarray  # [N, T_img, D]
    text_values: np.ndarray  # [M, D] the real text positions only
    text_tokens: np.ndarray  # [M] their true ids
    text_message: np.ndarray  # [M] which message (batch) each row came in


def model_config(m: Mapping[str, Any], vocab_size: int) -> TinyLlavaConfig:
    """The float32 TinyLlavaConfig of a train.py ``model`` section with source='random' (demo-style runs)."""
    return dataclasses.replace(builder.tinyllava_config(m, vocab_size), max_length=m["max_length"])


def _split_config(tcfg: TinyLlavaConfig, levels: int, q: Mapping[str, Any]) -> qm.QuantizedTinyLlavaConfig:
    if levels == FP16:
        return builder.quantized_config(tcfg, {"bound": "none"})
    return builder.quantized_config(tcfg, {"levels": levels, "bound": "linear", "scaling": q.get("scaling", "batch"),
                                           "clip_sigma": q.get("clip_sigma", 3.0)})


def _processor(tcfg: TinyLlavaConfig, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> image_processing.ImageProcessor:
    return builder.image_processor({"image_mean": mean, "image_std": std}, tcfg.vision.image_size)


def load_client(checkpoint: str | None, key: jax.Array, random_model: str = "demo") -> Client:
    """The client half of a train.py shapes run's latest checkpoint, or a random-init one."""
    if checkpoint is None:
        if random_model not in RANDOM_MODELS:
            raise ValueError(f"random_model={random_model!r}: use one of {sorted(RANDOM_MODELS)}.")
        m = RANDOM_MODELS[random_model]
        tokenizer = shapes_tokenizer.build_shapes_tokenizer(model_max_length=m["max_length"])
        tcfg = model_config(m, len(tokenizer))
        q: dict[str, Any] = {"scaling": "batch", "clip_sigma": 3.0}
        params, stats = qm.init_split_params(_split_config(tcfg, 4, q), key)
        return Client(tcfg, q, params["client"], stats, tokenizer, _processor(tcfg), f"random init ({random_model})")

    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--checkpoint={checkpoint!r} has no config.json; pass the --workdir of a train.py run.")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    if run.get("data", {}).get("kind") != "shapes" or run["model"].get("source") != "random":
        raise ValueError(
            f"--checkpoint={checkpoint!r} is not a shapes-corpus demo run "
            f"(data.kind={run.get('data', {}).get('kind')!r}, model.source={run['model'].get('source')!r}); "
            "the privacy run attacks models trained on the built-in corpus "
            "(e.g. python train.py --config=configs/stage1.py:demo)."
        )
    m, q = run["model"], run["quantizer"]
    tokenizer = shapes_tokenizer.build_shapes_tokenizer(model_max_length=m["max_length"])
    tcfg = model_config(m, len(tokenizer))
    params, stats = qm.init_split_params(_split_config(tcfg, int(q["levels"]), q), key)
    like = steplib.TrainState(
        step=jnp.zeros((), jnp.int32), client=steplib.PartitionState(params["client"], None, stats),
        server=steplib.PartitionState(params["server"], None, {}), rng=key,
    )
    client_params, _, client_stats, step = ckptlib.restore_params(checkpoint, like)
    source = f"{os.path.abspath(checkpoint)} step {step} (trained with L={q['levels']}, scaling={q['scaling']})"
    processor = _processor(tcfg, m.get("image_mean", (0.5,) * 3), m.get("image_std", (0.5,) * 3))
    return Client(tcfg, q, jax.device_get(client_params), jax.device_get(client_stats), tokenizer, processor, source)


def make_corpus(client: Client, seed: int, n: int) -> Corpus:
    """``n`` shapes captioning samples (stage-1 ``pretrain`` template) drawn with ``seed``."""
    tcfg = client.model
    cfg = shapes.ShapesConfig(image_size=tcfg.vision.image_size)
    template = templates.get_template("pretrain")
    images, examples = [], []
    for i in range(n):
        sample = shapes.pretrain_sample(seed, i, cfg)
        tokens = template.tokenize(sample.record["conversations"], client.tokenizer, has_image=True)
        ex = sequence.assemble(tokens, num_image_tokens=tcfg.num_image_tokens, max_length=tcfg.max_length,
                               pad_token_id=client.tokenizer.pad_token_id, image_token_id=None)
        ex["pixel_values"] = client.processor(sample.image)
        ex["has_image"] = np.int32(1)
        images.append(sample.image)
        examples.append(ex)
    return Corpus(np.stack(images), sequence.collate(examples))


@functools.lru_cache(maxsize=None)
def _encoder(config: qm.QuantizedTinyLlavaConfig):
    def encode(params, stats, batch):
        out = qm.client_forward(config, params, stats, batch, train=False)
        return out.uplink.image_codes, out.uplink.text_codes

    return jax.jit(encode)


def encode(client: Client, levels: int, corpus: Corpus, encode_batch: int) -> Wire:
    """Runs the client encoder on ``corpus`` in messages of ``encode_batch`` samples (the last one
    dropped if short, so every message has the same statistics size) and decodes what it sends."""
    config = _split_config(client.model, levels, client.quantizer)
    params = dict(client.params)
    stats = dict(client.batch_stats)
    if levels == FP16:
        for name in ("image_quantizer", "text_quantizer"):
            params[name] = {}
            stats.pop(name, None)
    fn = _encoder(config)
    n = len(corpus.images) // encode_batch * encode_batch
    if n == 0:
        raise ValueError(f"the corpus has {len(corpus.images)} samples, fewer than one message of {encode_batch}.")
    image_values, text_values, text_tokens, text_message = [], [], [], []
    for b, i in enumerate(range(0, n, encode_batch)):
        batch = {k: v[i:i + encode_batch] for k, v in corpus.inputs.items()}
        image_codes, text_codes = jax.device_get(fn(params, stats, batch))
        image_values.append(inversion.wire_values(image_codes, levels))
        real = (batch["attention_mask"] > 0) & (batch["input_ids"] != IMAGE_TOKEN_INDEX)
        text_values.append(inversion.wire_values(text_codes, levels)[real])
        text_tokens.append(batch["input_ids"][real])
        text_message.append(np.full(int(real.sum()), b))
    return Wire(np.concatenate(image_values), np.concatenate(text_values), np.concatenate(text_tokens),
                np.concatenate(text_message))


def inversion_config(client: Client, pc: PrivacyConfig) -> inversion.InversionConfig:
    tcfg = client.model
    grid = tcfg.vision.image_size // tcfg.vision.patch_size
    ups = int(np.log2(tcfg.vision.image_size // grid))
    channels = pc.channels or tuple(max(32 >> i, 8) for i in range(ups + 1))
    return inversion.InversionConfig(
        num_tokens=tcfg.num_image_tokens, dim=tcfg.llm.hidden_size, image_size=tcfg.vision.image_size, grid=grid,
        hidden=pc.hidden, channels=channels, steps=pc.steps, batch_size=pc.batch_size, learning_rate=pc.learning_rate)


def level_entropy_bits(values: np.ndarray) -> float:
    """Empirical entropy (bits per value) of the grid values on the wire: how many levels are really used."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def setting_name(levels: int) -> str:
    return "fp16" if levels == FP16 else f"L={levels}"


def evaluate(client: Client, pc: PrivacyConfig, log=print) -> dict[str, Any]:
    """Runs every attack for fp16 and each L; returns the results (with the victim's reconstructions)."""
    t_start = time.perf_counter()
    attacker = make_corpus(client, pc.attacker_seed, pc.n_attacker)
    victim = make_corpus(client, pc.victim_seed, pc.n_victim)
    truth = victim.images.astype(np.float32) / 255.0
    n_eval = len(victim.images) // pc.encode_batch * pc.encode_batch
    truth = truth[:n_eval]
    train_images = attacker.images.astype(np.float32) / 255.0
    icfg = inversion_config(client, pc)
    table = np.asarray(client.params["embed_tokens"]["embedding"], np.float64)
    key = jax.random.key(pc.seed)

    # Trivial references: the attacker's mean image, and always guessing its most frequent token.
    mean_image = np.broadcast_to(train_images.mean(axis=0), truth.shape)
    ids = attacker.inputs["input_ids"][(attacker.inputs["attention_mask"] > 0)
                                       & (attacker.inputs["input_ids"] != IMAGE_TOKEN_INDEX)]
    majority = int(np.bincount(ids).argmax())
    results: dict[str, Any] = {
        "client": client.source,
        "config": dataclasses.asdict(pc),
        "inversion_config": dataclasses.asdict(icfg),
        "n_attacker_images": int(len(train_images) // pc.encode_batch * pc.encode_batch),
        "n_victim_images": int(n_eval),
        "mean_image_baseline": {"psnr": float(np.mean(metrics.psnr(truth, mean_image))),
                                "ssim": float(np.mean(metrics.ssim(truth, mean_image)))},
        "settings": {},
    }
    reconstructions = {}
    for levels in (FP16,) + tuple(int(l) for l in pc.levels):
        t0 = time.perf_counter()
        name = setting_name(levels)
        train_wire = encode(client, levels, attacker, pc.encode_batch)
        victim_wire = encode(client, levels, victim, pc.encode_batch)
        key, k = jax.random.split(key)
        pairs = len(train_wire.image_values)
        trained = inversion.train_inverter(icfg, train_wire.image_values, train_images[:pairs], k)
        recon = inversion.reconstruct(trained, victim_wire.image_values)
        reconstructions[name] = recon
        psnr, ssim = metrics.psnr(truth, recon), metrics.ssim(truth, recon)

        if levels == FP16:
            known = text_attack.nearest_neighbour(victim_wire.text_values, table, "euclidean")
        else:
            in_proj = client.params["text_quantizer"]["in_proj"]
            known = text_attack.known_projection_attack(victim_wire.text_values, table, in_proj["kernel"],
                                                        in_proj["bias"], victim_wire.text_message)
        linear = text_attack.fit_linear_map(train_wire.text_values, table[train_wire.text_tokens], pc.ridge)
        learned = text_attack.learned_map_attack(victim_wire.text_values, table, linear)
        results["settings"][name] = {
            "levels": levels,
            "bits_per_value": 16 if levels == FP16 else float(np.log2(levels)),
            "psnr": float(np.mean(psnr)), "psnr_std": float(np.std(psnr)),
            "ssim": float(np.mean(ssim)), "ssim_std": float(np.std(ssim)),
            "decoder_final_train_mse": float(np.mean(trained.losses[-20:])),
            # Only meaningful for the quantized settings (fp16 values are nearly all distinct).
            "image_code_entropy_bits": level_entropy_bits(victim_wire.image_values) if levels else None,
            "text_code_entropy_bits": level_entropy_bits(victim_wire.text_values) if levels else None,
            "token_accuracy_known_in_proj": text_attack.token_accuracy(known, victim_wire.text_tokens),
            "token_accuracy_learned_map": text_attack.token_accuracy(learned, victim_wire.text_tokens),
            "victim_text_tokens": int(len(victim_wire.text_tokens)),
            "seconds": time.perf_counter() - t0,
        }
        r = results["settings"][name]
        log(f"qtl_jax.privacy: {name:>5}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, token accuracy "
            f"{r['token_accuracy_known_in_proj']:.3f} (knows in_proj) / {r['token_accuracy_learned_map']:.3f} "
            f"(learned map) [{r['seconds']:.0f} s]")
    results["majority_token_accuracy"] = text_attack.token_accuracy(
        np.full(len(victim_wire.text_tokens), majority), victim_wire.text_tokens)
    results["seconds"] = time.perf_counter() - t_start
    results["victim_images"] = truth
    results["reconstructions"] = reconstructions
    return results


def table_markdown(results: Mapping[str, Any]) -> str:
    """The results as a markdown table (one row per setting, then the trivial references)."""
    lines = ["| setting | bits/value | PSNR (dB) | SSIM | token acc. (knows in_proj) | token acc. (learned map) "
             "| code entropy image / text (bits) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["settings"].items():
        bits = "16" if r["levels"] == FP16 else f"{r['bits_per_value']:g}"
        lines.append(f"| {name} | {bits} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | "
                     f"{r['ssim']:.3f} ± {r['ssim_std']:.3f} | "
                     f"{r['token_accuracy_known_in_proj']:.3f} | {r['token_accuracy_learned_map']:.3f} | "
                     + ("–" if r["image_code_entropy_bits"] is None else
                        f"{r['image_code_entropy_bits']:.2f} / {r['text_code_entropy_bits']:.2f}") + " |")
    b = results["mean_image_baseline"]
    lines.append(f"| reference: attacker's mean image / most frequent token | – | {b['psnr']:.2f} | "
                 f"{b['ssim']:.3f} | "
                 f"{results['majority_token_accuracy']:.3f} | {results['majority_token_accuracy']:.3f} | – |")
    return "\n".join(lines)


def save_grid(path: str, results: Mapping[str, Any], n: int) -> None:
    """Victim originals (first row) and each setting's reconstructions of them, one row per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = results["victim_images"][:n]
    rows = [("original", truth)] + [
        (f"{name}\n{results['settings'][name]['psnr']:.1f} dB\nSSIM {results['settings'][name]['ssim']:.2f}", rec[:n])
        for name, rec in results["reconstructions"].items()]
    fig, axes = plt.subplots(len(rows), len(truth), figsize=(1.2 * len(truth) + 0.9, 1.2 * len(rows)), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(len(truth)):
            ax = axes[i, j]
            ax.imshow(np.clip(images[j], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout(pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(workdir: str, results: Mapping[str, Any], grid_examples: int) -> dict[str, str]:
    """``results.json`` (without the image arrays), ``privacy_grid.png`` and ``results.md`` in ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, f) for k, f in
             (("json", "results.json"), ("grid", "privacy_grid.png"), ("table", "results.md"))}
    plain = {k: v for k, v in results.items() if k not in ("victim_images", "reconstructions")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(plain, f, indent=1)
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(table_markdown(results) + "\n")
    save_grid(paths["grid"], results, grid_examples)
    return paths


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m qtl_jax.privacy.run", description=__doc__.split("\n\n")[0])
    d = PrivacyConfig()
    p.add_argument("--workdir", required=True, help="where results.json, results.md and privacy_grid.png go")
    p.add_argument("--checkpoint", default=None, help="workdir of a train.py shapes run to attack (latest checkpoint)")
    p.add_argument("--model", default="demo", choices=sorted(RANDOM_MODELS),
                   help="random-init size without --checkpoint")
    p.add_argument("--levels", default=",".join(map(str, d.levels)), help="comma-separated L (fp16 is always added)")
    for name in ("attacker_seed", "victim_seed", "n_attacker", "n_victim", "encode_batch", "steps", "batch_size",
                 "hidden", "grid_examples", "seed"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--ridge", type=float, default=d.ridge)
    p.add_argument("--channels", default=None, help="comma-separated decoder widths (default: by grid size)")
    args = p.parse_args(argv)
    pc = PrivacyConfig(
        levels=_ints(args.levels), attacker_seed=args.attacker_seed, victim_seed=args.victim_seed,
        n_attacker=args.n_attacker, n_victim=args.n_victim, encode_batch=args.encode_batch, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, hidden=args.hidden,
        channels=_ints(args.channels) if args.channels else None, ridge=args.ridge, grid_examples=args.grid_examples,
        seed=args.seed)
    client = load_client(args.checkpoint, jax.random.key(pc.seed), args.model)
    print(f"qtl_jax.privacy: attacking the client half of {client.source}")
    results = evaluate(client, pc)
    paths = write_outputs(args.workdir, results, pc.grid_examples)
    print(table_markdown(results))
    print(f"qtl_jax.privacy: {results['seconds']:.0f} s; wrote {', '.join(paths.values())}")
    return results


if __name__ == "__main__":
    from qtl_jax import cli

    cli.run(main, prog="python -m qtl_jax.privacy.run")  # bad input: one line and a non-zero exit
