"""Registration of Tucker-LoRA in peft's tuner registry, without editing peft's files.

peft keys its registry on members of the ``PeftType`` enum. We add a real member
``PeftType.TUCKER_LORA`` (so ``config.peft_type.value``, ``PeftType("TUCKER_LORA")``,
``PeftType["TUCKER_LORA"]`` and ``list(PeftType)`` behave as for built-in methods), then call
peft's own ``register_peft_method``. Both steps are idempotent (docs/design.md, "In peft").
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

NAME = "tucker_lora"
PREFIX = "tucker_lora_"


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it as a genuine enum member first if it is missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13 keeps its own bookkeeping
        PeftType._add_member_(name, member)
    else:
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


TUCKER_LORA: PeftType = extend_peft_type(NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Put the config and tuner classes into peft's mappings (once per process)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if TUCKER_LORA in PEFT_TYPE_TO_TUNER_MAPPING:
        # already registered (e.g. the package was reloaded): point peft at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[TUCKER_LORA] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[TUCKER_LORA] = model_cls
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
