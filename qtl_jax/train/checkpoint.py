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
``checksums``        a digest of every saved array and JSON item (see below)
===================  ==================================================================

Restores always go through an abstract target built from a freshly created state, so optax state
types, dtypes and shardings come back exactly as the running program expects (a target-less restore
returns optax states as plain lists).

Verification. Orbax 0.12 checks no array data on restore (its zarr3 layout has a crc32c on the shard
*index* only, and the default zarr2/OCDBT layout none), so flipped bytes load silently. Each save therefore
records, per array, its shape, dtype and a 64-bit digest of its bytes: two independent position-keyed
sums of murmur3-mixed 32-bit words (:func:`array_digest`). Integer sums are exact and order-free, so the
digest of an accelerator or multi-process array is reduced on its own devices (independent of the
sharding) and a CPU array's is computed in place with numpy; a save blocks for that besides Orbax's own
host copy, and the writes stay asynchronous. :func:`verify_step` re-reads a step from disk, one array at
a time, and checks every digest and JSON file, naming the file (and array) that fails; a restore also
checks what it loaded. A corrupt newest checkpoint is reported in one line, moved aside to
``checkpoints/<step>.corrupt`` (so the steps run again can save under their number) and the newest
intact one is used instead, unless ``fallback=False``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qtl_jax import rules
from qtl_jax.split.step import PartitionState, TrainState

ARRAY_ITEMS = ("client_params", "client_opt", "client_stats", "server_params", "server_opt", "server_stats", "train")
JSON_ITEMS = ("data", "config")
CHECKSUM_ITEM = "checksums"
CHECKSUM_FORMAT = 1
# The file in which Orbax's JsonSave stores an item (orbax.checkpoint JsonCheckpointHandler's default).
JSON_ITEM_FILE = "metadata"
# Orbax's JSON bookkeeping files inside a step directory (array data and OCDBT manifests are binary).
_JSON_FILE_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", JSON_ITEM_FILE)
_JSON_DIRS = ("array_metadatas",)
CORRUPT_SUFFIX = ".corrupt"


class CorruptCheckpointError(ValueError):
    """A checkpoint step whose files cannot be read or whose bytes differ from the digests saved with it.

    ``where`` is the damaged file, or the item directory holding the damaged array named in ``problem``.
    A ``ValueError`` (saved content that is not what it claims to be, like ``json.JSONDecodeError``), so
    that code holding a checkpointer it did not build (the split server) can tell a bad checkpoint from a
    bug without importing this module.
    """

    def __init__(self, step: int, where: str, problem: str, message: str | None = None):
        self.step, self.where, self.problem = step, where, problem
        super().__init__(message or f"checkpoint step {step} is corrupt: {problem} ({where})")


def _none_intact(directory: str, bad: list[CorruptCheckpointError], advice: str) -> CorruptCheckpointError:
    detail = "; ".join(f"step {e.step}: {e.problem} ({e.where})" for e in bad)
    return CorruptCheckpointError(bad[0].step, directory, detail, f"no intact checkpoint in {directory}: {detail}. "
                                                                   f"{advice}")


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


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Digests


_GOLDEN, _M1, _M2, _SEED_B = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F
_HOST_CHUNK = 1 << 16  # words per numpy pass: temporaries that stay in cache (2x faster than 1 << 22)


def _fmix32(h, xp):
    # murmur3's finaliser: a bijection of uint32 that spreads every input bit over the word.
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(_M1)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(_M2)
    return h ^ (h >> xp.uint32(16))


