r"""The split-learning server: holds the server partition (quantizer decoders, LLM, loss) and its optimizer.

It receives integer codes, masks and labels (``Step``), runs the server half of the split step
(:func:`make_server_update`: the same computation as ``server_update`` in :mod:`qtl_jax.split.step`)
and answers with ∂loss/∂ẑ at the real positions plus its metrics. It never sees pixels or token ids.

Exactly-once steps: the server applies step ``s`` only when ``s`` is the step it expects next; a request
for the step it applied last (a client retrying after a lost reply) gets the cached reply and changes
nothing; anything else is ``FAILED_PRECONDITION`` naming the expected step. ``Join`` aligns the two sides
after a restart: a client behind the server makes the server rewind to its own checkpoint at the
client's step; a client ahead of the server is told the server's step and rewinds itself.

Command line (same training config as ``train.py``; network options are flags)::

    python -m qtl_jax.split.server --config=configs/stage1.py:tiny --workdir=/tmp/qtl_server \
        --address=127.0.0.1:50051 --tls=mutual --ca_cert=pki/ca.pem --cert=pki/server.pem --key=pki/server.key

The command line builds its side as a training run would (:mod:`qtl_jax.train.setup`: the model, the
state drawn from ``config.seed``, a previous stage's or an official checkpoint's params) and keeps the
server partition; it stops after ``total_steps`` steps of every client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from concurrent import futures
import grpc
import jax
import numpy as np

from qtl_jax.models import quantized as qm
from qtl_jax.split import downlink as dl
from qtl_jax.split import link as linklib
from qtl_jax.split import mesh as meshlib
from qtl_jax.split import security as seclib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def make_server_update(config: qm.QuantizedTinyLlavaConfig, optimizers: steplib.SplitOptimizers):
    """``update(server: PartitionState, uplink) -> (server, Downlink, metrics)``, jit-compiled, state donated.

    Exactly the server program of the in-process split step (:func:`qtl_jax.split.step.server_update_fn`):
    CE from the dequantized codes, gradients for the server params and for the dequantized values, the
    server optimizer update.
    """
    return jax.jit(steplib.server_update_fn(config, optimizers), donate_argnums=0)


@dataclasses.dataclass
class ServerOptions:
    """Network-side settings of :class:`SplitServicer` / :func:`serve`."""

    # What the downlink sends (split.downlink*: fp32, bf16 or quantized); its seed keys the stochastic rounding.
    downlink: dl.DownlinkSpec = dataclasses.field(default_factory=dl.DownlinkSpec)
    codec_method: str = "ans"  # what clients are told to send ('ans' or 'packed'; both are accepted) and the
    # codec of a quantized downlink
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    checkpoint_every: int = 0  # save the server state every n applied steps (0: never)
    max_workers: int = 4
    # Sequential split learning with several clients: the client ids allowed, in turn order. Client k's
    # local step s is the server's global step s * len(clients) + k; a request that comes before its turn
    # waits (up to turn_timeout_s, then UNAVAILABLE, which the client's link retries). Empty: one client,
    # any id, local step = global step.
    clients: tuple[str, ...] = ()
    turn_timeout_s: float = 60.0


class StepError(Exception):
    """A request that cannot be served; carries the gRPC status code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class SplitServicer(pb_grpc.SplitLearningServicer):
    """The server partition's state and the two RPCs. Steps are applied one at a time, in order.

    Args:
      config: the model.
      state: a :class:`~qtl_jax.split.step.TrainState` whose ``server`` partition is used (the client
        partition may be empty); ``state.step`` is the next step to apply.
      optimizers: from :func:`~qtl_jax.split.step.make_split_optimizers`.
      mesh: the server's device mesh (the batch is split over its devices).
      geometry: the shapes and levels clients must use.
      checkpointer: a :class:`qtl_jax.train.checkpoint.Checkpointer` for the server state, or None.
      update: a program from :func:`make_server_update` for these config and optimizers (default: built
        here; pass one to share its compilation between servers of one process).
    """

    def __init__(self, config: qm.QuantizedTinyLlavaConfig, state: steplib.TrainState,
                 optimizers: steplib.SplitOptimizers, mesh, geometry: wire.Geometry,
                 options: ServerOptions | None = None, checkpointer=None, update=None):
        self.config, self.mesh, self.geometry = config, mesh, geometry
        self.options = options or ServerOptions()
        self.state = state
        self.checkpointer = checkpointer
        self._update = update or make_server_update(config, optimizers)
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        # Per client turn: (local step, digest of the request, reply) of its last applied step, for retries.
        self._last: dict[int, tuple[int, bytes, pb.DownlinkReply]] = {}
        self.applied_steps: list[int] = []  # every (local) step applied, in order (for tests and logs)
        self.applied_by: list[str] = []  # the client of each applied step
        self.rewinds: list[tuple[int, int]] = []

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def wait_for_step(self, step: int, timeout: float | None = None) -> bool:
        """Blocks until the server has applied ``step`` steps (woken by each applied step); False on timeout."""
        with self._turn:
            return self._turn.wait_for(lambda: self.step >= step, timeout=timeout)

    # -- RPCs -------------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        try:
            return self.join(request)
        except StepError as e:
            context.abort(e.code, str(e))
        except wire.VersionError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except wire.WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Step(self, request: pb.UplinkRequest, context) -> pb.DownlinkReply:
        try:
            t0 = time.perf_counter()
            reply = self.apply(request)
            # The client subtracts it from the RPC's wall time: what is left is the network's share.
            reply.metrics["server_seconds"] = time.perf_counter() - t0
            return reply
        except StepError as e:
            context.abort(e.code, str(e))
        except wire.VersionError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except wire.WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    # -- logic (callable without gRPC) ------------------------------------------------------------

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        wire.check_version(request.protocol_version)
        problems = self.geometry.mismatch(wire.Geometry.from_proto(request.geometry))
        if problems:
            raise wire.WireError("the client's model does not match the server's: " + "; ".join(problems))
        k = self._client_turn(request.client_id)
        with self._lock:
            client_step = int(request.client_step)
            if client_step < self._local_step(k):
                if self.options.clients:
                    raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"client {request.client_id!r} restarts at its step {client_step} but the shared server "
                                    f"is at its step {self._local_step(k)}; with several clients the server does not "
                                    "rewind (the others' steps would be lost): restore that client from a later checkpoint.")
                self._rewind(client_step)
            return pb.JoinReply(protocol_version=wire.PROTOCOL_VERSION, server_step=self._local_step(k),
                                grad_dtype=wire.DOWNLINK_KINDS[self.options.downlink.kind],
                                codec_method=self.options.codec_method,
                                downlink=wire.coding_to_proto(self.options.downlink))

    def _client_turn(self, client_id: str) -> int:
        """Client ``client_id``'s place in the turn order (0 with a single client)."""
        if not self.options.clients:
            return 0
        if client_id not in self.options.clients:
            raise StepError(grpc.StatusCode.PERMISSION_DENIED,
                            f"client_id={client_id!r} is not one of this server's clients {list(self.options.clients)}.")
        return self.options.clients.index(client_id)

    def _local_step(self, k: int) -> int:
        """How many steps client ``k`` has had applied: its next local step."""
        n = max(len(self.options.clients), 1)
        return max(0, (self.step - k + n - 1) // n)

    def _rewind(self, step: int) -> None:
        """Back to this server's own checkpoint at ``step`` (a client restarted from an older checkpoint)."""
        have = [] if self.checkpointer is None else self.checkpointer.all_steps()
        if step not in have:
            raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"the client restarts at step {step} but the server is at step {self.step} and has no "
                            f"checkpoint of step {step} (it has {sorted(have)}); restart the client from one of those "
                            "steps, or give both sides the same checkpoint_every.")
        self.checkpointer.wait()
        before = self.step
        self.state, _ = self.checkpointer.restore(self.state, step=step)
        # Later checkpoints belong to the abandoned future; the replayed steps will save their own.
        for later in have:
            if later > step:
                self.checkpointer.manager.delete(later)
        self._last = {}
        self.rewinds.append((before, step))
        print(f"qtl_jax.split.server: rewound from step {before} to its checkpoint of step {step} (a client "
              "restarted there)", flush=True)

    def send(self, server: steplib.PartitionState, k: int, step: int, down, uplink):
        """``(message, server)``: client ``k``'s downlink of its step ``step`` (the in-process server half's
        computation, :func:`qtl_jax.split.link.send_downlink`) and the server partition with its residual."""
        spec = self.options.downlink
        return linklib.send_downlink(spec, server, str(k), down, uplink, dl.step_key(spec.seed, k, step))

    def apply(self, request: pb.UplinkRequest) -> pb.DownlinkReply:
        """Applies the request's step exactly once (a retry of the last step gets the cached reply)."""
        wire.check_version(request.protocol_version)
        if request.step < 0:
            raise wire.WireError(f"step={request.step}: step ids are >= 0.")
        k = self._client_turn(request.client_id)
        n = max(len(self.options.clients), 1)
        target = int(request.step) * n + k  # the global step this request is
        with self._lock:
            last = self._last.get(k)
            if last is not None and request.step == last[0]:
                if _digest(request) != last[1]:
                    raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"step {request.step} was already applied from a different request; a retry must "
                                    f"resend the same message. The server applies step {self._local_step(k)} next.")
                reply = pb.DownlinkReply()
                reply.CopyFrom(last[2])
                reply.replayed = True
                return reply
            if n > 1 and target > self.step:
                if not self._turn.wait_for(lambda: self.step >= target, timeout=self.options.turn_timeout_s):
                    raise StepError(grpc.StatusCode.UNAVAILABLE,
                                    f"client {request.client_id!r} step {request.step} is still waiting for its turn "
                                    f"(the server is at global step {self.step}); retry.")
            if target != self.step:
                raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"step {request.step} is out of order: the server applies step {self._local_step(k)} "
                                "next; call Join with the client's step to realign.")
            up = wire.uplink_from_proto(request, self.geometry)
            received = jax.tree_util.tree_map(
                lambda x: jax.device_put(x, meshlib.batch_sharding(self.mesh, np.ndim(x))), up)
            server, down, metrics = self._update(self.state.server, received)
            message, server = self.send(server, k, int(request.step), down, received)
            self.state = self.state.replace(server=server, step=self.state.step + 1)
            host_metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
            reply = wire.downlink_to_proto(jax.device_get(message), up, step=request.step, spec=self.options.downlink,
                                           codec_method=self.options.codec_method, metrics=host_metrics)
            reply.uplink_wire_bytes = request.ByteSize()
            self._last[k] = (int(request.step), _digest(request), reply)
            self.applied_steps.append(int(request.step))
            self.applied_by.append(request.client_id)
            self._turn.notify_all()
            every = self.options.checkpoint_every
            if self.checkpointer is not None and every > 0 and self.step % every == 0:
                self.checkpointer.save(self.state, {}, {})
            return reply


