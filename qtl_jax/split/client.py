r"""The split-learning client on the command line: ``train.py`` with the server half behind gRPC.

It is :func:`qtl_jax.train.loop.train_and_evaluate` with ``split.server.address`` (and the TLS / token
settings of ``split.server``) taken from the flags below, so a network run trains, logs, checkpoints and
resumes exactly as an in-process one (``tests/test_grpc_split.py`` checks it computes the same losses).
The client holds the client partition (vision tower, connector, token embeddings, quantizer encoders),
the private data and its optimizer; the server partition lives in a :mod:`qtl_jax.split.server` process
started with the same training config::

    python -m qtl_jax.split.client --config=configs/stage1.py:tiny --workdir=/tmp/qtl_client \
        --address=127.0.0.1:50051 --tls=mutual --ca_cert=pki/ca.pem --cert=pki/client.pem --key=pki/client.key

The client writes ``metrics.jsonl`` (loss, CE, distortion, code usage, theoretical bytes
``uplink_bytes_{fp16,packed,ans}``/``downlink_bytes`` and the bytes measured on the wire
``wire_uplink_bytes``/``wire_downlink_bytes``), its own checkpoints, and at the end ``wire_summary.json``
(totals and per sample), which it also prints. On a restart of either side the two join: the side that is
ahead rewinds to its checkpoint of the other's step, and the run continues.
"""

from __future__ import annotations

# Flags with the name of their config.split.server field (besides --address).
_SECTION_FLAGS = ("tls", "ca_cert", "cert", "key", "token_file", "max_message_mb", "client_id", "server_name",
                  "rpc_timeout_s", "retries")


def main(argv) -> None:
    from absl import app, flags, logging

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation; see qtl_jax/xla_flags.py
    # Orbax and TFDS log every file operation at INFO; --verbosity=0 brings them back.
    if not f["verbosity"].present:  # (using_default_value is False under app.run)
        logging.set_verbosity(logging.WARNING)
    from qtl_jax.split.link import format_summary
    from qtl_jax.train.loop import train_and_evaluate

    config = f.config
    # The flags given on the command line set split.server.*; the others leave the config's values.
    section = config.split.server
    section.address = f.address
    for name in _SECTION_FLAGS:
        if f[name].present:
            section[name] = f[name].value
    from qtl_jax.split import security as seclib

    # A mistyped path fails here, not after the data is prepared and the model built.
    seclib.check_files({name: section.get(name) for name in ("token_file", "ca_cert", "cert", "key")})
    result = train_and_evaluate(config, f.workdir)
    print(format_summary(result["wire"]), flush=True)
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    print(f"qtl_jax.split.client: done at step {result['step']}, loss {loss}", flush=True)


if __name__ == "__main__":
    from absl import flags

    from qtl_jax import cli
    from qtl_jax.split.server import define_flags

    define_flags("client")
    # Defaults: the config's split.server section.
    flags.DEFINE_string("client_id", None, "this client's name in the server's errors (its turn with --clients)")
    flags.DEFINE_string("server_name", None, "the name the server's TLS certificate must carry")
    flags.DEFINE_float("rpc_timeout_s", None, "deadline of each RPC (the first includes server compilation)")
    flags.DEFINE_integer("retries", None, "re-sends of a step after UNAVAILABLE/DEADLINE_EXCEEDED")
    cli.run_absl(main, prog="python -m qtl_jax.split.client")  # bad input: one line and a non-zero exit
