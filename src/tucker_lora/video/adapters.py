"""The adapter a training run puts on the UNet: Tucker-LoRA, or peft LoRA at a matched parameter count.

Both go on the same layers: the UNet's ``tucker_lora.DEFAULT_TARGET_MODULES`` entry (UNet3D: temporal
Conv3d + resnet Conv2d; AnimateDiff: resnet Conv2d + motion-module Linear) or ``target_modules``.
The LoRA baseline gets the rank whose parameter count on those layers is closest to Tucker-LoRA's
(peft LoRA on a weight ``(O, I/g, *k)``: ``r * (I/g * prod(k) + O)``), and ``lora_alpha = alpha * r``
so that, as for Tucker-LoRA, ``alpha`` multiplies the update. ``--ranks auto`` gives every layer its own
ranks (``allocate_adapter_ranks``: ``tucker_lora.allocate_ranks`` on the same layers, within a parameter budget).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn

from ..config import TuckerLoraConfig
from ..errors import InputError
from ..layer import SUPPORTED_LAYERS
from ..ranks import RankAllocation, allocate_ranks, minimum_budget
from ..targets import default_target_names, minimal_suffixes
from ..tucker import resolve_ranks

__all__ = [
    "DEFAULT_RANKS",
    "METHODS",
    "AdapterPlan",
    "accept_input_keyword",
    "allocate_adapter_ranks",
    "lora_num_params",
    "matched_lora_rank",
    "plan_adapter",
    "target_layer_names",
    "tucker_num_params",
]

METHODS = ("tucker", "lora")
#: The paper's ranks (section 5): VC-5D (4, 4, 1, 1, 1) on the Conv3d UNet, AD-2D (4, 4, 0, 1, 1) on AnimateDiff.
DEFAULT_RANKS = {"unet3d": (4, 4, 1, 1, 1), "animatediff": (4, 4, 0, 1, 1)}
_REGEX_CHARS = set("\\^$*+?[](){}|")


def target_layer_names(unet: nn.Module, target_modules: Union[None, str, Sequence[str]] = None) -> list[str]:
    """Full names of the Linear / Conv layers to adapt.

    ``None``: the model's default targets; a string: a regex that must match a whole name (peft's rule);
    a list: names or dotted suffixes (peft's rule). Matching nothing is an ``InputError``.
    """
    if target_modules is None:
        names = default_target_names(unet) or []
    else:
        from peft.tuners.tuners_utils import check_target_module_exists

        probe = TuckerLoraConfig(target_modules=target_modules)
        names = [
            n
            for n, m in unet.named_modules()
            if n and isinstance(m, SUPPORTED_LAYERS) and check_target_module_exists(probe, n)
        ]
    if not names:
        what = "the default targets" if target_modules is None else f"target_modules {target_modules!r}"
        raise InputError(f"{what} match no Linear / Conv1d / Conv2d / Conv3d layer of the {type(unet).__name__}")
    return names


def parse_target_modules(values: Optional[Sequence[str]]) -> Union[None, str, list[str]]:
    """The command line's ``--target_modules``: one value with regex characters is a regex, else a name list."""
    if not values:
        return None
    values = [v for value in values for v in value.split(",") if v]
    if len(values) == 1 and _REGEX_CHARS & set(values[0]):
        re.compile(values[0])
        return values[0]
    return values


def _weights(unet: nn.Module, names: Sequence[str]) -> list[tuple[str, Any]]:
    modules = dict(unet.named_modules())
    return [(n, modules[n].weight) for n in names]


def tucker_num_params(
    unet: nn.Module,
    names: Sequence[str],
    ranks: Sequence[int],
    rank_pattern: Optional[Mapping[str, Sequence[int]]] = None,
) -> int:
    """Tucker-LoRA's trainable parameters on these layers (Proposition 1 per layer), at ``ranks`` or, for a layer
    in ``rank_pattern`` (keyed by escaped full layer name), at its own."""
    pattern = rank_pattern or {}
    layers = _weights(unet, names)
    return sum(resolve_ranks(pattern.get(re.escape(n), ranks), w.shape, n).num_params() for n, w in layers)


def lora_num_params(unet: nn.Module, names: Sequence[str], rank: int) -> int:
    """peft LoRA's trainable parameters at ``rank`` on these layers: ``r * (fan_in + O)`` per layer."""
    return rank * sum(w.numel() // w.shape[0] + w.shape[0] for _, w in _weights(unet, names))


def matched_lora_rank(unet: nn.Module, names: Sequence[str], ranks: Sequence[int]) -> int:
    """The LoRA rank (>= 1) whose parameter count on ``names`` is closest to Tucker-LoRA's at ``ranks``."""
    target = tucker_num_params(unet, names, ranks)
    per_rank = lora_num_params(unet, names, 1)
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))


