"""What a training run builds from its config before the first step: tokenizer, model, weights, state, data.

* :func:`build_setup`: the tokenizer, the quantized model and its image processor
  (:func:`qtl_jax.models.builder.build_model`), the base weights (``model.source='components'`` or a
  converted checkpoint, ``init.checkpoint``) and, unless ``data=False``, the data directory (the shapes
  corpus is prepared on the fly). Missing paths are reported before anything slow happens.
* :func:`initial_state`: a fresh run's :class:`~qtl_jax.split.step.TrainState`: the previous stage's
  params restored into an abstract template (``init.from_workdir``; :func:`abstract_state`, no random
  initialisation), or :func:`create_state` (drawn from ``config.seed``) then :func:`with_initial_params`
  (an official Quantized-TinyLLaVA checkpoint's quantizer projections).
* :func:`abstract_state`: the state's shapes and shardings, computed from nothing (the template a resumed
  run restores into).

Both halves of a network split run call these with the same config (the client through
:func:`qtl_jax.train.loop.train_and_evaluate`, the server in :mod:`qtl_jax.split.server`), so both start
from the parameters an in-process run starts from and keep only their own partition.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qtl_jax.data import image_processing
from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
from qtl_jax.models import builder
from qtl_jax.models.quantized import QuantizedTinyLlavaConfig
from qtl_jax.models.tinyllava import TinyLlava
from qtl_jax.split import downlink
from qtl_jax.split import step as steplib
from qtl_jax.split.mesh import SplitMeshes, replicated
from qtl_jax.train import checkpoint as ckptlib

T = TypeVar("T")


@dataclasses.dataclass
class Setup:
    """Everything built from the config before training starts (``dataset_dir``/``data_dir``: None without data)."""

    model: QuantizedTinyLlavaConfig
    tokenizer: Any
    image_processor: image_processing.ImageProcessor
    pretrained: dict[str, Any] | None
    quantizer_params: dict[str, Any] | None
    dataset_dir: str | None
    data_dir: str | None


def seed_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """``(state key, setup key)`` from ``config.seed``: the same on every process and on both sides of a split.

    Raw uint32 keys rather than typed ones: ``jax.device_put`` cannot place typed key arrays on a sharding
    that spans several processes, which ``create_train_state`` does with the state's rng.
    """
    key = jax.random.key_data(jax.random.key(int(config.seed)))
    k_state, k_setup = jax.random.split(key)
    return k_state, k_setup


def _missing(option: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}: set --config.{option}=/path/to/local/dir (qtl_jax never downloads weights).")


def check_dir(path: str | None, option: str, what: str) -> str:
    """``path`` if it is an existing directory, else an error naming the config option to set."""
    if not path:
        raise _missing(option, f"{option} is not set but {what} needs it")
    if not os.path.isdir(path):
        raise _missing(option, f"{option}={path!r} does not exist ({what})")
    return path


def model_section(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model settings: the config's own, or (init.from_workdir) the previous stage's."""
    if config.init.from_workdir:
        check_dir(config.init.from_workdir, "init.from_workdir", "starting from a previous stage's workdir")
        path = os.path.join(config.init.from_workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"init.from_workdir={config.init.from_workdir!r} has no config.json; it is not a train.py workdir."
            )
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)["model"]
        # Precision and the memory settings are this stage's choice; the architecture is the previous stage's.
        own = ("dtype", "remat", "remat_policy", "loss_chunk_rows", "attention", "scan_layers")
        return {**previous, **{k: config.model[k] for k in own if k in config.model}}
    return config.model.to_dict()


def load_checkpoint(path: str, *, dtype: Any, verbose: bool = True, **overrides: Any
                    ) -> tuple[TinyLlava, dict[str, Any], dict[str, Any] | None]:
    """A converted checkpoint directory -> ``(model, base params, quantizer projections or None)``.

    An official Quantized-TinyLLaVA checkpoint (layout ``quantized_tinyllava``, told by its tensor names)
    gives its base model and, separately, its ``{'image', 'text'}`` quantizer projections; any other
    layout gives None for them. ``overrides`` go to ``load_pretrained`` (``max_length``, ``remat``, ...).
    """
    from qtl_jax.weights import layouts, loader, safetensors_io

    official = layouts.detect(safetensors_io.read_dir(path), where=path).name == "quantized_tinyllava"
    model, params = loader.load_pretrained(path, dtype=dtype, drop_quantizer=official, verbose=verbose, **overrides)
    return model, params, loader.load_quantizer_params(path) if official else None


