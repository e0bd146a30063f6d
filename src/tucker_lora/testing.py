"""Test support: tiny video models built from configs (no downloads), their inputs and targets, and measuring
helpers for the tests and benchmarks.

No production module imports this one (``tests/test_layout.py`` checks it); it imports whatever it needs.

The three model families the tests adapt:

- ``tiny_unet3d``: diffusers ``UNet3DConditionModel`` (ModelScope / zeroscope); temporal Conv3d with
  kernel (3, 1, 1) inside ``temp_convs``, spatial Conv2d in the resnets.
- ``tiny_unet_motion``: diffusers ``UNetMotionModel`` from a ``UNet2DConditionModel`` and a
  ``MotionAdapter`` (AnimateDiff); Conv2d resnets, Linear layers in the motion modules.
- ``tiny_conv3d_net``: ``TinyConv3dNet``, a small UNet of full 3x3x3 Conv3d (VideoCrafter / video VAE style).

The two diffusers builders live in ``tucker_lora.video.tiny_unets`` (the training command line's default
pipeline uses them) and are re-exported here; diffusers is imported inside them. Every builder is
deterministic given its seed and leaves the caller's global RNG state alone.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .targets import default_target_names, minimal_suffixes
from .video.tiny_unets import SAMPLE_SIZE, tiny_unet3d, tiny_unet_motion

__all__ = [
    "BUILDERS",
    "TinyConv3dNet",
    "default_target_modules",
    "default_targets",
    "example_inputs",
    "model_output",
    "peak_memory_added",
    "saved_activation_bytes",
    "sharing_copy",
    "tiny_conv3d_net",
    "tiny_unet3d",
    "tiny_unet_motion",
]

#: Text tokens per prompt in ``example_inputs``.
TEXT_TOKENS = 3


class ResBlock3d(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with 3x3x3 convs (1x1x1 shortcut when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class TinyConv3dNet(nn.Module):
    """A small video UNet of full 3x3x3 ``nn.Conv3d`` (VideoCrafter / video VAE blocks).

    conv_in -> ResBlock3d -> downsample (stride 2 in t, h, w) -> ResBlock3d -> upsample (nearest,
    then a 3x3x3 conv) + skip -> GroupNorm, SiLU -> conv_out. ``forward(x)``: (N, C, T, H, W) -> same shape,
    for any T, H, W >= 1.
    """

    def __init__(self, in_channels: int = 4, channels: tuple[int, int] = (16, 32), groups: int = 8) -> None:
        super().__init__()
        c0, c1 = channels
        self.in_channels = in_channels
        self.conv_in = nn.Conv3d(in_channels, c0, 3, padding=1)
        self.block_in = ResBlock3d(c0, c0, groups)
        self.downsample = nn.Conv3d(c0, c1, 3, stride=2, padding=1)
        self.block_mid = ResBlock3d(c1, c1, groups)
        self.upsample = nn.Conv3d(c1, c0, 3, padding=1)
        self.norm_out = nn.GroupNorm(groups, c0)
        self.conv_out = nn.Conv3d(c0, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.block_in(self.conv_in(x))
        h = self.block_mid(self.downsample(skip))
        h = self.upsample(F.interpolate(h, size=skip.shape[2:], mode="nearest")) + skip
        return self.conv_out(F.silu(self.norm_out(h)))


def tiny_conv3d_net(seed: int = 0) -> TinyConv3dNet:
    """A ``TinyConv3dNet`` with 4 input channels and (16, 32) channels, deterministic given ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyConv3dNet()
    return model.eval()


#: The builders by short name (for parametrised tests and benchmarks).
BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "unet3d": tiny_unet3d,
    "unet_motion": tiny_unet_motion,
    "conv3d_net": tiny_conv3d_net,
}


