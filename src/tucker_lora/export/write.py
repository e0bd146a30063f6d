"""``save_as_lora``: a Tucker-LoRA adapter written as a LoRA file that peft, diffusers or kohya-style tools read.

Formats (all safetensors, LoRA scale 1: alpha is folded into ``down``):

- ``"peft"``: a peft LoRA folder, ``adapter_config.json`` (``peft_type`` LORA) + ``adapter_model.safetensors``
  with ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``, for ``PeftModel.from_pretrained``.
- ``"diffusers"``: a folder with ``pytorch_lora_weights.safetensors`` holding ``unet.<path>.lora_A.weight`` /
  ``lora_B.weight`` (``transformer.`` for a transformer denoiser), what a pipeline's ``load_lora_weights`` reads;
  with no alphas in the file diffusers sets ``lora_alpha = r`` per layer (scale 1).
- ``"kohya"``: one ``.safetensors`` file with ``lora_unet_<path, "." -> "_">.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (= the rank, so ``alpha / rank = 1``), as sd-scripts, LyCORIS and ComfyUI
  read it; conv kernels keep their full shape (5-D for Conv3d). Weights only, so every layer is exact there.

Everything is written into a temporary sibling first and renamed into place (``tucker_lora.io``): a failure
leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import WEIGHTS_NAME, staged_directory
from .convert import Conversion, check_rank, convert_layers, lora_config, peft_state_dict

__all__ = ["DIFFUSERS_WEIGHTS_NAME", "FORMATS", "KOHYA_PREFIX", "save_as_lora"]

FORMATS: tuple[str, ...] = ("peft", "diffusers", "kohya")
#: The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for in a folder.
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Key prefix of a denoiser's layers in a kohya (sd-scripts) LoRA file.
KOHYA_PREFIX = "lora_unet_"


def kohya_key(path: str) -> str:
    return KOHYA_PREFIX + path.replace(".", "_")


def kohya_state_dict(conversion: Conversion) -> dict[str, torch.Tensor]:
    """``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (float32 scalar = the rank)."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for name, layer in conversion.layers.items():
        key = kohya_key(name)
        if key in owner:
            raise ValueError(f"layers '{owner[key]}' and '{name}' both map to the kohya key '{key}'")
        owner[key] = name
        out[f"{key}.lora_down.weight"] = layer.down
        out[f"{key}.lora_up.weight"] = layer.up
        out[f"{key}.alpha"] = torch.tensor(float(layer.rank))
    return out


def denoiser_prefix(base_model: nn.Module) -> str:
    """The pipeline component diffusers loads the LoRA into: ``"transformer"`` for a transformer denoiser."""
    return "transformer" if "Transformer" in type(base_model).__name__ else "unet"


def diffusers_state_dict(conversion: Conversion) -> dict[str, torch.Tensor]:
    prefix = denoiser_prefix(conversion.base_model)
    out = {}
    for name, layer in conversion.layers.items():
        out[f"{prefix}.{name}.lora_A.weight"] = layer.down
        out[f"{prefix}.{name}.lora_B.weight"] = layer.up
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def check_output(path: Path, format: str) -> None:
    """Refuse a target that is the wrong kind, or a folder holding an adapter that is not a LoRA."""
    if format == "kohya":
        if path.is_dir():
            raise ValueError(f"'{path}' is a folder: the kohya format is one file (e.g. '{path / 'lora.safetensors'}')")
        if path.suffix != ".safetensors":
            raise ValueError(f"'{path}': a kohya LoRA file must end in .safetensors (tools pick the reader by it)")
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"'{path}' is a file: the {format} format is a folder")
    config_file = path / "adapter_config.json"
    if config_file.is_file():
        try:
            peft_type = json.loads(config_file.read_text()).get("peft_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            peft_type = "unreadable"
        if peft_type != "LORA":
            raise ValueError(
                f"'{path}' holds a {peft_type} adapter (adapter_config.json); writing a LoRA there would overwrite "
                "it: choose another folder"
            )


def save_as_lora(
    path: str | os.PathLike,
    model: nn.Module,
    rank: int | float | None = None,
    adapter_name: str = "default",
    format: str = "peft",
    skip_unsupported: bool = False,
    progressbar: bool = False,
) -> dict[str, float]:
    """Write the Tucker-LoRA adapter ``adapter_name`` of ``model`` as a LoRA in ``format`` at ``path``.

    ``path`` is a folder for ``"peft"`` and ``"diffusers"``, a ``.safetensors`` file for ``"kohya"``. ``rank``
    and ``skip_unsupported`` as in ``convert_to_lora`` (the kohya format holds every layer exactly, so only
    ``modules_to_save`` can be unsupported there). Returns ``{layer path: relative Frobenius error}`` (0 for the
    exact export).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    check_rank(rank)
    path = Path(path)
    check_output(path, format)
    conversion = convert_layers(model, rank, adapter_name, skip_unsupported, progressbar, peft_lora=format != "kohya")
    if format == "kohya":
        tensors = kohya_state_dict(conversion)
        with staged_directory(path.parent) as stage:
            _save_safetensors(tensors, stage / path.name)
    elif format == "peft":
        config: Any = lora_config(conversion)
        with staged_directory(path) as stage:
            _save_safetensors(peft_state_dict(conversion), stage / WEIGHTS_NAME)
            config.save_pretrained(str(stage))
    else:
        if not hasattr(conversion.base_model, "load_lora_adapter"):
            warnings.warn(
                f"a {type(conversion.base_model).__name__} has no load_lora_adapter (diffusers' PeftAdapterMixin): "
                "a diffusers pipeline cannot load a LoRA into it; format 'peft' or 'kohya' can",
                stacklevel=2,
            )
        with staged_directory(path) as stage:
            _save_safetensors(diffusers_state_dict(conversion), stage / DIFFUSERS_WEIGHTS_NAME)
    conversion.log(f"Tucker-LoRA adapter '{adapter_name}' saved as a {format} LoRA at '{path}'")
    return conversion.errors
