r"""Wall time of a split-learning step on a network link: a model from measured bytes and compute, and a
measurement over a shaped link that checks it.

``model`` reads the ``metrics.jsonl`` of a client run (any transport) and predicts the step's wall time at
each bandwidth and round-trip time::

    python -m bench.link_time model --metrics=W/metrics.jsonl --rates=10e6,100e6,1e9 --rtt_ms=20

Two forms of the model, both ``compute + uplink transfer + downlink transfer``:

* ``pipe``: each message takes half the round trip plus its bytes on the wire (the serialized protobuf,
  ``wire_*_bytes``; ``uplink_bytes``/``downlink_bytes`` for an in-process run) times the TCP/IP/Ethernet
  overhead (1514 bytes on the link per 1448 of payload) over the bandwidth;
* ``slow_start``: the same, but each message starts from TCP's initial window (10 segments) and doubles
  it every round trip until the window covers the bandwidth-delay product. Linux restarts slow start on a
  connection idle for more than its retransmission timeout (``net.ipv4.tcp_slow_start_after_idle=1``), and
  the link sits idle while either side computes, so this is what an end-to-end TCP path pays per message.

``compute`` is the median step time of the run without shaping (steps after the first, which compiles).
Over gRPC each step also logs ``rpc_seconds`` (the call's wall time) and ``server_seconds`` (the server's
time from request to reply): their difference is the network's share of the step, which ``netns``
compares with the model's transfer times; on a shared machine it is far less noisy than the step time.

``netns`` measures it (root): the gRPC client and server in two network namespaces joined by a veth
pair, the rate set by ``tc`` on both ends of the pair, the server on 127.0.0.1 of its namespace::

    python -m bench.link_time netns --out=/tmp/qtl_link --json=docs/bench/link_time.json

This kernel has no ``netem`` qdisc (``CONFIG_NET_SCH_NETEM`` is not set; neither are fq, fq_codel, cake),
so the closest real alternative is used: ``tbf`` (token bucket, in the kernel) shapes the rate of each
direction on the veth, and the round trip is added by a delay line in the server's namespace (``relay``:
every byte is forwarded ``rtt/2`` after it arrived, in each direction). The relay terminates TCP, so the
client's connection sees the relay's round trip (~0), not 20 ms: the measurement checks the ``pipe`` form;
the ``slow_start`` form is the model's estimate of an end-to-end path and is not checked here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIRE_OVERHEAD = 1514 / 1448  # Ethernet + IP + TCP (timestamps) headers per full segment at MTU 1500
MSS = 1448
INITIAL_WINDOW = 10 * MSS  # RFC 6928
DEFAULT_RATES = (10e6, 100e6, 1e9)


# ---------------------------------------------------------------------------------------------------
# The model


def transfer_seconds(nbytes: float, rate_bps: float, rtt_s: float, slow_start: bool) -> float:
    """Time from the first byte sent to the last byte received for one message of ``nbytes`` payload."""
    on_wire = nbytes * WIRE_OVERHEAD
    if not slow_start:
        return rtt_s / 2 + on_wire * 8 / rate_bps
    bdp = rate_bps / 8 * rtt_s
    sent, window, t = 0.0, float(INITIAL_WINDOW), 0.0
    # Each window smaller than the pipe is sent, then the sender waits a round trip for its acks.
    while sent + window < on_wire and window < bdp:
        sent, window, t = sent + window, window * 2, t + rtt_s
    return t + rtt_s / 2 + (on_wire - sent) * 8 / rate_bps


def step_seconds(compute_s: float, up_bytes: float, down_bytes: float, rate_bps: float, rtt_s: float,
                 slow_start: bool) -> float:
    """Modelled wall time of one split step: compute, then the uplink, then the downlink."""
    return (compute_s + transfer_seconds(up_bytes, rate_bps, rtt_s, slow_start)
            + transfer_seconds(down_bytes, rate_bps, rtt_s, slow_start))


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("no values to take the median of")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run_figures(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median step time (after the first step) and median bytes per direction of a client run."""
    steady = [r for r in records if r["step"] > 1] or list(records)
    if not steady:
        raise ValueError("the run logged no steps")
    up_key = "wire_uplink_bytes" if "wire_uplink_bytes" in steady[0] else "uplink_bytes"
    down_key = "wire_downlink_bytes" if "wire_downlink_bytes" in steady[0] else "downlink_bytes"
    measured = [r for r in steady if up_key in r]
    if not measured:
        raise ValueError(f"no step logged {up_key}: run with split.measure=True")
    out = {"step_s": median([r["step_time"] for r in steady]), "steps": len(steady),
           "up_bytes": median([r[up_key] for r in measured]), "down_bytes": median([r[down_key] for r in measured]),
           "downlink_bytes_fp32": median([r["downlink_bytes_fp32"] for r in measured])}
    timed = [r for r in steady if "rpc_seconds" in r and "server_seconds" in r]
    if timed:
        # The network's share of the round trip, free of the (noisy, shared-machine) compute on either side.
        out["rpc_s"] = median([r["rpc_seconds"] for r in timed])
        out["server_s"] = median([r["server_seconds"] for r in timed])
        out["network_s"] = median([r["rpc_seconds"] - r["server_seconds"] for r in timed])
    return out


