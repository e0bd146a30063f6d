"""``TuckerLoraModel``: the peft tuner that puts ``TuckerLoraLayer`` into a model."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import get_pattern_key
from torch import nn

from . import diffusers_api
from .config import TuckerLoraConfig
from .decomposition import DECOMPOSITIONS
from .init import init_from_weights
from .layer import TuckerLoraLayer, logger
from .registry import PREFIX
from .targets import adaptable_layer, required_default_targets
from .tucker import MODES, block_diagonal_core, orthonormalise


class TuckerLoraModel(BaseTuner):
    """Adds five-mode Tucker-LoRA adapters to the Linear / Conv1d / Conv2d / Conv3d layers of a model.

    Use it through peft: ``get_peft_model(model, TuckerLoraConfig(...))``.
    """

    prefix: str = PREFIX
    tuner_layer_cls = TuckerLoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: TuckerLoraConfig, model_config: dict) -> TuckerLoraConfig:
        if peft_config.target_modules is None:
            names = required_default_targets(self.model)
            logger.info("target_modules=None: %d default targets for %s", len(names), type(self.model).__name__)
            peft_config.target_modules = set(names)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: TuckerLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        ranks = _pattern_value(peft_config.rank_pattern, current_key, peft_config.ranks)
        alpha = _pattern_value(peft_config.alpha_pattern, current_key, peft_config.alpha)
        kwargs = dict(
            ranks=ranks,
            alpha=alpha,
            dropout=peft_config.dropout,
            # HOSVD / HOOI run once for the whole model in inject_adapter (a progress bar over layers)
            init_weights=True if peft_config.init_weights in DECOMPOSITIONS else peft_config.init_weights,
            core_init_scale=peft_config.core_init_scale,
            forward_mode=peft_config.forward_mode,
            freeze_modes=peft_config.freeze_modes,
        )
        if isinstance(target, TuckerLoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        adaptable_layer(target, current_key)
        new_module = TuckerLoraLayer(target, adapter_name, layer_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, then HOSVD / HOOI of every adapted base weight when the config asks for it.

        Skipped for adapters about to be overwritten by a checkpoint (inference mode, the default of
        ``PeftModel.from_pretrained``, or ``low_cpu_mem_usage``).
        """
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        diffusers_api.install()  # a diffusers model's save_lora_adapter must know Tucker-LoRA adapters
        config = self.peft_config[adapter_name]
        low_cpu_mem_usage = kwargs.get("low_cpu_mem_usage", args[1] if len(args) > 1 else False)
        if config.init_weights in DECOMPOSITIONS and not config.inference_mode and not low_cpu_mem_usage:
            init_from_weights(model, config.init_weights, adapter_name)

    # ------------------------------------------------------------------ loading
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: TuckerLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft's key remapping, then a shape check that names the layer, the tensor and both shapes."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict()
        for key, value in remapped.items():
            expected = model_state.get(key)
            if expected is not None and expected.shape != value.shape:
                layer, _, tensor = key.rpartition(f".{PREFIX}")
                raise ValueError(
                    f"checkpoint does not fit layer '{layer.removeprefix('base_model.model.')}': "
                    f"{PREFIX}{tensor.removesuffix('.' + adapter_name)} has shape {tuple(value.shape)} in the "
                    f"checkpoint but {tuple(expected.shape)} in the model (ranks or base model differ)"
                )
        return remapped

    # ------------------------------------------------------------------ merge
    def _tucker_layers(self) -> list[tuple[str, TuckerLoraLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, TuckerLoraLayer)]

    def _check_merge_finite(self, adapter_names: Optional[Sequence[str]]) -> None:
        """Before merging anything: every layer's ``W + alpha * dW`` must be finite."""
        for _, layer in self._tucker_layers():
            names = adapter_names if adapter_names is not None else layer.active_adapters
            weight = layer.get_base_layer().weight
            for name in names:
                if name in layer.tucker_lora_core and name not in layer.merged_adapters:
                    if not torch.isfinite(weight + layer.get_delta_weight(name)).all():
                        raise ValueError(
                            f"layer '{layer.layer_name}': merging adapter '{name}' gives NaN/inf weights; "
                            "nothing was merged"
                        )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge and safe_merge:
            self._check_merge_finite(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ------------------------------------------------------------------ combination
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` with ``dW = sum_a weights[a] * alpha_a * dW_a`` on every layer, exactly.

        A weighted sum of Tucker tensors is a Tucker tensor: factors concatenated per mode, the
        weighted cores on the block diagonal of a larger core (then re-orthonormalised, which also
        clips each rank to its mode size without error). Modes pinned in every summand stay pinned.
        The new adapter has ``alpha = 1`` and per-layer ranks in its ``rank_pattern``.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter '{adapter_name}' already exists")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"adapter '{name}' does not exist")
            if self.peft_config[name].modules_to_save:
                raise ValueError(
                    f"adapter '{name}' has modules_to_save, whose full weights cannot be combined as a Tucker sum"
                )

        combined: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        rank_pattern: dict[str, tuple[int, ...]] = {}
        for key, layer in self._tucker_layers():
            present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.tucker_lora_core]
            if not present:
                continue
            mrs = [layer.mode_ranks[a] for a, _ in present]
            shared = [all(mr.pinned[n] for mr in mrs) for n in range(len(mrs[0].modes))]
            with torch.no_grad():
                cores = [w * layer.alpha[a] * layer.tucker_lora_core[a].float() for a, w in present]
                per_adapter = [[U.float() for U in layer.factors(a)] for a, _ in present]
                factors = [
                    per_adapter[0][n] if shared[n] else torch.cat([f_a[n] for f_a in per_adapter], dim=1)
                    for n in range(len(shared))
                ]
                core, factors = orthonormalise(block_diagonal_core(cores, shared), factors, keep=shared)
            combined[key] = (core, factors)
            by_mode = {m: (0 if shared[n] else core.shape[n]) for n, m in enumerate(mrs[0].modes)}
            rank_pattern[re.escape(key)] = tuple(by_mode.get(m, 1) for m in MODES)

        base = self.peft_config[adapters[0]]
        config = copy.deepcopy(base)
        config.target_modules = set(combined)
        config.exclude_modules = None
        config.rank_pattern = rank_pattern
        config.alpha = 1.0
        config.alpha_pattern = {}
        config.init_weights = True
        config.core_init_scale = 0.0
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)

        for key, layer in self._tucker_layers():
            if key not in combined:
                continue
            core, factors = combined[key]
            with torch.no_grad():
                layer.tucker_lora_core[adapter_name].copy_(core)
            layer.set_factors(adapter_name, factors)


def _pattern_value(pattern: dict, key: str, default):
    """peft's pattern rule: the value of the first pattern matching the module ``key``, else ``default``."""
    return pattern.get(get_pattern_key(pattern.keys(), key), default)
