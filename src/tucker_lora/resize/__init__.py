"""``resize_adapter``: re-compress a trained Tucker-LoRA adapter in place, to rank caps or an energy share.

Per layer (``tucker_lora.lowrank.truncate_tucker``): QR of the trained factors (no longer orthonormal), HOOI of
the small core, the factors rotated into the kept subspaces. The adapter's config follows (``rank_pattern`` with
each layer's new ranks), so ``save_pretrained`` / ``PeftModel.from_pretrained`` round-trip the resized adapter.
``python -m tucker_lora.resize ADAPTER_DIR OUT --energy 0.99`` does it from the command line.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..adapted import adapted_layers, tucker_config_of
from ..layer import TuckerLoraLayer, factor_attr
from ..lowrank import truncate_tucker
from ..tucker import MODES, ModeRanks, validate_ranks

__all__ = ["check_energy", "resize_adapter"]


def check_energy(energy: object) -> None:
    if energy is None:
        return
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (math.isfinite(energy)):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy is the share of each layer's update energy to keep, in (0, 1]; got {energy!r}")


def _check_caps(ranks: object) -> Optional[tuple[int, ...]]:
    if ranks is None:
        return None
    caps = validate_ranks(ranks, "ranks")
    for mode in ("o", "i"):
        if caps[MODES.index(mode)] == 0:
            raise ValueError(f"ranks: r_{mode} = 0 would leave the adapter empty; caps must be >= 1")
    return caps


def _layer_caps(caps: Optional[Sequence[int]], mr: ModeRanks, name: str) -> list[int]:
    """This layer's caps, one per mode of its weight: pinned modes stay at 1; a cap of 0 cannot pin a trained mode."""
    if caps is None:
        return list(mr.ranks)
    out = []
    for mode, rank, pinned in zip(mr.modes, mr.ranks, mr.pinned, strict=True):
        cap = caps[MODES.index(mode)]
        if not pinned and cap == 0:
            raise ValueError(
                f"layer '{name}': ranks r_{mode} = 0 would pin a trained mode (its factor is not the centre tap); "
                f"caps on trained modes must be >= 1"
            )
        out.append(1 if pinned else min(cap, rank))
    return out


def _five_ranks(mr: ModeRanks, shape: Sequence[int]) -> tuple[int, ...]:
    """The config's ``(r_o, r_i, r_t, r_h, r_w)`` of a layer with core ``shape``: 0 on pinned modes, 1 where absent."""
    by_mode = {m: (0 if p else int(r)) for m, p, r in zip(mr.modes, mr.pinned, shape, strict=True)}
    return tuple(by_mode.get(m, 1) for m in MODES)


@torch.no_grad()
def _replace(layer: TuckerLoraLayer, adapter_name: str, core: torch.Tensor, factors: list[torch.Tensor]) -> None:
    """Re-create the adapter's parameters at the new ranks (``update_layer``) and set them; dtype, device,
    dropout, frozen modes and ``requires_grad`` flags are kept."""
    old = layer.tucker_lora_core[adapter_name]
    mr = layer.mode_ranks[adapter_name]
    flags = {(attr, a): p.requires_grad for attr in layer.adapter_layer_names for a, p in getattr(layer, attr).items()}
    dropout = layer.tucker_lora_dropout[adapter_name]
    frozen = layer.frozen_peft_weight_names.get(adapter_name, ())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # update_layer's warnings were given when the adapter was created
        layer.update_layer(
            adapter_name,
            ranks=_five_ranks(mr, core.shape),
            alpha=layer.alpha[adapter_name],
            dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            init_weights=True,
            forward_mode=layer.forward_mode,
            freeze_modes=tuple(a.removeprefix(factor_attr("")) for a in frozen),
        )
    new = layer.mode_ranks[adapter_name]
    layer.tucker_lora_core[adapter_name].data = core.to(device=old.device, dtype=old.dtype)
    for n in new.trainable_modes:
        param = getattr(layer, factor_attr(new.modes[n]))[adapter_name]
        param.data = factors[n].to(device=old.device, dtype=old.dtype)
    for attr in layer.adapter_layer_names:
        for a, p in getattr(layer, attr).items():
            p.requires_grad_(flags.get((attr, a), p.requires_grad))


def resize_adapter(
    model: nn.Module,
    ranks: Optional[Sequence[int]] = None,
    energy: Optional[float] = None,
    adapter_name: str = "default",
) -> dict[str, float]:
    """Re-compress the Tucker-LoRA adapter ``adapter_name`` of ``model`` in place.

    Args:
        ranks: caps ``(r_o, r_i, r_t, r_h, r_w)``: each layer keeps, per mode, the smaller of its rank and the cap
            (entries for modes a layer lacks are ignored; a pinned mode stays pinned).
        energy: in (0, 1]: per layer the ranks (within the caps) with the fewest parameters whose truncation
            keeps at least that share of the update's Frobenius energy; 1.0 drops only directions that hold
            nothing (up to rounding).

    Layers whose ranks do not change are left exactly as they are. Returns ``{layer path: relative error}``,
    ``||dW_new - dW_old|| / ||dW_old||`` (0 for layers left alone). The config's ``rank_pattern`` gets every
    layer's new ranks (anchored full paths), so the resized adapter saves and reloads with peft.
    """
    caps = _check_caps(ranks)
    check_energy(energy)
    if caps is None and energy is None:
        raise ValueError("resize_adapter needs ranks (caps per mode) or energy (a share in (0, 1])")
    layers = adapted_layers(model, adapter_name)
    plans = {}
    for name, layer in layers:  # every layer is checked and planned before any is changed
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"layer '{name}': adapter '{adapter_name}' is merged into the weight; unmerge it first")
        core = layer.tucker_lora_core[adapter_name]
        if core.is_meta:
            raise ValueError(f"layer '{name}': adapter '{adapter_name}' is on the meta device (never loaded)")
        mr = layer.mode_ranks[adapter_name]
        plans[name] = truncate_tucker(core, layer.factors(adapter_name), mr.pinned, _layer_caps(caps, mr, name), energy)
    errors = {}
    pattern = {}
    for name, layer in layers:
        plan = plans[name]
        errors[name] = 0.0 if plan is None else plan[2]
        if plan is not None:
            _replace(layer, adapter_name, plan[0], plan[1])
        mr = layer.mode_ranks[adapter_name]
        pattern[f"^{re.escape(name)}"] = _five_ranks(mr, mr.ranks)
    config = tucker_config_of(model, adapter_name)
    if config is not None:
        config.rank_pattern = pattern
    return errors
