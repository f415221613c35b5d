"""``python -m qtl_jax.level_selection``: see :mod:`qtl_jax.level_selection.cli`."""

from qtl_jax import cli
from qtl_jax.level_selection.cli import main

if __name__ == "__main__":
    # main returns its status (2: bad input); errors it does not expect become one line too.
    cli.run(main, prog="python -m qtl_jax.level_selection")
