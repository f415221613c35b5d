"""Trains Quantized-TinyLLaVA: ``python train.py --config=configs/stage1.py --workdir=DIR``.

Flags only; everything else is ``qtl_jax.train.loop.train_and_evaluate``. Override any config field on the
command line, e.g. ``--config.quantizer.levels=8``; variants after a colon: ``--config=configs/stage1.py:demo``.
Multi-host: set ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or --distributed under a
launcher JAX auto-detects: SLURM, TPU pods) to call ``jax.distributed.initialize`` first.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from qtl_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics (resumed if it has any).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id for jax.distributed.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation; see qtl_jax/xla_flags.py
    # Orbax and TFDS log every file operation at INFO; --verbosity=0 (or --v=0) brings them back.
    if not flags.FLAGS["verbosity"].present:  # (using_default_value is False under app.run)
        logging.set_verbosity(logging.WARNING)
    import jax

    if _COORDINATOR.value or _DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from qtl_jax.train.loop import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run_absl(main)  # bad input: one line and a non-zero exit (qtl_jax/cli.py)
