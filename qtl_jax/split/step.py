"""The split train step (client and server programs on their own sub-meshes), the fused step, the state.

Split mode runs three jit-compiled programs per step:

1. client, on the client mesh: forward to the codes, keeping ``jax.vjp``'s backward function (its
   residuals stay on the client devices; the function is a pytree, so it leaves this program and
   enters program 3);
2. server, behind a :class:`~qtl_jax.split.link.ServerHalf` (on the server sub-mesh of this process, or
   in a server process over gRPC), from the integer codes, masks and labels: cross-entropy, gradients
   for the server params *and* for the dequantized values (the cotangents d loss / d z_hat), the server
   optimizer update;
3. client again: the backward function applied to (the cotangents the server half returned, 1 for the
   distortion loss) -> client gradients -> the client optimizer update.

The three bodies are public (:func:`client_begin_fn`, :func:`server_update_fn`, :func:`client_finish_fn`)
so that a client and a server in separate processes run exactly these computations.

Fused mode is one program computing CE + distortion through the straight-through estimator, with the
same parameter trees and the same per-partition optimizers, so the two modes compute the same update
(``tests/test_split_step.py`` proves it across device counts).

Parameters frozen by the optimizer config are ``stop_gradient``-ed before the forward, so neither mode
computes or keeps residuals for their backward (the vision tower and, in stage 1, the LLM weights).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtl_jax import optimizer as optlib
from qtl_jax.models import cross_entropy
from qtl_jax.models import quantized as qm
from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.models.quantized import QuantizedTinyLlavaConfig
from qtl_jax.split.link import PENDING_COUNTS, InProcessServerHalf, ServerHalf
from qtl_jax.split.mesh import SplitMeshes, batch_sharding, on_batch_sharding, param_shardings, replicated

PARTITIONS = ("client", "server")
MODES = ("split", "fused")


@flax.struct.dataclass
class PartitionState:
    """One side's params, optimizer state and (client) quantizer running statistics."""

    params: Any
    opt_state: Any
    batch_stats: Any


@flax.struct.dataclass
class TrainState:
    """``step`` (int32), the two partitions and ``rng``.

    The model has no stochastic layers; ``rng`` is carried (and checkpointed) so that adding one (e.g.
    dropout) keeps runs reproducible without changing the state layout.
    """

    step: jax.Array
    client: PartitionState
    server: PartitionState
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class SplitOptimizers:
    """Each partition's optimizer, and which of its leaves are frozen (True = no gradient computed)."""

    client: optax.GradientTransformation
    server: optax.GradientTransformation
    client_frozen: Any
    server_frozen: Any

    def of(self, partition: str) -> optax.GradientTransformation:
        return getattr(self, partition)

    def frozen(self, partition: str) -> Any:
        return getattr(self, f"{partition}_frozen")


