"""``GrpcServerHalf``: the server half of the split step in another process, over gRPC.

``exchange(step, uplink)`` serialises the codes (``ans`` or ``packed``), masks and labels
(:mod:`qtl_jax.split.wire`), sends them with a deadline and returns the gradients of the server's reply as
float32 arrays of the step's shapes, with the server's metrics and the byte counts. ``join(client_step)``
is the handshake that aligns the two sides after a restart of either.

Retries: a call that fails with ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED`` (server restarting, reply lost)
is sent again with the same step id, up to ``retries`` times with a growing pause (at most 5 s); the
server applies a step once and answers a retry of it from its cache, so a retry never updates twice.

Byte accounting from the wire: the metrics of every exchange hold ``wire_uplink_bytes`` /
``wire_downlink_bytes`` (serialized protobuf sizes of the request and the reply, what gRPC framed and
sent) and ``wire_replayed`` (1 when the reply came from the server's cache) next to the theoretical
``uplink_bytes_{packed,ans,fp16}`` / ``downlink_bytes`` of :mod:`qtl_jax.split.link`; ``rpc_seconds`` (the
call's wall time) and the server's ``server_seconds`` (its time from request to reply).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import grpc
import jax
import numpy as np

from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.split import downlink as dl
from qtl_jax.split import fedavg
from qtl_jax.split import security as seclib
from qtl_jax.split import wire
from qtl_jax.split.link import CODEC_METHODS, ServerHalf, StepMismatchError, roundtrip_counts, uplink_counts
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class GrpcServerHalf(ServerHalf):
    """The client's end of a connection to a :mod:`qtl_jax.split.server`.

    Args:
      target: ``host:port`` of the server.
      geometry: this client's :class:`~qtl_jax.split.wire.Geometry` (checked by the server on every call).
      security: TLS mode, certificates and token.
      client_id: a name for this client in the server's logs and errors (its turn with several clients).
      codec_method: 'ans' (entropy coded) or 'packed' (fixed width) for the codes.
      timeout_s: deadline of each RPC (the first step includes the server's compilation).
      retries: how many times a retryable failure is re-sent.
      retry_pause_s: the pause before the first re-send (growing by this much per attempt, at most 5 s).
      max_message_bytes: the largest message sent or accepted.
      downlink: the downlink this client's config asks for; ``join`` refuses a server that sends another
        (None: accept whatever the server sends).
      fedavg_every: SplitFed's K (``split.fedavg_every``; 0: no averaging); ``join`` refuses a server with
        another K, and :meth:`average` takes part in its rounds.
    """

    def __init__(self, target: str, geometry: wire.Geometry, security: seclib.SecurityConfig | None = None, *,
                 client_id: str = "client-0", codec_method: str = "ans", timeout_s: float = 300.0,
                 retries: int = 3, retry_pause_s: float = 0.5, max_message_bytes: int = 64 << 20,
                 downlink: dl.DownlinkSpec | None = None, fedavg_every: int = 0):
        if codec_method not in CODEC_METHODS:
            raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s} and {retries}.")
        self.target, self.geometry = target, geometry
        self.security = security or seclib.SecurityConfig()
        self.client_id, self.codec_method, self.downlink = client_id, codec_method, downlink
        self.fedavg_every = int(fedavg_every)
        self.timeout_s, self.retries, self.retry_pause_s = float(timeout_s), int(retries), float(retry_pause_s)
        options = [("grpc.max_receive_message_length", int(max_message_bytes)),
                   ("grpc.max_send_message_length", int(max_message_bytes))]
        self.channel = seclib.open_channel(target, self.security, options)
        self.stub = pb_grpc.SplitLearningStub(self.channel)
        self._metadata = seclib.call_metadata(self.security)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], geometry: wire.Geometry, codec_method: str = "ans",
                    downlink: dl.DownlinkSpec | None = None, fedavg_every: int = 0) -> GrpcServerHalf:
        """From a training config's ``split.server`` section (a plain dict; ``address`` must be set)."""
        token = None
        if section.get("token_file"):
            with open(section["token_file"], encoding="utf-8") as f:
                token = f.read().strip()
        security = seclib.SecurityConfig(tls=section["tls"], ca_cert=section["ca_cert"], client_cert=section["cert"],
                                         client_key=section["key"], token=token, server_name=section["server_name"])
        return cls(section["address"], geometry, security, client_id=section["client_id"], codec_method=codec_method,
                   timeout_s=float(section["rpc_timeout_s"]), retries=int(section["retries"]),
                   max_message_bytes=int(float(section["max_message_mb"]) * (1 << 20)), downlink=downlink,
                   fedavg_every=fedavg_every)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(min(self.retry_pause_s * (attempt + 1), 5.0))
        raise AssertionError("unreachable")

    def join(self, client_step: int) -> int:
        """Handshake: version and geometry check; returns the server's next step (it rewinds if it is ahead)."""
        reply = self._call(self.stub.Join, pb.JoinRequest(
            protocol_version=wire.PROTOCOL_VERSION, client_id=self.client_id, geometry=self.geometry.to_proto(),
            client_step=int(client_step), fedavg_every=self.fedavg_every))
        wire.check_version(reply.protocol_version)
        if self.downlink is not None:
            theirs = wire.coding_from_proto(reply.downlink)
            if not wire.same_coding(theirs, self.downlink):
                raise ValueError(f"the server at {self.target} sends the downlink as {theirs.describe()}, this client's "
                                 f"config asks for {self.downlink.describe()}; give both sides the same split.downlink* "
                                 "settings.")
        return int(reply.server_step)

    def average(self, round_: int, leaves: Mapping[str, np.ndarray], examples: int, fetch: bool = False):
        """SplitFed: uploads this client's averaged leaves after its step ``round_`` with weight ``examples`` and
        returns the round's :class:`~qtl_jax.split.fedavg.Average` (blocks until the server has it); ``fetch``:
        uploads nothing and returns the newest average (None when no round has completed).

        A retry after a lost reply gets the same average: the server caches completed rounds.
        """
        request = pb.AverageRequest(protocol_version=wire.PROTOCOL_VERSION, client_id=self.client_id,
                                    round=int(round_), examples=int(examples), tensors=fedavg.to_tensors(leaves),
                                    fetch=bool(fetch))
        try:
            reply = self._call(self.stub.Average, request)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ValueError(f"the server at {self.target} has no Average RPC (an older qtl_jax): run the same "
                                 "release on every client and the server.") from e
            raise
        wire.check_version(reply.protocol_version)
        if reply.round == 0:
            return None
        if not fetch and reply.round != round_ and not reply.replayed:
            raise wire.WireError(f"the server answered round {reply.round} to this client's round {round_}.")
        return fedavg.Average(int(reply.round), fedavg.from_tensors(reply.tensors), tuple(reply.members),
                              int(reply.examples), bool(reply.replayed))

    def exchange(self, step: int, uplink: Uplink) -> tuple[Downlink, dict[str, Any]]:
        host = jax.device_get(uplink)
        request = wire.uplink_to_proto(host, step=step, client_id=self.client_id, geometry=self.geometry,
                                       codec_method=self.codec_method)
        t0 = time.perf_counter()
        try:
            reply = self._call(self.stub.Step, request)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "out of order" in (e.details() or ""):
                raise StepMismatchError(e.details()) from e
            raise
        rpc_seconds = time.perf_counter() - t0
        message = wire.downlink_from_proto(reply, host, step=step)
        metrics: dict[str, Any] = dict(reply.metrics)
        # Wall time of the call (both transfers, the server's work and any retries); minus the server's
        # ``server_seconds`` it is the network's share (bench/link_time.py).
        metrics["rpc_seconds"] = rpc_seconds
        # The coded size of what was sent is its length: only the other codec method is coded again.
        metrics.update(uplink_counts(host, self.codec_method, sent={"image": len(request.image_codes),
                                                                    "text": len(request.text_codes)}))
        values = int(np.asarray(host.image_valid).sum()) * int(np.prod(np.shape(host.image_codes)[1:]))
        values += int(host.text_positions().sum()) * int(np.shape(host.text_codes)[-1])
        # What the server's message carried (the codec's bytes; the protobuf framing is wire_downlink_bytes).
        metrics["downlink_bytes"] = sum(len(getattr(reply, f)) for f in ("image_grad", "text_grad", "image_step",
                                                                         "text_step"))
        metrics["downlink_bytes_fp32"] = 4 * values
        metrics.update(roundtrip_counts(metrics, np.shape(host.image_valid)[0]))
        metrics["wire_uplink_bytes"] = request.ByteSize()
        metrics["wire_downlink_bytes"] = reply.ByteSize()
        metrics["wire_replayed"] = int(reply.replayed)
        return dl.expand(message, np.float32), metrics
