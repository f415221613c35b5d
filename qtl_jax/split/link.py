"""The server half as the client's split step sees it, and the byte accounting of what crosses.

The split step (:mod:`qtl_jax.split.step`) runs the client programs and hands each step's
:class:`~qtl_jax.models.messages.Uplink` to a :class:`ServerHalf`: ``exchange(step, uplink) ->
(downlink, metrics)`` applies the server half of that step once and returns the gradients w.r.t. the
dequantized values. Two implementations:

* :class:`InProcessServerHalf`: the server program (:func:`qtl_jax.split.step.server_update_fn`) on the
  server device sub-mesh of this process; the uplink is put on that mesh and the downlink back on the
  client's, and what a network transport would send is measured (:func:`uplink_counts`,
  :func:`downlink_counts`), in background threads while the devices work when ``codec_threads > 0``
  (:mod:`qtl_jax.split.meter`).
* :class:`qtl_jax.split.grpc_link.GrpcServerHalf`: a remote :mod:`qtl_jax.split.server` over gRPC.

The messages and their layout (row ``i`` = sample ``i``) are documented in :mod:`qtl_jax.models.messages`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax import codec
from qtl_jax.codec_pool import CodecJob, encoded_size
from qtl_jax.models.messages import Downlink, Uplink, check_uplink
from qtl_jax.split import downlink as dl
from qtl_jax.split.mesh import SplitMeshes, batch_sharding, on_batch_sharding
from qtl_jax.split.meter import ByteMeter, Pending

CODEC_METHODS = ("packed", "ans")
# Per-step byte counts in the metrics (integers; summed over a run by wire_summary).
BYTE_KEYS = ("wire_uplink_bytes", "wire_downlink_bytes", "uplink_bytes", "uplink_bytes_packed", "uplink_bytes_ans",
             "uplink_bytes_fp16", "uplink_bytes_side", "downlink_bytes", "downlink_bytes_fp32", "uplink_values",
             "batch_samples")
# Per-step floats derived from them: (uplink_bytes + downlink_bytes) / B, and the paper's setting
# (uplink_bytes_fp16 + downlink_bytes_fp32) / B.
ROUNDTRIP_KEYS = ("roundtrip_bytes_per_sample", "roundtrip_bytes_per_sample_paper")
# Where a server half measuring in the background puts the :class:`~qtl_jax.split.meter.Pending` byte
# counts of a measured step, in place of the counts themselves (:func:`with_counts` merges them).
PENDING_COUNTS = "pending_byte_counts"


class StepMismatchError(RuntimeError):
    """The server half expects another step (it restarted from a checkpoint): the client must :meth:`ServerHalf.join`."""


class ServerHalf(abc.ABC):
    """The server partition of the split step, wherever it runs.

    ``exchange(step, uplink)`` sends step ``step``'s message, applies the server half's update for it
    exactly once and returns ``(downlink, metrics)``: the gradients (float32, the uplink's shapes) and the
    server's metrics (``ce``, ``tokens``, ``target_tokens``, ``examples``: scalars, device arrays or
    numbers) plus, when the step was measured, the integer byte counts (:data:`BYTE_KEYS`), or a
    :class:`~qtl_jax.split.meter.Pending` of them under :data:`PENDING_COUNTS` when they are being measured in
    the background (:func:`with_counts` waits for and merges them). It raises
    :class:`StepMismatchError` when the server expects another step.

    ``join(client_step)`` aligns the two sides after a restart and returns the step the server applies
    next (a remote server rewinds to its checkpoint of ``client_step`` when it is ahead; when it is
    behind, the client must rewind to the returned step).

    ``in_process``: the server partition lives in this process's ``TrainState``. The split step then hands
    it over as the ``state`` attribute before each exchange and takes the updated one back; a remote server
    half keeps its partition to itself.
    """

    in_process: bool = False

    @abc.abstractmethod
    def exchange(self, step: int, uplink: Uplink) -> tuple[Downlink, dict[str, Any]]: ...

    def join(self, client_step: int) -> int:
        return client_step

    def close(self) -> None:
        return None


def uplink_counts(msg: Uplink, codec_method: str = "ans",
                  encoded_sizes: Callable[[list[CodecJob]], list[int]] | None = None,
                  sent: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bytes a network transport sends for ``msg``, measured from the codec's real output on host numpy.

    Returns ``uplink_bytes_packed`` / ``uplink_bytes_ans`` (both modalities' codec messages, headers
    included, plus the side info), ``uplink_bytes_fp16`` (the same positions as float16 values: the
    paper's 16-bit "Original", plus the side info), ``uplink_bytes_side`` (masks and labels as sent) and
    ``uplink_values`` (how many feature values were sent). ``codec_method`` only picks which of the two
    coded sizes ``uplink_bytes`` reports. ``encoded_sizes(jobs)`` sizes the codec messages (one
    :class:`~qtl_jax.codec_pool.CodecJob` per modality and method; default: one after the other here), e.g.
    :meth:`qtl_jax.split.meter.ByteMeter.encoded_sizes` on its worker threads or processes. ``sent``:
    the lengths of the ``'image'`` / ``'text'`` messages already coded with ``codec_method`` (what a network
    client sent, :func:`qtl_jax.split.wire.uplink_to_proto`), which are then not coded again.
    """
    if codec_method not in CODEC_METHODS:
        raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
    image, valid = np.asarray(msg.image_codes), np.asarray(msg.image_valid) > 0
    if not valid.all():  # the common batch has an image in every row: no copy of tens of MB then
        image = image[valid]
    text = np.asarray(msg.text_codes)[msg.text_positions()]
    side = sum(int(np.asarray(v).nbytes) for v in msg.side_arrays().values())
    sizes = {"packed": side, "ans": side, "fp16": side}
    jobs = []
    sent = sent or {}
    for name, codes, levels in (("image", image, msg.image_levels), ("text", text, msg.text_levels)):
        # The size of an fp16 message depends only on the shape; the features themselves stay on the client.
        fp16 = codec.fp16_size(codes.shape)
        sizes["fp16"] += fp16
        for method in CODEC_METHODS:
            if levels == 0:
                sizes[method] += fp16
            elif method == codec_method and name in sent:
                sizes[method] += int(sent[name])
            else:
                jobs.append(CodecJob(codes, levels, method))
    coded = (encoded_sizes or _serial_sizes)(jobs)
    for job, size in zip(jobs, coded):
        sizes[job.method] += size
    return {
        "uplink_bytes": sizes[codec_method],
        "uplink_bytes_packed": sizes["packed"],
        "uplink_bytes_ans": sizes["ans"],
        "uplink_bytes_fp16": sizes["fp16"],
        "uplink_bytes_side": side,
        "uplink_values": int(image.size + text.size),
    }


