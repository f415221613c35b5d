"""Multi-host training through jax.distributed: 2 local CPU processes (gloo) run real split train steps.

Each process has 2 CPU devices; both partitions' meshes span all 4 devices of the 2 processes, so each
partition's batch is spread over both processes. Each process loads half of every global batch. The
per-step losses must agree with a single process that holds all 4 devices and loads the whole batch.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from qtl_jax.data import llava_tfds
from qtl_jax.train.metrics_log import read_jsonl
from tolerances import rounding_tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, data_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/stage1.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.total_steps={STEPS}", "--config.checkpoint_every=2",
            # Adam divides a gradient by its own size plus eps: with the default 1e-8, a rounding-level
            # difference in a ~0 gradient entry (the processes sum in another order) becomes a full-size
            # update. eps=1e-3 keeps that amplification below 1, so later steps stay comparable too.
            "--config.optimizer.eps=1e-3", "--config.eval.enabled=False", *extra]


def _env(devices: int):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # Compile time dominates these toy runs; every run of a test uses the same setting, so they stay comparable.
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env["PYTHONPATH"] = ROOT
    return env


# ~80 s of CPU (two JAX processes compile the same step): kept out of CI's ten minutes; run with -m slow.
@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    data_dir = str(tmp_path / "data")
    llava_tfds.prepare_shapes_tfds(data_dir, seed=0, n_pretrain=64, n_instruct=64, image_size=32)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(multi, data_dir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}"),
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    ref = subprocess.Popen(_cmd(single, data_dir), cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    outs = []
    try:
        for p in procs + [ref]:
            out, _ = p.communicate(timeout=TIMEOUT)
            outs.append(out)
    finally:
        for p in procs + [ref]:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs + [ref], outs):
        assert p.returncode == 0, out[-4000:]
    assert "4 devices (2 processes)" in outs[0] and "4 devices (1 processes)" in outs[2]

    a = read_jsonl(os.path.join(single, "metrics.jsonl"))
    b = read_jsonl(os.path.join(multi, "metrics.jsonl"))  # written by process 0 only
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "dist_image", "dist_text"):
            # Float32 rounding (tests/tolerances.py): weight gradients sum the batch's 8 x 96 positions;
            # each step chains the forward and backward of the 1-layer tower and decoder (~12 reductions).
            tol = rounding_tolerance(np.float32, 8 * 96, 12 * ra["step"], max(abs(ra[k]), 1.0))
            assert rb[k] == pytest.approx(ra[k], rel=0, abs=tol), (ra["step"], k)
        assert rb["tokens"] == ra["tokens"] and rb["examples"] == ra["examples"] == 8
    # Both processes wrote their shards of the same checkpoints.
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "3"]
