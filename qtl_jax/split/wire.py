"""Split-step messages <-> protobuf (``proto/split.proto``), with validation of everything received.

Only real values cross (see :mod:`qtl_jax.models.messages`): the codes of the ``image_valid`` images
``[n_images, T_img, D]`` (in sample order) and of the real text positions ``[n_text, D]`` (attention 1,
not the image placeholder), each as one :mod:`qtl_jax.codec` message; masks as uint8 and labels as int32, raw
little-endian. The receiver rebuilds the step's static-shape arrays, with zeros at the positions that
did not travel; the server program never reads them, and their gradients are zero, so the exchange is
exact (``tests/test_grpc_split.py`` compares against the in-process server half).

Everything the server receives is untrusted: :func:`uplink_from_proto` checks the protocol version,
the declared geometry against the server's, every buffer's length, the mask values and their
consistency, label range, codec headers (levels, shape, element bound) and index range, and raises
:class:`WireError` naming the field; the server turns that into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from qtl_jax import codec
from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.split import downlink as dl
from qtl_jax.split.link import CODEC_METHODS
from qtl_jax.split.proto import split_pb2 as pb

# 2: row i of every array is sample i (version 1 put the real images first).
# 3: the downlink's coding (fp32, bf16 or quantized indices + steps) in JoinReply and DownlinkReply.
PROTOCOL_VERSION = 3
IGNORE_INDEX = -100
DOWNLINK_KINDS = {"fp32": pb.FLOAT32, "bf16": pb.BFLOAT16, "quantized": pb.QUANTIZED}
_KIND_NAMES = {v: k for k, v in DOWNLINK_KINDS.items()}
_SCALES = {"token": pb.TOKEN, "channel": pb.CHANNEL}
_SCALE_NAMES = {v: k for k, v in _SCALES.items()}


class WireError(ValueError):
    """A received message is malformed or does not fit the receiver (the message names the field)."""


class VersionError(WireError):
    """The peer speaks a protocol version this side does not."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The static shapes and code alphabets both sides must agree on."""

    batch_size: int
    seq_len: int
    image_tokens: int
    dim: int
    image_levels: int
    text_levels: int
    vocab_size: int

    def to_proto(self) -> pb.Geometry:
        return pb.Geometry(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, msg: pb.Geometry) -> Geometry:
        return cls(**{f.name: int(getattr(msg, f.name)) for f in dataclasses.fields(cls)})

    def mismatch(self, other: Geometry) -> list[str]:
        """``'field: got X, expected Y'`` for each field where ``other`` differs from ``self``."""
        return [f"{f.name}: got {getattr(other, f.name)}, expected {getattr(self, f.name)}"
                for f in dataclasses.fields(self) if getattr(other, f.name) != getattr(self, f.name)]


def geometry_of(config, batch_size: int, seq_len: int) -> Geometry:
    """The geometry of a :class:`~qtl_jax.models.quantized.QuantizedTinyLlavaConfig` at a batch shape."""
    m = config.model
    return Geometry(batch_size=int(batch_size), seq_len=int(seq_len), image_tokens=int(m.num_image_tokens),
                    dim=int(m.llm.hidden_size), image_levels=int(config.levels("image")),
                    text_levels=int(config.levels("text")), vocab_size=int(m.llm.vocab_size))


def check_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise VersionError(
            f"protocol_version={version}, but this side speaks version {PROTOCOL_VERSION}; run the same qtl_jax "
            "release on client and server."
        )


def coding_to_proto(spec: dl.DownlinkSpec) -> pb.DownlinkCoding:
    return pb.DownlinkCoding(kind=DOWNLINK_KINDS[spec.kind], bits=int(spec.bits), scale=_SCALES[spec.scale],
                             error_feedback=bool(spec.error_feedback), topk=float(spec.topk))


def coding_from_proto(msg: pb.DownlinkCoding, seed: int = 0) -> dl.DownlinkSpec:
    """The sender's :class:`~qtl_jax.split.downlink.DownlinkSpec` (``seed``: the receiver's; it is not sent)."""
    if msg.kind not in _KIND_NAMES:
        raise WireError(f"downlink.kind={msg.kind} is not one of {sorted(_KIND_NAMES)}.")
    if msg.scale not in _SCALE_NAMES:
        raise WireError(f"downlink.scale={msg.scale} is not one of {sorted(_SCALE_NAMES)}.")
    try:
        # float32 on the wire: 0.1 comes back as 0.10000000149; round to what a config can hold.
        return dl.DownlinkSpec(kind=_KIND_NAMES[msg.kind], bits=int(msg.bits), scale=_SCALE_NAMES[msg.scale],
                               error_feedback=bool(msg.error_feedback), topk=float(np.float32(msg.topk).item()),
                               seed=seed)
    except ValueError as e:
        raise WireError(f"downlink: {e}") from e


