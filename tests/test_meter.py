"""The background byte meter: same counts as the synchronous path, order, exactly once, errors, shutdown."""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1
from qtl_jax import codec
from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.split import link as linklib
from qtl_jax.split import step as steplib
from qtl_jax.split.downlink import DownlinkSpec
from qtl_jax.split.mesh import split_meshes
from qtl_jax.codec_pool import CodecJob
from qtl_jax.split.meter import ByteMeter, MeasurementError, resolve_pool
from qtl_jax.train import loop
from qtl_jax.train.metrics_log import read_jsonl


def coded_size(n: int, seed: int) -> int:
    """A real codec call, so that the background does real (GIL-releasing or not) work."""
    x = np.random.default_rng(seed).integers(0, 16, (n // 16, 16)).astype(np.uint8)
    return len(codec.encode(x, 16))


def size_jobs(seeds):
    return [CodecJob(np.random.default_rng(s).integers(0, 16, (20_000 // 16, 16)).astype(np.uint8), 16, "ans")
            for s in seeds]


@pytest.mark.parametrize("threads,pool", [(0, "threads"), (3, "threads"), (2, "processes")])
def test_each_step_is_measured_once_in_order_with_its_own_counts(threads, pool):
    meter = ByteMeter(threads, max_pending=1, pool=pool)
    meter.wait_ready()
    fetched, counted = [], []

    def fetch(i):
        fetched.append(i)
        return i

    def count(i, m):
        counted.append(i)
        return {"step": i, "sizes": m.encoded_sizes(size_jobs([i, i + 100, i + 200]))}

    pendings = []
    try:
        for i in range(6):
            pendings.append(meter.submit(i, lambda i=i: fetch(i), count))
            # max_pending=1: a step is submitted only once the one before it is measured.
            assert all(p.done() for p in pendings[:-1])
        results = [p.result() for p in pendings]
    finally:
        meter.close()
    assert fetched == counted == list(range(6))
    assert results == [{"step": i, "sizes": [coded_size(20_000, s) for s in (i, i + 100, i + 200)]} for i in range(6)]
    stats = meter.stats()
    assert stats["steps"] == 6 and stats["codec_seconds"] > 0
    assert stats["hidden_seconds"] == pytest.approx(max(stats["codec_seconds"] - stats["exposed_seconds"], 0.0))
    if threads == 0:  # synchronous: every second of coding was spent in the caller
        assert stats["exposed_seconds"] >= stats["codec_seconds"] and stats["hidden_seconds"] == 0.0


@pytest.mark.parametrize("threads", [0, 2])
def test_an_error_in_the_background_is_raised_with_its_step(threads):
    meter = ByteMeter(threads)

    def count(host, m):
        if host == 3:
            raise ValueError("indices out of range")
        return {"n": host}

    try:
        pendings = [meter.submit(i, lambda i=i: i, count) for i in range(5)]
        with pytest.raises(MeasurementError, match=r"step 3 failed in the background: ValueError: indices out of "
                                                    r"range") as info:
            pendings[3].result()
        assert isinstance(info.value.__cause__, ValueError)
        # The steps around it are not affected.
        assert [pendings[i].result() for i in (0, 1, 2, 4)] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 4}]
    finally:
        meter.close()


def test_close_returns_while_a_measurement_is_stuck_and_cancels_the_queue():
    meter = ByteMeter(2, max_pending=3)
    release = threading.Event()

    def stuck():
        release.wait()
        return 0

    first = meter.submit(0, stuck, lambda host, m: {"n": m.map(lambda x: x, [host])})
    queued = [meter.submit(i, lambda i=i: i, lambda host, m: {"n": host}) for i in (1, 2)]
    meter.close()  # returns although step 0's fetch has not: nothing waits on it
    meter.close()  # idempotent
    for i, p in zip((1, 2), queued):
        with pytest.raises(MeasurementError, match=f"bytes of step {i} were not measured: the meter was closed"):
            p.result()
    with pytest.raises(RuntimeError, match="cannot measure step 7: the byte meter is closed"):
        meter.submit(7, lambda: 0, lambda host, m: {})
    release.set()
    # Step 0 was running: its codec calls can no longer be scheduled, and that is reported, not lost.
    with pytest.raises(MeasurementError, match="step 0 failed in the background"):
        first.result()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="codec threads must be >= 0"):
        ByteMeter(-1)
    with pytest.raises(ValueError, match="max_pending must be >= 1"):
        ByteMeter(1, max_pending=0)
    with pytest.raises(ValueError, match="resolve 'auto' with resolve_pool"):
        ByteMeter(1, pool="auto")
    with pytest.raises(ValueError, match=r"split.codec_pool='gpu': use 'auto', 'threads' or 'processes'"):
        resolve_pool("gpu", "cpu")


def test_auto_pool_is_processes_on_an_accelerator_and_threads_on_cpu():
    assert [resolve_pool("auto", b) for b in ("cpu", "gpu", "tpu")] == ["threads", "processes", "processes"]
    assert [resolve_pool(p, "gpu") for p in ("threads", "processes")] == ["threads", "processes"]


def test_a_bad_codec_pool_fails_before_the_model_is_built(tmp_path):
    c = stage1.get_config("tiny")
    c.split.codec_pool = "gpu"
    with pytest.raises(ValueError, match="split.codec_pool='gpu'"):
        loop.train_and_evaluate(c, str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == []


def test_closing_a_process_meter_stops_its_workers():
    meter = ByteMeter(2, pool="processes")
    meter.wait_ready()
    pending = meter.submit(0, lambda: 0, lambda host, m: {"sizes": m.encoded_sizes(size_jobs([1, 2, 3]))})
    assert pending.result() == {"sizes": [coded_size(20_000, s) for s in (1, 2, 3)]}
    pids = meter._coders.pids
    meter.close()
    for pid in pids:  # killed and reaped by close()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_in_process_link_counts_are_the_same_in_the_background():
    """The in-process server half's counts for a quantized downlink: synchronous == background, per step."""
    meshes = split_meshes(0, 0, devices=jax.devices()[:2])
    rng = np.random.default_rng(0)
    grads = Downlink(rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 5, 4)).astype(np.float32))

    def update(server, uplink):
        return server, grads, {"ce": jnp.float32(1.5)}

    up = Uplink(rng.integers(0, 8, (2, 3, 4)).astype(np.uint8), rng.integers(0, 8, (2, 5, 4)).astype(np.uint8),
                np.array([[1, 1, 1, 1, 0]] * 2, np.uint8), np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.uint8),
                np.array([1, 0], np.uint8), np.zeros((2, 5), np.int32), 8, 8)
    out = {}
    for threads, pool in ((0, "threads"), (2, "threads"), (2, "processes")):
        half = linklib.InProcessServerHalf(meshes, update, measure_every=2, codec_threads=threads, codec_pool=pool,
                                           downlink=DownlinkSpec("quantized", bits=4))
        half.state = steplib.PartitionState({}, {}, {})
        try:
            metrics = [half.exchange(step, up)[1] for step in range(5)]
            if threads:  # measured steps hand back a Pending, the others nothing
                assert [linklib.PENDING_COUNTS in m for m in metrics] == [True, False, True, False, True]
            out[threads, pool] = [{k: v for k, v in linklib.with_counts(m).items() if k != "ce"} for m in metrics]
        finally:
            half.close()
    assert out[0, "threads"] == out[2, "threads"] == out[2, "processes"]
    out[0] = out[0, "threads"]
    assert [bool(m) for m in out[0]] == [True, False, True, False, True]
    assert out[0][0]["uplink_values"] == 1 * 3 * 4 + (3 + 4) * 4