def model_table(base: dict[str, float], rates: Sequence[float], rtt_s: float) -> list[dict[str, float]]:
    rows = []
    for rate in rates:
        row = {"rate_bps": rate, "rtt_s": rtt_s, "compute_s": base["step_s"]}
        for form in ("pipe", "slow_start"):
            row[form] = step_seconds(base["step_s"], base["up_bytes"], base["down_bytes"], rate, rtt_s,
                                     form == "slow_start")
        row["transfer_share_pipe"] = 1 - base["step_s"] / row["pipe"]
        for form in ("pipe", "slow_start"):
            row[f"network_{form}"] = (transfer_seconds(base["up_bytes"], rate, rtt_s, form == "slow_start")
                                      + transfer_seconds(base["down_bytes"], rate, rtt_s, form == "slow_start"))
        rows.append(row)
    return rows


def format_rate(rate: float) -> str:
    return f"{rate / 1e9:g} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:g} Mbit/s"


def print_model(base: dict[str, float], rows: Sequence[dict[str, float]]) -> None:
    print(f"compute {base['step_s']:.3f} s/step (median of {base['steps']}), uplink {base['up_bytes']:,.0f} B, "
          f"downlink {base['down_bytes']:,.0f} B (fp32 would be {base['downlink_bytes_fp32']:,.0f} B)")
    print(f"{'link':>14s} {'RTT':>6s} {'pipe s':>8s} {'slow-start s':>13s} {'transfer share':>15s}")
    for r in rows:
        print(f"{format_rate(r['rate_bps']):>14s} {r['rtt_s'] * 1e3:4.0f}ms {r['pipe']:8.3f} {r['slow_start']:13.3f} "
              f"{r['transfer_share_pipe']:15.1%}")


