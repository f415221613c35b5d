r"""Compile time of the split step's programs at a training config's shapes, without running them.

    python -m bench.compile_time --config=configs/stage1.py:paper_random --text_len=64 \
        [--programs=client_begin,server_update,client_finish,init_split_params] [--scan=both|on|off]

Each program is lowered and compiled from abstract inputs (``jax.ShapeDtypeStruct``: no weights are
allocated, so the paper's shapes need about 2 GB rather than the run's 12-18 GB) for a batch of
``global_batch_size`` rows of ``text_len`` input ids (a length bucket, as ``train.py`` logs it). Printed per
program: the lowering and the XLA compile, each as wall seconds and this process's CPU seconds (on a
shared machine the wall time depends on the load; the CPU time much less), the 1-minute load average and
XLA's memory analysis (argument, output, aliased (donated) and temporary bytes).
``--scan`` compiles with ``model.scan_layers`` off, on, or both (``qtl_jax.models.scan``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qtl_jax.models import builder
from qtl_jax.models import quantized as qm
from qtl_jax.models.messages import Downlink
from qtl_jax.split import step as steplib


def define_flags() -> dict:
    """The command's flags, defined only when it runs: defined at import they would clash with train.py's
    ``--config`` in any process that imports both (a test worker does)."""
    return dict(
        config=config_flags.DEFINE_config_file("config", None, "A training config (e.g. configs/stage1.py:paper_random)."),
        text_len=flags.DEFINE_integer("text_len", 64, "Input ids per sample (a length bucket; the image placeholder counts one)."),
        programs=flags.DEFINE_list("programs", ["client_begin", "server_update", "client_finish"], "Programs to compile."),
        scan=flags.DEFINE_enum("scan", "both", ["both", "on", "off"], "model.scan_layers setting(s) to compile with."),
        out=flags.DEFINE_string("out", None, "Optional JSON file for the figures."),
    )


FLAGS: dict = {}

# init_split_params: the random initialisation train.py compiles first (also before a restore).
PROGRAMS = ("client_begin", "server_update", "client_finish", "init_split_params")


def _timed(fn) -> tuple[Any, dict[str, float]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def abstract_batch(config: qm.QuantizedTinyLlavaConfig, batch: int, text_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one training batch (``qm.BATCH_KEYS``) of ``batch`` rows of ``text_len`` ids."""
    size = config.model.vision.image_size
    ids = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
    return {"input_ids": ids, "attention_mask": ids, "labels": ids,
            "pixel_values": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            "has_image": jax.ShapeDtypeStruct((batch,), jnp.bool_)}


def compile_programs(train_config, text_len: int, programs: tuple[str, ...], scan_layers: bool) -> dict[str, Any]:
    """Lowers and compiles ``programs`` (names in :data:`PROGRAMS`) for ``train_config``'s model and optimizer."""
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; known: {', '.join(PROGRAMS)}.")
    model = dict(train_config.model.to_dict(), scan_layers=scan_layers)
    config = builder.build_model(model, train_config.quantizer.to_dict(), vocab_size=32000).config
    params, stats = jax.eval_shape(lambda k: qm.init_split_params(config, k), jax.random.key(0))
    optimizer = train_config.optimizer.to_dict()
    optimizers = steplib.make_split_optimizers(optimizer, 1000, params)
    state = {name: steplib.PartitionState(params[name], jax.eval_shape(optimizers.of(name).init, params[name]),
                                          stats if name == "client" else {}) for name in ("client", "server")}
    batch = abstract_batch(config, train_config.global_batch_size, text_len)
    begin = jax.jit(steplib.client_begin_fn(config, optimizers))
    uplink, backward, _, batch_stats = jax.eval_shape(begin, state["client"], batch)
    figures: dict[str, Any] = {}
    args = {
        "init_split_params": (jax.jit(lambda k: qm.init_split_params(config, k)), (jax.random.key(0),)),
        "client_begin": (begin, (state["client"], batch)),
        # Donated as train.py's server half donates it (qtl_jax.split.link): the state is then aliased.
        "server_update": (jax.jit(steplib.server_update_fn(config, optimizers), donate_argnums=0),
                          (state["server"], uplink)),
    }
    if "client_finish" in programs:
        _, down, _ = jax.eval_shape(args["server_update"][0], state["server"], uplink)
        assert isinstance(down, Downlink)
        args["client_finish"] = (jax.jit(steplib.client_finish_fn(optimizers), donate_argnums=0),
                                 (state["client"], backward, down, batch_stats))
    for name in programs:
        fn, fn_args = args[name]
        lowered, lower_t = _timed(lambda: fn.lower(*fn_args))
        compiled, compile_t = _timed(lowered.compile)
        memory = compiled.memory_analysis()
        figures[name] = {"lower": lower_t, "compile": compile_t, "load_1min": os.getloadavg()[0],
                         **{f"{k}_bytes": getattr(memory, f"{k}_size_in_bytes", None)
                            for k in ("argument", "output", "alias", "temp")}}
        print(json.dumps({"program": name, "scan_layers": scan_layers, **figures[name]}), flush=True)
    return figures


def main(argv) -> None:
    del argv
    if FLAGS["config"].value is None:
        sys.exit("bench.compile_time: --config is required (e.g. --config=configs/stage1.py:paper_random).")
    scans = {"both": (False, True), "on": (True,), "off": (False,)}[FLAGS["scan"].value]
    report = {f"scan_layers={s}": compile_programs(FLAGS["config"].value, FLAGS["text_len"].value,
                                                   tuple(FLAGS["programs"].value), s)
              for s in scans}
    if FLAGS["out"].value:
        with open(FLAGS["out"].value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    FLAGS.update(define_flags())
    np.set_printoptions(precision=3)
    app.run(main)
