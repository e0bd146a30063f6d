"""``TuckerLoraLayer``: one adapter layer for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (and their subclasses).

State per adapter ``a``: the core ``G`` (``tucker_lora_core[a]``), one factor ``U_n`` per trained mode
(``tucker_lora_U_<n>[a]``, shape (dim_n, r_n)), ``alpha[a]`` and the resolved ranks. A kernel mode
configured with rank 0 is pinned: its factor is the constant centre-tap one-hot (not stored, not
trained) and the core has size 1 there.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .functional import factored_delta, merged_forward
from .tucker import MODES, ModeRanks, centre_tap, orthonormal, reconstruct, resolve_ranks

logger = logging.getLogger("tucker_lora")

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CLIPPING_REPORTED: set[tuple[str, ...]] = set()


def factor_attr(mode: str) -> str:
    """Attribute holding the factors of ``mode``: ``tucker_lora_U_o`` ... ``tucker_lora_U_w``."""
    return f"tucker_lora_U_{mode}"


def is_plain(module: nn.Module) -> bool:
    """True for a torch Linear/ConvNd whose forward (and conv op) is torch's own, so the factored path applies."""
    for cls in SUPPORTED_LAYERS:
        if isinstance(module, cls):
            same_forward = type(module).forward is cls.forward
            same_conv = cls is nn.Linear or type(module)._conv_forward is cls._conv_forward
            return same_forward and same_conv
    return False


def _first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The input tensor of a Linear/Conv call, positional or ``input=`` keyword."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    raise TypeError("adapted layer called without an input tensor (positional or input=)")


