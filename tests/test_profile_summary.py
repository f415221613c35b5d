"""bench.profile_summary: a real jax.profiler trace of a small program, totalled; bad paths are one-line errors."""

import jax
import jax.numpy as jnp
import pytest

from bench import profile_summary


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    where = tmp_path_factory.mktemp("trace")
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()  # compiled outside the trace
    with jax.profiler.trace(str(where)):
        for _ in range(3):
            f(a, a).block_until_ready()
    return str(where)


def test_a_cpu_trace_is_totalled_on_the_host_xla_threads(trace_dir):
    s = profile_summary.summarize(trace_dir, top=5)
    assert s["trace"].endswith(".xplane.pb")
    (plane,) = s["planes"]  # no device plane on a CPU: the host's, XLA threads only
    assert plane["plane"].startswith("/host:") and plane["lines"]
    assert all(ln["line"].startswith("tf_XLA") and ln["busy_s"] > 0 for ln in plane["lines"])
    top = plane["top"]
    assert 0 < len(top) <= 5
    assert [e["total_s"] for e in top] == sorted((e["total_s"] for e in top), reverse=True)
    busy = {ln["line"]: ln["busy_s"] for ln in plane["lines"]}
    for e in top:
        assert e["count"] >= 1 and e["share_of_line"] == pytest.approx(e["total_s"] / busy[e["line"]])
    text = profile_summary.markdown(s)
    assert f"### {plane['plane']}" in text and f"`{top[0]['name']}`" in text


def test_write_and_the_command_line(trace_dir, tmp_path, capsys):
    summary = profile_summary.write(trace_dir, str(tmp_path / "sum"), top=3)
    assert (tmp_path / "sum.json").read_text().startswith("{") and (tmp_path / "sum.md").exists()
    assert profile_summary.main([trace_dir, "--top", "3", "--json"]) == 0
    assert '"planes"' in capsys.readouterr().out
    assert len(summary["planes"][0]["top"]) <= 3


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    assert profile_summary.main([str(tmp_path / "nothing")]) == 2
    assert "no *.xplane.pb under" in capsys.readouterr().err
    bad = tmp_path / "x.xplane.pb"
    bad.write_bytes(b"not a protobuf")
    assert profile_summary.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not a readable profiler trace" in err and err.count("\n") == 1
    assert profile_summary.main([str(bad), "--top", "0"]) == 2
