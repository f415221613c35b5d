"""Helpers the weight-loading tests share: rename checkpoint keys into another layout, write a checkpoint dir."""

import json
import os

import numpy as np

from qtl_jax.weights import safetensors_io


def rename(tensors, renames):
    """Tensors with the first matching ``(old_prefix, new_prefix)`` applied to each key."""
    out = {}
    for k, v in tensors.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = np.asarray(v)
    return out


def write(path, tensors, config):
    """A checkpoint directory: ``model.safetensors`` + ``config.json``; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    safetensors_io.write_file(os.path.join(path, "model.safetensors"), tensors)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path
