r"""The split-learning server: holds the server partition (quantizer decoders, LLM, loss) and its optimizer.

It receives integer codes, masks and labels (``Step``), runs the server half of the split step
(:func:`make_server_update`: the same computation as ``server_update`` in :mod:`qtl_jax.split.step`)
and answers with ∂loss/∂ẑ at the real positions plus its metrics. It never sees pixels or token ids.

Exactly-once steps: the server applies step ``s`` only when ``s`` is the step it expects next; a request
for the step it applied last (a client retrying after a lost reply) gets the cached reply and changes
nothing; anything else is ``FAILED_PRECONDITION`` naming the expected step. ``Join`` aligns the two sides
after a restart: a client ahead of the server is told the server's step and rewinds itself; a client
behind the server makes it rewind to its own checkpoint at the client's step only where the rewind
policy allows (``ServerOptions.rewind``: by default only a server with a single client, for the id that
client fixed at its first Join; never with several clients, whose steps a rewind would erase). A rewind
never deletes a checkpoint: the later ones are moved aside (``<step>.rewound``).

SplitFed (``ServerOptions.fedavg_every`` = K, ``split.fedavg_every`` on the command line): there is no turn
order, each client's steps are applied as they arrive (exactly once per client, each client's next step
kept and checkpointed), and the third RPC, ``Average``, collects the clients' client models after every
K of their steps and answers each with their example-weighted average (:mod:`qtl_jax.split.fedavg`).

Every request is untrusted (see docs/network_split.md, "Threat model"): the RPCs take raw bytes and parse
them here (:mod:`qtl_jax.split.guard`), so a message that is not protobuf is ``INVALID_ARGUMENT``; client
ids, metadata, message sizes and concurrent calls are bounded, and so is everything the server keeps per
request (its step history, its replay cache). Refusals are logged at most once a minute per kind.

Command line (same training config as ``train.py``; network options are flags)::

    python -m qtl_jax.split.server --config=configs/stage1.py:tiny --workdir=/tmp/qtl_server \
        --address=127.0.0.1:50051 --tls=mutual --ca_cert=pki/ca.pem --cert=pki/server.pem --key=pki/server.key

The command line builds its side as a training run would (:mod:`qtl_jax.train.setup`: the model, the
state drawn from ``config.seed``, a previous stage's or an official checkpoint's params) and keeps the
server partition; it stops after ``total_steps`` steps of every client.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from concurrent import futures

import grpc
import jax
import numpy as np

from qtl_jax.models import quantized as qm
from qtl_jax.split import downlink as dl
from qtl_jax.split import fedavg
from qtl_jax.split import link as linklib
from qtl_jax.split import guard
from qtl_jax.split import mesh as meshlib
from qtl_jax.split import security as seclib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
SERVICE = pb.DESCRIPTOR.services_by_name["SplitLearning"].full_name
# Who may make the server rewind on Join: 'own_client' (a single-client server, for the id fixed at the
# first Join) or 'never' (an operator restarts the server from an older checkpoint: --restore_step).
REWIND_POLICIES = ("own_client", "never")
REWOUND_SUFFIX = ".rewound"
_LOG = logging.getLogger("qtl_jax.split.server")


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
    # SplitFed (split.fedavg_every = K > 0, needs clients): no turn order, each client's steps are applied
    # in the order they arrive (exactly once per client), and the client models are averaged through the
    # Average RPC every K steps (qtl_jax.split.fedavg). A round waits at most fedavg_timeout_s after its
    # first upload for the others; the missing ones are dropped from it.
    fedavg_every: int = 0
    fedavg_timeout_s: float = 120.0
    # Sequence lengths below max_length a batch may be cut to (wire.accepted_lengths of data.length_buckets):
    # one compiled program each; any other length is refused.
    lengths: tuple[int, ...] = ()
    # Bounds on what a peer can make the server hold. A call's metadata (all keys and values) above
    # max_metadata_bytes is refused by gRPC; calls beyond max_concurrent_rpcs get RESOURCE_EXHAUSTED, so
    # requests in memory stay below max_concurrent_rpcs * max_message_bytes.
    max_metadata_bytes: int = 16 << 10
    max_concurrent_rpcs: int = 16
    history: int = 1024  # entries kept in applied_steps / applied_by / rewinds (the most recent)
    rewind: str = "own_client"  # see REWIND_POLICIES
    # Checkpoints that rewinds moved aside (<step>.rewound) are never deleted by the server; at most this
    # many may accumulate before further rewinds are refused (an operator clears them).
    max_rewound: int = 16
    log_interval_s: float = 60.0  # at most one log line per kind of refused request per interval

    def __post_init__(self):
        if self.rewind not in REWIND_POLICIES:
            raise ValueError(f"rewind={self.rewind!r}: use one of {REWIND_POLICIES}.")
        for client_id in self.clients:
            guard.check_client_id(client_id)
        if len(set(self.clients)) != len(self.clients):
            raise ValueError(f"clients={list(self.clients)} names a client twice.")
        if int(self.fedavg_every) < 0 or float(self.fedavg_timeout_s) <= 0:
            raise ValueError(f"fedavg_every must be >= 0 and fedavg_timeout_s > 0, got {self.fedavg_every} and "
                             f"{self.fedavg_timeout_s}.")
        if self.fedavg_every and not self.clients:
            raise ValueError(f"fedavg_every={self.fedavg_every} averages several clients' models: list them in "
                             "clients (--clients=a,b,c on the command line).")
        for name in ("max_message_bytes", "max_metadata_bytes", "max_concurrent_rpcs", "max_workers", "history"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


class StepError(Exception):
    """A request that cannot be served; carries the gRPC status code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class SplitServicer(pb_grpc.SplitLearningServicer):
    """The server partition's state and the RPCs (Join, Step, Average). Steps are applied one at a time, in order.

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
      client_template: with ``options.fedavg_every``: ``{name: (shape, dtype)}`` of the client leaves
        FedAvg averages (:func:`qtl_jax.split.fedavg.template_of`); uploads must match it.
    """

    def __init__(self, config: qm.QuantizedTinyLlavaConfig, state: steplib.TrainState,
                 optimizers: steplib.SplitOptimizers, mesh, geometry: wire.Geometry,
                 options: ServerOptions | None = None, checkpointer=None, update=None, client_template=None):
        self.config, self.mesh, self.geometry = config, mesh, geometry
        self.options = options or ServerOptions()
        self.state = state
        self.checkpointer = checkpointer
        self._update = update or make_server_update(config, optimizers)
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        # Per client turn: (local step, digest of the request, reply) of its last applied step, for retries.
        self._last: dict[int, tuple[int, bytes, pb.DownlinkReply]] = {}
        # The most recent (local) steps applied, their clients and the rewinds (from, to), for tests and logs.
        history = int(self.options.history)
        self.applied_steps: collections.deque[int] = collections.deque(maxlen=history)
        self.applied_by: collections.deque[str] = collections.deque(maxlen=history)
        self.rewinds: collections.deque[tuple[int, int]] = collections.deque(maxlen=history)
        # A single-client server's client: the id of the first successful Join (or applied step).
        self.client_id: str | None = None
        self._log = guard.RateLimitedLog(_LOG.warning, self.options.log_interval_s)
        o = self.options
        self.rounds: fedavg.Rounds | None = None
        # SplitFed: each client's next step (no turn order to derive it from); checkpointed with the state.
        self._next: dict[int, int] = {}
        if o.fedavg_every:
            if client_template is None:
                raise ValueError("fedavg_every needs client_template (the averaged client leaves' shapes).")
            self.rounds = fedavg.Rounds(o.clients, o.fedavg_every, o.fedavg_timeout_s, client_template)
            self._next = {k: 0 for k in range(len(o.clients))}

    def client_steps(self) -> dict[str, int]:
        """SplitFed: each client's next step, by id (what a server checkpoint records besides the state)."""
        with self._lock:
            return {c: self._next[k] for k, c in enumerate(self.options.clients)} if self._next else {}

    def set_client_steps(self, steps: dict[str, int]) -> None:
        """SplitFed: each client's next step, from a checkpoint's record (:meth:`client_steps`)."""
        with self._lock:
            for k, c in enumerate(self.options.clients):
                self._next[k] = int(steps.get(c, 0))

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def state_sizes(self) -> dict[str, int]:
        """How much the server keeps because of requests: entries, and the bytes of the client ids held.

        Each is bounded by the options (``history``, one cached reply per client, ids of at most 64
        bytes), whatever the requests were; ``tests/test_server_faults.py`` checks they stay so.
        """
        with self._lock:
            ids = [*self.applied_by, *([self.client_id] if self.client_id else [])]
            return {"applied_steps": len(self.applied_steps), "applied_by": len(self.applied_by),
                    "rewinds": len(self.rewinds), "cached_replies": len(self._last),
                    "client_id_bytes": sum(len(i.encode()) for i in ids)}

    def wait_for_step(self, step: int, timeout: float | None = None) -> bool:
        """Blocks until the server has applied ``step`` steps (woken by each applied step); False on timeout."""
        with self._turn:
            return self._turn.wait_for(lambda: self.step >= step, timeout=timeout)

    # -- RPCs -------------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        return self._answer("Join", self.join, request, context)

    def Step(self, request: pb.UplinkRequest, context) -> pb.DownlinkReply:
        def timed(req):
            t0 = time.perf_counter()
            reply = self.apply(req)
            # The client subtracts it from the RPC's wall time: what is left is the network's share.
            reply.metrics["server_seconds"] = time.perf_counter() - t0
            return reply

        return self._answer("Step", timed, request, context)

    def Average(self, request: pb.AverageRequest, context) -> pb.AverageReply:
        return self._answer("Average", self.average, request, context)

    def _answer(self, method: str, handler, request, context):
        """``handler(request)``, or the call ended with the status its error maps to."""
        try:
            return handler(request)
        except StepError as e:
            self.refuse(context, method, e.code, str(e))
        except wire.VersionError as e:
            self.refuse(context, method, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except wire.WireError as e:  # fedavg.FedAvgError is one
            self.refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def refuse(self, context, method: str, code: grpc.StatusCode, message: str) -> None:
        """Ends the call with ``code`` and ``message``, logged at most once per interval per (method, code)."""
        self._log(f"{method} {code.name}", f"qtl_jax.split.server: refused a {method} request: {code.name}: "
                                           f"{message}")
        context.abort(code, message)

    # -- logic (callable without gRPC) ------------------------------------------------------------

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """The handshake: version, client id and geometry checks, then the rewind policy (module docstring).

        A client behind the server's step for it makes the server rewind only if :meth:`may_rewind`;
        otherwise the reply carries the server's step and the client must realign its own side.
        """
        wire.check_version(request.protocol_version)
        guard.check_client_id(request.client_id)
        if request.client_step < 0:
            raise wire.WireError(f"client_step={request.client_step}: steps are >= 0.")
        problems = self.geometry.mismatch(wire.Geometry.from_proto(request.geometry))
        if problems:
            raise wire.WireError("the client's model does not match the server's: " + "; ".join(problems))
        if request.fedavg_every != self.options.fedavg_every:
            raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"the client averages its model every {request.fedavg_every} steps (split.fedavg_every; 0: "
                            f"never), this server every {self.options.fedavg_every}; give every client and the server "
                            "the same split.fedavg_every.")
        with self._lock:
            k = self._client_turn(request.client_id)
            client_step, server_step = int(request.client_step), self._local_step(k)
            if client_step < server_step:
                if self.may_rewind(request.client_id):
                    self._rewind(client_step)
                else:
                    self._log("Join no rewind", f"qtl_jax.split.server: client {request.client_id!r} joined at its "
                              f"step {client_step}, behind the server's step {server_step} for it; not rewinding "
                              f"({self._no_rewind_reason()}), the client realigns its own side.")
            self._fix_client(request.client_id)
            return pb.JoinReply(protocol_version=wire.PROTOCOL_VERSION, server_step=self._local_step(k),
                                grad_dtype=wire.DOWNLINK_KINDS[self.options.downlink.kind],
                                codec_method=self.options.codec_method,
                                downlink=wire.coding_to_proto(self.options.downlink),
                                fedavg_every=self.options.fedavg_every)

    def average(self, request: pb.AverageRequest) -> pb.AverageReply:
        """SplitFed: adds the client's model to its round and answers with the round's average (blocks until
        the round's members have uploaded or its deadline has passed); ``fetch``: the newest average."""
        wire.check_version(request.protocol_version)
        guard.check_client_id(request.client_id)
        if self.rounds is None:
            raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                            "this server does not average client models (split.fedavg_every=0); start it with the "
                            "clients' split.fedavg_every.")
        if request.client_id not in self.options.clients:
            raise StepError(grpc.StatusCode.PERMISSION_DENIED, f"client_id={request.client_id!r} is not one of this "
                            f"server's clients {list(self.options.clients)}.")
        if request.fetch:
            if request.tensors or request.round or request.examples:
                raise fedavg.FedAvgError("a fetch carries no round, examples or tensors.")
            return fedavg.average_to_reply(self.rounds.latest())
        self.rounds.check(request.client_id, int(request.round), int(request.examples))
        k = self.options.clients.index(request.client_id)
        with self._lock:
            applied = self._next[k]
        if request.round > applied:
            raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"round {request.round} comes after the client's step {request.round}, but the server has "
                            f"applied only {applied} of its steps; a client averages after that step's exchange.")
        leaves = fedavg.from_tensors(request.tensors, self.rounds.template)
        return fedavg.average_to_reply(self.rounds.submit(request.client_id, int(request.round),
                                                          int(request.examples), leaves))

    def may_rewind(self, client_id: str) -> bool:
        """Whether a Join from ``client_id`` behind the server may rewind it (see ``ServerOptions.rewind``).

        With several clients never: the others' steps since would be lost. With one client, under
        'own_client', only that client (the id fixed at the first Join; ids are checked before this).
        """
        return self.options.rewind == "own_client" and not self.options.clients and \
            self.client_id in (None, client_id)

    def _no_rewind_reason(self) -> str:
        if self.options.clients:
            return "several clients share this server; an operator rewinds it with --restore_step"
        return "the server was started with --rewind=never"

    def _fix_client(self, client_id: str) -> None:
        """A single-client server keeps the first client id it serves and refuses any other (lock held)."""
        if self.options.clients:
            return
        self._client_turn(client_id)
        self.client_id = client_id

    def _client_turn(self, client_id: str) -> int:
        """Client ``client_id``'s place in the turn order (0 with a single client)."""
        if not self.options.clients:
            if self.client_id is not None and client_id != self.client_id:
                raise StepError(grpc.StatusCode.PERMISSION_DENIED,
                                f"client_id={client_id!r}: this server serves client {self.client_id!r} (the id of its "
                                "first Join or step); several clients need the server's --clients list.")
            return 0
        if client_id not in self.options.clients:
            raise StepError(grpc.StatusCode.PERMISSION_DENIED,
                            f"client_id={client_id!r} is not one of this server's clients {list(self.options.clients)}.")
        return self.options.clients.index(client_id)

    def _local_step(self, k: int) -> int:
        """How many steps client ``k`` has had applied: its next local step."""
        if self._next:
            return self._next[k]
        n = max(len(self.options.clients), 1)
        return max(0, (self.step - k + n - 1) // n)

    def _rewind(self, step: int) -> None:
        """Back to this server's own checkpoint at ``step`` (its client restarted from an older checkpoint).

        Later checkpoints belong to the abandoned future: they are moved aside (``<step>.rewound``), never
        deleted, so the replayed steps can save under their numbers. At most ``max_rewound`` of them are
        kept; a rewind that would exceed that is refused until an operator clears them.
        """
        have = [] if self.checkpointer is None else self.checkpointer.all_steps()
        if step not in have:
            raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"the client restarts at step {step} but the server is at step {self.step} and has no "
                            f"checkpoint of step {step} (it has {sorted(have)}); restart the client from one of those "
                            "steps, or give both sides the same checkpoint_every.")
        self.checkpointer.wait()
        later = [s for s in have if s > step]
        aside = self.checkpointer.moved_aside(REWOUND_SUFFIX)
        if later and len(aside) + len(later) > self.options.max_rewound:
            raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"a rewind to step {step} would move checkpoints {later} aside, but "
                            f"{len(aside)} checkpoints earlier rewinds moved aside are still in "
                            f"{self.checkpointer.directory} (*{REWOUND_SUFFIX}, at most {self.options.max_rewound}); "
                            "the server's operator must move or delete them first.")
        before = self.step
        try:
            state, _ = self.checkpointer.restore(self.state, step=step)
        except (OSError, ValueError) as e:  # a corrupt or unreadable checkpoint (CorruptCheckpointError is one)
            raise StepError(grpc.StatusCode.DATA_LOSS,
                            f"the server cannot rewind to its checkpoint of step {step}: {' '.join(str(e).split())}; "
                            f"it stays at step {before}. Restart the client from a later checkpoint.") from e
        self.state = state
        moved = [self.checkpointer.move_aside(s, REWOUND_SUFFIX) for s in later]
        self._last = {}
        self.rewinds.append((before, step))
        print(f"qtl_jax.split.server: rewound from step {before} to its checkpoint of step {step} (a client "
              f"restarted there)" + (f"; moved {', '.join(moved)} aside" if moved else ""), flush=True)

    def send(self, server: steplib.PartitionState, k: int, step: int, down, uplink):
        """``(message, server)``: client ``k``'s downlink of its step ``step`` (the in-process server half's
        computation, :func:`qtl_jax.split.link.send_downlink`) and the server partition with its residual."""
        spec = self.options.downlink
        return linklib.send_downlink(spec, server, str(k), down, uplink, dl.step_key(spec.seed, k, step))

    def apply(self, request: pb.UplinkRequest) -> pb.DownlinkReply:
        """Applies the request's step exactly once (a retry of the last step gets the cached reply)."""
        wire.check_version(request.protocol_version)
        guard.check_client_id(request.client_id)
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
            if n > 1 and not self._next and target > self.step:
                if not self._turn.wait_for(lambda: self.step >= target, timeout=self.options.turn_timeout_s):
                    raise StepError(grpc.StatusCode.UNAVAILABLE,
                                    f"client {request.client_id!r} step {request.step} is still waiting for its turn "
                                    f"(the server is at global step {self.step}); retry.")
            if (request.step != self._next[k]) if self._next else (target != self.step):
                raise StepError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"step {request.step} is out of order: the server applies step {self._local_step(k)} "
                                "next; call Join with the client's step to realign.")
            up = wire.uplink_from_proto(request, self.geometry, self.options.lengths)
            self._fix_client(request.client_id)
            received = jax.tree_util.tree_map(
                lambda x: jax.device_put(x, meshlib.batch_sharding(self.mesh, np.ndim(x))), up)
            server, down, metrics = self._update(self.state.server, received)
            message, server = self.send(server, k, int(request.step), down, received)
            self.state = self.state.replace(server=server, step=self.state.step + 1)
            if self._next:
                self._next[k] += 1
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
                self.checkpointer.save(self.state, self._record(), {})
            return reply


    def _record(self) -> dict:
        """What a checkpoint keeps besides the state (lock held): SplitFed's per-client steps."""
        if not self._next:
            return {}
        return {"client_steps": {c: self._next[k] for k, c in enumerate(self.options.clients)}}

    def save(self) -> None:
        """Checkpoints the state now (the command line's last save)."""
        with self._lock:
            self.checkpointer.save(self.state, self._record(), {})


