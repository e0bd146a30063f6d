"""Tiny video models built from configs (no downloads), for tests, the demo and benchmarks.

Three families from DESIGN.md section 5:

- ``tiny_unet3d``: diffusers ``UNet3DConditionModel`` (ModelScope / zeroscope); temporal Conv3d with
  kernel (3, 1, 1) inside ``temp_convs``, spatial Conv2d in the resnets.
- ``tiny_unet_motion``: diffusers ``UNetMotionModel`` from a ``UNet2DConditionModel`` and a
  ``MotionAdapter`` (AnimateDiff); Conv2d resnets, Linear layers in the motion modules.
- ``tiny_conv3d_net``: ``TinyConv3dNet``, a small UNet of full 3x3x3 Conv3d (VideoCrafter / video VAE style).

diffusers is optional: it is imported inside the functions that need it. Every builder is
deterministic given its seed and leaves the caller's global RNG state alone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .targets import default_target_names

__all__ = [
    "saved_activation_bytes",
    "sharing_copy",
    "TinyConv3dNet",
    "BUILDERS",
    "default_target_modules",
    "default_targets",
    "example_inputs",
    "minimal_suffixes",
    "model_output",
    "tiny_conv3d_net",
    "tiny_unet3d",
    "tiny_unet_motion",
]

#: Spatial size, channels and text-embedding width shared by the two diffusers models.
SAMPLE_SIZE = 8
LATENT_CHANNELS = 4
CROSS_ATTENTION_DIM = 32
TEXT_TOKENS = 3
#: Sizes shared by the tiny 3D UNet and the 2D UNet under the motion model.
_UNET_SIZES: dict[str, Any] = dict(
    sample_size=SAMPLE_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=CROSS_ATTENTION_DIM,
    attention_head_dim=8,
)


def _redraw_zero_weights(model: nn.Module) -> nn.Module:
    """Re-initialise (torch's default init) every Linear/Conv whose weight is all zero.

    diffusers zero-initialises some output layers (e.g. the last conv of each ``temp_convs`` block of
    ``UNet3DConditionModel``) so a fresh block is an identity; in a trained checkpoint they are not zero.
    Redrawing them keeps every path of the tiny model live, so an adapter anywhere changes the output.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not module.weight.any():
                module.reset_parameters()
    return model


def tiny_unet3d(seed: int = 0) -> Any:
    """A tiny ``diffusers.UNet3DConditionModel`` (ModelScope / zeroscope text-to-video family).

    Two resolution levels (32, 64 channels), one layer per block, 8x8 latents with 4 channels,
    text embeddings of width 32. About 1.3 M parameters. Input ``sample``: (N, 4, T, 8, 8).
    """
    from diffusers import UNet3DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet3DConditionModel(
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            **_UNET_SIZES,
        )
        _redraw_zero_weights(model)
    return model.eval()


def tiny_unet_motion(seed: int = 0) -> Any:
    """A tiny ``diffusers.UNetMotionModel`` (AnimateDiff): a tiny ``UNet2DConditionModel`` + ``MotionAdapter``.

    Same sizes as ``tiny_unet3d``; motion modules with 2 heads and sequences of up to 16 frames.
    Input ``sample``: (N, 4, T, 8, 8); ``encoder_hidden_states`` are per frame, (N * T, 3, 32),
    as the AnimateDiff pipeline passes them.
    """
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **_UNET_SIZES,
        )
        adapter = MotionAdapter(
            block_out_channels=(32, 64),
            motion_layers_per_block=1,
            motion_num_attention_heads=2,
            motion_norm_num_groups=8,
            motion_max_seq_length=16,
            use_motion_mid_block=True,
        )
        # from_unet2d casts with .to(dtype), which logs a spurious "keep in float32: []" warning
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model = UNetMotionModel.from_unet2d(unet, adapter)
        finally:
            quiet.setLevel(level)
        _redraw_zero_weights(model)
    return model.eval()


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
    one allocation). Deterministic, unlike peak-memory readings.
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
    of them compute with one set of weights. Separate copies of one frozen layer, timed against each other,
    differ by up to 8% (a 1280-channel 3x3x3 Conv3d on this project's CPU) from where their weights land in
    memory alone, more than a low-rank adapter costs. Anything that trains the base weights needs its own copy.
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=shared)