def _lanes(words, first: int, xp) -> tuple[Any, Any]:
    """Two uint32 sums over ``words`` (1-D uint32) whose first element is word number ``first``.

    Each term is a bijection of its word for a fixed position, so changing one word always changes both
    sums, and a change of several words goes unnoticed with probability ~2**-64.
    """
    pos = (xp.arange(words.shape[0], dtype=xp.uint32) + xp.uint32(first % 2**32)) * xp.uint32(_GOLDEN)
    a = xp.sum(_fmix32(words ^ pos, xp), dtype=xp.uint32)
    b = xp.sum(_fmix32((words + pos) ^ xp.uint32(_SEED_B), xp), dtype=xp.uint32)
    return a, b


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _words_jax(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    raise TypeError(f"cannot checksum an array of dtype {x.dtype}")


def _words_numpy(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return x.reshape(-1).astype(np.uint32)
    size = x.dtype.itemsize
    if size in (4, 8):
        return x.reshape(-1).view(np.uint32)
    if size in (1, 2):
        return x.reshape(-1).view(np.uint8 if size == 1 else np.uint16).astype(np.uint32)
    raise TypeError(f"cannot checksum an array of dtype {x.dtype}")


def _hex(a: int, b: int) -> str:
    return f"{int(a):08x}{int(b):08x}"


def array_digest(x: np.ndarray) -> str:
    """The 16-hex-digit digest of a host array (the same value :func:`tree_digests` computes on devices)."""
    words = _words_numpy(np.asarray(x))
    a = b = 0
    for first in range(0, words.shape[0], _HOST_CHUNK):
        da, db = _lanes(words[first: first + _HOST_CHUNK], first, np)
        a, b = (a + int(da)) % 2**32, (b + int(db)) % 2**32
    return _hex(a, b)


@jax.jit
def _device_lanes(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.stack(_lanes(_words_jax(x), 0, jnp)) for x in leaves])


def _fetch(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    # Orbax's own parameter names ('a.b.0.c'): the same for the saved tree, a restore into a target of
    # the same structure and a target-less restore (which turns optax namedtuples into lists of dicts).
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(".".join(ocp.tree.str_keypath(path)), leaf) for path, leaf in flat]


def tree_digests(tree: Any) -> dict[str, dict[str, Any]]:
    """``{orbax param name: {'shape', 'dtype', 'digest'}}`` of every leaf of ``tree``.

    Arrays on accelerators, or spread over several processes, are reduced where they live (one jit per
    set of devices); the rest on the host, where numpy reads CPU arrays in place and needs no compile
    (the jit takes seconds to compile for a few hundred leaves, numpy hashes ~300 MB/s on one core).
    """
    # A typed PRNG key is saved (and read back) as its raw key data.
    named = [(name, jax.random.key_data(leaf) if _is_key(leaf) else leaf) for name, leaf in _named_leaves(tree)]
    out: dict[str, dict[str, Any]] = {}
    groups: dict[frozenset, list[tuple[str, jax.Array]]] = {}
    for name, leaf in named:
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable and
                                                all(d.platform == "cpu" for d in leaf.sharding.device_set)):
            groups.setdefault(frozenset(leaf.sharding.device_set), []).append((name, leaf))
        else:
            out[name] = {"digest": array_digest(np.asarray(leaf))}
    for members in groups.values():
        lanes = _fetch(_device_lanes([leaf for _, leaf in members]))
        for (name, _), (a, b) in zip(members, lanes):
            out[name] = {"digest": _hex(a, b)}
    for name, leaf in named:
        out[name].update(shape=list(np.shape(leaf)), dtype=str(np.dtype(leaf.dtype)))
    return {name: out[name] for name, _ in named}


