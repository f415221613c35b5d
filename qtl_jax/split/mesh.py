"""Device sub-meshes for the two partitions and config-declared parameter sharding.

The client and the server of the split each get their own device sub-mesh: disjoint devices, so the
only thing that moves between them is what the link carries (integer codes one way, gradients back).
Each sub-mesh has two axes, ``data`` (batch parallelism) and ``fsdp`` (batch *and* parameter
sharding, ZeRO-3 style). The batch is split over both axes; parameters are sharded over ``fsdp`` by
regex rules in the config (``'fsdp'``: shard the largest dimension that the axis divides;
``'replicate'``; or an explicit PartitionSpec tuple).

Axis types are ``Auto`` on purpose: the models are plain linen code with no sharding annotations in
their bodies, so XLA's propagation (GSPMD) should place the intermediate activations from the
shardings of the inputs and parameters. ``Explicit`` axes would make every op's output sharding part of
its type and require annotations throughout the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from qtl_jax import rules

AXES = ("data", "fsdp")
BATCH = P(AXES)


@dataclasses.dataclass(frozen=True)
class SplitMeshes:
    client: Mesh
    server: Mesh


def make_mesh(devices: Sequence[jax.Device], fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` with ``fsdp`` devices per parameter shard group."""
    n = len(devices)
    if n == 0 or fsdp < 1 or n % fsdp:
        raise ValueError(f"cannot lay {n} devices out as data x fsdp with fsdp={fsdp}: fsdp must divide the count.")
    return jax.make_mesh((n // fsdp, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=list(devices))


def split_meshes(
    client_devices: int, server_devices: int, *, client_fsdp: int = 1, server_fsdp: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> SplitMeshes:
    """Disjoint sub-meshes: the first ``client_devices`` devices for the client, the next ones for the server.

    ``0`` for either count means both sides share all devices (one accelerator, or a quick test);
    otherwise the two device sets are disjoint.
    """
    devices = list(devices if devices is not None else jax.devices())
    if not client_devices or not server_devices:
        return SplitMeshes(make_mesh(devices, client_fsdp), make_mesh(devices, server_fsdp))
    if client_devices + server_devices > len(devices):
        raise ValueError(
            f"mesh.client_devices={client_devices} + mesh.server_devices={server_devices} > {len(devices)} "
            "available devices; lower them, or set one to 0 to share all devices."
        )
    client = devices[:client_devices]
    server = devices[client_devices : client_devices + server_devices]
    return SplitMeshes(make_mesh(client, client_fsdp), make_mesh(server, server_fsdp))


def _tactic_spec(tactic: Any, shape: tuple[int, ...], mesh: Mesh) -> P:
    if tactic == "replicate" or not shape:
        return P()
    if tactic == "fsdp":
        n = mesh.shape["fsdp"]
        if n == 1:
            return P()
        # Shard the largest dimension the axis divides; small or indivisible tensors stay replicated.
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
        return P()
    if isinstance(tactic, (tuple, list)):
        return P(*tactic)
    raise ValueError(f"sharding rule value {tactic!r}: use 'fsdp', 'replicate' or a PartitionSpec tuple.")


def param_shardings(params: Any, mesh: Mesh, sharding_rules: Sequence[tuple[str, Any]]) -> Any:
    """A tree of NamedShardings for ``params`` (arrays or ShapeDtypeStructs) from ``(regex, tactic)`` rules.

    Parameters no rule matches are replicated.
    """
    tactics = rules.assign(params, list(sharding_rules), default="replicate", strict=False)
    return jax.tree_util.tree_map(
        lambda x, t: NamedSharding(mesh, _tactic_spec(t, tuple(np.shape(x)), mesh)), params, tactics
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(AXES, *([None] * (ndim - 1))))


def on_batch_sharding(x: Any, mesh: Mesh) -> jax.Array:
    """``x`` (host or device array) on ``mesh`` with its batch dimension split (:func:`batch_sharding`).

    An array already laid out so is returned as it is: ``jax.device_put`` would copy nothing, but its call
    costs ~0.2 ms of host time, several times per training step on the step's critical path.
    """
    target = batch_sharding(mesh, np.ndim(x))
    if isinstance(x, jax.Array) and x.sharding == target:
        return x
    return jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), target)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