def _digest(request: pb.UplinkRequest) -> bytes:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.max_send_message_length", int(max_message_bytes))]


def serve(servicer: SplitServicer, address: str, security: seclib.SecurityConfig) -> tuple[grpc.Server, int]:
    """Starts a gRPC server for ``servicer`` on ``address`` (``host:0`` picks a free port); returns (server, port)."""
    interceptors = [seclib.TokenAuthInterceptor(security.token)] if security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=servicer.options.max_workers),
                         interceptors=interceptors, options=grpc_options(servicer.options.max_message_bytes))
    pb_grpc.add_SplitLearningServicer_to_server(servicer, server)
    creds = seclib.server_credentials(security)
    port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"could not listen on {address!r} (address in use or not local?).")
    server.start()
    return server, port


# ---------------------------------------------------------------------------------------------------
# Command line


def main(argv) -> None:
    from absl import app, flags, logging

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation; see qtl_jax/xla_flags.py
    # Orbax and TFDS log every file operation at INFO; --verbosity=0 brings them back.
    if not f["verbosity"].present:  # (using_default_value is False under app.run)
        logging.set_verbosity(logging.WARNING)
    # The command line is an entry point: it builds the server's side with the training job's setup.
    from qtl_jax.train import checkpoint as ckptlib
    from qtl_jax.train import setup as setuplib

    config = f.config
    if int(config.total_steps) <= 0:
        raise app.UsageError("network split runs need a fixed --config.total_steps (both sides build the same "
                             "learning-rate schedule from it).")
    clients = tuple(c for c in (f.clients or "").split(",") if c)
    rounds = int(config.total_steps) * max(len(clients), 1)  # the server applies every client's steps
    workdir = os.path.abspath(f.workdir)
    # The client's initial state, drawn from the same seed; this side keeps the server partition.
    _, k_setup = setuplib.seed_keys(config)
    setup = setuplib.build_setup(config, workdir, k_setup, data=False)
    mc = config.mesh
    meshes = meshlib.split_meshes(mc.client_devices, mc.server_devices, client_fsdp=mc.client_fsdp,
                                  server_fsdp=mc.server_fsdp)
    full = setuplib.create_state(config, setup, meshes, rounds, clients=max(len(clients), 1))
    optimizers = steplib.make_split_optimizers(config.optimizer.to_dict(), rounds,
                                               {"client": full.client.params, "server": full.server.params})
    checkpointer = ckptlib.Checkpointer(workdir, keep=int(config.keep_checkpoints))
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(full.replace(client=steplib.PartitionState({}, {}, {})))
        print(f"qtl_jax.split.server: resumed {workdir} at step {int(jax.device_get(state.step))}", flush=True)
    else:
        state = setuplib.with_initial_params(config, setup, full)
        state = state.replace(client=steplib.PartitionState({}, {}, {}))
    del full
    geometry = wire.geometry_of(setup.model, config.global_batch_size, setup.model.model.max_length)
    options = ServerOptions(downlink=dl.DownlinkSpec.from_config(config.split, int(config.seed)),
                            codec_method=config.split.codec_method,
                            max_message_bytes=int(f.max_message_mb * (1 << 20)),
                            checkpoint_every=int(config.checkpoint_every), clients=clients)
    servicer = SplitServicer(setup.model, state, optimizers, meshes.server, geometry, options, checkpointer)
    sec = security_from_flags(f, "server")
    server, port = serve(servicer, f.address, sec)
    print(f"qtl_jax.split.server: listening on port {port} (tls={sec.tls}, token={'yes' if sec.token else 'no'}), "
          f"next step {servicer.step}", flush=True)
    try:
        servicer.wait_for_step(rounds)
    finally:
        # In-flight RPCs (the last reply) finish within the grace period; new ones are refused.
        server.stop(grace=5.0).wait()
        checkpointer.wait()  # a save of the last step may still be in flight
        if checkpointer.latest_step() != servicer.step:
            checkpointer.save(servicer.state, {}, {})
        checkpointer.close()
    print(f"qtl_jax.split.server: done at step {servicer.step}", flush=True)


