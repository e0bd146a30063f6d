"""tucker-lora: five-mode Tucker-LoRA adapters for peft.

``import tucker_lora`` registers the method with peft under the name ``tucker_lora``
(``PeftType.TUCKER_LORA``), so ``get_peft_model``, ``PeftModel.from_pretrained`` and the rest of
peft's lifecycle work with ``TuckerLoraConfig``.
"""

from .config import TuckerLoraConfig
from .errors import AdapterFileError, InputError
from .export import convert_to_lora, save_as_lora
from .io import check_safetensors, save_adapter
from .layer import TuckerLoraLayer
from .model import TuckerLoraModel
from .ranks import RankAllocation, allocate_ranks
from .registry import TUCKER_LORA, register
from .resize import resize_adapter
from .targets import DEFAULT_TARGET_MODULES

register(TuckerLoraConfig, TuckerLoraModel)

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
    "save_adapter",
    "save_as_lora",
    "__version__",
]
