"""tucker-lora: five-mode Tucker-LoRA adapters for peft.

``import tucker_lora`` registers the method with peft under the name ``tucker_lora``
(``PeftType.TUCKER_LORA``), so ``get_peft_model``, ``PeftModel.from_pretrained`` and the rest of
peft's lifecycle work with ``TuckerLoraConfig``. An installed tucker-lora also registers it whenever
peft is imported (``tucker_lora_hook``), so saved adapters load without this import.
"""

import tucker_lora_hook

from . import diffusers_api
from .config import TuckerLoraConfig
from .errors import AdapterFileError, InputError
from .export import convert_to_lora, save_as_lora
from .hotswap import hotswap_adapter
from .io import check_safetensors, save_adapter
from .layer import TuckerLoraLayer
from .model import TuckerLoraModel
from .ranks import RankAllocation, allocate_ranks
from .registry import TUCKER_LORA, register
from .resize import resize_adapter
from .targets import DEFAULT_TARGET_MODULES

register(TuckerLoraConfig, TuckerLoraModel)
# diffusers' save_lora_adapter / load_lora_adapter on Tucker-LoRA adapters (now, or once diffusers' loaders load)
tucker_lora_hook.when_imported("diffusers.loaders.peft", diffusers_api.install)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "TUCKER_LORA",
    "AdapterFileError",
    "InputError",
    "RankAllocation",
    "TuckerLoraConfig",
    "TuckerLoraLayer",
    "TuckerLoraModel",
    "allocate_ranks",
    "convert_to_lora",
    "resize_adapter",
    "check_safetensors",
    "hotswap_adapter",
    "save_adapter",
    "save_as_lora",
    "__version__",
]
