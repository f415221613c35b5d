"""Training logs: ``<workdir>/metrics.jsonl``, TensorBoard event files and a tqdm bar on a terminal.

``metrics.jsonl`` holds one JSON object per logged step (``step`` = optimizer steps completed), written
and flushed as the step finishes, so a killed run leaves every line it logged. On resume the loop calls
:meth:`MetricsLogger.truncate_after` with the restored step: lines of steps the run will redo are
dropped, so the file of a resumed run reads exactly like the file of an uninterrupted one.

Evaluation results go to ``<workdir>/eval.jsonl`` (one object per evaluation) and to TensorBoard under
``eval/``. Only process 0 writes (multi-host runs log the global figures once).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn last line from a killed writer is ignored)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class MetricsLogger:
    """Writes metrics of one run; a no-op on processes other than 0.

    Args:
      workdir: the run's directory.
      total_steps: for the progress bar.
      initial_step: where the bar starts (a resumed run).
      progress_bar: show tqdm (only when stderr is a terminal, so log files stay clean).
      is_main: whether this process writes.
    """

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress_bar: bool = True,
                 is_main: bool = True):
        self.is_main = is_main
        self.path = os.path.join(workdir, METRICS_FILE)
        self.eval_path = os.path.join(workdir, EVAL_FILE)
        self._file = None
        self._tb = None
        self._bar = None
        if not is_main:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """Drops the lines of steps > ``step`` (they will be logged again by the resumed run)."""
        if not self.is_main:
            return
        keep = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        f = self._open()
        f.write(json.dumps(record) + "\n")
        f.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write_eval(self, step: int, results: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.eval_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **results}) + "\n")
        for k, v in results.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"eval/{k}", v, step)

    def print(self, message: str) -> None:
        """A line on stdout that does not tear the progress bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
