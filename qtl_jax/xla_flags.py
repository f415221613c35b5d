"""XLA options the project's entry points set by default, and only where they were measured to help.

``--xla_cpu_experimental_ynn_fusion_type=dot``: XLA:CPU (jaxlib 0.10) hands dots *and* reductions and
some elementwise work to YNNPACK by default. For the small models this project trains on CPU, YNNPACK's
reductions over the attention and logit tensors were slower than XLA's own loops: keeping only the dots
in YNNPACK made the demo-size train step ~8 % faster on a 2-core machine (interleaved runs against the
PyTorch reference, docs/performance.md). XLA aborts on a flag it does not know, so the default is applied
only for the jaxlib versions it was checked on.

XLA reads ``XLA_FLAGS`` once, when the first backend starts: call :func:`apply_defaults` before any JAX
computation. ``train.py``, ``eval.py``, the split client and server, ``bench/perf.py`` and
``tests/conftest.py`` do, so training, evaluation and the tests run under the same options. For
evaluation, generation at the demo size was measured both ways (docs/cpu_optimisation.md): batch 1, the
paper's evaluation setting, was faster with the default in every pair. A flag the user already set in
``XLA_FLAGS`` (by name, whatever its value) is left alone, so every default can be overridden or undone.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_DEFAULTS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
# jaxlib minor versions on which CPU_DEFAULTS were checked to exist and to help.
CHECKED_JAXLIB = ("0.10.",)


def _name(flag: str) -> str:
    return flag.split("=", 1)[0].strip()


def with_defaults(current: str, defaults: tuple[str, ...] = CPU_DEFAULTS) -> str:
    """``current`` XLA_FLAGS plus every default whose flag name it does not already set."""
    present = {_name(f) for f in current.split()}
    added = [f for f in defaults if _name(f) not in present]
    return " ".join([current.strip(), *added]).strip()


def with_flag(current: str, flag: str) -> str:
    """``current`` XLA_FLAGS with ``flag`` set: any flag of the same name is replaced, the others kept."""
    kept = [f for f in current.split() if _name(f) != _name(flag)]
    return " ".join([*kept, flag])


def apply_defaults(environ: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None) -> bool:
    """Adds :data:`CPU_DEFAULTS` to ``environ['XLA_FLAGS']``; returns whether anything was applied.

    Does nothing on a jaxlib it was not checked on (an unknown flag would abort XLA), or when
    ``QTL_JAX_NO_XLA_DEFAULTS=1`` is set.
    """
    environ = os.environ if environ is None else environ
    if environ.get("QTL_JAX_NO_XLA_DEFAULTS", "") not in ("", "0"):
        return False
    if jaxlib_version is None:
        from importlib import metadata

        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return False
    if not jaxlib_version.startswith(CHECKED_JAXLIB):
        return False
    before = environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = with_defaults(before)
    return environ["XLA_FLAGS"] != before.strip()
