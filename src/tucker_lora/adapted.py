"""Finding the Tucker-LoRA layers and config of one adapter in a model (a ``PeftModel``, the tuner, or a bare
model with injected layers), by their module paths in the base model; loading a saved adapter folder onto its
local base model (what the export and resize command lines start from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .config import TuckerLoraConfig
from .io import WEIGHTS_NAME, check_safetensors
from .layer import TuckerLoraLayer

__all__ = [
    "adapted_layers",
    "base_model_of",
    "error_summary",
    "load_adapter",
    "load_base_model",
    "tucker_config_of",
]


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


def _diffusers_class(name: Optional[str], where: Path) -> Any:
    import diffusers

    cls = getattr(diffusers, name or "", None)
    if cls is None:
        raise ValueError(f"'{where}' names the model class {name!r}, which diffusers does not have")
    return cls


def load_base_model(path: str | Path) -> nn.Module:
    """The denoiser of a local diffusers pipeline folder (``unet`` or ``transformer``; a 2D UNet with the folder's
    ``motion_adapter`` becomes AnimateDiff's ``UNetMotionModel``), or a diffusers model folder. No download."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"base model '{root}' is not a folder (pass --base: a local diffusers pipeline or model)")
    if (root / "model_index.json").is_file():
        sub = next((s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None)
        if sub is None:
            raise ValueError(f"pipeline folder '{root}' has no unet/ or transformer/ with a config.json")
        config_file = root / sub / "config.json"
        name = json.loads(config_file.read_text()).get("_class_name")
        if name == "UNet2DConditionModel" and (root / "motion_adapter" / "config.json").is_file():
            from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

            unet2d = UNet2DConditionModel.from_pretrained(root, subfolder=sub, local_files_only=True)
            adapter = MotionAdapter.from_pretrained(root / "motion_adapter", local_files_only=True)
            return UNetMotionModel.from_unet2d(unet2d, adapter).eval()
        return _diffusers_class(name, config_file).from_pretrained(root, subfolder=sub, local_files_only=True).eval()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(f"base model '{root}' has neither model_index.json (a pipeline) nor config.json (a model)")
    name = json.loads(config_file.read_text()).get("_class_name")
    return _diffusers_class(name, config_file).from_pretrained(root, local_files_only=True).eval()


def load_adapter(adapter_dir: str | Path, base: Optional[str | Path] = None) -> Any:
    """``PeftModel.from_pretrained(base model, adapter_dir)`` for a Tucker-LoRA folder; each problem names the
    folder (no adapter_config.json, another peft type, a missing or damaged weights file, no base model)."""
    folder = Path(adapter_dir)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"'{folder}' is not a Tucker-LoRA adapter folder: it has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{config_file}' is not valid JSON ({e})") from e
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "TUCKER_LORA":
        raise ValueError(f"'{folder}' holds a {peft_type} adapter, not a Tucker-LoRA one (peft_type TUCKER_LORA)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"'{folder}' has no {WEIGHTS_NAME}")
    check_safetensors(weights)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"'{config_file}' names no base model: pass --base BASE_MODEL_DIR")
    from peft import PeftModel  # the package's import registered the method with peft

    return PeftModel.from_pretrained(load_base_model(base), str(folder))


def error_summary(errors: dict[str, float]) -> str:
    """One line on a ``{layer: relative error}`` dict: how many layers and the largest error, with its layer."""
    worst = max(errors, key=errors.get)
    return f"{len(errors)} layers, largest relative error {errors[worst]:.3g} ('{worst}')"
