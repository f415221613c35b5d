"""The Figure-3 experiment: bootstrap intervals of the five scorers, the knee, the rule-vs-knee window,
the report files and (slow) the whole experiment at test size with its resume.

Bootstrap tests score the built-in shapes benchmark files (official layouts, qtl_jax/data/shapes/benchmarks.py)
with scripted answers drawn per question from a seeded generator, so every scorer sees a mix of right and
wrong answers and the recomputed headline must equal the scorer's.
"""

import copy
import dataclasses
import json
import math
import os
import types
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import common
from configs import eval as eval_config
from configs import figure3 as figure3_config
from qtl_jax.data.shapes import ShapesConfig
from qtl_jax.data.shapes import benchmarks as benchmark_files
from qtl_jax.data.shapes import samples as shapes_samples
from qtl_jax.data.shapes.text import OPTION_PROMPT
from qtl_jax.eval import bootstrap, harness
from qtl_jax.eval.answers import answers_path, read_answers
from qtl_jax.eval.benchmarks import BENCHMARKS, benchmark_specs, subsample
from qtl_jax.experiments import figure3, inputs, report

STUB = types.SimpleNamespace(source="scripted", levels=lambda: None)
# Answers a scripted model picks from, per benchmark: some right, some wrong, some unparseable.
CHOICES = {"mme": ("Yes", "No", "maybe"), "pope": ("Yes", "No"), "scienceqa": ("A", "B", "C", "D"),
           "vqav2": ("red", "2", "circle", "yes", "top left"), "textvqa": ("blue", "1", "square", "no")}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(config, {benchmark: (spec, examples, rows, metrics)}) for seeded random answers on every benchmark."""
    root = str(tmp_path_factory.mktemp("benchmarks"))
    benchmark_files.write_benchmarks(root, seed=0, cfg=ShapesConfig(image_size=32), n_mme=6, n_pope=6,
                                     n_scienceqa=40, n_vqa=20)
    config = eval_config.get_config("tiny")
    config.benchmark_dir = root
    config.shapes_benchmarks.enabled = False
    work = str(tmp_path_factory.mktemp("answers"))
    out = {}
    for name, spec in benchmark_specs(config).items():
        def answer(batch, name=name):
            return [CHOICES[name][zlib.crc32(ex.key.encode()) % len(CHOICES[name])] for ex in batch]

        metrics = harness.run_benchmarks(STUB, config, work, answerer=answer, specs={name: spec})
        bench = BENCHMARKS[spec["kind"]]
        examples = subsample(bench.load(spec), int(config.max_examples), bench.group)
        rows = read_answers(answers_path(os.path.join(work, "answers"), name), bench.by_prompt)
        out[name] = (spec, examples, rows, metrics[name])
    return config, out


@pytest.mark.parametrize("name", ["mme", "pope", "scienceqa", "vqav2", "textvqa"])
def test_outcomes_reproduce_the_scorer_and_the_interval_holds_it(scored, name):
    _, table = scored
    spec, examples, rows, metrics = table[name]
    out = bootstrap.outcomes(spec, examples, rows, scored=metrics)  # raises if the headline differs
    assert out.value() == pytest.approx(metrics[out.headline], rel=1e-12, abs=1e-12)
    assert 0 < metrics[out.headline] < (1200 if name == "mme" else 100)  # a mix of right and wrong answers
    low, high = bootstrap.bootstrap_interval(out, samples=400, seed=3)
    assert low <= out.value() <= high and low < high
    assert (low, high) == bootstrap.bootstrap_interval(out, samples=400, seed=3)  # seeded
    for metric in out.secondary:  # POPE accuracy: the scorer's figure, with its own interval
        assert out.value(metric) == pytest.approx(metrics[metric], rel=1e-12, abs=1e-12)
        m_low, m_high = bootstrap.bootstrap_interval(out, samples=400, seed=3, metric=metric)
        assert m_low <= out.value(metric) <= m_high and m_low < m_high
    assert list(out.secondary) == (["accuracy"] if name == "pope" else [])
    expected_n = {"mme": 2 * 4 * 6, "pope": 3 * 6 * 6}.get(name)
    if expected_n:
        assert out.questions == expected_n


def test_outcomes_refuse_a_disagreeing_score(scored):
    _, table = scored
    spec, examples, rows, metrics = table["pope"]
    with pytest.raises(ValueError, match="must score the same answers"):
        bootstrap.outcomes(spec, examples, rows, scored={**metrics, "f1": metrics["f1"] + 1.0})
    with pytest.raises(ValueError, match="accuracy=.* but the scorer gave"):
        bootstrap.outcomes(spec, examples, rows, scored={**metrics, "accuracy": metrics["accuracy"] + 1.0})
    with pytest.raises(ValueError, match="no metric 'recall'; it has f1, accuracy"):
        bootstrap.outcomes(spec, examples, rows).value("recall")
    with pytest.raises(ValueError, match="no bootstrap for benchmark kind"):
        bootstrap.outcomes({**spec, "kind": "gqa"}, examples, rows)


def test_bootstrap_interval_of_a_mean_has_the_binomial_width():
    # 1000 units, 40 % right: the 95 % interval half-width is 1.96 * sqrt(p (1 - p) / n) = 3.04 points. The
    # percentile interval of 4000 replicates estimates each end with a standard error of about
    # sqrt(0.025 * 0.975 / 4000) / density ~ 0.13 points; 4 of those bound the check.
    right = np.zeros((1000, 1))
    right[:400] = 1.0
    out = bootstrap.Outcomes("scienceqa", "img_accuracy", {"": right},
                             lambda c: 100.0 * np.mean(c[""][..., 0], axis=-1), 1000)
    low, high = bootstrap.bootstrap_interval(out, samples=4000, seed=0)
    half = 100 * 1.96 * math.sqrt(0.4 * 0.6 / 1000)
    se_end = 100 * math.sqrt(0.025 * 0.975 / 4000) / (math.exp(-1.96 ** 2 / 2) / math.sqrt(2 * math.pi)
                                                     / math.sqrt(0.4 * 0.6 / 1000))
    assert abs((40.0 - low) - half) < 4 * se_end and abs((high - 40.0) - half) < 4 * se_end
    constant = bootstrap.Outcomes("scienceqa", "img_accuracy", {"": np.ones((50, 1))},
                                  lambda c: 100.0 * np.mean(c[""][..., 0], axis=-1), 50)
    assert bootstrap.bootstrap_interval(constant, samples=100) == (100.0, 100.0)
    with pytest.raises(ValueError, match="0 < level < 1"):
        bootstrap.bootstrap_interval(out, level=1.0)


def _row(levels, **values):
    return {"levels": levels, "scores": {b: {"value": v, "ci95": [v - 2.0, v + 2.0], "n": 500}
                                         for b, v in values.items()}}


def test_knee_is_the_smallest_l_within_the_baseline_interval_everywhere():
    base = _row(0, pope=80.0, mme=900.0)
    rows = [base, _row(2, pope=70.0, mme=950.0), _row(4, pope=78.5, mme=898.0), _row(8, pope=90.0, mme=899.0)]
    assert report.knee_levels(rows) == 4  # L=2 misses POPE; 78.5 >= 78 and 898 >= 898
    assert report.knee_levels([base, _row(2, pope=77.9, mme=900.0)]) is None
    assert report.knee_levels(rows[1:]) is None  # no baseline
    assert report.beats_blind(base["scores"]["pope"], {"ci95": [70.0, 77.9]}) is True
    assert report.beats_blind(base["scores"]["pope"], {"ci95": [70.0, 78.0]}) is False
    assert report.beats_blind(base["scores"]["pope"], None) is None
    # POPE: F1 above an always-yes blind control's is not enough; accuracy must be above too.
    yes_bias = {"value": 70.0, "ci95": [68.0, 72.0], "accuracy": {"value": 52.0, "ci95": [49.0, 55.0]}}
    always_yes = {"value": 66.7, "ci95": [63.0, 67.0], "accuracy": {"value": 50.0, "ci95": [50.0, 50.0]}}
    assert report.beats_blind(yes_bias, always_yes) is False
    assert report.beats_blind(dict(yes_bias, accuracy={"value": 60.0, "ci95": [56.0, 64.0]}), always_yes) is True
    assert report.beats_blind(yes_bias, {"value": 66.7, "ci95": [63.0, 67.0]}) is True  # nothing to compare on


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=2, max_size=6), st.data())
def test_tolerance_window_is_where_the_rule_picks_the_target(gaps, data):
    candidates = [2 ** (i + 1) for i in range(len(gaps))]
    target = data.draw(st.sampled_from(candidates))
    window = report.tolerance_window(candidates, gaps, target)
    taus = [t for t in {0.01, 0.05, 0.1, 0.3, 1.0, 1.5, 3.0} | {abs(g) for g in gaps} if t > 0]
    for tau in taus:
        inside = window is not None and window[0] <= tau < window[1]
        assert (report.rule_choice(candidates, gaps, tau) == target) == inside or (
            # The rule returns the largest candidate also when nothing fits (tau below its gap).
            target == candidates[-1] and tau < abs(gaps[-1]))
    assert report.tolerance_window(candidates, gaps, 3) is None


def test_report_files_from_a_result(tmp_path):
    rows = []
    for levels in (0, 2, 4):
        r = _row(levels, pope=80.0 + levels, mme=900.0)
        r.update(bits=16 if levels == 0 else math.log2(levels), trained_levels=levels, name=f"L{levels}",
                 uplink_bytes_per_sample={"fp16": 2000.0, "packed": 250.0 * max(levels, 1), "ans": 200.0})
        if levels == 2:  # a run whose link logged the round trip (the others did not)
            r["uplink_bytes_per_sample"]["roundtrip_bytes_per_sample"] = 6200.0
        rows.append(r)
    result = {"preset": "test", "rows": rows, "blind": _row(0, pope=60.0, mme=500.0)["scores"],
              "entropy_rule": {"image": 4, "text": 8}, "entropy_rule_details": {"tolerance_bits": 0.1},
              "knee_levels": report.knee_levels(rows), "notes": ["a note"], "timing": {}}
    paths = report.write(result, None, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths.values()) == ["figure3.json", "figure3.md", "figure3.png"]
    assert json.load(open(paths["json"]))["knee_levels"] == 2
    md = open(paths["md"]).read()
    assert "| L=2 | 1 | " in md and "image-blind control" in md and "L = 2 (1 bits)" in md
    assert "| 2000 / 500 / 200 | 6200 | – |" in md and "| 2000 / 1000 / 200 | – | – |" in md
    rows[1]["scores"]["pope"]["accuracy"] = {"value": 75.0, "ci95": [71.0, 79.0]}
    rows[1]["beats_blind"] = {"pope": True, "mme": False}
    md = report.markdown(result)
    assert "| model | bits | pope (accuracy) | mme () |" not in md  # the accuracy column follows POPE's F1
    assert "pope () | pope (accuracy) | mme ()" in md and "| 82.0 [80.0, 84.0] | 75.0 [71.0, 79.0] |" in md
    assert "L2: pope; L4: none" in md and "pretraining" not in md and "Wall time" not in md
    result.update(pretrained={"stage1": {"step": 500}, "stage2_probes": {"step": 800}},
                  timing={"data": {"wall_s": 60.0, "cpu_s": 90.0}, "L2/stage1": {"wall_s": 120.0, "cpu_s": 200.0}})
    md = report.markdown(result)
    assert "one shared 16-bit pretraining, every part trained (stage1: 500 steps, stage2_probes: 800 steps)" in md
    assert "Wall time of every phase together: 3.0 min." in md and "| L2/stage1 | 120 | 200 | nan |" in md
    # Without a 16-bit baseline (the demo preset) there is no knee to find, and the report says why.
    result.update(rows=rows[1:], knee_levels=report.knee_levels(rows[1:]))
    assert result["knee_levels"] is None and "none: this run has no 16-bit baseline" in report.markdown(result)


def test_models_plan_and_clear_errors(tmp_path):
    c = figure3_config.get_config("builtin")
    assert [m.name for m in figure3.models(c)] == ["fp16", "blind", "L2", "L4", "L8", "L16", "L32"]
    assert [m.bits for m in figure3.models(c)][2:] == [1, 2, 3, 4, 5]
    c.levels = (4, 4)
    with pytest.raises(ValueError, match="distinct numbers of levels"):
        figure3.models(c)
    paper = figure3_config.get_config("paper")
    paper.blind = True
    with pytest.raises(ValueError, match="blind=True needs the built-in corpus"):
        figure3.models(paper)
    with pytest.raises(FileNotFoundError, match=r"paths.vision_dir is not set; pass --config.paths.vision_dir"):
        inputs.check_paths(figure3_config.get_config("paper").paths.to_dict())
    with pytest.raises(ValueError, match="unknown figure3 preset 'huge'"):
        figure3_config.get_config("huge")


def test_runs_chain_from_the_shared_pretraining_and_take_their_data():
    """curriculum: the 16-bit pretraining (500 caption steps at 3e-3, every part trained, then 800 yes/no probe
    steps, then 400 ScienceQA-problem steps), then per model stage 1 (200 steps, tower and LLM frozen, fresh
    quantizers) and stage 2 (tower frozen: 400 probe-only steps, then 400 steps of the mix), each run from the
    one before (builtin is the same chain without the probe-only steps: the next test)."""
    c = figure3_config.get_config("curriculum")
    given = inputs.Inputs("/d/s1", "/d/s2", "/d/tok", "/d/bench", probe_data="/d/probes",
                          pretrain_probe2_data="/d/pre_probes2")
    pre, m = figure3.PRETRAINED, figure3.Model("L4", 4)
    assert figure3.stages(c, pre) == ["stage1", "stage2_probes", "stage2_probes2"]
    assert figure3.stages(c, m) == figure3.stages(c, figure3.Model("fp16", 0)) == \
        ["stage1", "stage2_probes", "stage2"]
    p1, p2, p3 = (figure3.stage_config(c, pre, s, given, "/w") for s in figure3.stages(c, pre))
    assert (p1.data.dataset_dir, p1.total_steps, p1.optimizer.lr, p1.init.from_workdir) == ("/d/s1", 500, 3e-3, None)
    assert (p2.data.dataset_dir, p2.total_steps, p2.optimizer.lr, p2.init.from_workdir) == \
        ("/d/probes", 800, 5e-4, "/w/pretrained/stage1")
    assert (p3.data.dataset_dir, p3.total_steps, p3.optimizer.lr, p3.init.from_workdir) == \
        ("/d/pre_probes2", 400, 5e-4, "/w/pretrained/stage2_probes")
    assert p1.optimizer.param_groups == p2.optimizer.param_groups == p3.optimizer.param_groups == ((".*", 1.0),)
    assert p1.quantizer.bound == p2.quantizer.bound == p3.quantizer.bound == "none"
    with pytest.raises(ValueError, match="quantizer_init='identity' needs the pretraining's feature moments"):
        figure3.stage_config(c, m, "stage1", given, "/w")
    moments = {"image": (0.25, 1.5), "text": (-0.01, 0.125)}
    s1, sp, s2 = (figure3.stage_config(c, m, s, given, "/w", moments) for s in figure3.stages(c, m))
    # The fresh quantizers start as the identity calibrated to the pretraining's moments; later runs load them.
    assert (s1.quantizer.init, s1.quantizer.init_image_mean, s1.quantizer.init_image_std,
            s1.quantizer.init_text_mean, s1.quantizer.init_text_std) == ("identity", 0.25, 1.5, -0.01, 0.125)
    assert sp.quantizer.init == s2.quantizer.init == "normal"
    assert [figure3.needs_moments(c, m, s) for s in figure3.stages(c, m)] == [True, False, False]
    assert not figure3.needs_moments(c, figure3.Model("fp16", 0), "stage1")
    assert not figure3.needs_moments(c, pre, "stage1")
    assert (s1.data.dataset_dir, s1.total_steps, s1.optimizer.lr) == ("/d/s1", 200, 1e-3)
    assert (s1.init.from_workdir, tuple(s1.init.dont_load)) == ("/w/pretrained/stage2_probes2", (".*_quantizer/.*",))
    assert (sp.data.dataset_dir, sp.total_steps, sp.optimizer.lr, sp.init.from_workdir) == \
        ("/d/probes", 400, 5e-4, "/w/L4/stage1")
    assert (s2.data.dataset_dir, s2.total_steps, s2.init.from_workdir) == ("/d/s2", 400, "/w/L4/stage2_probes")
    assert tuple(sp.init.dont_load) == tuple(s2.init.dont_load) == ()
    assert s1.quantizer.levels == sp.quantizer.levels == s2.quantizer.levels == 4
    assert s1.optimizer.param_groups == common.STAGE1_GROUPS
    assert sp.optimizer.param_groups == s2.optimizer.param_groups == common.STAGE2_GROUPS
    fp16 = figure3.stage_config(c, figure3.Model("fp16", 0), "stage1", given, "/w")
    assert fp16.init.from_workdir == "/w/pretrained/stage2_probes2" and tuple(fp16.init.dont_load) == ()
    assert figure3.probe_corpus(c) == {"n_instruct": 8000, "probe_fraction": 1.0, "probe_turns": 4,
                                       "probe_formats": "pope,existence"}
    assert figure3.pretrain_probe_corpus(c) is None  # its first phase asks the same: one probe corpus
    assert figure3.pretrain_probe2_corpus(c) == dict(figure3.probe_corpus(c), probe_formats="scienceqa")
    # A pretraining that asks other questions has a corpus of its own; every other model keeps the phase's.
    other = copy.deepcopy(c)
    other.probe_phase.probe_formats = "pope,pope_hard,existence,scienceqa"
    other.pretrain.probe_formats = "pope,existence"
    assert figure3.pretrain_probe_corpus(other) == dict(figure3.probe_corpus(other), probe_formats="pope,existence")
    both = dataclasses.replace(given, pretrain_probe_data="/d/pre_probes")
    assert figure3.stage_config(other, pre, "stage2_probes", both, "/w").data.dataset_dir == "/d/pre_probes"
    assert figure3.stage_config(other, m, "stage2_probes", both, "/w").data.dataset_dir == "/d/probes"
    # Without the second probe phase every model starts from the first.
    c.pretrain.probe2_steps = 0
    assert figure3.stages(c, pre) == ["stage1", "stage2_probes"] and figure3.pretrain_probe2_corpus(c) is None
    assert figure3.stage_config(c, m, "stage1", given, "/w", moments).init.from_workdir == "/w/pretrained/stage2_probes"
    c.pretrain.probe2_steps, c.pretrain.probe2_formats = 300, ""
    with pytest.raises(ValueError, match=r"probe2_steps > 0 needs pretrain.probe2_formats"):
        figure3.models(c)
    c.pretrain.probe2_steps = 0
    c.pretrain.probe_steps = 0  # a pretraining without its probe phase
    assert figure3.stages(c, pre) == ["stage1"]
    assert figure3.stage_config(c, m, "stage1", given, "/w", moments).init.from_workdir == "/w/pretrained/stage1"
    c.pretrain.quantizer_init = "normal"  # the paper's N(0, 0.02²) projections: no moments needed
    s1 = figure3.stage_config(c, m, "stage1", given, "/w")
    assert (s1.quantizer.init, tuple(s1.init.dont_load)) == ("normal", (".*_quantizer/.*",))
    c.pretrain.quantizer_init = "eye"
    with pytest.raises(ValueError, match=r"pretrain.quantizer_init='eye': use one of \('normal', 'identity'\)"):
        figure3.stage_config(c, m, "stage1", given, "/w")
    c.pretrain.quantizer_init = "identity"
    c.pretrain.steps = 0  # no pretraining: every model from scratch
    assert figure3.stages(c, m) == ["stage1", "stage2_probes", "stage2"]
    s1, p, s2 = (figure3.stage_config(c, m, s, given, "/w") for s in figure3.stages(c, m))
    assert (s1.init.from_workdir, p.init.from_workdir, s2.init.from_workdir) == \
        (None, "/w/L4/stage1", "/w/L4/stage2_probes")
    c.probe_phase.steps = 0  # and no curriculum: stage 2 from stage 1, no probe corpus
    assert figure3.stages(c, m) == ["stage1", "stage2"] and figure3.probe_corpus(c) is None
    assert figure3.stage_config(c, m, "stage2", given, "/w").init.from_workdir == "/w/L4/stage1"
    with pytest.raises(ValueError, match="stage 'stage2_probes': this experiment trains stage1, stage2 for L4"):
        figure3.stage_config(c, m, "stage2_probes", given, "/w")
    paper = figure3_config.get_config("paper")
    assert figure3.stages(paper, m) == ["stage1", "stage2"]
    paper.probe_phase.steps = 10
    with pytest.raises(ValueError, match=r"probe_phase.steps > 0 needs the built-in corpus"):
        figure3.models(paper)
    paper.probe_phase.steps, paper.pretrain.steps = 0, 10
    with pytest.raises(ValueError, match=r"set --config.pretrain.steps=0"):
        figure3.models(paper)


def test_demo_preset_is_the_builtin_recipe_for_one_model():
    """demo.sh's preset: the builtin chain (shared 16-bit pretraining, then stage 1 with fresh quantizers
    started as the identity, then the mix) for L=4 alone, with fewer steps and questions and without the
    ScienceQA phase of the pretraining and the ScienceQA probes of the mix (session 30: they would not fit in
    10 minutes); no control, no attack."""
    c, b = figure3_config.get_config("demo"), figure3_config.get_config("builtin")
    assert (c.pretrain.probe2_steps, c.corpus.probe_formats, c.pretrain.quantizer_init) == (0, "", "identity")
    b.pretrain.probe2_steps = 0
    assert [m.name for m in figure3.models(c)] == ["L4"]
    given = inputs.Inputs("/d/s1", "/d/s2", "/d/tok", "/d/bench", probe_data="/d/probes")
    m = figure3.Model("L4", 4)
    moments = {"image": (-0.06, 1.6), "text": (0.0, 0.09)}
    assert figure3.stages(c, m) == ["stage1", "stage2"]
    steps = [figure3.stage_config(c, figure3.PRETRAINED, s, given, "/w").total_steps
             for s in figure3.stages(c, figure3.PRETRAINED)]
    steps += [figure3.stage_config(c, m, s, given, "/w", moments).total_steps for s in figure3.stages(c, m)]
    assert steps == [500, 400, 50, 300]
    assert figure3.stages(b, m) == figure3.stages(c, m)
    for stage in figure3.stages(c, m):
        ours, theirs = (figure3.stage_config(x, m, stage, given, "/w", moments) for x in (c, b))
        if stage == "stage2":  # a shorter mix
            assert (ours.total_steps, theirs.total_steps) == (300, 400)
            ours.total_steps = theirs.total_steps
        assert ours.to_dict() == theirs.to_dict()  # everything else is the builtin recipe
    assert figure3.probe_corpus(c) == figure3.probe_corpus(b)
    assert not c.privacy.enabled and c.entropy.from_levels == 4
    assert min(4 * 2 * c.corpus.n_mme, 3 * 6 * c.corpus.n_pope, 2 * c.corpus.n_vqa, 0.8 * c.corpus.n_scienceqa) >= 250


def test_builtin_preset_has_enough_questions():
    c = figure3_config.get_config("builtin").corpus
    assert 4 * 2 * c.n_mme >= 500  # MME perception: 4 subtasks, a pair of questions per image
    assert 3 * 6 * c.n_pope >= 500  # POPE: 3 splits, 3 yes + 3 no per image
    assert 2 * c.n_vqa >= 500  # VQAv2 and TextVQA: 2 questions per image
    assert 0.8 * c.n_scienceqa >= 500  # ScienceQA-IMG: ~80 % of the problems have an image


@pytest.mark.slow
def test_tiny_experiment_writes_the_figure_and_resumes(tmp_path):
    """The whole experiment at test size (two trained models, the blind control), then a rerun that trains
    and evaluates nothing again and writes the same rows."""
    c = figure3_config.get_config("tiny")
    c.levels = (2,)
    c.blind = True
    c.pretrain.probe_formats = "pope_hard"  # the pretraining's own probe corpus
    c.pretrain.probe2_steps, c.pretrain.probe2_formats = 2, "scienceqa"  # and a second phase on another
    c.corpus.probe_formats = "scienceqa"  # the mix's probes: ScienceQA-IMG problems only
    work = str(tmp_path / "fig3")
    first = figure3.run(c, work)
    for f in ("figure3.json", "figure3.md", "figure3.png", "figureA1.png"):
        assert os.path.isfile(os.path.join(work, f)), f
    on_disk = json.load(open(os.path.join(work, "figure3.json")))
    assert [r["levels"] for r in on_disk["rows"]] == [0, 2]
    assert [r["trained_levels"] for r in on_disk["rows"]] == [0, 2]
    for r in on_disk["rows"]:
        assert set(r["scores"]) == {"mme", "pope", "scienceqa", "textvqa", "vqav2"}
        for s in r["scores"].values():
            assert set(s) >= {"value", "ci95", "n"} and s["ci95"][0] <= s["value"] <= s["ci95"][1]
        assert set(r["uplink_bytes_per_sample"]) >= {"fp16", "packed", "ans"}
    assert set(on_disk["blind"]) == {"mme", "pope", "scienceqa", "textvqa", "vqav2"}
    assert set(on_disk["entropy_rule"]) == {"image", "text"} and "knee_levels" in on_disk
    assert on_disk["rows"][1]["uplink_bytes_per_sample"]["packed"] < on_disk["rows"][0]["uplink_bytes_per_sample"]["fp16"]
    # The shared pretraining (captions, then the probe-only phase), then every model's two stages from it.
    assert {k: v["step"] for k, v in on_disk["pretrained"].items()} == {"stage1": 2, "stage2_probes": 2,
                                                                         "stage2_probes2": 2}
    for r in on_disk["rows"]:
        assert {k: v["step"] for k, v in r["train"].items()} == {"stage1": 3, "stage2_probes": 2, "stage2": 3}
    given = json.load(open(os.path.join(work, "data", "inputs.json")))["inputs"]
    probes, pre_probes = given["images"]["probe_data"], given["images"]["pretrain_probe_data"]
    assert "shapes_images_probes" in probes and os.path.isfile(os.path.join(probes, "dataset_info.json"))
    assert "shapes_images_pretrain_probes" in pre_probes and os.path.isfile(os.path.join(pre_probes, "dataset_info.json"))
    pre_probes2 = given["images"]["pretrain_probe2_data"]
    assert "shapes_images_pretrain_probes2" in pre_probes2
    assert given["blank"]["pretrain_probe_data"] is None  # the pretraining never sees blank images
    assert given["blank"]["pretrain_probe2_data"] is None
    config_of = lambda stage: json.load(open(os.path.join(work, stage, "config.json")))["data"]["dataset_dir"]
    assert (config_of("pretrained/stage2_probes"), config_of("L2/stage2_probes")) == (pre_probes, probes)
    assert config_of("pretrained/stage2_probes2") == pre_probes2
    rows2 = json.load(open(os.path.join(work, "data", "images", "corpus_pretrain_probes2", "instruct.json")))
    assert all(t["value"].endswith(OPTION_PROMPT) for r in rows2 for t in r["conversations"][::2])
    rows = json.load(open(os.path.join(work, "data", "images", "corpus_pretrain_probes", "instruct.json")))
    assert all("Is there a" in t["value"] for r in rows for t in r["conversations"][::2])  # POPE's question only
    mix = json.load(open(os.path.join(work, "data", "images", "corpus", "instruct.json")))
    probes = [r for i, r in enumerate(mix) if shapes_samples.is_probe(i, c.corpus.probe_fraction)]
    assert len(probes) == 16 and all(t["value"].endswith(OPTION_PROMPT) for r in probes for t in r["conversations"][::2])
    for name in ("fp16", "blind", "L2"):
        init = json.load(open(os.path.join(work, name, "stage1", "config.json")))["init"]
        assert init["from_workdir"] == os.path.join(os.path.abspath(work), "pretrained", "stage2_probes2")
        assert init["dont_load"] == ([".*_quantizer/.*"] if name == "L2" else [])
    phases = dict(first["timing"])
    again = figure3.run(c, work)
    assert again["rows"] == first["rows"] and again["blind"] == first["blind"]
    # Nothing was trained or evaluated again: those phases kept their first timings.
    assert {k: v for k, v in again["timing"].items() if "/" in k} == {k: v for k, v in phases.items() if "/" in k}
    assert not any("privacy" in r for r in again["rows"])
    # The attack enabled later runs only the attack, on every model but the blind control.
    c.privacy.enabled = True
    attacked = figure3.run(c, work)
    for r, before in zip(attacked["rows"], first["rows"]):
        assert set(r["privacy"]) >= {"psnr", "ssim"} and {k: v for k, v in r.items() if k != "privacy"} == before
    assert set(attacked["timing"]) - set(phases) == {"fp16/privacy", "L2/privacy"}
    assert {k: v for k, v in attacked["timing"].items() if k in phases and "/" in k} == \
        {k: v for k, v in phases.items() if "/" in k}
    assert "PSNR" in open(os.path.join(work, "figure3.md")).read()


def test_cli_bad_paths_are_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qtl_jax.experiments.figure3", "--config=configs/figure3.py:paper",
                          f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "figure3: error: figure3 (paper): paths.vision_dir is not set; pass --config.paths.vision_dir=/local/dir "
        "(the SigLIP checkpoint directory (safetensors + config.json))."]


def test_curriculum_preset_is_builtin_with_the_probe_phase():
    """builtin (session 32 on; 'budget' in session 31) is the curriculum chain with a 50-step stage 1 and the mix
    straight after it; curriculum (builtin until session 32) keeps the 200-step stage 1 and the 400 probe-only
    steps before the mix. Everything else is equal."""
    c, b = figure3_config.get_config("curriculum"), figure3_config.get_config("builtin")
    m = figure3.Model("L4", 4)
    assert figure3.stages(b, m) == ["stage1", "stage2"] and figure3.stages(c, m) == ["stage1", "stage2_probes", "stage2"]
    assert figure3.stages(c, figure3.PRETRAINED) == figure3.stages(b, figure3.PRETRAINED)
    given = inputs.Inputs("/d/s1", "/d/s2", "/d/tok", "/d/bench", probe_data="/d/probes",
                          pretrain_probe2_data="/d/pre_probes2")
    moments = {"image": (-0.06, 1.6), "text": (0.0, 0.09)}
    s1, s2 = (figure3.stage_config(b, m, s, given, "/w", moments) for s in ("stage1", "stage2"))
    assert (s1.total_steps, s2.total_steps, s2.init.from_workdir) == (50, 400, "/w/L4/stage1")
    t1, tp, t2 = (figure3.stage_config(c, m, s, given, "/w", moments) for s in figure3.stages(c, m))
    assert (t1.total_steps, tp.total_steps, t2.init.from_workdir) == (200, 400, "/w/L4/stage2_probes")
    s1.total_steps, s2.init.from_workdir = t1.total_steps, t2.init.from_workdir
    assert s1.to_dict() == t1.to_dict() and s2.to_dict() == t2.to_dict()
    assert [x.name for x in figure3.models(c)] == [x.name for x in figure3.models(b)]
    # The pretraining is shared by both and asks its probes on the same corpus.
    assert figure3.probe_corpus(b) == figure3.probe_corpus(c) is not None
    for stage in figure3.stages(b, figure3.PRETRAINED):
        x, y = (figure3.stage_config(z, figure3.PRETRAINED, stage, given, "/w") for z in (b, c))
        assert x.to_dict() == y.to_dict()