"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) with accelerate's FSDP plugin.

The training script runs the frozen UNet sharded with FSDP2 when launched with an accelerate FSDP config
(``accelerate launch --config_file examples/accelerate_fsdp.yaml ...``, ``fsdp_version: 2``). accelerate
builds the plugin from the config, wraps the UNet's blocks (``TRANSFORMER_BASED_WRAP``) and swaps the
optimizer's parameters for the sharded ones. This module adds what the adapter needs on top:

- ``enable_fsdp``: on a machine without CUDA/XPU, accelerate drops the FSDP plugin and runs plain
  multi-CPU DDP; this switches its state to the FSDP2 path over the gloo process group (the same
  ``_prepare_fsdp2`` / ``fully_shard`` code that runs on GPUs), which is how the CPU tests shard.
- ``configure_wrap_policy``: the block classes to wrap (the UNet's down/mid/up blocks when the config names
  none; names the model does not have are dropped, so one config serves UNet3D and AnimateDiff).
- ``gather_adapter_state_dict`` / ``save_adapter_folder``: the full adapter on rank 0 (each tensor
  all-gathered, never the frozen base), written as the same peft ``save_pretrained`` folder a
  single-process run writes (staged, then renamed).
- ``ShardedCheckpointing``: accelerate ``save_state`` / ``load_state`` for the sharded model with adapter-only
  files. accelerate's own FSDP save would write the whole model (frozen base included) and has no
  adapter-only switch, so the model and optimizer are kept out of its hands and saved here in the
  single-process layout: ``adapter_model.safetensors`` and an ``optimizer.bin`` in ``Optimizer.state_dict()``
  form (full tensors, integer keys); scheduler, sampler, RNG and EMA states stay accelerate's.
- ``full_tensor`` / ``local_tensor`` / ``shard_like``: the EMA keeps shards of the same layout as the
  parameters, and full tensors in its ``state_dict``.