def security_from_flags(f, side: str) -> seclib.SecurityConfig:
    token = None
    if f.token_file:
        with open(f.token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    if side == "server":
        return seclib.SecurityConfig(tls=f.tls, ca_cert=f.ca_cert, server_cert=f.cert, server_key=f.key, token=token)
    return seclib.SecurityConfig(tls=f.tls, ca_cert=f.ca_cert, client_cert=f.cert, client_key=f.key, token=token,
                                 server_name=f.server_name)


def define_flags(side: str) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/stage1.py:tiny", lock_config=True)
    flags.DEFINE_string("workdir", None, f"the {side}'s directory (checkpoints" +
                        (", metrics.jsonl" if side == "client" else "") + ")", required=True)
    flags.DEFINE_string("address", "127.0.0.1:50051", "host:port to " + ("listen on" if side == "server" else "connect to"))
    flags.DEFINE_enum("tls", "none", list(seclib.TLS_MODES), "none | server (TLS) | mutual (mTLS)")
    flags.DEFINE_string("ca_cert", None, "PEM of the CA that signed the peer's certificate")
    flags.DEFINE_string("cert", None, f"PEM certificate of this {side}")
    flags.DEFINE_string("key", None, f"PEM private key of this {side}")
    flags.DEFINE_string("token_file", None, "file holding the shared bearer token (none: no token check)")
    if side == "server":
        flags.DEFINE_string("clients", "", "sequential split learning: comma-separated client ids in turn order "
                            "(each client runs total_steps; empty: one client)")
    flags.DEFINE_float("max_message_mb", DEFAULT_MAX_MESSAGE_BYTES / (1 << 20), "largest gRPC message, MiB")


if __name__ == "__main__":
    from absl import app

    define_flags("server")
    app.run(main)
