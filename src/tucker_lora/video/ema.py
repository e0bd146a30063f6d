"""Exponential moving average of the adapter parameters (the paper's EMA, tau = 0.999).

After each optimiser step: ``shadow <- d * shadow + (1 - d) * param`` with
``d = min(tau, (1 + n) / (10 + n))`` for the n-th update (the warm-up of diffusers' ``EMAModel``: early
on the average follows the weights, later it settles at ``tau``; ``warmup=False`` uses ``tau`` from the
start). The shadow is float32 whatever the parameters' dtype. ``swapped_in()`` puts the averaged
weights into the model for validation or saving and restores the trained ones afterwards. The state
(``state_dict`` / ``load_state_dict``) goes into accelerate checkpoints with
``accelerator.register_for_checkpointing``.

Under FSDP2 the parameters are sharded ``DTensor``s; the shadow then holds the same shards (the update is
elementwise, so each rank averages its own slice: no communication, 1/N of the memory). ``state_dict``
all-gathers full tensors (every rank calls it, as accelerate's ``save_state`` does), so the checkpoint is
the same as a single-process run's, and ``load_state_dict`` cuts full tensors into the parameters' shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .distributed import full_tensor, local_tensor, shard_like

__all__ = ["AdapterEMA"]


class AdapterEMA:
    """EMA of a fixed list of parameters (the trainable adapter parameters of a model)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = list(parameters)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self) -> None:
        """Fold the current parameters into the average (call after each optimiser step)."""
        d = self.current_decay()
        current = [local_tensor(p.detach()).float() for p in self.params]
        torch._foreach_lerp_([local_tensor(s) for s in self.shadow], current, 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the averaged values; the trained values come back after."""
        local = [local_tensor(p.detach()) for p in self.params]
        backup = [p.clone() for p in local]
        with torch.no_grad():
            torch._foreach_copy_(local, [local_tensor(s) for s in self.shadow])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(local, backup)

    def state_dict(self) -> dict[str, Any]:
        """Full tensors (all-gathered from shards under FSDP: call on every rank)."""
        shadow = [full_tensor(s) for s in self.shadow]
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.params) or any(s.shape != p.shape for s, p in zip(shadow, self.params, strict=True)):
            raise ValueError("EMA state does not fit the model's adapter parameters (different ranks or targets?)")
        self.decay, self.warmup, self.num_updates = (
            float(state["decay"]),
            bool(state["warmup"]),
            int(state["num_updates"]),
        )
        self.shadow = [shard_like(s.detach().float().clone(), p) for s, p in zip(shadow, self.params, strict=True)]
