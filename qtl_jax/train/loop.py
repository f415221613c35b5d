"""The training job: config -> model, data, split step, checkpoints, logs and the end-of-stage evaluation.

:func:`train_and_evaluate` is all ``train.py`` calls. A run lives in its ``workdir``::

    config.json           the config (also stored in every checkpoint)
    checkpoints/<step>/   Orbax checkpoints (qtl_jax.train.checkpoint); the latest is resumed automatically
    metrics.jsonl         one JSON object per logged step (qtl_jax.train.metrics_log)
    eval.jsonl            end-of-stage evaluation (qtl_jax.train.demo_eval)
    tensorboard/          TensorBoard event files
    data/                 the shapes corpus, when data.kind='shapes' and data.data_dir is unset

Resuming is exact: params, optimizer states, quantizer statistics, step, RNG and the loader's position
come back from the checkpoint, so the resumed run computes the same per-step losses as an uninterrupted
one. A NaN/inf loss stops the run before anything is saved over the last good checkpoint.

Multi-host (``jax.distributed``): every process runs this function; each loads its share of the global
batch (``global_batch_size / process_count`` rows), the shares are gathered into the global batch in
the single-host order, and each partition's program splits it over the devices of its sub-mesh, which
may span processes. Byte measurement (host entropy coding of every code) and the evaluation run only in
single-process runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qtl_jax.data.constants import IMAGE_TOKEN_INDEX
from qtl_jax.data import image_processing, llava_tfds, pipeline, templates
from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig, dtype_from_name
from qtl_jax.models.quantized import QuantizedTinyLlavaConfig
from qtl_jax.models.tinyllava import TinyLlavaConfig
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig
from qtl_jax.split import mesh as meshlib
from qtl_jax.split import step as steplib
from qtl_jax.split.link import InProcessLink
from qtl_jax.train import checkpoint as ckptlib
from qtl_jax.train import demo_eval
from qtl_jax.train.metrics_log import MetricsLogger
from qtl_jax.train.optimizer import learning_rate_schedule

# Metrics the step returns that are per-step counts, logged as they are.
_BYTE_KEYS = ("uplink_bytes", "uplink_bytes_fp16", "uplink_bytes_packed", "uplink_bytes_ans", "uplink_bytes_side",
              "uplink_values", "downlink_bytes")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stopped without saving."""


@dataclasses.dataclass
class Setup:
    """Everything built from the config before training starts."""

    model: QuantizedTinyLlavaConfig
    tokenizer: Any
    image_processor: image_processing.ImageProcessor
    pretrained: dict[str, Any] | None
    quantizer_params: dict[str, Any] | None
    dataset_dir: str
    data_dir: str


def _missing(option: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}: set --config.{option}=/path/to/local/dir (qtl_jax never downloads weights).")


def _check_dir(path: str | None, option: str, what: str) -> str:
    if not path:
        raise _missing(option, f"{option} is not set but {what} needs it")
    if not os.path.isdir(path):
        raise _missing(option, f"{option}={path!r} does not exist ({what})")
    return path


def _model_section(config: ml_collections.ConfigDict) -> Mapping[str, Any]:
    """The model settings: the config's own, or (init.from_workdir) the previous stage's."""
    if config.init.from_workdir:
        _check_dir(config.init.from_workdir, "init.from_workdir", "starting from a previous stage's workdir")
        path = os.path.join(config.init.from_workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"init.from_workdir={config.init.from_workdir!r} has no config.json; it is not a train.py workdir."
            )
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)["model"]
        # Precision and remat are this stage's choice; the architecture is the previous stage's.
        return {**previous, "dtype": config.model.dtype, "remat": config.model.remat}
    return config.model.to_dict()


def _random_tinyllava(m: Mapping[str, Any], vocab_size: int) -> TinyLlavaConfig:
    vision = VisionConfig(**m["vision"])
    llm_kwargs = dict(m["llm"])
    llm_kwargs["vocab_size"] = llm_kwargs["vocab_size"] or vocab_size
    llm = DecoderConfig.make(**llm_kwargs)
    return TinyLlavaConfig(
        vision=vision, connector=ConnectorConfig(m["connector_type"], vision.hidden_size, llm.hidden_size), llm=llm,
        vision_feature_layer=m["vision_feature_layer"], vision_feature_select_strategy=m["vision_feature_select_strategy"],
    )