class TuckerLoraLayer(nn.Module, BaseTunerLayer):
    """Wraps a frozen base layer and adds ``alpha * dW`` of each active Tucker adapter."""

    adapter_layer_names = ("tucker_lora_core",) + tuple(factor_attr(m) for m in MODES)
    other_param_names = ("mode_ranks", "alpha", "tucker_lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            names = ", ".join(c.__name__ for c in SUPPORTED_LAYERS)
            raise TypeError(
                f"layer '{layer_name}' is a {type(base_layer).__name__}; Tucker-LoRA adapts {names} (and subclasses)"
            )
        self.base_layer = base_layer
        self.layer_name = layer_name or type(base_layer).__name__
        self.tucker_lora_core = nn.ParameterDict()
        for mode in MODES:
            setattr(self, factor_attr(mode), nn.ParameterDict())
        self.tucker_lora_dropout = nn.ModuleDict()
        self.mode_ranks: dict[str, ModeRanks] = {}
        self.alpha: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        ranks: tuple[int, ...] = (4, 4, 1, 1, 1),
        alpha: float = 1.0,
        dropout: float = 0.0,
        init_weights: bool | str = True,
        core_init_scale: float = 0.0,
    ) -> None:
        """Create (or re-create) the core and factors of ``adapter_name`` for this layer's weight."""
        weight = self.get_base_layer().weight
        mr = resolve_ranks(ranks, weight.shape, self.layer_name)
        if mr.clipped:
            key = (type(self.get_base_layer()).__name__,) + mr.clipped
            if key not in _CLIPPING_REPORTED:
                _CLIPPING_REPORTED.add(key)
                logger.info(
                    "ranks clipped to the mode sizes on %s (e.g. '%s'): %s",
                    key[0],
                    self.layer_name,
                    ", ".join(mr.clipped),
                )
        if dropout > 0 and not is_plain(self.get_base_layer()):
            warnings.warn(
                f"layer '{self.layer_name}' ({type(self.get_base_layer()).__name__}) overrides forward: its adapter "
                "runs merged into the weight, so dropout on the adapter input is not applied there",
                stacklevel=2,
            )
        self.mode_ranks[adapter_name] = mr
        self.alpha[adapter_name] = float(alpha)
        self.tucker_lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.tucker_lora_core[adapter_name] = nn.Parameter(torch.zeros(mr.ranks))
        for n in mr.trainable_modes:
            getattr(self, factor_attr(mr.modes[n]))[adapter_name] = nn.Parameter(torch.zeros(mr.dims[n], mr.ranks[n]))
        self.reset_adapter_parameters(adapter_name, init_weights, core_init_scale)
        for attr in self.adapter_layer_names:  # onto the base weight's device (empty-weight loading stays on meta)
            params = getattr(self, attr)
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name] = params[adapter_name].to(weight.device)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_adapter_parameters(
        self, adapter_name: str, init_weights: bool | str = True, core_init_scale: float = 0.0
    ) -> None:
        """Orthonormal factors; core 0 (``True``), ``core_init_scale * N(0,1)`` or ``0.1 * N(0,1)`` (``False``)."""
        mr = self.mode_ranks[adapter_name]
        for n in mr.trainable_modes:
            U = getattr(self, factor_attr(mr.modes[n]))[adapter_name]
            U.copy_(orthonormal(mr.dims[n], mr.ranks[n]))
        core = self.tucker_lora_core[adapter_name]
        if init_weights is False:
            core.normal_(0.0, 0.1)
        elif core_init_scale > 0:
            core.normal_(0.0, core_init_scale)
        else:
            core.zero_()

    def factors(self, adapter_name: str) -> list[torch.Tensor]:
        """``[U_o, U_i, (U_t, U_h,) U_w]`` of the adapter, pinned modes as their centre-tap one-hot."""
        mr = self.mode_ranks[adapter_name]
        core = self.tucker_lora_core[adapter_name]
        out = []
        for mode, dim, pinned in zip(mr.modes, mr.dims, mr.pinned, strict=True):
            if pinned:
                out.append(centre_tap(dim).to(device=core.device, dtype=core.dtype))
            else:
                out.append(getattr(self, factor_attr(mode))[adapter_name])
        return out

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``alpha * dW = alpha * G x_1 U_o ... x_N U_N``, in the base weight's shape and dtype."""
        weight = self.get_base_layer().weight
        delta = self.alpha[adapter_name] * reconstruct(self.tucker_lora_core[adapter_name], self.factors(adapter_name))
        return delta.to(dtype=weight.dtype, device=weight.device)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.tucker_lora_core]

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``alpha * dW`` of each adapter into the base weight (``safe_merge`` refuses non-finite results)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.tucker_lora_core:
                continue
            merged = weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"layer '{self.layer_name}': merging adapter '{name}' gives NaN/inf weights; nothing was merged"
                )
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.tucker_lora_core:
                weight.data -= self.get_delta_weight(name)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``base(x)`` plus each active adapter's ``alpha * dW * x``; keyword calls (``input=x``) included."""
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(*args, **kwargs)
        active = self._active()
        if self.merged or not active:
            return base(*args, **kwargs)
        dropout_on = self.training and any(isinstance(self.tucker_lora_dropout[a], nn.Dropout) for a in active)
        if not is_plain(base) or (getattr(base, "groups", 1) > 1 and not dropout_on):
            weight = base.weight + sum(self.get_delta_weight(a) for a in active)
            return merged_forward(base, weight, args, kwargs)
        x = _first_input(args, kwargs)
        result = base(*args, **kwargs)
        for a in active:
            result = result + self._delta_output(a, x).to(result.dtype)
        return result

    def _delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``alpha * dW * dropout(x)`` for one adapter on a plain layer."""
        base = self.get_base_layer()
        core = self.tucker_lora_core[adapter_name]
        x = self.tucker_lora_dropout[adapter_name](x.to(core.dtype))
        if getattr(base, "groups", 1) > 1:
            delta = self.alpha[adapter_name] * reconstruct(core, self.factors(adapter_name))
            return base._conv_forward(x, delta, None)
        conv = None if isinstance(base, nn.Linear) else (lambda inp, w: base._conv_forward(inp, w, None))
        return self.alpha[adapter_name] * factored_delta(x, core, self.factors(adapter_name), conv)

    def __repr__(self) -> str:
        return "tucker_lora." + super().__repr__()
