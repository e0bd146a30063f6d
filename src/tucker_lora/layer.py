"""``TuckerLoraLayer``: one adapter layer for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (and their subclasses).

State per adapter ``a``: the core ``G`` (``tucker_lora_core[a]``), one factor ``U_n`` per trained mode
(``tucker_lora_U_<n>[a]``, shape (dim_n, r_n)), the configured ``tucker_lora_alpha[a]``, the scale the
update is applied with, ``alpha[a] = s * tucker_lora_alpha[a]`` (``s = 1`` unless ``set_scale`` /
``scale_layer`` say otherwise, as peft LoRA's ``scaling``), and the resolved ranks. A kernel mode
configured with rank 0 is pinned: its factor is the constant centre-tap one-hot (not stored, not
trained) and the core has size 1 there. Each call takes one of the compute paths described in
docs/design.md ("Compute paths", "The cost model of auto").

The adapter tensors are created in the base weight's floating dtype (initialised in float32 first), as
peft LoRA's are; peft then upcasts float16 / bfloat16 adapters to float32 unless it is called with
``autocast_adapter_dtype=False``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import decomposition
from .decomposition import DECOMPOSITIONS
from .functional import (
    ConvGeometry,
    adapted_conv,
    choose_path,
    factored_conv,
    factored_linear,
    module_forward,
)
from .tucker import MODES, ModeRanks, centre_tap, orthonormal, reconstruct, resolve_ranks

logger = logging.getLogger("tucker_lora")

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CLIPPING_REPORTED: set[tuple[str, ...]] = set()
_INIT_REPORTED: set[tuple[str, str]] = set()


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
    """The input tensor of a Linear/Conv call: positional, ``input=``, or the first tensor keyword."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("adapted layer called without an input tensor")


def _entry(params: nn.ParameterDict, name: str) -> torch.Tensor:
    """``params[name]`` read from the dict the ParameterDict keeps its entries in (where FSDP,
    ``torch.func.functional_call`` and ``load_state_dict(assign=True)`` put their tensors too), skipping the
    module attribute lookup of ``params[name]``: the per-call path reads one per mode on every call."""
    entry = params._parameters.get(name)
    return params[name] if entry is None else entry


def features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear, ``(in_channels, out_channels)`` of a conv (all groups)."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    return base_layer.in_channels, base_layer.out_channels