def _digest(request: pb.UplinkRequest) -> bytes:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


def grpc_options(max_message_bytes: int, max_metadata_bytes: int | None = None) -> list[tuple[str, int]]:
    options = [("grpc.max_receive_message_length", int(max_message_bytes)),
               ("grpc.max_send_message_length", int(max_message_bytes))]
    if max_metadata_bytes is not None:
        options.append(("grpc.max_metadata_size", int(max_metadata_bytes)))
    return options


def method_handlers(servicer: SplitServicer) -> grpc.GenericRpcHandler:
    """The service's RPCs on raw request bytes, parsed by :func:`qtl_jax.split.guard.parse`.

    (``add_SplitLearningServicer_to_server`` would let gRPC deserialize: a request that is not protobuf
    then gets INTERNAL and a traceback in the log, per request.)
    """

    def raw(name: str, request_type, reply_type) -> grpc.RpcMethodHandler:
        method = getattr(servicer, name)

        def handle(data: bytes, context):
            try:
                request = guard.parse(request_type, data)
            except wire.WireError as e:
                servicer.refuse(context, name, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return method(request, context)

        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None,
                                                   response_serializer=reply_type.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Join": raw("Join", pb.JoinRequest, pb.JoinReply),
        "Step": raw("Step", pb.UplinkRequest, pb.DownlinkReply),
        "Average": raw("Average", pb.AverageRequest, pb.AverageReply),
    })


