"""Convergence cost of the downlink options and of SplitFed, measured on the demo.

Each variant trains ``configs/stage1.py:demo`` then ``configs/stage2.py:demo`` (from its own stage 1),
same seed and steps, with the in-process server half (the loss curves and held-out scores do not depend
on the transport: tests/test_grpc_split.py shows the gRPC run computes what the in-process one does).
The variants differ only in ``split.downlink*``.

Runs are sequential, resumable (a finished stage is skipped, an interrupted one resumes from its
checkpoint) and meant to run under ``nice``::

    nice -n 10 python -m bench.downlink_study run --out=/tmp/qtl_study --variants=fp32,q4,q4ef,q2ef
    python -m bench.downlink_study report --out=/tmp/qtl_study --json=docs/bench/downlink_study.json \
        --plot=docs/downlink_study.png

``splitfed`` runs the 3-client SplitFed comparison (issue 18 item 5) at stage 2 from the fp32 variant's
stage 1 (run that first): a :mod:`qtl_jax.split.server` process and three :mod:`qtl_jax.split.client`
processes on loopback, each client on its own shapes corpus (``data.shapes.seed`` 0, 1, 2; client 0's is
the single client's), the same per-client batch as the single client and a third of its steps, so the
three together see the single client's total examples; the client models are averaged every
``--fedavg_every`` steps. The held-out evaluation then runs in this process from client ``a``'s last
checkpoint (the last round's average) and the server's (:func:`qtl_jax.train.loop.evaluate_split_workdirs`)::

    nice -n 10 python -m bench.downlink_study splitfed --out=/tmp/qtl_study

The report gives, per variant, the final held-out exact match (stage 2) and token accuracy with 95 %
Wilson intervals, whether each lies inside the fp32 run's interval, the loss curves (plot) and the
measured bytes per sample: downlink sent, downlink in fp32, round trip, and the round trip over the
paper's setting (fp16 uplink + fp32 downlink).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quantized(bits: int, ef: bool, **extra: Any) -> list[str]:
    args = ["--config.split.downlink=quantized", f"--config.split.downlink_bits={bits}",
            f"--config.split.downlink_error_feedback={ef}"]
    return args + [f"--config.split.downlink_{k}={v}" for k, v in extra.items()]


# name -> (description, train.py overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "fp32": ("fp32 (the paper)", ["--config.split.downlink=fp32"]),
    "bf16": ("bf16", ["--config.split.downlink=bf16"]),
    "q8": ("quantized 8 bits", _quantized(8, False)),
    "q8ef": ("quantized 8 bits + EF", _quantized(8, True)),
    "q4": ("quantized 4 bits", _quantized(4, False)),
    "q4ef": ("quantized 4 bits + EF", _quantized(4, True)),
    "q2": ("quantized 2 bits", _quantized(2, False)),
    "q2ef": ("quantized 2 bits + EF", _quantized(2, True)),
}
SPLITFED = "splitfed"
DESCRIPTIONS = {**{name: v[0] for name, v in VARIANTS.items()}, SPLITFED: "SplitFed, 3 clients (stage 2 only)"}
STAGES = (("stage1", "configs/stage1.py"), ("stage2", "configs/stage2.py"))
# Bytes are measured every 5th step (host entropy coding); the curves use every step.
COMMON = ["--config.split.measure_every=5", "--config.progress_bar=False"]


def _done(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, "eval.jsonl"))


def run_variant(name: str, out: str, log, stages: tuple[str, ...] = ("stage1", "stage2"),
                extra_args: tuple[str, ...] = (), preset: str = "demo") -> None:
    data = os.path.join(out, "data")
    for stage, config in STAGES:
        if stage not in stages:
            continue
        workdir = os.path.join(out, name, stage)
        if _done(workdir):
            continue
        extra = [f"--config.data.data_dir={data}", *extra_args]
        if stage == "stage2":
            extra.append(f"--config.init.from_workdir={os.path.join(out, name, 'stage1')}")
        t0 = time.time()
        cmd = [sys.executable, "train.py", f"--config={config}:{preset}", f"--workdir={workdir}", *VARIANTS[name][1],
               *COMMON, *extra]
        print(f"[{time.strftime('%H:%M:%S')}] {name} {stage}: {' '.join(cmd[1:])}", file=log, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"[{time.strftime('%H:%M:%S')}] {name} {stage}: exit {proc.returncode} after {time.time() - t0:.0f} s",
              file=log, flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} {stage} failed (exit {proc.returncode}); see the log.")


# ---------------------------------------------------------------------------------------------------
# SplitFed


def splitfed_commands(out: str, port: int, clients: tuple[str, ...], steps: int, fedavg_every: int,
                      preset: str = "demo", python: str = sys.executable) -> dict[str, list[str]]:
    """The server's and each client's command line (stage 2 ``preset`` from the fp32 variant's stage 1).

    Client ``k`` trains on the shapes corpus of seed ``k`` (client 0's is the single client's, in
    ``out/data``), ``steps`` steps of the demo's per-client batch; the server applies all clients' steps.
    """
    root = os.path.join(out, SPLITFED)
    common = [f"--config={dict(STAGES)['stage2']}:{preset}", f"--config.total_steps={steps}", *VARIANTS["fp32"][1],
              f"--config.split.fedavg_every={fedavg_every}",
              # below the clients' rpc_timeout_s (300 s): a slow client is waited for, not dropped
              "--config.split.fedavg_timeout_s=280",
              f"--config.init.from_workdir={os.path.join(out, 'fp32', 'stage1')}", "--config.eval.enabled=False",
              *COMMON, f"--address=127.0.0.1:{port}"]
    cmds = {"server": [python, "-m", "qtl_jax.split.server", *common, f"--workdir={os.path.join(root, 'server')}",
                       f"--clients={','.join(clients)}"]}
    for k, client in enumerate(clients):
        data = os.path.join(out, "data") if k == 0 else os.path.join(root, f"data_{client}")
        cmds[client] = [python, "-m", "qtl_jax.split.client", *common, f"--workdir={os.path.join(root, client)}",
                        f"--client_id={client}", f"--config.data.shapes.seed={k}", f"--config.data.data_dir={data}"]
    return cmds


def merge_client_metrics(per_client: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per client step: the mean over the clients of every numeric key.

    ``step`` becomes the single-client step with the same total examples (client step × number of
    clients, at the same batch), so the curves of both runs share their x axis.
    """
    n = len(per_client)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for records in per_client:
        for r in records:
            by_step.setdefault(int(r["step"]), []).append(r)
    merged = []
    for step in sorted(by_step):
        rows = by_step[step]
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rec: dict[str, Any] = {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
        rec["step"] = step * n
        rec["clients"] = len(rows)
        merged.append(rec)
    return merged


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_splitfed(out: str, log, clients: tuple[str, ...] = ("a", "b", "c"), fedavg_every: int = 10,
                 preset: str = "demo") -> None:
    """Trains the SplitFed run (resumable: finished clients are not rerun), then evaluates it into
    ``out/splitfed/stage2`` (``eval.jsonl``, and the clients' merged ``metrics.jsonl``)."""
    from configs import stage2
    from qtl_jax.train.metrics_log import METRICS_FILE, read_jsonl

    root, workdir = os.path.join(out, SPLITFED), os.path.join(out, SPLITFED, "stage2")
    if _done(workdir):
        return
    if not _done(os.path.join(out, "fp32", "stage1")):
        raise SystemExit(f"splitfed starts from the fp32 variant's stage 1: run it first "
                         f"(python -m bench.downlink_study run --out={out} --variants=fp32 --stages=stage1).")
    single = stage2.get_config(preset)
    steps = int(single.total_steps) // len(clients)
    finished = lambda c: os.path.isfile(os.path.join(root, c, "wire_summary.json"))  # noqa: E731 - written at the end
    if not all(finished(c) for c in clients):
        cmds = splitfed_commands(out, _free_port(), clients, steps, fedavg_every, preset)
        os.makedirs(root, exist_ok=True)
        t0 = time.time()
        procs = {}
        try:
            for name, cmd in cmds.items():
                print(f"[{time.strftime('%H:%M:%S')}] {SPLITFED} {name}: {' '.join(cmd[1:])}", file=log, flush=True)
                with open(os.path.join(root, f"{name}.log"), "a", encoding="utf-8") as f:
                    procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            for name in [*clients, "server"]:
                rc = procs[name].wait()
                print(f"[{time.strftime('%H:%M:%S')}] {SPLITFED} {name}: exit {rc} after {time.time() - t0:.0f} s",
                      file=log, flush=True)
                if rc != 0:
                    raise SystemExit(f"{SPLITFED} {name} failed (exit {rc}); see {os.path.join(root, name + '.log')}.")
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
    os.makedirs(workdir, exist_ok=True)
    merged = merge_client_metrics([read_jsonl(os.path.join(root, c, METRICS_FILE)) for c in clients])
    with open(os.path.join(workdir, METRICS_FILE), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in merged)
    from qtl_jax import xla_flags

    xla_flags.apply_defaults()  # before the first JAX computation
    from qtl_jax.train.loop import evaluate_split_workdirs

    config = single
    config.total_steps = steps
    config.split.downlink = "fp32"
    config.init.from_workdir = os.path.join(out, "fp32", "stage1")
    config.data.data_dir = os.path.join(out, "data")  # client a's corpus; the held-out set is the single client's
    t0 = time.time()
    ev = evaluate_split_workdirs(config, os.path.join(root, clients[0]), os.path.join(root, "server"), workdir)
    print(f"[{time.strftime('%H:%M:%S')}] {SPLITFED} eval (client step {ev['step']}, server step {ev['server_step']}): "
          f"exact_match={ev['exact_match']:.4f} token_accuracy={ev['token_accuracy']:.4f} "
          f"after {time.time() - t0:.0f} s", file=log, flush=True)


# ---------------------------------------------------------------------------------------------------
# Report


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval always holds p and lies in [0, 1]; min/max only undo rounding (at k = 0 or n).
    return (max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))


def _jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if key in r]
    return sum(vals) / len(vals) if vals else None


