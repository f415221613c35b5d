"""The transport between the two partitions of the split step, and its byte accounting.

The split step never moves arrays itself: it hands an :class:`Uplink` (client -> server) and a
:class:`Downlink` (server -> client) to a :class:`Link`. :class:`InProcessLink` moves them between the
client and server device sub-meshes of one process (``jax.device_put`` onto the receiving mesh's batch
sharding) and measures what a network transport would send. A remote link (gRPC, issue 7) implements
the same two methods in another process; the step does not change.

What crosses, per step (B samples, T text positions, T_img tokens per image, D features):

==========  =====================  ==========================================================
direction   array                  content
==========  =====================  ==========================================================
up          ``image_codes``        uint8/uint16 [B, T_img, D] level indices (real images first)
up          ``text_codes``         uint8/uint16 [B, T, D] level indices at text positions
up          ``attention_mask``     uint8 [B, T] (1 = real token)
up          ``image_mask``         uint8 [B, T] (1 = the image placeholder position)
up          ``image_valid``        uint8 [B] (1 = ``image_codes[i]`` is a real image)
up          ``labels``             int32 [B, T] (-100 = no loss), in plaintext as in the paper
down        ``image_grad``         float32 [B, T_img, D]: d loss / d dequantized image values
down        ``text_grad``          float32 [B, T, D]: d loss / d dequantized text values
==========  =====================  ==========================================================

The arrays have static shapes so both programs compile once; the server never reads codes at padding,
placeholder or dummy-image positions, so the byte accounting (and a network link) counts only the real
ones: the codes of the ``image_valid`` images and of the text positions with ``attention_mask == 1``
and ``image_mask == 0``; downlink gradients at the same positions.
"""

from __future__ import annotations

import abc
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax import codec
from qtl_jax.split.mesh import SplitMeshes, batch_sharding

Array = Any  # jax.Array or np.ndarray
CODEC_METHODS = ("packed", "ans")
DOWNLINK_DTYPES = ("float32", "bfloat16")


@flax.struct.dataclass
class Uplink:
    """Client -> server. ``*_levels`` are static: L, or 0 for the fp16 "Original" baseline (float16 codes)."""

    image_codes: Array
    text_codes: Array
    attention_mask: Array
    image_mask: Array
    image_valid: Array
    labels: Array
    image_levels: int = flax.struct.field(pytree_node=False, default=0)
    text_levels: int = flax.struct.field(pytree_node=False, default=0)

    def text_positions(self) -> Array:
        """[B, T] bool: the text positions the server reads (real tokens, not the placeholder)."""
        return (np.asarray(self.attention_mask) > 0) & (np.asarray(self.image_mask) == 0)

    def side_arrays(self) -> dict[str, Array]:
        return {k: getattr(self, k) for k in ("attention_mask", "image_mask", "image_valid", "labels")}


@flax.struct.dataclass
class Downlink:
    """Server -> client: the loss gradient w.r.t. the dequantized values the server decoded."""

    image_grad: Array
    text_grad: Array


def check_uplink(msg: Uplink) -> None:
    """Raises unless every array is an integer array (float16 only for a levels=0 fp16-baseline modality)."""
    problems = []
    for name, levels in (("image_codes", msg.image_levels), ("text_codes", msg.text_levels)):
        dtype = jnp.dtype(getattr(msg, name).dtype)
        if levels == 0:
            if dtype != jnp.float16:
                problems.append(f"{name} of an fp16-baseline quantizer must be float16, got {dtype}")
        elif not jnp.issubdtype(dtype, jnp.integer):
            problems.append(f"{name} must be integer level indices, got {dtype}")
    for name, value in msg.side_arrays().items():
        if not jnp.issubdtype(jnp.dtype(value.dtype), jnp.integer):
            problems.append(f"{name} must be an integer array, got {jnp.dtype(value.dtype)}")
    if problems:
        raise TypeError(
            "only integer arrays may cross from client to server (plus float16 for bound='none'): "
            + "; ".join(problems)
        )


class Link(abc.ABC):
    """Moves the two messages of a split step between the partitions.

    ``uplink`` returns the message as the server program receives it, ``downlink`` the gradients as the
    client receives them. ``step`` is the training step id (a remote link uses it to apply each step once).
    ``take_counts(step)`` returns (and forgets) that step's byte figures (an empty dict when it was not
    measured).
    """

    @abc.abstractmethod
    def uplink(self, step: int, msg: Uplink) -> Uplink: ...

    @abc.abstractmethod
    def downlink(self, step: int, msg: Downlink) -> Downlink: ...

    def take_counts(self, step: int) -> dict[str, int]:
        return {}