def build_setup(config: ml_collections.ConfigDict, workdir: str, key: jax.Array) -> Setup:
    """Tokenizer, model config, base weights and data directory, with clear errors for missing paths."""
    m = _model_section(config)
    from_workdir = bool(config.init.from_workdir)
    pretrained = quantizer_params = None
    overrides = dict(max_length=m["max_length"], remat=bool(m["remat"]))

    # Paths first, so a missing one is reported before anything slow happens.
    if config.init.checkpoint:
        _check_dir(config.init.checkpoint, "init.checkpoint", "initialising from a converted checkpoint")
    elif m["source"] == "components":
        _check_dir(m.get("vision_dir"), "model.vision_dir", "model.source='components' (the vision tower)")
        _check_dir(m.get("llm_dir"), "model.llm_dir", "model.source='components' (the LLM)")
    if config.data.kind == "llava":
        _check_dir(config.data.dataset_dir, "data.dataset_dir",
                   "data.kind='llava' (a dataset built by python -m qtl_jax.data.llava_tfds)")

    # Tokenizer.
    if config.data.kind == "shapes":
        tokenizer = shapes_tokenizer.build_shapes_tokenizer(model_max_length=m["max_length"])
    else:
        from transformers import AutoTokenizer

        tok_dir = m.get("tokenizer_dir") or config.init.checkpoint or m.get("llm_dir")
        tokenizer = AutoTokenizer.from_pretrained(_check_dir(tok_dir, "model.tokenizer_dir", "the tokenizer"))

    # Model and base weights.
    if config.init.checkpoint:
        from qtl_jax.weights import loader

        path = _check_dir(config.init.checkpoint, "init.checkpoint", "initialising from a converted checkpoint")
        try:
            model, pretrained = loader.load_pretrained(path, dtype=m["dtype"], **overrides)
        except NotImplementedError:  # an official Quantized-TinyLLaVA checkpoint: base model + projections
            model, pretrained = loader.load_pretrained(path, dtype=m["dtype"], drop_quantizer=True, **overrides)
            quantizer_params = loader.load_quantizer_params(path)
        # The split model and the input pipeline use the Factory convention (one -200 placeholder per image,
        # expanded by the model); a llava-hf checkpoint's weights are the same, only its ids differ.
        tcfg = dataclasses.replace(model.config, convention="factory", image_token_index=IMAGE_TOKEN_INDEX,
                                   scale_image_embeddings=model.config.scales_images)
    elif m["source"] == "components":
        from qtl_jax.weights import loader

        vision_dir = _check_dir(m.get("vision_dir"), "model.vision_dir", "model.source='components' (the vision tower)")
        llm_dir = _check_dir(m.get("llm_dir"), "model.llm_dir", "model.source='components' (the LLM)")
        model, pretrained = loader.load_pretrained(
            vision_dir=vision_dir, llm_dir=llm_dir, key=key, connector_type=m["connector_type"],
            vision_feature_layer=m["vision_feature_layer"], vision_feature_select_strategy=m["vision_feature_select_strategy"],
            dtype=m["dtype"], **overrides,
        )
        tcfg = model.config
        if from_workdir:
            pretrained = None  # every weight comes from the previous stage's checkpoint
    elif m["source"] == "random":
        tcfg = dataclasses.replace(_random_tinyllava(m, len(tokenizer)), dtype=dtype_from_name(m["dtype"]), **overrides)
    else:
        raise ValueError(f"model.source={m['source']!r}: use 'components' (vision_dir + llm_dir) or 'random'.")
    if tcfg.llm.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM only {tcfg.llm.vocab_size} embeddings.")

    d = tcfg.llm.hidden_size
    q = config.quantizer
    qcfgs = {name: QuantizerConfig(dim=d, levels=q.levels, scaling=q.scaling, bound=q.bound, dist_weight=q.dist_weight,
                                   clip_sigma=q.clip_sigma, ema_momentum=q.ema_momentum, dtype=tcfg.dtype)
             for name in ("image", "text")}
    qmodel = QuantizedTinyLlavaConfig(model=tcfg, image_quantizer=qcfgs["image"], text_quantizer=qcfgs["text"])

    size = tcfg.vision.image_size
    processor = image_processing.ImageProcessor(size=(size, size), image_mean=tuple(m["image_mean"]),
                                                image_std=tuple(m["image_std"]))

    data_dir = config.data.data_dir or os.path.join(workdir, "data")
    previous_data = os.path.join(config.init.from_workdir or "", "data")
    if not config.data.data_dir and config.data.kind == "shapes" and from_workdir and os.path.isdir(previous_data):
        data_dir = previous_data  # the previous stage prepared both shapes streams there
    if config.data.kind == "shapes":
        s = config.data.shapes
        dirs = on_main_first(lambda: llava_tfds.prepare_shapes_tfds(
            data_dir, seed=s.seed, n_pretrain=s.n_pretrain, n_instruct=s.n_instruct, image_size=size,
            text_only_fraction=s.text_only_fraction))
        if s.stream not in dirs:
            raise ValueError(f"data.shapes.stream={s.stream!r}: use one of {sorted(dirs)}.")
        dataset_dir = dirs[s.stream]
    elif config.data.kind == "llava":
        dataset_dir = _check_dir(config.data.dataset_dir, "data.dataset_dir",
                                 "data.kind='llava' (a dataset built by python -m qtl_jax.data.llava_tfds)")
    else:
        raise ValueError(f"data.kind={config.data.kind!r}: use 'llava' or 'shapes'.")
    return Setup(qmodel, tokenizer, processor, pretrained, quantizer_params, dataset_dir, data_dir)


