"""qtl_jax.xla_flags: defaults are added by name, never override the user's, and this jaxlib accepts them."""

import os
import subprocess
import sys

from qtl_jax import xla_flags


def test_defaults_are_added_once_and_user_values_win():
    flag = xla_flags.CPU_DEFAULTS[0]
    name = flag.split("=")[0]
    assert xla_flags.with_defaults("") == " ".join(xla_flags.CPU_DEFAULTS)
    assert xla_flags.with_defaults("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 " + " ".join(xla_flags.CPU_DEFAULTS)
    )
    mine = f"{name}=dot,eltwise"
    assert xla_flags.with_defaults(mine) == mine
    once = xla_flags.with_defaults("")
    assert xla_flags.with_defaults(once) == once


def test_apply_defaults_respects_version_and_opt_out():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.apply_defaults(env, jaxlib_version="0.10.2")
    assert env["XLA_FLAGS"].endswith(xla_flags.CPU_DEFAULTS[-1])
    assert not xla_flags.apply_defaults(env, jaxlib_version="0.10.2")  # already there
    unknown = {"XLA_FLAGS": ""}
    assert not xla_flags.apply_defaults(unknown, jaxlib_version="0.99.0")
    assert unknown["XLA_FLAGS"] == ""
    off = {"QTL_JAX_NO_XLA_DEFAULTS": "1"}
    assert not xla_flags.apply_defaults(off, jaxlib_version="0.10.2")
    assert "XLA_FLAGS" not in off


def test_this_jaxlib_accepts_the_defaults():
    # XLA aborts the process on an unknown flag, so run it in a child.
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    code = (
        "from qtl_jax import xla_flags; import os; assert xla_flags.apply_defaults(); "
        "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: (x @ x.T).sum())(jnp.ones((4, 4)))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "64.0"


def test_with_flag_replaces_a_flag_of_the_same_name_and_keeps_the_rest():
    count = "--xla_force_host_platform_device_count=8"
    assert xla_flags.with_flag("", count) == count
    assert xla_flags.with_flag("--xla_force_host_platform_device_count=2 --xla_dump_to=/tmp/d", count) == (
        "--xla_dump_to=/tmp/d " + count)
    assert xla_flags.with_flag(count, count) == count


def test_the_test_session_keeps_8_devices_under_a_users_own_xla_flags():
    """tests/conftest.py adds the device count to XLA_FLAGS instead of only setting it when unset."""
    tests = os.path.dirname(os.path.abspath(__file__))
    user = "--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false"
    env = dict(os.environ, XLA_FLAGS=user, JAX_PLATFORMS="cpu", QTL_JAX_NO_XLA_DEFAULTS="1")
    code = (f"import os, sys; sys.path.insert(0, {tests!r}); import conftest, jax; print(jax.device_count()); "
            "print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(tests), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    count, flags = out.stdout.strip().split("\n")
    assert count == "8"
    assert flags == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
