"""``python -m qtl_jax.level_selection``: see :mod:`qtl_jax.level_selection.cli`."""

import sys

from qtl_jax.level_selection.cli import main

if __name__ == "__main__":
    sys.exit(main())
