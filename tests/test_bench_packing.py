"""bench.packing on the micro size: both ways train the same samples to the same losses; figures add up."""

import json

import jax
import pytest

from bench import packing


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    # Compiles dominate a toy bench run; the figures checked here do not depend on optimisation.
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def test_packing_bench_reports_both_ways(tmp_path, capsys):
    packing.main(["--size=micro", "--batch=6", "--capacity=64", "--lengths=lognormal:12:0.9", "--batches=2",
                  f"--out={tmp_path}"])
    r = json.loads((tmp_path / "packing.json").read_text())
    assert r["image_tokens"] == 15 and r["batch"] == 6
    for way in ("bucketed", "packed"):
        assert r[f"computed_positions_{way}"] >= r["real_positions"] > 0
        assert r[f"padding_fraction_{way}"] == pytest.approx(1 - r["real_positions"] / r[f"computed_positions_{way}"])
        assert r[f"step_s_{way}"] > 0 and r[f"shapes_{way}"] >= 1
    assert r["speedup"] == pytest.approx(r["step_s_bucketed"] / r["step_s_packed"])
    assert r["max_loss_difference"] < 1e-4  # the same samples: float32 rounding only
    assert "Speedup of packing" in (tmp_path / "packing.md").read_text() and "| padding fraction |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--lengths=normal:3"], "use uniform:N"),
                                           (["--capacity=10", "--size=micro"], "leaves no room"),
                                           (["--size=huge"], "choose from")])
def test_packing_bench_bad_arguments_exit_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        packing.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
