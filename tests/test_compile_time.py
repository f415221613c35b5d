"""bench/compile_time.py: each split program lowered and compiled from abstract inputs, at toy size."""

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
