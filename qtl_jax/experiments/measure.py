"""What the experiment measures on one trained model, each with the project's own tool for it.

* :func:`benchmark_scores`: answers and scores the benchmarks (:func:`qtl_jax.eval.harness.run_benchmarks`,
  resuming from the answers already written) and puts a bootstrap interval on each headline
  (:mod:`qtl_jax.eval.bootstrap`).
* :func:`uplink_per_sample`: the bytes the model's training messages took on the uplink, per sample, as the
  split link measured them with the real codec (``uplink_bytes_{fp16,packed,ans}`` in ``metrics.jsonl``).
* :func:`rule_feature_batches`: ``in_proj`` features of benchmark questions in batches, what the entropy
  rule (:mod:`qtl_jax.level_selection`) reads.
* :func:`inversion_attack`: the image-inversion attack of :mod:`qtl_jax.privacy` on the model's own wire.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from qtl_jax.eval import bootstrap, harness
from qtl_jax.eval.answers import answers_path, read_answers
from qtl_jax.eval.benchmarks import BENCHMARKS, benchmark_specs, subsample
from qtl_jax.eval.runner import present_specs
from qtl_jax.train.metrics_log import METRICS_FILE, read_jsonl

UPLINK_KEYS = {"fp16": "uplink_bytes_fp16", "packed": "uplink_bytes_packed", "ans": "uplink_bytes_ans"}
# Round-trip figures the split link may log (the downlink carries float32 gradients); used when present.
ROUNDTRIP_KEYS = ("roundtrip_bytes_per_sample", "downlink_bytes_fp32")


def benchmark_scores(loaded: Any, config: Any, workdir: str, boot: Mapping[str, Any]
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """``({benchmark: {value, ci95: [low, high], n, metric}}, every metric)`` of ``loaded`` on ``config``'s benchmarks.

    A benchmark whose scorer has secondary metrics (POPE: ``accuracy``) also gets ``{metric: {value, ci95}}``
    for each, from the same bootstrap replicates' seed.

    A benchmark without a local headline (VQAv2 test-dev without annotations) gets ``value``/``ci95`` None
    and a ``note``.
    """
    specs = present_specs(benchmark_specs(config), with_images=True)
    metrics = harness.run_benchmarks(loaded, config, workdir, specs=specs)
    scores: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        bench = BENCHMARKS[spec["kind"]]
        examples = subsample(bench.load(spec), int(config.max_examples), bench.group)
        rows = read_answers(answers_path(os.path.join(workdir, "answers"), name), bench.by_prompt)
        try:
            out = bootstrap.outcomes(spec, examples, rows, scored=metrics[name])
        except (ValueError, KeyError) as e:
            if bench.headline in metrics[name]:
                raise
            scores[name] = {"value": None, "ci95": None, "n": len(rows), "metric": bench.headline, "note": str(e)}
            continue
        low, high = bootstrap.bootstrap_interval(out, samples=int(boot["samples"]), seed=int(boot["seed"]),
                                                 level=float(boot["level"]))
        scores[name] = {"value": out.value(), "ci95": [low, high], "n": out.questions, "metric": out.headline}
        for metric in out.secondary:
            interval = bootstrap.bootstrap_interval(out, samples=int(boot["samples"]), seed=int(boot["seed"]),
                                                    level=float(boot["level"]), metric=metric)
            scores[name][metric] = {"value": out.value(metric), "ci95": list(interval)}
    return scores, metrics


def uplink_per_sample(stage_dir: str) -> dict[str, Any]:
    """Mean uplink bytes per sample over the stage's measured steps: ``{fp16, packed, ans}`` (plus the
    round-trip figures of :data:`ROUNDTRIP_KEYS` when the link logged them).

    Each measured step's message (image and text codes of the whole batch, padding and the masks and
    labels sent beside them included) divided by the examples in it.
    """
    records = [r for r in read_jsonl(os.path.join(stage_dir, METRICS_FILE)) if UPLINK_KEYS["ans"] in r]
    if not records:
        raise ValueError(f"{stage_dir}/{METRICS_FILE} has no measured uplink (split.mode='split' with "
                         "split.measure_every >= 1 logs uplink_bytes_*).")
    out: dict[str, Any] = {k: float(np.mean([r[key] / r["examples"] for r in records])) for k, key in UPLINK_KEYS.items()}
    out["measured_steps"] = len(records)
    for key in ROUNDTRIP_KEYS:
        values = [r[key] for r in records if key in r]
        if values:
            per_sample = key.endswith("per_sample")
            out[key if per_sample else f"{key}_per_sample"] = float(np.mean(
                values if per_sample else [r[key] / r["examples"] for r in records if key in r]))
    return out


def rule_feature_batches(loaded: Any, config: Any, batches: int, questions: int) -> dict[str, list[np.ndarray]]:
    """``{'image': [u per batch], 'text': [...]}``: ``in_proj`` outputs of ``batches`` disjoint groups of
    ``questions`` benchmark questions each (every group drawn across all benchmarks)."""
    from qtl_jax.eval import sweep

    specs = present_specs(benchmark_specs(config), with_images=True)
    pool = sweep.spread({n: BENCHMARKS[s["kind"]].load(s) for n, s in specs.items()}, batches * questions)
    if len(pool) < batches * 2:
        raise ValueError(f"only {len(pool)} benchmark questions for {batches} feature batches.")
    out: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for b in range(batches):
        feats = sweep.feature_samples(loaded, pool[b::batches])  # interleaved: each batch mixes the benchmarks
        for modality in out:
            out[modality].append(feats[modality])
    return out


def inversion_attack(loaded: Any, privacy: Mapping[str, Any]) -> dict[str, Any]:
    """PSNR / SSIM of images reconstructed from ``loaded``'s own image codes by a decoder the attacker trains
    on its own images through the same client (:mod:`qtl_jax.privacy`, docs/privacy.md); the model is
    attacked at the number of levels it was trained with (float16 values for a bound='none' model)."""
    import jax

    from qtl_jax.privacy import inversion, metrics, run

    q = loaded.qconfig.image_quantizer
    levels = run.FP16 if q.bound == "none" else int(q.levels)
    client = run.Client(loaded.base, dataclasses.asdict(q), jax.device_get(loaded.params["client"]),
                        jax.device_get(loaded.batch_stats), loaded.tokenizer, loaded.image_processor, loaded.source)
    pc = run.PrivacyConfig(levels=(max(levels, 2),), attacker_seed=int(privacy["attacker_seed"]),
                           victim_seed=int(privacy["victim_seed"]), n_attacker=int(privacy["n_attacker"]),
                           n_victim=int(privacy["n_victim"]), encode_batch=int(privacy["encode_batch"]),
                           steps=int(privacy["steps"]), batch_size=int(privacy["batch_size"]), seed=int(privacy["seed"]))
    attacker = run.make_corpus(client, pc.attacker_seed, pc.n_attacker)
    victim = run.make_corpus(client, pc.victim_seed, pc.n_victim)
    train_wire = run.encode(client, levels, attacker, pc.encode_batch)
    victim_wire = run.encode(client, levels, victim, pc.encode_batch)
    images = attacker.images[:len(train_wire.image_values)].astype(np.float32) / 255.0
    truth = victim.images[:len(victim_wire.image_values)].astype(np.float32) / 255.0
    trained = inversion.train_inverter(run.inversion_config(client, pc), train_wire.image_values, images,
                                       jax.random.key(pc.seed))
    recon = inversion.reconstruct(trained, victim_wire.image_values)
    psnr, ssim = metrics.psnr(truth, recon), metrics.ssim(truth, recon)
    mean_image = np.broadcast_to(images.mean(axis=0), truth.shape)
    return {"levels": levels, "psnr": float(np.mean(psnr)), "psnr_sd": float(np.std(psnr)),
            "ssim": float(np.mean(ssim)), "ssim_sd": float(np.std(ssim)),
            "mean_image_psnr": float(np.mean(metrics.psnr(truth, mean_image))),
            "mean_image_ssim": float(np.mean(metrics.ssim(truth, mean_image))),
            "victim_images": int(len(truth)), "attacker_images": int(len(images))}
