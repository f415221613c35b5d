"""A grain loader: seeded shuffling, epochs, host sharding, counted skips and exact resume.

The element order is a pure function of ``(len(source), seed, num_epochs, process_index,
process_count)``: grain's index shuffle permutes each epoch with the seed folded with the epoch
number, and host ``p`` of ``P`` takes elements ``p, p + P, p + 2P, ...`` of that global stream. So
batch ``j`` of every host together is the global batch ``j`` a single host would have drawn with the
global batch size (as a set; see ``tests/test_loader.py``), whatever the number of hosts.

Per-example transforms may reject an example by returning a ``SkippedExample``; the loader counts
rejections by reason in the main process (also when transforms run in worker processes), logs the
first few of each reason, and fills the batch from the following examples, so every batch is full
and no sample is silently zeroed.

``get_state()`` is a small JSON-serialisable dict: the underlying grain iterator's position, the
batch count and the skip counts. A new loader built with the same source and config and given that
state with ``set_state`` yields exactly the batches the original would have yielded next. Batching
happens here rather than in grain so that the position always sits on a batch boundary.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SkippedExample:
    """Returned by a transform instead of an example it cannot use; the loader counts it."""

    reason: str
    example_id: str = ""
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How records are ordered and batched.

    Attributes:
        global_batch_size: examples per step summed over all hosts.
        seed: shuffling seed, in [0, 2**32).
        shuffle: shuffle records (each epoch differently); False keeps the source order.
        num_epochs: passes over the source; None repeats forever (what multi-host training wants:
            hosts may skip different numbers of examples, so finite epochs could end a different
            step on each host; stop training by step count instead).
        drop_remainder: drop a last partial batch when finite epochs run out.
        worker_count: grain worker processes for the per-example transforms; 0 runs them in this
            process on ``read_threads`` threads. Works in and outside an absl app (a script, a
            notebook). The workers are spawned, so a script needs multiprocessing's usual
            ``if __name__ == "__main__":`` guard, and the transforms must pickle (cloudpickle).
        read_threads: threads reading and transforming records (when ``worker_count == 0``).
        read_buffer_size: examples read ahead of the consumer.
        log_skips: how many skipped examples per reason to log.
    """

    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = True
    worker_count: int = 0
    read_threads: int = 4
    read_buffer_size: int = 64
    log_skips: int = 3

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}.")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}.")
        if self.worker_count < 0 or self.read_threads < 1 or self.read_buffer_size < 1:
            raise ValueError(
                "worker_count must be >= 0 and read_threads, read_buffer_size >= 1; got "
                f"{self.worker_count}, {self.read_threads}, {self.read_buffer_size}."
            )


