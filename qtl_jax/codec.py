"""The wire codec: the bytes that cross the network between client and server.

A message is a self-describing, versioned header, a method-specific section and a CRC-32 trailer; no
pickle. Methods:

* ``packed``: exactly log2 L bits per index when L is a power of two; otherwise mixed-radix packing of
  groups of g indices into one (up to 128-bit) integer written with ceil(log2 L^g) bits, which stays
  within 0.8 % of n·log2 L bits for every L <= 256.
* ``ans``: asymmetric numeral systems (``constriction``) under a categorical model whose quantized
  counts travel in the header: one global histogram, or one histogram per channel (the last axis).
  ``model='auto'`` picks whichever gives the smaller message.
* ``fp16``: float16 values (the "Original" 16-bit baseline's payload), via :func:`encode_fp16`.

Layout (little-endian; see docs/codec.md)::

    magic "QTLC" | version u8 | method u8 | ndim u8 | reserved u8 (0) | levels u32 | ndim x dim u64
    packed: group u8 | bits
    ans:    model u8 (0 global, 1 channel) | count width u8 | C·L counts at `width` bits, byte-aligned
            | ANS words (uint32)
    fp16:   n float16
    crc32 u32 of everything before it

Every declared size is checked against the message length (and the element count against
``max_elements``) before anything is allocated, and a decoded message must account for every byte, so
corrupt, truncated or malformed input raises ``ValueError``.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import constriction
import numpy as np

MAGIC = b"QTLC"
VERSION = 1
METHODS = {"packed": 0, "ans": 1, "fp16": 2}
MODELS = {"global": 0, "channel": 1}
MAX_LEVELS = 1 << 16
MAX_NDIM = 16
# The per-channel model runs one Python-level coder call per channel; bound it so a hostile header
# cannot declare millions of channels.
MAX_CHANNELS = 1 << 16
# Element cap for encode and (by default) decode: 2^27 indices, 128 MiB as uint8, 155 images of
# 728 x 1280. ANS can legitimately code long runs in almost no bits, so the payload length alone cannot
# bound the element count of an ANS message; this cap does.
MAX_ELEMENTS = 1 << 27
# Mixed-radix words are built from 32-bit limbs held in uint64, so limb·L + carry never overflows.
_LIMB_BITS = 32
_MAX_WORD_BITS = 128
# Count totals tried for the ANS models; the encoder keeps the one with the smallest message.
_GLOBAL_TOTALS = (1 << 8, 1 << 12, 1 << 16, 1 << 20)
_CHANNEL_TOTALS = (1 << 4, 1 << 6, 1 << 8, 1 << 10, 1 << 12)

_DECODE_CHUNK = 1 << 20
# constriction holds the GIL for the whole of one coder call (measured: a Python loop in another thread
# stalled for the 0.16 s of one 30 M-symbol call), so long runs are coded in pieces of this many symbols:
# the training loop's thread gets the interpreter back every few milliseconds while a measurement runs in the
# background. A stack coder fed the pieces last-to-first writes exactly the words of one call.
ENCODE_CHUNK = 1 << 20

_HEAD = struct.Struct("<4sBBBBI")
_CRC = struct.Struct("<I")


# ---------------------------------------------------------------------------------------------------
# Public API


def encode(indices: Any, levels: int, method: str = "ans", model: str = "auto") -> bytes:
    """Serialises integer level indices in {0..L-1} (any shape, numpy or jax) to bytes.

    Args:
      indices: integer array; every value must be in [0, levels).
      levels: L, 2 <= L <= 65536.
      method: 'packed' (fixed-length) or 'ans' (entropy coded).
      model: for 'ans': 'global', 'channel' (per last-axis channel) or 'auto' (the smaller message).
    """
    levels = _check_levels(levels)
    if method not in ("packed", "ans"):
        raise ValueError(f"method={method!r}: use 'packed' or 'ans' (float16 values: encode_fp16).")
    if model not in ("auto", *MODELS):
        raise ValueError(f"model={model!r}: use 'auto', 'global' or 'channel'.")
    if method == "packed" and model != "auto":
        raise ValueError(f"model={model!r} only applies to method='ans'.")
    arr = np.asarray(indices)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be an integer array, got dtype {arr.dtype}; cast level indices first.")
    _check_shape(arr.shape)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= levels:
            raise ValueError(f"indices must lie in [0, {levels - 1}] for levels={levels}, found [{lo}, {hi}].")
    flat = arr.reshape(-1)
    if method == "packed":
        body = _encode_packed(flat, levels)
    else:
        body = _encode_ans(flat, arr.shape, levels, model)
    return _finish(METHODS[method], arr.shape, levels, body)


def encode_fp16(values: Any) -> bytes:
    """Serialises float values as float16 (the 16-bit "Original" baseline's payload)."""
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise ValueError(f"encode_fp16 expects floating-point values, got dtype {arr.dtype}.")
    _check_shape(arr.shape)
    return _finish(METHODS["fp16"], arr.shape, 0, arr.astype("<f2").tobytes())


def fp16_size(shape: tuple[int, ...]) -> int:
    """``len(encode_fp16(x))`` for any ``x`` of this shape, without building the message.

    The 16-bit baseline's size depends only on the shape; the byte meter asks for it on every measured step,
    where encoding tens of millions of zeros only to take their length cost ~0.1 s per batch of ten images.
    """
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension.")
    _check_shape(shape)
    return _HEAD.size + 8 * len(shape) + 2 * math.prod(shape) + _CRC.size


def decode(data: bytes | bytearray | memoryview, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """Inverse of :func:`encode` / :func:`encode_fp16`: the original shape and values.

    Indices come back as uint8 for L <= 256 and uint16 above; fp16 messages as float16. Raises
    ``ValueError`` for anything that is not a well-formed message (or declares more than
    ``max_elements`` elements).
    """
    header = _parse(data, max_elements)
    method, shape, levels, body = header["method"], header["shape"], header["levels"], header["body"]
    n = math.prod(shape)
    if method == "fp16":
        if len(body) != 2 * n:
            raise ValueError(f"fp16 payload is {len(body)} bytes but shape {shape} needs {2 * n}.")
        return np.frombuffer(body, "<f2").astype(np.float16).reshape(shape)
    dtype = np.uint8 if levels <= 256 else np.uint16
    if method == "packed":
        flat = _decode_packed(body, n, levels, dtype)
    else:
        flat = _decode_ans(body, shape, levels, dtype)
    return flat.reshape(shape)


def describe(data: bytes | bytearray | memoryview, max_elements: int = MAX_ELEMENTS) -> dict[str, Any]:
    """The header of a message: method, shape, levels, (ans) model and count width, byte counts."""
    h = _parse(data, max_elements)
    out = {k: h[k] for k in ("method", "shape", "levels")}
    out["total_bytes"] = len(data)
    body = h["body"]
    if h["method"] == "packed" and body:
        out["group"] = body[0]
    if h["method"] == "ans" and len(body) >= 2:
        out["model"] = {v: k for k, v in MODELS.items()}.get(body[0], body[0])
        out["count_width"] = body[1]
    return out


def packed_size_bits(n: int, levels: int) -> int:
    """Payload bits the 'packed' method uses for n indices (header excluded)."""
    group = _radix_group(_check_levels(levels))
    full, rest = divmod(n, group)
    return full * _word_bits(levels, group) + (_word_bits(levels, rest) if rest else 0)


def empirical_entropy_bits(indices: Any, levels: int) -> float:
    """n·H of the message's own symbol histogram, in bits (the target an entropy coder approaches)."""
    flat = np.asarray(indices).reshape(-1)
    if flat.size == 0:
        return 0.0
    counts = np.bincount(flat.astype(np.int64), minlength=levels).astype(np.float64)
    p = counts[counts > 0] / flat.size
    return float(-flat.size * np.sum(p * np.log2(p)))


# ---------------------------------------------------------------------------------------------------
# Framing


def _check_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise ValueError(f"levels must be an int, got {levels!r}.")
    levels = int(levels)
    if not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels={levels} is out of range: use 2 <= levels <= {MAX_LEVELS}.")
    return levels


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions are supported, got {len(shape)}.")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"{math.prod(shape)} elements exceed the codec's limit of {MAX_ELEMENTS}; split the tensor.")


def _finish(method: int, shape: tuple[int, ...], levels: int, body: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, method, len(shape), 0, levels) + struct.pack(f"<{len(shape)}Q", *shape)
    msg = head + body
    return msg + _CRC.pack(zlib.crc32(msg))


def _parse(data: Any, max_elements: int) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"decode expects bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) < _HEAD.size + _CRC.size:
        raise ValueError(f"message is {len(data)} bytes, shorter than the {_HEAD.size + _CRC.size}-byte minimum: truncated.")
    magic, version, method, ndim, reserved, levels = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a qtl_jax codec message: magic {magic!r}, expected {MAGIC!r}.")
    if version != VERSION:
        raise ValueError(f"unsupported codec version {version}; this decoder reads version {VERSION}.")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise ValueError("checksum mismatch: the message is corrupt, truncated or has trailing bytes.")
    names = {v: k for k, v in METHODS.items()}
    if method not in names:
        raise ValueError(f"unknown method id {method}; known: {METHODS}.")
    if reserved != 0:
        raise ValueError(f"reserved header byte is {reserved}, must be 0.")
    if ndim > MAX_NDIM:
        raise ValueError(f"declared ndim {ndim} exceeds {MAX_NDIM}.")
    dims_end = _HEAD.size + 8 * ndim
    if len(data) - _CRC.size < dims_end:
        raise ValueError(f"message too short for its {ndim} declared dimensions: truncated.")
    shape = struct.unpack_from(f"<{ndim}Q", data, _HEAD.size)
    n = math.prod(shape)
    if n > max_elements:
        raise ValueError(f"declared shape {shape} has {n} elements, more than max_elements={max_elements}.")
    name = names[method]
    if name == "fp16":
        if levels != 0:
            raise ValueError(f"fp16 messages carry levels=0, got {levels}.")
    elif not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"declared levels={levels} is out of range [2, {MAX_LEVELS}].")
    return {"method": name, "shape": tuple(int(d) for d in shape), "levels": levels, "body": data[dims_end:-_CRC.size]}


# ---------------------------------------------------------------------------------------------------
# Bit fields


def _pack_bits(words: np.ndarray, width: int) -> np.ndarray:
    """Low ``width`` bits of each row (an unsigned int, or limbs [rows, k] of 32 bits), LSB first."""
    if words.ndim == 1:
        size = words.dtype.itemsize
        raw = words.astype(f"<u{size}").view(np.uint8).reshape(words.size, size)
    else:
        raw = words.astype("<u4").view(np.uint8).reshape(words.shape[0], 4 * words.shape[1])
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :width].reshape(-1)