def _check_weight(weight: object, layer_name: str) -> None:
    """The base weight must be a plain floating-point tensor (quantised or lazy weights are refused by name)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"layer '{layer_name}': weight is a {type(weight).__name__}, not a tensor")
    if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point():
        raise TypeError(
            f"layer '{layer_name}': weight is a {type(weight).__name__} of dtype {weight.dtype}; Tucker-LoRA needs a "
            "plain floating-point weight (dequantise the layer, or leave it out of target_modules)"
        )


class TuckerLoraLayer(nn.Module, BaseTunerLayer):
    """Wraps a frozen base layer and adds ``alpha * dW`` of each active Tucker adapter."""

    adapter_layer_names = ("tucker_lora_core",) + tuple(factor_attr(m) for m in MODES)
    other_param_names = ("mode_ranks", "alpha", "tucker_lora_alpha", "tucker_lora_dropout", "_factor_sources")

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            names = ", ".join(c.__name__ for c in SUPPORTED_LAYERS)
            raise TypeError(
                f"layer '{layer_name}' is a {type(base_layer).__name__}; Tucker-LoRA adapts {names} (and subclasses)"
            )
        self.base_layer = base_layer
        self.layer_name = layer_name or type(base_layer).__name__
        self.in_features, self.out_features = features(base_layer)
        self._plain = is_plain(base_layer)
        plain_conv = self._plain and not isinstance(base_layer, nn.Linear)
        self._geometry = ConvGeometry.of(base_layer) if plain_conv else None
        self.forward_mode = "auto"
        self.tucker_lora_core = nn.ParameterDict()
        for mode in MODES:
            setattr(self, factor_attr(mode), nn.ParameterDict())
        # per adapter, what ``factors`` reads for each mode: the mode's ParameterDict, or None for a pinned mode
        # (a plain attribute, so the per-call path does no module attribute lookups to find them)
        self._factor_sources: dict[str, list[tuple[Optional[nn.ParameterDict], int]]] = {}
        self.tucker_lora_dropout = nn.ModuleDict()
        self.mode_ranks: dict[str, ModeRanks] = {}
        self._centre_taps: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.tucker_lora_alpha: dict[str, float] = {}  # as configured
        self.alpha: dict[str, float] = {}  # as applied: scale * tucker_lora_alpha
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
        forward_mode: str = "auto",
        freeze_modes: tuple[str, ...] = (),
    ) -> None:
        """Create (or re-create) the core and factors of ``adapter_name`` for this layer's weight."""
        weight = getattr(self.get_base_layer(), "weight", None)
        _check_weight(weight, self.layer_name)
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
        if dropout > 0 and not self._plain:
            warnings.warn(
                f"layer '{self.layer_name}' ({type(self.get_base_layer()).__name__}) overrides forward: its adapter "
                "runs merged into the weight, so dropout on the adapter input is not applied there",
                stacklevel=2,
            )
        self.mode_ranks[adapter_name] = mr
        self._factor_sources[adapter_name] = [
            (None if pinned else getattr(self, factor_attr(mode)), dim)
            for mode, dim, pinned in zip(mr.modes, mr.dims, mr.pinned, strict=True)
        ]
        self.tucker_lora_alpha[adapter_name] = self.alpha[adapter_name] = float(alpha)
        self.tucker_lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.tucker_lora_core[adapter_name] = nn.Parameter(torch.zeros(mr.ranks))
        for n in mr.trainable_modes:
            getattr(self, factor_attr(mr.modes[n]))[adapter_name] = nn.Parameter(torch.zeros(mr.dims[n], mr.ranks[n]))
        self.reset_adapter_parameters(adapter_name, init_weights, core_init_scale)
        self.forward_mode = forward_mode
        frozen = tuple(factor_attr(m) for m, p in zip(mr.modes, mr.pinned, strict=True) if m in freeze_modes and not p)
        self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: frozen}
        # onto the base weight's device and floating dtype (empty-weight loading stays on meta)
        for attr in self.adapter_layer_names:
            params = getattr(self, attr)
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name] = params[adapter_name].to(weight.device, dtype=weight.dtype)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_adapter_parameters(
        self, adapter_name: str, init_weights: bool | str = True, core_init_scale: float = 0.0
    ) -> None:
        """Orthonormal factors (from the base weight's HOSVD / HOOI for ``"hosvd"`` / ``"hooi"``);
        core 0 (``True``, ``"hosvd"``, ``"hooi"``), ``core_init_scale * N(0,1)`` or ``0.1 * N(0,1)`` (``False``)."""
        mr = self.mode_ranks[adapter_name]
        for n in mr.trainable_modes:
            U = getattr(self, factor_attr(mr.modes[n]))[adapter_name]
            U.copy_(orthonormal(mr.dims[n], mr.ranks[n]))
        if init_weights in DECOMPOSITIONS:
            self.init_from_weight(adapter_name, init_weights)
        core = self.tucker_lora_core[adapter_name]
        if init_weights is False:
            core.normal_(0.0, 0.1)
        elif core_init_scale > 0:
            core.normal_(0.0, core_init_scale)
        else:
            core.zero_()

    @torch.no_grad()
    def init_from_weight(self, adapter_name: str, method: str = "hosvd", report: bool = True) -> Optional[float]:
        """Set the adapter's factors from the HOSVD / HOOI (``method``) of the frozen base weight; return the
        captured energy ``||G||^2 / ||W||^2`` (docs/design.md, "Initialisation").

        The core is not touched. A base weight or adapter on the meta device (empty-weight loading, which the
        checkpoint fills) is skipped and None returned. Every layer logs its energy at DEBUG; with ``report``,
        the first layer of each type and method also at INFO.
        """
        if method not in DECOMPOSITIONS:
            raise ValueError(f"method must be one of {DECOMPOSITIONS}, got {method!r}")
        weight = self.get_base_layer().weight
        if weight.device.type == "meta" or self.tucker_lora_core[adapter_name].device.type == "meta":
            return None
        mr = self.mode_ranks[adapter_name]
        core, factors = (decomposition.hooi if method == "hooi" else decomposition.hosvd)(weight, mr)
        self.set_factors(adapter_name, factors)
        energy = decomposition.captured_energy(decomposition.restrict(weight, mr), core)
        logger.debug("%s init of '%s' from its base weight: captured energy %.4f", method, self.layer_name, energy)
        kind = type(self.get_base_layer()).__name__
        if report and (kind, method) not in _INIT_REPORTED:
            _INIT_REPORTED.add((kind, method))
            logger.info(
                "%s init from the base weight on %s layers (first: '%s', captured energy %.4f; each layer at DEBUG)",
                method,
                kind,
                self.layer_name,
                energy,
            )
        return energy

    @torch.no_grad()
    def set_factors(self, adapter_name: str, factors: list[torch.Tensor]) -> None:
        """Copy ``factors`` (one per mode, ``[U_o, U_i, ...]``) into the adapter's trained factors; pinned modes
        keep their centre tap."""
        mr = self.mode_ranks[adapter_name]
        for n in mr.trainable_modes:
            getattr(self, factor_attr(mr.modes[n]))[adapter_name].copy_(factors[n])

    # ------------------------------------------------------------------ scale (peft LoRA's API, used by diffusers)
    def set_scale(self, adapter: str, scale: float) -> None:
        """Apply ``adapter`` as ``scale * tucker_lora_alpha * dW`` (diffusers' ``set_adapters`` weights)."""
        if adapter in self.tucker_lora_alpha:
            self.alpha[adapter] = float(scale) * self.tucker_lora_alpha[adapter]

    def scale_layer(self, scale: float) -> None:
        """Multiply the applied scale of every active adapter by ``scale``."""
        if scale == 1:
            return
        for name in self._active():
            self.alpha[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Undo ``scale_layer(scale)``; with ``None``, back to the configured ``tucker_lora_alpha``."""
        for name in self._active():
            if scale is None:
                self.alpha[name] = self.tucker_lora_alpha[name]
            else:
                self.alpha[name] /= scale

    def factors(self, adapter_name: str) -> list[torch.Tensor]:
        """``[U_o, U_i, (U_t, U_h,) U_w]`` of the adapter, pinned modes as their centre-tap one-hot."""
        return self._factors(adapter_name, self.tucker_lora_core[adapter_name])

    def _factors(self, adapter_name: str, core: torch.Tensor) -> list[torch.Tensor]:
        return [
            self._centre_tap(dim, core) if params is None else _entry(params, adapter_name)
            for params, dim in self._factor_sources[adapter_name]
        ]

    def _centre_tap(self, dim: int, like: torch.Tensor) -> torch.Tensor:
        """The constant factor of a pinned mode of size ``dim``: built once per size, device and dtype (each
        build is several ops)."""
        key = (dim, like.device, like.dtype)
        tap = self._centre_taps.get(key)
        if tap is None:
            tap = self._centre_taps[key] = centre_tap(dim, like.device, like.dtype)
        return tap

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``alpha * dW = alpha * G x_1 U_o ... x_N U_N``, in the base weight's shape and dtype."""
        weight = self.get_base_layer().weight
        delta = self.alpha[adapter_name] * reconstruct(self.tucker_lora_core[adapter_name], self.factors(adapter_name))
        return delta.to(dtype=weight.dtype, device=weight.device)

    def _active(self) -> list[str]:
        names = self._active_adapter  # peft's ``active_adapters`` without its two property calls
        cores = self.tucker_lora_core
        return [a for a in ([names] if isinstance(names, str) else names) if a in cores]

    def get_base_layer(self) -> nn.Module:
        """The wrapped layer (peft's lookup, without its ``hasattr`` probe, which raises and catches an
        AttributeError on every call for a plain base layer)."""
        base = self._modules["base_layer"]
        return base if "base_layer" not in base._modules else super().get_base_layer()

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
        x = args[0] if args else _first_input(args, kwargs)
        active = [] if self._disable_adapters or self.merged_adapters else self._active()
        self._refuse_meta(x, base, active)
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        if not active:
            return base(*args, **kwargs)
        path = self._choose_path(x, base, active)
        if path == "module":
            weight = base.weight + sum(self.get_delta_weight(a) for a in active)
            return module_forward(base, weight, args, kwargs)
        if path == "grouped":  # dropout on the adapter input: a second grouped conv with alpha * dW
            deltas = [
                base._conv_forward(self.tucker_lora_dropout[a](x), self.get_delta_weight(a), None) for a in active
            ]
            return base(*args, **kwargs) + sum(deltas)
        if path in ("merged", "factored"):  # one adapter on a plain conv, no dropout: one autograd node
            (a,) = active
            # in the parameters' own dtype: the node casts what meets x (the small kernel, U_o, U_i), fewer casts
            # than the core and every factor (and their casts' backward) for a low-precision x
            core = _entry(self.tucker_lora_core, a)
            factors = self._factors(a, core)
            return adapted_conv(x, base, self._geometry, core, factors, self.alpha[a], merge=path == "merged")
        result = base(*args, **kwargs)  # "eager": Linear, dropout, several adapters
        for a in active:
            result = self._add_factored(result, a, x)
        return result

    def _compute_tensors(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Core and factors in the dtype the layer computes in: x's, for low-precision inputs (fp32 params); for the
        eager path, whose ops take one dtype."""
        core = _entry(self.tucker_lora_core, adapter_name)
        factors = self._factors(adapter_name, core)
        if x.dtype != core.dtype and x.is_floating_point():
            core, factors = core.to(x.dtype), [U.to(x.dtype) for U in factors]
        return core, factors

    def _add_factored(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``result + alpha * dW * dropout(x)`` for one adapter, without forming dW."""
        x = self.tucker_lora_dropout[adapter_name](x)
        core, factors = self._compute_tensors(adapter_name, x)
        alpha = self.alpha[adapter_name]
        if isinstance(self.get_base_layer(), nn.Linear):
            return factored_linear(result, x, core, factors[0], factors[1], alpha)
        if x.ndim == core.ndim - 1:  # unbatched conv input
            return factored_conv(result.unsqueeze(0), x.unsqueeze(0), self._geometry, core, factors, alpha).squeeze(0)
        return factored_conv(result, x, self._geometry, core, factors, alpha)

    def _refuse_meta(self, x: torch.Tensor, base: nn.Module, active: list[str]) -> None:
        """A real input must not meet weights on the meta device: torch's CPU conv and matmul read them as
        uninitialised memory and return garbage. Meta inputs (shape tracing) pass."""
        if x.is_meta:
            return
        if base.weight.is_meta:
            raise RuntimeError(
                f"layer '{self.layer_name}': the base weight is on the meta device (never loaded?); load the "
                "model's weights before running it"
            )
        cores = self.tucker_lora_core
        for name in active:
            if _entry(cores, name).is_meta:
                raise RuntimeError(
                    f"layer '{self.layer_name}': adapter '{name}' (tucker_lora_core) is on the meta device (created "
                    "with low_cpu_mem_usage and never loaded?); load its state dict before running the model"
                )

    def _choose_path(self, x: torch.Tensor, base: nn.Module, active: list[str]) -> str:
        """``"module"``, ``"grouped"``, ``"merged"``, ``"factored"`` or ``"eager"`` (factored, one adapter at a
        time through autograd) for this call, from ``forward_mode`` and the cost model."""
        if not self._plain:
            return "module"
        dropout_on = self.training and any(isinstance(self.tucker_lora_dropout[a], nn.Dropout) for a in active)
        if self._geometry is None:  # a Linear
            return "module" if self.forward_mode == "merged" and not dropout_on else "eager"
        if base.groups > 1:
            return "grouped" if dropout_on else "module"
        if dropout_on or len(active) > 1:
            return "eager"
        if self.forward_mode != "auto":
            return self.forward_mode
        weight = base.weight
        y_numel = x.numel() // weight.shape[1] * weight.shape[0]  # stride-1 estimate of the output size
        return choose_path(weight.numel(), x.numel(), y_numel, x.device.type, grad=torch.is_grad_enabled())

    def __repr__(self) -> str:
        return "tucker_lora." + super().__repr__()