def same_coding(a: dl.DownlinkSpec, b: dl.DownlinkSpec) -> bool:
    """The same downlink (the seed aside; the quantizer's settings only matter for 'quantized')."""
    if a.kind != b.kind:
        return False
    return a.kind != "quantized" or (a.bits, a.scale, a.error_feedback, np.float32(a.topk)) == \
        (b.bits, b.scale, b.error_feedback, np.float32(b.topk))


# ---------------------------------------------------------------------------------------------------
# Uplink


def uplink_to_proto(msg: Uplink, *, step: int, client_id: str, geometry: Geometry,
                    codec_method: str = "ans") -> pb.UplinkRequest:
    """A host-side :class:`Uplink` (numpy arrays) as the request the client sends."""
    if codec_method not in CODEC_METHODS:
        raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
    if msg.segment_ids is not None:
        raise ValueError("a packed uplink (data.pack=True) has several samples per row, which this protocol does "
                         "not carry; train with the server half in process or set data.pack=False.")
    valid = np.asarray(msg.image_valid) > 0
    text_pos = msg.text_positions()
    codes = {}
    for name, arr, levels in (("image", np.asarray(msg.image_codes)[valid], msg.image_levels),
                              ("text", np.asarray(msg.text_codes)[text_pos], msg.text_levels)):
        codes[name] = codec.encode_fp16(arr) if levels == 0 else codec.encode(arr, levels, method=codec_method)
    return pb.UplinkRequest(
        protocol_version=PROTOCOL_VERSION, client_id=client_id, step=int(step),
        # The batch's own length (a bucket, at most geometry.seq_len = max_length); the server checks it.
        geometry=dataclasses.replace(geometry, seq_len=int(np.shape(msg.attention_mask)[1])).to_proto(),
        image_codes=codes["image"], text_codes=codes["text"],
        attention_mask=np.asarray(msg.attention_mask, np.uint8).tobytes(),
        image_mask=np.asarray(msg.image_mask, np.uint8).tobytes(),
        image_valid=np.asarray(msg.image_valid, np.uint8).tobytes(),
        labels=np.asarray(msg.labels, "<i4").tobytes(),
    )


