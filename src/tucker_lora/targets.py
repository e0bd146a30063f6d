"""Default ``target_modules`` per model family, used when ``TuckerLoraConfig.target_modules`` is None.

``DEFAULT_TARGET_MODULES`` maps a model class name to a regex that peft full-matches against module
names. The rule that turns it into targets: the layers Tucker-LoRA adapts (Linear / Conv1d / Conv2d /
Conv3d, subclasses included) whose names match. Containers that happen to match (diffusers' causal-conv
wrappers such as ``HunyuanVideoCausalConv3d``, an ``nn.Module`` holding its ``nn.Conv3d`` as ``.conv``)
are skipped, so a pattern like ``(.*\\.)?conv`` selects the convolutions inside them.

A model is looked up by its class name, then by the names of its base classes (a subclass of
``UNet3DConditionModel`` gets that entry).

``minimal_suffixes`` writes a list of selected layers as the shortest name suffixes peft's list rule
matches to exactly those layers (what a saved ``adapter_config.json`` holds).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layer import SUPPORTED_LAYERS

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "adaptable_layer",
    "default_pattern",
    "default_target_names",
    "minimal_suffixes",
    "required_default_targets",
]

_UNET3D = r"(.*\.)?(temp_convs\.\d+\.conv\d\.\d+|resnets\.\d+\.conv[12])"

#: Model class name -> regex of the modules to adapt by default (see the module docstring for the rule).
DEFAULT_TARGET_MODULES: dict[str, str] = {
    # video VAEs: every convolution of encoder and decoder (causal / chunked Conv3d subclasses included)
    "AutoencoderKLWan": (
        r"(.*\.)?(conv_in|conv_out|conv[12]|conv_shortcut|time_conv|resample\.1|to_qkv|proj|(post_)?quant_conv)"
    ),
    "AutoencoderKLCogVideoX": r"(.*\.)?(conv|conv_shortcut|(post_)?quant_conv)",
    "AutoencoderKLHunyuanVideo": r"(.*\.)?(conv|(post_)?quant_conv)",
    "AutoencoderKLLTXVideo": r"(.*\.)?conv",
    "AutoencoderKLMochi": r"(.*\.)?conv|decoder\.conv_in",
    # video UNets: temporal Conv3d + resnet Conv2d
    "UNet3DConditionModel": _UNET3D,
    "I2VGenXLUNet": _UNET3D,
    "UNetSpatioTemporalConditionModel": r"(.*\.)?(spatial|temporal)_res_block\.conv[12]",
    # AnimateDiff: resnet Conv2d + motion-module attention Linear
    "UNetMotionModel": (
        r"(.*\.)?(resnets\.\d+\.conv[12]"
        r"|motion_modules\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.attn\d+\.(to_q|to_k|to_v|to_out\.0)))"
    ),
    # Wan 2.x DiT: the Conv3d patch embedding + attention and feed-forward Linear of every block
    "WanTransformer3DModel": (
        r"patch_embedding|blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
    ),
}


def default_pattern(model: nn.Module) -> Optional[str]:
    """The ``DEFAULT_TARGET_MODULES`` entry of ``model``'s class or its nearest listed base class, else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_TARGET_MODULES:
            return DEFAULT_TARGET_MODULES[cls.__name__]
    return None


def default_target_names(model: nn.Module) -> Optional[list[str]]:
    """Full names of the layers the default pattern selects in ``model`` (``named_modules()`` order), or None.

    A layer already wrapped by an adapter counts as its base layer; the wrapper's inner ``base_layer``
    is never listed twice.
    """
    pattern = default_pattern(model)
    if pattern is None:
        return None
    names = []
    for name, module in model.named_modules():
        if "base_layer" in name.split(".") or re.fullmatch(pattern, name) is None:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, SUPPORTED_LAYERS):
            names.append(name)
    return names


def _matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target_modules: an exact name or a dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def minimal_suffixes(all_names: Iterable[str], selected: Iterable[str]) -> list[str]:
    """The shortest dotted suffixes that peft's list rule matches to exactly ``selected`` among ``all_names``.

    For each selected name, the shortest suffix (fewest dotted components, not starting at a bare index
    such as ``3`` in ``conv4.3``) that matches no unselected module; the result, sorted and without
    duplicates, selects the same modules as the full names.
    """
    all_names = [n for n in all_names if n]
    selected = set(selected)
    others = [n for n in all_names if n not in selected]
    out: set[str] = set()
    for name in selected:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if parts[-k].isdigit() and k < len(parts):
                continue
            if not any(_matches(n, (suffix,)) for n in others):
                out.add(suffix)
                break
    chosen = sorted(out)
    if {n for n in all_names if _matches(n, chosen)} != selected:
        raise ValueError(f"selected names missing from all_names: {sorted(selected - set(all_names))}")
    return chosen


def required_default_targets(model: nn.Module) -> list[str]:
    """``default_target_names(model)`` for ``target_modules=None``; a ValueError saying why when there are none."""
    names = default_target_names(model)
    if not names:
        found = "has no entry for" if names is None else "matches no Linear/Conv layer of"
        raise ValueError(
            f"TuckerLoraConfig.target_modules is None and tucker_lora.DEFAULT_TARGET_MODULES {found} a "
            f"{type(model).__name__} (entries: {', '.join(sorted(DEFAULT_TARGET_MODULES))}): "
            "name the modules to adapt (names, suffixes or a regex)"
        )
    return names


def adaptable_layer(module: nn.Module, key: str) -> nn.Module:
    """The layer an adapter on the target ``key`` wraps: ``module`` (its base layer if already wrapped), which must
    be a Linear / Conv1d / Conv2d / Conv3d (subclasses included); a TypeError naming ``key`` otherwise."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(base, SUPPORTED_LAYERS):
        names = ", ".join(c.__name__ for c in SUPPORTED_LAYERS)
        raise TypeError(
            f"target module '{key}' is a {type(base).__name__}; Tucker-LoRA adapts {names} "
            "(and their subclasses): fix target_modules"
        )
    return base
