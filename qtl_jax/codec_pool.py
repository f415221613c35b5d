"""Entropy coding in worker processes, so that coding never holds the training process's interpreter lock.

``constriction`` (the ANS coder under :mod:`qtl_jax.codec`) holds Python's GIL for the whole of each
coder call. Coding a step's messages on background threads therefore overlaps the devices' work but stalls
the thread that dispatches it, and two threads code no faster than one (docs/performance.md, "On an H200").
A :class:`CoderPool` runs :func:`qtl_jax.codec.encode` in ``n`` long-lived worker processes
(``python -m qtl_jax.codec_pool``): the parent only writes each job's indices into a pipe, a system call made
without the GIL, and reads back the message's length. The coding then runs in parallel over the workers and
leaves the parent's interpreter to the training loop.

Only sizes come back: the byte meter needs the length of each message, not the message. The sizes are those
of :func:`encoded_size` on the same job, byte for byte the same coder.

Protocol (one job at a time per worker, over its stdin and stdout): the worker first sends a ready frame;
then for each job the parent sends a frame holding ``{"levels", "method", "dtype", "shape"}`` followed by
the array's raw C-order bytes, and the worker answers a frame ``{"size": n}`` or ``{"error": "..."}``. A
frame is a little-endian uint32 length and that many bytes of JSON. A worker exits when its stdin closes,
so workers never outlive the process that started them.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from qtl_jax import codec

_LEN = struct.Struct("<I")
# A header is a few dozen bytes; anything much longer means the two ends lost their framing.
_MAX_FRAME = 1 << 16


class CodecJob(NamedTuple):
    """One message to size: integer ``indices`` coded with ``levels`` levels by ``method`` ('packed'/'ans')."""

    indices: np.ndarray
    levels: int
    method: str


class CoderError(RuntimeError):
    """A codec worker process failed: it exited, or could not code a job (the worker's message is included)."""


def encoded_size(job: CodecJob) -> int:
    """``len(codec.encode(...))`` of one job, in this process."""
    return len(codec.encode(job.indices, job.levels, method=job.method))


def _write_frame(out: BinaryIO, obj: Any, payload: memoryview | None = None) -> None:
    head = json.dumps(obj).encode()
    _write_all(out, _LEN.pack(len(head)) + head)
    if payload is not None:
        _write_all(out, payload)


def _write_all(out: BinaryIO, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = out.write(view)
        if n is None:  # non-blocking stream with a full pipe: never the case for the pipes made here
            raise CoderError("the codec pipe would block.")
        view = view[n:]


def _read_exact(inp: BinaryIO, n: int, into: memoryview | None = None) -> memoryview | None:
    """``n`` bytes from ``inp`` (into ``into`` when given); None on end of stream before the first byte."""
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = inp.readinto(buf[got:n])
        if not k:
            if got == 0:
                return None
            raise EOFError(f"the stream ended after {got} of {n} bytes.")
        got += k
    return buf


def _read_frame(inp: BinaryIO) -> Any:
    raw = _read_exact(inp, _LEN.size)
    if raw is None:
        return None
    (n,) = _LEN.unpack(raw)
    if n > _MAX_FRAME:
        raise CoderError(f"a codec frame announced {n} bytes (at most {_MAX_FRAME}): the pipe is out of sync.")
    body = _read_exact(inp, n)
    if body is None:
        raise EOFError("the stream ended inside a frame.")
    return json.loads(bytes(body))


class _Worker:
    """One worker process; used by one thread at a time."""

    def __init__(self, python: str, env: dict[str, str]):
        self.proc = subprocess.Popen([python, "-m", "qtl_jax.codec_pool"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, env=env)
        self.ready = False

    def _fail(self, what: str) -> CoderError:
        self.proc.kill()
        code = self.proc.wait()
        return CoderError(f"codec worker process {self.proc.pid} {what} (exit code {code}; its own error, if any, "
                          "is on stderr above).")

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            frame = _read_frame(self.proc.stdout)
        except (OSError, EOFError, ValueError, CoderError) as e:
            raise self._fail(f"did not start: {e}") from e
        if frame != {"ready": True}:
            raise self._fail(f"did not start (it sent {frame!r} instead of its ready frame)")
        self.ready = True

    def size(self, job: CodecJob) -> int:
        self.wait_ready()
        arr = np.asarray(job.indices)
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        header = {"levels": int(job.levels), "method": str(job.method), "dtype": arr.dtype.str,
                  "shape": [int(d) for d in arr.shape]}
        try:
            _write_frame(self.proc.stdin, header, memoryview(arr).cast("B") if arr.size else None)
            answer = _read_frame(self.proc.stdout)
        except (OSError, EOFError, ValueError, CoderError) as e:
            raise self._fail(f"failed while coding a {header['method']} job of shape {tuple(arr.shape)}: {e}") from e
        if answer is None:
            raise self._fail(f"exited while coding a {header['method']} job of shape {tuple(arr.shape)}")
        if "error" in answer:
            raise CoderError(f"codec worker process {self.proc.pid} could not code a {header['method']} job of "
                             f"shape {tuple(arr.shape)}, levels {header['levels']}: {answer['error']}")
        return int(answer["size"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        # Killed first: a thread blocked on this worker's pipes then sees end of stream or a broken pipe
        # instead of a descriptor closed under it.
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class CoderPool:
    """``processes`` codec worker processes that size messages in parallel (see the module docstring).

    The workers start at construction (in the background: :meth:`wait_ready` waits for them); a worker that
    died is replaced by a fresh one on the next call. Not for concurrent callers: one call of
    :meth:`encoded_sizes` at a time (the byte meter's single coordinator thread).

    Args:
      processes: number of worker processes (>= 1).
      python: the interpreter the workers run (default: this one); it must import ``qtl_jax``.
    """

    def __init__(self, processes: int, python: str | None = None):
        if isinstance(processes, bool) or int(processes) < 1:
            raise ValueError(f"a coder pool needs at least 1 process, got {processes!r}.")
        self.processes = int(processes)
        self._python = python or sys.executable
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._env = dict(os.environ)
        self._env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self._env.get("PYTHONPATH", "")) if p)
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [_Worker(self._python, self._env) for _ in range(self.processes)]
        self._threads = cf.ThreadPoolExecutor(self.processes, thread_name_prefix="qtl-coder-io")

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Blocks until every worker has started (imported the codec); raises :class:`CoderError` if one did not."""
        with self._lock:
            self._check_open()
            list(self._threads.map(_Worker.wait_ready, self._workers))

    def _check_open(self) -> None:
        if self._closed:
            raise CoderError("the coder pool is closed.")
        for i, w in enumerate(self._workers):
            if not w.alive():
                w.stop()
                self._workers[i] = _Worker(self._python, self._env)

    def encoded_sizes(self, jobs: Sequence[CodecJob]) -> list[int]:
        """``[encoded_size(job) for job in jobs]``, coded in the worker processes in parallel."""
        jobs = [CodecJob(*job) for job in jobs]
        for job in jobs:
            # Checked here so that a bad job is this caller's clear error, not a worker's.
            arr = np.asarray(job.indices)
            if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"indices must be an integer array, got dtype {arr.dtype}; cast level indices first.")
        with self._lock:
            self._check_open()
            # Longest job first onto the least loaded worker: an ANS symbol costs several packed ones.
            load = [0.0] * self.processes
            queues: list[list[int]] = [[] for _ in range(self.processes)]
            cost = [np.size(j.indices) * (4.0 if j.method == "ans" else 1.0) for j in jobs]
            for i in sorted(range(len(jobs)), key=lambda i: -cost[i]):
                w = min(range(self.processes), key=lambda w: load[w])
                queues[w].append(i)
                load[w] += cost[i]
            sizes: list[int | None] = [None] * len(jobs)

            def run(w: int) -> None:
                for i in queues[w]:
                    sizes[i] = self._workers[w].size(jobs[i])

            futures = [self._threads.submit(run, w) for w in range(self.processes) if queues[w]]
            for f in futures:
                f.result()
        return [int(s) for s in sizes]

    def close(self) -> None:
        """Stops the workers at once (a job in flight fails in its caller); idempotent, never waits on a job."""
        self._closed = True
        for w in self._workers:
            w.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> CoderPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve(inp: BinaryIO, out: BinaryIO) -> int:
    """The worker's loop: answers jobs until its input closes (0) or loses its framing (2)."""
    _write_frame(out, {"ready": True})
    while True:
        try:
            header = _read_frame(inp)
        except (EOFError, CoderError, ValueError) as e:
            print(f"qtl_jax.codec_pool worker: {e}", file=sys.stderr)
            return 2
        if header is None:
            return 0
        try:
            dtype = np.dtype(header["dtype"])
            shape = tuple(int(d) for d in header["shape"])
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            buf = np.empty(n, np.uint8)
        except (KeyError, TypeError, ValueError) as e:
            print(f"qtl_jax.codec_pool worker: bad job header {header!r}: {e}", file=sys.stderr)
            return 2
        try:
            if n and _read_exact(inp, n, memoryview(buf)) is None:
                return 0
        except EOFError as e:
            print(f"qtl_jax.codec_pool worker: {e}", file=sys.stderr)
            return 2
        try:
            size = encoded_size(CodecJob(buf.view(dtype).reshape(shape), header["levels"], header["method"]))
            answer: dict[str, Any] = {"size": size}
        except Exception as e:  # the parent reports it with the job; this worker stays usable
            answer = {"error": f"{type(e).__name__}: {e}"}
        _write_frame(out, answer)


if __name__ == "__main__":
    # The frames own file descriptor 1: anything a library prints goes to stderr instead of into them.
    _frames = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(_serve(sys.stdin.buffer.raw, _frames))
