"""``python -m qtl_jax.data.shapes``: see :mod:`qtl_jax.data.shapes.cli`."""

from qtl_jax import cli
from qtl_jax.data.shapes.cli import main

if __name__ == "__main__":
    cli.run(main, prog="python -m qtl_jax.data.shapes")  # bad input: one line and a non-zero exit
