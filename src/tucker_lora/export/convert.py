"""``convert_to_lora``: every adapted layer of a Tucker-LoRA model as LoRA weights ``(down, up)``.

Per layer the math of ``tucker_lora.lowrank``: exact (rank r_o, ``up = U_o``, ``down = alpha G x_2 U_i x_3 U_t
...``) or truncated (the best rank-r LoRA of the update, from the factors). alpha is folded into ``down``, so
the LoRA's own scale (peft ``lora_alpha / r``, kohya ``alpha / rank``) is 1.

A peft LoRA layer computes ``base(x) + lora_B(lora_A(x))`` with ``lora_A`` a new conv of the base layer's
class, kernel size, stride and padding only. Layers where that is not ``W + dW`` exactly are refused by name
(``skip_unsupported=True`` leaves them out): Conv subclasses that override ``forward`` or ``_conv_forward``,
grouped convs, dilated convs, non-zero padding modes, and layers their parent calls with the input as a keyword
(``self.proj_in(input=x)`` in AnimateDiff's motion modules: peft's LoRA layers take ``x`` positionally).
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..adapted import adapted_layers, base_model_of, tucker_config_of
from ..config import TuckerLoraConfig
from ..layer import TuckerLoraLayer, is_plain
from ..lowrank import LoraSpectrum, exact_lora

logger = logging.getLogger("tucker_lora")

__all__ = ["Conversion", "LayerLora", "check_rank", "convert_layers", "convert_to_lora", "peft_lora_obstacle"]

#: Prefix of the keys of a peft adapter state dict (``adapter_model.safetensors``).
PEFT_PREFIX = "base_model.model."


def check_rank(rank: object) -> None:
    """``None`` (exact), an int >= 1, or a float energy share in (0, 1]; anything else is a ValueError."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be None (exact), an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        if not (math.isfinite(rank) and 0.0 < rank <= 1.0):
            raise ValueError(
                f"rank as a float is the share of each layer's update energy to keep, in (0, 1]; got {rank!r} "
                "(pass an int for a fixed rank)"
            )
    elif rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank} (None exports the exact LoRA)")


@dataclass(frozen=True)
class LayerLora:
    """One layer as LoRA weights: ``up . down`` approximates (or equals) its ``alpha * dW``."""

    down: torch.Tensor  # (r, I, k...) or (r, I)
    up: torch.Tensor  # (O, r, 1...) or (O, r)
    error: float  # relative Frobenius error ||up . down - alpha dW|| / ||alpha dW||

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Conversion:
    """The LoRA weights of one adapter: ``layers`` by module path; ``skipped``: path -> why it was left out."""

    layers: dict[str, LayerLora]
    skipped: dict[str, str]
    config: Optional[TuckerLoraConfig]
    base_model: nn.Module
    module_names: list[str] = field(default_factory=list)

    @property
    def errors(self) -> dict[str, float]:
        return {name: layer.error for name, layer in self.layers.items()}

    def log(self, what: str) -> None:
        ranks = sorted({layer.rank for layer in self.layers.values()})
        logger.info(
            "%s: %d layers, ranks %s, largest relative error %.3g%s",
            what,
            len(self.layers),
            ", ".join(map(str, ranks)),
            max(self.errors.values()),
            f", {len(self.skipped)} left out" if self.skipped else "",
        )
        for name, error in self.errors.items():
            logger.debug("  %s: rank %d, relative error %.3g", name, self.layers[name].rank, error)


_KEYWORD_CALLERS: dict[type, str] = {}