def _tokenizer(config: ml_collections.ConfigDict, m: Mapping[str, Any]) -> Any:
    if config.data.kind == "shapes":
        return shapes_tokenizer.build_shapes_tokenizer(model_max_length=m["max_length"])
    from transformers import AutoTokenizer

    tok_dir = m.get("tokenizer_dir") or config.init.checkpoint or m.get("llm_dir")
    return AutoTokenizer.from_pretrained(check_dir(tok_dir, "model.tokenizer_dir", "the tokenizer"))


def build_setup(config: ml_collections.ConfigDict, workdir: str, key: jax.Array, *, data: bool = True) -> Setup:
    """Tokenizer, model config, base weights and (``data``) data directory, with clear errors for missing paths.

    ``key`` initialises a fresh connector over component checkpoints (:func:`seed_keys`' second key).
    """
    m = model_section(config)
    from_workdir = bool(config.init.from_workdir)
    pretrained = quantizer_params = None
    overrides = dict(max_length=m["max_length"], remat=bool(m["remat"]))

    # Paths first, so a missing one is reported before anything slow happens.
    if config.init.checkpoint:
        check_dir(config.init.checkpoint, "init.checkpoint", "initialising from a converted checkpoint")
    elif m["source"] == "components":
        check_dir(m.get("vision_dir"), "model.vision_dir", "model.source='components' (the vision tower)")
        check_dir(m.get("llm_dir"), "model.llm_dir", "model.source='components' (the LLM)")
    if data and config.data.kind == "llava":
        check_dir(config.data.dataset_dir, "data.dataset_dir",
                  "data.kind='llava' (a dataset built by python -m qtl_jax.data.llava_tfds)")
    tokenizer = _tokenizer(config, m)

    # The base model and its weights.
    base = None
    if config.init.checkpoint:
        model, pretrained, quantizer_params = load_checkpoint(config.init.checkpoint, dtype=m["dtype"], **overrides)
        base = model.config
    elif m["source"] == "components":
        from qtl_jax.weights import loader

        model, pretrained = loader.load_pretrained(
            vision_dir=m["vision_dir"], llm_dir=m["llm_dir"], key=key, connector_type=m["connector_type"],
            vision_feature_layer=m["vision_feature_layer"], vision_feature_select_strategy=m["vision_feature_select_strategy"],
            dtype=m["dtype"], **overrides,
        )
        base = model.config
        if from_workdir:
            pretrained = None  # every weight comes from the previous stage's checkpoint
    elif m["source"] != "random":
        raise ValueError(f"model.source={m['source']!r}: use 'components' (vision_dir + llm_dir) or 'random'.")
    built = builder.build_model(m, config.quantizer.to_dict(), vocab_size=len(tokenizer), base=base)
    if built.config.model.llm.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM only "
                         f"{built.config.model.llm.vocab_size} embeddings.")
    dataset_dir = data_dir = None
    if data:
        dataset_dir, data_dir = _prepare_data(config, workdir, built.config.model.vision.image_size)
    return Setup(built.config, tokenizer, built.image_processor, pretrained, quantizer_params, dataset_dir, data_dir)


def _prepare_data(config: ml_collections.ConfigDict, workdir: str, image_size: int) -> tuple[str, str]:
    data_dir = config.data.data_dir or os.path.join(workdir, "data")
    previous_data = os.path.join(config.init.from_workdir or "", "data")
    if not config.data.data_dir and config.data.kind == "shapes" and config.init.from_workdir \
            and os.path.isdir(previous_data):
        data_dir = previous_data  # the previous stage prepared both shapes streams there
    if config.data.kind == "shapes":
        from qtl_jax.data import llava_tfds

        s = config.data.shapes
        dirs = on_main_first(lambda: llava_tfds.prepare_shapes_tfds(
            data_dir, seed=s.seed, n_pretrain=s.n_pretrain, n_instruct=s.n_instruct, image_size=image_size,
            text_only_fraction=s.text_only_fraction, probe_fraction=s.probe_fraction, probe_turns=int(s.probe_turns),
            probe_formats=str(s.probe_formats),
            blank=bool(s.blank)))
        if s.stream not in dirs:
            raise ValueError(f"data.shapes.stream={s.stream!r}: use one of {sorted(dirs)}.")
        return dirs[s.stream], data_dir
    if config.data.kind == "llava":
        return check_dir(config.data.dataset_dir, "data.dataset_dir",
                         "data.kind='llava' (a dataset built by python -m qtl_jax.data.llava_tfds)"), data_dir
    raise ValueError(f"data.kind={config.data.kind!r}: use 'llava' or 'shapes'.")