def serve(servicer: SplitServicer, address: str, security: seclib.SecurityConfig) -> tuple[grpc.Server, int]:
    """Starts a gRPC server for ``servicer`` on ``address`` (``host:0`` picks a free port); returns (server, port)."""
    o = servicer.options
    interceptors = [seclib.TokenAuthInterceptor(security.token)] if security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=o.max_workers), interceptors=interceptors,
                         options=grpc_options(o.max_message_bytes, o.max_metadata_bytes),
                         maximum_concurrent_rpcs=o.max_concurrent_rpcs)
    server.add_generic_rpc_handlers((method_handlers(servicer),))
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
    sec = security_from_flags(f, "server")  # a missing token or certificate file fails before the model is built
    clients = tuple(c for c in (f.clients or "").split(",") if c)
    if int(config.split.fedavg_every) and len(clients) < 2:
        raise app.UsageError(f"split.fedavg_every={config.split.fedavg_every} averages several clients' models: "
                             "name them with --clients=a,b,c.")
    rounds = int(config.total_steps) * max(len(clients), 1)  # the server applies every client's steps
    workdir = os.path.abspath(f.workdir)
    # The client's initial state, drawn from the same seed; this side keeps the server partition.
    _, k_setup = setuplib.seed_keys(config)
    setup = setuplib.build_setup(config, workdir, k_setup, data=False)
    mc = config.mesh
    meshes = meshlib.split_meshes(mc.client_devices, mc.server_devices, client_fsdp=mc.client_fsdp,
                                  server_fsdp=mc.server_fsdp)
    # Shapes and shardings only (nothing initialised): a restore reads into it, a fresh start builds its own.
    like = setuplib.abstract_state(config, setup, meshes, rounds, clients=max(len(clients), 1))
    optimizers = steplib.make_split_optimizers(config.optimizer.to_dict(), rounds,
                                               {"client": like.client.params, "server": like.server.params})
    checkpointer = ckptlib.Checkpointer(workdir, keep=int(config.keep_checkpoints),
                                        fallback=bool(config.checkpoint_fallback))
    empty = steplib.PartitionState({}, {}, {})
    restore_step = f.restore_step
    if restore_step is not None and restore_step not in checkpointer.all_steps():
        raise ValueError(f"--restore_step={restore_step}: {checkpointer.directory} has no checkpoint of that step "
                         f"(it has {checkpointer.all_steps()}).")
    every = int(config.split.fedavg_every)
    # SplitFed: the shapes of the client leaves the clients average (uploads must match them).
    template = fedavg.template_of(fedavg.averaged_leaves(like.client, optimizers.client_frozen)) if every else None
    record = {}
    if restore_step is not None or checkpointer.latest_step() is not None:
        state, record = checkpointer.restore(like.replace(client=empty), step=restore_step)
        print(f"qtl_jax.split.server: resumed {workdir} at step {int(jax.device_get(state.step))}", flush=True)
        for later in [s for s in checkpointer.all_steps() if restore_step is not None and s > restore_step]:
            # Kept on disk, out of the way of the steps run again.
            print(f"qtl_jax.split.server: moved {checkpointer.move_aside(later, REWOUND_SUFFIX)} aside", flush=True)
    else:
        # This side holds (and a network stage-1 server saved) only the server partition.
        state = setuplib.initial_state(config, setup, meshes, rounds, clients=max(len(clients), 1),
                                       partitions=("server",))
        # As train.py's workdirs: so that a next stage's init.from_workdir (or eval.py) can read the model.
        ckptlib.write_config(workdir, json.loads(config.to_json_best_effort()))
    geometry = wire.geometry_of(setup.model, config.global_batch_size, setup.model.model.max_length)
    options = ServerOptions(downlink=dl.DownlinkSpec.from_config(config.split, int(config.seed)),
                            codec_method=config.split.codec_method,
                            max_message_bytes=int(f.max_message_mb * (1 << 20)),
                            checkpoint_every=int(config.checkpoint_every), clients=clients, rewind=f.rewind,
                            fedavg_every=every, fedavg_timeout_s=float(config.split.fedavg_timeout_s),
                            lengths=wire.accepted_lengths(config.data.length_buckets, geometry.seq_len),
                            # a worker per client waiting for its turn or its round, and one for its next call
                            max_workers=max(4, 2 * len(clients) + 2))
    servicer = SplitServicer(setup.model, state, optimizers, meshes.server, geometry, options, checkpointer,
                             client_template=template)
    if every and "client_steps" in record:
        servicer.set_client_steps(record["client_steps"])
    server, port = serve(servicer, f.address, sec)
    print(f"qtl_jax.split.server: listening on port {port} (tls={sec.tls}, token={'yes' if sec.token else 'no'}), "
          f"next step {servicer.step}", flush=True)
    try:
        servicer.wait_for_step(rounds)
        if every and int(config.total_steps) >= every:
            # The clients' last round comes after their last step: answer it before stopping.
            servicer.rounds.wait_done(int(config.total_steps) // every * every)
    finally:
        # In-flight RPCs (the last reply) finish within the grace period; new ones are refused.
        server.stop(grace=5.0).wait()
        checkpointer.wait()  # a save of the last step may still be in flight
        if checkpointer.latest_step() != servicer.step:
            servicer.save()
        checkpointer.close()
    print(f"qtl_jax.split.server: done at step {servicer.step}", flush=True)


def security_from_flags(f, side: str) -> seclib.SecurityConfig:
    seclib.check_files({name: f[name].value for name in ("token_file", "ca_cert", "cert", "key")})
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
        flags.DEFINE_enum("rewind", "own_client", list(REWIND_POLICIES),
                          "who may make the server rewind to an older checkpoint on Join: own_client (a single "
                          "client, the id of its first Join; never with --clients) | never")
        flags.DEFINE_integer("restore_step", None, "start from this checkpoint step instead of the newest (an "
                             "operator's rewind; later checkpoints stay on disk)", lower_bound=0)
    flags.DEFINE_float("max_message_mb", DEFAULT_MAX_MESSAGE_BYTES / (1 << 20), "largest gRPC message, MiB")


if __name__ == "__main__":
    from qtl_jax import cli

    define_flags("server")
    cli.run_absl(main, prog="python -m qtl_jax.split.server")  # bad input: one line and a non-zero exit