def _unpack_bits(bits: np.ndarray, rows: int, width: int, limbs: int) -> np.ndarray:
    """Inverse of :func:`_pack_bits` into limbs [rows, limbs] (uint64 holding 32-bit values)."""
    # packbits pads each row to whole bytes itself, so only bytes (not bits) need widening.
    packed = np.packbits(bits.reshape(rows, width), axis=1, bitorder="little")
    if limbs == 1 and width <= 16:
        size = 1 if width <= 8 else 2
    else:
        size = 4 * limbs
    if packed.shape[1] < size:
        wide = np.zeros((rows, size), np.uint8)
        wide[:, : packed.shape[1]] = packed
        packed = wide
    words = packed.view(f"<u{min(size, 4)}").reshape(rows, -1)
    return words.astype(np.uint64)


# Field widths that tile bytes exactly: packed with shifts on whole bytes instead of one byte per bit
# (8x less memory traffic); the bit layout is the same LSB-first stream as the general path.
_BYTE_ALIGNED = (1, 2, 4, 8, 16)


def _pack_aligned(flat: np.ndarray, width: int) -> np.ndarray:
    if width == 8:
        return flat.astype(np.uint8)
    if width == 16:
        return flat.astype("<u2").view(np.uint8)
    per = 8 // width
    padded = np.zeros(-(-flat.size // per) * per, np.uint8)
    padded[: flat.size] = flat
    fields = padded.reshape(-1, per)
    out = fields[:, 0].copy()
    for j in range(1, per):
        out |= fields[:, j] << np.uint8(width * j)
    return out


def _unpack_aligned(data: np.ndarray, n: int, width: int, dtype: type) -> np.ndarray:
    if width == 8:
        return data.astype(dtype)
    if width == 16:
        return data.view("<u2").astype(dtype)
    per = 8 // width
    mask = np.uint8((1 << width) - 1)
    fields = np.empty((data.size, per), np.uint8)
    for j in range(per):
        fields[:, j] = (data >> np.uint8(width * j)) & mask
    flat = fields.reshape(-1)
    if flat[n:].any():
        raise ValueError("nonzero padding bits after the packed payload: corrupt message.")
    return flat[:n].astype(dtype)


def _word_bits(levels: int, group: int) -> int:
    return (levels**group - 1).bit_length()


def _radix_group(levels: int) -> int:
    """Indices per mixed-radix word: the group size with the fewest bits per index (ties: smaller)."""
    if levels & (levels - 1) == 0:
        return 1
    best, best_g = math.inf, 1
    g = 1
    while levels**g <= 1 << _MAX_WORD_BITS:
        ratio = _word_bits(levels, g) / g
        if ratio < best - 1e-12:
            best, best_g = ratio, g
        g += 1
    return best_g


# ---------------------------------------------------------------------------------------------------
# packed


def _encode_packed(flat: np.ndarray, levels: int) -> bytes:
    group = _radix_group(levels)
    if group == 1:
        width = _word_bits(levels, 1)
        if width in _BYTE_ALIGNED:
            return bytes([1]) + _pack_aligned(flat, width).tobytes()
        dtype = np.uint8 if width <= 8 else np.uint16
        bits = _pack_bits(flat.astype(dtype), width)
        return bytes([1]) + np.packbits(bits, bitorder="little").tobytes()
    full, rest = divmod(flat.size, group)
    parts = []
    for start, count, g in ((0, full, group), (full * group, 1 if rest else 0, rest)):
        if count == 0:
            continue
        width = _word_bits(levels, g)
        limbs = -(-width // _LIMB_BITS)
        digits = flat[start : start + count * g].astype(np.uint64).reshape(count, g)
        words = np.zeros((count, limbs), np.uint64)
        # Horner in base L, most significant digit first: word = sum_j digit_j L^j.
        for j in range(g - 1, -1, -1):
            carry = digits[:, j].copy()
            for i in range(limbs):
                t = words[:, i] * np.uint64(levels) + carry
                words[:, i] = t & np.uint64(0xFFFFFFFF)
                carry = t >> np.uint64(_LIMB_BITS)
        parts.append(_pack_bits(words, width))
    bits = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return bytes([group]) + np.packbits(bits, bitorder="little").tobytes()


def _decode_packed(body: bytes, n: int, levels: int, dtype: type) -> np.ndarray:
    if len(body) < 1:
        raise ValueError("packed message has no group byte: truncated.")
    group = body[0]
    if group < 1 or levels**group > 1 << _MAX_WORD_BITS:
        raise ValueError(f"packed group size {group} is invalid for levels={levels}.")
    full, rest = divmod(n, group)
    total_bits = full * _word_bits(levels, group) + (_word_bits(levels, rest) if rest else 0)
    expected = 1 + -(-total_bits // 8)
    if len(body) != expected:
        raise ValueError(f"packed payload is {len(body)} bytes but {n} indices at levels={levels} need {expected}.")
    if group == 1 and _word_bits(levels, 1) in _BYTE_ALIGNED:
        out = _unpack_aligned(np.frombuffer(body, np.uint8, offset=1), n, _word_bits(levels, 1), dtype)
        if n and out.max() >= levels:
            raise ValueError(f"packed index {int(out.max())} >= levels={levels}: corrupt payload.")
        return out
    bits = np.unpackbits(np.frombuffer(body, np.uint8, offset=1), bitorder="little")
    # Every field fits the output dtype (width <= 8 bits for L <= 256), so out-of-range values survive
    # the store and are caught below.
    out = np.empty(n, dtype)
    pos = 0
    for start, count, g in ((0, full, group), (full * group, 1 if rest else 0, rest)):
        if count == 0:
            continue
        width = _word_bits(levels, g)
        limbs = -(-width // _LIMB_BITS)
        words = _unpack_bits(bits[pos : pos + count * width], count, width, limbs)
        pos += count * width
        if g == 1:
            out[start : start + count] = words[:, 0]
            continue
        digits = np.empty((count, g), np.uint64)
        for j in range(g):
            rem = np.zeros(count, np.uint64)
            for i in range(limbs - 1, -1, -1):
                t = (rem << np.uint64(_LIMB_BITS)) | words[:, i]
                words[:, i] = t // np.uint64(levels)
                rem = t % np.uint64(levels)
            digits[:, j] = rem
        if np.any(words):
            raise ValueError("packed word exceeds L^group: corrupt payload.")
        out[start : start + count * g] = digits.reshape(-1)
    if np.any(bits[pos:]):
        raise ValueError("nonzero padding bits after the packed payload: corrupt message.")
    if n and out.max() >= levels:
        raise ValueError(f"packed index {int(out.max())} >= levels={levels}: corrupt payload.")
    return out


# ---------------------------------------------------------------------------------------------------
# ans


def _channels(shape: tuple[int, ...], kind: str) -> int:
    return shape[-1] if (kind == "channel" and len(shape) >= 1 and shape[-1] > 0) else 1


def _quantize_counts(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to about ``total`` per row; every present symbol keeps at least 1."""
    n = counts.sum(axis=1, keepdims=True)
    q = np.floor(counts * (total / np.maximum(n, 1)) + 0.5).astype(np.int64)
    q = np.where(counts > 0, np.maximum(q, 1), 0)
    return np.where(n <= total, counts, q)


def _cost_bits(counts: np.ndarray, q: np.ndarray) -> float:
    """Ideal ANS payload bits of symbols with histogram ``counts`` under models ``q`` (per row)."""
    s = q.sum(axis=1, keepdims=True)
    coded = (q > 0).sum(axis=1, keepdims=True) > 1  # single-symbol rows cost nothing
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where((counts > 0) & coded, counts * np.log2(s / np.maximum(q, 1)), 0.0)
    return float(per.sum())


def _histogram(flat: np.ndarray, c: int, levels: int) -> np.ndarray:
    """Counts ``[c, levels]`` of each level per channel (position mod ``c``)."""
    if c == 1:
        return np.bincount(flat.astype(np.intp, copy=False), minlength=levels)[None]
    rows = flat.reshape(-1, c)
    if levels <= 16:
        # A few compare-and-sum passes beat building a ``channel * L + index`` key per element.
        return np.stack([np.count_nonzero(rows == v, axis=0) for v in range(levels)], axis=1).astype(np.int64)
    ch = np.arange(flat.size, dtype=np.int64) % c
    return np.bincount(ch * levels + flat.astype(np.int64), minlength=c * levels).reshape(c, levels)


def _choose_model(flat: np.ndarray, shape: tuple[int, ...], levels: int, model: str):
    best = None
    kinds = ("global", "channel") if model == "auto" else (model,)
    if model == "auto" and _channels(shape, "channel") > MAX_CHANNELS:
        kinds = ("global",)
    elif model == "channel" and _channels(shape, "channel") > MAX_CHANNELS:
        raise ValueError(f"model='channel' supports at most {MAX_CHANNELS} channels (last axis), got {shape[-1]}.")
    histograms: dict[str, np.ndarray] = {}
    if "channel" in kinds:
        histograms["channel"] = _histogram(flat, _channels(shape, "channel"), levels)
    if "global" in kinds:
        # One pass over the data: the global histogram is the per-channel one summed over channels.
        per_channel = histograms.get("channel")
        histograms["global"] = (per_channel.sum(axis=0, keepdims=True) if per_channel is not None
                                else _histogram(flat, 1, levels))
    for kind in kinds:
        c = _channels(shape, kind)
        counts = histograms[kind]
        for total in _GLOBAL_TOTALS if kind == "global" else _CHANNEL_TOTALS:
            q = _quantize_counts(counts, total)
            width = max(int(q.max()).bit_length(), 1)
            bits = _cost_bits(counts, q) + c * levels * width + 32
            if best is None or bits < best[0]:
                best = (bits, kind, q, width)
    return best[1:]


def _models(q: np.ndarray) -> list:
    """One constriction model per row with two or more symbols; None where the row is a constant."""
    out = []
    for row in q:
        if np.count_nonzero(row) > 1:
            out.append(constriction.stream.model.Categorical(row / row.sum(), perfect=False))
        else:
            out.append(None)
    return out


def _encode_ans(flat: np.ndarray, shape: tuple[int, ...], levels: int, model: str) -> bytes:
    kind, q, width = _choose_model(flat, shape, levels, model)
    c = q.shape[0]
    # Channel-major and contiguous: each channel's symbols are one slice (one copy here, not one per channel).
    columns = np.ascontiguousarray(flat.reshape(-1, c).T, dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder()
    # A stack: encode the channels last-to-first (and each channel's pieces last-to-first) so the decoder
    # reads them first-to-last.
    for ch, m in reversed(list(enumerate(_models(q)))):
        if m is None:
            continue
        column = columns[ch]
        for start in reversed(range(0, column.size, ENCODE_CHUNK)):
            coder.encode_reverse(column[start:start + ENCODE_CHUNK], m)
    counts_bits = _pack_bits(q.reshape(-1).astype(np.uint32), width)
    words = coder.get_compressed().astype("<u4").tobytes() if not coder.is_empty() else b""
    return bytes([MODELS[kind], width]) + np.packbits(counts_bits, bitorder="little").tobytes() + words


def _decode_ans(body: bytes, shape: tuple[int, ...], levels: int, dtype: type) -> np.ndarray:
    if len(body) < 2:
        raise ValueError("ans message has no model header: truncated.")
    kind_id, width = body[0], body[1]
    kinds = {v: k for k, v in MODELS.items()}
    if kind_id not in kinds:
        raise ValueError(f"unknown ans model id {kind_id}; known: {MODELS}.")
    if not 1 <= width <= 32:
        raise ValueError(f"ans count width {width} is out of range [1, 32].")
    n = math.prod(shape)
    c = _channels(shape, kinds[kind_id])
    if c > MAX_CHANNELS:
        raise ValueError(f"ans channel model declares {c} channels, more than {MAX_CHANNELS}.")
    count_bytes = -(-(c * levels * width) // 8)
    if len(body) < 2 + count_bytes:
        raise ValueError(f"ans model needs {count_bytes} bytes of counts, message has {len(body) - 2}: truncated.")
    bits = np.unpackbits(np.frombuffer(body, np.uint8, count=count_bytes, offset=2), bitorder="little")
    if np.any(bits[c * levels * width :]):
        raise ValueError("nonzero padding bits after the ans counts: corrupt message.")
    q = _unpack_bits(bits[: c * levels * width], c * levels, width, 1).reshape(c, levels).astype(np.int64)
    payload = body[2 + count_bytes :]
    if len(payload) % 4:
        raise ValueError(f"ans payload is {len(payload)} bytes, not a whole number of 32-bit words.")
    rows = n // c if c else 0
    nonzero = np.count_nonzero(q, axis=1)
    if n and np.any(nonzero == 0):
        raise ValueError("ans model has a channel with all-zero counts: corrupt message.")
    # No payload-length bound on the declared shape is possible here: from its empty initial state ANS
    # codes a run of the first symbol of the alphabet in zero bits (and other runs nearly so), so a
    # legitimate message can be far shorter than its self-information. max_elements is the bound.
    coded = nonzero > 1
    if not np.any(coded) and payload:
        raise ValueError("ans message has payload words but every channel is constant: corrupt message.")
    out = np.empty((rows, c), dtype)
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, "<u4").astype(np.uint32))
        for ch, m in enumerate(_models(q)):
            if m is None:
                out[:, ch] = int(np.argmax(q[ch]))
                continue
            # In chunks: constriction returns int32, 4x the output's bytes.
            for start in range(0, rows, _DECODE_CHUNK):
                stop = min(start + _DECODE_CHUNK, rows)
                out[start:stop, ch] = coder.decode(m, stop - start)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"ans payload does not decode: {err}") from err
    if not empty:
        raise ValueError("ans payload has data left after the declared shape: corrupt message.")
    if out.size and out.max() >= levels:
        raise ValueError(f"decoded index {int(out.max())} >= levels={levels}: corrupt message.")
    return out.reshape(-1)
