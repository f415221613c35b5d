"""The codec's worker processes: the same sizes as coding here, errors reported with the job, dead workers
replaced, closing stops them."""

import os
import stat
import threading
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtl_jax import codec
from qtl_jax.codec_pool import CodecJob, CoderError, CoderPool, encoded_size


@pytest.fixture(scope="module")
def pool():
    with CoderPool(2) as p:
        p.wait_ready()
        yield p


def jobs_of(seed: int) -> list[CodecJob]:
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 4, (3, 97, 1280)).astype(np.uint8)  # ~370 KB: several pipe buffers
    wide = rng.integers(0, 300, (40, 33)).astype(np.uint16)
    return [CodecJob(big, 4, "ans"), CodecJob(big, 4, "packed"), CodecJob(wide, 300, "ans"),
            CodecJob(wide, 300, "packed"), CodecJob(np.zeros((0, 8), np.uint8), 2, "ans"),
            CodecJob(np.array(5, np.int64), 6, "packed"), CodecJob(big[0, :5, :7].T, 4, "ans")]  # not C-contiguous


def test_sizes_are_those_of_the_codec_here(pool):
    jobs = jobs_of(0)
    assert pool.encoded_sizes(jobs) == [len(codec.encode(j.indices, j.levels, method=j.method)) for j in jobs]
    assert pool.encoded_sizes([]) == []


def test_one_process_takes_all_the_jobs_in_order():
    jobs = jobs_of(1)
    with CoderPool(1) as one:
        assert one.encoded_sizes(jobs) == [encoded_size(j) for j in jobs]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_property_pool_sizes_equal_serial_sizes(pool, data):
    jobs = []
    for _ in range(data.draw(st.integers(1, 5))):
        levels = data.draw(st.sampled_from([2, 3, 4, 7, 16, 255, 256, 1000]))
        shape = tuple(data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=3)))
        seed = data.draw(st.integers(0, 2**16))
        dtype = np.uint8 if levels <= 256 else np.uint16
        indices = np.random.default_rng(seed).integers(0, levels, shape).astype(dtype)
        jobs.append(CodecJob(indices, levels, data.draw(st.sampled_from(["ans", "packed"]))))
    assert pool.encoded_sizes(jobs) == [encoded_size(j) for j in jobs]


def test_a_job_the_codec_refuses_is_reported_and_the_workers_stay_usable(pool):
    bad = CodecJob(np.full(5, 9, np.uint8), 4, "ans")
    with pytest.raises(CoderError, match=r"could not code a ans job of shape \(5,\), levels 4: ValueError: "
                                         r"indices must lie in \[0, 3\] for levels=4, found \[9, 9\]"):
        pool.encoded_sizes([jobs_of(2)[0], bad])
    jobs = jobs_of(3)
    assert pool.encoded_sizes(jobs) == [encoded_size(j) for j in jobs]


def test_float_indices_are_the_callers_error(pool):
    with pytest.raises(ValueError, match="indices must be an integer array, got dtype float32"):
        pool.encoded_sizes([CodecJob(np.zeros(4, np.float32), 4, "ans")])


def fake_python(tmp_path, first_run: str) -> str:
    """An interpreter whose first start runs ``first_run`` (Python code) and whose later starts are this one."""
    script = tmp_path / "python"
    marker = tmp_path / "started"
    (tmp_path / "first.py").write_text(first_run)
    script.write_text(f"#!/bin/sh\nif [ ! -e '{marker}' ]; then touch '{marker}'; exec '{sys.executable}' "
                      f"'{tmp_path / 'first.py'}'; fi\nexec '{sys.executable}' \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


READY = "import os, struct\nhead = b'{\"ready\": true}'\nos.write(1, struct.pack('<I', len(head)) + head)\n"


def test_a_worker_that_dies_on_a_job_is_reported_and_replaced(tmp_path):
    # Its first worker starts, then exits on reading the job header: the call fails, the next one restarts it.
    python = fake_python(tmp_path, READY + "os.read(0, 4)\nraise SystemExit(3)\n")
    jobs = jobs_of(4)
    with CoderPool(1, python=python) as p:
        with pytest.raises(CoderError, match=r"exit code 3"):
            p.encoded_sizes(jobs)
        assert p.encoded_sizes(jobs) == [encoded_size(j) for j in jobs]


@pytest.mark.parametrize("first_run,why", [
    ("raise SystemExit(7)\n", r"did not start \(it sent None instead of its ready frame\) \(exit code 7"),
    ("import os\nos.write(1, b'\\x05\\x00\\x00\\x00hello')\n", r"did not start: Expecting value"),
    ("import os, struct\nos.write(1, struct.pack('<I', 1 << 30))\nos.read(0, 1)\n", r"out of sync"),
])
def test_a_worker_that_does_not_start_is_reported(tmp_path, first_run, why):
    with CoderPool(1, python=fake_python(tmp_path, first_run)) as p:
        with pytest.raises(CoderError, match=why):
            p.wait_ready()


def test_close_stops_the_workers_and_later_calls_are_refused():
    p = CoderPool(2)
    p.wait_ready()
    pids = p.pids
    p.close()
    p.close()  # idempotent
    for pid in pids:  # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(CoderError, match="the coder pool is closed"):
        p.encoded_sizes(jobs_of(5))


def test_bad_process_counts_are_refused():
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="a coder pool needs at least 1 process"):
            CoderPool(bad)


def test_close_during_a_job_fails_that_call_without_hanging(tmp_path):
    """``close()`` from another thread while a worker holds a job: the call raises, nothing waits forever.
    The fake worker takes the job's header, tells the test through a FIFO, then never answers."""
    fifo = tmp_path / "in_job"
    os.mkfifo(fifo)
    python = fake_python(tmp_path, READY + f"os.read(0, 4)\nopen({str(fifo)!r}, 'w').write('x')\n"
                                            "while os.read(0, 1 << 16):\n    pass\n")
    p = CoderPool(1, python=python)
    p.wait_ready()
    failures = []

    def call():
        try:
            p.encoded_sizes(jobs_of(6)[:1])
        except CoderError as e:
            failures.append(str(e))

    worker = threading.Thread(target=call)
    worker.start()
    with open(fifo) as f:  # blocks until the worker is inside the job
        assert f.read(1) == "x"
    p.close()
    worker.join()
    assert len(failures) == 1 and "exit code -9" in failures[0]
