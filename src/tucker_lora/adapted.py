"""Finding the Tucker-LoRA layers and config of one adapter in a model (a ``PeftModel``, the tuner, or a bare
model with injected layers), by their module paths in the base model."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .config import TuckerLoraConfig
from .layer import TuckerLoraLayer

__all__ = ["adapted_layers", "base_model_of", "tucker_config_of"]


def base_model_of(model: nn.Module) -> nn.Module:
    """The model under a ``PeftModel`` or ``TuckerLoraModel`` (the model itself otherwise): module paths are
    taken there, as peft's ``target_modules`` and ``rank_pattern`` see them."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "peft_config") else model


def adapted_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, TuckerLoraLayer]]:
    """``[(path, layer)]`` of every layer holding ``adapter_name``; an error names the adapter when none does."""
    base = base_model_of(model)
    all_layers = [(n, m) for n, m in base.named_modules() if isinstance(m, TuckerLoraLayer)]
    layers = [(n, m) for n, m in all_layers if adapter_name in m.mode_ranks]
    if not layers:
        if not all_layers:
            raise ValueError(f"the {type(model).__name__} has no Tucker-LoRA layer (not a Tucker-LoRA model)")
        found = sorted({a for _, m in all_layers for a in m.mode_ranks})
        raise ValueError(f"no Tucker-LoRA layer holds adapter '{adapter_name}' (adapters: {', '.join(found)})")
    return layers


def tucker_config_of(model: nn.Module, adapter_name: str) -> Optional[TuckerLoraConfig]:
    """The ``TuckerLoraConfig`` of ``adapter_name`` (None for a model without peft configs)."""
    configs: Any = getattr(model, "peft_config", None) or {}
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    return config if isinstance(config, TuckerLoraConfig) else None
