"""Per-run metrics: one JSON object per line in RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text
from ..run_folder import RunFolder


class MetricsLogger:
    """Appends {"step": N, name: value, ...} lines to metrics.jsonl (and TensorBoard scalars when enabled)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = RunFolder(run_dir).metrics_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(RunFolder(run_dir).tensorboard_folder))

    def log(self, step: int, metrics: dict) -> None:
        """Write one record for `step`."""
        record = {"step": step, **{name: _plain(value) for name, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that is being resumed from that step)."""
    path = RunFolder(run_dir).metrics_file
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the crash that stopped the run
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = RunFolder(run_dir).metrics_file
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value