def _raw(field: str, data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != need:
        raise WireError(f"{field} is {len(data)} bytes; shape {shape} of {np.dtype(dtype).name} needs {need}.")
    return np.frombuffer(data, dtype).reshape(shape)


def _binary(field: str, arr: np.ndarray) -> np.ndarray:
    bad = np.nonzero((arr != 0) & (arr != 1))
    if bad[0].size:
        raise WireError(f"{field} must hold only 0/1; found {int(arr[bad][0])} at {tuple(int(i[0]) for i in bad)}.")
    return arr


def _codes(field: str, data: bytes, levels: int, shape: tuple[int, ...], why: str | None = None) -> np.ndarray:
    """The indices of a codec message, checked against ``levels`` (``why``: where that number comes from)."""
    n = int(np.prod(shape))
    try:
        head = codec.describe(data, max_elements=n)
        if head["shape"] != shape:
            raise WireError(f"{field} declares shape {head['shape']}, the masks imply {shape}.")
        expected_method = ("fp16",) if levels == 0 else CODEC_METHODS
        if head["method"] not in expected_method:
            raise WireError(f"{field} is a {head['method']!r} message; levels={levels} needs one of {expected_method}.")
        if head["levels"] != levels:
            raise WireError(f"{field} declares levels={head['levels']}, {why or f'the geometry says {levels}'}.")
        arr = codec.decode(data, max_elements=n)
    except WireError:
        raise
    except ValueError as e:
        raise WireError(f"{field}: {e}") from e
    if levels == 0:
        if not np.all(np.isfinite(arr)):
            raise WireError(f"{field}: fp16 values must be finite.")
    elif arr.size and int(arr.max()) >= levels:
        raise WireError(f"{field}: index {int(arr.max())} is out of range for levels={levels}.")
    return arr


def accepted_lengths(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The sequence lengths a batch may have: the buckets below ``max_length``, then ``max_length``.

    A batch is cut to its longest sample rounded up to a bucket (:func:`qtl_jax.data.sequence.pad_to_bucket`),
    so over the network too its length is one of a few; the server compiles a program per length and refuses
    any other (a peer cannot make it compile without bound).
    """
    return tuple(sorted({int(b) for b in buckets if 0 < int(b) < int(max_length)} | {int(max_length)}))


def uplink_from_proto(req: pb.UplinkRequest, geometry: Geometry, lengths: Sequence[int] = ()) -> Uplink:
    """Validates ``req`` against the server's ``geometry`` and rebuilds the static-shape :class:`Uplink`.

    ``geometry.seq_len`` is the server's ``max_length``; a request may declare a shorter ``seq_len`` if it
    is one of ``lengths`` (:func:`accepted_lengths`: the batch was cut to a bucket).
    """
    check_version(req.protocol_version)
    if req.step < 0:
        raise WireError(f"step={req.step}: step ids are >= 0.")
    if not req.HasField("geometry"):
        raise WireError("geometry is missing.")
    declared = Geometry.from_proto(req.geometry)
    t = declared.seq_len
    allowed = set(lengths) | {geometry.seq_len}
    problems = geometry.mismatch(dataclasses.replace(declared, seq_len=geometry.seq_len))
    if t not in allowed:
        problems.insert(1, f"seq_len: got {t}, expected one of {sorted(allowed)} (data.length_buckets below "
                           f"model.max_length={geometry.seq_len}, and max_length itself)")
    if problems:
        raise WireError("geometry does not match the server's: " + "; ".join(problems))
    g = geometry
    b = g.batch_size
    attention = _binary("attention_mask", _raw("attention_mask", req.attention_mask, "u1", (b, t)))
    image_mask = _binary("image_mask", _raw("image_mask", req.image_mask, "u1", (b, t)))
    image_valid = _binary("image_valid", _raw("image_valid", req.image_valid, "u1", (b,)))
    labels = _raw("labels", req.labels, "<i4", (b, t)).astype(np.int32)

    if np.any(image_mask > attention):
        raise WireError("image_mask marks a position whose attention_mask is 0.")
    per_sample = image_mask.sum(axis=1)
    if np.any(per_sample > 1):
        raise WireError(f"image_mask marks {int(per_sample.max())} positions in one sample; at most 1 (one image).")
    # Row i is sample i: its image is real exactly when it has a placeholder.
    bad = np.flatnonzero(image_valid != per_sample)
    if bad.size:
        raise WireError(f"image_valid of samples {bad[:8].tolist()} disagrees with their image_mask: sample i has an "
                        "image (image_valid[i] = 1) exactly when image_mask marks its placeholder.")
    n_images = int(image_valid.sum())
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= g.vocab_size))
    if np.any(bad):
        raise WireError(f"labels hold {int(labels[bad][0])}; use -100 or a token id in [0, {g.vocab_size}).")

    text_pos = (attention > 0) & (image_mask == 0)
    n_text = int(text_pos.sum())
    image = _codes("image_codes", req.image_codes, g.image_levels, (n_images, g.image_tokens, g.dim))
    text = _codes("text_codes", req.text_codes, g.text_levels, (n_text, g.dim))

    def full(rows: np.ndarray, where: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros(shape, rows.dtype)
        out[where] = rows
        return out

    return Uplink(
        image_codes=full(image, image_valid > 0, (b, g.image_tokens, g.dim)),
        text_codes=full(text, text_pos, (b, t, g.dim)),
        attention_mask=attention.copy(), image_mask=image_mask.copy(), image_valid=image_valid.copy(),
        labels=labels, image_levels=g.image_levels, text_levels=g.text_levels,
    )


# ---------------------------------------------------------------------------------------------------
# Downlink


def _to_dtype(x: np.ndarray, kind: str) -> bytes:
    if kind == "fp32":
        return np.asarray(x, "<f4").tobytes()
    # bfloat16 via ml_dtypes (jax's own bf16): round to nearest even, as the in-process astype does.
    import ml_dtypes

    return np.asarray(x).astype(ml_dtypes.bfloat16).view("<u2").tobytes()


def _from_dtype(field: str, data: bytes, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "fp32":
        return _raw(field, data, "<f4", shape).astype(np.float32)
    import ml_dtypes

    return _raw(field, data, "<u2", shape).view(ml_dtypes.bfloat16).astype(np.float32)


def downlink_to_proto(message: Downlink | dl.QuantizedDownlink, up: Uplink, *, step: int,
                      spec: dl.DownlinkSpec | None = None, codec_method: str = "ans",
                      metrics: Mapping[str, float] | None = None) -> pb.DownlinkReply:
    """The server's reply: the downlink message (:func:`qtl_jax.split.downlink.compress` of ``spec``, on
    the host) at the positions ``up`` carried real values for."""
    spec = spec or dl.DownlinkSpec()
    reply = pb.DownlinkReply(protocol_version=PROTOCOL_VERSION, step=int(step), grad_dtype=DOWNLINK_KINDS[spec.kind],
                             downlink=coding_to_proto(spec), metrics={k: float(v) for k, v in (metrics or {}).items()})
    if spec.kind == "quantized":
        if not isinstance(message, dl.QuantizedDownlink):
            raise TypeError(f"split.downlink='quantized' sends a QuantizedDownlink, got {type(message).__name__}.")
        for name, data in dl.encode_quantized(message, up, codec_method).items():
            setattr(reply, name, data)
        return reply
    reply.image_grad = _to_dtype(np.asarray(message.image_grad)[np.asarray(up.image_valid) > 0], spec.kind)
    reply.text_grad = _to_dtype(np.asarray(message.text_grad)[up.text_positions()], spec.kind)
    return reply


def _steps(field: str, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    steps = _raw(field, data, "<f4", shape).astype(np.float32)
    if not np.all(np.isfinite(steps)) or np.any(steps < 0):
        raise WireError(f"{field} must hold finite steps >= 0.")
    return steps


def downlink_from_proto(reply: pb.DownlinkReply, up: Uplink, *, step: int) -> Downlink | dl.QuantizedDownlink:
    """The reply's message in the step's static shapes (nothing at the positions that did not travel):
    a float32 :class:`Downlink` (fp32, bf16) or a numpy :class:`~qtl_jax.split.downlink.QuantizedDownlink`
    (:func:`qtl_jax.split.downlink.expand` turns it into gradients)."""
    check_version(reply.protocol_version)
    if reply.step != step:
        raise WireError(f"the reply is for step {reply.step}, the client sent step {step}.")
    if not reply.HasField("downlink"):
        raise WireError("downlink (the reply's coding) is missing.")
    spec = coding_from_proto(reply.downlink)
    if DOWNLINK_KINDS[spec.kind] != reply.grad_dtype:
        raise WireError(f"grad_dtype={reply.grad_dtype} disagrees with downlink.kind={spec.kind!r}.")
    valid = np.asarray(up.image_valid) > 0
    text_pos = up.text_positions()
    image_shape, text_shape = np.shape(up.image_codes), np.shape(up.text_codes)
    n_images, n_text, d = int(valid.sum()), int(text_pos.sum()), text_shape[-1]
    if spec.kind != "quantized":
        image = _from_dtype("image_grad", reply.image_grad, spec.kind, (n_images,) + tuple(image_shape[1:]))
        text = _from_dtype("text_grad", reply.text_grad, spec.kind, (n_text, d))
        image_full = np.zeros(image_shape, np.float32)
        image_full[valid] = image
        text_full = np.zeros(text_shape, np.float32)
        text_full[text_pos] = text
        return Downlink(image_grad=image_full, text_grad=text_full)
    m = spec.half_levels
    parts = {}
    for name, rows, shape in (("image", valid, image_shape), ("text", text_pos, text_shape)):
        n_rows = int(rows.sum())
        index = _codes(f"{name}_grad", getattr(reply, f"{name}_grad"), spec.levels,
                       (n_rows,) + tuple(shape[rows.ndim:]), why=f"downlink.bits={spec.bits} means levels={spec.levels}")
        full = np.full(shape, m, np.uint8)
        full[rows] = index
        if spec.scale == "token":
            steps = np.zeros(shape[:-1], np.float32)
            steps[rows] = _steps(f"{name}_step", getattr(reply, f"{name}_step"), (n_rows,) + tuple(shape[rows.ndim:-1]))
        else:
            steps = _steps(f"{name}_step", getattr(reply, f"{name}_step"), (d,))
        parts[name] = (full, steps)
    return dl.QuantizedDownlink(parts["image"][0], parts["image"][1], parts["text"][0], parts["text"][1],
                                half_levels=m)
