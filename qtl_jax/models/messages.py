"""The two messages of a split step: :class:`Uplink` (client -> server) and :class:`Downlink` (server -> client).

Row ``i`` of every array belongs to sample ``i`` of the batch (B samples, T text positions, T_img tokens
per image, D features):

==========  =====================  ==========================================================
direction   array                  content
==========  =====================  ==========================================================
up          ``image_codes``        uint8/uint16 [B, T_img, D] level indices of sample i's image
up          ``text_codes``         uint8/uint16 [B, T, D] level indices at text positions
up          ``attention_mask``     uint8 [B, T] (1 = real token)
up          ``image_mask``         uint8 [B, T] (1 = the image placeholder position)
up          ``image_valid``        uint8 [B] (1 = sample i has an image; 0: ``image_codes[i]`` is a dummy)
up          ``labels``             int32 [B, T] (-100 = no loss), in plaintext as in the paper
up          ``segment_ids``        int32 [R, L] packed batches only (else None): the sample of each merged
                                   position (-1 = padding); see below
down        ``image_grad``         float32 [B, T_img, D]: d loss / d dequantized image values
down        ``text_grad``          float32 [B, T, D]: d loss / d dequantized text values
==========  =====================  ==========================================================

The arrays have static shapes so the programs compile once; the server never reads codes at padding,
placeholder or dummy-image positions, so byte accounting and the network transport carry only the real
ones: the codes of the ``image_valid`` rows and of the text positions with ``attention_mask == 1`` and
``image_mask == 0``; downlink gradients at the same positions.

A packed batch (``data.pack``, :func:`qtl_jax.data.sequence.pack`) has ``R`` rows of several samples
each: the text arrays are ``[R, T]`` rows, while the image arrays stay per sample (``[B, ...]``, image row ``i``
= sample ``i``) and ``segment_ids`` says which sample each merged position belongs to. It is side information:
a transport would send each row's run lengths (:meth:`Uplink.segment_runs`, what the byte counts count), from
which the array follows.

The messages live with the model (they are what :func:`qtl_jax.models.quantized.client_forward` produces
and the server half consumes); how they travel is :mod:`qtl_jax.split`'s business.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array or np.ndarray


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
    segment_ids: Array | None = None

    def text_positions(self) -> Array:
        """[B, T] bool: the text positions the server reads (real tokens, not the placeholder)."""
        return (np.asarray(self.attention_mask) > 0) & (np.asarray(self.image_mask) == 0)

    def side_arrays(self) -> dict[str, Array]:
        """The side information as sent: masks, labels and, for a packed batch, :meth:`segment_runs`."""
        side = {k: getattr(self, k) for k in ("attention_mask", "image_mask", "image_valid", "labels")}
        if self.segment_ids is not None:
            side["segment_runs"] = self.segment_runs()
        return side

    def segment_runs(self) -> np.ndarray:
        """int32: per row its number of samples, then each run's sample index and merged length (row-major):
        with the row length, everything ``segment_ids`` says."""
        counts, runs = [], []
        for row in np.asarray(self.segment_ids):
            row = row[row >= 0]
            edges = np.flatnonzero(np.diff(row)) + 1
            starts = np.concatenate([[0], edges]) if row.size else np.zeros(0, np.int64)
            sizes = np.diff(np.concatenate([starts, [row.size]]))
            counts.append(len(starts))
            for start, size in zip(starts.tolist(), sizes.tolist()):
                runs.extend((int(row[start]), size))
        return np.asarray(counts + runs, np.int32)


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