# ---------------------------------------------------------------------------------------------------
# The delay line (runs inside the server's namespace)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: list[float]) -> None:
    """Forward what ``reader`` receives to ``writer``, each chunk ``delay[0]`` s after its arrival, in order;
    the end of the stream is forwarded as a half-close (the other direction keeps flowing)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the emulated propagation delay itself
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    while True:
        data = await reader.read(1 << 16)
        queue.put_nowait((loop.time() + delay[0], data or None))
        if not data:
            break
    await task


async def start_delay_line(listen: tuple[str, int], target: tuple[str, int], delay_file: str) -> asyncio.Server:
    """A listening delay line: each connection to ``listen`` is forwarded to ``target`` with the one-way
    delay (ms) written in ``delay_file``, reread on SIGUSR1 (when started from the main thread)."""
    delay = [0.0]

    def reread():
        with open(delay_file, encoding="utf-8") as f:
            delay[0] = float(f.read()) / 1e3

    reread()
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, reread)
    except (RuntimeError, ValueError):  # not the main thread: the delay stays as first read
        pass

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter):
        sr, sw = await asyncio.open_connection(*target)
        await asyncio.gather(_pump(cr, sw, delay), _pump(sr, cw, delay), return_exceptions=True)
        for w in (cw, sw):
            w.close()

    return await asyncio.start_server(handle, *listen)


async def _serve_delay_line(listen: tuple[str, int], target: tuple[str, int], delay_file: str) -> None:
    server = await start_delay_line(listen, target, delay_file)
    async with server:
        await server.serve_forever()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------------------------
# The measurement in two namespaces


NS_CLIENT, NS_SERVER = "qtlc", "qtls"
VETH_CLIENT, VETH_SERVER = "qtlvc", "qtlvs"
ADDR_CLIENT, ADDR_SERVER = "10.213.0.1", "10.213.0.2"  # exist only inside the two namespaces


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out


def teardown() -> None:
    for ns in (NS_CLIENT, NS_SERVER):
        sh("ip", "netns", "del", ns, check=False)


def setup_namespaces() -> None:
    if os.geteuid() != 0:
        raise SystemExit("netns needs root (network namespaces and tc).")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"netns needs the '{tool}' command (iproute2).")
    teardown()
    sh("ip", "netns", "add", NS_CLIENT)
    sh("ip", "netns", "add", NS_SERVER)
    sh("ip", "link", "add", VETH_CLIENT, "type", "veth", "peer", "name", VETH_SERVER)
    for ns, dev, addr in ((NS_CLIENT, VETH_CLIENT, ADDR_CLIENT), (NS_SERVER, VETH_SERVER, ADDR_SERVER)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def tbf_burst(rate_bps: float) -> int:
    """The token bucket's size: at least a 64 KiB GSO packet (tbf splits larger ones), or 1 ms at the rate."""
    return max(64 << 10, int(rate_bps / 8 * 0.001))


def emulated_network_seconds(up_bytes: float, down_bytes: float, rate_bps: float, rtt_s: float,
                             unshaped_s: float) -> float:
    """The ``pipe`` model of the emulated link: a full bucket after the idle compute lets each message's
    first ``tbf_burst`` bytes through at line rate, and the share measured without shaping is added."""
    burst = tbf_burst(rate_bps)
    free = sum(min(b * WIRE_OVERHEAD, burst) for b in (up_bytes, down_bytes)) * 8 / rate_bps
    return (transfer_seconds(up_bytes, rate_bps, rtt_s, False) + transfer_seconds(down_bytes, rate_bps, rtt_s, False)
            - free + unshaped_s)


def shape(rate_bps: float | None) -> None:
    """Token-bucket rate on both ends of the veth (None: unshaped)."""
    for ns, dev in ((NS_CLIENT, VETH_CLIENT), (NS_SERVER, VETH_SERVER)):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        if rate_bps is not None:
            burst = tbf_burst(rate_bps)  # queue: 2 s at the rate
            limit = max(4 * burst, int(rate_bps / 8 * 2.0))
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
               "burst", str(burst), "limit", str(limit))


def netem_available() -> bool:
    out = sh("ip", "netns", "exec", NS_CLIENT, "tc", "qdisc", "add", "dev", VETH_CLIENT, "root", "netem", "delay",
             "10ms", check=False)
    sh("ip", "netns", "exec", NS_CLIENT, "tc", "qdisc", "del", "dev", VETH_CLIENT, "root", check=False)
    return out.returncode == 0