def stack_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Default collate: stacks each field of equally-shaped examples along a new batch axis."""
    keys = examples[0].keys()
    for e in examples[1:]:
        if e.keys() != keys:
            raise ValueError(f"examples have different fields: {sorted(keys)} vs {sorted(e.keys())}.")
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


class _SkipAware(grain.transforms.Map):
    """Applies a transform to examples and passes earlier rejections through untouched."""

    def __init__(self, fn: Callable[[Any], Any]):
        self._fn = fn.map if isinstance(fn, grain.transforms.Map) else fn

    def map(self, element):
        if isinstance(element, SkippedExample):
            return element
        return self._fn(element)


def _parse_absl_flags() -> None:
    """Makes grain's worker processes usable outside an absl app (a plain script, a notebook).

    grain reads its settings from absl flags, which only ``absl.app.run`` parses; before that any read
    raises ``UnparsedFlagAccessError``. Marking the flags parsed gives every flag its default value, what
    an absl app without command-line flags would have. Inside an absl app (train.py) they are already
    parsed and left alone.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """This host's share of the global batch; errors if the hosts cannot share it evenly."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not split evenly over {process_count} "
            "hosts; use a multiple of the host count."
        )
    return global_batch_size // process_count


class DataLoader(Iterator[dict[str, np.ndarray]]):
    """Iterates this host's batches; see the module docstring for order, skips and resume.

    Args:
        source: random-access records (``len`` and ``[i]``), e.g. a TFDS data source.
        operations: per-example transforms applied in order (callables or ``grain.transforms.Map``);
            any may return a ``SkippedExample``.
        config: ordering and batching.
        collate: turns a list of examples into one batch.
        process_index, process_count: this host and the number of hosts; default to JAX's.
    """

    def __init__(
        self,
        source: Any,
        operations: Sequence[Callable[[Any], Any]],
        config: LoaderConfig,
        *,
        collate: Callable[[list[Any]], Any] = stack_examples,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.config = config
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"process_index={self.process_index} is not in [0, process_count="
                f"{self.process_count})."
            )
        self.batch_size = host_batch_size(config.global_batch_size, self.process_count)
        self.num_records = len(source)
        if self.num_records == 0:
            raise ValueError("the data source is empty; nothing to load.")
        self._collate = collate

        ds = grain.MapDataset.source(source)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        # Repeat after shuffling: grain then reshuffles every epoch with (seed + epoch).
        if config.num_epochs != 1:
            ds = ds.repeat(config.num_epochs)
        ds = ds[self.process_index :: self.process_count]
        for op in operations:
            ds = ds.map(_SkipAware(op))
        it_ds = ds.to_iter_dataset(
            grain.ReadOptions(
                num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size
            )
        )
        if config.worker_count > 0:
            _parse_absl_flags()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
        self._it = iter(it_ds)
        self._batches = 0
        self._skipped: collections.Counter[str] = collections.Counter()
        self._exhausted = False

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {
            "num_records": self.num_records,
            "seed": c.seed,
            "shuffle": c.shuffle,
            "num_epochs": c.num_epochs,
            "global_batch_size": c.global_batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "worker_count": c.worker_count,
        }

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._exhausted:
            raise StopIteration
        examples = []
        while len(examples) < self.batch_size:
            try:
                element = next(self._it)
            except StopIteration:
                self._exhausted = True
                if examples and not self.config.drop_remainder:
                    break
                raise
            if isinstance(element, SkippedExample):
                self._count_skip(element)
            else:
                examples.append(element)
        self._batches += 1
        return self._collate(examples)

    def _count_skip(self, skip: SkippedExample) -> None:
        self._skipped[skip.reason] += 1
        if self._skipped[skip.reason] <= self.config.log_skips:
            logger.warning("skipping example %r (%s): %s", skip.example_id, skip.reason, skip.detail)

    @property
    def skipped(self) -> dict[str, int]:
        """Examples rejected so far by reason, on this host (restored on resume)."""
        return dict(self._skipped)

    def metrics(self) -> dict[str, int]:
        """Counters for logging: batches served and skips (total and by reason) on this host."""
        out = {"batches": self._batches, "skipped_total": sum(self._skipped.values())}
        out.update({f"skipped/{k}": v for k, v in sorted(self._skipped.items())})
        return out

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; restoring it continues with the next unseen batch."""
        return {
            "version": STATE_VERSION,
            "iterator": self._it.get_state(),
            "batches": self._batches,
            "skipped": dict(self._skipped),
            "exhausted": self._exhausted,
            "fingerprint": self._fingerprint(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``get_state()`` of a loader with the same source, config and host layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r} is not {STATE_VERSION}; it was "
                "saved by an incompatible version of this loader."
            )
        mine, theirs = self._fingerprint(), dict(state["fingerprint"])
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume: the saved loader state was made with different settings "
                f"(saved, now): {diff}. Resume with the same data, seed, epochs, batch size and "
                "host layout, or start the data stream afresh."
            )
        self._it.set_state(state["iterator"])
        self._batches = int(state["batches"])
        self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
        self._exhausted = bool(state["exhausted"])


def to_global_arrays(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Assembles every host's batch into global ``jax.Array``s laid out by ``sharding``.

    Each host passes its own batch (``global_batch_size / process_count`` rows); the result has the
    global batch size as its leading dimension, with rows placed on the devices ``sharding`` names
    (e.g. ``NamedSharding(mesh, P('data'))`` splits rows over the data axis).
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