def json_digest(value: Any) -> str:
    """crc32 of the canonical JSON text of ``value`` (key order and spacing do not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


def _checksums(items: Mapping[str, Any], json_items: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": CHECKSUM_FORMAT,
            "arrays": {k: tree_digests(v) for k, v in items.items() if jax.tree_util.tree_leaves(v)},
            "json": {k: json_digest(v) for k, v in json_items.items()}}


# ---------------------------------------------------------------------------------------------------
# Verification of one step directory


def _step_path(directory: str, step: int) -> str:
    return os.path.join(directory, str(step))


def _read_json_files(step: int, step_dir: str) -> dict[str, Any]:
    """Every Orbax JSON file of a step, parsed: ``{path relative to step_dir: value}``."""
    if not os.path.isdir(step_dir):
        raise CorruptCheckpointError(step, step_dir, "the step directory is missing")
    found = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        in_json_dir = os.path.basename(root) in _JSON_DIRS
        for name in sorted(files):
            if not (in_json_dir or name in _JSON_FILE_NAMES):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    found[os.path.relpath(path, step_dir)] = json.load(f)
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise CorruptCheckpointError(step, path, f"unreadable metadata file ({_one_line(e, 120)})") from e
    if "_CHECKPOINT_METADATA" not in found:
        raise CorruptCheckpointError(step, os.path.join(step_dir, "_CHECKPOINT_METADATA"), "the file is missing")
    return found


def _saved_checksums(step: int, step_dir: str, json_files: Mapping[str, Any]) -> dict[str, Any] | None:
    """The step's checksums item; None for a checkpoint written before qtl_jax recorded them."""
    rel = os.path.join(CHECKSUM_ITEM, JSON_ITEM_FILE)
    sums = json_files.get(rel)
    if sums is None:
        return None
    if not (isinstance(sums, dict) and sums.get("format") == CHECKSUM_FORMAT and isinstance(sums.get("arrays"), dict)
            and isinstance(sums.get("json"), dict)):
        raise CorruptCheckpointError(step, os.path.join(step_dir, rel), "the checksums file is not in the expected "
                                     "form")
    return sums


def _compare(step: int, item_dir: str, got: Mapping[str, Mapping[str, Any]], want: Mapping[str, Any]) -> None:
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            raise CorruptCheckpointError(step, item_dir, f"array {name!r} is missing")
        if (list(g["shape"]), g["dtype"]) != (list(w["shape"]), w["dtype"]):
            raise CorruptCheckpointError(step, item_dir, f"array {name!r} is {g['dtype']}{list(g['shape'])}, "
                                                         f"saved as {w['dtype']}{list(w['shape'])}")
        if g["digest"] != w["digest"]:
            raise CorruptCheckpointError(step, item_dir, f"array {name!r} does not match its checksum")
    extra = sorted(set(got) - set(want))
    if extra:
        raise CorruptCheckpointError(step, item_dir, f"array {extra[0]!r} has no checksum")