def test_plain_downlink_is_counted_from_its_shape_without_fetching_it(monkeypatch):
    """A float downlink's bytes depend only on its shape and dtype, so the meter is handed shape stand-ins
    (no gradient copy to the host per measured step) and counts exactly what the arrays themselves give."""
    meshes = split_meshes(0, 0, devices=jax.devices()[:1])
    rng = np.random.default_rng(1)
    grads = Downlink(rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 5, 4)).astype(np.float32))
    up = Uplink(rng.integers(0, 8, (2, 3, 4)).astype(np.uint8), rng.integers(0, 8, (2, 5, 4)).astype(np.uint8),
                np.array([[1, 1, 1, 1, 0]] * 2, np.uint8), np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.uint8),
                np.array([1, 1], np.uint8), np.zeros((2, 5), np.int32), 8, 8)
    seen = []
    counts = linklib.step_counts

    def spy(up_host, down_host, *args, **kwargs):
        seen.append(down_host)
        return counts(up_host, down_host, *args, **kwargs)

    monkeypatch.setattr(linklib, "step_counts", spy)
    half = linklib.InProcessServerHalf(meshes, lambda server, uplink: (server, grads, {}), codec_threads=1)
    half.state = steplib.PartitionState({}, {}, {})
    try:
        got = linklib.with_counts(half.exchange(0, up)[1])
    finally:
        half.close()
    assert [type(x) for x in (seen[0].image_grad, seen[0].text_grad)] == [jax.ShapeDtypeStruct] * 2
    assert (seen[0].image_grad.shape, seen[0].image_grad.dtype) == ((2, 3, 4), np.float32)
    assert {k: got[k] for k in ("downlink_bytes", "downlink_bytes_fp32")} == \
        linklib.downlink_counts(grads, up) == {"downlink_bytes": 4 * (2 * 3 * 4 + 7 * 4), "downlink_bytes_fp32": 4 * (2 * 3 * 4 + 7 * 4)}


