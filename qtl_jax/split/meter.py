"""Byte counts of measured steps, computed on host threads while the devices run the next programs.

Measuring what a network transport would send means fetching a step's codes to the host and entropy coding
them (:mod:`qtl_jax.codec`). At the paper's shapes that is ~0.93 M indices per image, tens of millions per
batch, and ANS codes a few tens of millions per second per core: seconds of host time per step, longer
than an accelerator step. A :class:`ByteMeter` takes that work off the step's critical path:

* ``submit(step, fetch, count)`` returns at once with a :class:`Pending`. A coordinator thread takes the
  submitted steps one at a time in submission order, calls ``fetch()`` (waits for the step's messages to
  reach the host: device time, not codec time) and then ``count(host, meter)``, which may fan its codec
  calls out over the meter's workers with :meth:`ByteMeter.encoded_sizes` (or any function over its
  threads with :meth:`ByteMeter.map`).
* At most ``max_pending`` steps are submitted and not yet finished; one more blocks the caller until the
  oldest finishes, so host memory stays bounded and a codec slower than the devices shows as exposed time
  instead of a growing queue.
* ``Pending.result()`` returns exactly that step's counts; an exception in the background is raised there
  as :class:`MeasurementError` naming the step, never lost.
* ``close()`` cancels the steps not started and the running one's codec calls not yet started, and returns
  without waiting: the running measurement ends on its own (its thread exits then), so closing never hangs
  on a measurement blocked on the devices.

``threads=0`` is the synchronous path: ``submit`` fetches and counts in the caller. The counts are the
same either way (the same functions on the same arrays); only when they are computed differs.

Where the coding runs (``pool``): on ``threads`` worker threads of this process (``'threads'``), or in
``threads`` worker processes (``'processes'``, :class:`qtl_jax.codec_pool.CoderPool`). The ANS coder holds
the GIL for each call, so on threads a measurement stalls the training loop's thread by up to one coder
call at a time (~5 ms on a 2-core EPYC, bench/codec_bench.py) and the threads do not code in parallel;
processes leave this interpreter alone and code in parallel, at the price of copying the indices into a pipe. ``'auto'``
(:func:`resolve_pool`) takes processes on an accelerator, whose step waits on the loop's thread, and threads
on the CPU backend, where the devices' work runs on the same cores as the workers.

``stats()``: ``codec_seconds`` (host time inside ``count``), ``exposed_seconds`` (time callers spent
blocked: in ``submit`` on backpressure or, synchronously, on the whole measurement, and in
``Pending.result()``), ``hidden_seconds`` (codec time nobody waited for: ``codec_seconds -
exposed_seconds``, at least 0) and ``steps``.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from qtl_jax import codec_pool
from qtl_jax.codec_pool import CodecJob

Counts = dict[str, Any]
POOLS = ("threads", "processes")


def resolve_pool(pool: str, backend: str) -> str:
    """``split.codec_pool`` for a run on ``backend`` (``jax.default_backend()``): 'auto' resolved, others checked."""
    if pool == "auto":
        return "threads" if backend == "cpu" else "processes"
    if pool not in POOLS:
        raise ValueError(f"split.codec_pool={pool!r}: use 'auto', 'threads' or 'processes'.")
    return pool


class MeasurementError(RuntimeError):
    """Measuring a step's bytes failed in the background (the cause is chained)."""


class Pending:
    """The byte counts of one submitted step, available once its measurement has finished."""

    def __init__(self, meter: ByteMeter, step: int, future: cf.Future):
        self.meter, self.step, self._future = meter, int(step), future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Counts:
        """Blocks until this step is measured; raises :class:`MeasurementError` if measuring it failed."""
        t0 = time.perf_counter()
        try:
            return self._future.result()
        except cf.CancelledError as e:
            raise MeasurementError(f"the bytes of step {self.step} were not measured: the meter was closed "
                                   "before the measurement started.") from e
        except Exception as e:
            raise MeasurementError(f"measuring the bytes of step {self.step} failed in the background: "
                                   f"{type(e).__name__}: {e}") from e
        finally:
            self.meter._add("exposed_seconds", time.perf_counter() - t0)