def allocate_adapter_ranks(
    unet: nn.Module,
    budget: int,
    target_modules: Union[None, str, Sequence[str]] = None,
    proxy: str = "weight",
    batches: Optional[Iterable[Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    seed: int = 0,
) -> RankAllocation:
    """``tucker_lora.allocate_ranks`` on the layers ``plan_adapter`` adapts (``target_layer_names``): per-layer
    ranks whose Tucker-LoRA adapters hold at most ``budget`` trainable parameters in all.

    A budget below the smallest adapter on every layer (ranks (1, 1, 0, 0, 0)) is an ``InputError`` that names
    ``--rank_budget`` and that minimum.
    """
    names = target_layer_names(unet, target_modules)
    minimum = minimum_budget(tuple(w.shape) for _, w in _weights(unet, names))
    if budget < minimum:
        raise InputError(
            f"--rank_budget {budget} is below the smallest adapter on the {len(names)} target layers of the "
            f"{type(unet).__name__}: {minimum} trainable parameters (ranks (1, 1, 0, 0, 0) on every layer)"
        )
    return allocate_ranks(unet, budget, names, proxy=proxy, batches=batches, loss_fn=loss_fn, seed=seed)


@dataclass
class AdapterPlan:
    """The peft config to apply and what it amounts to (logged at the start of training)."""

    method: str
    config: Any
    layers: list[str]
    num_params: int
    tucker_num_params: int
    lora_rank: Optional[int] = None


def plan_adapter(
    method: str,
    unet: nn.Module,
    ranks: Sequence[int],
    alpha: float = 1.0,
    target_modules: Union[None, str, Sequence[str]] = None,
    init_weights: Union[bool, str] = True,
    core_init_scale: float = 0.0,
    lora_rank: Optional[int] = None,
    rank_pattern: Optional[Mapping[str, Sequence[int]]] = None,
) -> AdapterPlan:
    """The adapter config of a run: ``TuckerLoraConfig`` or (``method="lora"``) a matched ``peft.LoraConfig``.

    ``target_modules`` is resolved to the layer names here and written to the config as the shortest
    suffixes that select exactly them, so the saved ``adapter_config.json`` reloads onto the same layers.
    ``rank_pattern`` (Tucker-LoRA only; keyed by escaped full layer names, as ``allocate_adapter_ranks`` returns
    it) gives those layers their own ranks; ``ranks`` is the rest's.
    """
    if method not in METHODS:
        raise InputError(f"unknown adapter method {method!r}: expected one of {', '.join(METHODS)}")
    if rank_pattern is not None and method != "tucker":
        raise InputError("per-layer ranks (--ranks auto) are for --method tucker")
    names = target_layer_names(unet, target_modules)
    suffixes = minimal_suffixes((n for n, _ in unet.named_modules()), names)
    pattern = {k: tuple(v) for k, v in (rank_pattern or {}).items()}
    tucker_params = tucker_num_params(unet, names, ranks, pattern)
    if method == "tucker":
        config = TuckerLoraConfig(
            ranks=tuple(ranks),
            alpha=alpha,
            target_modules=suffixes,
            init_weights=init_weights,
            core_init_scale=core_init_scale,
            rank_pattern=pattern,
        )
        return AdapterPlan(method, config, names, tucker_params, tucker_params)
    from peft import LoraConfig

    rank = lora_rank or matched_lora_rank(unet, names, ranks)
    config = LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules=suffixes, init_lora_weights=True)
    return AdapterPlan(method, config, names, lora_num_params(unet, names, rank), tucker_params, rank)


def _input_to_positional(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    if not args and "input" in kwargs:
        kwargs = dict(kwargs)
        return (kwargs.pop("input"),), kwargs
    return None


def accept_input_keyword(model: nn.Module) -> int:
    """Let peft LoRA layers be called as ``layer(input=x)``, as AnimateDiff's motion modules call them.

    peft's ``lora.Linear.forward(x, ...)`` has no ``input`` parameter (the README's compatibility table);
    a forward pre-hook moves the keyword to the first positional argument. Returns how many layers got it.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(_input_to_positional, with_kwargs=True)
            count += 1
    return count