def _forward_source(cls: type) -> str:
    if cls not in _KEYWORD_CALLERS:
        try:
            _KEYWORD_CALLERS[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _KEYWORD_CALLERS[cls] = ""
    return _KEYWORD_CALLERS[cls]


def peft_lora_obstacle(base: nn.Module, name: str, layer: TuckerLoraLayer) -> Optional[str]:
    """Why a peft LoRA layer cannot reproduce ``W + dW`` on layer ``name`` (None when it can)."""
    module = layer.get_base_layer()
    kind = type(module).__name__
    if not is_plain(module):
        return f"a {kind} that overrides forward or _conv_forward: peft LoRA adds a plain convolution beside it"
    if not isinstance(module, nn.Linear):
        if module.groups > 1:
            return f"a grouped {kind} (groups={module.groups}): peft LoRA's lora_A is a dense convolution"
        if any(d != 1 for d in module.dilation):
            return f"a dilated {kind} (dilation={tuple(module.dilation)}): peft LoRA builds lora_A without dilation"
        if module.padding_mode != "zeros":
            return f"a {kind} with padding_mode='{module.padding_mode}': peft LoRA's lora_A pads with zeros"
    parent_name, _, attr = name.rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    caller = type(parent)
    if re.search(rf"self\.{re.escape(attr)}\(\s*input\s*=", _forward_source(caller)):
        return (
            f"called as self.{attr}(input=...) by {caller.__name__}.forward: peft LoRA layers take the input "
            "positionally (TypeError at the first call)"
        )
    return None


def _layer_lora(layer: TuckerLoraLayer, adapter_name: str, rank: int | float | None) -> LayerLora:
    core = layer.tucker_lora_core[adapter_name]
    if core.is_meta:
        raise ValueError(f"layer '{layer.layer_name}': adapter '{adapter_name}' is on the meta device (never loaded)")
    factors, alpha = layer.factors(adapter_name), layer.alpha[adapter_name]
    if rank is None:
        down, up = exact_lora(core, factors, alpha)
        error = 0.0
    else:
        spectrum = LoraSpectrum.of(core, factors, alpha, layer.mode_ranks[adapter_name].pinned)
        r = spectrum.rank(rank)
        down, up = spectrum.lora(r)
        error = spectrum.error(r)
    return LayerLora(down.to(core.dtype).cpu(), up.to(core.dtype).cpu(), error)


def _progress(items: list, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="Converting to LoRA")


def _unsupported_message(skipped: dict[str, str], what: str) -> str:
    listed = "; ".join(f"'{name}' ({why})" for name, why in skipped.items())
    return f"{len(skipped)} layer{'s' if len(skipped) > 1 else ''} {what}: {listed}"


@torch.no_grad()
def convert_layers(
    model: nn.Module,
    rank: int | float | None = None,
    adapter_name: str = "default",
    skip_unsupported: bool = False,
    progressbar: bool = False,
    peft_lora: bool = True,
) -> Conversion:
    """The LoRA weights of every layer of ``adapter_name`` (see ``convert_to_lora``); ``peft_lora=False`` (a
    weights-only format) keeps the layers a peft LoRA layer cannot hold."""
    check_rank(rank)
    base = base_model_of(model)
    layers = adapted_layers(model, adapter_name)
    config = tucker_config_of(model, adapter_name)
    skipped: dict[str, str] = {}
    if peft_lora:
        for name, layer in layers:
            reason = peft_lora_obstacle(base, name, layer)
            if reason is not None:
                skipped[name] = reason
    if config is not None and config.modules_to_save:
        skipped.update({m: "modules_to_save: a LoRA file holds low-rank updates only" for m in config.modules_to_save})
    if skipped:
        message = _unsupported_message(skipped, "cannot be exported exactly as LoRA")
        if not skip_unsupported:
            hint = " Pass skip_unsupported=True to leave them out"
            raise ValueError(message + "." + hint + (", or use format 'kohya' (weights only)." if peft_lora else "."))
        warnings.warn(message + "; left out of the export", stacklevel=3)
    kept = [(name, layer) for name, layer in layers if name not in skipped]
    out = {name: _layer_lora(layer, adapter_name, rank) for name, layer in _progress(kept, progressbar)}
    if not out:
        raise ValueError(f"adapter '{adapter_name}': no layer left to export")
    inner = tuple(f"{name}." for name, _ in layers)
    names = [n for n, _ in base.named_modules() if n and not n.startswith(inner)]
    return Conversion(out, skipped, config, base, names)


def target_modules(selected: list[str], module_names: list[str]) -> list[str] | str:
    """peft ``target_modules`` selecting exactly ``selected``: the full paths, or (when one is also the dotted
    suffix of another module's path, which peft's list rule would match too) one regex of them."""
    chosen = set(selected)
    others = [n for n in module_names if n not in chosen]
    if any(other.endswith("." + name) for other in others for name in selected):
        return "(" + "|".join(re.escape(name) for name in sorted(selected)) + ")"
    return sorted(selected)


def lora_config(conversion: Conversion) -> Any:
    """The peft ``LoraConfig`` of a conversion: ``lora_alpha = r`` per layer (scale 1), the layers' ranks in
    ``rank_pattern`` / ``alpha_pattern`` (anchored full paths) where they differ from the most common rank."""
    from peft import LoraConfig

    ranks = {name: layer.rank for name, layer in conversion.layers.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(name)}": k for name, k in ranks.items() if k != r}
    config = conversion.config
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules(list(ranks), conversion.module_names),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=config.base_model_name_or_path if config is not None else None,
    )


def peft_state_dict(conversion: Conversion) -> dict[str, torch.Tensor]:
    """``{base_model.model.<path>.lora_A.weight: down, ....lora_B.weight: up}``, as peft saves a LoRA."""
    out = {}
    for name, layer in conversion.layers.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.down
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.up
    return out


def convert_to_lora(
    model: nn.Module,
    rank: int | float | None = None,
    adapter_name: str = "default",
    skip_unsupported: bool = False,
    progressbar: bool = False,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A Tucker-LoRA adapter as a peft LoRA: ``(LoraConfig, state_dict)``, as peft's ``convert_to_lora``.

    Args:
        model: a ``PeftModel`` (or tuner, or model with injected layers) holding the Tucker-LoRA adapter.
        rank: ``None``: exact, rank r_o per layer. An int: per layer the best LoRA of that rank (at most the
            update's rank); a float in (0, 1]: per layer the smallest rank whose singular values hold that share
            of the update's Frobenius energy. Both from the small factors (QR, then an SVD of the core's
            unfolding), never a decomposition of a full-size weight. Per-layer relative errors are logged
            (``save_as_lora`` returns them).
        adapter_name: the Tucker-LoRA adapter to convert.
        skip_unsupported: leave out, with a warning that lists them, the layers a peft LoRA cannot hold exactly
            (otherwise they are a ValueError naming each one and why).
        progressbar: show a progress bar over the layers.

    Returns:
        ``LoraConfig`` (``lora_alpha = r`` so LoRA's scale is 1; ``rank_pattern`` / ``alpha_pattern`` where
        ranks differ) and the state dict in peft's saved layout (``base_model.model.<path>.lora_A.weight``).
    """
    conversion = convert_layers(model, rank, adapter_name, skip_unsupported, progressbar)
    conversion.log(f"Tucker-LoRA adapter '{adapter_name}' as LoRA")
    return lora_config(conversion), peft_state_dict(conversion)