def _item_digests_host(step: int, item_dir: str, metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`tree_digests` of a saved array item read back from disk as stored, one array at a time.

    Reads each array with TensorStore's blocking API, in the layout ``metadata`` (the item's parsed
    ``_METADATA``) records, rather than through Orbax: Orbax reads all arrays concurrently on an asyncio
    loop it closes on the first failure, and TensorStore then prints a traceback from every read still
    pending, which would bury the one line this module reports.
    """
    import tensorstore as ts

    tree = metadata.get("tree_metadata")
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(step, os.path.join(item_dir, "_METADATA"), "it lists no arrays")
    driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    context = ts.Context()  # a fresh cache: what is on disk now
    out = {}
    for entry in tree.values():
        value = entry.get("value_metadata", {})
        if value.get("skip_deserialize"):
            continue  # an empty node (None, optax's EmptyState), not an array
        name = ".".join(str(k["key"]) for k in entry["key_metadata"])
        if metadata.get("use_ocdbt", True):
            kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": item_dir}, "path": name + "/"}
        else:
            kvstore = {"driver": "file", "path": os.path.join(item_dir, name) + "/"}
        try:
            array = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True, context=context).result()
            host = np.asarray(array.read().result())
        except Exception as e:  # noqa: BLE001 - any failure to read saved bytes means the files are damaged
            raise CorruptCheckpointError(step, item_dir, f"array {name!r} cannot be read: {_one_line(e)}") from e
        out[name] = {"digest": array_digest(host), "shape": list(host.shape), "dtype": str(host.dtype)}
    return out


def verify_step(directory: str, step: int, items: Iterable[str] | None = None) -> bool:
    """Re-reads checkpoint ``step`` under ``directory`` from disk and checks it against its checksums.

    ``items`` limits the check to those items (default: all). Returns True when the step carries
    checksums and they all match, False for an older checkpoint without checksums that could still be
    read in full. Raises :class:`CorruptCheckpointError` naming the file (and array) otherwise.
    """
    step_dir = _step_path(directory, step)
    json_files = _read_json_files(step, step_dir)
    sums = _saved_checksums(step, step_dir, json_files)
    wanted = set(ARRAY_ITEMS + JSON_ITEMS if items is None else items)
    for item in ARRAY_ITEMS:
        if item not in wanted:
            continue
        item_dir = os.path.join(step_dir, item)
        expected = None if sums is None else sums["arrays"].get(item)
        if expected is None and not os.path.isdir(item_dir):
            continue  # an empty tree (no quantizer statistics) is not saved
        metadata = json_files.get(os.path.join(item, "_METADATA"))
        if metadata is None:
            raise CorruptCheckpointError(step, os.path.join(item_dir, "_METADATA"), "the file is missing")
        got = _item_digests_host(step, item_dir, metadata)
        if sums is not None:
            _compare(step, item_dir, got, expected or {})
    for item in JSON_ITEMS:
        rel = os.path.join(item, JSON_ITEM_FILE)
        if item in wanted and sums is not None and item in sums["json"]:
            if rel not in json_files:
                raise CorruptCheckpointError(step, os.path.join(step_dir, rel), "the file is missing")
            if json_digest(json_files[rel]) != sums["json"][item]:
                raise CorruptCheckpointError(step, os.path.join(step_dir, rel), "the JSON does not match its checksum")
    return sums is not None


def _check_restored(step: int, step_dir: str, sums: Mapping[str, Any] | None, restored: Mapping[str, Any],
                    json_restored: Mapping[str, Any]) -> None:
    """Compares what a target restore loaded with the saved digests (on the devices it was loaded to).

    An item restored into a different dtype than it was saved in (Orbax casts) cannot be compared this
    way; it is re-read from disk as saved instead.
    """
    if sums is None:
        return
    reread = []
    for item, tree in restored.items():
        item_dir = os.path.join(step_dir, item)
        want = sums["arrays"].get(item, {})
        if {n: (list(np.shape(x)), str(np.dtype(jax.random.key_data(x).dtype if _is_key(x) else x.dtype)))
                for n, x in _named_leaves(tree)} != \
                {n: (list(w["shape"]), w["dtype"]) for n, w in want.items()}:
            reread.append(item)
            continue
        _compare(step, item_dir, tree_digests(tree), want)
    if reread:
        verify_step(os.path.dirname(step_dir), step, reread)
    for item, value in json_restored.items():
        if item in sums["json"] and json_digest(value) != sums["json"][item]:
            raise CorruptCheckpointError(step, os.path.join(step_dir, item, JSON_ITEM_FILE),
                                         "the JSON does not match its checksum")


def _restore_verified(manager: ocp.CheckpointManager, directory: str, step: int, args: dict[str, Any],
                      checked: bool = False) -> dict[str, Any]:
    """``manager.restore`` of ``args`` at ``step``, with every file and loaded array checked.

    Unless ``checked`` (the step was just read back by :func:`verify_step`), the items are first read
    back from disk: damaged files are then reported in one line before Orbax, which would print a
    traceback per pending read, touches them. What is loaded is always compared with the digests.
    """
    step_dir = _step_path(directory, step)
    if not checked:
        verify_step(directory, step, args)
    sums = _saved_checksums(step, step_dir, _read_json_files(step, step_dir))
    out = manager.restore(step, args=ocp.args.Composite(**args))
    arrays = {k: out[k] for k in args if k in ARRAY_ITEMS}
    _check_restored(step, step_dir, sums, arrays, {k: out[k] for k in args if k in JSON_ITEMS})
    return {k: out[k] for k in args}


def _report_line(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# The manager


class Checkpointer:
    """Periodic saves with keep-last-N, and verified restores of the newest intact step in a workdir.

    Args:
      workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints/<step>``.
      keep: how many of the most recent checkpoints to keep.
      fallback: when the newest checkpoint is corrupt, report it, move it aside and use the newest intact
        one (True), or stop with :class:`CorruptCheckpointError` (False).
      report: where the one-line reports go (default: stderr of process 0).
    """

    def __init__(self, workdir: str, keep: int = 2, fallback: bool = True,
                 report: Callable[[str], None] = _report_line):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.fallback = fallback
        self._report = report
        self._verified: set[int] = set()  # steps latest_step() has read back in full from disk

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first, intact or not."""
        return sorted(self.manager.all_steps())

    def verify(self, step: int) -> bool:
        """Reads ``step`` back from disk now and checks every array and JSON item against its checksum.

        Returns True when checked, False for a checkpoint saved before checksums existed (it was read in
        full, but its bytes cannot be checked). Raises :class:`CorruptCheckpointError` naming the file.
        """
        self.manager.wait_until_finished()
        return verify_step(self.directory, step)

    def is_intact(self, step: int) -> bool:
        """Whether ``step`` reads back from disk now and matches its checksums (re-read, never cached)."""
        try:
            self.verify(step)
        except CorruptCheckpointError:
            return False
        return True

    def latest_step(self) -> int | None:
        """The step :meth:`restore` loads by default: the newest one that reads back intact.

        Newer corrupt steps are reported in one line each and moved aside to ``<step>.corrupt`` (with
        ``fallback``); without ``fallback``, or when no step is intact, :class:`CorruptCheckpointError`
        is raised and nothing is moved. None when there is no checkpoint at all.
        """
        self.manager.wait_until_finished()
        bad: list[CorruptCheckpointError] = []
        chosen = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            if step in self._verified:
                chosen = step
                break
            try:
                checked = verify_step(self.directory, step)
            except CorruptCheckpointError as e:
                if not self.fallback:
                    raise CorruptCheckpointError(e.step, e.where, e.problem, f"{e}; not falling back to an older "
                                                 f"checkpoint (checkpoint_fallback=False): move "
                                                 f"{_step_path(self.directory, step)} away or set "
                                                 "--config.checkpoint_fallback=True.") from e
                bad.append(e)
                continue
            if not checked:
                self._report(f"qtl_jax: checkpoint step {step} in {self.directory} has no checksums (saved by an "
                             "older qtl_jax); it was read back in full but its bytes cannot be checked.")
            self._verified.add(step)
            chosen = step
            break
        if chosen is None and bad:
            raise _none_intact(self.directory, bad, "Nothing was moved; to start over, move that directory away.")
        for e in bad:
            moved = self.move_aside(e.step, CORRUPT_SUFFIX)
            self._report(f"qtl_jax: {e}; moved it to {moved} and falling back to step {chosen} (verified).")
        return chosen

    def move_aside(self, step: int, suffix: str) -> str:
        """Renames step ``step``'s directory to ``<step><suffix>`` (``.1``, ``.2``, ... if taken); returns the new path.

        The step no longer counts as a checkpoint (so a later save can use its number) but nothing is
        deleted. Suffixes in use: ``.corrupt`` (failed verification), ``.rewound`` (a split server went back
        to an older step, see :mod:`qtl_jax.split.server`).
        """
        src = _step_path(self.directory, step)
        dst, n = src + suffix, 1
        while os.path.exists(dst):
            dst, n = f"{src}{suffix}.{n}", n + 1
        if jax.process_index() == 0:
            os.replace(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"qtl_jax_checkpoint_move_aside_{step}")
        self._verified.discard(step)
        self.manager.reload()
        return dst

    def moved_aside(self, suffix: str) -> list[str]:
        """The directories :meth:`move_aside` has left with ``suffix`` (sorted paths)."""
        if not os.path.isdir(self.directory):
            return []
        pattern = re.compile(r"\d+" + re.escape(suffix) + r"(\.\d+)?")
        return sorted(os.path.join(self.directory, name) for name in os.listdir(self.directory)
                      if pattern.fullmatch(name))

    def save(self, state: TrainState, data_state: Mapping[str, Any], config_json: Mapping[str, Any]) -> int:
        """Saves ``state`` under its own step (asynchronously; :meth:`wait` or :meth:`close` to finish).

        Blocks for the digests of the arrays (one reduction on their devices) besides Orbax's host copy.
        """
        step = int(jax.device_get(state.step))
        items = _items(state)
        json_items = {"data": dict(data_state), "config": dict(config_json)}
        args = {k: a for k, v in items.items() if (a := _array_args(v, restore=False)) is not None}
        args.update({k: ocp.args.JsonSave(v) for k, v in json_items.items()})
        args[CHECKSUM_ITEM] = ocp.args.JsonSave(_checksums(items, json_items))
        self._verified.discard(step)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        return step

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The checkpointed state (laid out like ``like``) and the loader state, from ``step`` or the latest.

        Without ``step``: :meth:`latest_step` (the newest intact one). Everything loaded is checked against
        its checksums; a corrupt ``step`` raises :class:`CorruptCheckpointError`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.manager.wait_until_finished()
        items = _items(like)
        args = {k: a for k, v in items.items() if (a := _array_args(v, restore=True)) is not None}
        args["data"] = ocp.args.JsonRestore()
        out = _restore_verified(self.manager, self.directory, step, args, checked=step in self._verified)
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


