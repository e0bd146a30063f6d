"""The two backbones with their pipeline components: a tiny random pipeline, or a local diffusers folder.

- ``"unet3d"``: diffusers ``UNet3DConditionModel`` with ``TextToVideoSDPipeline`` (ModelScope /
  zeroscope text-to-video family);
- ``"animatediff"``: diffusers ``UNetMotionModel`` (a 2D UNet + ``MotionAdapter``) with
  ``AnimateDiffPipeline``.

Both take a VAE (``AutoencoderKL``), a CLIP text encoder and tokenizer, and a scheduler. ``tiny_components``
builds all of them from configs (the tokenizer from a vocabulary written here), with no download;
``load_components`` reads a local diffusers folder (``model_index.json`` + one subfolder per component)
and never touches the hub.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputError
from ..io import staged_directory
from .data import COLOURS, DIRECTIONS, SHAPES
from .tiny_unets import tiny_unet3d, tiny_unet_motion

__all__ = [
    "BACKBONES",
    "VideoComponents",
    "check_pipeline_folder",
    "encode_prompts",
    "generate",
    "gradient_checkpointing",
    "load_components",
    "tiny_components",
    "tiny_tokenizer",
]

BACKBONES = ("unet3d", "animatediff")
COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "unet")
#: The UNet class of each backbone (a ``UNet2DConditionModel`` becomes AnimateDiff with a motion adapter).
UNET_CLASSES = {"UNet3DConditionModel": "unet3d", "UNetMotionModel": "animatediff"}
#: Words the tiny tokenizer keeps whole (the synthetic captions); anything else is split into characters.
TINY_WORDS = ("a", "an", "the", "moving", "shape", *SHAPES, *COLOURS, *DIRECTIONS)


@dataclass
class VideoComponents:
    """What a text-to-video pipeline is made of; ``backbone`` is one of ``BACKBONES``."""

    backbone: str
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    unet: Any
    source: Optional[str] = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The pixel size the UNet was built for: its latent ``sample_size`` times the VAE's downsampling."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def pipeline(self, unet: Any = None) -> Any:
        """The diffusers pipeline of these components (``unet`` replaces the UNet, e.g. an adapted one)."""
        unet = self.unet if unet is None else unet
        parts = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, scheduler=self.scheduler)
        if self.backbone == "unet3d":
            from diffusers import TextToVideoSDPipeline

            with _quiet("diffusers.pipelines.pipeline_utils"):  # "deprecated after 0.33.1": it still works
                pipe = TextToVideoSDPipeline(unet=unet, **parts)
        else:
            with _quiet("transformers.utils.import_utils"):  # "CLIPImageProcessor requires torchvision": unused here
                from diffusers import AnimateDiffPipeline

            pipe = AnimateDiffPipeline(unet=unet, motion_adapter=None, **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, path: str | os.PathLike) -> Path:
        """``save_pretrained`` of the pipeline into ``path``, crash-safe (staged, then renamed into place)."""
        with staged_directory(path) as stage:
            self.pipeline().save_pretrained(stage, safe_serialization=True)
        return Path(path)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------------------------------------- tiny default
def tiny_tokenizer(words: Sequence[str] = TINY_WORDS, model_max_length: int = 32) -> Any:
    """A ``CLIPTokenizer`` built here: CLIP's byte-level alphabet, with ``words`` kept whole by BPE merges.

    Every text tokenizes (unknown words fall apart into byte-level characters); the vocabulary has
    ``<|startoftext|>`` (0), ``<|endoftext|>`` (1, also padding), the 512 single characters and the merges.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def text_config_for(tokenizer: Any) -> dict[str, int]:
    """The fields a CLIP text config takes from its tokenizer: vocabulary size, context length and the
    ``<|startoftext|>`` (0) / ``<|endoftext|>`` (1, also padding) ids of ``tiny_tokenizer``."""
    return dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_components(backbone: str = "unet3d", seed: int = 0) -> VideoComponents:
    """A tiny random pipeline from configs: 64x64 frames, an 8x downsampling VAE to 8x8x4 latents, a
    2-layer CLIP text encoder of width 32, a DDIM scheduler and ``tiny_unets.tiny_unet3d`` / ``tiny_unet_motion``.

    Deterministic given ``seed``; the caller's RNG state is left alone.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    tokenizer = tiny_tokenizer()
    unet = (tiny_unet3d if backbone == "unet3d" else tiny_unet_motion)(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=unet.config.in_channels,
            norm_num_groups=8,
            sample_size=unet.config.sample_size * 8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=unet.config.cross_attention_dim,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                **text_config_for(tokenizer),
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return VideoComponents(backbone, vae.eval(), text_encoder.eval(), tokenizer, scheduler, unet.eval())


# ---------------------------------------------------------------------------------------------- local folder
def _component_class(library: str, name: str) -> Any:
    return getattr(importlib.import_module(library), name)


def check_pipeline_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a local diffusers pipeline folder with every component; return its model index."""
    root = Path(path)
    if not root.exists():
        raise InputError(f"pretrained model path '{root}' does not exist (expected a local diffusers pipeline folder)")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise InputError(
            f"'{root}' is not a diffusers pipeline folder: it has no model_index.json "
            f"(expected model_index.json and the subfolders {', '.join(COMPONENTS)})"
        )
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise InputError(
            f"'{root}' lacks the subfolder{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"that a text-to-video pipeline needs ({', '.join(COMPONENTS)})"
        )
    return json.loads(index_file.read_text())


