"""Where a profiled step's time went: the events of a ``jax.profiler`` trace, totalled by name.

``python -m bench.profile_summary DIR`` reads the newest ``*.xplane.pb`` under DIR (what
``jax.profiler.trace(DIR)`` writes) and prints, per device plane (``/device:GPU:0`` ...; the host's XLA
threads when there is no device plane, as on a CPU), each line's busy time (a line is a stream or thread)
and the events that took the most of it, totalled by name. With ``--json`` it prints the summary as JSON.
``bench.perf --paper-trace`` writes one per stage next to its report (docs/performance.md). Reading a
trace needs nothing but jax (``jax.profiler.ProfileData``); TensorBoard's profile plugin shows the same
file as a timeline.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
from typing import Any

# On a CPU the XLA programs run on these host threads; a GPU or TPU has planes of its own.
_HOST_XLA_LINE = "tf_XLA"


def find_trace(path: str) -> str:
    """``path`` itself if it is a file, else the newest ``*.xplane.pb`` under the directory ``path``."""
    if os.path.isfile(path):
        return path
    files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {path!r}: pass the directory given to jax.profiler.trace.")
    return max(files, key=os.path.getmtime)


def summarize(path: str, top: int = 30) -> dict[str, Any]:
    """The trace at ``path`` (a file or a directory, :func:`find_trace`) totalled by plane, line and event name.

    Returns ``{"trace": file, "planes": [{"plane", "lines": [{"line", "events", "busy_s"}], "top": [{"line",
    "name", "count", "total_s", "share_of_line"}]}]}``: device planes only, or the host's XLA threads when
    the trace has no device plane. ``busy_s`` is the sum of the line's event durations (nested events, as on
    a host thread, count once per level); ``top`` holds the ``top`` longest names over all lines of the plane.
    """
    from jax.profiler import ProfileData

    trace = find_trace(path)
    try:
        data = ProfileData.from_file(trace)
    except RuntimeError as e:  # jax's own message is "Failed to parse XSpace from array"
        raise ValueError(f"{trace!r} is not a readable profiler trace (an XSpace protobuf): {e}") from e
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    host_only = not planes
    if host_only:
        planes = [p for p in data.planes if p.name.startswith("/host:")]
    out = []
    for plane in planes:
        lines, totals = [], collections.defaultdict(lambda: [0, 0.0])
        busy_by_line = {}
        for line in plane.lines:
            if host_only and not line.name.startswith(_HOST_XLA_LINE):
                continue
            busy, n = 0.0, 0
            for event in line.events:
                seconds = float(event.duration_ns) * 1e-9
                if seconds <= 0:
                    continue
                busy += seconds
                n += 1
                entry = totals[(line.name, event.name)]
                entry[0] += 1
                entry[1] += seconds
            if n:
                lines.append({"line": line.name, "events": n, "busy_s": busy})
                busy_by_line[line.name] = busy
        if not lines:  # e.g. /host:metadata
            continue
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
        out.append({"plane": plane.name, "lines": lines,
                    "top": [{"line": ln, "name": name, "count": c, "total_s": t,
                             "share_of_line": t / busy_by_line[ln] if busy_by_line.get(ln) else 0.0}
                            for (ln, name), (c, t) in ranked]})
    return {"trace": trace, "planes": out}


def markdown(summary: dict[str, Any]) -> str:
    """:func:`summarize`'s result as tables for people."""
    parts = [f"Trace: `{summary['trace']}`"]
    for plane in summary["planes"]:
        parts.append(f"\n### {plane['plane']}\n\n| line | events | busy (ms) |\n|---|---:|---:|")
        parts += [f"| {ln['line']} | {ln['events']} | {1e3 * ln['busy_s']:.2f} |" for ln in plane["lines"]]
        parts.append("\n| event | line | count | total (ms) | share of its line |\n|---|---|---:|---:|---:|")
        parts += [f"| `{e['name'][:90]}` | {e['line']} | {e['count']} | {1e3 * e['total_s']:.3f} | "
                  f"{100 * e['share_of_line']:.1f} % |" for e in plane["top"]]
    return "\n".join(parts) + "\n"


def write(path: str, out_prefix: str, top: int = 30) -> dict[str, Any]:
    """:func:`summarize` of ``path`` written to ``out_prefix`` + ``.json`` and ``.md``; returns the summary."""
    summary = summarize(path, top)
    with open(out_prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(out_prefix + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a *.xplane.pb file, or the directory given to jax.profiler.trace")
    parser.add_argument("--top", type=int, default=30, help="events to list per plane")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.top < 1:
        print(f"profile_summary: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    try:
        summary = summarize(args.trace, args.top)
    except (FileNotFoundError, ValueError) as e:
        print(f"profile_summary: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