def _logged_steps(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def run_phases(name: str, out: str, phases: Sequence[tuple[float | None, float]], steps_per_phase: int,
               train_args: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
    """One server + delay line + client run over the veth, the link changed between phases of the run.

    Phase ``i`` (rate in bit/s or None for unshaped, round trip in s) covers steps ``2 + i * n ..
    1 + (i + 1) * n`` (step 1 compiles); the first step of each phase may have straddled the change and
    is left out of its figures. One run for all phases: compilation is paid once and the compute of every
    phase comes from the same processes under the same load.
    """
    case = os.path.join(out, name)
    shutil.rmtree(case, ignore_errors=True)
    os.makedirs(case)
    total = 1 + len(phases) * steps_per_phase
    args = [*train_args, f"--config.total_steps={total}"]
    server_port, relay_port = 50161, 50162
    py = sys.executable
    in_ns = lambda ns, *cmd: ["ip", "netns", "exec", ns, *cmd]  # noqa: E731
    metrics = os.path.join(case, "client", "metrics.jsonl")
    procs = []

    def set_phase(i: int) -> None:
        rate, rtt = phases[i]
        shape(rate)
        with open(os.path.join(case, "delay_ms"), "w", encoding="utf-8") as f:
            f.write(f"{rtt * 1e3 / 2}\n")
        procs[1].send_signal(signal.SIGUSR1)  # the delay line rereads delay_ms

    with open(os.path.join(case, "server.log"), "w") as slog, open(os.path.join(case, "client.log"), "w") as clog:
        try:
            with open(os.path.join(case, "delay_ms"), "w", encoding="utf-8") as f:
                f.write(f"{phases[0][1] * 1e3 / 2}\n")
            shape(phases[0][0])
            procs.append(subprocess.Popen(in_ns(NS_SERVER, py, "-m", "qtl_jax.split.server", *args,
                                                f"--workdir={case}/server", f"--address=127.0.0.1:{server_port}"),
                                          cwd=ROOT, stdout=slog, stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen(in_ns(NS_SERVER, py, "-m", "bench.link_time", "relay",
                                                f"--listen={ADDR_SERVER}:{relay_port}",
                                                f"--target=127.0.0.1:{server_port}",
                                                f"--delay_file={case}/delay_ms"),
                                          cwd=ROOT, stdout=slog, stderr=subprocess.STDOUT))
            client = subprocess.Popen(in_ns(NS_CLIENT, py, "-m", "qtl_jax.split.client", *args,
                                            f"--workdir={case}/client", f"--address={ADDR_SERVER}:{relay_port}",
                                            "--rpc_timeout_s=300", "--retries=60"),
                                      cwd=ROOT, stdout=clog, stderr=subprocess.STDOUT)
            procs.append(client)
            end, phase = time.monotonic() + timeout_s, 0
            # A bench driver, not a test: it follows the client's log to change the link between phases.
            while client.poll() is None:
                if time.monotonic() > end:
                    raise TimeoutError(f"{name}: the client did not finish within {timeout_s} s; see {case}")
                done = _logged_steps(metrics)
                if phase + 1 < len(phases) and done >= 1 + (phase + 1) * steps_per_phase:
                    phase += 1
                    set_phase(phase)
                time.sleep(0.05)
            if client.returncode != 0:
                raise RuntimeError(f"{name}: the client failed; see {case}/client.log")
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
    records = read_metrics(metrics)
    figures = []
    for i, (rate, rtt) in enumerate(phases):
        first = 2 + i * steps_per_phase
        chosen = [r for r in records if first + 1 <= r["step"] <= first + steps_per_phase - 1]
        figures.append({"rate_bps": rate, "rtt_s": rtt, **run_figures(chosen)})
    return figures


def netns_study(args) -> dict[str, Any]:
    setup_namespaces()
    rtt = args.rtt_ms / 1e3
    rates = [float(r) for r in args.rates.split(",")]
    result: dict[str, Any] = {"netem": netem_available(), "rtt_s": rtt, "config": args.config,
                              "extra": args.extra, "cases": {}}
    common = [f"--config={args.config}", "--config.eval.enabled=False", "--config.checkpoint_every=100000",
              "--config.progress_bar=False", *args.extra.split()]
    downlinks = {"fp32": ["--config.split.downlink=fp32"],
                 "q4ef": ["--config.split.downlink=quantized", "--config.split.downlink_bits=4",
                          "--config.split.downlink_error_feedback=True"]}
    try:
        for label in args.downlinks.split(","):
            if label not in downlinks:
                raise SystemExit(f"--downlinks: unknown {label!r}; known: {', '.join(downlinks)}")
            phases = [(None, 0.0)] + [(rate, rtt) for rate in rates]
            figs = run_phases(label, args.out, phases, args.steps_per_phase, common + downlinks[label], args.timeout_s)
            base, shaped = figs[0], figs[1:]
            model = model_table(base, rates, rtt)
            result["cases"][label] = {"unshaped": base, "model": model, "measured": shaped}
            print(f"[{label}] unshaped: {base['step_s']:.3f} s/step, up {base['up_bytes']:,.0f} B, "
                  f"down {base['down_bytes']:,.0f} B", flush=True)
            for fig, m in zip(shaped, model):
                if "network_s" in base:
                    m["network_emulated"] = emulated_network_seconds(base["up_bytes"], base["down_bytes"],
                                                                     fig["rate_bps"], rtt, base["network_s"])
                print(f"[{label}] {format_rate(fig['rate_bps'])}, {rtt * 1e3:.0f} ms: step measured {fig['step_s']:.3f} s, "
                      f"model {m['pipe']:.3f} s (pipe) / {m['slow_start']:.3f} s (slow start); network share "
                      f"measured {fig.get('network_s', float('nan')):.3f} s (unshaped {base.get('network_s', float('nan')):.3f} s), "
                      f"model {m['network_pipe']:.3f} (pipe) / {m.get('network_emulated', float('nan')):.3f} (emulated link) / "
                      f"{m['network_slow_start']:.3f} s (slow start)", flush=True)
    finally:
        teardown()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="predict step wall time from a run's metrics.jsonl")
    m.add_argument("--metrics", default=None, help="a client run's metrics.jsonl (bytes and compute from it)")
    m.add_argument("--compute_s", type=float, default=None, help="without --metrics: compute per step, s")
    m.add_argument("--up_bytes", type=float, default=None, help="without --metrics: uplink bytes per step")
    m.add_argument("--down_bytes", type=float, default=None, help="without --metrics: downlink bytes per step")
    m.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES), help="bits/s, comma-separated")
    m.add_argument("--rtt_ms", type=float, default=20.0)
    r = sub.add_parser("relay", help="a TCP delay line (used by netns)")
    r.add_argument("--listen", required=True)
    r.add_argument("--target", required=True)
    r.add_argument("--delay_file", required=True, help="one-way delay in ms; reread on SIGUSR1")
    n = sub.add_parser("netns", help="measure over a shaped veth between two namespaces (root)")
    n.add_argument("--out", default="/tmp/qtl_link")
    n.add_argument("--config", default="configs/stage1.py:demo")
    n.add_argument("--steps_per_phase", type=int, default=6, help="steps per link setting (the first is left out)")
    n.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES))
    n.add_argument("--downlinks", default="fp32,q4ef")
    n.add_argument("--rtt_ms", type=float, default=20.0)
    n.add_argument("--timeout_s", type=float, default=900.0, help="per client run")
    n.add_argument("--json", default=None)
    n.add_argument("--extra", default="", help="more --config.* overrides for both sides, space-separated")
    args = p.parse_args(argv)
    if args.command == "model":
        given = (args.compute_s, args.up_bytes, args.down_bytes)
        if args.metrics:
            try:
                base = run_figures(read_metrics(args.metrics))
            except (OSError, ValueError, KeyError) as e:
                raise SystemExit(f"link_time model: cannot read {args.metrics}: {e}") from None
        elif None not in given:
            base = {"step_s": args.compute_s, "steps": 0, "up_bytes": args.up_bytes, "down_bytes": args.down_bytes,
                    "downlink_bytes_fp32": float("nan")}
        else:
            raise SystemExit("link_time model: give --metrics=metrics.jsonl, or all of --compute_s, --up_bytes and "
                             "--down_bytes.")
        print_model(base, model_table(base, [float(x) for x in args.rates.split(",")], args.rtt_ms / 1e3))
    elif args.command == "relay":
        asyncio.run(_serve_delay_line(_hostport(args.listen), _hostport(args.target), args.delay_file))
    else:
        os.makedirs(args.out, exist_ok=True)
        result = netns_study(args)
        text = json.dumps(result, indent=1)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text)
        print(text)


if __name__ == "__main__":
    main()
