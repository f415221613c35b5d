"""bench/downlink_study.py: the intervals, the report's table from run directories, the SplitFed command
lines and the merge of the clients' logs, the command line's errors; the tiny study end to end (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import downlink_study as study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wilson_interval_closed_forms():
    # 0 of n: the interval is [0, z^2 / (n + z^2)]; n of n mirrors it.
    z2 = 1.96 ** 2
    lo, hi = study.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), rel=1e-12)
    lo, hi = study.wilson(10, 10)
    assert lo == pytest.approx(10 / (10 + z2), rel=1e-12) and hi == 1.0
    # p = 1/2: centred on 1/2, half-width z * sqrt(1/(4n) + z^2/(4n^2)) / (1 + z^2/n).
    lo, hi = study.wilson(50, 100)
    half = 1.96 * math.sqrt(1 / 400 + z2 / 40000) / (1 + z2 / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-12)
    assert study.wilson(0, 0) == (0.0, 1.0)


@given(st.integers(1, 10_000), st.data())
def test_wilson_interval_holds_the_proportion(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = study.wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1


def _write(workdir, metrics, ev):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in metrics)
    if ev is not None:
        with open(os.path.join(workdir, "eval.jsonl"), "w") as f:
            f.write(json.dumps(ev) + "\n")


def _records(loss, down, down32, rt, rt_paper, n=3):
    return [{"step": s, "loss": loss, "step_time": 0.5, "downlink_bytes": down, "downlink_bytes_fp32": down32,
             "roundtrip_bytes_per_sample": rt, "roundtrip_bytes_per_sample_paper": rt_paper, "batch_samples": 16}
            for s in range(1, n + 1)]


def test_report_compares_each_variant_with_the_fp32_interval(tmp_path):
    out = str(tmp_path)
    ev = lambda em, tok: {"step": 3, "exact_match": em, "token_accuracy": tok, "answers": 1000,  # noqa: E731
                          "target_tokens": 10000, "majority_exact_match": 0.1}
    _write(f"{out}/fp32/stage1", _records(1.0, 800, 800, 300, 100), ev(0.0, 0.7))
    _write(f"{out}/fp32/stage2", _records(0.5, 1600, 1600, 200, 200), ev(0.5, 0.9))
    _write(f"{out}/q2ef/stage1", _records(1.1, 100, 800, 30, 100), ev(0.0, 0.69))
    _write(f"{out}/q2ef/stage2", _records(0.6, 160, 1600, 10, 200), ev(0.3, 0.9))
    result = study.collect(out, ["fp32", "q2ef", "q4"])
    fp32, q2ef = result["fp32"], result["q2ef"]
    assert fp32["stage2"]["exact_match_ci"] == study.wilson(500, 1000)
    assert fp32["stage2"]["token_accuracy_ci"] == study.wilson(9000, 10000)
    assert fp32["exact_match_within_fp32_ci"] and fp32["token_accuracy_within_fp32_ci"]
    # 0.3 of 1000 answers lies far outside [0.469, 0.531]; the same token accuracy lies inside.
    assert not q2ef["exact_match_within_fp32_ci"] and q2ef["token_accuracy_within_fp32_ci"]
    assert q2ef["stage2"]["downlink_vs_fp32"] == pytest.approx(0.1)
    assert q2ef["stage2"]["roundtrip_vs_paper"] == pytest.approx(0.05)
    assert "eval" not in result["q4"]["stage2"]
    table = study.markdown(result)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["quantized 2 bits + EF"].split(" | ")[1:] == [
        f"0.300 [{q2ef['stage2']['exact_match_ci'][0]:.3f}, {q2ef['stage2']['exact_match_ci'][1]:.3f}]",
        f"0.900 [{q2ef['stage2']['token_accuracy_ci'][0]:.3f}, {q2ef['stage2']['token_accuracy_ci'][1]:.3f}]",
        "no / yes", "1.100 / 0.600", "10", "0.1000", "10", "0.0500 |"]
    assert "(not run)" in rows["quantized 4 bits"]
    # Without an fp32 run there is no interval to be inside of.
    alone = study.markdown(study.collect(out, ["q2ef"]))
    assert [line.split(" | ")[3] for line in alone.splitlines() if line.startswith("| quantized")] == ["- / -"]


def test_splitfed_command_lines(tmp_path):
    out = str(tmp_path)
    cmds = study.splitfed_commands(out, 5123, ("a", "b", "c"), 100, 10, python="py")
    assert list(cmds) == ["server", "a", "b", "c"]
    server = cmds["server"]
    assert server[:3] == ["py", "-m", "qtl_jax.split.server"] and "--clients=a,b,c" in server
    shared = [a for a in server if a.startswith("--config") or a.startswith("--address")]
    assert "--config=configs/stage2.py:demo" in shared and "--config.total_steps=100" in shared
    assert "--config.split.fedavg_every=10" in shared and "--address=127.0.0.1:5123" in shared
    assert f"--config.init.from_workdir={out}/fp32/stage1" in shared
    for k, c in enumerate("abc"):
        cmd = cmds[c]
        assert cmd[:3] == ["py", "-m", "qtl_jax.split.client"]
        assert all(a in cmd for a in shared)  # both sides build the same schedule and averaging
        assert f"--client_id={c}" in cmd and f"--config.data.shapes.seed={k}" in cmd
        assert f"--workdir={out}/splitfed/{c}" in cmd
    # Client a trains on the single client's corpus; the others on their own.
    assert f"--config.data.data_dir={out}/data" in cmds["a"]
    assert f"--config.data.data_dir={out}/splitfed/data_b" in cmds["b"]


def test_merged_client_metrics_are_per_step_means_on_the_single_client_axis():
    a = [{"step": 1, "loss": 1.0, "downlink_bytes": 10, "note": "x"}, {"step": 2, "loss": 0.5, "downlink_bytes": 10}]
    b = [{"step": 1, "loss": 3.0, "downlink_bytes": 20}, {"step": 2, "loss": 1.5}]
    merged = study.merge_client_metrics([a, b])
    assert merged == [{"step": 2, "loss": 2.0, "downlink_bytes": 15.0, "clients": 2},
                      {"step": 4, "loss": 1.0, "downlink_bytes": 10.0, "clients": 2}]


@pytest.mark.parametrize("argv, message", [
    (["run", "--variants=splitfed"], "splitfed has its own command"),
    (["run", "--variants=q3"], "unknown variants ['q3']"),
    (["splitfed", "--fedavg_every=0"], "--fedavg_every=0: give a positive number"),
    (["run", "--stages=stage3"], "use stage1 and/or stage2"),
])
def test_bad_arguments_get_one_clear_line(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.downlink_study", *argv, f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_splitfed_needs_the_fp32_stage1_first(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.downlink_study", "splitfed", f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "run it first" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(3000)  # five processes compiling on two shared cores (as test_splitfed's command-line test)
def test_tiny_study_with_splitfed_end_to_end(tmp_path):
    """The study's code path at toy size: fp32 stage 1 in process, then SplitFed stage 2 (a server and three
    client processes, 2 steps each, one round), evaluated from the client's and the server's checkpoints."""
    out = str(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "bench.downlink_study", *a, f"--out={out}",  # noqa: E731
                                     "--preset=tiny"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    proc = run("run", "--variants=fp32", "--stages=stage1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("splitfed", "--fedavg_every=2")
    assert proc.returncode == 0, (proc.stderr[-2000:], open(f"{out}/study.log").read()[-3000:])
    for c in "abc":
        assert "FedAvg round 2: 3 clients (a, b, c)" in open(f"{out}/splitfed/{c}.log").read()
    assert "qtl_jax.split.server: done at step 6" in open(f"{out}/splitfed/server.log").read()
    with open(f"{out}/splitfed/stage2/eval.jsonl") as f:
        ev = json.loads(f.readline())
    assert ev["step"] == 2 and ev["server_step"] == 6 and ev["answers"] > 0 and 0 <= ev["token_accuracy"] <= 1
    with open(f"{out}/splitfed/stage2/metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [3, 6]
    result = study.collect(out, ["fp32", "splitfed"], final="stage2")
    assert result["splitfed"]["stage2"]["eval"]["answers"] == ev["answers"]
