"""Per-step training metrics: the JSONL log and the peak memory so far.

Each line of the log is one optimiser step: ``step``, ``epoch``, ``loss`` (mean over the accumulated
micro-batches and the processes), ``lr``, ``videos_per_s`` (videos of the step over its wall time, all
processes), ``peak_memory_mb`` (CUDA's max allocated on a GPU, the process's peak RSS otherwise) and
``time`` (seconds since the run started).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from ..io import staged_directory

__all__ = ["TRAIN_LOG", "StepLog", "peak_memory_mb", "read_log"]

#: The step log's file name in a training run's output folder.
TRAIN_LOG = "train_log.jsonl"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far, MiB: ``torch.cuda.max_memory_allocated`` on a CUDA device, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL log (a torn last line, from a crash, is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class StepLog:
    """Appends one JSON object per line to ``path`` and flushes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the records after ``step`` (a resumed run redoes those steps), rewriting the file atomically."""
        if not self.path.is_file():
            return
        keep = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        with staged_directory(self.path.parent) as stage:
            (stage / self.path.name).write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
