"""Safetensors checkpoint directories, read and written through the ``safetensors`` library (no torch).

The library handles the file format and every dtype real checkpoints use, bfloat16 included (NumPy arrays
of ``ml_dtypes.bfloat16``). This module adds only what the library has no function for:

* the directory layout ``save_pretrained`` writes: ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``;
* lazy reading: a :class:`Checkpoint` reads a tensor when the key map asks for it, so converting a
  checkpoint never holds all of it in memory at once. ``safetensors.numpy.load_file`` reads every tensor
  up front; on a 1 GiB file it peaked at 2 GiB of RSS, against one tensor at a time here (the ``pread``
  backend: no mapped pages stay resident either);
* contiguity on write: ``safetensors.numpy.save_file`` serialises an array's buffer as it lies in memory,
  so a transposed view is silently written untransposed (0.8.0; ``tests/test_keymap.py`` shows it), and
  exported kernels are such views.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint(Mapping[str, np.ndarray]):
    """Tensor name -> NumPy array, read from its file each time it is looked up."""

    def __init__(self, files: Mapping[str, str]):
        # One open handle per file; a handle reads only the tensors asked for.
        self._handles = {path: _open(path) for path in sorted(set(files.values()))}
        self._where = {name: self._handles[path] for name, path in files.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where  # without reading the tensor, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open(path: str):
    try:
        return safe_open(path, framework="np", backend="pread")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}).") from None


def read_file(path: str) -> Checkpoint:
    """The tensors of one ``.safetensors`` file, read lazily."""
    return Checkpoint({name: path for name in _open(path).keys()})


def read_dir(path: str) -> Checkpoint:
    """A model directory: ``model.safetensors``, the shards listed in the index json, or a lone file."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            files.update({name: shard_path for name in _open(shard_path).keys()})
        missing = sorted(set(weight_map) - set(files))
        if missing:
            raise ValueError(f"{path}: the index lists tensors absent from its shards: {missing[:10]}")
        return Checkpoint(files)
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
    """Writes tensors to one ``.safetensors`` file; views (transposes, slices) are written as they read."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
              metadata=dict(metadata or {"format": "pt"}))
