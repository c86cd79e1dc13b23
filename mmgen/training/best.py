"""RUN_DIR/best/: the model of the evaluation where a named metric was best (`train.best_metric`).

Small real datasets overfit: the last step is rarely the best one. At each evaluation the Trainer hands its metrics
here (main process); when `best_metric` improved, the model that final/ would hold (the EMA one when EMA is on) is
written to best/ atomically, with best.json (metric, value, step) inside. A resumed run reads best.json back, so
best/ only ever moves to a better evaluation.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch

from ..io import atomic_folder, read_json, write_json
from ..run_folder import BEST_RECORD, RunFolder


class BestModel:
    """Keeps RUN_DIR/best/ at the best evaluation of `metric` (None: off); `mode` min or max (None: min for a name
    containing "loss", else max); `save_fn(model, folder)` writes a model folder."""

    def __init__(self, run: RunFolder, metric: str | None, mode: str | None, save_fn: Callable):
        self.run, self.metric, self.save_fn = run, metric, save_fn
        self.mode = mode or ("min" if metric is not None and "loss" in metric else "max")
        self.value: float | None = None
        self.warned = False
        record = run.best / BEST_RECORD
        if metric is not None and record.is_file():  # a resumed run: only a better evaluation replaces best/
            stored = read_json(record)
            if stored.get("metric") == metric:
                self.value = stored.get("value")

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far (a non-finite value never does)."""
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def consider(self, metrics: dict, step: int, model: torch.nn.Module,
                 write: Callable[[str], None] = print) -> Path | None:
        """After an evaluation: write best/ when the metric improved; the folder written, else None. A metric the
        evaluation does not report is named once on stderr (training goes on)."""
        if self.metric is None:
            return None
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)):
            if not self.warned:
                known = ", ".join(name for name, number in metrics.items() if isinstance(number, (int, float)))
                print(f"warning: train.best_metric={self.metric} is not among this run's evaluation metrics "
                      f"({known}); best/ is not written", file=sys.stderr)
                self.warned = True
            return None
        if not self.improves(float(value)):
            return None
        try:
            with atomic_folder(self.run.best) as staging:
                self.save_fn(model, staging)
                write_json(staging / BEST_RECORD, {"metric": self.metric, "value": float(value), "step": step,
                                                   "mode": self.mode})
        except OSError as error:  # e.g. a full disk: the previous best/ stays, training goes on
            print(f"warning: could not write {self.run.best} ({error.strerror or error}); the previous best/ stays",
                  file=sys.stderr)
            return None
        self.value = float(value)
        write(f"best {self.metric} {value:.4f} at step {step}: {self.run.best}")
        return self.run.best