def collect(out: str, names: list[str], final: str = "stage2") -> dict[str, Any]:
    """Per variant and stage: losses, the held-out scores with their intervals, bytes; ``final``: the stage
    whose held-out scores are compared with the fp32 run's interval."""
    result: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {"description": DESCRIPTIONS[name]}
        for stage, _ in STAGES:
            workdir = os.path.join(out, name, stage)
            records = _jsonl(os.path.join(workdir, "metrics.jsonl"))
            evals = _jsonl(os.path.join(workdir, "eval.jsonl"))
            s: dict[str, Any] = {"loss": [r["loss"] for r in records], "steps": [r["step"] for r in records]}
            if evals:
                ev = evals[-1]
                s["eval"] = {k: ev[k] for k in ("exact_match", "token_accuracy", "answers", "target_tokens",
                                                 "majority_exact_match") if k in ev}
                s["exact_match_ci"] = wilson(round(ev["exact_match"] * ev["answers"]), ev["answers"])
                s["token_accuracy_ci"] = wilson(round(ev["token_accuracy"] * ev["target_tokens"]), ev["target_tokens"])
            for key in ("downlink_bytes", "downlink_bytes_fp32", "uplink_bytes", "uplink_bytes_fp16",
                        "roundtrip_bytes_per_sample", "roundtrip_bytes_per_sample_paper", "batch_samples"):
                s[f"mean_{key}"] = _mean(records, key)
            if s["mean_roundtrip_bytes_per_sample"] and s["mean_roundtrip_bytes_per_sample_paper"]:
                s["roundtrip_vs_paper"] = s["mean_roundtrip_bytes_per_sample"] / s["mean_roundtrip_bytes_per_sample_paper"]
            if s["mean_downlink_bytes"] and s["mean_downlink_bytes_fp32"]:
                s["downlink_vs_fp32"] = s["mean_downlink_bytes"] / s["mean_downlink_bytes_fp32"]
            s["step_time_median"] = sorted(r["step_time"] for r in records)[len(records) // 2] if records else None
            entry[stage] = s
        result[name] = entry
    ref = result.get("fp32", {}).get(final, {})
    for name, entry in result.items():
        s2 = entry.get(final, {})
        if "eval" in s2 and "exact_match_ci" in ref:
            lo, hi = ref["exact_match_ci"]
            entry["exact_match_within_fp32_ci"] = lo <= s2["eval"]["exact_match"] <= hi
            lo, hi = ref["token_accuracy_ci"]
            entry["token_accuracy_within_fp32_ci"] = lo <= s2["eval"]["token_accuracy"] <= hi
    return result


def markdown(result: dict[str, Any], final: str = "stage2") -> str:
    loss_header = "final loss" if final == "stage1" else "final loss s1 / s2"
    lines = [f"| variant | {final} exact match [95 % CI] | token acc [95 % CI] | in fp32 CI (EM / tok) | "
             f"{loss_header} | downlink B/sample | downlink / fp32 | round trip B/sample | round trip / paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in result.items():
        s1, s2 = e.get("stage1", {}), e.get(final, {})
        if "eval" not in s2:
            lines.append(f"| {e['description']} | (not run) |||||||")
            continue
        ev = s2["eval"]
        em_ci, tok_ci = s2["exact_match_ci"], s2["token_accuracy_ci"]
        yes = lambda k: "-" if k not in e else "yes" if e[k] else "no"  # noqa: E731 - "-": no fp32 run to compare
        inside = f"{yes('exact_match_within_fp32_ci')} / {yes('token_accuracy_within_fp32_ci')}"
        tail = lambda s: f"{sum(s['loss'][-10:]) / len(s['loss'][-10:]):.3f}" if s.get("loss") else "-"  # noqa: E731
        per = lambda k: (s2[f"mean_{k}"] or 0) / max(s2["mean_batch_samples"] or 1, 1)  # noqa: E731
        lines.append(
            f"| {e['description']} | {ev['exact_match']:.3f} [{em_ci[0]:.3f}, {em_ci[1]:.3f}] | "
            f"{ev['token_accuracy']:.3f} [{tok_ci[0]:.3f}, {tok_ci[1]:.3f}] | {inside} | "
            f"{tail(s1) if final == 'stage1' else tail(s1) + ' / ' + tail(s2)} | "
            f"{per('downlink_bytes'):,.0f} | {s2.get('downlink_vs_fp32', float('nan')):.4f} | "
            f"{s2['mean_roundtrip_bytes_per_sample'] or float('nan'):,.0f} | {s2.get('roundtrip_vs_paper', float('nan')):.4f} |")
    return "\n".join(lines) + "\n\nFinal loss: mean of the last 10 logged steps.\n"


def plot(result: dict[str, Any], path: str, final: str = "stage2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    smooth = 10
    for i, (name, e) in enumerate(result.items()):
        for ax, (stage, _) in zip(axes[:2], STAGES):
            s = e.get(stage, {})
            if not s.get("loss"):
                continue
            loss = s["loss"]
            avg = [sum(loss[max(0, j - smooth + 1): j + 1]) / len(loss[max(0, j - smooth + 1): j + 1])
                   for j in range(len(loss))]
            ax.plot(s["steps"], avg, label=e["description"], color=f"C{i}", lw=1.2)
    for ax, (stage, _) in zip(axes[:2], STAGES):
        ax.set_title(f"{stage} demo: loss ({smooth}-step running mean)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)  # SplitFed has no stage 1 of its own
    axes[1].set_xlabel("step (SplitFed: client step × clients, the same examples)")
    ax = axes[2]
    names = [n for n, e in result.items() if "eval" in e.get(final, {})]
    for i, name in enumerate(names):
        s2 = result[name][final]
        em, (lo, hi) = s2["eval"]["exact_match"], s2["exact_match_ci"]
        ax.errorbar([i], [em], yerr=[[em - lo], [hi - em]], fmt="o", color=f"C{list(result).index(name)}", capsize=4)
    if "fp32" in names:
        lo, hi = result["fp32"][final]["exact_match_ci"]
        ax.axhspan(lo, hi, color="C0", alpha=0.12, label="fp32 95 % CI")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, fontsize=8)
    ax.set_title(f"{final} held-out exact match (95 % Wilson CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "report", SPLITFED))
    p.add_argument("--out", default="/tmp/qtl_study", help="workdirs of the runs")
    p.add_argument("--variants", default=None,
                   help=f"run: of {','.join(VARIANTS)} (default all); report: the same and {SPLITFED}")
    p.add_argument("--fedavg_every", type=int, default=10, help=f"{SPLITFED}: average the client models every K steps")
    p.add_argument("--json", default=None, help="report: write the figures here")
    p.add_argument("--markdown", default=None, help="report: write the table here")
    p.add_argument("--plot", default=None, help="report: write the plot here")
    p.add_argument("--stages", default="stage1,stage2", help="stages to run (a reduced study: stage1)")
    p.add_argument("--preset", default="demo", help="the configs' preset (tiny: a test of the study's code path)")
    p.add_argument("--extra", default="", help="more --config.* overrides for every run, space-separated")
    args = p.parse_args(argv)
    known = VARIANTS if args.command == "run" else DESCRIPTIONS
    names = [v for v in (args.variants or ",".join(known)).split(",") if v]
    stages = tuple(v for v in args.stages.split(",") if v)
    if not stages or any(v not in dict(STAGES) for v in stages):
        p.error(f"--stages={args.stages!r}: use stage1 and/or stage2")
    final = stages[-1]
    unknown = [v for v in names if v not in known]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(known)}"
                + (f" ({SPLITFED} has its own command)" if SPLITFED in unknown else ""))
    if args.fedavg_every <= 0:
        p.error(f"--fedavg_every={args.fedavg_every}: give a positive number of steps")
    if args.command == "run":
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "study.log"), "a", encoding="utf-8") as log:
            for name in names:
                run_variant(name, args.out, log, stages, tuple(args.extra.split()), args.preset)
        return
    if args.command == SPLITFED:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "study.log"), "a", encoding="utf-8") as log:
            run_splitfed(args.out, log, fedavg_every=args.fedavg_every, preset=args.preset)
        return
    result = collect(args.out, names, final)
    table = markdown(result, final)
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    if args.plot:
        plot(result, args.plot, final)


if __name__ == "__main__":
    main()