def on_main_first(fn):
    """Runs ``fn`` on process 0, then on the others (which then find its output): shared files are built once."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("qtl_jax: data prepared")
    return out if jax.process_index() == 0 else fn()


def make_loader(setup: Setup, config: ml_collections.ConfigDict, dataset_dir: str, split: str, template: str, *,
                global_batch_size: int, shuffle: bool, num_epochs: int | None, seed: int,
                process_index: int | None = None, process_count: int | None = None):
    tcfg = setup.model.model
    return pipeline.build_input_pipeline(
        dataset_dir, split, tokenizer=setup.tokenizer, template=templates.get_template(template),
        image_processor=setup.image_processor, num_image_tokens=tcfg.num_image_tokens, max_length=tcfg.max_length,
        global_batch_size=global_batch_size, seed=seed, num_epochs=num_epochs, shuffle=shuffle,
        worker_count=config.data.worker_count, read_threads=config.data.read_threads,
        process_index=process_index, process_count=process_count,
    )


def per_sample_pixels(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``pixel_values[i]`` = sample i's image (zeros without one).

    The input pipeline orders images as placeholders consume them (``image_index`` maps samples to rows),
    while the split model's client takes one image slot per sample and does that ordering itself.
    """
    out = dict(batch)
    pixels = np.asarray(batch["pixel_values"])
    index = np.asarray(batch["image_index"])
    out["pixel_values"] = np.where((index >= 0)[:, None, None, None], pixels[np.maximum(index, 0)], 0).astype(pixels.dtype)
    return out


