"""Efficiency under the paper's protocol: what the training log says, trainable parameters, time-to-target.

- From the training script's ``train_log.jsonl`` (one record per step: ``videos_per_s``, ``peak_memory_mb``,
  ``time`` in seconds since the run started; see ``tucker_lora.video.metrics``):
  peak memory ``max_s peak_memory_mb_s``; throughput over the steps ``S / sum_s (1 / videos_per_s_s)``
  (the harmonic mean, = videos / step time when every step has the same number of videos); wall clock, the
  run's total time. A resumed run restarts its clock: the log is cut into segments where ``time`` drops and
  their lengths are added, so times count from the start of the first segment.
- Trainable parameters from an adapter checkpoint (``adapter_model.safetensors``): the entries of its tensors,
  less the Tucker factors of modes the adapter config freezes (``freeze_modes``: stored, not trained).
- Time-to-target: the first wall-clock time ``t`` of a log of ``(t, FVD)`` pairs with ``FVD <= threshold``,
  and the time one run saves over another to reach it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError
from ..io import CONFIG_NAME, WEIGHTS_NAME, check_safetensors
from ..layer import factor_attr
from ..video.metrics import TRAIN_LOG, read_log

__all__ = [
    "read_fvd_log",
    "read_train_log",
    "step_time",
    "time_saved",
    "time_to_target",
    "trainable_parameters",
    "training_efficiency",
    "wall_clock",
]


def _records(path: str | os.PathLike, keys: Sequence[str], what: str) -> list[dict[str, Any]]:
    """The records of a JSONL log; each must have ``keys`` (the error names the file and the record)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} '{path}' does not exist")
    records = read_log(path)
    if not records:
        raise InputError(f"{what} '{path}' has no records")
    for i, r in enumerate(records, 1):
        missing = [k for k in keys if k not in r]
        if missing:
            raise InputError(f"{what} '{path}': record {i} has no {', '.join(missing)}")
    return records


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The step records of a training log (``path`` is the JSONL file or the training output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAIN_LOG
    return _records(path, ("step", "time", "videos_per_s", "peak_memory_mb"), "training log")


def wall_clock(records: Sequence[dict[str, Any]]) -> list[float]:
    """Seconds since the start of the run at each record, summed over the segments of a resumed run."""
    out, offset, last = [], 0.0, 0.0
    for r in records:
        t = float(r["time"])
        if t < last:  # a resumed process restarted its clock
            offset += last
        out.append(offset + t)
        last = t
    return out


def training_efficiency(path: str | os.PathLike) -> dict[str, Any]:
    """``steps``, ``wall_clock_s``, ``videos_per_s`` (harmonic mean over steps) and ``peak_memory_mb`` of a run."""
    records = read_train_log(path)
    rates = [float(r["videos_per_s"]) for r in records]
    return {
        "steps": int(records[-1]["step"]),
        "wall_clock_s": wall_clock(records)[-1],
        "videos_per_s": len(rates) / sum(1.0 / v for v in rates) if all(v > 0 for v in rates) else 0.0,
        "peak_memory_mb": max(float(r["peak_memory_mb"]) for r in records),
    }


def step_time(path: str | os.PathLike, step: int) -> float:
    """The wall-clock time (``wall_clock``) at which training step ``step`` finished."""
    records = read_train_log(path)
    for r, t in zip(records, wall_clock(records), strict=True):
        if int(r["step"]) == step:
            return t
    raise InputError(
        f"training log '{path}' has no step {step} (it has steps {records[0]['step']}..{records[-1]['step']})"
    )


def trainable_parameters(adapter: str | os.PathLike) -> dict[str, int]:
    """``{"trainable_parameters", "stored_parameters"}`` of an adapter folder (or its ``.safetensors`` file)."""
    adapter = Path(adapter)
    weights = adapter / WEIGHTS_NAME if adapter.is_dir() else adapter
    if not weights.is_file():
        raise InputError(f"adapter checkpoint '{weights}' does not exist (expected a peft save_pretrained folder)")
    header = check_safetensors(weights)
    config_path = weights.parent / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    frozen = tuple(f".{factor_attr(m)}" for m in config.get("freeze_modes") or ())
    stored = trainable = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = math.prod(entry["shape"])
        stored += n
        trainable += 0 if frozen and name.endswith(frozen) else n
    return {"trainable_parameters": trainable, "stored_parameters": stored}


def read_fvd_log(path: str | os.PathLike) -> list[tuple[float, float]]:
    """The ``(time, fvd)`` pairs of a JSONL log with ``time`` (seconds of training) and ``fvd`` per line."""
    return [(float(r["time"]), float(r["fvd"])) for r in _records(path, ("time", "fvd"), "FVD log")]


def time_to_target(pairs: Sequence[tuple[float, float]], threshold: float) -> Optional[float]:
    """``min {t : FVD(t) <= threshold}`` over the ``(t, FVD)`` pairs (in any order); None if never reached."""
    reached = [t for t, fvd in pairs if fvd <= threshold]
    return min(reached) if reached else None


def time_saved(
    pairs: Sequence[tuple[float, float]], baseline: Sequence[tuple[float, float]], threshold: float
) -> dict[str, Optional[float]]:
    """Time-to-target of a run and a baseline, ``time_saved_s = t_baseline - t_run`` and ``speedup = t_baseline
    / t_run`` (None where a run never reaches the threshold)."""
    t, t_base = time_to_target(pairs, threshold), time_to_target(baseline, threshold)
    both = t is not None and t_base is not None
    return {
        "target_fvd": threshold,
        "time_s": t,
        "baseline_time_s": t_base,
        "time_saved_s": t_base - t if both else None,
        "speedup": t_base / t if both and t > 0 else None,
    }
