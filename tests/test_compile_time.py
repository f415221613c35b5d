"""bench/compile_time.py: each split program lowered and compiled from abstract inputs, at toy size."""

import os
import subprocess
import sys

import pytest

from bench import compile_time
from configs import stage1


@pytest.mark.slow
def test_compiles_each_program_with_and_without_scan():
    config = stage1.get_config("tiny")
    for scan in (False, True):
        figures = compile_time.compile_programs(config, 16, compile_time.PROGRAMS, scan)
        assert set(figures) == set(compile_time.PROGRAMS)
        for f in figures.values():
            assert f["compile"]["wall_s"] > 0 and f["compile"]["cpu_s"] > 0
            assert f["argument_bytes"] > 0 and f["temp_bytes"] >= 0


def test_unknown_program_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown programs.*known: client_begin"):
        compile_time.compile_programs(stage1.get_config("tiny"), 16, ("client_start",), False)


def test_importing_the_bench_leaves_train_py_its_flags():
    """A process that imports both (a pytest worker) must not see ``--config`` defined twice."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", "import bench.compile_time, train; print('ok')"], cwd=root,
                         env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
