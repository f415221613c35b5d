"""bench.perf end to end on the micro size: the command writes perf.json / perf.md with the binding keys."""

import json
import math
import sys

import pytest

from bench import perf

BINDING_FLOATS = ("ours_step_s", "torch_eager_step_s", "ratio_vs_torch_eager", "gen_tokens_per_s_ours",
                  "gen_tokens_per_s_torch", "gen_tokens_per_s_ours_b1", "gen_tokens_per_s_torch_b1",
                  "fraction_of_matmul_peak", "ours_fused_step_s", "train_step_flops")


def test_perf_command_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"unknown size\(s\) \['huge'\]: choose from"):
        perf.run(["huge"], str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["perf", "--sizes=micro", f"--out={tmp_path}", "--steps=2", "--gen-runs=1",
                                      "--matmul-n=256", "--no-torch-compile"])
    perf.main()
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["matmul_n"] == 256 and report["matmul_peak_flops"] > 0
    assert list(report["sizes"]) == ["micro"]
    r = report["sizes"]["micro"]
    for key in BINDING_FLOATS:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["timed_steps"] == 2 and r["merged_len"] == 12 - 1 + 16
    assert r["ratio_vs_torch_eager"] == pytest.approx(r["ours_step_s"] / r["torch_eager_step_s"])
    assert r["fraction_of_matmul_peak"] == pytest.approx(
        r["train_step_flops"] / r["ours_step_s"] / report["matmul_peak_flops"])
    assert "torch_compile_step_s" not in r and r["torch_compile_error"].startswith("skipped")
    # Same weights, greedy, fp32: both implementations pick the same tokens.
    assert r["gen_token_agreement"] == 1.0 and r["gen_token_agreement_b1"] == 1.0
    md = (tmp_path / "perf.md").read_text()
    assert "| our split train step (s, median) |" in md and "matmul peak" in md
    assert md in capsys.readouterr().out
