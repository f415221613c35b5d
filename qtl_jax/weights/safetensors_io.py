"""Reads and writes safetensors files with NumPy only (no torch at run time).

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw bytes. We parse it ourselves rather than use
``safetensors.numpy`` because NumPy has no bfloat16 and real checkpoints are often stored in it;
``ml_dtypes`` (a JAX dependency) supplies the type. Tensors are memory-mapped, so a multi-GB
checkpoint is not read into memory until a tensor is used.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# A header is a few hundred bytes per tensor; anything this large is not a safetensors file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_file(path: str) -> dict[str, np.ndarray]:
    """Returns every tensor of one ``.safetensors`` file as a read-only memory-mapped array."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file (declared header of {n} bytes).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e}).") from None
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= data.size or end - start != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has a byte range that does not fit its shape.")
        out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def read_dir(path: str) -> dict[str, np.ndarray]:
    """Reads a model directory: ``model.safetensors`` or the shards listed in the index json."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_file(os.path.join(path, shard)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{path}: the index lists tensors absent from its shards: {missing[:10]}")
        return out
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(single):
        return read_file(single)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return read_file(os.path.join(path, found[0]))
    raise FileNotFoundError(
        f"{path}: no {SINGLE_NAME} or {INDEX_NAME}. Convert a PyTorch .bin checkpoint to safetensors "
        "first (transformers: model.save_pretrained(dir, safe_serialization=True))."
    )


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors to one ``.safetensors`` file (contiguous, names sorted, 8-byte aligned header)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors.")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
