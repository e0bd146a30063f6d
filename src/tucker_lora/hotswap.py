"""``hotswap_adapter``: replace a loaded Tucker-LoRA adapter's tensors in place with a saved adapter's.

The swap copies into the existing parameters (same objects, shapes, dtypes and devices), so a model
compiled with ``torch.compile`` runs the new adapter without recompiling. Every Python attribute the
forward reads stays as it was, ``alpha`` included (dynamo guards on it): a different ``alpha`` in the
saved adapter is folded into the core, ``G <- (alpha_new / alpha_loaded) * G_new``, which gives the
same ``alpha_loaded * G x_1 U_1 ... x_N U_N`` up to one rounding of the core.
"""

from __future__ import annotations

import os
from typing import Any, Union

import torch
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from .config import TuckerLoraConfig
from .layer import TuckerLoraLayer
from .model import _pattern_value
from .registry import PREFIX, TUCKER_LORA

__all__ = ["hotswap_adapter"]

_MODEL_PREFIX = "base_model.model."


def _layers(model: nn.Module) -> dict[str, TuckerLoraLayer]:
    """The Tucker-LoRA layers of ``model`` (a PeftModel, a model with injected adapters, or either compiled),
    keyed by their name under the base model (the name a saved adapter's keys start with)."""
    model = getattr(model, "_orig_mod", model)
    return {
        name.removeprefix(_MODEL_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, TuckerLoraLayer)
    }


def _saved_tensors(state_dict: dict[str, torch.Tensor], path: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {attribute: tensor}}`` of a saved adapter's ``...<layer>.tucker_lora_<x>`` keys."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        layer, sep, attr = key.removeprefix(_MODEL_PREFIX).rpartition(f".{PREFIX}")
        if not sep or "." in attr:
            raise ValueError(
                f"'{path}': tensor '{key}' is not a Tucker-LoRA core or factor (modules_to_save?); hotswap_adapter "
                "swaps only Tucker-LoRA tensors: load this adapter with load_adapter instead"
            )
        by_layer.setdefault(layer, {})[PREFIX + attr] = tensor
    return by_layer


def _loaded_tensors(layer: TuckerLoraLayer, adapter_name: str) -> dict[str, nn.Parameter]:
    return {
        attr: getattr(layer, attr)[adapter_name]
        for attr in layer.adapter_layer_names
        if adapter_name in getattr(layer, attr)
    }


def hotswap_adapter(
    model: nn.Module, model_name_or_path: Union[str, os.PathLike], adapter_name: str = "default", **kwargs: Any
) -> None:
    """Replace the tensors of the loaded adapter ``adapter_name`` with those saved at ``model_name_or_path``.

    The saved adapter must have the same ranks on every layer it adapts, and adapt no layer the loaded
    one does not; a layer the loaded adapter has and the saved one lacks gets a zero core (no update), as
    peft's LoRA hotswap does. Nothing is changed unless every layer fits. ``kwargs`` go to peft's
    ``load_peft_weights`` (e.g. ``subfolder``, ``revision``). Works on a ``PeftModel``, on a diffusers
    model with ``add_adapter``'s adapters, and on either wrapped by ``torch.compile``.
    """
    path = str(model_name_or_path)
    config = TuckerLoraConfig.from_pretrained(path, subfolder=kwargs.get("subfolder"))
    if config.peft_type != TUCKER_LORA:
        raise ValueError(f"'{path}' holds a {config.peft_type} adapter, not a Tucker-LoRA one")
    layers = _layers(model)
    holding = {name: layer for name, layer in layers.items() if adapter_name in layer.tucker_lora_core}
    if not holding:
        present = sorted({a for layer in layers.values() for a in layer.tucker_lora_core})
        raise ValueError(f"no Tucker-LoRA adapter named '{adapter_name}' is loaded (loaded: {present or 'none'})")
    merged = [name for name, layer in holding.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"adapter '{adapter_name}' is merged into layer '{merged[0]}'; unmerge it before swapping its tensors"
        )
    device = next(iter(holding.values())).tucker_lora_core[adapter_name].device
    saved = _saved_tensors(load_peft_weights(path, device=str(device), **kwargs), path)

    plan: list[tuple[nn.Parameter, torch.Tensor, float]] = []  # (parameter, new value, factor)
    for name, tensors in saved.items():
        layer = holding.get(name)
        if layer is None:
            raise ValueError(
                f"'{path}' adapts layer '{name}', which adapter '{adapter_name}' does not adapt; hotswap cannot add "
                "layers (load it with load_adapter instead)"
            )
        loaded = _loaded_tensors(layer, adapter_name)
        shapes = {a: tuple(t.shape) for a, t in tensors.items()}
        expected = {a: tuple(p.shape) for a, p in loaded.items()}
        if shapes != expected:
            raise ValueError(
                f"layer '{name}': the saved adapter's tensors have shapes {shapes}, adapter '{adapter_name}' has "
                f"{expected}: the ranks differ, and hotswap needs the same ranks (load it with load_adapter instead)"
            )
        loaded_alpha = layer.tucker_lora_alpha[adapter_name]
        new_alpha = float(_pattern_value(config.alpha_pattern, name, config.alpha))
        if loaded_alpha == 0 and new_alpha != 0:
            raise ValueError(
                f"layer '{name}': adapter '{adapter_name}' has alpha 0, into which alpha {new_alpha} cannot be folded"
            )
        fold = 1.0 if new_alpha == loaded_alpha else new_alpha / loaded_alpha
        plan += [(loaded[a], t, fold if a == f"{PREFIX}core" else 1.0) for a, t in tensors.items()]
    absent = [layer for name, layer in holding.items() if name not in saved]

    with torch.no_grad():
        for param, value, factor in plan:
            param.copy_(value if factor == 1.0 else value.double() * factor)
        for layer in absent:
            layer.tucker_lora_core[adapter_name].zero_()
