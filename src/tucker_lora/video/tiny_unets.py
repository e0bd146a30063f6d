"""Tiny diffusers UNets built from configs (no downloads): the default backbone of the training command line.

``tiny_unet3d`` (text-to-video SD / zeroscope family) and ``tiny_unet_motion`` (AnimateDiff) are the UNets of
``tucker_lora.video.pipeline.tiny_components``, the pipeline ``examples/train_text_to_video.py`` trains when no
model is given; the tests and benchmarks build them too (through ``tucker_lora.testing``). diffusers is imported
inside the builders. Every builder is deterministic given its seed and leaves the caller's global RNG state alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["SAMPLE_SIZE", "redraw_zero_weights", "tiny_unet3d", "tiny_unet_motion"]

#: Spatial size, channels and text-embedding width shared by the two diffusers models.
SAMPLE_SIZE = 8
LATENT_CHANNELS = 4
CROSS_ATTENTION_DIM = 32
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


def redraw_zero_weights(model: nn.Module) -> nn.Module:
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
        redraw_zero_weights(model)
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
        redraw_zero_weights(model)
    return model.eval()
