"""``python -m qtl_jax.selfcheck`` verifies an installation and says so."""

from qtl_jax import selfcheck


def test_selfcheck_reports_ok(capsys):
    assert selfcheck.main() == 0
    out = capsys.readouterr().out
    assert "qtl_jax selfcheck: OK" in out and "devices=8" in out
