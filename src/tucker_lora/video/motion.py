"""``PixelSpaceVAE``: the identity "autoencoder" that lets a pixel-space UNet sit in a diffusers text-to-video
pipeline (and in ``tucker_lora.video.train`` / ``sample``) unchanged: latents are the pixels in ``[-1, 1]``.

Saved pipelines name the class by this module's path (``model_index.json``: ``["tucker_lora.video.motion",
"PixelSpaceVAE"]``, as in ``examples/motion_bases/unet3d``), so it stays here. diffusers is optional: the class is
built on first access.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PixelSpaceVAE"]  # noqa: F822  (built on first access, see __getattr__)


def _pixel_vae_class() -> Any:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.models.modeling_utils import ModelMixin

    class _Pixels:
        """A posterior with no spread: ``sample`` and ``mode`` are the pixels themselves."""

        def __init__(self, x: torch.Tensor) -> None:
            self.mean = x

        def sample(self, generator: Any = None) -> torch.Tensor:
            return self.mean

        def mode(self) -> torch.Tensor:
            return self.mean

    class PixelSpaceVAE(ModelMixin, ConfigMixin):
        """The identity autoencoder: ``encode(x).latent_dist.sample() = x``, ``decode(z).sample = z``.

        A pixel-space diffusion model in a diffusers text-to-video pipeline: ``block_out_channels`` of
        length 1 gives the pipelines a downsampling factor of 1, ``scaling_factor`` 1 leaves pixels in [-1, 1].
        """

        @register_to_config
        def __init__(self, channels: int = 3, block_out_channels: tuple[int, ...] = (3,), scaling_factor: float = 1.0):
            super().__init__()
            self.register_buffer("identity", torch.ones(()), persistent=True)  # gives the model a dtype / device

        def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
            dist = _Pixels(x)
            return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

        def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
            return DecoderOutput(sample=z) if return_dict else (z,)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    PixelSpaceVAE.__module__ = __name__
    PixelSpaceVAE.__qualname__ = "PixelSpaceVAE"
    return PixelSpaceVAE


def __getattr__(name: str) -> Any:  # diffusers is optional: the class is built on first use
    if name == "PixelSpaceVAE":
        cls = _pixel_vae_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
