"""The training job: config -> model, data, split step, checkpoints, logs and the end-of-stage evaluation.

:func:`train_and_evaluate` is all ``train.py`` (and the network split client, ``python -m
qtl_jax.split.client``) calls. A run lives in its ``workdir``::

    config.json           the config (also stored in every checkpoint)
    checkpoints/<step>/   Orbax checkpoints (qtl_jax.train.checkpoint); the latest is resumed automatically
    metrics.jsonl         one JSON object per logged step (qtl_jax.train.metrics_log)
    eval.jsonl            end-of-stage evaluation (qtl_jax.train.demo_eval)
    wire_summary.json     byte totals of a run against a remote server (split.server.address set)
    tensorboard/          TensorBoard event files
    data/                 the shapes corpus, when data.kind='shapes' and data.data_dir is unset

The server half of the split step (:class:`qtl_jax.split.link.ServerHalf`) runs in this process on the
server sub-mesh (``split.server.address`` unset) or in a :mod:`qtl_jax.split.server` process over gRPC
(``split.server.address=host:port``, with the TLS / token options of ``split.server``). Everything else is
the same in both: the client state, the checkpoints (a remote run's hold only the client partition; the
server checkpoints its own), ``metrics.jsonl``, resume and the progress bar. Before the first step (and
whenever the server reports another step) the two sides align with ``ServerHalf.join``: a server ahead of
this client rewinds to its checkpoint of the client's step (where its rewind policy allows; otherwise this
run must hold a checkpoint of the server's step), a server behind it makes this run restore its own
checkpoint of the server's step.

Resuming is exact: params, optimizer states, quantizer statistics, step, RNG and the loader's position
come back from the checkpoint, so the resumed run computes the same per-step losses as an uninterrupted
one. A fresh start drops any ``metrics.jsonl`` lines of an earlier attempt that died before its first
checkpoint. A NaN/inf loss stops the run before anything is saved over the last good checkpoint.

Multi-host (``jax.distributed``): every process runs this function; each loads its share of the global
batch (``global_batch_size / process_count`` rows), the shares are gathered into the global batch in
the single-host order, and each partition's program splits it over the devices of its sub-mesh, which
may span processes. Byte measurement (host entropy coding of every code) and the evaluation run only in
single-process runs; a remote server half needs a single-process client.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from qtl_jax.data import pipeline, sequence, templates
from qtl_jax.optimizer import learning_rate_schedule
from qtl_jax.split import fedavg
from qtl_jax.split import mesh as meshlib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.downlink import DownlinkSpec
from qtl_jax.split.link import (BYTE_KEYS, PENDING_COUNTS, InProcessServerHalf, ServerHalf, StepMismatchError,
                                wire_summary)
from qtl_jax.split.meter import resolve_pool
from qtl_jax.train import checkpoint as ckptlib
from qtl_jax.train import demo_eval
from qtl_jax.train.metrics_log import EVAL_FILE, METRICS_FILE, MetricsLogger, read_jsonl
from qtl_jax.train.setup import (Setup, abstract_state, build_setup, check_dir, initial_state,
                                 seed_keys)

# Metrics that are per-step counts, logged as integers.
_COUNT_KEYS = BYTE_KEYS + ("wire_replayed",)
WIRE_SUMMARY_FILE = "wire_summary.json"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stopped without saving."""


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
    rec = {k: float(v) for k, v in metrics.items() if k not in _COUNT_KEYS}
    rec.update({k: int(metrics[k]) for k in _COUNT_KEYS if k in metrics})
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
                                                    image_size=setup.model.model.vision.image_size,
                                                    blank=bool(config.data.shapes.blank))
    else:
        dataset_dir = check_dir(e.dataset_dir, "eval.dataset_dir", "the end-of-stage evaluation (or eval.enabled=False)")
    loader = make_loader(setup, config, dataset_dir, e.split, e.template, global_batch_size=int(e.batch_size),
                         shuffle=False, num_epochs=1, seed=0)
    eval_step = steplib.make_eval_step(setup.model, meshes)
    buckets = tuple(config.data.length_buckets)
    return demo_eval.evaluate(eval_step, state, (sequence.pad_to_bucket(b, buckets) for b in loader),
                              max_batches=n_batches)


