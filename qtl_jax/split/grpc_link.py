"""``GrpcLink``: the client side of the split step's transport, over gRPC to a remote server.

``uplink(step, msg)`` serialises the codes (``ans`` or ``packed``), masks and labels
(:mod:`qtl_jax.split.wire`), sends them with a deadline and keeps the server's reply; ``downlink(step)``
returns the gradients from that reply as float32 arrays of the step's shapes. The server partition
lives in another process, so unlike :class:`~qtl_jax.split.link.InProcessLink` nothing is computed
between the two calls on this side.

Retries: a call that fails with ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED`` (server restarting, reply lost)
is sent again with the same step id, up to ``retries`` times with a growing pause (at most 5 s); the server applies a
step once and answers a retry of it from its cache, so a retry never updates twice.

Byte accounting from the wire: ``take_counts(step)`` gives ``wire_uplink_bytes`` / ``wire_downlink_bytes``
(serialized protobuf sizes of the request and the reply, what gRPC framed and sent) next to the
theoretical ``uplink_bytes_{packed,ans,fp16}`` / ``downlink_bytes`` of :mod:`qtl_jax.split.link`.
"""

from __future__ import annotations

import time

import grpc
import jax
import numpy as np

from qtl_jax.split import security as seclib
from qtl_jax.split import wire
from qtl_jax.split.link import CODEC_METHODS, Downlink, Link, Uplink, downlink_counts, uplink_counts
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class StepMismatchError(RuntimeError):
    """The server expects another step (it restarted from a checkpoint): the client must realign (Join)."""


class GrpcLink(Link):
    """Client-side link to a :mod:`qtl_jax.split.server`.

    Args:
      target: ``host:port`` of the server.
      geometry: this client's :class:`~qtl_jax.split.wire.Geometry` (checked by the server on every call);
        ``None`` until set (``client.run`` sets it from the model it builds).
      security: TLS mode, certificates and token.
      client_id: a name for this client in the server's logs and errors.
      codec_method: 'ans' (entropy coded) or 'packed' (fixed width) for the codes.
      timeout_s: deadline of each RPC (the first step includes the server's compilation).
      retries: how many times a retryable failure is re-sent.
      max_message_bytes: the largest message sent or accepted.
    """

    def __init__(self, target: str, geometry: wire.Geometry | None, security: seclib.SecurityConfig | None = None, *,
                 client_id: str = "client-0", codec_method: str = "ans", timeout_s: float = 300.0,
                 retries: int = 3, retry_pause_s: float = 0.5,
                 max_message_bytes: int = 64 << 20):
        if codec_method not in CODEC_METHODS:
            raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s} and {retries}.")
        self.target, self.geometry = target, geometry
        self.security = security or seclib.SecurityConfig()
        self.client_id, self.codec_method = client_id, codec_method
        self.timeout_s, self.retries, self.retry_pause_s = float(timeout_s), int(retries), float(retry_pause_s)
        options = [("grpc.max_receive_message_length", int(max_message_bytes)),
                   ("grpc.max_send_message_length", int(max_message_bytes))]
        self.channel = seclib.open_channel(target, self.security, options)
        self.stub = pb_grpc.SplitLearningStub(self.channel)
        self._metadata = seclib.call_metadata(self.security)
        self._pending: dict[int, tuple[Uplink, pb.DownlinkReply]] = {}
        self._counts: dict[int, dict[str, float]] = {}
        self.server_metrics: dict[int, dict[str, float]] = {}

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

    def join(self, client_step: int) -> pb.JoinReply:
        """Handshake: version and geometry check; returns the server's step (it rewinds if it is ahead)."""
        reply = self._call(self.stub.Join, pb.JoinRequest(
            protocol_version=wire.PROTOCOL_VERSION, client_id=self.client_id, geometry=self.geometry.to_proto(),
            client_step=int(client_step)))
        wire.check_version(reply.protocol_version)
        return reply

    def uplink(self, step: int, msg: Uplink) -> Uplink:
        host = jax.device_get(msg)
        request = wire.uplink_to_proto(host, step=step, client_id=self.client_id, geometry=self.geometry,
                                       codec_method=self.codec_method)
        try:
            reply = self._call(self.stub.Step, request)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "out of order" in (e.details() or ""):
                raise StepMismatchError(e.details()) from e
            raise
        down = wire.downlink_from_proto(reply, host, step=step)
        counts = uplink_counts(host, self.codec_method)
        dtype = {v: k for k, v in wire.GRAD_DTYPES.items()}[reply.grad_dtype]
        counts.update(downlink_counts(down, host, dtype))
        counts["wire_uplink_bytes"] = request.ByteSize()
        counts["wire_downlink_bytes"] = reply.ByteSize()
        counts["wire_replayed"] = int(reply.replayed)
        self._counts[step] = counts
        self.server_metrics[step] = dict(reply.metrics)
        self._pending[step] = (host, down)
        return host

    def downlink(self, step: int, msg: Downlink | None = None) -> Downlink:
        """The gradients the server sent for ``step`` (``msg`` is unused: the server partition is remote)."""
        if step not in self._pending:
            raise KeyError(f"no reply for step {step}: call uplink(step, ...) first.")
        _, down = self._pending.pop(step)
        return Downlink(image_grad=np.asarray(down.image_grad, np.float32),
                        text_grad=np.asarray(down.text_grad, np.float32))

    def take_counts(self, step: int) -> dict[str, float]:
        return self._counts.pop(step, {})
