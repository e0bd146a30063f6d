"""``TuckerLoraConfig``: the peft config of a Tucker-LoRA adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from peft.config import PeftConfig

from .decomposition import DECOMPOSITIONS
from .io import WEIGHTS_NAME, check_safetensors
from .registry import TUCKER_LORA
from .tucker import MODES, validate_ranks

#: Values of ``forward_mode``.
FORWARD_MODES: tuple[str, ...] = ("auto", "factored", "merged")
#: Values of ``init_weights`` this version understands.
INIT_CHOICES: tuple[object, ...] = (True, False, *DECOMPOSITIONS)


@dataclass
class TuckerLoraConfig(PeftConfig):
    """Configuration of a five-mode Tucker-LoRA adapter (``W~ = W + alpha * dW``).

    Args:
        ranks: ``(r_o, r_i, r_t, r_h, r_w)``, the Tucker rank per mode in the paper's order. Entries
            for modes a layer lacks are ignored (a Conv2d has no t, a Linear only o and i); a rank
            above the mode size is clipped to it; ``0`` on a kernel mode pins that mode to its
            centre tap (``r_t = 0`` on a Conv3d is the pseudo-3D adapter); ``r_o``/``r_i`` must be >= 1.
        alpha: scale of the update, ``W~ = W + alpha * dW`` (no division by rank; docs/design.md, "Scale").
        target_modules: module names (exact or suffix) or one regex, as in peft.
        exclude_modules: module names or a regex never to adapt.
        rank_pattern: ``{name or regex: ranks}`` overriding ``ranks`` per layer.
        alpha_pattern: ``{name or regex: alpha}`` overriding ``alpha`` per layer.
        init_weights: ``True``: orthonormal factors and a zero core (the model is unchanged);
            ``False``: a random non-zero core (a non-identity adapter, for tests); ``"hosvd"`` /
            ``"hooi"``: factors from the HOSVD (refined by HOOI) of the frozen base weight, spanning its
            leading mode subspaces, and a zero core (``tucker_lora.init``; gradient proxies:
            ``tucker_lora.init.init_from_gradients``).
        core_init_scale: with ``init_weights`` True, "hosvd" or "hooi", the core starts as ``core_init_scale * N(0, 1)``
            (the paper's small core) instead of zero.
        dropout: dropout on the adapter's input during training.
        modules_to_save: extra modules trained in full and saved with the adapter.
        forward_mode: how a plain conv computes ``W + alpha * dW``: ``"factored"`` (``base(x) + alpha *
            U_o . conv(U_i^T x, K)``), ``"merged"`` (one conv with the merged weight, a backward that
            never forms the full weight gradient) or ``"auto"`` (a cost model picks per layer and call).
            Grouped convs and Conv subclasses that override ``forward`` always run their own forward
            with the merged weight.
        freeze_modes: modes whose factors keep their init and take no gradient; with ``("i",)``
            the merged path keeps only ``U_i^T x`` (r_i channels) for the backward instead of ``x``.
    """

    ranks: tuple[int, int, int, int, int] = field(
        default=(4, 4, 1, 1, 1), metadata={"help": "Tucker ranks (r_o, r_i, r_t, r_h, r_w)."}
    )
    alpha: float = field(default=1.0, metadata={"help": "Scale of the update: W + alpha * dW."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (exact or suffix match) or a regex to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "{name or regex: ranks} per layer."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "{name or regex: alpha} per layer."})
    init_weights: Union[bool, str] = field(
        default=True, metadata={"help": "True: zero core (identity); False: random core; 'hosvd'/'hooi': from W."}
    )
    core_init_scale: float = field(default=0.0, metadata={"help": "Std of the initial core when init_weights=True."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    forward_mode: str = field(
        default="auto", metadata={"help": "'auto', 'factored' or 'merged': how plain convs compute the update."}
    )
    freeze_modes: tuple[str, ...] = field(
        default=(), metadata={"help": "Modes (of o, i, t, h, w) whose factors stay at their init."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = TUCKER_LORA
        self.ranks = validate_ranks(self.ranks, "ranks")
        self.rank_pattern = {k: validate_ranks(v, f"rank_pattern[{k!r}]") for k, v in self.rank_pattern.items()}
        self.alpha = _check_alpha(self.alpha, "alpha")
        self.alpha_pattern = {k: _check_alpha(v, f"alpha_pattern[{k!r}]") for k, v in self.alpha_pattern.items()}
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in INIT_CHOICES):
            raise ValueError(f"init_weights must be one of {INIT_CHOICES}, got {self.init_weights!r}")
        if not (isinstance(self.core_init_scale, (int, float)) and self.core_init_scale >= 0):
            raise ValueError(f"core_init_scale must be a number >= 0, got {self.core_init_scale!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        if isinstance(self.freeze_modes, str) or not all(m in MODES for m in self.freeze_modes):
            raise ValueError(f"freeze_modes must be a subset of {MODES}, got {self.freeze_modes!r}")
        self.freeze_modes = tuple(self.freeze_modes)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's ``adapter_config.json``, plus a model card (``README.md``) saying what the adapter is and how
        to load it (``tucker_lora.card``)."""
        from .card import write_model_card

        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory, self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config; for a local adapter folder, first check its weights file is intact.

        peft reads the config before the weights, so a truncated or corrupted
        ``adapter_model.safetensors`` is reported here with its path, before anything is loaded.
        """
        weights = Path(pretrained_model_name_or_path, subfolder or "", WEIGHTS_NAME)
        if weights.is_file():
            check_safetensors(weights)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def _check_alpha(alpha: object, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where} must be a finite number, got {alpha!r}")
    return float(alpha)