def _is_diffusers(model: nn.Module, class_name: str) -> bool:
    return any(cls.__name__ == class_name and cls.__module__.startswith("diffusers") for cls in type(model).__mro__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The base model under a ``PeftModel`` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def default_target_modules(model: nn.Module) -> list[str]:
    """Full names of the layers ``default_targets`` selects (see there), in ``named_modules()`` order.

    Every Conv3d of a ``TinyConv3dNet``; for a diffusers model, its ``tucker_lora.DEFAULT_TARGET_MODULES`` entry.
    """
    model = _unwrap(model)
    if isinstance(model, TinyConv3dNet):
        return [name for name, module in model.named_modules() if isinstance(module, nn.Conv3d)]
    names = default_target_names(model)
    if names is None:
        raise TypeError(
            f"no default targets for a {type(model).__name__}: expected a TinyConv3dNet or a model class listed in "
            "tucker_lora.DEFAULT_TARGET_MODULES"
        )
    return names


def default_targets(model: nn.Module) -> list[str]:
    """Sensible ``target_modules`` for the three tiny models, as short peft name suffixes.

    - ``UNet3DConditionModel``: the temporal Conv3d (kernel (3, 1, 1)) of every ``temp_convs`` block and
      the resnet Conv2d ``conv1``/``conv2``;
    - ``UNetMotionModel``: the resnet Conv2d ``conv1``/``conv2`` and the motion-module Linear layers
      ``proj_in``, ``proj_out``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
    - ``TinyConv3dNet``: every Conv3d.

    The suffixes match exactly the layers ``default_target_modules`` lists (checked against
    ``model.named_modules()``), so they work both in ``TuckerLoraConfig(target_modules=...)`` and in a
    saved ``adapter_config.json``.
    """
    model = _unwrap(model)
    selected = default_target_modules(model)
    return minimal_suffixes((n for n, _ in model.named_modules()), selected)


def example_inputs(model: nn.Module, batch: int = 1, frames: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward call of ``model`` (deterministic given ``seed``).

    UNets: ``sample`` (batch, 4, frames, 8, 8), ``timestep`` (batch,) and ``encoder_hidden_states``
    (batch, 3, 32) for ``UNet3DConditionModel``, repeated per frame, (batch * frames, 3, 32), for
    ``UNetMotionModel``. ``TinyConv3dNet``: ``x`` (batch, C, frames, 8, 8).
    """
    model = _unwrap(model)
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyConv3dNet):
        return {"x": torch.randn(batch, model.in_channels, frames, SAMPLE_SIZE, SAMPLE_SIZE, generator=g)}
    config = model.config
    size = config.sample_size
    sample = torch.randn(batch, config.in_channels, frames, size, size, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=g)
    if _is_diffusers(model, "UNetMotionModel"):
        text = text.repeat_interleave(frames, dim=0)
    return {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**inputs)`` as one tensor: ``.sample`` of a diffusers output, the first entry of a tuple."""
    out = model(**inputs)
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def saved_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd keeps for the backward while ``fn()`` runs (``saved_tensors_hooks``).

    Parameters are excluded and each saved buffer counts once (the same storage saved by two ops is
    one allocation). Deterministic, unlike peak-memory readings (docs/design.md, "Memory").
    """
    total, seen = 0, set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.numel())
        if not isinstance(t, nn.Parameter) and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are the original's own tensors (the submodules are new).

    For benchmarks that time methods against each other: each method wraps its own copy of the model, and all
    of them compute with one set of weights, so no method is timed on weights placed elsewhere in memory (which
    alone can move a large conv's time by more than a low-rank adapter costs; docs/performance.md). Anything
    that trains the base weights needs its own copy.
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _proc_status_kb(field_name: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where there is no such file, off Linux)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``), so the resident size is what is in use
    and a later rise of it is new memory, not the reuse of freed pages. No-op elsewhere."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory_added(device: torch.device) -> Iterator[dict[str, float]]:
    """``{"peak_mb": ...}`` after the block: the most memory the block added over what was in use when it began,
    MiB. CUDA: max allocated less the allocated at the start; CPU (Linux): the process's peak RSS in the block
    less its RSS at the start, with the free heap released first (``_release_free_heap``); 0 elsewhere."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _release_free_heap()
        start = _proc_status_kb("VmRSS") * 1024
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
    else:
        out["peak_mb"] = max(0, _proc_status_kb("VmHWM") * 1024 - start) / 2**20