``enable_fsdp`` (on the CPU) and ``ShardedCheckpointing`` write accelerate's internal state
(``AcceleratorState.fsdp_plugin`` / ``distributed_type``, ``PartialState._shared_state``,
``Accelerator._models`` / ``_optimizers``), so both refuse an accelerate release outside
``ACCELERATE_TESTED`` with a message naming the installed version and the tested range
(``check_accelerate``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io import WEIGHTS_NAME

logger = logging.getLogger("tucker_lora.video.distributed")

__all__ = [
    "ACCELERATE_TESTED",
    "ShardedCheckpointing",
    "block_class_names",
    "broadcast_adapter_init",
    "check_accelerate",
    "configure_wrap_policy",
    "cpu_process_group",
    "enable_fsdp",
    "fsdp_requested",
    "full_tensor",
    "gather_adapter_state_dict",
    "load_adapter_state_dict",
    "local_tensor",
    "save_adapter_folder",
    "shard_like",
    "to_index_keys",
    "to_name_keys",
    "unsharded_root",
]

OPTIMIZER_FILE = "optimizer.bin"
#: First and last accelerate release (major, minor) whose internals ``enable_fsdp`` and ``ShardedCheckpointing``
#: write as they are written here: the FSDP block of ``AcceleratorState.__init__`` they mirror is the same from
#: 1.6 to 1.16, 1.6 refuses FSDP2 with a full state dict (the shipped config), and tests/test_fsdp.py passes on
#: 1.7.0, 1.8.0, 1.12.0 and 1.16.0.
ACCELERATE_TESTED = ((1, 7), (1, 16))


# ---------------------------------------------------------------------------------------------- tensors
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` is all-gathered (a collective: call on every rank)."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (the same storage), or the tensor itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (present on every rank) cut like ``like``: a ``DTensor`` with its mesh and placements, no
    communication; a plain tensor is only moved to ``like``'s device."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(like, dtensor):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None
    )


# ---------------------------------------------------------------------------------------------- launch
def check_accelerate(what: str, version: str | None = None) -> None:
    """Refuse an accelerate release outside ``ACCELERATE_TESTED`` (``what`` writes its internal state) with an
    ``InputError`` naming the installed version and the tested range. ``version``: ``accelerate.__version__``
    unless given."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        import accelerate

        version = accelerate.__version__
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = None
    (low_major, low_minor), (high_major, high_minor) = low, high = ACCELERATE_TESTED
    if release is None or not low <= release <= high:
        raise InputError(
            f"{what} writes accelerate's internal state and was tested on accelerate {low_major}.{low_minor} to "
            f"{high_major}.{high_minor}; accelerate {version} is installed. Install a tested release: "
            f"pip install 'accelerate>={low_major}.{low_minor},<{high_major}.{high_minor + 1}'"
        )


def fsdp_requested() -> bool:
    """True when accelerate was asked for FSDP (``accelerate launch`` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def cpu_process_group() -> bool:
    """Whether to ask accelerate for a CPU (gloo) process group: a launch on a machine without CUDA or XPU with
    several processes, or with an FSDP config under ``accelerate launch`` / ``torchrun`` (one process included).

    accelerate runs several CPU processes together only when told the run is on the CPU; without this each
    process would train alone. Other single-process runs keep accelerate's own device choice.
    """
    xpu = getattr(torch, "xpu", None)
    if torch.cuda.is_available() or (xpu is not None and xpu.is_available()):
        return False
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (launched and fsdp_requested())


def enable_fsdp(accelerator: Any) -> bool:
    """True when this run shards the model with FSDP2; on a CPU process group, switch accelerate to FSDP2.

    FSDP1 (``fsdp_version: 1``) is refused: its flat parameters need ``use_orig_params`` to mix frozen and
    trainable weights, and this script gathers and checkpoints the adapter through FSDP2's DTensors.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested():
        return False
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        check_accelerate("FSDP2 on the CPU (tucker_lora.video.distributed.enable_fsdp)")
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        if plugin.fsdp_version == 2 and accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
        logger.info("FSDP2 on the CPU process group (gloo): accelerate's FSDP path with fully_shard")
    if state.distributed_type != DistributedType.FSDP:
        raise InputError(
            f"an FSDP config was given but accelerate runs {state.distributed_type} "
            "(launch with `accelerate launch --config_file examples/accelerate_fsdp.yaml ...`)"
        )
    if state.fsdp_plugin.fsdp_version != 2:
        raise InputError(
            f"fsdp_version {state.fsdp_plugin.fsdp_version} in the accelerate config: sharded Tucker-LoRA training "
            "needs FSDP2 (fsdp_version: 2, see examples/accelerate_fsdp.yaml)"
        )
    return True


# ---------------------------------------------------------------------------------------------- wrapping
def block_class_names(unet: torch.nn.Module) -> list[str]:
    """Class names of the UNet's down, mid and up blocks, in that order without repeats (the FSDP units)."""
    blocks = [*getattr(unet, "down_blocks", []), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", [])]
    return list(dict.fromkeys(type(b).__name__ for b in blocks if b is not None))


def configure_wrap_policy(accelerator: Any, unet: torch.nn.Module) -> list[str]:
    """Wrap at the UNet's blocks: set the plugin's class names to those of this UNet; returns them.

    With ``TRANSFORMER_BASED_WRAP`` and no ``fsdp_transformer_layer_cls_to_wrap``, the UNet's own block classes;
    configured names the UNet lacks (the other backbone's) are dropped; none left is an error naming both
    lists. Other policies (``SIZE_BASED_WRAP``, ``NO_WRAP``) are left as configured.
    """
    plugin = accelerator.state.fsdp_plugin
    present = block_class_names(unet)
    if not _is_transformer_wrap(plugin.auto_wrap_policy):
        return []
    configured = plugin.transformer_cls_names_to_wrap
    if not configured:
        names = present
    else:
        classes = {type(m).__name__ for m in unet.modules()}
        names = [n.strip() for n in configured if n.strip() in classes]
        if not names:
            raise InputError(
                f"fsdp_transformer_layer_cls_to_wrap {list(configured)} names no module of the "
                f"{type(unet).__name__}; its blocks are {present}"
            )
    plugin.transformer_cls_names_to_wrap = names
    logger.info("FSDP2 units: %s (and the root for the rest)", ", ".join(names))
    # FSDP2 warns that these blocks (and the root) return views, which an in-place op would cut off from the
    # backward hooks; diffusers' UNet3D and UNetMotionModel only collect them into tuples (the sharded run
    # matches DDP's gradients, tests/test_fsdp.py), so the warning is silenced for these classes only.
    wrapped = "|".join(re.escape(n) for n in [*names, "PeftModel"])
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \(FSDP({wrapped})\) returned a view tensor")
    return names


def _is_transformer_wrap(policy: Any) -> bool:
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    return (policy.func if isinstance(policy, functools.partial) else policy) is transformer_auto_wrap_policy


def broadcast_adapter_init(model: torch.nn.Module, device: torch.device | str) -> None:
    """Copy rank 0's adapter (trainable) parameters to every rank before sharding, through ``device`` (NCCL
    needs device tensors; the model may still be on the CPU).

    ``fully_shard`` keeps each rank's own slice of its local tensors (DDP broadcasts rank 0's instead); the
    seeds make the inits equal already, this makes it hold for any init.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    buffer = p.data.to(device)
                    dist.broadcast(buffer, src=0)
                    p.data.copy_(buffer)


@contextlib.contextmanager
def unsharded_root(model: torch.nn.Module) -> Iterator[None]:
    """Unshard the FSDP root's own parameters for calls that bypass its forward (the pipeline calls the UNet
    inside the peft model); the blocks gather theirs in their own hooks. Every rank must take part."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ---------------------------------------------------------------------------------------------- adapter
def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _peft_model(model: torch.nn.Module) -> Any:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _adapter_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of the model's state dict that belong to the adapter (the tuner's prefix), base excluded."""
    prefix = _peft_model(model).base_model.prefix
    for key, value in model.state_dict().items():
        if prefix in key:
            yield key, value


def gather_adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full adapter tensors (model keys, adapter name included) on rank 0, on the CPU; ``{}`` elsewhere.

    A collective: every rank calls it. Each adapter tensor is all-gathered on its own, so no rank ever holds
    the frozen base in full (what ``get_model_state_dict(full_state_dict=True)`` of the whole model would do).
    """
    rank0, out = _is_rank0(), {}
    for key, value in _adapter_items(model):
        full = full_tensor(value.detach())
        if rank0:
            out[key] = full.cpu().clone()
    return out


def save_adapter_folder(accelerator: Any, model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter as a peft ``save_pretrained`` folder on the main process, staged then renamed.

    Call on every process: a sharded model's adapter is gathered first (the other processes only help).
    """
    from ..io import save_adapter

    peft_model = _peft_model(model)
    kwargs: dict[str, Any] = {"save_embedding_layers": False}
    if getattr(accelerator, "is_fsdp2", False):
        kwargs["state_dict"] = gather_adapter_state_dict(model)
    if accelerator.is_main_process:
        save_adapter(peft_model, directory, **kwargs)


def load_adapter_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a peft adapter state dict (``load_peft_weights`` keys, full tensors on every rank) into a possibly
    sharded model: peft's key mapping, then each rank keeps its own shard. Keys that do not fit are an error
    naming ``source``."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    peft_model = _peft_model(model)
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    remapped = tuner._remap_adapter_state_dict_for_load(peft_model, config, name, dict(state_dict))
    expected = {key: value.shape for key, value in _adapter_items(model)}
    missing = sorted(set(expected) - set(remapped))
    unexpected = sorted(set(remapped) - set(expected))
    wrong = sorted(k for k in set(expected) & set(remapped) if tuple(remapped[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise InputError(
            f"adapter in '{source}' does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}"
        )
    set_model_state_dict(model, remapped, options=StateDictOptions(full_state_dict=True, strict=False))


# ---------------------------------------------------------------------------------------------- checkpoints
def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def _optimizer_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of the optimizer's parameters, in its order (torch's state-dict FQNs)."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    names = {id(p): n for n, p in fsdp2_canonicalize_names(dict(model.named_parameters())).items()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise RuntimeError("the optimizer holds a parameter that is not the sharded model's") from None


def to_index_keys(full: dict[str, Any]) -> dict[str, Any]:
    """torch's full optimizer state (parameter names as keys) -> ``Optimizer.state_dict()`` form (indices)."""
    order = [fqn for group in full["param_groups"] for fqn in group["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    return {
        "state": {index[fqn]: value for fqn, value in full["state"].items()},
        "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in full["param_groups"]],
    }


def to_name_keys(state: dict[str, Any], fqns: list[str], source: str) -> dict[str, Any]:
    """``Optimizer.state_dict()`` form -> torch's full optimizer state keyed by the names ``fqns``."""
    count = sum(len(g["params"]) for g in state["param_groups"])
    if count != len(fqns):
        raise InputError(f"optimizer state in '{source}' holds {count} parameters, the adapter has {len(fqns)}")
    return {
        "state": {fqns[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]],
    }


class ShardedCheckpointing:
    """accelerate ``save_state`` / ``load_state`` of an FSDP2 run, with adapter-only files.

    The adapter and the optimizer state are gathered to rank 0 and written in the single-process layout
    (``adapter_model.safetensors`` + ``adapter_config.json``, ``optimizer.bin`` with integer keys); accelerate
    writes the rest (LR scheduler, data sampler, RNG states per process, registered objects such as the EMA)
    with the model and optimizer hidden from it, since its FSDP save would write the frozen base too.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any) -> None:
        check_accelerate("Adapter-only sharded checkpoints (tucker_lora.video.distributed.ShardedCheckpointing)")
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer

    @contextlib.contextmanager
    def _hidden(self) -> Iterator[None]:
        acc = self.accelerator
        if not (hasattr(acc, "_models") and hasattr(acc, "_optimizers")):
            raise RuntimeError("this accelerate version keeps no _models/_optimizers: cannot save adapter-only state")
        models, optimizers = acc._models, acc._optimizers
        acc._models, acc._optimizers = [], []
        try:
            yield
        finally:
            acc._models, acc._optimizers = models, optimizers

    def save_state(self, output_dir: str) -> None:
        """Every process: gather, let accelerate save its part; the main process writes adapter and optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        adapter = gather_adapter_state_dict(self.model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, the others {}
        optim = get_optimizer_state_dict(self.model, _inner_optimizer(self.optimizer), options=options)
        with self._hidden():
            self.accelerator.save_state(output_dir)
        if self.accelerator.is_main_process:
            _peft_model(self.model).save_pretrained(output_dir, state_dict=adapter, save_embedding_layers=False)
            torch.save(to_index_keys(optim), Path(output_dir) / OPTIMIZER_FILE)

    def load_state(self, input_dir: str) -> None:
        """Every process: accelerate's part, then the adapter (each rank its shard) and the optimizer."""
        from peft.utils import load_peft_weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for name in (WEIGHTS_NAME, OPTIMIZER_FILE):
            if not (Path(input_dir) / name).is_file():
                raise InputError(f"checkpoint '{input_dir}' has no {name}")
        with self._hidden():
            self.accelerator.load_state(input_dir)
        load_adapter_state_dict(self.model, load_peft_weights(input_dir, device="cpu"), input_dir)
        inner = _inner_optimizer(self.optimizer)
        state = torch.load(Path(input_dir) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        full = to_name_keys(state, _optimizer_fqns(self.model, inner), input_dir)
        set_optimizer_state_dict(self.model, inner, full, options=StateDictOptions(full_state_dict=True))