def _under(name: str, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` built over ``{name: params}`` applied to the bare partition tree (rules see full paths)."""

    def init(params):
        return tx.init({name: params})

    def update(updates, state, params=None):
        wrapped = None if params is None else {name: params}
        new, state = tx.update({name: updates}, state, wrapped)
        return new[name], state

    return optax.GradientTransformation(init, update)


def make_split_optimizers(optimizer_config: Mapping[str, Any], total_steps: int, params: Mapping[str, Any]) -> SplitOptimizers:
    """Per-partition optimizers from one ``optimizer`` config whose rules use full paths.

    ``params``: ``{'client': ..., 'server': ...}`` (arrays or ShapeDtypeStructs). ``param_groups`` and
    ``no_decay`` regexes are matched against ``client/...`` and ``server/...`` paths, e.g.
    ``('client/vision_tower/.*', 'frozen')``; each partition gets its own optimizer over its own leaves.
    """
    txs, frozen = {}, {}
    for name in PARTITIONS:
        tree = {name: params[name]}
        # Validates that every leaf is covered by a rule (an error names the uncovered paths).
        labels = optlib.param_labels(tree, optimizer_config)
        frozen[name] = jax.tree_util.tree_map(lambda lab: lab == optlib.FROZEN, labels)[name]
        txs[name] = _under(name, optlib.make_optimizer(optimizer_config, total_steps, tree))
    return SplitOptimizers(txs["client"], txs["server"], frozen["client"], frozen["server"])


def partition_shardings(params: Any, mesh, sharding_rules: Sequence[tuple[str, Any]], partition: str) -> Any:
    """NamedShardings for one partition's params from rules written against full ``client/...`` paths."""
    return param_shardings({partition: params}, mesh, list(sharding_rules))[partition]


# Compiled once per config (eager initialisation dispatches thousands of small ops).
init_params_jit = jax.jit(qm.init_split_params, static_argnums=0)


def create_train_state(
    config: QuantizedTinyLlavaConfig,
    key: jax.Array,
    meshes: SplitMeshes,
    optimizer_config: Mapping[str, Any],
    total_steps: int,
    pretrained: Mapping[str, Any] | None = None,
    *,
    sharding_rules: Sequence[tuple[str, Any]] = (),
) -> TrainState:
    """Initial state: params from :func:`qm.init_split_params`, each partition placed on its own mesh.

    ``sharding_rules`` (``(regex, 'fsdp' | 'replicate' | spec)`` over ``client/...``/``server/...``
    paths) lay the params out on each sub-mesh's ``fsdp`` axis; optimizer moments follow their params.
    """
    k_init, _ = jax.random.split(key)
    params, batch_stats = init_params_jit(config, k_init, None if pretrained is None else dict(pretrained))
    optimizers = make_split_optimizers(optimizer_config, total_steps, params)
    placed = {name: jax.device_put(params[name], partition_shardings(params[name], getattr(meshes, name),
                                                                      sharding_rules, name))
              for name in PARTITIONS}
    del params  # (the unplaced copy: on one device device_put aliases it, elsewhere it is freed here)
    return train_state_from_params(placed, batch_stats, key, meshes, optimizers)


def train_state_from_params(params: Mapping[str, Any], batch_stats: Any, key: jax.Array, meshes: SplitMeshes,
                            optimizers: SplitOptimizers) -> TrainState:
    """The state of step 0 over ``params`` (``{'client', 'server'}``, already placed on their meshes): fresh
    optimizer states, ``batch_stats`` (the client's quantizer statistics), the rng :func:`create_train_state`
    draws from ``key``. A partition whose params are empty stays empty."""
    _, k_rng = jax.random.split(key)
    parts = {}
    for name in PARTITIONS:
        mesh, p = getattr(meshes, name), params[name]
        if not jax.tree_util.tree_leaves(p):
            parts[name] = PartitionState({}, {}, {})
            continue
        # jit so the moments are created on the params' devices with the params' layout; leaves that do
        # not depend on a param (step counts) come out on the default device and are replicated instead.
        opt_state = _onto(jax.jit(optimizers.of(name).init)(p), mesh)
        stats = jax.device_put(batch_stats if name == "client" else {}, replicated(mesh))
        parts[name] = PartitionState(p, opt_state, stats)
    rep = replicated(meshes.client)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), rep),
        client=parts["client"],
        server=parts["server"],
        rng=jax.device_put(k_rng, rep),
    )


def abstract_train_state(config: QuantizedTinyLlavaConfig, key: jax.Array, meshes: SplitMeshes,
                         optimizer_config: Mapping[str, Any], total_steps: int, *,
                         sharding_rules: Sequence[tuple[str, Any]] = ()) -> TrainState:
    """:func:`create_train_state`'s result as ``jax.ShapeDtypeStruct``s with the same shardings, traced only:
    nothing is initialised, compiled or allocated. The template a checkpoint is restored into (the random
    initialisation at the paper's size takes minutes to compile and a second copy of every parameter)."""
    params, batch_stats = jax.eval_shape(lambda k: qm.init_split_params(config, k), key)
    optimizers = make_split_optimizers(optimizer_config, total_steps, params)
    parts = {}
    for name in PARTITIONS:
        mesh = getattr(meshes, name)
        p = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params[name],
                                   partition_shardings(params[name], mesh, sharding_rules, name))
        # Traced moments carry the params' specs on an abstract mesh; the rest (step counts) is replicated,
        # as _onto places them.
        opt_state = jax.tree_util.tree_map(lambda x: _on(x, mesh), jax.jit(optimizers.of(name).init).eval_shape(p))
        stats = jax.tree_util.tree_map(lambda x: _on(x, mesh), batch_stats if name == "client" else {})
        parts[name] = PartitionState(p, opt_state, stats)
    rep = replicated(meshes.client)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), client=parts["client"],
                      server=parts["server"], rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))


def _on(x: jax.ShapeDtypeStruct, mesh) -> jax.ShapeDtypeStruct:
    # A traced sharding lives on an abstract mesh: its spec on the partition's concrete mesh; none: replicated.
    sharding = replicated(mesh) if x.sharding is None else jax.sharding.NamedSharding(mesh, x.sharding.spec)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _onto(tree: Any, mesh) -> Any:
    # Uncommitted leaves (jit outputs that depend on no committed input, e.g. the moments' zeros on a
    # one-device mesh) are committed here: the step's outputs are committed, and a state whose
    # commitment changes after the first step would make jit compile the whole step a second time.
    devices = set(mesh.devices.flat)
    return jax.tree_util.tree_map(
        lambda x: x if x.committed and set(x.devices()) == devices else jax.device_put(x, replicated(mesh)), tree
    )


def without_frozen(params: Any, frozen: Any) -> Any:
    """``params`` with the leaves ``frozen`` marks cut from the gradient (no backward computed or kept)."""
    return jax.tree_util.tree_map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def _apply(tx: optax.GradientTransformation, part: PartitionState, grads: Any, batch_stats: Any) -> PartitionState:
    updates, opt_state = tx.update(grads, part.opt_state, part.params)
    return PartitionState(optax.apply_updates(part.params, updates), opt_state, batch_stats)


def _shardings(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def device_batch(batch: Mapping[str, Any], mesh) -> dict[str, jax.Array]:
    """The model's inputs of ``batch`` on ``mesh``, batch dimension split over its devices. Arrays already
    there stay where they are (no copy back to the host): a batch can be put on the devices once, ahead of
    its step."""
    return {k: on_batch_sharding(batch[k], mesh) for k in qm.batch_keys(batch)}


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A step's metrics as Python numbers (integers stay integers) with ``loss``; waits for the step's
    programs to produce them. The step does this itself unless built with ``defer_metrics``."""
    out = {k: v if isinstance(v, int) else float(v) for k, v in jax.device_get(dict(metrics)).items()}
    out["loss"] = out["ce"] + out["dist_image"] + out["dist_text"]
    return out


def make_train_step(
    config: QuantizedTinyLlavaConfig,
    meshes: SplitMeshes,
    optimizers: SplitOptimizers,
    *,
    mode: str = "split",
    server: ServerHalf | None = None,
    check_batches: bool = True,
    defer_counts: bool = False,
    defer_metrics: bool = False,
) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, float]]]:
    """``step(state, batch) -> (state, metrics)``; ``batch`` is a dict of host numpy arrays, row i = sample i.

    ``mode='split'``: a :class:`SplitStep`, the client programs of the module docstring with the server
    half behind ``server`` (default: an :class:`InProcessServerHalf` running :func:`server_update_fn` on
    ``meshes.server``, measuring bytes every step). ``mode='fused'``: one program; both partitions must
    live on the same mesh (``split_meshes(0, 0)``). The state passed in is donated.

    Metrics (Python numbers): ``loss`` (= ``ce`` + ``dist_image`` + ``dist_text``), ``ce``, ``dist_*``
    (weighted distortion losses), ``entropy_*`` (bits), ``usage_*`` (fraction of levels used),
    ``clip_rate_*``, ``mse_*``, ``tokens`` (real merged positions), ``target_tokens``, ``examples``
    and, when the server half measured this step, the integer byte counts
    ``uplink_bytes_{fp16,packed,ans,side}``, ``uplink_bytes``, ``uplink_values`` and ``downlink_bytes``
    (a remote server half adds ``wire_*``). A server half measuring in the background
    (``InProcessServerHalf(codec_threads=n)``) codes the step's messages while the server and client
    programs run; the step waits for the counts at its end, or, with ``defer_counts``, returns their
    :class:`~qtl_jax.split.meter.Pending` under ``link.PENDING_COUNTS`` for the caller to merge later
    (``link.with_counts``), so that the coding also overlaps the next step's programs.

    ``defer_metrics``: the metrics come back as the devices' arrays, without ``loss``, and the step never
    waits for its programs; :func:`host_metrics` turns them into numbers later. Reading them at once would
    keep the host from queuing the next step until this one's programs have run (the training loop reads
    each step's metrics after queuing the next; the devices then never wait for the host between steps).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}.")
    if mode == "fused":
        if server is not None:
            raise ValueError("mode='fused' runs one program and moves nothing: do not pass a server half.")
        if set(meshes.client.devices.flat) != set(meshes.server.devices.flat):
            raise ValueError(
                "mode='fused' runs one program on one mesh, but the client and server meshes use different "
                "devices; build them with split_meshes(0, 0) (both sides share all devices)."
            )
        return _fused_step(config, meshes, optimizers, check_batches, defer_metrics)
    if server is None:
        server = InProcessServerHalf(meshes, server_update_fn(config, optimizers))
    return SplitStep(config, meshes, optimizers, server, check_batches, defer_counts, defer_metrics)


def client_begin_fn(config: QuantizedTinyLlavaConfig, optimizers: SplitOptimizers) -> Callable:
    """Program 1: ``(client: PartitionState, batch) -> (Uplink, backward, metrics, batch_stats)``.

    ``backward`` is ``jax.vjp``'s function of the client params (a pytree holding the residuals): feed it
    to :func:`client_finish_fn`'s program. Pure and traceable; jit it on the client's devices.
    """

    def client_begin(client: PartitionState, batch):
        def forward(params):
            # Inside the differentiated function: outside it, jax.vjp would see fresh inputs and keep the
            # frozen tower's activations (17.8 GB at the paper's shapes, batch 4) for a gradient never used.
            params = without_frozen(params, optimizers.client_frozen)
            out = qm.client_forward(config, params, client.batch_stats, batch, train=True)
            return (out.z, out.loss), (out.uplink, out.metrics, out.batch_stats)

        _, backward, (uplink, metrics, batch_stats) = jax.vjp(forward, client.params, has_aux=True)
        return uplink, backward, metrics, batch_stats

    return client_begin


def server_update_fn(config: QuantizedTinyLlavaConfig, optimizers: SplitOptimizers) -> Callable:
    """Program 2: ``(server: PartitionState, uplink) -> (server, Downlink, metrics)`` from the codes alone.

    Cross-entropy from the dequantized codes, gradients for the server params and for the dequantized
    values (the Downlink), the server optimizer update. Pure and traceable; jit it on the server's devices.
    """

    def server_update(server: PartitionState, uplink: Uplink):
        values = qm.server_values(config, uplink)

        def loss(params, values):
            return qm.server_loss_from_values(config, without_frozen(params, optimizers.server_frozen), values, uplink)

        (_, metrics), (grads, cot) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(server.params, values)
        down = Downlink(image_grad=cot["image"], text_grad=cot["text"])
        return _apply(optimizers.server, server, grads, server.batch_stats), down, metrics

    return server_update


def client_finish_fn(optimizers: SplitOptimizers) -> Callable:
    """Program 3: ``(client, backward, downlink, batch_stats) -> client``: the rest of the backward pass
    (the downlink as the cotangents of z, 1 for the distortion loss) and the client optimizer update."""

    def client_finish(client: PartitionState, backward, down: Downlink, batch_stats):
        (grads,) = backward(({"image": down.image_grad, "text": down.text_grad}, jnp.ones((), down.image_grad.dtype)))
        return _apply(optimizers.client, client, grads, batch_stats)

    return client_finish


class SplitStep:
    """``step(state, batch) -> (state, metrics)`` of split mode: the client programs here, the server half
    behind ``server``.

    The two client programs are compiled on the first call; ``server`` may be replaced between steps (a
    new connection) without recompiling them. With a server half ``in_process`` (an
    :class:`InProcessServerHalf`) the state holds both partitions and the server's comes back updated; with
    a remote one the state's server partition stays as given (empty: it lives in the server process).
    ``defer_counts``, ``defer_metrics``: see :func:`make_train_step`.

    ``time_programs`` (attribute, default False): wait for each part of the step before starting the next and
    add their wall times to the metrics: ``time_client_begin_s`` (the batch onto the devices and program 1),
    ``time_exchange_s`` (the server half: program 2 in process, or the network round trip) and
    ``time_client_finish_s`` (program 3). For finding where a step's time goes; the waits remove the overlap
    between the parts, so the step itself gets slower.
    """

    def __init__(self, config: QuantizedTinyLlavaConfig, meshes: SplitMeshes, optimizers: SplitOptimizers,
                 server: ServerHalf, check_batches: bool = True, defer_counts: bool = False,
                 defer_metrics: bool = False):
        self.config, self.meshes, self.server, self.check_batches = config, meshes, server, check_batches
        self.defer_counts, self.defer_metrics = defer_counts, defer_metrics
        self.time_programs = False
        begin_fn = client_begin_fn(config, optimizers)
        finish_fn = client_finish_fn(optimizers)

        def client_begin(client: PartitionState, batch):
            uplink, backward, metrics, batch_stats = begin_fn(client, batch)
            uplink = jax.tree_util.tree_map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(meshes.client, x.ndim)), uplink)
            return uplink, backward, metrics, batch_stats

        def client_finish(client: PartitionState, backward, down: Downlink, batch_stats, step):
            return finish_fn(client, backward, down, batch_stats), step + 1

        self._begin_fn, self._finish_fn = client_begin, client_finish
        self._begin = self._finish = None
        # The step counter this object last returned and its value: reading a returned counter back from the
        # device would wait for the whole previous step, so the next one could not be queued behind it.
        self._returned_step: tuple[Any, int] | None = None

    def _compile(self, state: TrainState) -> None:
        self._begin = jax.jit(self._begin_fn)
        # The backward function's residuals are not donated: XLA cannot reuse them for the outputs.
        self._finish = jax.jit(self._finish_fn, out_shardings=(_shardings(state.client), state.step.sharding),
                               donate_argnums=0)

    def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, float]]:
        if self.check_batches:
            qm.check_batch(self.config, batch)
        if self._begin is None:
            self._compile(state)
        client_mesh = self.meshes.client
        returned = self._returned_step
        step_id = returned[1] if returned is not None and returned[0] is state.step else int(jax.device_get(state.step))
        times = {}
        t0 = time.perf_counter()

        def lap(name: str, outputs: Any) -> None:
            nonlocal t0
            if self.time_programs:
                jax.block_until_ready(outputs)
                now = time.perf_counter()
                times[f"time_{name}_s"], t0 = now - t0, now

        uplink, backward, c_metrics, batch_stats = self._begin(state.client, device_batch(batch, client_mesh))
        lap("client_begin", (uplink, backward, batch_stats))
        local = self.server.in_process
        if local:
            self.server.state = state.server
        try:
            down, s_metrics = self.server.exchange(step_id, uplink)
            server = self.server.state if local else state.server
        finally:
            if local:  # the returned TrainState holds it (and the one given was donated)
                self.server.state = None
        down = jax.tree_util.tree_map(lambda x: on_batch_sharding(x, client_mesh), down)
        lap("exchange", (down, server))
        client, new_step = self._finish(state.client, backward, down, batch_stats, state.step)
        lap("client_finish", client)
        self._returned_step = (new_step, step_id + 1)
        s_metrics = dict(s_metrics)
        pending = s_metrics.pop(PENDING_COUNTS, None)
        metrics = {**c_metrics, **s_metrics}
        if not self.defer_metrics:
            metrics = host_metrics(metrics)
        metrics.update(times)
        if pending is not None:
            if self.defer_counts:
                metrics[PENDING_COUNTS] = pending
            else:
                metrics.update(pending.result())
        return TrainState(new_step, client, server, state.rng), metrics


def _fused_step(config, meshes: SplitMeshes, optimizers: SplitOptimizers, check_batches: bool,
                defer_metrics: bool = False):
    programs: dict[str, Any] = {}

    def fused(state: TrainState, batch):
        def loss(cp, sp):
            cp = without_frozen(cp, optimizers.client_frozen)
            sp = without_frozen(sp, optimizers.server_frozen)
            out = qm.client_forward(config, cp, state.client.batch_stats, batch, train=True)
            values = {m: qm.straight_through(out.z[m], getattr(out.uplink, f"{m}_codes"), config.levels(m))
                      for m in qm.MODALITIES}
            ce, s_metrics = qm.server_loss_from_values(config, sp, values, out.uplink)
            return ce + out.loss, (out.metrics, s_metrics, out.batch_stats)

        grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, (c_metrics, s_metrics, batch_stats)), (g_c, g_s) = grad_fn(state.client.params, state.server.params)
        client = _apply(optimizers.client, state.client, g_c, batch_stats)
        server = _apply(optimizers.server, state.server, g_s, state.server.batch_stats)
        return TrainState(state.step + 1, client, server, state.rng), c_metrics, s_metrics

    def step(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, float]]:
        if check_batches:
            qm.check_batch(config, batch)
        if not programs:
            sh = _shardings(state)
            programs["fused"] = jax.jit(fused, out_shardings=(sh, None, None), donate_argnums=0)
        state, c_metrics, s_metrics = programs["fused"](state, device_batch(batch, meshes.client))
        metrics = {**c_metrics, **s_metrics}
        return state, (metrics if defer_metrics else host_metrics(metrics))

    return step


def make_eval_step(config: QuantizedTinyLlavaConfig, meshes: SplitMeshes) -> Callable[[TrainState, Mapping[str, Any]], dict]:
    """``eval_step(state, batch) -> {'logits', 'attention_mask', 'labels', 'ce'}`` with the quantizers in place.

    The client program encodes (``train=False``: ema quantizers use their running statistics), the codes
    move to the server mesh, the server decodes them to logits ``[B, L, V]`` (merged coordinates, like
    ``attention_mask`` and ``labels``). Works for split and shared meshes alike; nothing is measured.
    """

    @jax.jit
    def client(part: PartitionState, batch):
        return qm.client_forward(config, part.params, part.batch_stats, batch, train=False).uplink

    @jax.jit
    def server(part: PartitionState, uplink: Uplink):
        values = qm.server_values(config, uplink)
        logits, layout = qm.server_logits(config, part.params, values, uplink)
        ce, _ = cross_entropy.from_logits(logits, layout.labels)
        return {"logits": logits, "attention_mask": layout.attention_mask, "labels": layout.labels, "ce": ce}

    def eval_step(state: TrainState, batch: Mapping[str, Any]) -> dict:
        qm.check_batch(config, batch)
        uplink = client(state.client, device_batch(batch, meshes.client))
        uplink = jax.tree_util.tree_map(lambda x: on_batch_sharding(x, meshes.server), uplink)
        return server(state.server, uplink)

    return eval_step
