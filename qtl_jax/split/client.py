r"""The split-learning client: holds the client partition (vision tower, connector, token embeddings,
quantizer encoders), the private data and its optimizer; the server partition is behind a :class:`GrpcLink`.

Per step (:class:`ClientStep`): ``client_begin`` (forward to the integer codes, keeping ``jax.vjp``'s
backward function on this side), the codes go up, ∂loss/∂ẑ comes down, ``client_finish`` (backward and
the client optimizer update). These are the client halves of :func:`qtl_jax.split.step.make_train_step`,
so a network run computes what an in-process split run computes (``tests/test_grpc_split.py``).

Command line (the same training config as ``train.py``; network options are flags)::

    python -m qtl_jax.split.client --config=configs/stage1.py:tiny --workdir=/tmp/qtl_client \
        --address=127.0.0.1:50051 --tls=mutual --ca_cert=pki/ca.pem --cert=pki/client.pem --key=pki/client.key

The client writes ``metrics.jsonl`` (``qtl_jax.train.metrics_log``: loss, CE, distortion, code usage,
theoretical bytes ``uplink_bytes_{fp16,packed,ans}``/``downlink_bytes`` and the bytes measured on the
wire ``wire_uplink_bytes``/``wire_downlink_bytes``) and at the end ``wire_summary.json`` (totals and per
sample). It checkpoints its own state (Orbax, ``checkpoints/``) every ``checkpoint_every`` steps; on a
restart (either side) it joins the server, the side that is ahead rewinds to its checkpoint of the other's
step, and the run continues.
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
import numpy as np

from qtl_jax.models import quantized as qm
from qtl_jax.split import mesh as meshlib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.grpc_link import GrpcLink, StepMismatchError
from qtl_jax.split.link import Downlink

# Summed over the run in wire_summary.json (per step in metrics.jsonl).
BYTE_KEYS = ("wire_uplink_bytes", "wire_downlink_bytes", "uplink_bytes", "uplink_bytes_packed", "uplink_bytes_ans",
             "uplink_bytes_fp16", "uplink_bytes_side", "downlink_bytes", "uplink_values")


class ClientStep:
    """``step(state, batch) -> (state, metrics)`` for a state whose ``client`` partition is this side's.

    The two client programs are compiled once per object; ``link`` may be replaced between steps (a new
    connection) without recompiling.
    """

    def __init__(self, config: qm.QuantizedTinyLlavaConfig, mesh, optimizers: steplib.SplitOptimizers,
                 link: GrpcLink):
        self.config, self.mesh, self.link = config, mesh, link

        # The same programs as the in-process split step, so a network run computes what it computes.
        finish = steplib.client_finish_fn(optimizers)

        def client_finish(client: steplib.PartitionState, backward, down: Downlink, batch_stats, step):
            return finish(client, backward, down, batch_stats), step + 1

        self._begin = jax.jit(steplib.client_begin_fn(config, optimizers))
        self._finish = jax.jit(client_finish, donate_argnums=0)

    def _put(self, x):
        return jax.device_put(np.asarray(x), meshlib.batch_sharding(self.mesh, np.ndim(x)))

    def __call__(self, state: steplib.TrainState, batch: Mapping[str, Any]) -> tuple[steplib.TrainState, dict[str, float]]:
        qm.check_batch(self.config, batch)
        step_id = int(jax.device_get(state.step))
        device_batch = {k: self._put(batch[k]) for k in qm.BATCH_KEYS}
        uplink, backward, c_metrics, batch_stats = self._begin(state.client, device_batch)
        self.link.uplink(step_id, uplink)
        down = jax.tree_util.tree_map(self._put, self.link.downlink(step_id))
        client, new_step = self._finish(state.client, backward, down, batch_stats, state.step)
        metrics = {k: float(v) for k, v in jax.device_get(c_metrics).items()}
        metrics.update(self.link.server_metrics.pop(step_id, {}))
        metrics["loss"] = metrics["ce"] + metrics["dist_image"] + metrics["dist_text"]
        metrics.update(self.link.take_counts(step_id))
        return state.replace(client=client, step=new_step), metrics


def make_client_step(config: qm.QuantizedTinyLlavaConfig, mesh, optimizers: steplib.SplitOptimizers,
                     link: GrpcLink) -> ClientStep:
    """The client half of the split step over ``link`` (see :class:`ClientStep`)."""
    return ClientStep(config, mesh, optimizers, link)


# ---------------------------------------------------------------------------------------------------
# Building one side from a training config


def _model_only(config) -> qm.QuantizedTinyLlavaConfig:
    """The model of a ``model.source='random'`` shapes config without touching data (the server's case)."""
    from qtl_jax.data.shapes import tokenizer as shapes_tokenizer
    from qtl_jax.models.decoder import dtype_from_name
    from qtl_jax.quantizer import QuantizerConfig
    from qtl_jax.train import loop

    m = config.model.to_dict()
    tokenizer = shapes_tokenizer.build_shapes_tokenizer(model_max_length=m["max_length"])
    tcfg = dataclasses.replace(loop._random_tinyllava(m, len(tokenizer)), dtype=dtype_from_name(m["dtype"]),
                               max_length=m["max_length"], remat=bool(m["remat"]))
    q = config.quantizer
    d = tcfg.llm.hidden_size
    qcfgs = [QuantizerConfig(dim=d, levels=q.levels, scaling=q.scaling, bound=q.bound, dist_weight=q.dist_weight,
                             clip_sigma=q.clip_sigma, ema_momentum=q.ema_momentum, dtype=tcfg.dtype) for _ in range(2)]
    return qm.QuantizedTinyLlavaConfig(model=tcfg, image_quantizer=qcfgs[0], text_quantizer=qcfgs[1])


def build_side(config, side: str, workdir: str | None = None, schedule_steps: int | None = None):
    """``(model, meshes, state, optimizers, geometry[, setup])`` of one side, initialised as ``train.py`` does.

    Both sides draw the full initial state from ``config.seed`` and keep only their own partition (the
    other is empty), so both start from the parameters an in-process run starts from. The server needs
    no data for a random-init shapes config; other model sources go through the training setup.
    ``schedule_steps``: the optimizer schedule's length (default ``total_steps``; a server with several
    clients applies ``total_steps`` per client).
    """
    from qtl_jax.train import loop

    if side not in ("client", "server"):
        raise ValueError(f"side={side!r}: use 'client' or 'server'.")
    if int(config.total_steps) <= 0:
        raise ValueError("network split runs need a fixed --config.total_steps (both sides build the same "
                         "learning-rate schedule from it).")
    key = jax.random.key_data(jax.random.key(int(config.seed)))
    k_state, k_setup = jax.random.split(key)
    setup = None
    if side == "server" and config.model.source == "random" and not config.init.from_workdir \
            and not config.init.checkpoint and config.data.kind == "shapes":
        model, pretrained = _model_only(config), None
    else:
        setup = loop.build_setup(config, workdir or os.path.join("/tmp", f"qtl_{side}"), k_setup)
        model, pretrained = setup.model, setup.pretrained
    mc = config.mesh
    meshes = meshlib.split_meshes(mc.client_devices, mc.server_devices, client_fsdp=mc.client_fsdp,
                                  server_fsdp=mc.server_fsdp)
    opt_cfg = config.optimizer.to_dict()
    total = int(schedule_steps or config.total_steps)
    state = steplib.create_train_state(model, k_state, meshes, opt_cfg, total, pretrained,
                                       sharding_rules=list(config.sharding))
    optimizers = steplib.make_split_optimizers(opt_cfg, total, {"client": state.client.params,
                                                                "server": state.server.params})
    empty = steplib.PartitionState({}, {}, {})
    state = state.replace(server=empty) if side == "client" else state.replace(client=empty)
    geometry = wire.geometry_of(model, config.global_batch_size, model.model.max_length)
    out = (model, meshes, state, optimizers, geometry)
    return out + (setup,) if side == "client" else out


def wire_summary(records: list[Mapping[str, Any]], batch_size: int) -> dict[str, Any]:
    """Totals and per-sample means of the byte counts in ``records`` (one per step)."""
    measured = [r for r in records if "wire_uplink_bytes" in r]
    totals = {k: int(sum(r.get(k, 0) for r in measured)) for k in BYTE_KEYS}
    samples = max(len(measured) * batch_size, 1)
    out = {"steps": len(measured), "samples": len(measured) * batch_size, "total": totals,
           "per_sample": {k: v / samples for k, v in totals.items()}}
    if totals["uplink_bytes_fp16"]:
        out["wire_uplink_vs_fp16"] = totals["wire_uplink_bytes"] / totals["uplink_bytes_fp16"]
    return out


def run(config, workdir: str, link: GrpcLink) -> dict[str, Any]:
    """Trains the client side to ``config.total_steps`` against the server behind ``link``."""
    from qtl_jax.train import checkpoint as ckptlib
    from qtl_jax.train import loop
    from qtl_jax.train.metrics_log import METRICS_FILE, MetricsLogger, read_jsonl

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    model, meshes, state, optimizers, geometry, setup = build_side(config, "client", workdir)
    if link.geometry is None:
        link.geometry = geometry
    elif geometry != link.geometry:
        raise ValueError(f"the link's geometry {link.geometry} differs from the config's {geometry}.")
    loader = loop.make_loader(setup, config, setup.dataset_dir, config.data.split, config.data.template,
                              global_batch_size=int(config.global_batch_size), shuffle=True, num_epochs=None,
                              seed=int(config.seed))
    total = int(config.total_steps)
    checkpointer = ckptlib.Checkpointer(workdir, keep=int(config.keep_checkpoints))
    fresh = state
    log = MetricsLogger(workdir, total, progress_bar=False)
    config_json = loop.config_to_json(config)

    def restore(step: int | None):
        nonlocal state
        if step is None:
            state = fresh
            loader.set_state(initial_loader_state)
            log.truncate_after(0)
            for later in checkpointer.all_steps():
                checkpointer.manager.delete(later)
            return
        state, data_state = checkpointer.restore(fresh, step=step)
        loader.set_state(data_state["process_0"])
        log.truncate_after(step)
        for later in checkpointer.all_steps():
            if later > step:  # the abandoned future; the replayed steps save their own
                checkpointer.manager.delete(later)

    def realign() -> None:
        """Joins the server; whichever side is ahead goes back to its checkpoint of the other's step."""
        mine = int(jax.device_get(state.step))
        theirs = int(link.join(mine).server_step)
        if theirs == mine:
            return
        have = checkpointer.all_steps()
        if theirs == 0:
            restore(None)
        elif theirs in have:
            restore(theirs)
        else:
            raise RuntimeError(f"the server is at step {theirs} and this client at {mine}, and the client has no "
                               f"checkpoint of step {theirs} (it has {sorted(have)}); use the same checkpoint_every "
                               "on both sides, or restart the server from an older checkpoint.")
        log.print(f"qtl_jax.split.client: realigned from step {mine} to the server's step {theirs}")

    initial_loader_state = loader.get_state()
    if checkpointer.latest_step() is not None:
        restore(checkpointer.latest_step())
        log.print(f"qtl_jax.split.client: resumed {workdir} at step {int(jax.device_get(state.step))}")
    else:
        log.truncate_after(0)
    realign()
    train_step = make_client_step(model, meshes.client, optimizers, link)
    try:
        while (step := int(jax.device_get(state.step))) < total:
            t0 = time.perf_counter()
            batch = loop.per_sample_pixels(next(loader))
            t1 = time.perf_counter()
            try:
                state, metrics = train_step(state, batch)
            except StepMismatchError as e:
                log.print(f"qtl_jax.split.client: {e}")
                realign()
                continue
            t2 = time.perf_counter()
            if config.debug.step_delay > 0:
                time.sleep(float(config.debug.step_delay))
            if not math.isfinite(metrics["loss"]):
                raise loop.NonFiniteLossError(f"loss is {metrics['loss']} at step {step + 1}; stopped without saving.")
            record = {k: (int(v) if k in BYTE_KEYS or k == "wire_replayed" else float(v)) for k, v in metrics.items()}
            record.update(step_time=t2 - t1, data_time=t1 - t0, examples_per_sec=int(config.global_batch_size) / (t2 - t1))
            log.write(step + 1, record)
            if (step + 1) % int(config.checkpoint_every) == 0 or step + 1 == total:
                checkpointer.save(state, {"process_0": loader.get_state()}, config_json)
        checkpointer.wait()
    finally:
        checkpointer.close()
        log.close()
    records = read_jsonl(os.path.join(workdir, METRICS_FILE))
    summary = wire_summary(records, int(config.global_batch_size))
    with open(os.path.join(workdir, "wire_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return {"step": int(jax.device_get(state.step)), "loss": records[-1]["loss"] if records else None,
            "wire": summary}


def format_summary(summary: Mapping[str, Any]) -> str:
    t, p = summary["total"], summary["per_sample"]
    rows = [("uplink, on the wire (protobuf)", "wire_uplink_bytes"), ("uplink, codec ans (theory)", "uplink_bytes_ans"),
            ("uplink, codec packed (theory)", "uplink_bytes_packed"), ("uplink, fp16 baseline", "uplink_bytes_fp16"),
            ("downlink, on the wire (protobuf)", "wire_downlink_bytes"), ("downlink, gradients (theory)", "downlink_bytes")]
    lines = [f"{summary['steps']} steps, {summary['samples']} samples", f"{'':34s}{'total B':>12s}{'per sample B':>14s}"]
    lines += [f"{name:34s}{t[k]:12d}{p[k]:14.1f}" for name, k in rows]
    return "\n".join(lines)


def main(argv) -> None:
    from absl import app, flags, logging

    from qtl_jax.split.server import security_from_flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation; see qtl_jax/xla_flags.py
    # Orbax and TFDS log every file operation at INFO; --verbosity=0 brings them back.
    if f["verbosity"].using_default_value:
        logging.set_verbosity(logging.WARNING)
    config = f.config
    # The geometry comes from the model, which run() builds; it sets link.geometry before the first call.
    link = GrpcLink(f.address, None, security_from_flags(f, "client"), client_id=f.client_id,
                    codec_method=config.split.codec_method, timeout_s=f.rpc_timeout_s, retries=f.retries,
                    max_message_bytes=int(f.max_message_mb * (1 << 20)))
    try:
        result = run(config, f.workdir, link)
    finally:
        link.close()
    print(format_summary(result["wire"]), flush=True)
    print(f"qtl_jax.split.client: done at step {result['step']}, loss {result['loss']:.4f}", flush=True)


if __name__ == "__main__":
    from absl import app, flags

    from qtl_jax.split.server import define_flags

    define_flags("client")
    flags.DEFINE_string("client_id", "client-0", "this client's name in the server's errors")
    flags.DEFINE_string("server_name", "localhost", "the name the server's TLS certificate must carry")
    flags.DEFINE_float("rpc_timeout_s", 300.0, "deadline of each RPC (the first includes server compilation)")
    flags.DEFINE_integer("retries", 3, "re-sends of a step after UNAVAILABLE/DEADLINE_EXCEEDED")
    app.run(main)
