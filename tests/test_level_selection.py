"""Level selection: the quantizer evaluated in float64, per-L statistics against closed forms, the rule, batches,
the CLI."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from qtl_jax import level_selection as LS
from qtl_jax.level_selection import cli

Z_VECTOR = np.array([-1, -0.7, -0.5, -0.2, 0, 0.2, 0.5, 0.7, 1])


@pytest.mark.parametrize(
    "levels, expected",
    [
        (4, [0, 0, 1, 1, 2, 2, 2, 3, 3]),
        (8, [0, 1, 2, 3, 4, 4, 5, 6, 7]),
        (16, [0, 2, 4, 6, 8, 9, 11, 13, 15]),
    ],
)
def test_nearest_level_indices_match_the_issue_vectors(levels, expected):
    np.testing.assert_array_equal(LS.nearest_level_indices(Z_VECTOR, levels), expected)


def test_float64_scaling_and_thresholds_agree_with_the_quantizer():
    from qtl_jax import quantizer as Q

    u = np.random.default_rng(0).standard_t(4, size=(16, 64)).astype(np.float32)
    mean, std = Q.moments(u)
    z_jax, _ = Q.linear_scale(u, mean, std)
    # float64 here, float32 in the quantizer: |z| <= 1, a few float32 roundings.
    np.testing.assert_allclose(LS.scale_features(u), np.asarray(z_jax), atol=16 * np.finfo(np.float32).eps)
    for levels in (2, 3, 4, 5, 8, 16, 32):
        np.testing.assert_array_equal(LS.level_values(levels), Q.grid(levels).astype(np.float64))
        # The indices are the quantizer's, and each threshold separates its decisions on either side. The
        # quantizer rounds z (L-1)/2 - o in float32, whose ulp near a threshold is below eps32 (L-1)/2: a
        # margin of 8 eps32 in z is a few of those ulps, so only the tie at the threshold itself is skipped.
        t = LS.decision_thresholds(levels).astype(np.float32)
        margin = 8 * np.finfo(np.float32).eps
        z = np.random.default_rng(levels).uniform(-1.2, 1.2, 1024).astype(np.float32)
        z[: 2 * (levels - 1)] = np.concatenate([t - margin, t + margin])  # one array shape: one compile per L
        k = np.asarray(Q.round_to_levels(z, levels)[1])
        np.testing.assert_array_equal(LS.nearest_level_indices(z, levels), k)
        np.testing.assert_array_equal(k[: 2 * (levels - 1)], np.concatenate([np.arange(levels - 1), np.arange(1, levels)]))


def test_scale_features_follows_the_official_formula():
    u = np.array([-10.0, -1.0, 0.0, 1.0, 2.0, 30.0])
    mean, std = u.mean(), u.std(ddof=1)
    lo, hi = mean - 3 * std, mean + 3 * std
    expected = 2 * (np.clip(u, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1
    np.testing.assert_array_equal(LS.scale_features(u), expected)
    assert LS.scaling_bounds(u) == pytest.approx((mean, std, lo, hi))
    np.testing.assert_allclose(LS.decision_thresholds(4), [-2 / 3, 0, 2 / 3])


def clipped_gaussian_index_probabilities(levels):
    """P_k for z ~ N(0, 1/9) clipped to [-1, 1]: what +-3 sigma scaling of Gaussian features gives."""
    edges = np.concatenate([[-np.inf], LS.decision_thresholds(levels), [np.inf]])
    return np.diff(stats.norm.cdf(edges, scale=1 / 3))


def entropy_bits(p):
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


@pytest.fixture(scope="module")
def gaussian_selection():
    u = np.random.default_rng(1).normal(0.5, 2.0, 200_000)
    return u, LS.select_levels(u, candidates=range(2, 33))


def test_reference_table_of_method_md():
    # method.md section 4 lists H(k) for Gaussian features under +-3 sigma scaling.
    table = {2: 1.000, 3: 0.701, 4: 1.267, 5: 1.584, 8: 2.309, 16: 3.373, 32: 4.411}
    for levels, value in table.items():
        assert entropy_bits(clipped_gaussian_index_probabilities(levels)) == pytest.approx(value, abs=6e-4)


def test_gaussian_index_entropy_matches_closed_form(gaussian_selection):
    # Sampling error of a plug-in entropy at n = 200k is ~0.004 bit; the KDE's smoothing adds the
    # variance h^2 to z's 1/9, which raises H(k) by about log2(1 + 9 h^2) / 2 (0.007 bit here).
    _, sel = gaussian_selection
    smoothing = 0.5 * math.log2(1 + 9 * sel.bandwidth**2)
    assert 0.003 < smoothing < 0.012
    for row in sel.table:
        exact = entropy_bits(clipped_gaussian_index_probabilities(row.levels))
        assert row.index_entropy_empirical == pytest.approx(exact, abs=0.01)
        assert row.index_entropy == pytest.approx(exact, abs=0.01 + smoothing)
        np.testing.assert_allclose(row.probabilities, clipped_gaussian_index_probabilities(row.levels), atol=0.004)


def test_distortion_matches_the_samples_and_closed_forms(gaussian_selection):
    u, sel = gaussian_selection
    z = LS.scale_features(u)
    for row in sel.table:
        # The density's smoothing widens it slightly; 5% covers that and the sampling error.
        assert row.mse == pytest.approx(row.mse_empirical, rel=0.05)
        z_hat = LS.level_values(row.levels)[LS.nearest_level_indices(z, row.levels)]
        cos = 1 - np.mean(z * z_hat) / math.sqrt(np.mean(z * z) * np.mean(z_hat * z_hat))
        assert row.cosine_distortion == pytest.approx(cos, rel=0.05, abs=1e-4)
    # L = 2 (levels +-1): E(z - sign z)^2 = 1 - 2 E|z| + E z^2 = 1 - (2/3) sqrt(2/pi) + 1/9 for z ~ N(0, 1/9).
    assert sel.stats(2).mse == pytest.approx(1 - (2 / 3) * math.sqrt(2 / math.pi) + 1 / 9, abs=0.005)
    # High resolution: MSE -> Delta^2 / 12.
    row = sel.stats(32)
    assert row.mse == pytest.approx(row.bin_width**2 / 12, rel=0.02)


def test_resolution_gap_vanishes_at_high_resolution(gaussian_selection):
    _, sel = gaussian_selection
    for row in sel.table:
        expected = sel.mixed_entropy - (1 - sel.clip_low - sel.clip_high) * math.log2(row.bin_width)
        assert row.high_res_entropy == pytest.approx(expected, abs=1e-12)
        assert row.resolution_gap == pytest.approx(row.index_entropy - row.high_res_entropy, abs=1e-12)
    assert abs(sel.stats(32).resolution_gap) < 0.005
    assert sel.stats(4).resolution_gap > 0.15
    # The clip atoms of N(0, 1/9) at +-1 hold Phi(-3) each.
    assert sel.clip_low == pytest.approx(stats.norm.cdf(-3), abs=6e-4)
    assert sel.clip_high == pytest.approx(stats.norm.cdf(-3), abs=6e-4)


def test_rule_on_gaussian_features(gaussian_selection):
    _, sel = gaussian_selection
    gaps = {r.levels: abs(r.resolution_gap) for r in sel.table}
    assert all(gaps[L] <= sel.tolerance_bits for L in gaps if L >= sel.levels)
    assert gaps[sel.levels - 1] > sel.tolerance_bits
    assert sel.levels == 6 and sel.bits == 3
    assert sel.entropy_coded_bits == sel.stats(6).index_entropy
    assert "L=6 is the smallest candidate" in sel.reason and "L=5 misses" in sel.reason
    # h of z = (u - mean)/(3 sd) (up to the 1e-4 terms): h(N(0, 1/9)) in bits.
    assert sel.entropy == pytest.approx(0.5 * math.log2(2 * math.pi * math.e / 9), abs=0.01)


def test_uniform_features_have_the_uniform_entropy():
    # +-3 sd of a uniform exceeds its support: nothing is clipped and z is uniform on [-1/sqrt3, 1/sqrt3].
    u = np.random.default_rng(2).uniform(-1, 1, 100_000)
    sel = LS.select_levels(u, candidates=[2, 4, 8, 16, 32])
    assert sel.clip_fraction == 0.0
    assert sel.entropy == pytest.approx(math.log2(2 / math.sqrt(3)), abs=0.03)  # KDE edge bias is O(h)
    assert sel.stats(2).index_entropy == pytest.approx(1.0, abs=1e-3)


def test_apply_rule_cases():
    assert LS.apply_rule([2, 4, 8, 16], [1.0, 0.5, 0.05, 0.01], 0.1)[0] == 8
    # A lucky small gap below a large one does not count: every larger candidate must be within.
    assert LS.apply_rule([2, 3, 4, 5, 6], [0.5, 0.05, 0.3, 0.08, 0.02], 0.1)[0] == 5
    assert LS.apply_rule([8, 2, 4], [0.05, 1.0, 0.5], 0.1)[0] == 8  # any order
    level, reason = LS.apply_rule([2, 4], [1.0, 0.5], 0.1)
    assert level == 4 and "no candidate" in reason
    with pytest.raises(ValueError, match="tolerance"):
        LS.apply_rule([2], [0.1], 0.0)


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.floats(-2, 2), min_size=1, max_size=12),
    tol_a=st.floats(1e-3, 1.0),
    tol_b=st.floats(1e-3, 1.0),
)
def test_rule_is_monotone_in_the_tolerance(gaps, tol_a, tol_b):
    levels = list(range(2, 2 + len(gaps)))
    small, large = sorted([tol_a, tol_b])
    pick_small, _ = LS.apply_rule(levels, gaps, small)
    pick_large, _ = LS.apply_rule(levels, gaps, large)
    assert pick_large <= pick_small
    i = levels.index(pick_large)
    if abs(gaps[-1]) > large:  # nothing resolves: the largest candidate, flagged
        assert pick_large == levels[-1]
    else:  # every gap from the pick on is within; the one before it is not
        assert all(abs(g) <= large for g in gaps[i:])
        assert i == 0 or abs(gaps[i - 1]) > large


@pytest.fixture(scope="module")
def synthetic():
    return LS.synthetic_feature_batches("outlier", num_batches=8, tokens=96, dim=64, seed=3)


@pytest.fixture(scope="module")
def estimate(synthetic):
    return LS.estimate_over_batches(synthetic, candidates=range(2, 17))


def test_estimate_over_batches_summaries(synthetic, estimate):
    assert len(estimate.per_batch) == 8
    h = [s.entropy for s in estimate.per_batch]
    assert estimate.entropy_mean == pytest.approx(np.mean(h))
    assert estimate.entropy_sd == pytest.approx(np.std(h, ddof=1))
    i = estimate.candidates.index(8)
    hk = [s.stats(8).index_entropy for s in estimate.per_batch]
    assert estimate.index_entropy_mean[i] == pytest.approx(np.mean(hk))
    assert estimate.index_entropy_sd[i] == pytest.approx(np.std(hk, ddof=1))
    assert estimate.levels == LS.apply_rule(estimate.candidates, estimate.gap_mean, 0.1)[0]
    assert estimate.bits == math.ceil(math.log2(estimate.levels))
    # Each batch is scaled with its own statistics, as the quantizer does.
    assert estimate.per_batch[3].std == pytest.approx(np.std(synthetic[3], ddof=1), rel=1e-6)
    assert len(estimate.chosen_per_batch) == 8


def test_heavy_tailed_features_need_more_levels_than_gaussian():
    # +-3 sd scaling of a heavy-tailed distribution squeezes its bulk into the middle of [-1, 1].
    gauss = LS.estimate_over_batches(LS.synthetic_feature_batches("gaussian", 2, 128, 64, seed=0), range(2, 33))
    heavy = LS.estimate_over_batches(LS.synthetic_feature_batches("outlier", 2, 128, 64, seed=0), range(2, 33))
    assert heavy.levels > gauss.levels


def test_cli_writes_json_markdown_and_png(tmp_path, synthetic, capsys):
    path = tmp_path / "features.npz"
    np.savez(path, **{f"batch_{i}": b for i, b in enumerate(synthetic)})
    out = tmp_path / "out"
    assert cli.main([f"--features={path}", f"--out={out}", "--levels=2-16"]) == 0
    data = json.loads((out / "levels.json").read_text())
    md = (out / "levels.md").read_text()
    png = (out / "levels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    expected = LS.estimate_over_batches(synthetic, candidates=range(2, 17))
    assert data["levels"] == expected.levels and data["chosen_per_batch"] == list(expected.chosen_per_batch)
    assert len(data["per_batch"]) == 8 and len(data["per_level"]) == 15
    assert md.count("\n| ") >= 8 + 1 + 15 and "mean ± sd" in md
    assert "wrote" in capsys.readouterr().out
    # The same batches stacked as one [8, ...] array give the same result.
    stacked = tmp_path / "stacked.npz"
    np.savez(stacked, features=np.stack(synthetic))
    for loaded, original in zip(LS.load_feature_batches(str(stacked)), synthetic, strict=True):
        np.testing.assert_array_equal(loaded, original)


def test_synthetic_batches_are_seeded():
    a = LS.synthetic_feature_batches("mixture", 2, 8, 8, seed=1)
    b = LS.synthetic_feature_batches("mixture", 2, 8, 8, seed=1)
    c = LS.synthetic_feature_batches("mixture", 2, 8, 8, seed=2)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        LS.synthetic_feature_batches("nope")


def test_bad_input_raises_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="no feature batches"):
        LS.estimate_over_batches([])
    with pytest.raises(ValueError, match="constant"):
        LS.select_levels(np.ones((4, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        LS.select_levels(np.array([1.0, np.nan, 2.0, 3.0]))
    with pytest.raises(ValueError, match="levels=1 is out of range"):
        LS.select_levels(np.arange(100.0), candidates=[1, 2])
    with pytest.raises(ValueError, match="no candidate level counts"):
        LS.select_levels(np.arange(100.0), candidates=[])
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.ones(3), b=np.ones(3))
    with pytest.raises(ValueError, match="batch_0..batch_N"):
        LS.load_feature_batches(str(bad))
    assert cli.main([f"--features={bad}", f"--out={tmp_path}"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main([f"--features={tmp_path / 'missing.npz'}", f"--out={tmp_path}"]) == 2


def test_cli_requires_an_output_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["--synthetic", "--batches=2"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_rule_imports_neither_plots_nor_the_cli():
    import ast
    import importlib.util

    allowed = {"qtl_jax.entropy", "qtl_jax.quantizer"}
    for name, extra in (("rule", set()), ("features", set()), ("report", {"qtl_jax.level_selection.rule"}),
                        ("cli", {"qtl_jax.cli", *(f"qtl_jax.level_selection.{m}"
                                                  for m in ("rule", "features", "report"))})):
        with open(importlib.util.find_spec(f"qtl_jax.level_selection.{name}").origin) as f:
            tree = ast.parse(f.read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        ours = {m for m in imported if m.startswith("qtl_jax")}
        assert ours <= allowed | extra, (name, ours)
        if name != "report":
            assert not any(m.startswith("matplotlib") for m in imported), name


def test_gap_equals_the_documented_kl_decomposition(gaussian_selection):
    # For z ~ N(0, 1/9) clipped to [-1, 1], compute both sides of docs/entropy.md's identity exactly:
    # gap = sum_interior P_k KL(f|B_k || U) + sum_ends [q_e (1 + KL(f|half || U)) - P_e H_b(p/P_e)].
    from scipy import integrate

    f = stats.norm(scale=1 / 3).pdf
    p_atom = stats.norm.cdf(-3)
    _, sel = gaussian_selection
    h_mix = -2 * p_atom * math.log2(p_atom) - integrate.quad(lambda t: f(t) * math.log2(f(t)), -1, 1)[0]
    for levels in (3, 4, 8, 16):
        delta = 2 / (levels - 1)
        p = clipped_gaussian_index_probabilities(levels)
        gap = entropy_bits(p) - (h_mix - (1 - 2 * p_atom) * math.log2(delta))
        cells = np.concatenate([[-1], LS.decision_thresholds(levels), [1]])
        total = 0.0
        for k in range(levels):
            a, b = cells[k], cells[k + 1]
            q = stats.norm.cdf(b, scale=1 / 3) - stats.norm.cdf(a, scale=1 / 3)
            kl = integrate.quad(lambda t: f(t) / q * math.log2(f(t) / q * (b - a)), a, b)[0]
            total += q * kl
            if k in (0, levels - 1):
                P = q + p_atom
                total += q - P * entropy_bits(np.array([p_atom / P, q / P]))
        assert gap == pytest.approx(total, abs=1e-7)
        assert gap > 0
        # The module's estimate of the same gap, from 200k samples.
        assert sel.stats(levels).resolution_gap == pytest.approx(gap, abs=0.01)
