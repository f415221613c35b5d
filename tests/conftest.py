"""Test-session set-up: 8 forced CPU devices and no network, before JAX or transformers are imported."""

import os

from qtl_jax import xla_flags  # imports no JAX

# The sharding tests need 8 devices whatever the user's own XLA_FLAGS hold: add the count to them.
os.environ["XLA_FLAGS"] = xla_flags.with_flag(os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep the 2-core CI machine from oversubscribing: torch and XLA both spawn thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The same XLA options as train.py, so the tests exercise what users run.
xla_flags.apply_defaults()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
