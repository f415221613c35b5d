"""bench.perf end to end on the micro size: the command writes perf.json / perf.md with the binding keys."""

import json
import math
import sys

import pytest

from bench import perf

BINDING_FLOATS = ("ours_step_s", "torch_eager_step_s", "ratio_vs_torch_eager", "gen_tokens_per_s_ours",
                  "gen_tokens_per_s_torch", "gen_tokens_per_s_ours_b1", "gen_tokens_per_s_torch_b1",
                  "fraction_of_matmul_peak", "ours_fused_step_s", "train_step_flops",
                  "ours_xla_step_bytes", "quantizer_step_s", "codec_ans_s", "codec_packed_s", "codec_bits_per_index",
                  "entropy_bits_per_index")
SHARES = ("quantizer_share_of_step", "codec_share_of_step", "codec_packed_share_of_step")


# ~85 s of CPU on 2 cores (every bench size compiles): kept out of CI's ten minutes; run with -m slow.
@pytest.mark.slow
def test_perf_command_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"unknown size\(s\) \['huge'\]: choose from"):
        perf.run(["huge"], str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["perf", "--sizes=micro", f"--out={tmp_path}", "--steps=2", "--gen-runs=1",
                                      "--matmul-n=256", "--no-torch-compile", "--no-mem-workers"])
    perf.main()
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["matmul_n"] == 256 and report["matmul_peak_flops"] > 0
    assert list(report["sizes"]) == ["micro"]
    r = report["sizes"]["micro"]
    assert not [k for k in r if k.endswith("_error") and not r[k].startswith("skipped")], r
    for key in BINDING_FLOATS:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    for key in SHARES:
        assert 0 < r[key] < 1, (key, r[key])
    assert r["timed_steps"] == 2 and r["merged_len"] == 12 - 1 + 16
    assert r["ratio_vs_torch_eager"] == pytest.approx(r["ours_step_s"] / r["torch_eager_step_s"])
    assert r["fraction_of_matmul_peak"] == pytest.approx(
        r["train_step_flops"] / r["ours_step_s"] / report["matmul_peak_flops"])
    assert r["quantizer_share_of_step"] == pytest.approx(r["quantizer_step_s"] / r["ours_step_s"])
    assert r["codec_share_of_step"] == pytest.approx(r["codec_ans_s"] / r["ours_step_s"])
    # L=4: the entropy is at most 2 bits; packed needs exactly 2 bits/index plus a header.
    assert 0 < r["entropy_bits_per_index"] <= 2.0 and 2.0 < r["codec_packed_bits_per_index"] < 2.5
    assert r["codec_overhead_vs_entropy"] == pytest.approx(r["codec_bits_per_index"] / r["entropy_bits_per_index"] - 1)
    # XLA's parts add up to its total (the subprocess peaks are test_memory_workers, marked slow).
    assert "ours_peak_mem_bytes" not in r and r["ours_mem_error"].startswith("skipped")
    assert r["ours_xla_step_bytes"] == (r["ours_xla_argument_bytes"] + r["ours_xla_output_bytes"]
                                        + r["ours_xla_temp_bytes"] - r["ours_xla_alias_bytes"])
    assert r["ours_step_s_iqr"] >= 0 and r["torch_eager_step_s_iqr"] >= 0
    # The codec in the step vs in background threads: each phase measured, the overlapped phase's codec time
    # split into what the loop waited for and the rest.
    for key in ("codec_off_step_s", "codec_sync_step_s", "codec_overlap_step_s", "codec_busy_s"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["codec_threads"] == perf.CODEC_THREADS and r["codec_exposed_s"] >= 0
    assert r["codec_hidden_s"] == pytest.approx(max(r["codec_busy_s"] - r["codec_exposed_s"], 0.0))
    assert r["codec_sync_added_share"] == pytest.approx(r["codec_sync_step_s"] / r["codec_off_step_s"] - 1)
    assert r["codec_overlap_added_share"] == pytest.approx(r["codec_overlap_step_s"] / r["codec_off_step_s"] - 1)
    assert "mfu" not in r and "ours_bf16_step_s" not in r  # GPU only
    assert "torch_compile_step_s" not in r and r["torch_compile_error"].startswith("skipped")
    # Same weights, greedy, fp32: both implementations pick the same tokens.
    assert r["gen_token_agreement"] == 1.0 and r["gen_token_agreement_b1"] == 1.0
    md = (tmp_path / "perf.md").read_text()
    assert "| our split train step (s, median) |" in md and "matmul peak" in md
    assert "| both quantizers fwd+bwd / our split step |" in md
    assert md in capsys.readouterr().out


def test_a_failed_measurement_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torch is broken here\nsecond line")

    monkeypatch.setattr(perf, "time_torch", broken)
    # Our step's timing is not what this test is about: a fixed time keeps it fast.
    monkeypatch.setattr(perf, "time_ours", lambda *args, **kwargs: [0.5, 0.5])
    monkeypatch.setattr(perf, "codec_overlap_figures", lambda *args, **kwargs: {"codec_overlap_step_s": 0.5})
    monkeypatch.setattr(sys, "argv", ["perf", "--sizes=micro", f"--out={tmp_path}", "--steps=1", "--matmul-n=64",
                                      "--no-torch-compile", "--no-gen", "--no-mem=micro"])
    perf.main()
    r = json.loads((tmp_path / "perf.json").read_text())["sizes"]["micro"]
    assert r["torch_eager_error"] == "RuntimeError: torch is broken here"
    assert r["ours_step_s"] == 0.5 and r["quantizer_share_of_step"] > 0  # measured after the failure
    assert r["codec_overlap_step_s"] == 0.5
    assert "ratio_vs_torch_eager" not in r and r["gen_error"].startswith("skipped")
    assert "ours_peak_mem_bytes" not in r and "ours_mem_error" not in r
    assert "torch_eager not measured: RuntimeError: torch is broken here" in (tmp_path / "perf.md").read_text()


def test_size_flags():
    assert perf._size_set(None, ["demo", "mid"]) == set()
    assert perf._size_set("all", ["demo", "mid"]) == {"demo", "mid"}
    assert perf._size_set("mid, demo", ["demo"]) == {"mid", "demo"}
    with pytest.raises(ValueError, match="steps must be >= 1"):
        perf.run(["micro"], "/nonexistent", steps=2, steps_per_size={"micro": 0})


@pytest.mark.slow
def test_memory_workers():
    """Each framework's step in a fresh process (~10 s each here): the RSS figures are consistent."""
    for framework in ("ours", "torch"):
        m = perf.measure_memory(framework, "micro")
        assert 0 < m["rss_growth_bytes"] <= m["peak_rss_bytes"] and m["base_rss_bytes"] > 0, (framework, m)
        assert m["device_peak_bytes"] is None  # CPU


def test_paper_stages_attention_and_bf16_mfu(tmp_path, monkeypatch):
    """``--sizes=paper``: only the stages asked for run, the attention and codec worker choices reach each stage, and in bf16 on
    an accelerator MFU is taken against the bf16 matmul peak (the fp32 one stays the fraction's base). The
    models are not run: each stage's measurement is replaced by fixed figures, as is the matmul peak."""
    from bench import paper

    calls = []

    def stage(stage, batch, steps, dtype, out, peak, r, log, guarded, preset="paper_random", attention="auto",
              codec_threads=None, measure_every=None, codec_pool=None, trace=False):
        calls.append((stage, batch, dtype, attention, codec_threads, measure_every, codec_pool, trace))
        r.update(train_step_flops=6e12, ours_step_s=0.02, ours_step_flops_per_s=3e14, torch_eager_step_s=0.03)

    monkeypatch.setattr(paper, "bench_stage", stage)
    monkeypatch.setattr(perf, "on_gpu", lambda: True)
    monkeypatch.setattr(perf, "matmul_peak_best", lambda n: {n: 4e14})
    monkeypatch.setattr(perf, "matmul_peak", lambda n, runs, dtype: 6e14)
    monkeypatch.setattr(sys, "argv", ["perf", "--sizes=paper", f"--out={tmp_path}", "--paper-stages=2",
                                      "--paper-attention=xla", "--paper-batches=64,16", "--paper-dtype=bfloat16",
                                      "--paper-codec-threads=14", "--paper-measure-every=4",
                                      "--paper-codec-pool=processes", "--paper-trace"])
    perf.main()
    assert calls == [(2, 16, "bfloat16", "xla", 14, 4, "processes", True)]
    r = json.loads((tmp_path / "perf.json").read_text())["sizes"]
    assert list(r) == ["paper_stage2"]
    assert r["paper_stage2"]["mfu"] == pytest.approx(6e12 / 0.02 / 6e14)
    assert r["paper_stage2"]["torch_bf16_mfu"] == pytest.approx(6e12 / 0.03 / 6e14)
    assert r["paper_stage2"]["fraction_of_matmul_peak"] == pytest.approx(3e14 / 4e14)
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["perf", "--sizes=paper", f"--out={tmp_path}", "--paper-stages=3"])
        perf.main()


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_codec_overlap_measures_every_nth_step(pool):
    """``measure_every=n`` (split.measure_every): the overlapped phase codes exactly the steps whose index is a
    multiple of n, per-measured-step figures are divided by that count, and a phase too short to reach one
    measured step is an error, not a silent 0 % overhead."""
    step, state, batch = perf.build_ours(perf.SIZES["micro"], "split", codec_threads=0)
    state, _ = step(state, batch)  # compiles; the next step has index 1
    out = perf.codec_overlap_phases(step, state, batch, 6, ("off", "overlap"), threads=1, measure_every=3, pool=pool)
    r = out["figures"]
    assert r["codec_pool"] == pool
    assert r["codec_measure_every"] == 3 and r["codec_measured_steps"] == 2  # off ran steps 1-6; overlap 7-12 codes 9 and 12
    assert r["codec_busy_s"] > 0 and r["codec_hidden_s"] == pytest.approx(max(r["codec_busy_s"] - r["codec_exposed_s"], 0))
    assert len(out["times"]["overlap"]) == 6
    with pytest.raises(RuntimeError, match="measured no bytes"):
        perf.codec_overlap_phases(step, out["state"], batch, 1, ("overlap",), threads=1, measure_every=5)
    with pytest.raises(ValueError, match="measure_every"):
        perf.codec_overlap_phases(step, out["state"], batch, 1, ("overlap",), measure_every=0)