def downlink_counts(msg: Downlink | dl.QuantizedDownlink, up: Uplink, codec_method: str = "ans") -> dict[str, int]:
    """Bytes of the downlink at the positions the uplink carried real values for.

    ``downlink_bytes``: what was sent (the gradients in ``msg``'s dtype; for a quantized message the coded
    indices plus the float32 steps, :func:`qtl_jax.split.downlink.quantized_bytes`);
    ``downlink_bytes_fp32``: what the paper sends, 4 bytes per real value.
    """
    image_shape = np.shape(msg.image_index if isinstance(msg, dl.QuantizedDownlink) else msg.image_grad)
    n = int(np.asarray(up.image_valid).sum()) * int(np.prod(image_shape[1:]))
    n += int(up.text_positions().sum()) * int(image_shape[-1])
    if isinstance(msg, dl.QuantizedDownlink):
        sent = dl.quantized_bytes(msg, up, codec_method)
    else:
        sent = n * jnp.dtype(msg.image_grad.dtype).itemsize
    return {"downlink_bytes": sent, "downlink_bytes_fp32": 4 * n}


def _serial_sizes(jobs: list[CodecJob]) -> list[int]:
    return [encoded_size(job) for job in jobs]


def step_counts(up: Uplink, down: Downlink | dl.QuantizedDownlink, codec_method: str = "ans",
                encoded_sizes: Callable[[list[CodecJob]], list[int]] | None = None) -> dict[str, Any]:
    """Every byte count of one measured step (:data:`BYTE_KEYS` but the ``wire_*`` ones, and
    :data:`ROUNDTRIP_KEYS`) from its uplink and the downlink message as sent, on host numpy."""
    counts: dict[str, Any] = uplink_counts(up, codec_method, encoded_sizes)
    counts.update(downlink_counts(down, up, codec_method))
    counts.update(roundtrip_counts(counts, np.shape(up.image_valid)[0]))
    return counts