def load_components(
    path: str | os.PathLike, motion_adapter: Optional[str | os.PathLike] = None, torch_dtype: Any = None
) -> VideoComponents:
    """Load a local diffusers pipeline folder (no download): its VAE, text encoder, tokenizer, scheduler, UNet.

    The UNet's class picks the backbone: ``UNet3DConditionModel`` (text-to-video SD / zeroscope) or
    ``UNetMotionModel`` (AnimateDiff). A ``UNet2DConditionModel`` (a Stable Diffusion folder) becomes
    AnimateDiff with the ``MotionAdapter`` from ``motion_adapter`` (a folder) or the pipeline's own
    ``motion_adapter`` subfolder. Every missing piece is an ``InputError`` that names it.
    """
    root = Path(path)
    index = check_pipeline_folder(root)
    index_file = root / "model_index.json"
    unet_config = root / "unet" / "config.json"
    if not unet_config.is_file():
        raise InputError(f"'{root / 'unet'}' has no config.json")
    unet_class = json.loads(unet_config.read_text()).get("_class_name")
    kwargs: dict[str, Any] = dict(local_files_only=True)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype

    def load(name: str) -> Any:
        library, cls = index.get(name) or [None, None]
        if cls is None:
            raise InputError(f"'{index_file}' names no class for '{name}'")
        extra = {} if name in ("tokenizer", "scheduler") else kwargs
        return _component_class(library, cls).from_pretrained(root, subfolder=name, **extra)

    from diffusers import MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    if unet_class == "UNet3DConditionModel":
        backbone, unet = "unet3d", UNet3DConditionModel.from_pretrained(root, subfolder="unet", **kwargs)
    elif unet_class == "UNetMotionModel":
        backbone, unet = "animatediff", UNetMotionModel.from_pretrained(root, subfolder="unet", **kwargs)
    elif unet_class == "UNet2DConditionModel":
        adapter_dir = Path(motion_adapter) if motion_adapter else root / "motion_adapter"
        if not (adapter_dir / "config.json").is_file():
            raise InputError(
                f"'{root}' has a 2D UNet: AnimateDiff needs a motion adapter folder, and '{adapter_dir}' has no "
                "config.json (pass --motion_adapter_name_or_path)"
            )
        adapter = MotionAdapter.from_pretrained(adapter_dir, **kwargs)
        unet2d = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kwargs)
        backbone, unet = "animatediff", UNetMotionModel.from_unet2d(unet2d, adapter)
    else:
        raise InputError(
            f"'{unet_config}' is a {unet_class}: expected UNet3DConditionModel (text-to-video SD / zeroscope), "
            "UNetMotionModel or UNet2DConditionModel + a motion adapter (AnimateDiff)"
        )
    vae, text_encoder, tokenizer, scheduler = (load(n) for n in ("vae", "text_encoder", "tokenizer", "scheduler"))
    return VideoComponents(backbone, vae.eval(), text_encoder.eval(), tokenizer, scheduler, unet.eval(), str(root))


# ---------------------------------------------------------------------------------------------- use
@contextlib.contextmanager
def gradient_checkpointing(unet: Any) -> Iterator[str]:
    """Inside: the UNet recomputes its blocks in the backward instead of keeping their activations; the UNet is
    as it was after the block.

    diffusers' own switch where the model supports it (``UNetMotionModel``; switched off again after unless it
    was on before); otherwise (``UNet3DConditionModel`` in diffusers 0.42 refuses it) each down, mid and up
    block's forward runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved, so dropout
    replays the same mask), and each block's own ``forward`` is put back after. Yields which of the two is used,
    ``"diffusers"`` or ``"blocks"``.
    """
    if getattr(unet, "_supports_gradient_checkpointing", False):
        was_on = unet.is_gradient_checkpointing
        unet.enable_gradient_checkpointing()
        try:
            yield "diffusers"
        finally:
            if not was_on:
                unet.disable_gradient_checkpointing()
        return
    from torch.utils.checkpoint import checkpoint

    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    saved = [(block, block.__dict__.get("forward")) for block in blocks]  # an instance forward, if one was set
    for block in blocks:

        def forward(*args: Any, _forward: Any = block.forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = forward
    try:
        yield "blocks"
    finally:
        for block, own in saved:
            if own is None:
                del block.forward  # the class's forward again
            else:
                block.forward = own


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings (N, L, D) of ``prompts``, padded/truncated to the tokenizer's ``model_max_length``."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    negative_prompt: Optional[str] = None,
) -> list[tuple[str, int, np.ndarray]]:
    """Sample one video per (prompt, seed): ``[(prompt, seed, (T, H, W, 3) uint8)]``.

    Each video starts from the noise of a CPU ``torch.Generator`` seeded with its seed, so the same
    prompt and seed give the same video on any device and whatever else is sampled around it.
    ``negative_prompt`` replaces the empty prompt of classifier-free guidance.
    """
    from .media import to_uint8

    out = []
    for prompt in prompts:
        for seed in seeds:
            frames = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="np",
            ).frames[0]
            out.append((prompt, int(seed), to_uint8(frames)))
    return out
