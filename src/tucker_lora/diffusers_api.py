"""diffusers' adapter-file methods (``PeftAdapterMixin.save_lora_adapter`` / ``load_lora_adapter``) on
Tucker-LoRA adapters.

diffusers reads and writes LoRA files only: on a Tucker-LoRA adapter its ``save_lora_adapter`` writes a
``pytorch_lora_weights.safetensors`` that its ``load_lora_adapter`` (like any LoRA reader) takes for a file
without LoRA tensors, and loads nothing. ``install()`` wraps the two methods once (``import tucker_lora``
arranges it for whenever diffusers' loaders are imported). On a Tucker-LoRA adapter ``save_lora_adapter``
writes a peft adapter folder (``adapter_model.safetensors``, ``adapter_config.json``, model card), which
``load_lora_adapter`` and ``PeftModel.from_pretrained`` read back; a LoRA file holding Tucker-LoRA tensors
is refused by name. Every other call goes to diffusers unchanged. For LoRA-only readers, export the adapter
as a LoRA file (``tucker_lora.save_as_lora``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from .io import WEIGHTS_NAME, staged_directory
from .registry import PREFIX, TUCKER_LORA

CONFIG_NAME = "adapter_config.json"
LORA_EXPORT = "tucker_lora.save_as_lora"
_MODEL_PREFIX = "base_model.model."
_MARK = "__tucker_lora__"


def _is_tucker(config: Any) -> bool:
    return getattr(config, "peft_type", None) == TUCKER_LORA


def save_tucker_adapter(
    model: Any, save_directory: str | os.PathLike, adapter_name: str, upcast_before_saving: bool = False
) -> None:
    """Save adapter ``adapter_name`` of a diffusers model as a peft adapter folder (crash-safe: staged, then
    renamed), with the keys ``PeftModel.save_pretrained`` writes (``base_model.model.<layer>.tucker_lora_*``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {
        _MODEL_PREFIX + key: (value.float() if upcast_before_saving else value).detach().contiguous()
        for key, value in state.items()
    }
    with staged_directory(save_directory) as stage:
        save_file(state, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(stage))


def load_tucker_adapter(
    model: Any,
    directory: str | os.PathLike,
    adapter_name: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
    subfolder: Optional[str] = None,
) -> None:
    """Load a Tucker-LoRA adapter folder into a diffusers model as adapter ``adapter_name``; every tensor of
    the new adapter must come from the file (else nothing stays loaded and the error names the first missing)."""
    from diffusers.utils.peft_utils import get_adapter_name
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    from .config import TuckerLoraConfig

    path = Path(directory, subfolder or "")
    config = TuckerLoraConfig.from_pretrained(str(path))
    adapter_name = adapter_name or get_adapter_name(model)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter name '{adapter_name}' is already in use in the model; choose another one")
    state = load_peft_weights(str(path), device="cpu")
    inject_adapter_in_model(config, model, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        missing = [k for k in result.missing_keys if PREFIX in k and k.endswith(f".{adapter_name}")]
        if missing or result.unexpected_keys:
            what = (
                f"has no tensor for {missing[0]}"
                if missing
                else f"has tensors the model lacks: {result.unexpected_keys[:3]}"
            )
            raise ValueError(f"'{path / WEIGHTS_NAME}' does not fit this model: it {what}")
    except Exception:
        from diffusers.utils.peft_utils import delete_adapter_layers

        delete_adapter_layers(model, adapter_name)
        raise
    model._hf_peft_config_loaded = True


def _tucker_folder(source: Any, subfolder: Optional[str]) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source, subfolder or "", CONFIG_NAME)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("peft_type") == TUCKER_LORA.value
    except (OSError, ValueError):
        return False


def _tucker_keys(source: Any, subfolder: Optional[str], weight_name: Optional[str]) -> list[str]:
    """The Tucker-LoRA tensor names of a state dict or a local safetensors file (none for anything else)."""
    if isinstance(source, dict):
        keys = list(source)
    else:
        path = Path(source, subfolder or "")
        if path.is_dir():
            path = path / (weight_name or "pytorch_lora_weights.safetensors")
        if path.suffix != ".safetensors" or not path.is_file():
            return []
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    return [k for k in keys if PREFIX in k]


def install() -> None:
    """Wrap ``PeftAdapterMixin.save_lora_adapter`` / ``load_lora_adapter`` once, if diffusers' loaders are loaded."""
    module = sys.modules.get("diffusers.loaders.peft")
    mixin = getattr(module, "PeftAdapterMixin", None)
    if mixin is None or getattr(mixin.save_lora_adapter, _MARK, False):
        return
    save, load = mixin.save_lora_adapter, mixin.load_lora_adapter

    @functools.wraps(save)
    def save_lora_adapter(self, save_directory, adapter_name: str = "default", *args, **kwargs):
        from diffusers.utils.peft_utils import get_adapter_name

        name = adapter_name or get_adapter_name(self)
        if not _is_tucker(getattr(self, "peft_config", {}).get(name)):
            return save(self, save_directory, adapter_name, *args, **kwargs)
        extra = dict(zip(("upcast_before_saving", "safe_serialization", "weight_name"), args, strict=False), **kwargs)
        if extra.get("weight_name") is not None or extra.get("safe_serialization") is False:
            raise ValueError(
                f"adapter '{name}' is a Tucker-LoRA adapter, saved as a peft adapter folder ({WEIGHTS_NAME} + "
                f"{CONFIG_NAME}): weight_name and safe_serialization=False do not apply; for a LoRA file, use "
                f"{LORA_EXPORT}"
            )
        save_tucker_adapter(self, save_directory, name, bool(extra.get("upcast_before_saving", False)))

    @functools.wraps(load)
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        source, subfolder = pretrained_model_name_or_path_or_dict, kwargs.get("subfolder")
        if _tucker_folder(source, subfolder):
            if args or kwargs.get("hotswap"):
                raise ValueError(
                    "a Tucker-LoRA folder loads without prefix or hotswap arguments (tucker_lora.hotswap_adapter "
                    "swaps a loaded Tucker-LoRA adapter in place)"
                )
            load_tucker_adapter(
                self, source, kwargs.get("adapter_name"), kwargs.get("low_cpu_mem_usage", False), subfolder
            )
            return
        keys = _tucker_keys(source, subfolder, kwargs.get("weight_name"))
        if keys:
            where = "the state dict" if isinstance(source, dict) else f"'{source}'"
            raise ValueError(
                f"{where} holds Tucker-LoRA tensors (e.g. '{keys[0]}'), not LoRA ones, so load_lora_adapter would load "
                "nothing: load the adapter folder that save_lora_adapter / save_pretrained writes, or export the "
                f"adapter as a LoRA file with {LORA_EXPORT}"
            )
        return load(self, pretrained_model_name_or_path_or_dict, *args, **kwargs)

    setattr(save_lora_adapter, _MARK, True)
    setattr(load_lora_adapter, _MARK, True)
    mixin.save_lora_adapter, mixin.load_lora_adapter = save_lora_adapter, load_lora_adapter