def with_counts(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with the byte counts of a :data:`PENDING_COUNTS` entry merged in (waiting for them)."""
    out = dict(metrics)
    pending = out.pop(PENDING_COUNTS, None)
    if pending is not None:
        out.update(pending.result())
    return out


def roundtrip_counts(counts: Mapping[str, int], batch_size: int) -> dict[str, Any]:
    """``batch_samples`` and the round trip per sample (:data:`ROUNDTRIP_KEYS`) from one step's byte counts."""
    b = max(int(batch_size), 1)
    return {"batch_samples": int(batch_size),
            "roundtrip_bytes_per_sample": (counts["uplink_bytes"] + counts["downlink_bytes"]) / b,
            "roundtrip_bytes_per_sample_paper": (counts["uplink_bytes_fp16"] + counts["downlink_bytes_fp32"]) / b}


class InProcessServerHalf(ServerHalf):
    """The server half on the server sub-mesh of this process, with the byte accounting of a network link.

    Args:
      meshes: the split's client and server meshes.
      update: the server program ``update(server, uplink) -> (server, Downlink, metrics)``, pure and
        traceable (:func:`qtl_jax.split.step.server_update_fn`); compiled here on the server mesh with the
        server state donated.
      codec_method: which coded size ``uplink_bytes`` reports ('packed' or 'ans'; both are measured), and
        the codec of a quantized downlink.
      measure: measure bytes at all (host time: the codes are fetched and entropy coded).
      measure_every: measure every n-th step (step 0 always, when ``measure``).
      codec_threads: 0 measures in ``exchange`` itself (the counts are in its metrics); n > 0 measures in
        the background on n codec workers (:class:`qtl_jax.split.meter.ByteMeter`) while the devices run
        the server and client programs, and ``exchange`` returns a ``Pending`` under
        :data:`PENDING_COUNTS`. The counts are the same; :meth:`close` stops the workers.
      codec_pool: whether those n workers are threads or processes ('threads', 'processes'; resolve
        'auto' with :func:`qtl_jax.split.meter.resolve_pool`).
      downlink: how the gradients come back (:class:`qtl_jax.split.downlink.DownlinkSpec`; default fp32,
        the paper). Anything but fp32 changes training (split then no longer equals fused).
      client: this client's index (the stochastic rounding's key and the error-feedback residual's slot).

    Attributes:
      state: the server partition (a ``PartitionState``) the next exchange updates. The split step sets it
        from its ``TrainState`` before the exchange and takes the updated one back, so checkpoints and the
        evaluation see one state holding both partitions. With error feedback its ``batch_stats`` hold the
        residual (:func:`qtl_jax.split.downlink.initial_residual`).
    """

    in_process = True

    def __init__(
        self,
        meshes: SplitMeshes,
        update: Callable[[Any, Uplink], tuple[Any, Downlink, Mapping[str, Any]]],
        codec_method: str = "ans",
        measure: bool = True,
        measure_every: int = 1,
        downlink: dl.DownlinkSpec | None = None,
        client: int = 0,
        codec_threads: int = 0,
        codec_pool: str = "threads",
    ):
        if codec_method not in CODEC_METHODS:
            raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
        if int(measure_every) < 1:
            raise ValueError(f"measure_every must be >= 1, got {measure_every}.")
        self.meshes = meshes
        self.codec_method = codec_method
        self.measure = measure
        self.measure_every = int(measure_every)
        self.downlink = downlink or dl.DownlinkSpec()
        self.client = int(client)
        # No workers (threads or processes) for a server half that never measures.
        self.meter = ByteMeter(codec_threads if measure else 0, pool=codec_pool)
        self.state: Any = None
        self._update = update
        self._program = None

    def _measuring(self, step: int) -> bool:
        return self.measure and step % self.measure_every == 0

    def _compile(self) -> None:
        mesh = self.meshes.server
        update = self._update
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)

        def server_update(server, uplink: Uplink):
            server, down, metrics = update(server, uplink)
            down = jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)),
                                          down)
            return server, down, metrics

        self._program = jax.jit(server_update, in_shardings=(shardings, None), out_shardings=(shardings, None, None),
                                donate_argnums=0)

    def exchange(self, step: int, uplink: Uplink) -> tuple[Downlink, dict[str, Any]]:
        if self.state is None:
            raise ValueError("InProcessServerHalf.state is not set: assign the server PartitionState before exchanging.")
        check_uplink(uplink)
        if self._program is None:
            self._compile()
        on_server = _put(uplink, self.meshes.server)
        self.state, down, metrics = self._program(self.state, on_server)
        # Back in the server's own dtype on arrival: float32 (float64 in the tests' float64 runs).
        dtype = down.image_grad.dtype
        message, self.state = send_downlink(self.downlink, self.state, str(self.client), down, on_server,
                                            dl.step_key(self.downlink.seed, self.client, step))
        metrics = dict(metrics)
        if self._measuring(step):
            # Dispatched after the server program, so the codes' copy to the host and the coding overlap it.
            metrics[PENDING_COUNTS] = self._measure(step, uplink, message)
            if not self.meter.background:
                metrics = with_counts(metrics)
        received = dl.expand(_put(message, self.meshes.client), dtype)
        return received, metrics

    def _measure(self, step: int, uplink: Uplink, message: Any) -> Pending:
        if isinstance(message, Downlink):
            # A plain downlink's bytes follow from its shapes and dtype (downlink_counts): fetching its gradients
            # (~260 MB per step at the paper's stage-1 batch in float32) would only add a host copy to the step.
            message = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), message)
        for leaf in jax.tree_util.tree_leaves((uplink, message)):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()
        method = self.codec_method
        return self.meter.submit(step, lambda: jax.device_get((uplink, message)),
                                 lambda host, meter: step_counts(host[0], host[1], method, meter.encoded_sizes))

    def close(self) -> None:
        self.meter.close()


