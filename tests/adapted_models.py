"""Helpers of the export and resize tests: trained-like Tucker-LoRA adapters and their layers."""

from __future__ import annotations

import peft
import torch
from torch import nn

from tucker_lora import TuckerLoraConfig, TuckerLoraLayer


def perturbed(model: nn.Module, config: TuckerLoraConfig, seed: int = 0, scale: float = 0.3) -> peft.PeftModel:
    """``get_peft_model`` (in eval mode), then every core and factor moved by ``scale * N(0, 1)`` noise: a
    trained-like adapter whose factors are no longer orthonormal."""
    model = peft.get_peft_model(model, config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "tucker_lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def layers_of(model: nn.Module) -> dict[str, TuckerLoraLayer]:
    """The Tucker-LoRA layers by their path in the base model."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, TuckerLoraLayer)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).detach().norm() / b.detach().norm())
