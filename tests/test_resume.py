"""Exact resume: a real train.py subprocess is SIGKILLed after a checkpoint; resuming reproduces the losses.

The uninterrupted run and the killed run start together (two cores); the killed run sleeps after each
step (``debug.step_delay``) so the kill lands midway, after its step-3 checkpoint is committed and
while later steps are being logged. The resumed run continues from that checkpoint in the same workdir.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qtl_jax.data import llava_tfds
from qtl_jax.train.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
# Fields that depend on wall-clock time; everything else must match exactly.
TIMING = {"step_time", "data_time", "examples_per_sec", "tokens_per_sec"}


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    # Compile time dominates these toy runs; every run of a test uses the same setting, so they stay comparable.
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env["PYTHONPATH"] = ROOT
    return env


def _train(workdir, data_dir, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/stage1.py:tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.total_steps=8", "--config.checkpoint_every=3",
           "--config.eval.enabled=False", "--config.mesh.client_devices=1", "--config.mesh.server_devices=1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed(workdir, step):
    d = os.path.join(workdir, "checkpoints", str(step))
    return os.path.isdir(d) and os.path.exists(os.path.join(d, "_CHECKPOINT_METADATA"))


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_sigkill_then_resume_reproduces_losses_exactly(tmp_path):
    data_dir = str(tmp_path / "data")
    # Build the tiny corpus once so both runs open the same dataset (and none races to build it).
    llava_tfds.prepare_shapes_tfds(data_dir, seed=0, n_pretrain=64, n_instruct=64, image_size=32)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    p_full = _train(full, data_dir)
    p_kill = _train(killed, data_dir, "--config.debug.step_delay=1.0")
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            steps = [r["step"] for r in read_jsonl(os.path.join(killed, "metrics.jsonl"))]
            if _committed(killed, 3) and steps and max(steps) >= 5:
                break
            if p_kill.poll() is not None:
                pytest.fail(f"the run to kill ended early:\n{p_kill.stdout.read()[-3000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("the run to kill never reached step 5")
        p_kill.send_signal(signal.SIGKILL)
        p_kill.wait(timeout=30)
        assert p_kill.returncode == -signal.SIGKILL
        out, _ = p_full.communicate(timeout=TIMEOUT)
        assert p_full.returncode == 0, out[-3000:]
    finally:
        for p in (p_full, p_kill):
            if p.poll() is None:
                p.kill()
    logged_before_kill = max(r["step"] for r in read_jsonl(os.path.join(killed, "metrics.jsonl")))
    assert logged_before_kill < 8  # it really was killed midway

    p_resume = _train(killed, data_dir)
    out, _ = p_resume.communicate(timeout=TIMEOUT)
    assert p_resume.returncode == 0, out[-3000:]
    assert "resumed" in out and ("at step 3/8" in out or "at step 6/8" in out), out[-3000:]

    a = read_jsonl(os.path.join(full, "metrics.jsonl"))
    b = read_jsonl(os.path.join(killed, "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exactly, not approximately
    assert _without_timing(a) == _without_timing(b)
    with open(os.path.join(killed, "config.json")) as f:
        assert json.load(f)["total_steps"] == 8