def gather_global_batch(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows -> the global batch, on every process, in the single-host order.

    Host p holds global rows p, p + P, p + 2P, ... (``qtl_jax.data.loader``), so the gathered
    ``[P, B_local, ...]`` stack is interleaved back.
    """
    if jax.process_count() == 1:
        return dict(local)
    from jax.experimental import multihost_utils

    out = {}
    for k, v in local.items():
        stacked = np.asarray(multihost_utils.process_allgather(np.asarray(v)))  # [P, B_local, ...]
        out[k] = np.swapaxes(stacked, 0, 1).reshape((-1,) + stacked.shape[2:])
    return out


def _gather_json(value: Mapping[str, Any]) -> dict[str, Any]:
    """``{'process_<i>': value of process i}`` on every process."""
    if jax.process_count() == 1:
        return {"process_0": dict(value)}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(n, np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return {f"process_{i}": json.loads(bytes(r).rstrip(b"\0").decode()) for i, r in enumerate(rows)}


def count_steps(config: ml_collections.ConfigDict, num_records: int) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    steps = int(config.data.num_epochs) * (num_records // int(config.global_batch_size))
    if steps < 1:
        raise ValueError(
            f"{num_records} records give no full batch of global_batch_size={config.global_batch_size}; "
            "lower the batch size or set total_steps."
        )
    return steps


def _step_record(metrics: Mapping[str, float], lr: float, step_time: float, data_time: float,
                 batch_size: int) -> dict[str, Any]:
    rec = {k: float(v) for k, v in metrics.items() if k not in _BYTE_KEYS}
    rec.update({k: int(metrics[k]) for k in _BYTE_KEYS if k in metrics})
    rec["lr"] = lr
    rec["step_time"] = step_time
    rec["data_time"] = data_time
    rec["examples_per_sec"] = batch_size / step_time
    rec["tokens_per_sec"] = float(metrics.get("tokens", 0.0)) / step_time
    return rec


def _poison(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = dict(batch)
    batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
    return batch


def run_eval(setup: Setup, config: ml_collections.ConfigDict, meshes, state: steplib.TrainState) -> dict[str, float]:
    """The end-of-stage evaluation on held-out data (module ``demo_eval``)."""
    e = config.eval
    n_batches = max(int(e.num_examples) // int(e.batch_size), 1)
    if config.data.kind == "shapes":
        dataset_dir = demo_eval.prepare_shapes_eval(setup.data_dir, seed=e.shapes_seed, stream=e.shapes_stream,
                                                    num_examples=int(e.num_examples),
                                                    image_size=setup.model.model.vision.image_size)
    else:
        dataset_dir = _check_dir(e.dataset_dir, "eval.dataset_dir", "the end-of-stage evaluation (or eval.enabled=False)")
    loader = make_loader(setup, config, dataset_dir, e.split, e.template, global_batch_size=int(e.batch_size),
                         shuffle=False, num_epochs=1, seed=0)
    eval_step = steplib.make_eval_step(setup.model, meshes)
    return demo_eval.evaluate(eval_step, state, (per_sample_pixels(b) for b in loader), max_batches=n_batches)


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, returns the final figures.

    Returns ``{'step', 'loss', 'eval': {...}}`` (eval only when evaluated).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    # A raw uint32 key rather than a typed one: jax.device_put cannot place typed key arrays on a sharding
    # that spans several processes, which create_train_state does with the state's rng.
    key = jax.random.key_data(jax.random.key(int(config.seed)))
    k_state, k_setup = jax.random.split(key)
    setup = build_setup(config, workdir, k_setup)
    config_json = config_to_json(config)

    loader = make_loader(setup, config, setup.dataset_dir, config.data.split, config.data.template,
                         global_batch_size=int(config.global_batch_size), shuffle=True, num_epochs=None,
                         seed=int(config.seed))
    total_steps = count_steps(config, loader.num_records)

    mc = config.mesh
    meshes = meshlib.split_meshes(mc.client_devices, mc.server_devices, client_fsdp=mc.client_fsdp,
                                  server_fsdp=mc.server_fsdp)
    opt_cfg = config.optimizer.to_dict()
    state = steplib.create_train_state(setup.model, k_state, meshes, opt_cfg, total_steps, setup.pretrained,
                                       sharding_rules=list(config.sharding))
    optimizers = steplib.make_split_optimizers(opt_cfg, total_steps, {"client": state.client.params,
                                                                       "server": state.server.params})

    checkpointer = ckptlib.Checkpointer(workdir, keep=int(config.keep_checkpoints))
    start = checkpointer.latest_step()
    log = MetricsLogger(workdir, total_steps, initial_step=start or 0, progress_bar=config.progress_bar,
                        is_main=is_main)
    if start is not None:
        state, data_state = checkpointer.restore(state)
        loader.set_state(data_state[f"process_{jax.process_index()}"])
        log.truncate_after(start)
        log.print(f"qtl_jax: resumed {workdir} at step {start}/{total_steps}")
    else:
        state = _initial_params(config, setup, state)
        if is_main:
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config_json, f, indent=1)
        start = 0

    multi = jax.process_count() > 1
    link = None
    if config.split.mode == "split":
        link = InProcessLink(meshes, codec_method=config.split.codec_method, measure=not multi,
                             measure_every=int(config.split.measure_every), downlink_dtype=config.split.downlink_dtype)
    train_step = steplib.make_train_step(setup.model, meshes, optimizers, mode=config.split.mode, link=link)
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    log.print(f"qtl_jax: stage {config.stage}, {total_steps} steps of {config.global_batch_size} examples, "
              f"{jax.device_count()} devices ({jax.process_count()} processes), mode={config.split.mode}")

    last: dict[str, Any] = {}
    try:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            batch = gather_global_batch(per_sample_pixels(next(loader)))
            if step == config.debug.poison_step:
                batch = _poison(batch)
            t1 = time.perf_counter()
            state, metrics = train_step(state, batch)
            t2 = time.perf_counter()
            if config.debug.step_delay > 0:
                time.sleep(float(config.debug.step_delay))
            if not math.isfinite(metrics["loss"]):
                checkpointer.wait()
                good = checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"loss is {metrics['loss']} at step {step + 1} (ce={metrics.get('ce')}); stopped without saving. "
                    f"The last good checkpoint is step {good} in {checkpointer.directory} "
                    f"({'none yet' if good is None else 'intact'}). Lower optimizer.lr or check the data, then rerun: "
                    "train.py resumes from that checkpoint."
                )
            done = step + 1
            last = _step_record(metrics, float(schedule(step)), t2 - t1, t1 - t0, int(config.global_batch_size))
            if done % int(config.log_every) == 0 or done == total_steps:
                log.write(done, last)
            log.advance()
            if done % int(config.checkpoint_every) == 0 or done == total_steps:
                checkpointer.save(state, _gather_json(loader.get_state()), config_json)
        checkpointer.wait()
        final_step = int(jax.device_get(state.step))
        result: dict[str, Any] = {"step": final_step, "loss": last.get("loss")}
        if config.eval.enabled and not multi:
            t0 = time.perf_counter()
            result["eval"] = run_eval(setup, config, meshes, state)
            result["eval"]["eval_seconds"] = time.perf_counter() - t0
            log.write_eval(final_step, result["eval"])
            ev = result["eval"]
            log.print(f"qtl_jax: eval at step {final_step}: exact_match={ev['exact_match']:.4f} "
                      f"(majority {ev['majority_exact_match']:.4f}), token_accuracy={ev['token_accuracy']:.4f} "
                      f"(majority {ev['majority_token_accuracy']:.4f}) over {ev['answers']} answers")
        return result
    finally:
        checkpointer.close()
        log.close()


def _initial_params(config: ml_collections.ConfigDict, setup: Setup, state: steplib.TrainState) -> steplib.TrainState:
    """A fresh run's params: the previous stage's (init.from_workdir) or HF quantizer projections, if any."""
    if config.init.from_workdir:
        client, server, stats, step = ckptlib.restore_params(config.init.from_workdir, state)
        print(f"qtl_jax: initialised from {config.init.from_workdir} step {step}")
        return state.replace(client=state.client.replace(params=client, batch_stats=stats),
                             server=state.server.replace(params=server))
    if setup.quantizer_params is not None:
        client, server = dict(state.client.params), dict(state.server.params)
        for modality, p in setup.quantizer_params.items():
            name = f"{modality}_quantizer"
            client[name] = _like(client[name], {"in_proj": p["in_proj"]})
            server[name] = _like(server[name], {"out_proj": p["out_proj"]})
        return state.replace(client=state.client.replace(params=client), server=state.server.replace(params=server))
    return state


def _like(target: Any, value: Any) -> Any:
    """``value`` with ``target``'s dtypes and shardings (shapes must agree)."""
    def put(t, v):
        if tuple(t.shape) != tuple(np.shape(v)):
            raise ValueError(f"quantizer projection of shape {np.shape(v)} does not fit the model's {t.shape}")
        return jax.device_put(jnp.asarray(v, t.dtype), t.sharding)

    return jax.tree_util.tree_map(put, target, value)
