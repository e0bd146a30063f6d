"""Export a Tucker-LoRA adapter as a plain LoRA (peft, diffusers or kohya keys), exactly or truncated.

``convert_to_lora`` gives peft's ``(LoraConfig, state_dict)``; ``save_as_lora`` writes a file in one of
``FORMATS``; ``python -m tucker_lora.export ADAPTER_DIR OUT --format kohya`` does it from the command line.
The math is in ``tucker_lora.lowrank`` and ``docs/export.md``.
"""

from .convert import convert_to_lora
from .write import FORMATS, save_as_lora

__all__ = ["FORMATS", "convert_to_lora", "save_as_lora"]
