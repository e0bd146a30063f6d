"""Fine-tuning and sampling text-to-video diffusion models with Tucker-LoRA (the ``video`` extra).

One module per job; diffusers, transformers, accelerate and PyAV are imported inside them, never by
``import tucker_lora``:

- ``data``: video readers (MSR-VTT, a folder of videos with ``captions.csv``) and the synthetic
  moving-shapes dataset, all yielding ``{"pixel_values": (3, T, R, R) in [-1, 1], "caption": str}``;
- ``pipeline``: the backbones (diffusers ``UNet3DConditionModel`` with its text-to-video pipeline,
  AnimateDiff's ``UNetMotionModel``): a tiny random pipeline built from configs with a local tokenizer,
  loading a local diffusers folder, prompt encoding and sampling;
- ``tiny_unets``: the tiny UNets of that random pipeline, built from configs;
- ``adapters``: the adapter config per method (Tucker-LoRA, or peft LoRA at a matched parameter count);
- ``ema``: exponential moving average of the adapter parameters;
- ``checkpoint``: crash-safe accelerate checkpoints;
- ``metrics``: the per-step JSONL log and peak memory;
- ``distributed``: FSDP2 sharding through accelerate and gathering the adapter of a sharded model;
- ``media``: MP4 / GIF writing and the PNG grid of frames t=0 / mid / end;
- ``motion``: the identity pixel-space VAE of the pixel-space demo base (``examples/motion_bases/unet3d``);
- ``train`` / ``sample``: the command lines behind ``examples/train_text_to_video.py`` and
  ``examples/sample_text_to_video.py``.
"""

from ..errors import InputError  # the package's input error, importable here as before

__all__ = ["InputError"]