def evaluate_split_workdirs(config: ml_collections.ConfigDict, client_workdir: str, server_workdir: str,
                            workdir: str) -> dict[str, Any]:
    """The end-of-stage evaluation of a network split run, in this process; appends it to ``workdir``/eval.jsonl.

    A network client cannot evaluate (the server partition lives in the server process), so this joins
    the client partition (params and quantizer statistics) of ``client_workdir``'s newest checkpoint with
    the server partition of ``server_workdir``'s and runs :func:`run_eval` on them. With SplitFed every
    client's last checkpoint holds the last round's average, so any client's workdir will do. ``config``
    is the run's training config (data and eval settings; the model comes from it as in training).
    Returns the figures with ``step`` and ``server_step``, the checkpoint steps used.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _, k_setup = seed_keys(config)
    setup = build_setup(config, workdir, k_setup)
    mc = config.mesh
    meshes = meshlib.split_meshes(mc.client_devices, mc.server_devices, client_fsdp=mc.client_fsdp,
                                  server_fsdp=mc.server_fsdp)
    # Restored into the abstract template: the random initialisation never runs (at the paper's size it
    # takes minutes and a second copy of the weights). The optimizer states are not needed to evaluate.
    like = abstract_state(config, setup, meshes, max(int(config.total_steps), 1))
    empty = steplib.PartitionState({}, {}, {})
    # Each side's checkpoint holds only its own partition: restore each with the other one empty.
    client, _, stats, step = ckptlib.restore_params(client_workdir, like.replace(server=empty))
    _, server, _, server_step = ckptlib.restore_params(server_workdir, like.replace(client=empty))
    state = like.replace(client=steplib.PartitionState(client, {}, stats), server=steplib.PartitionState(server, {}, {}))
    t0 = time.perf_counter()
    result = {"step": int(step), "server_step": int(server_step), **run_eval(setup, config, meshes, state),
              "eval_seconds": time.perf_counter() - t0}
    with open(os.path.join(workdir, EVAL_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())



def packer(config: ml_collections.ConfigDict, setup: Setup, meshes: meshlib.SplitMeshes
           ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """The global batch -> what the step takes: cut to its longest sample's bucket (``data.length_buckets``)
    or, with ``data.pack``, packed into rows of ``model.max_length`` merged positions
    (:func:`qtl_jax.data.sequence.pack`), the rows a multiple of both meshes' device counts."""
    buckets = tuple(config.data.length_buckets)
    if not bool(config.data.get("pack", False)):
        return lambda batch: sequence.pad_to_bucket(batch, buckets)
    model = setup.model.model
    if model.max_length is None or model.convention != "factory" or model.padding_side != "right":
        raise ValueError("data.pack=True needs model.max_length set (each row's capacity), the factory image "
                         "convention and right padding; set data.pack=False otherwise.")
    rows = math.lcm(meshes.client.devices.size, meshes.server.devices.size)
    return lambda batch: sequence.pack(batch, capacity=int(model.max_length),
                                             num_image_tokens=model.num_image_tokens, length_buckets=buckets,
                                             row_multiple=rows)


def make_server_half(config: ml_collections.ConfigDict, setup: Setup, meshes: meshlib.SplitMeshes,
                     optimizers: steplib.SplitOptimizers) -> ServerHalf:
    """The server half ``config.split.server`` selects: in this process (no address) or a gRPC server."""
    section = config.split.server.to_dict()
    if section["address"]:
        from qtl_jax.split.grpc_link import GrpcServerHalf

        geometry = wire.geometry_of(setup.model, int(config.global_batch_size), setup.model.model.max_length)
        return GrpcServerHalf.from_config(section, geometry, codec_method=config.split.codec_method,
                                          downlink=DownlinkSpec.from_config(config.split, int(config.seed)),
                                          fedavg_every=int(config.split.fedavg_every))
    return InProcessServerHalf(meshes, steplib.server_update_fn(setup.model, optimizers),
                               codec_method=config.split.codec_method, measure=jax.process_count() == 1,
                               measure_every=int(config.split.measure_every),
                               downlink=DownlinkSpec.from_config(config.split, int(config.seed)),
                               codec_threads=int(config.split.codec_threads),
                               codec_pool=resolve_pool(str(config.split.codec_pool), jax.default_backend()))


