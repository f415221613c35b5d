"""Evaluates a Quantized-TinyLLaVA model: ``python eval.py --config=configs/eval.py --workdir=DIR``.

Flags only; everything else is ``qtl_jax.eval.runner.evaluate``. ``--config.checkpoint`` takes a train.py
workdir (its latest Orbax checkpoint) or a converted Hugging Face directory; variants after a colon, e.g.
``--config=configs/eval.py:demo``. Rerunning with the same workdir resumes from the answers already written.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from qtl_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/eval.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for answers, metrics.json, results.md and the sweep.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation; see qtl_jax/xla_flags.py
    if flags.FLAGS["verbosity"].using_default_value:
        # Orbax and JAX log every file operation at INFO through Python logging; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
        pylogging.getLogger().setLevel(pylogging.WARNING)
    from qtl_jax.eval.runner import evaluate

    evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run_absl(main)  # bad input: one line and a non-zero exit (qtl_jax/cli.py)
