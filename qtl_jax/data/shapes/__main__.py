"""``python -m qtl_jax.data.shapes``: see :mod:`qtl_jax.data.shapes.cli`."""

from qtl_jax.data.shapes.cli import main

if __name__ == "__main__":
    main()
