"""The same experiment at several seeds: how far each score moves, whether the knee and the rule's choice hold,
and whether a τ fitted on one seed picks the knee on another.

    python -m qtl_jax.experiments.seeds --workdirs=/tmp/fig3,/tmp/fig3_seed1 --out=/tmp/fig3_seeds

Each workdir is a finished ``qtl_jax.experiments.figure3`` run (its ``figure3.json``). The runs must share
every setting except ``seed`` (the model's initialisation and the batch order; the corpus and its
questions stay the same, ``corpus.seed``), otherwise the comparison would mix two causes: the error names
the settings that differ. Writes ``seeds.json`` and ``seeds.md`` in ``--out``:

* per model and benchmark: every seed's value and 95 % interval, the mean, the spread (largest minus
  smallest value) and whether all the seeds' intervals share a point;
* per seed: the knee, the rule's choice at the configured τ, and the τ interval that would make the rule
  pick that seed's knee (``report.tolerance_window``);
* the transfer check the paper's τ needs: τ refitted on seed a (inside a's interval, as ``figure3`` refits
  it) applied to seed b's gaps, against seed b's knee, for every ordered pair.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qtl_jax.experiments import report

MODALITIES = ("image", "text")


class SeedsError(ValueError):
    """The workdirs cannot be compared (missing result, one seed given twice, settings other than the seed differ)."""


def load_run(workdir: str) -> dict[str, Any]:
    """The ``figure3.json`` of a finished run; a SeedsError naming the workdir when it has none."""
    path = os.path.join(workdir, "figure3.json")
    if not os.path.isfile(path):
        raise SeedsError(f"{workdir!r} has no figure3.json: run python -m qtl_jax.experiments.figure3 there to the "
                         f"end first.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SeedsError(f"{path} is not valid JSON ({e}); rerun the experiment there to rewrite it.") from e


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def setting_differences(configs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(keys whose values differ between the runs, keys some runs' configs do not have), dotted, ``seed``
    excepted. A key is missing where a run was made before the setting existed (new settings default to the
    old behaviour), so only the first list stops a comparison."""
    flat = [_flatten(c) for c in configs]
    every = set.intersection(*(set(f) for f in flat)) - {"seed"}
    some = set().union(*flat) - every - {"seed"}
    return sorted(k for k in every if any(f[k] != flat[0][k] for f in flat[1:])), sorted(some)


def _rule(run: Mapping[str, Any], modality: str) -> tuple[list[int], list[float]] | None:
    entry = (run.get("entropy_rule_details") or {}).get(modality)
    if not entry or "gap_mean" not in entry:
        return None
    gaps = entry["gap_mean"]
    candidates = sorted(int(k) for k in gaps)
    return candidates, [float(gaps[str(c)]) for c in candidates]


def refit_tolerance(window: tuple[float, float]) -> float:
    """The τ picked inside a window [low, high): its geometric middle, or twice ``low`` when it is open above
    (as ``figure3`` refits it)."""
    low, high = window
    return math.sqrt(low * high) if math.isfinite(high) else 2 * low