def restore_params(workdir: str, like: TrainState, fallback: bool = True,
                   report: Callable[[str], None] = _report_line,
                   dont_load: Sequence[str] = ()) -> tuple[Any, Any, Any, int]:
    """``(client params, server params, client quantizer statistics, step)`` of ``workdir``'s newest intact checkpoint.

    Used to start one stage from another: optimizer state, step, RNG and data position are *not* taken.
    ``like`` gives the structure, dtypes and shardings (the new run's freshly created state); a partition
    it holds empty (one side of a network split run) is neither read nor required, and comes back as
    ``like``'s. The loaded arrays are checked against their checksums; a corrupt newer step is reported
    in one line and skipped (not moved: this reads another run's workdir), or raises
    :class:`CorruptCheckpointError` without ``fallback``.

    ``dont_load`` (``init.dont_load``): regexes over the ``partition/path`` names of
    ``optimizer.param_groups`` (a client quantizer statistic is named like the parameter beside it). The
    leaves they match are not taken from the checkpoint but kept as ``like`` holds them, so ``like`` must
    then be a concrete, initialised state: e.g. fresh quantizers on a checkpoint trained at 16 bits (which
    has none) or at another L. Any other difference between the saved tree and ``like`` is an error that
    names the leaves.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"init.from_workdir={workdir!r} has no checkpoints/ directory; point it at the workdir of a finished "
            "stage-1 run (the --workdir you gave train.py)."
        )
    wanted = {"client_params": like.client.params, "server_params": like.server.params,
              "client_stats": like.client.batch_stats}
    args = {k: a for k, v in wanted.items() if (a := _array_args(v, restore=True)) is not None}
    if dont_load:
        _check_dont_load(wanted, dont_load)
    with ocp.CheckpointManager(directory) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"init.from_workdir={workdir!r}: {directory} holds no checkpoint yet.")
        bad: list[CorruptCheckpointError] = []
        for step in steps:
            try:
                if dont_load:
                    out = _restore_partial(manager, directory, step, wanted, dont_load)
                else:
                    out = _restore_verified(manager, directory, step, args)
            except CorruptCheckpointError as e:
                if not fallback:
                    raise
                bad.append(e)
                continue
            except (ValueError, KeyError) as e:
                raise ValueError(
                    f"cannot restore the params of {directory} step {step} into this model: {_one_line(e)}. The "
                    "previous stage must use the same model and quantizer settings (model.*, quantizer.*), or list "
                    "what this run initialises afresh in init.dont_load (e.g. '.*_quantizer/.*' for new "
                    "quantizers on a 16-bit run)."
                ) from e
            for b in bad:
                report(f"qtl_jax: {b}; using step {step} (verified) instead.")
            got = {k: out.get(k, v) for k, v in wanted.items()}
            return got["client_params"], got["server_params"], got["client_stats"], step
    raise _none_intact(directory, bad, "Point init.from_workdir at a run with an intact checkpoint.")


# What init.dont_load's regexes are matched against: the partition's leaf names, as optimizer.param_groups.
_PARTITION_OF = {"client_params": "client", "server_params": "server", "client_stats": "client"}


def _leaf_name(item: str, path: tuple) -> str:
    return f"{_PARTITION_OF[item]}/{rules.path_str(path)}"


def _named(item: str, tree: Any) -> dict[str, Any]:
    return {_leaf_name(item, p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_dont_load(wanted: Mapping[str, Any], dont_load: Sequence[str]) -> None:
    names = [n for item, tree in wanted.items() for n in _named(item, tree)]
    dead = [p for p in dont_load if not any(re.fullmatch(p, n) for n in names)]
    if dead:
        raise ValueError(f"init.dont_load {dead} match no parameter of this model (typo?); names look like "
                         f"{names[:3]}.")
    fresh = [n for item, tree in wanted.items() for n, x in _named(item, tree).items()
             if any(re.fullmatch(p, n) for p in dont_load) and isinstance(x, jax.ShapeDtypeStruct)]
    if fresh:
        raise ValueError(f"init.dont_load keeps {fresh[:3]} from the new run's initialisation, but the state given "
                         "holds no values there (an abstract template).")


def _restore_partial(manager: ocp.CheckpointManager, directory: str, step: int, wanted: Mapping[str, Any],
                     dont_load: Sequence[str]) -> dict[str, Any]:
    """:func:`_restore_verified` of ``wanted``'s items with ``dont_load``'s leaves kept from ``wanted``.

    Orbax restores a tree only whole, in its saved structure: the target is that structure (read from the
    item's metadata, empty subtrees included), with ``wanted``'s abstract leaves where they are loaded
    and the saved shapes where they are not (read to host, checked against the digests, then dropped).
    """
    from etils import epath

    skip = lambda name: any(re.fullmatch(p, name) for p in dont_load)  # noqa: E731
    step_dir = _step_path(directory, step)
    present = [k for k in wanted if os.path.isdir(os.path.join(step_dir, k))]
    verify_step(directory, step, present)
    args, problems = {}, []
    for item, tree in wanted.items():
        like = _named(item, tree)
        if not like:
            continue  # a partition this state does not hold (one side of a network split run)
        if item not in present:
            problems += [f"{n} (the checkpoint has no {item})" for n in like if not skip(n)]
            continue
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, item))).tree
        saved_names = _named(item, saved)
        problems += [f"{n} (not in the checkpoint)" for n in like if n not in saved_names and not skip(n)]
        problems += [f"{n} (not in this model)" for n in saved_names if n not in like and not skip(n)]

        def target(path, meta, item=item, like=like):
            name = _leaf_name(item, path)
            return like[name] if name in like and not skip(name) else jax.ShapeDtypeStruct(meta.shape, meta.dtype)

        args[item] = ocp.args.StandardRestore(_abstract(jax.tree_util.tree_map_with_path(target, saved)))
    if problems:
        raise ValueError(f"the saved tree and this model differ outside init.dont_load: {problems[:6]}")
    out = _restore_verified(manager, directory, step, args, checked=True) if args else {}
    merged = {}
    for item, tree in wanted.items():
        loaded = _named(item, out[item]) if item in args else {}
        merged[item] = jax.tree_util.tree_map_with_path(
            lambda p, x, item=item, loaded=loaded: x if skip(n := _leaf_name(item, p)) else loaded[n], tree)
    return merged


def write_config(workdir: str, config_json: dict[str, Any]) -> None:
    """Writes the run's config JSON into its workdir: what ``init.from_workdir`` and ``eval.py`` read back."""
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_json, f, indent=1)
    os.replace(tmp, path)  # a run killed while writing leaves the old file or none, never half of one


def read_config(workdir: str) -> dict[str, Any]:
    """The config JSON a run wrote into its workdir (``config.json``)."""
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
