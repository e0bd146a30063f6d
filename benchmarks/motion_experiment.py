"""Does temporal rank matter? A small video diffusion model pretrained on one motion law, adapted to another.

Domain A: shapes crossing the frame horizontally as captioned ("a red circle moving left"); domain B: the same
clips played backwards, so "moving left" moves right (``Config.law_b``; ``"vertical"`` is the other law on
offer). Every frame of a B clip is a frame of its A twin (``motion_laws``): only the order of the
frames tells the domains apart. Pixel space, 8 frames of 16x16.

1. Pretrain two bases on A (safetensors in ``examples/motion_bases`` when made with the run's configuration,
   else cached under ``--cache``; later runs skip pretraining, a longer one continues a shorter): a diffusers
   ``UNet3DConditionModel`` (Conv2d + temporal Conv3d (3,1,1) + attention) and a small UNet of full 3x3x3
   Conv3d (``CondConv3dUNet``). Pretraining checks with the motion estimator that samples move as A says.
2. Adapt each base to B with every method, the same steps, lr schedule, data order, noise and seeds:
   Tucker-LoRA (4,4,r_t,1,1) for r_t in {0, 1, 3}, (8,8,3,1,1), (8,8,3,3,3); peft LoRA and LyCORIS
   LoCon-Tucker with per-layer ranks matched to Tucker (8,8,3,3,3)'s parameter count (within 1%); full
   fine-tuning; per-layer ranks from ``tucker_lora.allocate_ranks`` (gradient or weight proxy) at the parameter
   counts of (4,4,1,1,1) and (8,8,3,3,3). Targets: the convolutions only; then with the attention / conditioning
   Linear layers too.
3. Metrics: held-out denoising loss on B (fixed clips, timesteps and noise: deterministic) against steps;
   motion score of DDIM samples of B prompts (fraction moving in the prompt's direction, velocity error in
   pixels per frame); trainable parameters, training wall time, training memory (the peak that training adds over
   the model and data at rest). Mean and std over seeds.

Outputs in ``--out``: ``results.md`` (the table), ``results.json``, ``loss_<backbone>.png`` (held-out loss
against steps per method), ``grid_<backbone>.png`` (A-base / B-target / B-base / each method).

    python benchmarks/motion_experiment.py --quick --out outputs/motion_quick     # < 3 min: checks the pipeline
    python benchmarks/motion_experiment.py --out outputs/motion                   # the full run (CPU, < 45 min)
    python benchmarks/motion_experiment.py --preset cpu-long --out outputs/motion_long     # 2-3x the steps
    python benchmarks/motion_experiment.py --device cuda --preset gpu --backbones unet3d --max_minutes 3 \
        --out outputs/motion_gpu          # H100: pretraining (at most 3 min of training) + 3 min of runs
    python benchmarks/motion_experiment.py report outputs/motion                  # the tables of finished runs
    python benchmarks/motion_experiment.py --methods allocated --merge --out outputs/motion   # add methods to it

Helpers for ``make demo``: ``base`` (the pretrained UNet3D pipeline folder: pretrain once and cache),
``domain`` (domain-B clips as GIFs + captions.csv for ``examples/train_text_to_video.py --data_dir``),
``compare`` (the demo picture: every frame of the base's and the adapter's samples of the same prompts and noise,
against the motion the adapter's domain asks for, with a check or a cross from the motion estimator).
``report`` prints the tables of finished runs (as in the README).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from motion_laws import LAWS, MotionDomainDataset, estimate_motion, law_velocity, motion_score
from torch import nn

from tucker_lora.testing import peak_memory_added

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("unet3d", "conv3d")
#: Pretrained bases in the repository (``python benchmarks/motion_experiment.py`` made them with the "cpu" preset),
#: used by any run whose base configuration is the same; the UNet3D is also the base of ``make demo``.
SHIPPED_BASES = {b: ROOT / "examples" / "motion_bases" / b for b in BACKBONES}
#: Pixel-space noise schedule (DDPM's linear betas), v-prediction (``v = sqrt(ab) eps - sqrt(1 - ab) x_0``: at high
#: noise the model predicts x_0 itself, so few-step DDIM sampling gets the colours right); x_0 clipped to [-1, 1].
SCHEDULER = dict(
    prediction_type="v_prediction",
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=True,
    set_alpha_to_one=False,
    steps_offset=1,
)


# ---------------------------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """Sizes, steps and seeds of a run (``PRESETS``); identical for every method."""

    resolution: int = 16
    frames: int = 8
    unet3d_channels: tuple[int, int] = (16, 32)
    conv3d_channels: tuple[int, int] = (16, 32)
    # the UNet3D needs the larger batch: at batch 8 and lr 2e-3 it had not tied motion to the caption after 2500
    # steps; at batch 32 and lr 1e-3 (on a GPU) 81% of its samples moved as prompted after 1250
    pretrain_steps: dict[str, int] = field(default_factory=lambda: {"unet3d": 1250, "conv3d": 6000})
    pretrain_batch: dict[str, int] = field(default_factory=lambda: {"unet3d": 32, "conv3d": 16})
    pretrain_lr: dict[str, float] = field(default_factory=lambda: {"unet3d": 1e-3, "conv3d": 2e-3})
    pretrain_check_every: int = 250
    pretrain_max_minutes: float = 0.0  # stop pretraining (at a check) after this much training time; 0: no limit
    num_train_a: int = 2048
    num_train_b: int = 512
    num_heldout: int = 24
    heldout_timesteps: tuple[int, ...] = (100, 300, 500, 700)
    steps: dict[str, int] = field(default_factory=lambda: {"unet3d": 300, "conv3d": 600})
    batch: int = 8
    lr: float = 2e-3
    eval_every: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 8
    inference_steps: int = 15
    guidance: float = 3.0
    caption_dropout: float = 0.1
    law_b: str = "reversed"
    methods: tuple[str, ...] = ()

    def base_key(self, backbone: str) -> str:
        """Cache key of a pretrained base: what it depends on."""
        blob = {f: getattr(self, f) for f in ("resolution", "frames", f"{backbone}_channels", "num_train_a")}
        blob["caption_dropout"] = self.caption_dropout
        for f in ("pretrain_batch", "pretrain_lr", "pretrain_steps"):
            blob[f] = getattr(self, f)[backbone]
        blob = json.dumps(blob, sort_keys=True)
        return f"{backbone}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


CONV_METHODS = (
    "tucker (4,4,0,1,1)",
    "tucker (4,4,1,1,1)",
    "tucker (4,4,3,1,1)",
    "tucker (8,8,3,1,1)",
    "tucker (8,8,3,3,3)",
    "LoRA ~ tucker (8,8,3,3,3)",
    "LyCORIS ~ tucker (8,8,3,3,3)",
    "full fine-tuning",
)
LINEAR_METHODS = ("tucker (4,4,0,1,1) +linear", "tucker (4,4,3,1,1) +linear", "LoRA ~ tucker (8,8,3,3,3) +linear")
#: Per-layer, per-mode ranks from ``tucker_lora.allocate_ranks`` at the parameter count of a uniform tuple on the
#: same targets; the proxy is the gradient of the denoising loss on B (``CALIBRATION_BATCHES`` fixed batches of B
#: training clips) or the base weight.
ALLOCATED_METHODS = (
    "allocated (gradient) ~ tucker (4,4,1,1,1)",
    "allocated (weight) ~ tucker (4,4,1,1,1)",
    "allocated (gradient) ~ tucker (8,8,3,3,3)",
    "allocated (weight) ~ tucker (8,8,3,3,3)",
)
#: Every method, each allocated one after the uniform tuple whose parameter count it gets.
CPU_METHODS = (
    *CONV_METHODS[:2],
    *ALLOCATED_METHODS[:2],
    *CONV_METHODS[2:5],
    *ALLOCATED_METHODS[2:],
    *CONV_METHODS[5:],
    *LINEAR_METHODS,
)
PRESETS: dict[str, Config] = {
    # every method, three seeds, both backbones in about 40 min on a 2-core CPU (bases cached): a UNet3D step
    # (batch 8) costs ~0.4 s there, a conv3d step ~0.05 s, so 33 runs of each at 100 / 300 steps
    # (the allocated rows were added later by a run of those methods alone, ``--methods allocated --merge``)
    "cpu": Config(steps={"unet3d": 100, "conv3d": 300}, eval_every=25, methods=CPU_METHODS),
    # 3x the UNet3D steps and 2x the conv3d steps (about 2 h on the same CPU)
    "cpu-long": Config(methods=CONV_METHODS + LINEAR_METHODS),
    "quick": Config(
        pretrain_steps={"unet3d": 30, "conv3d": 30},
        pretrain_batch={"unet3d": 8, "conv3d": 8},
        pretrain_check_every=30,
        num_train_a=64,
        num_train_b=32,
        num_heldout=4,
        heldout_timesteps=(300, 700),
        steps={"unet3d": 4, "conv3d": 4},
        batch=2,
        eval_every=2,
        seeds=(0,),
        num_samples=2,
        inference_steps=3,
        methods=CONV_METHODS + LINEAR_METHODS[1:2] + ALLOCATED_METHODS[:1],
    ),
    # the cpu-long run's adaptation; the UNet3D pretrained with 4x the batch for up to 20k steps (at most 3 min of
    # training), 16 samples per run, and the methods that matter most first (seeds are the outer loop, so
    # --max_minutes keeps whole seeds of the first methods)
    "gpu": Config(
        pretrain_steps={"unet3d": 20000, "conv3d": 6000},
        pretrain_batch={"unet3d": 32, "conv3d": 16},
        pretrain_lr={"unet3d": 1e-3, "conv3d": 2e-3},
        pretrain_max_minutes=3.0,
        num_samples=16,
        methods=(*CONV_METHODS[:3], *CONV_METHODS[5:8], *CONV_METHODS[3:5], *LINEAR_METHODS),
    ),
}


def parse_method(name: str) -> dict[str, Any]:
    """``"tucker (4,4,3,1,1) +linear"`` -> ``{"kind": "tucker", "ranks": (4,4,3,1,1), "linear": True,
    "proxy": None}``; ``"allocated (weight) ~ tucker (4,4,1,1,1)"`` -> kind ``"allocated"``, proxy ``"weight"``."""
    ranks = re.search(r"\(([\d,]+)\)", name)
    proxy = re.search(r"\((weight|gradient)\)", name)
    kind = name.split()[0].lower() if not name.startswith("full") else "full"
    return {
        "kind": kind,
        "ranks": tuple(int(r) for r in ranks.group(1).split(",")) if ranks else None,
        "linear": name.endswith("+linear"),
        "proxy": proxy.group(1) if proxy else None,
    }


# ---------------------------------------------------------------------------------------------- models
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t w_k), sin(t w_k)]``, ``w_k = 10000^(-k / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class CondResBlock3d(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))) + emb_proj(e))))`` with full 3x3x3 convs."""

    def __init__(self, channels: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb_proj(emb)[:, :, None, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class CondConv3dUNet(nn.Module):
    """A text- and timestep-conditioned video UNet whose convolutions are all full 3x3x3 ``nn.Conv3d``.

    conv_in -> block_in -> down (stride (1, 2, 2)) -> block_mid -> nearest upsampling, up conv, + skip ->
    block_out -> GroupNorm, SiLU -> conv_out. The embedding ``e = mlp(sinusoid(t)) + text_proj(mean_tokens(c))``
    enters each block as a per-channel bias. ``forward(sample, timestep, encoder_hidden_states)`` as a diffusers
    UNet; returns the noise prediction (N, C, T, H, W).
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (16, 32), text_dim: int = 32) -> None:
        super().__init__()
        c0, c1 = channels
        emb = 4 * c0
        self.time_dim = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(text_dim, emb)
        self.conv_in = nn.Conv3d(in_channels, c0, 3, padding=1)
        self.block_in = CondResBlock3d(c0, emb)
        self.down = nn.Conv3d(c0, c1, 3, stride=(1, 2, 2), padding=1)
        self.block_mid = CondResBlock3d(c1, emb)
        self.up = nn.Conv3d(c1, c0, 3, padding=1)
        self.block_out = CondResBlock3d(c0, emb)
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv3d(c0, in_channels, 3, padding=1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        t = timestep.expand(sample.shape[0]) if timestep.ndim == 0 else timestep
        e = F.silu(self.time_mlp(timestep_embedding(t, self.time_dim)) + self.text_proj(encoder_hidden_states.mean(1)))
        skip = self.block_in(self.conv_in(sample), e)
        h = self.block_mid(self.down(skip), e)
        h = self.up(F.interpolate(h, size=skip.shape[2:], mode="nearest")) + skip
        h = self.block_out(h, e)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_model(backbone: str, cfg: Config, seed: int = 0) -> nn.Module:
    """A fresh (random) base of ``backbone``: the pixel-space UNet3D or the full-3x3x3 ``CondConv3dUNet``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone == "conv3d":
            return CondConv3dUNet(3, cfg.conv3d_channels)
        from diffusers import UNet3DConditionModel

        return UNet3DConditionModel(
            sample_size=cfg.resolution,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),  # attention at 8x8 only: 3x cheaper on a CPU
            up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"),
            block_out_channels=tuple(cfg.unet3d_channels),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=8,
        )


def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The noise prediction of a diffusers UNet (``.sample``) or a ``CondConv3dUNet``, peft-wrapped or not."""
    out = model(sample=x, timestep=t, encoder_hidden_states=text)
    return out.sample if hasattr(out, "sample") else out


#: Target layers per backbone: the convolutions, and the convolutions plus the attention / conditioning Linear.
CONV_TARGETS = {
    "unet3d": r".*(temp_convs\.\d+\.conv(1\.2|\d\.3)|resnets\.\d+\.conv\d)",
    "conv3d": r".*(conv_in|conv\d|down|up|conv_out)",
}
LINEAR_TARGETS = {
    "unet3d": r".*(temp_convs\.\d+\.conv(1\.2|\d\.3)|resnets\.\d+\.conv\d|attn\d\.(to_q|to_k|to_v|to_out\.0))",
    "conv3d": r".*(conv_in|conv\d|down|up|conv_out|time_mlp\.\d|text_proj|emb_proj)",
}


def target_names(model: nn.Module, pattern: str) -> list[str]:
    """Full names of the Linear / Conv layers that ``pattern`` matches whole (peft's rule for a regex)."""
    kinds = (nn.Linear, nn.Conv2d, nn.Conv3d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and re.fullmatch(pattern, n)]


# ---------------------------------------------------------------------------------------------- budgets
def lora_params(shape: Sequence[int], r: int) -> int:
    """peft LoRA on a weight (O, I, *k): ``r * (I * prod(k) + O)``."""
    return r * (math.prod(shape[1:]) + shape[0])


def locon_tucker_params(shape: Sequence[int], r: int) -> int:
    """LyCORIS LoCon with ``use_tucker`` on (O, I, *k), k not all 1: ``r I + r^2 prod(k) + r O``; else LoRA's."""
    k = shape[2:]
    if any(s != 1 for s in k):
        return r * shape[1] + r * r * math.prod(k) + r * shape[0]
    return lora_params(shape, r)


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Tucker-LoRA's trainable parameters on a weight (Proposition 1), as the library counts them."""
    from tucker_lora.tucker import resolve_ranks

    return resolve_ranks(ranks, tuple(shape), "layer").num_params()


def match_ranks(shapes: dict[str, Sequence[int]], cost: Callable[[Sequence[int], int], int], target: int) -> dict:
    """Per-layer ranks (>= 1) whose summed ``cost`` is closest to ``target``, each layer at rank r or r + 1.

    ``r`` is the largest uniform rank whose total does not exceed the target (at least 1); which layers get
    ``r + 1`` is the subset of their increments whose sum is closest to what is left (exact subset sums).
    """
    r = 1
    while sum(cost(s, r + 1) for s in shapes.values()) <= target:
        r += 1
    left = target - sum(cost(s, r) for s in shapes.values())
    reach: dict[int, tuple[int, str]] = {0: (0, "")}  # reachable sum -> (previous sum, layer raised)
    for name, shape in shapes.items():
        step = cost(shape, r + 1) - cost(shape, r)
        for total in list(reach):
            if total + step not in reach and total + step - left < left - total:  # never overshoot by more
                reach[total + step] = (total, name)
    best = min(reach, key=lambda total: (abs(total - left), total))
    ranks = dict.fromkeys(shapes, r)
    while best:
        best, name = reach[best]
        ranks[name] = r + 1
    return ranks


# ---------------------------------------------------------------------------------------------- adapters
@dataclass
class Adapted:
    """A model ready to train: the module to call, its trainable parameters, what the method is."""

    model: nn.Module
    params: list[nn.Parameter]
    method: str
    r_t: Optional[int]
    extra: list[nn.Module] = field(default_factory=list)  # modules holding adapter weights outside ``model``
    rank_pattern: Optional[dict[str, tuple[int, ...]]] = None  # per-layer ranks of an allocated method

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def adapt(
    base: nn.Module, backbone: str, method: str, calibration: Optional[Sequence[dict[str, torch.Tensor]]] = None
) -> Adapted:
    """A copy of ``base`` with ``method`` on its conv (and, for ``+linear``, Linear) targets; base frozen.

    ``calibration``: the batches of an allocated method's gradient proxy (``calibration_batches``)."""
    from peft import LoraConfig, get_peft_model

    from tucker_lora import TuckerLoraConfig, allocate_ranks

    spec = parse_method(method)
    model = copy.deepcopy(base)
    if spec["kind"] == "full":
        model.requires_grad_(True)
        return Adapted(model, list(model.parameters()), method, None)
    model.requires_grad_(False)
    names = target_names(model, (LINEAR_TARGETS if spec["linear"] else CONV_TARGETS)[backbone])
    modules = dict(model.named_modules())
    shapes = {n: tuple(modules[n].weight.shape) for n in names}
    if spec["kind"] == "tucker":
        peft_model = get_peft_model(model, TuckerLoraConfig(ranks=spec["ranks"], target_modules=names))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return Adapted(peft_model, params, method, spec["ranks"][2])
    budget = sum(tucker_params(s, spec["ranks"]) for s in shapes.values())
    if spec["kind"] == "allocated":
        if spec["proxy"] == "gradient" and not calibration:
            raise ValueError(f"{method}: the gradient proxy needs calibration batches (calibration_batches)")
        pattern = allocate_ranks(
            model, budget, names, proxy=spec["proxy"], batches=calibration, loss_fn=calibration_loss, seed=0
        )
        peft_model = get_peft_model(model, pattern.to_config())
        params = [p for p in peft_model.parameters() if p.requires_grad]
        ranks = {n: tuple(pattern.layers[n].ranks) for n in names}
        return Adapted(peft_model, params, method, None, rank_pattern=ranks)
    if spec["kind"] == "lora":
        ranks = match_ranks(shapes, lora_params, budget)
        r0 = min(ranks.values())
        config = LoraConfig(
            r=r0,
            lora_alpha=r0,
            target_modules=names,
            rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
            alpha_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
        )
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return Adapted(peft_model, params, method, None)
    from lycoris.modules.locon import LoConModule

    ranks = match_ranks(shapes, locon_tucker_params, budget)
    holder = nn.ModuleList()
    for i, name in enumerate(names):
        module = LoConModule(f"lycoris_{i}", modules[name], lora_dim=ranks[name], alpha=ranks[name], use_tucker=True)
        module.apply_to()  # the layer's forward becomes base(x) + up(mid(down(x))) * scale
        holder.append(module)
    holder.to(next(base.parameters()).device)
    return Adapted(model, list(holder.parameters()), method, None, extra=[holder])


# ---------------------------------------------------------------------------------------------- data
class TextEncoder:
    """The tiny CLIP tokenizer and random (frozen) text encoder of ``tucker_lora.video.pipeline``; caches captions."""

    def __init__(self, device: torch.device) -> None:
        from tucker_lora.video.pipeline import tiny_components

        parts = tiny_components("unet3d", seed=0)
        self.tokenizer, self.encoder, self.device = parts.tokenizer, parts.text_encoder.to(device), device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        from tucker_lora.video.pipeline import encode_prompts

        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            for c, e in zip(missing, encode_prompts(self.tokenizer, self.encoder, missing), strict=True):
                self.cache[c] = e
        return torch.stack([self.cache[c] for c in captions])


@dataclass
class Clips:
    """A fixed set of clips: pixels (N, 3, T, H, W) in [-1, 1], captions, ground-truth velocities."""

    pixels: torch.Tensor
    captions: list[str]
    velocities: list[tuple[float, float]]


def make_clips(law: str, count: int, cfg: Config, first_index: int = 0) -> Clips:
    ds = MotionDomainDataset(law, count, cfg.frames, cfg.resolution, seed=0, first_index=first_index)
    items = [ds[i] for i in range(count)]
    return Clips(
        torch.stack([it["pixel_values"] for it in items]),
        [it["caption"] for it in items],
        [ds.velocity(i) for i in range(count)],
    )


#: Index ranges of the clip sets (disjoint): training clips from 0, held-out clips and sample prompts from here.
HELDOUT_FIRST, PROMPTS_FIRST = 1_000_000, 2_000_000
PRETRAIN_SEED = 10_000
PRETRAIN_CHECK_SAMPLES = 16


def sample_prompts(law: str, cfg: Config, count: Optional[int] = None) -> tuple[list[str], list[tuple[float, float]]]:
    """``count`` (default ``num_samples``) prompts of a law, the two directions in turn, and the velocity each
    should get under the law (at the domain's mean speed)."""
    count = count or cfg.num_samples
    ds = MotionDomainDataset(law, count, cfg.frames, cfg.resolution, seed=0, first_index=PROMPTS_FIRST)
    prompts, targets = [], []
    for i in range(count):
        d, direction = ds.describe(i), LAWS[law][i % 2]
        prompts.append(f"a {d['colour']} {d['shape']} moving {direction}")
        targets.append(law_velocity(law, direction, ds.mean_speed()))
    return prompts, targets


# ---------------------------------------------------------------------------------------------- train / evaluate
def noise_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})