def compare(runs: Sequence[Mapping[str, Any]], workdirs: Sequence[str]) -> dict[str, Any]:
    """What ``seeds.json`` holds, from two or more finished runs that differ only in their seed."""
    if len(runs) < 2:
        raise SeedsError(f"give at least two workdirs (got {len(runs)}): one run has no seed-to-seed spread.")
    seeds = [int(r["config"]["seed"]) for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SeedsError(f"the runs' seeds {seeds} repeat: compare runs made with different --config.seed.")
    differ, not_in_every = setting_differences([r["config"] for r in runs])
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise SeedsError(f"the runs differ in more than the seed ({shown}); compare runs of one preset with the "
                         f"same overrides, changing only --config.seed.")

    names = [r["name"] for r in runs[0]["rows"]]
    if any([r["name"] for r in run["rows"]] != names for run in runs[1:]):
        raise SeedsError("the runs trained different models; rerun them with the same levels, baseline and blind.")
    blind_rows = [[dict(name="blind", levels=-1, scores=run["blind"])] if run.get("blind") else [] for run in runs]
    models = {}
    for i, row in enumerate(runs[0]["rows"] + blind_rows[0]):
        per_run = [(run["rows"] + blind_rows[k])[i] for k, run in enumerate(runs)]
        benches = {}
        for b in row["scores"]:
            scores = [r["scores"].get(b) or {} for r in per_run]
            values = [s.get("value") for s in scores]
            if any(v is None for v in values):
                continue
            cis = [s.get("ci95") for s in scores]
            overlap = all(cis) and max(c[0] for c in cis) <= min(c[1] for c in cis)
            benches[b] = {"metric": scores[0].get("metric"), "values": values, "ci95": cis,
                          "mean": sum(values) / len(values), "spread": max(values) - min(values),
                          "intervals_overlap": bool(overlap)}
        models[row["name"]] = {"levels": row["levels"], "scores": benches,
                               "beats_blind": [r.get("beats_blind") for r in per_run]}

    per_seed = []
    for seed, run, workdir in zip(seeds, runs, workdirs):
        entry: dict[str, Any] = {"seed": seed, "workdir": os.path.abspath(workdir), "knee_levels": run["knee_levels"],
                                 "entropy_rule": run.get("entropy_rule") or {}, "tolerance_for_knee": {}}
        for m in MODALITIES:
            rule = _rule(run, m)
            if rule is not None and run["knee_levels"] is not None:
                window = report.tolerance_window(*rule, run["knee_levels"])
                entry["tolerance_for_knee"][m] = window and [window[0], None if math.isinf(window[1]) else window[1]]
        per_seed.append(entry)

    transfer = []
    for a, (seed_a, run_a) in enumerate(zip(seeds, runs)):
        for b, (seed_b, run_b) in enumerate(zip(seeds, runs)):
            if a == b:
                continue
            for m in MODALITIES:
                rule_a, rule_b = _rule(run_a, m), _rule(run_b, m)
                if rule_a is None or rule_b is None:
                    continue
                item: dict[str, Any] = {"fit_seed": seed_a, "check_seed": seed_b, "modality": m,
                                        "fit_knee": run_a["knee_levels"], "check_knee": run_b["knee_levels"]}
                window = None if run_a["knee_levels"] is None else report.tolerance_window(*rule_a, run_a["knee_levels"])
                if window is None:
                    item["result"] = ("no knee on the fitting seed" if run_a["knee_levels"] is None else
                                      f"no τ picks the fitting seed's knee L={run_a['knee_levels']}")
                else:
                    tau = refit_tolerance(window)
                    choice = report.rule_choice(*rule_b, tau)
                    item.update(tolerance=tau, choice=choice, picks_check_knee=choice == run_b["knee_levels"],
                                result=f"picks L={choice}")
                transfer.append(item)

    return {"seeds": seeds, "per_seed": per_seed, "models": models,
            "knee_agrees": len({s["knee_levels"] for s in per_seed}) == 1,
            "rule_agrees": {m: len({json.dumps(s["entropy_rule"].get(m)) for s in per_seed}) == 1 for m in MODALITIES},
            "transfer": transfer, "preset": runs[0].get("preset"), "settings_not_in_every_run": not_in_every}


def _interval(v: float, ci: Sequence[float] | None) -> str:
    return f"{v:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def markdown(result: Mapping[str, Any]) -> str:
    seeds = result["seeds"]
    lines = [f"# Figure 3 ({result['preset']}) at seeds {', '.join(map(str, seeds))}", "",
             "Each cell: the value at each seed [95 % interval], then the spread (largest minus smallest). "
             "**Bold** spread: the seeds' intervals share no point.", ""]
    benches = list(next(iter(result["models"].values()))["scores"])
    lines += ["| model | " + " | ".join(benches) + " |", "|---|" + "---|" * len(benches)]
    for name, m in result["models"].items():
        cells = []
        for b in benches:
            s = m["scores"].get(b)
            if not s:
                cells.append("–")
                continue
            per = " / ".join(_interval(v, c) for v, c in zip(s["values"], s["ci95"]))
            spread = f"{s['spread']:.1f}" if s["intervals_overlap"] else f"**{s['spread']:.1f}**"
            cells.append(f"{per}; {spread}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | knee | entropy rule (image, text) | τ interval for the knee (image; text) |",
              "|---|---|---|---|"]
    for s in result["per_seed"]:
        tol = s["tolerance_for_knee"]

        def window(m: str) -> str:
            w = tol.get(m)
            return "–" if w is None else f"[{w[0]:.3f}, {'∞' if w[1] is None else f'{w[1]:.3f}'})"

        lines.append(f"| {s['seed']} | {s['knee_levels'] if s['knee_levels'] is not None else 'none'} | "
                     f"{s['entropy_rule'].get('image')}, {s['entropy_rule'].get('text')} | "
                     f"{window('image')}; {window('text')} |")
    lines += ["", f"Knee the same at every seed: {'yes' if result['knee_agrees'] else 'no'}. The rule's choice the "
              "same: " + ", ".join(f"{m} {'yes' if v else 'no'}" for m, v in result["rule_agrees"].items()) + ".", "",
              "τ refitted on one seed, applied to another:", ""]
    for t in result["transfer"]:
        verdict = ""
        if "picks_check_knee" in t:
            verdict = (f" (τ = {t['tolerance']:.3f} bit; the checking seed's knee is L={t['check_knee']}: "
                       + ("met)" if t["picks_check_knee"] else "missed)"))
        lines.append(f"- {t['modality']}, fit on seed {t['fit_seed']}, checked on seed {t['check_seed']}: "
                     f"{t['result']}{verdict}")
    if result.get("settings_not_in_every_run"):
        lines += ["", "Settings that some runs' configs do not have (made before they existed): "
                  + ", ".join(f"`{k}`" for k in result["settings_not_in_every_run"]) + "."]
    return "\n".join(lines) + "\n"


def write(result: Mapping[str, Any], out: str) -> dict[str, str]:
    """``seeds.json`` and ``seeds.md`` in ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "seeds.json"), "md": os.path.join(out, "seeds.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(result))
    return paths


def main(argv: list[str]) -> None:
    import sys

    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdirs = [w for w in flags.FLAGS.workdirs if w]
    try:
        result = compare([load_run(w) for w in workdirs], workdirs)
    except SeedsError as e:
        print(f"seeds: error: {e}", file=sys.stderr)
        sys.exit(2)
    paths = write(result, flags.FLAGS.out)
    print(f"seeds: wrote {', '.join(paths.values())}", flush=True)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("workdirs", None, "Finished figure3 workdirs that differ only in --config.seed.")
    flags.DEFINE_string("out", None, "Directory for seeds.json and seeds.md.")
    flags.mark_flags_as_required(["workdirs", "out"])
    app.run(main)