def byte_records(workdir):
    keys = linklib.BYTE_KEYS + linklib.ROUNDTRIP_KEYS
    return [{k: r[k] for k in ("step", "loss", *keys) if k in r} for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


# Three toy trainings, each compiling its programs: 104 s measured on this loaded machine. The default suite runs
# the background path through tests/test_train.py (the default split.codec_threads; NaN stop and resume).
@pytest.mark.slow
def test_training_logs_the_same_bytes_with_the_codec_in_the_background(tmp_path):
    """metrics.jsonl of a tiny stage 1, measuring every 2nd step: the same lines with 0 and 2 codec threads and
    with 2 codec processes."""
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        runs = {}
        for threads, pool in ((0, "threads"), (2, "threads"), (2, "processes")):
            c = stage1.get_config("tiny")
            c.data.data_dir = str(tmp_path / "data")
            c.mesh.client_devices = c.mesh.server_devices = 1
            c.total_steps, c.checkpoint_every, c.eval.enabled = 5, 3, False
            c.split.measure_every, c.split.codec_threads, c.split.codec_pool = 2, threads, pool
            workdir = str(tmp_path / f"{pool}{threads}")
            loop.train_and_evaluate(c, workdir)
            runs[threads if pool == "threads" else pool] = byte_records(workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    assert [r["step"] for r in runs[0]] == [1, 2, 3, 4, 5]
    # measure_every=2 measures steps 0, 2, 4 (0-based), logged as steps 1, 3, 5.
    assert [("uplink_bytes_ans" in r) for r in runs[0]] == [True, False, True, False, True]
    assert runs[2] == runs[0] == runs["processes"], json.dumps(runs, indent=1)


@pytest.mark.parametrize("method", ["ans", "packed"])
def test_sizes_of_the_sent_messages_are_not_coded_again(method):
    """A network client passes the lengths of what it sent (``sent``): the counts are unchanged, and only the
    other codec method's messages are coded."""
    rng = np.random.default_rng(2)
    up = Uplink(rng.integers(0, 8, (2, 3, 4)).astype(np.uint8), rng.integers(0, 8, (2, 5, 4)).astype(np.uint8),
                np.array([[1, 1, 1, 1, 0]] * 2, np.uint8), np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.uint8),
                np.array([1, 0], np.uint8), np.zeros((2, 5), np.int32), 8, 8)
    sent = {"image": len(codec.encode(up.image_codes[:1], 8, method=method)),
            "text": len(codec.encode(up.text_codes[up.text_positions()], 8, method=method))}
    coded = []

    def sizes(jobs):
        coded.extend(job.method for job in jobs)
        return [len(codec.encode(j.indices, j.levels, method=j.method)) for j in jobs]

    assert linklib.uplink_counts(up, method, sizes, sent=sent) == linklib.uplink_counts(up, method)
    assert coded == [m for m in ("packed", "ans") if m != method] * 2