def _check_remote(config: ml_collections.ConfigDict) -> None:
    problems = []
    if config.split.mode != "split":
        problems.append(f"split.mode={config.split.mode!r} (a remote server half needs 'split')")
    if int(config.total_steps) <= 0:
        problems.append("total_steps is not set (both sides build the same learning-rate schedule from it: set "
                        "--config.total_steps on client and server)")
    if jax.process_count() > 1:
        problems.append(f"{jax.process_count()} processes (the network client runs in one process)")
    if int(config.split.fedavg_every) < 0:
        problems.append(f"split.fedavg_every={config.split.fedavg_every} (use 0, off, or K >= 1)")
    if bool(config.data.get("pack", False)):
        problems.append("data.pack=True (the gRPC messages carry one sample per row; pack with the server half in "
                        "process, or set data.pack=False)")
    if problems:
        raise ValueError(f"split.server.address={config.split.server.address!r}: " + "; ".join(problems) + ".")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, returns the final figures.

    Returns ``{'step', 'loss', 'eval': {...}}`` (eval only when evaluated; ``'wire'``: the byte summary of a
    run against a remote server).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    multi = jax.process_count() > 1
    remote = bool(config.split.server.address)
    if remote:
        _check_remote(config)
    elif int(config.split.fedavg_every):
        raise ValueError(f"split.fedavg_every={config.split.fedavg_every} averages several clients' models through a "
                         "server: set split.server.address (python -m qtl_jax.split.client) or split.fedavg_every=0.")
    every = int(config.split.fedavg_every)
    resolve_pool(str(config.split.codec_pool), jax.default_backend())  # a bad value fails before the model is built
    _, k_setup = seed_keys(config)
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
    # Shapes and shardings only: a resumed run restores into it, a fresh one builds its own (initial_state).
    like = abstract_state(config, setup, meshes, total_steps)
    optimizers = steplib.make_split_optimizers(opt_cfg, total_steps, {"client": like.client.params,
                                                                       "server": like.server.params})
    # A remote run holds (and checkpoints) only the client partition; the server process has the other.
    own = (lambda s: s.replace(server=steplib.PartitionState({}, {}, {}))) if remote else (lambda s: s)
    partitions = ("client",) if remote else steplib.PARTITIONS

    checkpointer = ckptlib.Checkpointer(workdir, keep=int(config.keep_checkpoints),
                                        fallback=bool(config.checkpoint_fallback))
    start = checkpointer.latest_step()
    log = MetricsLogger(workdir, total_steps, initial_step=start or 0, progress_bar=config.progress_bar,
                        is_main=is_main)
    server = None
    last: dict[str, Any] = {}
    # The last step's record, held until the next step is queued: its metrics are still the devices' arrays
    # (reading them at once would make the devices wait for the host between steps) and its byte counts may
    # still be measured in the background.
    held: dict[str, Any] = {}

    def finish_held() -> None:
        """Reads the held step's metrics (waiting for its programs), stops on a non-finite loss, writes the
        record (if due) once its byte counts are in; ``last`` becomes that record."""
        nonlocal last
        if not held:
            return
        h = dict(held)
        held.clear()
        metrics = steplib.host_metrics(h["metrics"])
        if not math.isfinite(metrics["loss"]):
            checkpointer.wait()
            saved = checkpointer.all_steps()
            good = next((s for s in reversed(saved) if checkpointer.is_intact(s)), None)  # re-read from disk now
            verdict = "none yet" if not saved else "none is intact" if good is None else "intact, verified just now"
            raise NonFiniteLossError(
                f"loss is {metrics['loss']} at step {h['step']} (ce={metrics.get('ce')}); stopped without saving. "
                f"The last good checkpoint is step {good} in {checkpointer.directory} "
                f"({verdict}). Lower optimizer.lr or check the data, then rerun: "
                "train.py resumes from that checkpoint."
            )
        if h["pending"] is not None:
            metrics.update(h["pending"].result())
        last = _step_record(metrics, h["lr"], h["step_time"], h["data_time"], int(config.global_batch_size))
        if h["step"] % int(config.log_every) == 0 or h["step"] == total_steps:
            log.write(h["step"], last)

    try:
        initial_data = loader.get_state()
        if start is not None:
            state, data_state = checkpointer.restore(own(like))
            loader.set_state(data_state[f"process_{jax.process_index()}"])
            log.truncate_after(start)
            log.print(f"qtl_jax: resumed {workdir} at step {start}/{total_steps}")
        else:
            state = initial_state(config, setup, meshes, total_steps, log=log.print, partitions=partitions)
            if is_main:
                ckptlib.write_config(workdir, config_json)
            log.truncate_after(0)  # lines of an earlier attempt that died before its first checkpoint

        def rewind(to: int) -> None:
            """Back to this run's own state at step ``to`` (0: the fresh start); later checkpoints are dropped."""
            nonlocal state
            if to == 0:
                del state  # (its buffers go before the new ones are made)
                state = initial_state(config, setup, meshes, total_steps, log=log.print, partitions=partitions)
                loader.set_state(initial_data)
            else:
                state, data_state = checkpointer.restore(state, step=to)
                loader.set_state(data_state[f"process_{jax.process_index()}"])
            log.truncate_after(to)
            for later in checkpointer.all_steps():
                if later > to:  # the abandoned future; the replayed steps save their own
                    checkpointer.manager.delete(later)

        def realign(mine: int, unused_batches: int = 0) -> int:
            """Joins the server half; whichever side is ahead goes back to its checkpoint of the other's step.

            ``unused_batches``: batches taken from the loader for steps not run (SplitFed's skip ahead counts them).
            """
            nonlocal state
            theirs = server.join(mine)
            if theirs == mine:
                return mine
            if theirs > mine and every:
                # SplitFed: the shared server never rewinds (the other clients' steps); this client skips the steps
                # it lost (their data, its updates) and picks up the clients' newest average (federate).
                for _ in range(theirs - mine - unused_batches):
                    next(loader)
                state = state.replace(step=state.step + (theirs - mine))
                log.print(f"qtl_jax: rejoined at the server's step {theirs} for this client (from step {mine})")
                return theirs
            checkpointer.wait()
            have = checkpointer.all_steps()
            if theirs != 0 and theirs not in have:
                # (A ValueError: the workdirs do not fit together, which the person running the client can fix;
                # the command line prints it as one line.)
                if theirs > mine:
                    raise ValueError(
                        f"the server is at step {theirs} for this client, ahead of its step {mine}, and did not go "
                        "back (a server with several clients or --rewind=never never rewinds on a Join); this client "
                        f"has no checkpoint of step {theirs} (it has {sorted(have)}). Restore this client's workdir to "
                        "one with that checkpoint, or have the server's operator restart it with "
                        f"--restore_step={mine}.")
                raise ValueError(
                    f"the server is at step {theirs} and this client at {mine}, and the client has no checkpoint of "
                    f"step {theirs} (it has {sorted(have)}); use the same checkpoint_every on both sides, or restart "
                    "the server from an older checkpoint.")
            rewind(theirs)
            log.print(f"qtl_jax: realigned from step {mine} to the server's step {theirs}")
            return theirs

        if config.split.mode == "split":
            server = make_server_half(config, setup, meshes, optimizers)
        # Byte counts measured in the background are merged into their step's record one step later, so the
        # coding overlaps the next step's programs (records are written in order, each before its checkpoint).
        train_step = steplib.make_train_step(setup.model, meshes, optimizers, mode=config.split.mode, server=server,
                                             defer_counts=True, defer_metrics=True)
        # Every step's learning rate read once, here: evaluating the schedule per step would queue a computation
        # behind the step's programs and wait for them, undoing the overlap of defer_metrics.
        schedule = np.asarray(jax.device_get(jax.vmap(learning_rate_schedule(opt_cfg, total_steps))(
            np.arange(max(total_steps, 1)))), np.float64)
        where = (f", server at {config.split.server.address}" if remote else
                 ", server half in process" if server is not None else "")
        log.print(f"qtl_jax: stage {config.stage}, {total_steps} steps of {config.global_batch_size} examples, "
                  f"{jax.device_count()} devices ({jax.process_count()} processes), mode={config.split.mode}{where}")

        def federate(at: int, fetch: bool = False) -> None:
            """SplitFed: this client's model into round ``at`` and the round's average back (``fetch``: the newest)."""
            nonlocal state
            client, average = fedavg.client_round(server, at, state.client, optimizers.client_frozen,
                                                  loader.num_records, fetch=fetch)
            state = state.replace(client=client)
            log.print(f"qtl_jax: FedAvg {fedavg.describe(average)}" if average else "qtl_jax: FedAvg: no average yet")

        step = start or 0
        if server is not None:
            step = realign(step)
            if every and step > 0:  # a restart: the round this step closes, or the newest average
                federate(step, fetch=step % every != 0)
        batch = None
        # Each batch is cut to its longest sample rounded up to a bucket (TinyLLaVA Factory pads to the longest);
        # a remote server accepts exactly these lengths (wire.accepted_lengths of its own data.length_buckets).
        buckets = tuple(config.data.length_buckets)
        shape_batch = packer(config, setup, meshes)
        shapes_seen: set[tuple[int, ...]] = set()
        while step < total_steps:
            t0 = time.perf_counter()
            if batch is None:
                batch = shape_batch(gather_global_batch(next(loader)))
                shape = tuple(batch["input_ids"].shape) + tuple(np.shape(batch.get("segment_ids", ()))[1:])
                if shape not in shapes_seen:
                    shapes_seen.add(shape)
                    what = ("rows x tokens x merged positions of the packed rows, bucketed" if "segment_ids" in batch
                            else "bucket of the longest sample")
                    log.print(f"qtl_jax: new batch shape {shape} ({what}; {len(shapes_seen)} distinct so far): "
                              "the step compiles for it")
                if step == config.debug.poison_step:
                    batch = _poison(batch)
            t1 = time.perf_counter()
            try:
                state, metrics = train_step(state, batch)
            except StepMismatchError as e:  # the server restarted from a checkpoint
                finish_held()
                log.print(f"qtl_jax: {e}")
                aligned = realign(step, unused_batches=1)
                if aligned != step:
                    step, batch = aligned, None
                continue
            batch = None
            pending = metrics.pop(PENDING_COUNTS, None)
            # The previous step's metrics and counts, read now that this step is queued; the wait (for that
            # step's programs and coding) counts as this step's time.
            finish_held()
            t2 = time.perf_counter()
            if config.debug.step_delay > 0:
                time.sleep(float(config.debug.step_delay))
            step += 1
            held.update(step=step, metrics=metrics, pending=pending, lr=float(schedule[step - 1]), step_time=t2 - t1,
                        data_time=t1 - t0)
            if every and step % every == 0:
                finish_held()  # a non-finite loss stops before this model is averaged with the others'
                federate(step)  # before the checkpoint of this step, which then holds the average
            log.advance()
            if step % int(config.checkpoint_every) == 0 or step == total_steps:
                finish_held()  # a resumed run keeps the lines up to its checkpoint
                checkpointer.save(state, _gather_json(loader.get_state()), config_json)
        finish_held()
        checkpointer.wait()
        final_step = int(jax.device_get(state.step))
        result: dict[str, Any] = {"step": final_step, "loss": last.get("loss")}
        if remote:
            records = read_jsonl(os.path.join(workdir, METRICS_FILE))
            result["loss"] = records[-1]["loss"] if records else None
            result["wire"] = wire_summary(records, int(config.global_batch_size))
            with open(os.path.join(workdir, WIRE_SUMMARY_FILE), "w", encoding="utf-8") as f:
                json.dump(result["wire"], f, indent=1)
        if config.eval.enabled and remote:
            log.print("qtl_jax: no end-of-stage evaluation: the server partition lives in the server process")
        elif config.eval.enabled and not multi:
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
        if held:  # an error is on its way out: still write the steps before it, as the synchronous path did
            try:
                finish_held()
            except Exception:  # noqa: BLE001 - the error being raised is the one to report
                pass
        if server is not None:
            server.close()
        checkpointer.close()
        log.close()