def on_main_first(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on process 0, then on the others (which then find its output): shared files are built once."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("qtl_jax: data prepared")
    return out if jax.process_index() == 0 else fn()


def create_state(config: ml_collections.ConfigDict, setup: Setup, meshes: SplitMeshes, total_steps: int,
                 clients: int = 1) -> steplib.TrainState:
    """The state drawn from ``config.seed`` (base weights copied in), each partition on its own mesh.

    With downlink error feedback (``split.downlink_error_feedback``) the server partition's ``batch_stats``
    hold a zero residual for each of ``clients`` clients (:func:`qtl_jax.split.downlink.initial_residual`).
    """
    k_state, _ = seed_keys(config)
    state = steplib.create_train_state(setup.model, k_state, meshes, config.optimizer.to_dict(), total_steps,
                                       setup.pretrained, sharding_rules=list(config.sharding))
    return _with_residual(config, setup, meshes, state, clients)


def _residual(config: ml_collections.ConfigDict, setup: Setup, clients: int) -> dict[str, Any]:
    m = setup.model.model
    return downlink.initial_residual(downlink.DownlinkSpec.from_config(config.split, int(config.seed)),
                                     int(config.global_batch_size), int(m.num_image_tokens), int(m.max_length),
                                     int(m.llm.hidden_size), clients)


def _with_residual(config: ml_collections.ConfigDict, setup: Setup, meshes: SplitMeshes,
                   state: steplib.TrainState, clients: int) -> steplib.TrainState:
    residual = _residual(config, setup, clients)
    if residual and jax.tree_util.tree_leaves(state.server.params):
        stats = jax.device_put(residual, replicated(meshes.server))
        state = state.replace(server=state.server.replace(batch_stats=stats))
    return state


def abstract_state(config: ml_collections.ConfigDict, setup: Setup, meshes: SplitMeshes, total_steps: int,
                   clients: int = 1) -> steplib.TrainState:
    """:func:`create_state`'s result as ``jax.ShapeDtypeStruct``s with its shardings; nothing is computed.

    The template to restore a checkpoint into and to build the optimizers from: at the paper's size the
    random initialisation :func:`create_state` runs takes minutes to compile and holds a full second copy of
    the parameters next to the restored ones.
    """
    k_state, _ = seed_keys(config)
    state = steplib.abstract_train_state(setup.model, k_state, meshes, config.optimizer.to_dict(), total_steps,
                                         sharding_rules=list(config.sharding))
    residual = _residual(config, setup, clients)
    if residual:
        rep = replicated(meshes.server)
        stats = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), residual)
        state = state.replace(server=state.server.replace(batch_stats=stats))
    return state


def initial_state(config: ml_collections.ConfigDict, setup: Setup, meshes: SplitMeshes, total_steps: int,
                  clients: int = 1, log: Callable[[str], None] = print,
                  partitions: tuple[str, ...] = steplib.PARTITIONS) -> steplib.TrainState:
    """A fresh run's state at step 0; only ``partitions`` are built (the others come back empty).

    From a previous stage (``init.from_workdir``) the params are restored straight into their shardings and
    the random initialisation never runs (:func:`abstract_state`); the optimizer states start at zero.
    Otherwise :func:`create_state` then :func:`with_initial_params`.
    """
    empty = steplib.PartitionState({}, {}, {})
    keep = lambda s: s.replace(**{n: empty for n in steplib.PARTITIONS if n not in partitions})  # noqa: E731
    if not config.init.from_workdir or config.init.get("dont_load"):
        # init.dont_load keeps some leaves from the random initialisation, so that has to run.
        return keep(with_initial_params(config, setup, create_state(config, setup, meshes, total_steps, clients), log))
    like = keep(abstract_state(config, setup, meshes, total_steps, clients))
    client, server, stats, step = ckptlib.restore_params(config.init.from_workdir, like)
    log(f"qtl_jax: initialised from {config.init.from_workdir} step {step}")
    k_state, _ = seed_keys(config)
    optimizers = steplib.make_split_optimizers(config.optimizer.to_dict(), total_steps,
                                               {"client": like.client.params, "server": like.server.params})
    state = steplib.train_state_from_params({"client": client, "server": server}, stats, k_state, meshes, optimizers)
    return _with_residual(config, setup, meshes, state, clients)


def with_initial_params(config: ml_collections.ConfigDict, setup: Setup, state: steplib.TrainState,
                        log: Callable[[str], None] = print) -> steplib.TrainState:
    """A fresh run's params: the previous stage's (init.from_workdir) or HF quantizer projections, if any."""
    if config.init.from_workdir:
        dont_load = tuple(config.init.get("dont_load") or ())
        client, server, stats, step = ckptlib.restore_params(config.init.from_workdir, state, dont_load=dont_load)
        log(f"qtl_jax: initialised from {config.init.from_workdir} step {step}"
            + (f", except {', '.join(dont_load)} (initialised afresh)" if dont_load else ""))
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
