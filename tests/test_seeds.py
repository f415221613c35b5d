"""Comparing finished Figure-3 runs across seeds (qtl_jax/experiments/seeds.py): spreads, the knee and the
rule per seed, and τ refitted on one seed checked on another. The runs are figure3.json files written here
with the keys ``qtl_jax.experiments.figure3.run`` writes, so the comparison reads what a real run leaves."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest

from qtl_jax.experiments import report, seeds

BENCHES = ("mme", "pope")


def _score(value, half=5.0):
    return {"value": value, "ci95": [value - half, value + half], "n": 500, "metric": "m"}


def _run(seed, values, knee_gaps, blind=(30.0, 40.0)):
    """A finished run: models fp16, L2, L4 with ``values[name]`` = (mme, pope); text gaps ``knee_gaps``."""
    rows = [{"name": name, "levels": levels, "bits": 16 if levels == 0 else math.log2(levels),
             "scores": {b: _score(v) for b, v in zip(BENCHES, values[name])}}
            for name, levels in (("fp16", 0), ("L2", 2), ("L4", 4))]
    blind_scores = {b: _score(v) for b, v in zip(BENCHES, blind)}
    for r in rows:
        r["beats_blind"] = {b: report.beats_blind(r["scores"][b], blind_scores[b]) for b in BENCHES}
    gaps = {str(k): v for k, v in knee_gaps.items()}
    details = {"tolerance_bits": 0.1, "text": {"gap_mean": gaps},
               "image": {"gap_mean": {"2": 1.0, "4": 0.5, "8": 1.0}}}
    cands = sorted(knee_gaps)
    return {"preset": "builtin", "rows": rows, "blind": blind_scores, "knee_levels": report.knee_levels(rows),
            "entropy_rule": {"image": 8, "text": report.rule_choice(cands, [knee_gaps[c] for c in cands], 0.1)},
            "entropy_rule_details": details,
            "config": {"seed": seed, "levels": [2, 4], "stage1": {"seed": 0, "total_steps": 200}}}


VALUES0 = {"fp16": (80.0, 85.0), "L2": (60.0, 70.0), "L4": (78.0, 84.0)}
VALUES1 = {"fp16": (82.0, 86.0), "L2": (78.0, 82.0), "L4": (66.0, 83.0)}
# Seed 0: suffix maxima 1.0, 0.5, 0.2, 0.1: τ in [0.2, 0.5) picks its knee L=4; refitted τ = sqrt(0.1).
GAPS0 = {2: 1.0, 3: 0.5, 4: 0.2, 8: 0.1}


def _write(tmp_path, name, run):
    d = tmp_path / name
    d.mkdir()
    (d / "figure3.json").write_text(json.dumps(run))
    return str(d)


def test_scores_spread_knee_and_rule_per_seed():
    r0 = _run(0, VALUES0, GAPS0)
    r1 = _run(1, VALUES1, {2: 0.9, 3: 0.35, 4: 0.25, 8: 0.05})
    assert (r0["knee_levels"], r1["knee_levels"]) == (4, 2)  # seed 1: L2 is within the baseline, L4 is not
    out = seeds.compare([r0, r1], ["/w0", "/w1"])
    assert out["seeds"] == [0, 1]
    mme_l2 = out["models"]["L2"]["scores"]["mme"]
    assert mme_l2["values"] == [60.0, 78.0] and mme_l2["mean"] == 69.0 and mme_l2["spread"] == 18.0
    assert mme_l2["intervals_overlap"] is False  # [55, 65] and [73, 83]
    assert out["models"]["fp16"]["scores"]["pope"]["intervals_overlap"] is True
    assert out["models"]["blind"]["scores"]["mme"]["spread"] == 0.0
    assert out["models"]["L4"]["beats_blind"] == [{"mme": True, "pope": True}, {"mme": True, "pope": True}]
    assert out["knee_agrees"] is False
    s0, s1 = out["per_seed"]
    assert s0["knee_levels"] == 4 and s0["tolerance_for_knee"]["text"] == [0.2, 0.5]
    assert s1["tolerance_for_knee"]["text"] == [0.9, None]  # seed 1's knee L=2 is the smallest candidate
    # Image: the gap at L=8 equals the one at L=2, so any τ that admits L=4 admits L=2 too (as gap(3) < gap(4)
    # did in the committed run).
    assert s0["tolerance_for_knee"]["image"] is None and s1["tolerance_for_knee"]["image"] == [1.0, None]
    by = {(t["fit_seed"], t["modality"]): t for t in out["transfer"]}
    t = by[(0, "text")]
    assert t["tolerance"] == pytest.approx(math.sqrt(0.2 * 0.5))
    # On seed 1's gaps τ=0.316 is first met at L=4 (0.35 at L=3 is above it); seed 1's knee is L=2: missed.
    assert (t["choice"], t["check_knee"], t["picks_check_knee"]) == (4, 2, False)
    assert by[(1, "text")]["choice"] == 2 and by[(1, "text")]["picks_check_knee"] is False  # τ=1.8 on seed 0
    assert "picks" not in by[(0, "image")] and by[(0, "image")]["result"].startswith("no τ picks")


def test_a_tau_that_transfers_is_reported_as_met():
    r0 = _run(0, VALUES0, GAPS0)
    r1 = _run(1, VALUES0, {2: 0.9, 3: 0.35, 4: 0.25, 8: 0.05})
    t = next(t for t in seeds.compare([r0, r1], ["/a", "/b"])["transfer"]
             if t["fit_seed"] == 0 and t["modality"] == "text")
    assert (t["choice"], t["check_knee"], t["picks_check_knee"]) == (4, 4, True)


def test_image_window_is_found_when_the_gaps_allow_it():
    r0 = _run(0, VALUES0, GAPS0)
    r0["entropy_rule_details"]["image"]["gap_mean"] = {"2": 2.0, "4": 0.5, "8": 0.4}
    out = seeds.compare([r0, _run(1, VALUES0, GAPS0)], ["/a", "/b"])
    assert out["per_seed"][0]["tolerance_for_knee"]["image"] == [0.5, 2.0]


def test_runs_that_differ_in_more_than_the_seed_are_refused():
    r0, r1 = _run(0, VALUES0, GAPS0), _run(1, VALUES0, GAPS0)
    r1["config"]["stage1"]["total_steps"] = 100
    with pytest.raises(seeds.SeedsError, match=r"differ in more than the seed \(stage1.total_steps\)"):
        seeds.compare([r0, r1], ["/a", "/b"])
    # A setting one run's config does not have (made before it existed) is listed, not refused.
    r1["config"]["stage1"]["total_steps"] = 200
    r1["config"]["corpus"] = {"probe_formats": ""}
    assert seeds.compare([r0, r1], ["/a", "/b"])["settings_not_in_every_run"] == ["corpus.probe_formats"]
    with pytest.raises(seeds.SeedsError, match="seeds \\[0, 0\\] repeat"):
        seeds.compare([r0, copy.deepcopy(r0)], ["/a", "/b"])
    with pytest.raises(seeds.SeedsError, match="at least two"):
        seeds.compare([r0], ["/a"])
    r2 = _run(1, VALUES0, GAPS0)
    r2["rows"] = r2["rows"][:2]
    with pytest.raises(seeds.SeedsError, match="different models"):
        seeds.compare([r0, r2], ["/a", "/b"])


def test_files_and_markdown(tmp_path):
    w0 = _write(tmp_path, "s0", _run(0, VALUES0, GAPS0))
    w1 = _write(tmp_path, "s1", _run(1, VALUES1, {2: 0.9, 3: 0.35, 4: 0.25, 8: 0.05}))
    result = seeds.compare([seeds.load_run(w0), seeds.load_run(w1)], [w0, w1])
    paths = seeds.write(result, str(tmp_path / "out"))
    assert json.loads(open(paths["json"]).read())["seeds"] == [0, 1]
    md = open(paths["md"]).read()
    assert "| L2 | 60.0 [55.0, 65.0] / 78.0 [73.0, 83.0]; **18.0** |" in md
    assert "| 0 | 4 | 8, 8 | –; [0.200, 0.500) |" in md
    assert "Knee the same at every seed: no." in md
    assert "text, fit on seed 0, checked on seed 1: picks L=4 (τ = 0.316 bit; the checking seed's knee is L=2: missed)" in md


def test_cli_writes_the_files_and_bad_workdirs_are_one_line(tmp_path):
    w0 = _write(tmp_path, "s0", _run(0, VALUES0, GAPS0))
    w1 = _write(tmp_path, "s1", _run(1, VALUES1, GAPS0))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = subprocess.run([sys.executable, "-m", "qtl_jax.experiments.seeds", f"--workdirs={w0},{w1}",
                         f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0, ok.stderr
    assert os.path.isfile(tmp_path / "out" / "seeds.md")
    missing = tmp_path / "nothing"
    missing.mkdir()
    bad = subprocess.run([sys.executable, "-m", "qtl_jax.experiments.seeds", f"--workdirs={w0},{missing}",
                          f"--out={tmp_path / 'out2'}"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "has no figure3.json" in bad.stderr
    (missing / "figure3.json").write_text("{not json")
    bad = subprocess.run([sys.executable, "-m", "qtl_jax.experiments.seeds", f"--workdirs={w0},{missing}",
                          f"--out={tmp_path / 'out2'}"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "is not valid JSON" in bad.stderr
    assert not os.path.exists(tmp_path / "out2")
