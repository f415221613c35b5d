"""SplitFed: the clients' client models averaged through the server every K steps (FedAvg).

Several clients, each with its own data and its own copy of the client partition, train against one
server partition (:mod:`qtl_jax.split.server`); after every ``split.fedavg_every`` = K of its steps a
client uploads its client model and its weight (its number of training examples) with the ``Average``
RPC, the server waits for the round's members and answers every one of them with the same
example-weighted average, which each client adopts.

What is averaged (:func:`averaged_leaves`): the client partition's *trainable* parameters (those the
optimizer config does not freeze: connector, quantizer encoders, the token embeddings where trainable)
and its floating-point quantizer statistics (the EMA mean/variance of an ``ema``-scaled quantizer).
Frozen parameters are the same on every client (one seed, never updated) and do not travel; integer
statistics (the EMA's step count) stay local. Optimizer state stays local: each client keeps its own
Adam moments (as in FedAvg with local optimizers; averaging the moments would cost a second model's
bytes and the clients' moments describe their own data).

The server side (:class:`Rounds`) is plain Python with no gRPC: a round is identified by the clients'
step count (K, 2K, ...). Its members are the server's clients not marked absent. The round completes
when every member has uploaded, or ``timeout_s`` after its first upload: the members still missing are
then marked absent (dropped) and the average is over those who came. A dropped client becomes a member
again with its next upload. Completed rounds are cached (the last ``keep``), so a retried upload and a
late client get the same average (``replayed``); a client later than every cached round, or one that
rejoins from a checkpoint (``fetch``), gets the newest average.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from qtl_jax.split import wire
from qtl_jax.split.proto import split_pb2 as pb

# dtypes a Tensor may declare (client partitions are float32; float64 in the exact-equivalence tests).
DTYPES = ("float16", "float32", "float64", "bfloat16")
MAX_ELEMENTS = 1 << 31  # what one upload may declare in all (a bound before any allocation)

Named = dict[str, np.ndarray]


class FedAvgError(wire.WireError):
    """An upload that does not fit the server's client model or the round (the message says what)."""


def _name(prefix: str, path) -> str:
    return prefix + "".join(f"/{getattr(k, 'key', getattr(k, 'idx', k))}" for k in path)


def averaged_leaves(client, frozen) -> Named:
    """The leaves of ``client`` (a ``PartitionState``) that FedAvg averages, by name, on the host.

    ``frozen``: the client params' tree of booleans (``SplitOptimizers.client_frozen``; True = frozen).
    An abstract ``client`` (``jax.ShapeDtypeStruct`` leaves, e.g. ``qtl_jax.train.setup.abstract_state``'s)
    gives its leaves as they are, enough for :func:`template_of`.
    """
    def host(x):
        return x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(jax.device_get(x))

    out: Named = {}
    params = jax.tree_util.tree_leaves_with_path(client.params)
    flags = jax.tree_util.tree_leaves(frozen)
    if len(flags) != len(params):
        raise ValueError(f"frozen has {len(flags)} leaves, the client params {len(params)}.")
    for (path, x), is_frozen in zip(params, flags):
        if not bool(is_frozen):
            out[_name("params", path)] = host(x)
    for path, x in jax.tree_util.tree_leaves_with_path(client.batch_stats):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            out[_name("batch_stats", path)] = host(x)
    return out


def with_leaves(client, named: Mapping[str, np.ndarray]):
    """``client`` with the leaves :func:`averaged_leaves` names replaced by ``named`` (each put where, and in
    the dtype, the old leaf was; every other leaf, the optimizer state included, unchanged)."""

    def replace(prefix: str, tree):
        def one(path, x):
            name = _name(prefix, path)
            if name not in named:
                return x
            new = np.asarray(named[name])
            if new.shape != x.shape:
                raise ValueError(f"{name}: the average has shape {new.shape}, the client's leaf {x.shape}.")
            return jax.device_put(new.astype(x.dtype), x.sharding)

        return jax.tree_util.tree_map_with_path(one, tree)

    return client.replace(params=replace("params", client.params),
                          batch_stats=replace("batch_stats", client.batch_stats))


