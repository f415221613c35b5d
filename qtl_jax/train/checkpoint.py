"""Orbax checkpoints of a split training run: one ``CheckpointManager`` under ``<workdir>/checkpoints``.

Each checkpoint step holds these items (separate so that a later stage can restore only the params):

===================  ==================================================================
item                 content
===================  ==================================================================
``client_params``    the client partition's parameters
``client_opt``       its optimizer state (AdamW moments and counts per group)
``client_stats``     its quantizer running statistics (``{}`` unless scaling='ema')
``server_params``    the server partition's parameters
``server_opt``       its optimizer state
``server_stats``     its running state: the downlink's error-feedback residuals (absent without them)
``train``            ``{'step', 'rng'}``
``data``             the input loader's JSON state (exact position in the data stream)
``config``           the run's config as JSON (what was trained, for the next stage and for people)
===================  ==================================================================

Restores always go through an abstract target built from a freshly created state, so optax state
types, dtypes and shardings come back exactly as the running program expects (a target-less restore
returns optax states as plain lists).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from qtl_jax.split.step import PartitionState, TrainState

ARRAY_ITEMS = ("client_params", "client_opt", "client_stats", "server_params", "server_opt", "server_stats", "train")
JSON_ITEMS = ("data", "config")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _items(state: TrainState) -> dict[str, Any]:
    return {
        "client_params": state.client.params,
        "client_opt": state.client.opt_state,
        "client_stats": state.client.batch_stats,
        "server_params": state.server.params,
        "server_opt": state.server.opt_state,
        "server_stats": state.server.batch_stats,
        "train": {"step": state.step, "rng": state.rng},
    }


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _array_args(tree: Any, restore: bool):
    # Orbax refuses an empty pytree (no quantizer statistics); such items are skipped and rebuilt as {}.
    if not jax.tree_util.tree_leaves(tree):
        return None
    return ocp.args.StandardRestore(_abstract(tree)) if restore else ocp.args.StandardSave(tree)


class Checkpointer:
    """Periodic saves with keep-last-N and restore of the latest step in a workdir.

    Args:
      workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints/<step>``.
      keep: how many of the most recent checkpoints to keep.
    """

    def __init__(self, workdir: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, data_state: Mapping[str, Any], config_json: Mapping[str, Any]) -> int:
        """Saves ``state`` under its own step (asynchronously; :meth:`wait` or :meth:`close` to finish)."""
        step = int(jax.device_get(state.step))
        args = {k: a for k, v in _items(state).items() if (a := _array_args(v, restore=False)) is not None}
        args["data"] = ocp.args.JsonSave(dict(data_state))
        args["config"] = ocp.args.JsonSave(dict(config_json))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        return step

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The checkpointed state (laid out like ``like``) and the loader state, from ``step`` or the latest."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = _items(like)
        args = {k: a for k, v in items.items() if (a := _array_args(v, restore=True)) is not None}
        args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        got = {k: (out[k] if k in args else items[k]) for k in items}
        state = TrainState(
            step=got["train"]["step"],
            client=PartitionState(got["client_params"], got["client_opt"], got["client_stats"]),
            server=PartitionState(got["server_params"], got["server_opt"], got["server_stats"]),
            rng=got["train"]["rng"],
        )
        return state, dict(out["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, like: TrainState) -> tuple[Any, Any, Any, int]:
    """``(client params, server params, client quantizer statistics, step)`` of ``workdir``'s latest checkpoint.

    Used to start one stage from another: optimizer state, step, RNG and data position are *not* taken.
    ``like`` gives the structure, dtypes and shardings (the new run's freshly created state).
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"init.from_workdir={workdir!r} has no checkpoints/ directory; point it at the workdir of a finished "
            "stage-1 run (the --workdir you gave train.py)."
        )
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"init.from_workdir={workdir!r}: {directory} holds no checkpoint yet.")
        args = {"client_params": ocp.args.StandardRestore(_abstract(like.client.params)),
                "server_params": ocp.args.StandardRestore(_abstract(like.server.params))}
        stats = _array_args(like.client.batch_stats, restore=True)
        if stats is not None:
            args["client_stats"] = stats
        try:
            out = manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"cannot restore the params of {directory} step {step} into this model: {e}. The previous stage must "
                "use the same model and quantizer settings (model.*, quantizer.*)."
            ) from e
    client_stats = out["client_stats"] if stats is not None else like.client.batch_stats
    return out["client_params"], out["server_params"], client_stats, step


def read_config(workdir: str) -> dict[str, Any]:
    """The config JSON a run wrote into its workdir (``config.json``)."""
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