def send_downlink(spec: dl.DownlinkSpec, server: Any, slot: str, down: Downlink, uplink: Uplink,
                  key: jax.Array) -> tuple[Any, Any]:
    """``(message, server)``: the downlink message for ``down`` under ``spec`` and the server partition
    with client ``slot``'s error-feedback residual updated (unchanged without error feedback)."""
    if not spec.error_feedback:
        return dl.compress(spec, down, uplink, None, key)[0], server
    stats = server.batch_stats.get(dl.RESIDUAL_KEY, {}) if isinstance(server.batch_stats, Mapping) else {}
    if slot not in stats:
        raise ValueError(f"split.downlink_error_feedback is on but the server state holds no residual for client "
                         f"{slot!r} (it has {sorted(stats)}); build the state with downlink.initial_residual.")
    message, residual = dl.compress(spec, down, uplink, stats[slot], key)
    # Kept where the state had it, so the server program's compiled input shardings still hold.
    residual = jax.tree_util.tree_map(lambda new, old: jax.device_put(new, old.sharding), residual, stats[slot])
    new_stats = {**server.batch_stats, dl.RESIDUAL_KEY: {**stats, slot: residual}}
    return message, server.replace(batch_stats=new_stats)


def _put(tree: Any, mesh) -> Any:
    """Every leaf onto ``mesh``, batch (leading) dimension split over all of its devices."""
    return jax.tree_util.tree_map(lambda x: on_batch_sharding(x, mesh), tree)


# ---------------------------------------------------------------------------------------------------
# A run's byte totals


def wire_summary(records: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, Any]:
    """Totals and per-sample means of the byte counts of the steps in ``records`` measured on the wire."""
    measured = [r for r in records if "wire_uplink_bytes" in r]
    totals = {k: int(sum(r.get(k, 0) for r in measured)) for k in BYTE_KEYS}
    samples = max(len(measured) * batch_size, 1)
    out = {"steps": len(measured), "samples": len(measured) * batch_size, "total": totals,
           "per_sample": {k: v / samples for k, v in totals.items()}}
    if totals["uplink_bytes_fp16"]:
        out["wire_uplink_vs_fp16"] = totals["wire_uplink_bytes"] / totals["uplink_bytes_fp16"]
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """:func:`wire_summary` as a table for people."""
    t, p = summary["total"], summary["per_sample"]
    rows = [("uplink, on the wire (protobuf)", "wire_uplink_bytes"), ("uplink, codec ans (theory)", "uplink_bytes_ans"),
            ("uplink, codec packed (theory)", "uplink_bytes_packed"), ("uplink, fp16 baseline", "uplink_bytes_fp16"),
            ("downlink, on the wire (protobuf)", "wire_downlink_bytes"), ("downlink, gradients (theory)", "downlink_bytes")]
    lines = [f"{summary['steps']} steps, {summary['samples']} samples", f"{'':34s}{'total B':>12s}{'per sample B':>14s}"]
    lines += [f"{name:34s}{t[k]:12d}{p[k]:14.1f}" for name, k in rows]
    return "\n".join(lines)