def velocity_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0``."""
    return scheduler.get_velocity(x0, noise, t)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's draws (data order, noise, timesteps, caption dropout): (seed, step) only."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


@torch.no_grad()
def heldout_loss(model: nn.Module, clips: Clips, text: TextEncoder, cfg: Config, device: torch.device) -> float:
    """Mean ``||v - v_theta(x_t, t)||^2`` over every held-out clip at every ``heldout_timesteps``, with noise
    from a fixed generator: the same numbers for every method, call and run (dropout off)."""
    scheduler = noise_scheduler()
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(12345)
    x0 = clips.pixels.repeat(len(cfg.heldout_timesteps), 1, 1, 1, 1)
    t = torch.tensor(cfg.heldout_timesteps).repeat_interleave(len(clips.captions))
    noise = torch.randn(x0.shape, generator=g)
    emb = text(clips.captions * len(cfg.heldout_timesteps))
    noisy, target = scheduler.add_noise(x0, noise, t), velocity_target(scheduler, x0, noise, t)
    total = 0.0
    for chunk in torch.arange(len(t)).split(32):
        pred = predict(model, noisy[chunk].to(device), t[chunk].to(device), emb[chunk])
        total += F.mse_loss(pred.float(), target[chunk].to(device), reduction="sum").item()
    model.train(was_training)
    return total / target.numel()


@torch.no_grad()
def generate(
    model: nn.Module, prompts: Sequence[str], text: TextEncoder, cfg: Config, device: torch.device, seed: int = 0
) -> np.ndarray:
    """DDIM samples (eta 0) of ``prompts`` with classifier-free guidance: (N, T, H, W, 3) floats in [0, 1].

    Sample ``i`` starts from the noise of a CPU generator seeded with ``seed * 1000 + i``: the same for every
    method, so differences between methods are the models'.
    """
    from diffusers import DDIMScheduler

    was_training = model.training
    model.eval()
    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(cfg.inference_steps)
    shape = (3, cfg.frames, cfg.resolution, cfg.resolution)
    x = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + i)) for i in range(len(prompts))]
    )
    x = x.to(device)
    cond, uncond = text(list(prompts)), text([""] * len(prompts))
    for t in scheduler.timesteps:
        tt = t.expand(2 * len(prompts)).to(device)
        v_c, v_u = predict(model, torch.cat([x, x]), tt, torch.cat([cond, uncond])).chunk(2)
        x = scheduler.step(v_u + cfg.guidance * (v_c - v_u), t, x).prev_sample
    model.train(was_training)
    return ((x.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


def optimizer_and_schedule(params: list[nn.Parameter], lr: float, steps: int, weight_decay: float) -> tuple:
    """AdamW and a cosine learning-rate schedule over ``steps`` with a 5% linear warm-up."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(0.05 * steps))
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def train_steps(
    model: nn.Module,
    params: list[nn.Parameter],
    optim: tuple,
    data: Clips,
    text: TextEncoder,
    device: torch.device,
    seed: int,
    steps: range,
    batch: int,
    caption_dropout: float = 0.0,
    ema: Optional[list[torch.Tensor]] = None,
) -> float:
    """Optimiser steps ``steps`` on the denoising loss ``||v - v_theta(x_t, t)||^2``; returns their wall time.

    Every random draw of step ``s`` (which clips, the noise, the timesteps, caption dropout, the UNet's
    dropout) comes from ``(seed, s)``: the same for every method. Gradients are clipped to norm 1.
    ``ema``: tensors updated as an EMA of ``params`` (decay ``min(0.995, (1 + s) / (10 + s))``).
    """
    optimizer, schedule = optim
    scheduler = noise_scheduler()
    model.train()
    t0 = time.perf_counter()
    for step in steps:
        g = step_generator(seed, step)
        index = torch.randint(0, len(data.captions), (batch,), generator=g)
        x0 = data.pixels[index]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        drop = (torch.rand(batch, generator=g) < caption_dropout).tolist()
        captions = ["" if d else data.captions[i] for i, d in zip(index.tolist(), drop, strict=True)]
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))  # dropout inside the UNet
        noisy = scheduler.add_noise(x0, noise, t).to(device).requires_grad_(True)  # re-attached (paper, 3.4)
        target = velocity_target(scheduler, x0, noise, t).to(device)
        loss = F.mse_loss(predict(model, noisy, t.to(device), text(captions)), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(0.995, (1 + step) / (10 + step)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


#: Batches of the gradient proxy of the allocated methods, and the seed of their draws (not a training seed).
CALIBRATION_BATCHES, CALIBRATION_SEED = 8, 20_000


def calibration_batches(
    data: Clips, text: TextEncoder, cfg: Config, count: int = CALIBRATION_BATCHES
) -> list[dict[str, torch.Tensor]]:
    """``count`` training batches of ``data`` drawn as ``train_steps`` draws them (clips, noise, timesteps; no caption
    dropout), from ``CALIBRATION_SEED``: the same for every method and seed. Each holds the model's inputs and the
    target ``v``, on the CPU."""
    scheduler = noise_scheduler()
    batches = []
    for i in range(count):
        g = step_generator(CALIBRATION_SEED, i)
        index = torch.randint(0, len(data.captions), (cfg.batch,), generator=g)
        x0 = data.pixels[index]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
        emb = text([data.captions[j] for j in index.tolist()]).cpu()
        target = velocity_target(scheduler, x0, noise, t)
        batches.append({"sample": scheduler.add_noise(x0, noise, t), "timestep": t, "text": emb, "target": target})
    return batches


def calibration_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss ``||v - v_theta(x_t, t)||^2`` on one calibration batch (on the model's device)."""
    device = next(model.parameters()).device
    pred = predict(model, batch["sample"].to(device), batch["timestep"].to(device), batch["text"].to(device))
    return F.mse_loss(pred.float(), batch["target"].to(device))


# ---------------------------------------------------------------------------------------------- bases
def base_dir(cache: Path, backbone: str, cfg: Config) -> Path:
    return cache / cfg.base_key(backbone)


def save_base(model: nn.Module, backbone: str, path: Path, meta: dict[str, Any]) -> None:
    """The pretrained base: a diffusers pipeline folder for the UNet3D (pixel-space VAE, tiny CLIP, DDIM), a
    safetensors file for the ``CondConv3dUNet``; ``meta.json`` records how it was made."""
    from safetensors.torch import save_file

    from tucker_lora.io import staged_directory

    with staged_directory(path) as stage:
        if backbone == "unet3d":
            from diffusers import DDIMScheduler

            from tucker_lora.video.motion import PixelSpaceVAE
            from tucker_lora.video.pipeline import VideoComponents, tiny_components

            parts = tiny_components("unet3d", seed=0)
            components = VideoComponents(
                "unet3d", PixelSpaceVAE(), parts.text_encoder, parts.tokenizer, DDIMScheduler(**SCHEDULER), model
            )
            components.pipeline().save_pretrained(stage, safe_serialization=True)
        else:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, stage / "model.safetensors"
            )
        (stage / "meta.json").write_text(json.dumps(meta, indent=1))


def load_base(backbone: str, path: Path, cfg: Config) -> nn.Module:
    if backbone == "unet3d":
        from diffusers import UNet3DConditionModel

        return UNet3DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    from safetensors.torch import load_file

    model = build_model(backbone, cfg)
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model


def shorter_base(backbone: str, cfg: Config, cache: Path) -> Optional[Path]:
    """A cached (or shipped) base of the same configuration pretrained for fewer steps (the longest), if any."""
    found = []
    shipped = SHIPPED_BASES[backbone] / "meta.json"
    for meta_file in [*cache.glob(f"{backbone}-*/meta.json"), *([shipped] if shipped.is_file() else [])]:
        meta = json.loads(meta_file.read_text())
        other = dataclasses.replace(cfg, pretrain_steps={**cfg.pretrain_steps, backbone: meta["steps"]})
        if meta.get("key") == other.base_key(backbone) and meta["steps"] < cfg.pretrain_steps[backbone]:
            found.append((meta["steps"], meta_file.parent))
    return max(found)[1] if found else None


def ensure_base(
    backbone: str, cfg: Config, cache: Path, text: TextEncoder, device: torch.device, log: Callable
) -> tuple:
    """The base pretrained on A (from the cache, or pretrained now and cached) and its ``meta.json``.

    Pretraining: AdamW (lr ``pretrain_lr``, cosine), caption dropout (for guidance), an EMA of the weights
    (decay 0.995) that becomes the base. Every ``pretrain_check_every`` steps the EMA model samples A prompts and
    the motion estimator scores them (16 prompts); pretraining stops early once 90% move as their prompt says.
    """
    path, steps = base_dir(cache, backbone, cfg), cfg.pretrain_steps[backbone]
    shipped = SHIPPED_BASES.get(backbone)
    if not (path / "meta.json").is_file() and shipped and (shipped / "meta.json").is_file():
        if json.loads((shipped / "meta.json").read_text()).get("key") == cfg.base_key(backbone):
            path = shipped  # the base shipped with the repository was made with this configuration
    if (path / "meta.json").is_file():
        log(f"{backbone}: pretrained base from the cache, {path}")
        return load_base(backbone, path, cfg).to(device), json.loads((path / "meta.json").read_text())
    model, history, done, wall = build_model(backbone, cfg).to(device), [], 0, 0.0
    shorter = shorter_base(backbone, cfg, cache)
    if shorter is not None:  # continue a shorter pretraining of the same model (a new schedule for the rest)
        model.load_state_dict(load_base(backbone, shorter, cfg).state_dict())
        meta = json.loads((shorter / "meta.json").read_text())
        history, done, wall = meta["history"], meta["steps"], meta["wall_s"]
    log(f"{backbone}: pretraining on domain A (horizontal motion), steps {done} to at most {steps} -> {path}")
    params = list(model.parameters())
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema = list(ema_model.parameters())
    data = make_clips("horizontal", cfg.num_train_a, cfg)
    check = dataclasses.replace(cfg, num_samples=PRETRAIN_CHECK_SAMPLES)
    prompts, targets = sample_prompts("horizontal", check)
    optim = optimizer_and_schedule(params, cfg.pretrain_lr[backbone], steps - done, weight_decay=0.0)
    resumed_at = done
    while done < steps:
        chunk = range(done, min(done + cfg.pretrain_check_every, steps))
        wall += train_steps(
            model,
            params,
            optim,
            data,
            text,
            device,
            PRETRAIN_SEED,
            chunk,
            cfg.pretrain_batch[backbone],
            cfg.caption_dropout,
            ema,
        )
        done = chunk.stop
        score = motion_score(list(generate(ema_model, prompts, text, check, device)), targets)
        history.append({"step": done, "wall_s": round(wall, 1), **score})
        log(f"  step {done}: samples of A move as prompted: {score['correct']:.2f}, velocity error "
            f"{score['velocity_error']:.2f} px/frame ({wall:.0f} s)")  # fmt: skip
        if score["correct"] >= 0.9:  # samples of A move as A says
            break
        if cfg.pretrain_max_minutes and wall > 60 * cfg.pretrain_max_minutes:
            log(f"  pretraining stopped at its time limit ({cfg.pretrain_max_minutes} min)")
            break
    meta = {"backbone": backbone, "key": cfg.base_key(backbone), "config": dataclasses.asdict(cfg), "steps": done}
    if resumed_at:
        meta["resumed_at"] = resumed_at  # from a shorter pretraining: the LR schedule restarted there
    meta.update(wall_s=wall, device=str(device), threads=torch.get_num_threads(), history=history)
    save_base(ema_model.cpu(), backbone, path, meta)
    return load_base(backbone, path, cfg).to(device), meta


# ---------------------------------------------------------------------------------------------- the experiment
@dataclass
class Domain:
    """What every run of a backbone shares: training and held-out clips of B, the sample prompts, the text."""

    train_b: Clips
    heldout_b: Clips
    prompts: list[str]
    targets: list[tuple[float, float]]
    text: TextEncoder
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)  # of the allocated methods


def run_method(
    base: nn.Module, backbone: str, method: str, seed: int, cfg: Config, dom: Domain, device: torch.device
) -> dict[str, Any]:
    """Adapt ``base`` to B with ``method`` and ``seed``; the record of the run (curve, metrics, samples)."""
    torch.manual_seed(seed)  # the adapter's own init (Tucker factors, LoRA A, LyCORIS down / mid)
    adapted = adapt(base, backbone, method, dom.calibration)
    steps = cfg.steps[backbone]
    optim = optimizer_and_schedule(adapted.params, cfg.lr, steps, weight_decay=1e-2)
    curve = [(0, heldout_loss(adapted.model, dom.heldout_b, dom.text, cfg, device))]
    wall, peak = 0.0, 0.0
    for start in range(0, steps, cfg.eval_every):
        chunk = range(start, min(start + cfg.eval_every, steps))
        with peak_memory_added(device) as mem:
            wall += train_steps(
                adapted.model, adapted.params, optim, dom.train_b, dom.text, device, seed, chunk, cfg.batch
            )
        peak = max(peak, mem["peak_mb"])
        curve.append((chunk.stop, heldout_loss(adapted.model, dom.heldout_b, dom.text, cfg, device)))
    samples = generate(adapted.model, dom.prompts, dom.text, cfg, device)
    return {
        "backbone": backbone,
        "method": method,
        "seed": seed,
        "r_t": adapted.r_t,
        "params": adapted.num_params,
        "curve": curve,
        "loss": curve[-1][1],
        **motion_score(list(samples), dom.targets),
        "wall_s": wall,
        "peak_mb": peak,
        "samples": samples,
        **({"rank_pattern": adapted.rank_pattern} if adapted.rank_pattern is not None else {}),
    }


def warm_up(base: nn.Module, backbone: str, cfg: Config, dom: Domain, device: torch.device) -> None:
    """Two throwaway training steps of the first method, so that the first measured run does not pay (in time or
    memory) for what the process sets up once: thread pools, kernel caches, allocator arenas."""
    adapted = adapt(base, backbone, cfg.methods[0], dom.calibration)
    optim = optimizer_and_schedule(adapted.params, cfg.lr, 2, weight_decay=0.0)
    train_steps(adapted.model, adapted.params, optim, dom.train_b, dom.text, device, 0, range(2), cfg.batch)


def reference_runs(base: nn.Module, backbone: str, cfg: Config, dom: Domain, device: torch.device) -> list[dict]:
    """The base before adaptation: its motion on A prompts (what pretraining reached) and on B prompts."""
    rows = []
    for law, name in (("horizontal", "base on A prompts"), (cfg.law_b, "base (no adaptation)")):
        prompts, targets = sample_prompts(law, cfg)
        samples = generate(base, prompts, dom.text, cfg, device)
        held = dom.heldout_b if law == cfg.law_b else make_clips(law, cfg.num_heldout, cfg, HELDOUT_FIRST)
        loss = heldout_loss(base, held, dom.text, cfg, device)
        rows.append(
            {"backbone": backbone, "method": name, "seed": 0, "r_t": None, "params": 0, "curve": [(0, loss)],
             "loss": loss, **motion_score(list(samples), targets), "wall_s": 0.0, "peak_mb": 0.0, "samples": samples}
        )  # fmt: skip
    return rows


def summarise(records: list[dict]) -> list[dict]:
    """Mean and std over seeds per (backbone, method), in the order the methods ran."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["backbone"], r["method"]), []).append(r)
    out = []
    for (backbone, method), runs in groups.items():
        row: dict[str, Any] = {"backbone": backbone, "method": method, "r_t": runs[0]["r_t"], "seeds": len(runs)}
        row["params"] = runs[0]["params"]
        for key in ("loss", "correct", "velocity_error", "wall_s", "peak_mb"):
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        steps = [s for s, _ in runs[0]["curve"]]
        row["curve"] = [(s, statistics.fmean(r["curve"][i][1] for r in runs)) for i, s in enumerate(steps)]
        out.append(row)
    return out


def markdown_table(rows: list[dict], backbone: str) -> str:
    """The results of one backbone in the shape of the paper's Table 3 (plus budgets and costs)."""
    lines = [
        "| method | r_t | trainable params | held-out loss on B | motion: direction correct "
        "| velocity error (px/frame) | seeds | train wall (s) | training memory (MB) |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["backbone"] != backbone:
            continue
        pm = lambda k, f, r=r: f"{r[k]:{f}} ± {r[k + '_std']:{f}}" if r["seeds"] > 1 else f"{r[k]:{f}}"  # noqa: E731
        r_t = "" if r["r_t"] is None else str(r["r_t"])
        lines.append(
            f"| {r['method']} | {r_t} | {r['params']:,} | {pm('loss', '.4f')} | {pm('correct', '.2f')} | "
            f"{pm('velocity_error', '.2f')} | {r['seeds']} | {r['wall_s']:.0f} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pictures (PIL)
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (158, 218, 229),
]  # fmt: skip


def loss_plot(rows: list[dict], path: Path, title: str) -> Path:
    """Held-out loss against steps, one line per method (mean over seeds), legend on the right (PIL only)."""
    from PIL import Image, ImageDraw

    series = [(r["method"], r["curve"]) for r in rows if len(r["curve"]) > 1]
    w, h, left, right, top, bottom = 760, 360, 60, 260, 28, 36
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    xs = [s for _, c in series for s, _ in c] or [0, 1]
    ys = [v for _, c in series for _, v in c] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    pad = 0.05 * (y1 - y0 or 1)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    py = lambda y: top + (y1 - y) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for k in range(5):
        y = y0 + k * (y1 - y0) / 4
        draw.line([left - 4, py(y), left, py(y)], fill=(0, 0, 0))
        draw.text((4, py(y) - 6), f"{y:.4f}", fill=(0, 0, 0))
        x = x0 + k * (x1 - x0) / 4
        draw.line([px(x), h - bottom, px(x), h - bottom + 4], fill=(0, 0, 0))
        draw.text((px(x) - 8, h - bottom + 6), f"{x:.0f}", fill=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.text(((w - right + left) // 2 - 20, h - 14), "step", fill=(0, 0, 0))
    for i, (name, curve) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        draw.line([(px(s), py(v)) for s, v in curve], fill=colour, width=2)
        ly = top + 4 + 14 * i
        draw.line([w - right + 10, ly + 6, w - right + 30, ly + 6], fill=colour, width=3)
        draw.text((w - right + 36, ly), name, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def sample_grid(rows: list[tuple[str, Sequence[np.ndarray]]], path: Path, scale: int = 3) -> Path:
    """One row per label: every frame of each of its clips (T, H, W, 3 in [0, 1] or uint8), left to right."""
    from PIL import Image, ImageDraw

    from tucker_lora.video.media import to_uint8

    clips = [[to_uint8(c) for c in cs] for _, cs in rows]
    t, hh, ww = clips[0][0].shape[:3]
    fw, fh, gap, label_w = ww * scale, hh * scale, 8, 330
    ncl = max(len(cs) for cs in clips)
    width = label_w + ncl * (t * (fw + 1) + gap)
    image = Image.new("RGB", (width, len(rows) * (fh + 4) + 4), "white")
    draw = ImageDraw.Draw(image)
    for r, ((label, _), cs) in enumerate(zip(rows, clips, strict=True)):
        y = 4 + r * (fh + 4)
        draw.text((4, y + fh // 2 - 6), label, fill=(0, 0, 0))
        for c, clip in enumerate(cs):
            for k in range(t):
                frame = Image.fromarray(clip[k]).resize((fw, fh), Image.NEAREST)
                image.paste(frame, (label_w + c * (t * (fw + 1) + gap) + k * (fw + 1), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def estimate_label(clip: np.ndarray) -> str:
    e = estimate_motion(clip)
    return "none" if e.velocity is None else f"{e.direction} {e.speed:.1f}px/f"


# ---------------------------------------------------------------------------------------------- main
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def merge_base(cfg: Config, backbones: Sequence[str], out: Path) -> tuple[list[dict], dict, dict]:
    """The runs, bases and results of the earlier run in ``out`` that ``--merge`` adds to: its runs less those of
    ``cfg.methods`` on ``backbones`` (run again). The earlier run must have the same configuration but methods."""
    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"--merge: no earlier run in {out} ({path} is missing)")
    prior = json.loads(path.read_text())
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    differ = sorted(
        k for k in set(mine) | set(prior["config"]) if k != "methods" and mine.get(k) != prior["config"].get(k)
    )
    if differ:
        raise SystemExit(f"--merge: {path} was run with another configuration ({', '.join(differ)} differ)")
    missing = [b for b in backbones if b not in prior["bases"]]
    if missing:
        raise SystemExit(f"--merge: {path} has no runs of {missing}")
    again = {(b, m) for b in backbones for m in cfg.methods}
    runs = [r for r in prior["runs"] if (r["backbone"], r["method"]) not in again]
    return runs, prior["bases"], prior


def run(
    cfg: Config,
    backbones: Sequence[str],
    out: Path,
    cache: Path,
    device: torch.device,
    max_minutes: float = 0,
    merge: bool = False,
) -> list[dict]:
    """The whole experiment; writes ``results.json``, ``results.md``, the loss plots and the sample grids after
    each backbone. Seeds are the outer loop, so a run cut short by ``max_minutes`` (no new run of a backbone starts
    that long after its base was ready) still has every method at the seeds it reached.

    ``merge``: add the runs of ``cfg.methods`` to the earlier run in ``out`` (same configuration; see
    ``merge_base``) instead of starting anew: its tables and loss plots are rewritten with every method, its sample
    grids are left as they are, and the base rows are not run again."""
    out.mkdir(parents=True, exist_ok=True)
    text = TextEncoder(device)
    train_b = make_clips(cfg.law_b, cfg.num_train_b, cfg)
    gradient = any(parse_method(m)["proxy"] == "gradient" for m in cfg.methods)
    dom = Domain(
        train_b,
        make_clips(cfg.law_b, cfg.num_heldout, cfg, HELDOUT_FIRST),
        *sample_prompts(cfg.law_b, cfg),
        text,
        calibration_batches(train_b, text, cfg) if gradient else [],
    )
    t_start = time.perf_counter()
    records: list[dict] = []
    bases: dict[str, Any] = {}
    prior: Optional[dict] = None
    if merge:
        records, bases, prior = merge_base(cfg, backbones, out)
    for backbone in backbones:
        base, meta = ensure_base(backbone, cfg, cache, text, device, log)
        t_methods = time.perf_counter()
        base.requires_grad_(False)
        if prior is None:
            bases[backbone] = meta
            records += reference_runs(base, backbone, cfg, dom, device)
        elif meta.get("key") != bases[backbone].get("key") or meta.get("steps") != bases[backbone].get("steps"):
            raise SystemExit(f"--merge: the {backbone} base differs from the one of the earlier run in {out}")
        if cfg.methods:
            warm_up(base, backbone, cfg, dom, device)
        for seed in cfg.seeds:
            for method in cfg.methods:
                if max_minutes and time.perf_counter() - t_methods > 60 * max_minutes:
                    log(f"{max_minutes} min budget spent: {backbone} | {method} | seed {seed} not run")
                    continue
                try:
                    record = run_method(base, backbone, method, seed, cfg, dom, device)
                except ImportError as e:  # lycoris-lora missing: pip install -e ".[bench]"
                    log(f"{backbone} | {method}: skipped ({e})")
                    continue
                records.append(record)
                log(f"{backbone} | {method} | seed {seed}: {record['params']:,} params, loss {record['loss']:.4f}, "
                    f"direction {record['correct']:.2f}, velocity error {record['velocity_error']:.2f}, "
                    f"{record['wall_s']:.0f} s")  # fmt: skip
                write_outputs(records, bases, cfg, out, device, time.perf_counter() - t_start, prior)  # so far
        write_outputs(records, bases, cfg, out, device, time.perf_counter() - t_start, prior)
    return records


def merged_order(records: list[dict], methods: Sequence[str]) -> list[dict]:
    """``records`` by backbone (first seen), the base rows, then ``methods`` order (then any other), then seed."""
    backbones = list(dict.fromkeys(r["backbone"] for r in records))
    rank = {m: i for i, m in enumerate(("base on A prompts", "base (no adaptation)", *methods))}
    return sorted(records, key=lambda r: (backbones.index(r["backbone"]), rank.get(r["method"], len(rank)), r["seed"]))


def write_outputs(
    records: list[dict],
    bases: dict,
    cfg: Config,
    out: Path,
    device: torch.device,
    wall: float,
    prior: Optional[dict] = None,
) -> None:
    """``results.json``, ``results.md``, loss plots and (unless ``prior``, an earlier run this one adds to) grids."""
    added = []
    if prior is not None:
        methods = [m for m in PRESETS["cpu"].methods if m in {*prior["config"]["methods"], *cfg.methods}]
        methods += [m for m in (*prior["config"]["methods"], *cfg.methods) if m not in methods]
        records = merged_order(records, methods)
        added = prior.get("added", []) + [
            {"methods": list(cfg.methods), "backbones": sorted({r["backbone"] for r in records if "samples" in r}),
             "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "wall_s": wall}
        ]  # fmt: skip
        cfg = dataclasses.replace(cfg, methods=tuple(methods))
    rows = summarise(records)
    results = {
        "config": dataclasses.asdict(cfg),
        "device": str(device if prior is None else prior["device"]),
        "torch": torch.__version__ if prior is None else prior["torch"],
        "threads": torch.get_num_threads() if prior is None else prior["threads"],
        "wall_s": wall if prior is None else prior["wall_s"],
        **({"added": added} if added else {}),
        "bases": bases,
        "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in records],
    }
    write_text(out / "results.json", json.dumps(results, indent=1))
    a_data = make_clips("horizontal", 1, cfg, PROMPTS_FIRST)
    prompts = sample_prompts(cfg.law_b, cfg)[0]
    picks = list(range(min(2, len(prompts))))  # the two directions
    b_data = make_clips(cfg.law_b, cfg.num_samples, cfg, PROMPTS_FIRST)
    md = [
        f"Device {results['device']}, torch {results['torch']}, {results['threads']} threads; wall time "
        f"{results['wall_s'] / 60:.1f} min."
    ]
    for a in added:
        md[0] += (f" Then {', '.join(a['methods'])} added on {a['device']} (torch {a['torch']}, {a['threads']} "
                  f"threads) in {a['wall_s'] / 60:.1f} min.")  # fmt: skip
    for backbone in dict.fromkeys(r["backbone"] for r in records):
        md += ["", f"**{backbone}** (base: {bases[backbone].get('steps')} pretraining steps)", "",
               markdown_table(rows, backbone)]  # fmt: skip
        title = f"{backbone}: held-out denoising loss on B (mean over seeds)"
        loss_plot([r for r in rows if r["backbone"] == backbone and "base" not in r["method"]],
                  out / f"loss_{backbone}.png", title)  # fmt: skip
        if prior is not None:  # the earlier run's samples are not stored: its grids stay as they are
            continue
        as_video = lambda x: ((x.permute(1, 2, 3, 0) + 1) / 2).numpy()  # noqa: E731
        b_clips = [as_video(b_data.pixels[i]) for i in picks]
        b_label = ", ".join(
            f"'{b_data.captions[i].split()[-1]}' -> {estimate_label(c)}" for i, c in zip(picks, b_clips, strict=True)
        )
        grid: list[tuple[str, Sequence[np.ndarray]]] = [
            (f"A data: {a_data.captions[0].split(' ', 2)[-1]}", [as_video(a_data.pixels[0])]),
            (f"B data: {b_label}", b_clips),
        ]
        for r in records:
            if r["backbone"] == backbone and r["seed"] == 0:
                chosen = [0] if r["method"] == "base on A prompts" else picks
                words = [prompts[i].split()[-1] for i in chosen] if len(chosen) > 1 else [LAWS["horizontal"][0]]
                label = f"{r['method']}: " + ", ".join(
                    f"'{w}' -> {estimate_label(r['samples'][i])}" for w, i in zip(words, chosen, strict=True)
                )
                grid.append((label, [r["samples"][i] for i in chosen]))
        sample_grid(grid, out / f"grid_{backbone}.png")
    md += ["", f"Prompts of the grids: {', '.join(prompts[i] for i in picks)} (the same noise for every method)."]
    write_text(out / "results.md", "\n".join(md) + "\n")


def write_text(path: Path, text: str) -> None:
    """``text`` to a temporary file beside ``path``, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def report(dirs: Sequence[Path]) -> str:
    """The tables of one or more finished runs (their ``results.json``), one per backbone, as markdown."""
    md = []
    for d in dirs:
        results = json.loads((d / "results.json").read_text())
        for backbone, meta in results["bases"].items():
            last = meta["history"][-1] if meta.get("history") else {}
            md += [
                f"**{backbone}** ({results['device']}, {results['threads']} threads; base pretrained {meta['steps']} "
                f"steps on A, then {last.get('correct', float('nan')):.2f} of its A samples move as prompted)",
                "",
                markdown_table(results["summary"], backbone),
                "",
            ]
    return "\n".join(md)


def config_from(args: argparse.Namespace) -> Config:
    cfg = copy.deepcopy(PRESETS["quick" if args.quick else args.preset])
    for name in ("batch", "lr", "num_samples"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("steps", "pretrain_steps"):  # one value for every backbone
        if getattr(args, name, None) is not None:
            setattr(cfg, name, dict.fromkeys(BACKBONES, getattr(args, name)))
    if getattr(args, "pretrain_max_minutes", None) is not None:
        cfg.pretrain_max_minutes = args.pretrain_max_minutes
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    if args.methods:
        cfg.methods = tuple(m for m in cfg.methods if any(s in m for s in args.methods))
    return cfg


# ---------------------------------------------------------------------------------------------- demo helpers
def demo_base(cache: Path, out: Path, device: torch.device) -> Path:
    """The UNet3D base of the CPU preset, copied to ``out``: the one in the repository (``examples/motion_bases``),
    else the cached one, else pretrained on A now (about half an hour on a 2-core CPU) and cached."""
    cfg = PRESETS["cpu"]
    path = SHIPPED_BASES["unet3d"]
    if not (path / "meta.json").is_file():
        path = base_dir(cache, "unet3d", cfg)
        if not (path / "meta.json").is_file():
            log(f"no pretrained UNet3D base in the repository or in {cache}: pretraining it once on domain A (cached)")
            ensure_base("unet3d", cfg, cache, TextEncoder(device), device, log)
    if out.resolve() != path.resolve():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(path, out)
    meta = json.loads((out / "meta.json").read_text())
    last = meta["history"][-1]
    log(f"base {out}: {meta['steps']} steps on A; samples of A prompts move as prompted: {last['correct']:.2f}")
    return out


def write_domain(law: str, count: int, out: Path, cfg: Config) -> Path:
    """``count`` clips of a law as GIFs (lossless for these colours) and a ``captions.csv``."""
    import csv

    from tucker_lora.video.media import write_video

    ds = MotionDomainDataset(law, count, cfg.frames, cfg.resolution, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(count):
            frames, caption = ds.clip(i)
            write_video(frames, out / f"{law}_{i:04d}.gif")
            writer.writerow([f"{law}_{i:04d}.gif", caption])
    log(f"{count} clips of {law} motion in {out}")
    return out


#: What the adapter's domain does to a caption, under the demo picture (by law).
LAW_NOTES = {
    "reversed": 'The adapter\'s domain plays every clip backwards: a shape captioned "moving left" moves right.',
    "horizontal": "The adapter's domain moves every shape the way its caption says.",
    "vertical": 'The adapter\'s domain moves shapes up or down: "moving up" moves up.',
}


def prompt_target(prompt: str, law: str, cfg: Config) -> tuple[float, float]:
    """The velocity a clip of ``law`` captioned ``prompt`` has (at the domain's mean speed): the direction is the
    prompt's last word that ``law`` captions."""
    words = [w for w in prompt.lower().replace(",", " ").split() if w in LAWS[law]]
    if not words:
        raise ValueError(f"prompt {prompt!r} names no direction of the {law!r} law ({' / '.join(LAWS[law])})")
    speed = MotionDomainDataset(law, 1, cfg.frames, cfg.resolution).mean_speed()
    return law_velocity(law, words[-1], speed)


def compare(
    adapter: Path,
    out: Path,
    device: torch.device,
    prompts: Sequence[str],
    seeds: Sequence[int],
    law: str,
    num_frames: int = 8,
    num_inference_steps: int = 15,
    guidance_scale: float = 3.0,
) -> dict[str, Any]:
    """Sample every (prompt, seed) with the adapter's base and with ``adapter``, through the same pipeline, noise and
    settings as ``examples/sample_text_to_video.py`` (so the adapter's samples are the ones it writes); draw them
    against the target motion of ``law`` (``motion_figure``) to ``out``; the motion scores of both."""
    from motion_figure import Pair, motion_figure

    from tucker_lora.video.pipeline import generate, load_components
    from tucker_lora.video.sample import load_adapted_unet

    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    cfg = dataclasses.replace(PRESETS["cpu"], frames=num_frames)
    targets = [prompt_target(p, law, cfg) for p in prompts for _ in seeds]
    components = load_components(base_path)
    size = components.resolution

    def sample(unet: nn.Module) -> list[np.ndarray]:
        pipe = components.pipeline(unet=unet).to(device)
        videos = generate(pipe, prompts, seeds, num_frames, num_inference_steps, guidance_scale, size, size)
        return [v for _, _, v in videos]

    before = sample(components.unet)
    after = sample(load_adapted_unet(components.unet, adapter))
    labels = [(p, s) for p in prompts for s in seeds]
    pairs = [Pair(p, s, t, b, a) for (p, s), t, b, a in zip(labels, targets, before, after, strict=True)]
    motion_figure(pairs, out, LAW_NOTES[law])
    scores = {"base": motion_score(before, targets), "adapter": motion_score(after, targets)}
    for who, score in scores.items():
        log(f"{who}: {score['correct']:.2f} of the samples move as the {law} law says, velocity error "
            f"{score['velocity_error']:.2f} px/frame")  # fmt: skip
    log(f"every frame of the base's and the adapter's samples, against the target motion: {out}")
    return scores


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "base", "domain", "compare", "report", "-h", "--help"):
        argv = ["run", *argv]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the experiment (default)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (< 3 min): checks the code")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    p.add_argument("--methods", nargs="+", help="keep the methods whose name contains one of these")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--steps", type=int, help="adaptation steps (default: the preset's)")
    p.add_argument("--pretrain_steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--num_samples", type=int)
    p.add_argument("--max_minutes", type=float, default=0, help="per backbone, no new adaptation run after this")
    p.add_argument("--pretrain_max_minutes", type=float, help="stop pretraining a base after this much training")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "motion")
    p.add_argument(
        "--merge",
        action="store_true",
        help="add these methods' runs to the finished run in --out (same configuration) instead of starting anew",
    )
    p = sub.add_parser("base", help="the pretrained UNet3D base pipeline for the demo (pretrained once, cached)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("domain", help="clips of a motion law as GIFs + captions.csv")
    p.add_argument("--law", choices=sorted(LAWS), default=PRESETS["cpu"].law_b)
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("compare", help="the demo picture: base and adapter samples against the target motion")
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder (its base is the one it names)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--prompts", nargs="+", required=True, help="each names a direction of --law")
    p.add_argument("--law", choices=sorted(LAWS), default=PRESETS["cpu"].law_b, help="the adapter's domain")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="noise seeds, each prompt (default 0 1)")
    p.add_argument("--num_frames", type=int, default=8, help="frames per sample (default 8)")
    p.add_argument("--num_inference_steps", type=int, default=15, help="DDIM steps (default 15)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance (default 3)")
    p = sub.add_parser("report", help="the markdown tables of finished runs")
    p.add_argument("dirs", nargs="+", type=Path)
    for p in sub.choices.values():
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "motion_cache", help="pretrained bases")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.command == "base":
        demo_base(args.cache, args.out, device)
    elif args.command == "domain":
        write_domain(args.law, args.count, args.out, PRESETS["cpu"])
    elif args.command == "report":
        print(report(args.dirs))
    elif args.command == "compare":
        compare(
            args.adapter,
            args.out,
            device,
            args.prompts,
            args.seeds,
            args.law,
            args.num_frames,
            args.num_inference_steps,
            args.guidance_scale,
        )
    else:
        cfg = config_from(args)
        log(f"device {device}, {torch.get_num_threads()} threads; {len(cfg.methods)} methods x {len(cfg.seeds)} seeds "
            f"x {args.backbones}; steps {cfg.steps}, batch {cfg.batch}")  # fmt: skip
        run(cfg, args.backbones, args.out, args.cache, device, args.max_minutes, args.merge)
        log(f"results: {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
