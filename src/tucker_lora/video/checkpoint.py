"""Crash-safe accelerate checkpoints: ``output_dir/checkpoint-<step>`` folders.

``save`` writes the accelerate state (adapter weights, optimiser, LR scheduler, RNG states, EMA, ...)
into a hidden sibling ``.checkpoint-<step>.partial``, syncs it to disk and renames it into place in one
atomic rename. Only then are checkpoints beyond ``total_limit`` deleted (oldest first). So a crash
while saving leaves every complete checkpoint as it was, and ``latest`` never picks a half-written one
(it only sees ``checkpoint-<step>`` names). Leftover ``.partial`` folders are removed by ``clean``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError
from ..io import replace_directory

__all__ = ["CHECKPOINT_PREFIX", "Checkpoints"]

CHECKPOINT_PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class Checkpoints:
    """The checkpoints of one run, in ``output_dir``."""

    def __init__(self, output_dir: str | os.PathLike, total_limit: Optional[int] = None) -> None:
        if total_limit is not None and total_limit < 1:
            raise InputError(f"--checkpoints_total_limit must be >= 1, got {total_limit}")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        """The global step a checkpoint folder was saved at (from its name ``checkpoint-<step>``)."""
        match = _NAME.match(Path(path).name)
        if match is None:
            raise InputError(f"'{path}' is not a checkpoint folder: its name must be {CHECKPOINT_PREFIX}<step>")
        return int(match.group(1))

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = [p for p in self.output_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=self.step_of)

    def latest(self) -> Optional[Path]:
        found = self.all()
        return found[-1] if found else None

    def resolve(self, spec: str) -> Optional[Path]:
        """``--resume_from_checkpoint``: ``"latest"`` (None when there is none yet), a path, or a name in output_dir."""
        if spec == "latest":
            return self.latest()
        path = Path(spec)
        if not path.exists() and not path.is_absolute() and (self.output_dir / path).exists():
            path = self.output_dir / path
        if not path.is_dir():
            raise InputError(
                f"checkpoint '{spec}' does not exist (--resume_from_checkpoint takes 'latest', a "
                f"{CHECKPOINT_PREFIX}<step> folder, or its name in --output_dir '{self.output_dir}')"
            )
        self.step_of(path)
        return path

    def clean(self) -> None:
        """Remove half-written checkpoints left by a crash (call on the main process only)."""
        if self.output_dir.is_dir():
            for p in self.output_dir.glob(f".{CHECKPOINT_PREFIX}*.partial"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, accelerator: Any, step: int, save_state: Optional[Callable[[str], Any]] = None) -> Path:
        """``accelerator.save_state`` into ``checkpoint-<step>``, atomically; then apply ``total_limit``.

        Call on every process (each saves its own RNG state); the main process renames and prunes.
        ``save_state`` replaces ``accelerator.save_state`` (a sharded run's adapter-only save,
        ``distributed.ShardedCheckpointing.save_state``).
        """
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        stage = self.output_dir / f".{CHECKPOINT_PREFIX}{step}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(stage, ignore_errors=True)
        accelerator.wait_for_everyone()
        (save_state or accelerator.save_state)(str(stage))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_directory(stage, final)
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> list[Path]:
        """Delete the oldest checkpoints beyond ``total_limit``; returns what was deleted."""
        if self.total_limit is None:
            return []
        old = self.all()[: -self.total_limit]
        for path in old:
            shutil.rmtree(path)
        return old
