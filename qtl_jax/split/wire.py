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
from collections.abc import Mapping

import numpy as np

from qtl_jax import codec
from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.split.link import CODEC_METHODS, DOWNLINK_DTYPES
from qtl_jax.split.proto import split_pb2 as pb

# 2: row i of every array is sample i (version 1 put the real images first).
PROTOCOL_VERSION = 2
IGNORE_INDEX = -100
GRAD_DTYPES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16}
_GRAD_NAMES = {v: k for k, v in GRAD_DTYPES.items()}


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


# ---------------------------------------------------------------------------------------------------
# Uplink


def uplink_to_proto(msg: Uplink, *, step: int, client_id: str, geometry: Geometry,
                    codec_method: str = "ans") -> pb.UplinkRequest:
    """A host-side :class:`Uplink` (numpy arrays) as the request the client sends."""
    if codec_method not in CODEC_METHODS:
        raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
    valid = np.asarray(msg.image_valid) > 0
    text_pos = msg.text_positions()
    codes = {}
    for name, arr, levels in (("image", np.asarray(msg.image_codes)[valid], msg.image_levels),
                              ("text", np.asarray(msg.text_codes)[text_pos], msg.text_levels)):
        codes[name] = codec.encode_fp16(arr) if levels == 0 else codec.encode(arr, levels, method=codec_method)
    return pb.UplinkRequest(
        protocol_version=PROTOCOL_VERSION, client_id=client_id, step=int(step), geometry=geometry.to_proto(),
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


def _codes(field: str, data: bytes, levels: int, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    try:
        head = codec.describe(data, max_elements=n)
        if head["shape"] != shape:
            raise WireError(f"{field} declares shape {head['shape']}, the masks imply {shape}.")
        expected_method = ("fp16",) if levels == 0 else CODEC_METHODS
        if head["method"] not in expected_method:
            raise WireError(f"{field} is a {head['method']!r} message; levels={levels} needs one of {expected_method}.")
        if head["levels"] != levels:
            raise WireError(f"{field} declares levels={head['levels']}, the geometry says {levels}.")
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


def uplink_from_proto(req: pb.UplinkRequest, geometry: Geometry) -> Uplink:
    """Validates ``req`` against the server's ``geometry`` and rebuilds the static-shape :class:`Uplink`."""
    check_version(req.protocol_version)
    if req.step < 0:
        raise WireError(f"step={req.step}: step ids are >= 0.")
    if not req.HasField("geometry"):
        raise WireError("geometry is missing.")
    problems = geometry.mismatch(Geometry.from_proto(req.geometry))
    if problems:
        raise WireError("geometry does not match the server's: " + "; ".join(problems))
    g = geometry
    b, t = g.batch_size, g.seq_len
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


def _to_dtype(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.asarray(x, "<f4").tobytes()
    # bfloat16 via ml_dtypes (jax's own bf16): round to nearest even, as InProcessLink's astype does.
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view("<u2").tobytes()


def _from_dtype(field: str, data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "float32":
        return _raw(field, data, "<f4", shape).astype(np.float32)
    import ml_dtypes

    return _raw(field, data, "<u2", shape).view(ml_dtypes.bfloat16).astype(np.float32)


def downlink_to_proto(msg: Downlink, up: Uplink, *, step: int, grad_dtype: str = "float32",
                      metrics: Mapping[str, float] | None = None) -> pb.DownlinkReply:
    """The server's reply: gradients at the positions ``up`` carried real values for."""
    if grad_dtype not in DOWNLINK_DTYPES:
        raise ValueError(f"grad_dtype={grad_dtype!r}: use one of {DOWNLINK_DTYPES}.")
    image = np.asarray(msg.image_grad)[np.asarray(up.image_valid) > 0]
    text = np.asarray(msg.text_grad)[up.text_positions()]
    return pb.DownlinkReply(
        protocol_version=PROTOCOL_VERSION, step=int(step), grad_dtype=GRAD_DTYPES[grad_dtype],
        image_grad=_to_dtype(image, grad_dtype), text_grad=_to_dtype(text, grad_dtype),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
    )


def downlink_from_proto(reply: pb.DownlinkReply, up: Uplink, *, step: int) -> Downlink:
    """The gradients as float32 arrays of the step's static shapes (zeros where nothing was sent)."""
    check_version(reply.protocol_version)
    if reply.step != step:
        raise WireError(f"the reply is for step {reply.step}, the client sent step {step}.")
    if reply.grad_dtype not in _GRAD_NAMES:
        raise WireError(f"grad_dtype={reply.grad_dtype} is not one of {sorted(_GRAD_NAMES)}.")
    dtype = _GRAD_NAMES[reply.grad_dtype]
    valid = np.asarray(up.image_valid) > 0
    text_pos = up.text_positions()
    image_shape, text_shape = np.shape(up.image_codes), np.shape(up.text_codes)
    image = _from_dtype("image_grad", reply.image_grad, dtype, (int(valid.sum()),) + tuple(image_shape[1:]))
    text = _from_dtype("text_grad", reply.text_grad, dtype, (int(text_pos.sum()), text_shape[-1]))
    image_full = np.zeros(image_shape, np.float32)
    image_full[valid] = image
    text_full = np.zeros(text_shape, np.float32)
    text_full[text_pos] = text
    return Downlink(image_grad=image_full, text_grad=text_full)