def weighted_average(contributions: Sequence[tuple[int, Mapping[str, np.ndarray]]]) -> Named:
    """``sum_i n_i x_i / sum_i n_i`` per leaf, accumulated in float64 in the order given, in each leaf's dtype."""
    if not contributions:
        raise ValueError("no contributions to average.")
    total = sum(int(n) for n, _ in contributions)
    if total <= 0:
        raise ValueError(f"the weights sum to {total}; each must be >= 1.")
    first = contributions[0][1]
    out: Named = {}
    for name, x in first.items():
        acc = np.zeros(np.shape(x), np.float64)
        for n, leaves in contributions:
            acc += int(n) * np.asarray(leaves[name], np.float64)
        out[name] = (acc / total).astype(np.asarray(x).dtype)
    return out


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to_tensors(named: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    out = []
    for name in sorted(named):
        x = np.asarray(named[name])
        dtype = x.dtype.name
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot travel; use one of {DTYPES}.")
        out.append(pb.Tensor(name=name, dtype=dtype, shape=list(x.shape),
                             data=x.astype(x.dtype.newbyteorder("<")).tobytes()))
    return out


Template = Mapping[str, tuple[tuple[int, ...], str]]  # {name: (shape, dtype name)}


def from_tensors(tensors: Iterable[pb.Tensor], template: Template | None = None) -> Named:
    """The arrays of ``tensors``, each checked (dtype, shape, length, finite; with ``template``: exactly its
    names, shapes and dtypes). Raises :class:`FedAvgError` naming the tensor."""
    out: Named = {}
    budget = MAX_ELEMENTS
    for t in tensors:
        if t.name in out:
            raise FedAvgError(f"tensor {t.name!r} is sent twice.")
        if t.dtype not in DTYPES:
            raise FedAvgError(f"tensor {t.name!r} has dtype {t.dtype!r}; use one of {DTYPES}.")
        shape = tuple(int(s) for s in t.shape)
        n = int(np.prod(shape, dtype=np.int64))
        budget -= n
        if budget < 0:
            raise FedAvgError(f"the tensors declare more than {MAX_ELEMENTS} elements in all.")
        if template is not None:
            if t.name not in template:
                raise FedAvgError(f"tensor {t.name!r} is not part of the server's client model.")
            want_shape, want_dtype = template[t.name]
            if shape != tuple(want_shape) or t.dtype != want_dtype:
                raise FedAvgError(f"tensor {t.name!r} is {t.dtype}{list(shape)}, the server's client model has "
                                  f"{want_dtype}{list(want_shape)}; run the same config on every client.")
        dtype = _np_dtype(t.dtype).newbyteorder("<")
        if len(t.data) != n * dtype.itemsize:
            raise FedAvgError(f"tensor {t.name!r} is {len(t.data)} bytes; {t.dtype}{list(shape)} needs "
                              f"{n * dtype.itemsize}.")
        x = np.frombuffer(t.data, dtype).reshape(shape).astype(_np_dtype(t.dtype))
        if not np.all(np.isfinite(x.astype(np.float64))):
            raise FedAvgError(f"tensor {t.name!r} holds non-finite values.")
        out[t.name] = x
    if template is not None and set(out) != set(template):
        missing = sorted(set(template) - set(out))
        raise FedAvgError(f"the upload lacks {len(missing)} of the client model's tensors, e.g. {missing[:3]}.")
    return out


def template_of(named: Mapping[str, np.ndarray]) -> Template:
    """``{name: (shape, dtype name)}``: what :func:`from_tensors` accepts from clients."""
    return {k: (tuple(np.shape(v)), np.dtype(v.dtype).name) for k, v in named.items()}


@dataclasses.dataclass(frozen=True)
class Average:
    """A completed round: its average, members (in the server's client order) and their total weight."""

    round: int
    leaves: Named
    members: tuple[str, ...]
    examples: int
    replayed: bool = False


class Rounds:
    """The server's FedAvg rounds (thread-safe; module docstring for the membership rule).

    Args:
      clients: the client ids (the server's ``--clients``).
      every: K; a round's number must be a positive multiple of it.
      timeout_s: how long a round waits for missing members after its first upload.
      template: ``{name: (shape, dtype)}`` of the averaged leaves (:func:`template_of`); uploads must match.
      keep: completed rounds kept for retries and late clients.
    """

    def __init__(self, clients: Sequence[str], every: int, timeout_s: float,
                 template: Template, keep: int = 4):
        if int(every) < 1 or float(timeout_s) <= 0 or int(keep) < 1 or not clients:
            raise ValueError(f"Rounds needs clients, every >= 1, timeout_s > 0 and keep >= 1; got {list(clients)}, "
                             f"{every}, {timeout_s}, {keep}.")
        self.clients, self.every, self.timeout_s = tuple(clients), int(every), float(timeout_s)
        self.template, self.keep = dict(template), int(keep)
        self._cond = threading.Condition()
        self.absent: set[str] = set()
        self._pending: dict[int, dict[str, tuple[int, Named]]] = {}
        self._deadline: dict[int, float] = {}
        self._done: dict[int, Average] = {}
        # (round, members, dropped) of every completed round, for logs and tests (the most recent).
        self.history: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = []

    def latest(self) -> Average | None:
        with self._cond:
            return self._done[max(self._done)] if self._done else None

    def wait_done(self, round_: int, timeout: float | None = None) -> bool:
        """Blocks until round ``round_`` (or a later one) has completed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: max(self._done, default=0) >= round_, timeout=timeout)

    def state_sizes(self) -> dict[str, int]:
        with self._cond:
            return {"pending_rounds": len(self._pending), "cached_rounds": len(self._done),
                    "history": len(self.history)}

    def check(self, client: str, round_: int, examples: int) -> None:
        """Raises :class:`FedAvgError` unless ``client`` may upload round ``round_`` with weight ``examples``."""
        if client not in self.clients:
            raise FedAvgError(f"client {client!r} is not one of {list(self.clients)}.")
        if round_ <= 0 or round_ % self.every:
            raise FedAvgError(f"round={round_}: rounds are positive multiples of fedavg_every={self.every}.")
        if examples < 1:
            raise FedAvgError(f"examples={examples}: a client's weight must be >= 1.")

    def submit(self, client: str, round_: int, examples: int, leaves: Named) -> Average:
        """Adds ``client``'s upload to round ``round_`` and returns the round's average (blocks until it is done)."""
        self.check(client, round_, examples)
        with self._cond:
            self.absent.discard(client)  # it is alive: a member of the rounds to come
            if round_ in self._done:
                return dataclasses.replace(self._done[round_], replayed=True)
            frontier = max([*self._done, *self._pending], default=0)
            if round_ < frontier and round_ not in self._pending:
                # A late client (it rejoined, or was dropped): the newest average. A round is only ever left
                # behind after it completed, so there is one.
                return dataclasses.replace(self._done[max(self._done)], replayed=True)
            uploads = self._pending.setdefault(round_, {})
            if not uploads:
                self._deadline[round_] = time.monotonic() + self.timeout_s
            uploads.setdefault(client, (int(examples), leaves))  # a retry waits for the same round
            self._cond.notify_all()
            while round_ not in self._done:
                missing = [c for c in self.clients if c not in self.absent and c not in uploads]
                left = self._deadline[round_] - time.monotonic()
                if missing and left > 0:
                    self._cond.wait(timeout=left)
                    continue
                self._complete(round_, missing)
            return self._done[round_]

    def _complete(self, round_: int, missing: list[str]) -> None:
        """Averages round ``round_`` over its uploads; ``missing`` members are marked absent (lock held)."""
        uploads = self._pending.pop(round_)
        del self._deadline[round_]
        self.absent.update(missing)
        # In the server's client order, not arrival order: the float sums, hence the average, are then the same
        # whoever came first (an in-process simulation of the same round gives the same bits).
        members = tuple(c for c in self.clients if c in uploads)
        average = weighted_average([uploads[c] for c in members])
        self._done[round_] = Average(round_, average, members, sum(n for n, _ in uploads.values()))
        for old in sorted(self._done)[:-self.keep]:
            del self._done[old]
        self.history.append((round_, members, tuple(missing)))
        del self.history[:-1024]
        self._cond.notify_all()


def average_to_reply(average: Average | None) -> pb.AverageReply:
    if average is None:
        return pb.AverageReply(protocol_version=wire.PROTOCOL_VERSION, round=0)
    return pb.AverageReply(protocol_version=wire.PROTOCOL_VERSION, round=average.round,
                           tensors=to_tensors(average.leaves), members=list(average.members),
                           examples=average.examples, replayed=average.replayed)


def describe(average: Average) -> str:
    return (f"round {average.round}: {len(average.members)} clients ({', '.join(average.members)}), "
            f"{average.examples} examples" + (" (replayed)" if average.replayed else ""))


def client_round(link, step: int, client, frozen, examples: int, fetch: bool = False) -> tuple[Any, Average | None]:
    """One client's side of a round: uploads its averaged leaves after step ``step`` through ``link`` (a
    :class:`~qtl_jax.split.grpc_link.GrpcServerHalf`) and returns ``(client partition with the average,
    the average)``. ``fetch``: upload nothing, adopt the newest average (unchanged when there is none)."""
    mine = averaged_leaves(client, frozen)
    average = link.average(0 if fetch else step, {} if fetch else mine, examples=0 if fetch else examples, fetch=fetch)
    if average is None:
        return client, None
    if set(average.leaves) != set(mine):
        raise ValueError(f"the server's average has tensors {sorted(average.leaves)[:3]}..., this client averages "
                         f"{sorted(mine)[:3]}...; run the same config (and freezing rules) on every client.")
    return with_leaves(client, average.leaves), average
