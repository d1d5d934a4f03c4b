"""Run metrics: JSONL (one record per line, flushed each write) and TensorBoard event files, rank 0 only.

On resume, :meth:`MetricsWriter.truncate_after` drops records newer than the checkpoint being resumed (they were
written after it, by the killed run) by rewriting the file atomically, so the log never holds two histories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastnft.atomic import atomic_write

__all__ = ["MetricsWriter", "read_jsonl"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a kill is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsWriter:
    """Writes scalar metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard events under ``<run_dir>/tb``.

    Args:
        run_dir: run folder (created).
        enabled: False on non-zero ranks (nothing is written).
        tensorboard: also write TensorBoard events.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = None

    def truncate_after(self, iteration: int) -> None:
        """Keep only records with ``iteration <= iteration`` (atomic rewrite)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("iteration", -1) <= iteration]
        atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in keep), text=True)

    def log(self, iteration: int, scalars: dict[str, float], kind: str = "train") -> None:
        """Append one record ``{"iteration", "kind", **scalars}`` and mirror finite scalars to TensorBoard."""
        if not self.enabled:
            return
        rec = {"iteration": iteration, "kind": kind}
        rec.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), iteration)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