def uplink_counts(msg: Uplink, codec_method: str = "ans") -> dict[str, int]:
    """Bytes a network transport sends for ``msg``, measured from the codec's real output on host numpy.

    Returns ``uplink_bytes_packed`` / ``uplink_bytes_ans`` (both modalities' codec messages, headers
    included, plus the side info), ``uplink_bytes_fp16`` (the same positions as float16 values: the
    paper's 16-bit "Original", plus the side info), ``uplink_bytes_side`` (masks and labels as sent) and
    ``uplink_values`` (how many feature values were sent). ``codec_method`` only picks which of the two
    coded sizes ``uplink_bytes`` reports.
    """
    if codec_method not in CODEC_METHODS:
        raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
    image = np.asarray(msg.image_codes)[np.asarray(msg.image_valid) > 0]
    text = np.asarray(msg.text_codes)[msg.text_positions()]
    side = sum(int(np.asarray(v).nbytes) for v in msg.side_arrays().values())
    sizes = {"packed": side, "ans": side, "fp16": side}
    for codes, levels in ((image, msg.image_levels), (text, msg.text_levels)):
        # The size of an fp16 message depends only on the shape; the features themselves stay on the client.
        fp16 = len(codec.encode_fp16(np.zeros(codes.shape, np.float16)))
        sizes["fp16"] += fp16
        for method in CODEC_METHODS:
            sizes[method] += fp16 if levels == 0 else len(codec.encode(codes, levels, method=method))
    return {
        "uplink_bytes": sizes[codec_method],
        "uplink_bytes_packed": sizes["packed"],
        "uplink_bytes_ans": sizes["ans"],
        "uplink_bytes_fp16": sizes["fp16"],
        "uplink_bytes_side": side,
        "uplink_values": int(image.size + text.size),
    }


def downlink_counts(msg: Downlink, up: Uplink, dtype: str = "float32") -> dict[str, int]:
    """Bytes of the gradients at the positions the uplink carried real values for, in ``dtype``."""
    width = jnp.dtype(dtype).itemsize
    n = int(np.asarray(up.image_valid).sum()) * int(np.prod(msg.image_grad.shape[1:]))
    n += int(up.text_positions().sum()) * int(msg.text_grad.shape[-1])
    return {"downlink_bytes": n * width}


class InProcessLink(Link):
    """Moves messages between the two sub-meshes of ``meshes`` and measures their wire size.

    Args:
      meshes: the split's client and server meshes.
      codec_method: which coded size ``uplink_bytes`` reports ('packed' or 'ans'); both are measured.
      measure: measure bytes at all (host time: the codes are fetched and entropy coded).
      measure_every: measure every n-th step (step 0 always, when ``measure``).
      downlink_dtype: 'float32' (the paper) or 'bfloat16': the gradients are rounded to bf16 on the way
        back, which changes training (split then no longer equals fused) and halves the downlink.
    """

    def __init__(
        self,
        meshes: SplitMeshes,
        codec_method: str = "ans",
        measure: bool = True,
        measure_every: int = 1,
        downlink_dtype: str = "float32",
    ):
        if codec_method not in CODEC_METHODS:
            raise ValueError(f"codec_method={codec_method!r}: use one of {CODEC_METHODS}.")
        if downlink_dtype not in DOWNLINK_DTYPES:
            raise ValueError(f"downlink_dtype={downlink_dtype!r}: use one of {DOWNLINK_DTYPES}.")
        if int(measure_every) < 1:
            raise ValueError(f"measure_every must be >= 1, got {measure_every}.")
        self.meshes = meshes
        self.codec_method = codec_method
        self.measure = measure
        self.measure_every = int(measure_every)
        self.downlink_dtype = downlink_dtype
        self._pending: dict[int, Uplink] = {}
        self._counts: dict[int, dict[str, int]] = {}

    def _measuring(self, step: int) -> bool:
        return self.measure and step % self.measure_every == 0

    def uplink(self, step: int, msg: Uplink) -> Uplink:
        check_uplink(msg)
        if self._measuring(step):
            host = jax.device_get(msg)
            self._counts[step] = uplink_counts(host, self.codec_method)
            self._pending[step] = host
        return _put(msg, self.meshes.server)

    def downlink(self, step: int, msg: Downlink) -> Downlink:
        # Back in the server's own dtype on arrival: float32 (float64 in the tests' float64 runs).
        dtypes = jax.tree_util.tree_map(lambda g: g.dtype, msg)
        if self.downlink_dtype != "float32":
            dt = jnp.dtype(self.downlink_dtype)
            msg = jax.tree_util.tree_map(lambda g: g.astype(dt), msg)
        up = self._pending.pop(step, None)
        if up is not None:
            self._counts.setdefault(step, {}).update(downlink_counts(msg, up, self.downlink_dtype))
        out = _put(msg, self.meshes.client)
        return jax.tree_util.tree_map(lambda g, dt: g.astype(dt), out, dtypes)

    def take_counts(self, step: int) -> dict[str, int]:
        return self._counts.pop(step, {})


def _put(tree: Any, mesh) -> Any:
    """Every leaf onto ``mesh``, batch (leading) dimension split over all of its devices."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)