class ByteMeter:
    """Runs byte measurements in background threads, in order, at most ``max_pending`` steps at a time.

    Args:
      threads: worker threads for the codec calls of a step (:meth:`map`); 0 measures synchronously in
        the caller of :meth:`submit`.
      max_pending: steps submitted and not finished before :meth:`submit` blocks (>= 1).
      pool: where the background codec calls of :meth:`encoded_sizes` run: ``'threads'`` (``threads``
        threads of this process) or ``'processes'`` (``threads`` worker processes); not 'auto' (resolve
        it first with :func:`resolve_pool`). Ignored when ``threads=0``.
    """

    def __init__(self, threads: int = 2, max_pending: int = 2, pool: str = "threads"):
        if isinstance(threads, bool) or int(threads) < 0:
            raise ValueError(f"codec threads must be >= 0 (0: measure in the step itself), got {threads!r}.")
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending!r}.")
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: use one of {POOLS} (resolve 'auto' with resolve_pool).")
        self.threads, self.max_pending = int(threads), int(max_pending)
        self.pool = pool if self.threads else "threads"
        self._coders: codec_pool.CoderPool | None = None
        self._lock = threading.Lock()
        self._stats = {"codec_seconds": 0.0, "exposed_seconds": 0.0, "steps": 0}
        self._closed = False
        self._slots = threading.BoundedSemaphore(self.max_pending)
        self._coordinator = self._workers = None
        if self.threads:
            self._coordinator = cf.ThreadPoolExecutor(1, thread_name_prefix="qtl-bytes")
            self._workers = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="qtl-codec")
            if self.pool == "processes":
                self._coders = codec_pool.CoderPool(self.threads)

    @property
    def background(self) -> bool:
        return self.threads > 0

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self._stats[key] += value

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._stats)
        out["hidden_seconds"] = max(out["codec_seconds"] - out["exposed_seconds"], 0.0)
        return out

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, over the worker threads when there are any (results in order)."""
        if self._workers is None:
            return [fn(x) for x in items]
        return list(self._workers.map(fn, items))

    def encoded_sizes(self, jobs: list[CodecJob]) -> list[int]:
        """The coded size of each job (:func:`qtl_jax.codec_pool.encoded_size`), over this meter's workers."""
        if self._coders is not None:
            return self._coders.encoded_sizes(jobs)
        return self.map(codec_pool.encoded_size, jobs)

    def wait_ready(self) -> None:
        """Blocks until the worker processes (if any) have started, e.g. before timing a measured step."""
        if self._coders is not None:
            self._coders.wait_ready()

    def _measure(self, fetch: Callable[[], Any], count: Callable[[Any, ByteMeter], Mapping[str, Any]]) -> Counts:
        host = fetch()
        t0 = time.perf_counter()
        try:
            return dict(count(host, self))
        finally:
            self._add("codec_seconds", time.perf_counter() - t0)

    def submit(self, step: int, fetch: Callable[[], Any],
               count: Callable[[Any, ByteMeter], Mapping[str, Any]]) -> Pending:
        """Measures step ``step``: ``count(fetch(), self)`` in the background (or here when ``threads=0``)."""
        if self._closed:
            raise RuntimeError(f"cannot measure step {step}: the byte meter is closed.")
        self._add("steps", 1)
        if self._coordinator is None:
            future: cf.Future = cf.Future()
            t0 = time.perf_counter()
            try:
                future.set_result(self._measure(fetch, count))
            except Exception as e:
                future.set_exception(e)
            finally:
                self._add("exposed_seconds", time.perf_counter() - t0)
            return Pending(self, step, future)
        t0 = time.perf_counter()
        self._slots.acquire()
        self._add("exposed_seconds", time.perf_counter() - t0)
        try:
            future = self._coordinator.submit(self._measure, fetch, count)
        except RuntimeError:  # closed by another thread meanwhile
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return Pending(self, step, future)

    def close(self) -> None:
        """Cancels what has not started and returns without waiting for the running one; idempotent."""
        self._closed = True
        if self._coordinator is None:
            return
        # No waiting: the running measurement may be blocked on the devices (or on a fetch that will never
        # complete after an error); it finishes or fails on its own, and its result is no longer asked for.
        self._coordinator.shutdown(wait=False, cancel_futures=True)
        self._workers.shutdown(wait=False, cancel_futures=True)
        if self._coders is not None:
            self._coders.close()
