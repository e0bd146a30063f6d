"""Fine-tune a text-to-video diffusion model with Tucker-LoRA (or peft LoRA at a matched size), with accelerate.

The command line of ``examples/train_text_to_video.py``, in the style of diffusers' training examples::

    python examples/train_text_to_video.py                      # tiny random UNet3D on synthetic moving shapes
    accelerate launch examples/train_text_to_video.py \\
        --pretrained_model_name_or_path ./zeroscope_v2_576w --data_dir ./MSRVTT --output_dir out

The paper's recipe (sections 3.4 and 5) is the default: the denoising loss with the noisy latents
re-attached to the graph, AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 1e-2), a cosine schedule with
warm-up, gradient accumulation, an EMA of the adapter parameters (tau 0.999) that is used for validation
and saved beside the raw adapter. Ranks default to (4, 4, 1, 1, 1) on the UNet3D and (4, 4, 0, 1, 1) on
AnimateDiff; ``--ranks auto --rank_budget N`` gives every layer its own ranks within N trainable parameters
(``tucker_lora.allocate_ranks``, from the base weights or, with ``--rank_proxy gradient``, from the gradient of
the training loss over a few batches of the training data).

Reproducibility: every random draw of a step (VAE latent sample, caption dropout, noise, timesteps) comes
from a generator seeded with (seed, step, micro-batch, process), the data order from accelerate's seedable
sampler and the clips from (seed, epoch, index). With the optimiser, LR scheduler, EMA and RNG states in
the checkpoint, ``--resume_from_checkpoint latest`` continues exactly where the run stopped.

Sharded training: under ``accelerate launch --config_file examples/accelerate_fsdp.yaml`` (FSDP2) the UNet is
sharded at its blocks with ``fully_shard``, frozen base and trainable adapter in the same units; the adapter
and EMA are gathered to rank 0 for saving, so the outputs are the same files as a single-process run's
(see ``tucker_lora.video.distributed``).

Outputs in ``--output_dir``: ``adapter/`` and ``adapter_ema/`` (peft ``save_pretrained`` folders),
``checkpoint-<step>/`` (accelerate state; adapter weights only), ``train_log.jsonl`` (one line per step),
``validation/step-<step>/`` (MP4 or GIF per prompt and seed, ``grid.png``), ``base_model/`` (the tiny
default pipeline, when no model was given) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import HelpFormatter, run_cli
from ..config import INIT_CHOICES
from ..errors import InputError
from ..ranks import PROXIES as RANK_PROXIES
from ..ranks import RankAllocation
from .adapters import DEFAULT_RANKS, METHODS, parse_target_modules
from .checkpoint import Checkpoints
from .data import example_captions, load_dataset
from .distributed import (
    ShardedCheckpointing,
    broadcast_adapter_init,
    configure_wrap_policy,
    cpu_process_group,
    enable_fsdp,
    save_adapter_folder,
    unsharded_root,
)
from .media import VIDEO_FORMATS
from .metrics import TRAIN_LOG, StepLog, peak_memory_mb, read_log
from .pipeline import (
    BACKBONES,
    VideoComponents,
    check_pipeline_folder,
    encode_prompts,
    gradient_checkpointing,
)

logger = logging.getLogger("tucker_lora.video.train")

__all__ = ["TrainResult", "build_parser", "diffusion_loss", "main", "parse_args", "step_generator", "step_seeds"]

#: ``--init_weights`` values: ``TuckerLoraConfig``'s ``init_weights`` choices, spelled in lower case.
INIT_WEIGHTS = {str(choice).lower(): choice for choice in INIT_CHOICES}


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The command line, grouped: model, adapter, data, optimisation, checkpoints, validation, logging."""
    p = argparse.ArgumentParser(
        description="Fine-tune a text-to-video diffusion model with Tucker-LoRA (or matched peft LoRA).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="local diffusers pipeline folder (text-to-video SD / zeroscope, or AnimateDiff); "
        "default: a tiny random pipeline built from configs, saved to OUTPUT_DIR/base_model",
    )
    g.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=None,
        help="backbone of the tiny pipeline built when no model is given (default: unet3d); else a check of the UNet",
    )
    g.add_argument(
        "--motion_adapter_name_or_path",
        default=None,
        help="MotionAdapter folder for a pipeline with a 2D UNet (default: its motion_adapter subfolder)",
    )
    g = p.add_argument_group("adapter")
    g.add_argument("--method", choices=METHODS, default="tucker", help="tucker, or the peft LoRA baseline")
    g.add_argument(
        "--ranks",
        nargs="+",
        default=None,
        metavar="R",
        help="Tucker ranks r_o r_i r_t r_h r_w, or auto: per-layer ranks within --rank_budget (tucker_lora."
        "allocate_ranks) (default: 4 4 1 1 1 on UNet3D, 4 4 0 1 1 on AnimateDiff)",
    )
    g.add_argument(
        "--rank_budget",
        type=int,
        default=None,
        metavar="N",
        help="trainable parameters of all adapters together, for --ranks auto (default: none; required there)",
    )
    g.add_argument(
        "--rank_proxy",
        choices=RANK_PROXIES,
        default="weight",
        help="what --ranks auto reads per-mode spectra from: the base weights, or the gradient of the training loss "
        "over --rank_calibration_batches batches of the training data",
    )
    g.add_argument(
        "--rank_calibration_batches",
        type=int,
        default=4,
        metavar="N",
        help="batches of --train_batch_size clips for --rank_proxy gradient",
    )
    g.add_argument("--alpha", type=float, default=1.0, help="scale of the update, W + alpha * dW")
    g.add_argument(
        "--target_modules",
        nargs="+",
        default=None,
        help="layer names / suffixes, or one regex (default: the backbone's tucker_lora.DEFAULT_TARGET_MODULES)",
    )
    g.add_argument(
        "--init_weights",
        choices=sorted(INIT_WEIGHTS),
        default="true",
        help="Tucker-LoRA init: true (zero core), false (random core), hosvd / hooi (factors from the base weights)",
    )
    g.add_argument("--core_init_scale", type=float, default=0.0, help="std of the initial core (0: zero core)")
    g.add_argument(
        "--lora_rank", type=int, default=None, help="LoRA baseline rank (default: matched to Tucker-LoRA's size)"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir", default=None, help="MSR-VTT folder or a folder with captions.csv (default: synthetic shapes)"
    )
    g.add_argument(
        "--data_layout",
        choices=("auto", "folder", "msrvtt", "synthetic"),
        default="auto",
        help="how --data_dir is laid out; auto: a captions.csv means a folder, JSON annotations mean MSR-VTT",
    )
    g.add_argument("--annotations", default=None, help="MSR-VTT annotation JSON (default: found in --data_dir)")
    g.add_argument("--captions_csv", default=None, help="captions CSV of a video folder (default: captions.csv)")
    g.add_argument("--split", default=None, help="MSR-VTT split to keep: train, validate or test (default: all)")
    g.add_argument("--num_frames", type=int, default=8, help="frames per training clip")
    g.add_argument("--frame_stride", type=int, default=1, help="take every n-th frame")
    g.add_argument("--resolution", type=int, default=None, help="square frame size (default: the UNet's)")
    g.add_argument("--num_synthetic_videos", type=int, default=64, help="clips of the synthetic dataset")
    g.add_argument("--caption_dropout", type=float, default=0.0, help="probability of an empty caption")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data loader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run")
    g.add_argument("--train_batch_size", type=int, default=1, help="videos per process and micro-batch")
    g.add_argument("--num_train_epochs", type=int, default=1, help="epochs to train (unless --max_train_steps)")
    g.add_argument(
        "--max_train_steps", type=int, default=None, help="optimiser steps (default: --num_train_epochs epochs)"
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute the UNet's blocks in the backward")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate after the warm-up")
    g.add_argument("--lr_scheduler", default="cosine", help="a diffusers.optimization.get_scheduler name")
    g.add_argument("--lr_warmup_steps", type=int, default=None, help="warm-up steps (default: 5%% of the steps)")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta_1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta_2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA tau of the adapter parameters")
    g.add_argument("--no_ema", action="store_true", help="keep no EMA of the adapter")
    g.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="autocast dtype (default: accelerate's configuration)",
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--output_dir", default="tucker-lora-t2v", help="where adapters, checkpoints and logs go")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every n steps")
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="checkpoints to keep, newest first (default: all)"
    )
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest', or a checkpoint-<step> folder (default: start a new run)",
    )
    g.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="checkpoint and stop at this step, keeping the LR schedule of --max_train_steps, for preemptible jobs "
        "(default: run to the end)",
    )
    g = p.add_argument_group("validation")
    g.add_argument("--validation_steps", type=int, default=100, help="sample every n steps and at the end (0: never)")
    g.add_argument(
        "--validation_prompts", nargs="+", default=None, help="prompts to sample (default: two captions of the data)"
    )
    g.add_argument("--validation_seeds", nargs="+", type=int, default=[0], help="one video per prompt and seed")
    g.add_argument("--num_validation_frames", type=int, default=None, help="frames per sample (default: --num_frames)")
    g.add_argument("--num_inference_steps", type=int, default=25, help="denoising steps per sample")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance weight")
    g.add_argument("--video_format", choices=VIDEO_FORMATS, default="mp4", help="file format of the samples")
    g.add_argument("--fps", type=int, default=8, help="frames per second of the sample files")
    g = p.add_argument_group("logging")
    g.add_argument("--report_to", default=None, help="an accelerate tracker: tensorboard, wandb, ... (default: none)")
    g.add_argument("--logging_dir", default="logs", help="the trackers' folder, inside --output_dir")
    return p


def parse_ranks(values: Optional[Sequence[str]]) -> Union[None, str, tuple[int, ...]]:
    """``--ranks``: five integers (spaces or commas), in the paper's order, or ``auto``."""
    if values is None:
        return None
    if [v.lower() for v in values] == ["auto"]:
        return "auto"
    items = [v for value in values for v in value.replace(",", " ").split()]
    if len(items) != 5:
        raise InputError(
            f"--ranks takes 5 integers r_o r_i r_t r_h r_w (the paper's order), got {len(items)}: {' '.join(items)}"
        )
    try:
        ranks = tuple(int(v) for v in items)
    except ValueError:
        raise InputError(f"--ranks takes integers, got {' '.join(items)}") from None
    if min(ranks) < 0 or min(ranks[:2]) < 1:
        raise InputError(f"--ranks: r_o and r_i must be >= 1 and the others >= 0, got {' '.join(items)}")
    return ranks


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the arguments; bad values are ``InputError`` naming the argument."""
    args = build_parser().parse_args(argv)
    args.ranks = parse_ranks(args.ranks)
    args.target_modules = parse_target_modules(args.target_modules)
    positive = ("train_batch_size", "gradient_accumulation_steps", "num_frames", "frame_stride", "checkpointing_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    at_least_one = ("max_train_steps", "stop_after_steps", "resolution", "num_validation_frames", "lora_rank")
    for name in (*at_least_one, "rank_budget"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise InputError(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise InputError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.method == "tucker" and args.lora_rank is not None:
        raise InputError("--lora_rank is for --method lora")
    if args.ranks == "auto":
        if args.rank_budget is None:
            raise InputError("--ranks auto needs --rank_budget N (trainable parameters of all adapters together)")
        if args.method != "tucker":
            raise InputError("--ranks auto is for --method tucker")
    elif args.rank_budget is not None:
        raise InputError("--rank_budget is for --ranks auto")
    if args.rank_calibration_batches < 1:
        raise InputError(f"--rank_calibration_batches must be >= 1, got {args.rank_calibration_batches}")
    return args


def check_inputs(args: argparse.Namespace) -> Optional[Path]:
    """Fail fast on missing paths (before any model is loaded); returns the checkpoint to resume from."""
    if args.pretrained_model_name_or_path is not None:
        check_pipeline_folder(args.pretrained_model_name_or_path)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        what = "does not exist" if not Path(args.data_dir).exists() else "is not a directory"
        raise InputError(f"--data_dir '{args.data_dir}' {what}")
    if args.resume_from_checkpoint:
        return Checkpoints(args.output_dir).resolve(args.resume_from_checkpoint)
    return None


# ---------------------------------------------------------------------------------------------- one step
def step_seeds(seed: int, step: int, micro: int, process: int) -> tuple[int, int]:
    """Two seeds for one micro-batch, functions of (seed, optimiser step, micro-batch, process) only: one for
    the batch's own draws (``step_generator``), one for torch's global RNG (the UNet's dropout)."""
    state = np.random.SeedSequence([seed, step, micro, process]).generate_state(2, dtype=np.uint64)
    return int(state[0]), int(state[1])


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """The CPU generator of one micro-batch's draws (VAE sample, caption dropout, noise, timesteps)."""
    return torch.Generator("cpu").manual_seed(step_seeds(seed, step, micro, process)[0])


def encode_videos(vae: Any, pixel_values: torch.Tensor, generator: torch.Generator, chunk: int = 16) -> torch.Tensor:
    """(B, 3, T, H, W) pixels in [-1, 1] -> (B, C, T, h, w) latents (a sample of the VAE posterior, scaled)."""
    b, _, t, h, w = pixel_values.shape
    frames = pixel_values.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
    latents = torch.cat([vae.encode(c).latent_dist.sample(generator=generator) for c in frames.split(chunk)])
    latents = latents * vae.config.scaling_factor
    return latents.reshape(b, t, *latents.shape[1:]).permute(0, 2, 1, 3, 4)


def diffusion_loss(
    model: Any,
    components: VideoComponents,
    noise_scheduler: Any,
    batch: dict[str, Any],
    generator: torch.Generator,
    caption_dropout: float = 0.0,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The denoising loss of section 3.4, ``||eps - eps_theta(x_t, t)||^2``, on one batch of videos.

    The noisy latents are detached and re-attached with ``requires_grad_(True)`` before the UNet (the
    paper's note: gradients flow through gradient-checkpointed blocks even though the base is frozen).
    """
    device = components.vae.device
    pixels = batch["pixel_values"].to(device, weight_dtype)
    with torch.no_grad():
        latents = encode_videos(components.vae, pixels, generator)
        drop = torch.rand(len(batch["caption"]), generator=generator) < caption_dropout
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)]
        text = encode_prompts(components.tokenizer, components.text_encoder, captions)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps).detach().requires_grad_(True)
    if components.backbone == "animatediff":  # the motion UNet takes text per frame
        text = text.repeat_interleave(latents.shape[2], dim=0)
    pred = model(noisy, timesteps, encoder_hidden_states=text).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    """What ``main`` returns: the trained peft model (unwrapped), where things went, the per-step losses."""

    model: Any
    global_step: int
    output_dir: Path
    components: Optional[VideoComponents] = None
    adapter_dir: Optional[Path] = None
    ema_adapter_dir: Optional[Path] = None
    validation_dirs: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    paused: bool = False


def _build_components(args: argparse.Namespace) -> VideoComponents:
    from .pipeline import load_components, tiny_components

    if args.pretrained_model_name_or_path is None:
        return tiny_components(args.backbone or "unet3d", seed=args.seed)
    components = load_components(args.pretrained_model_name_or_path, args.motion_adapter_name_or_path)
    if args.backbone is not None and args.backbone != components.backbone:
        raise InputError(
            f"--backbone {args.backbone} but '{args.pretrained_model_name_or_path}' holds a {components.backbone} "
            f"({type(components.unet).__name__})"
        )
    return components


class _Validator:
    """Samples the fixed prompts and seeds with the (EMA) adapter and writes videos and a frame grid."""

    def __init__(self, args: argparse.Namespace, components: VideoComponents, prompts: list[str], resolution: int):
        self.args, self.components, self.prompts, self.resolution = args, components, prompts, resolution
        self.pipe = None

    def __call__(self, accelerator: Any, model: Any, ema: Any, step: int) -> Path:
        """Sample and write (on the main process). A sharded model samples on every process together."""
        from .media import frame_grid, write_video
        from .pipeline import generate

        args = self.args
        peft_model = accelerator.unwrap_model(model)
        if self.pipe is None:
            self.pipe = self.components.pipeline(unet=peft_model.get_base_model())
        out = Path(args.output_dir) / "validation" / f"step-{step:06d}"
        peft_model.eval()
        swap = ema.swapped_in() if ema is not None else contextlib.nullcontext()
        try:
            with swap, unsharded_root(model), accelerator.autocast():
                videos = generate(
                    self.pipe,
                    self.prompts,
                    args.validation_seeds,
                    args.num_validation_frames or args.num_frames,
                    args.num_inference_steps,
                    args.guidance_scale,
                    self.resolution,
                    self.resolution,
                )
        finally:
            peft_model.train()
        if not accelerator.is_main_process:
            return out
        labels = []
        for i, (prompt, seed, frames) in enumerate(videos):
            write_video(frames, out / f"{i:02d}_seed{seed}.{args.video_format}", fps=args.fps)
            labels.append(f"{prompt} (seed {seed})")
        (out / "prompts.json").write_text(json.dumps([{"prompt": p, "seed": s} for p, s, _ in videos], indent=1))
        frame_grid([v for _, _, v in videos], out / "grid.png", labels=labels)
        logger.info("validation samples of step %d in %s", step, out)
        return out


def _print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    """Where the outputs are, and how the loss moved (mean of the first and last tenth of the steps)."""
    lines = [f"trained {summary['steps']} steps ({summary['method']}, {summary['trainable_parameters']} parameters)"]
    if "loss_first_tenth" in summary:
        lines[0] += f"; loss {summary['loss_first_tenth']:.4f} -> {summary['loss_last_tenth']:.4f}"
    lines.append(f"  adapter:        {summary['adapter']}")
    if summary["adapter_ema"]:
        lines.append(f"  EMA adapter:    {summary['adapter_ema']}")
    lines.append(f"  step log:       {summary['train_log']}")
    if summary["validation"]:
        lines.append(f"  validation:     {Path(summary['validation'][-1]) / 'grid.png'}")
    lines.append(f"  data examples:  {output_dir / 'data_examples.png'}")
    print("\n".join(lines), flush=True)


def _write_data_examples(dataset: Any, path: Path, count: int = 3) -> None:
    """A frame grid of the first training clips as the UNet will see them (after resize, crop and stride)."""
    from .media import frame_grid

    items = [dataset[i] for i in range(min(count, len(dataset)))]
    videos = [((item["pixel_values"].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1) for item in items]
    frame_grid(videos, path, labels=[item["caption"] for item in items])


def _register_adapter_checkpointing(accelerator: Any) -> None:
    """Checkpoints hold the adapter weights only (peft ``save_pretrained`` format), not the frozen base model."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(output_dir, save_embedding_layers=False)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_peft_weights(input_dir))
            missing = [k for k in result.missing_keys if model.prefix in k] if hasattr(model, "prefix") else []
            if result.unexpected_keys or missing:
                raise InputError(
                    f"checkpoint '{input_dir}' does not fit the model: unexpected {result.unexpected_keys[:5]}, "
                    f"missing {missing[:5]}"
                )

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------- run stages
@dataclass
class _Run:
    """The accelerate side of a run: the accelerator, the output folder and its checkpoints."""

    args: argparse.Namespace
    accelerator: Any
    output_dir: Path
    sharded: bool
    checkpoints: Checkpoints


@dataclass
class _Adapted:
    """The frozen pipeline components and the peft model with the adapter on the UNet."""

    components: VideoComponents
    base_dir: str
    weight_dtype: torch.dtype
    ranks: tuple[int, ...]
    plan: Any
    model: Any
    n_trainable: int
    allocation: Optional[RankAllocation] = None  # the per-layer ranks of --ranks auto


@dataclass
class _Optimisation:
    """What ``accelerator.prepare`` returned and the schedule of the run."""

    model: Any
    loader: Any
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    ema: Any
    state_io: Any
    trainable: list[torch.nn.Parameter]
    steps_per_epoch: int
    max_steps: int
    num_epochs: int
    warmup: int


def _setup(args: argparse.Namespace) -> _Run:
    """The accelerator (FSDP2 when configured), logging, the seed and a clean output folder."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=cpu_process_group(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    sharded = enable_fsdp(accelerator)  # FSDP2 from an accelerate FSDP config
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    checkpoints = Checkpoints(output_dir, args.checkpoints_total_limit)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.clean()
    accelerator.wait_for_everyone()
    return _Run(args, accelerator, output_dir, sharded, checkpoints)


def _load_components(run: _Run, run_context: contextlib.ExitStack) -> tuple[VideoComponents, str, torch.dtype]:
    """Frozen pipeline components on the device (the tiny default saved as the base model), where the base is, the
    weights' dtype. Gradient checkpointing, when asked for, lasts as long as ``run_context``."""
    args, accelerator = run.args, run.accelerator
    components = _build_components(args)
    base_dir = args.pretrained_model_name_or_path
    if base_dir is None:
        base_dir = str(run.output_dir / "base_model")
        if accelerator.is_main_process:
            components.save(base_dir)
            logger.info(
                "tiny %s pipeline (random weights, built from configs) saved to %s", components.backbone, base_dir
            )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (components.vae, components.text_encoder, components.unet):
        module.requires_grad_(False)
        # a sharded UNet stays on the CPU: fully_shard moves only this process's shard to the device
        device = "cpu" if run.sharded and module is components.unet else accelerator.device
        # (diffusers warns about any dtype cast, even to float32: cast only when mixed precision asks)
        module.to(device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    if args.gradient_checkpointing:
        run_context.enter_context(gradient_checkpointing(components.unet))
    return components, str(base_dir), weight_dtype


def calibration_batches(dataset: Any, count: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """``count`` batches of ``batch_size`` distinct clips of ``dataset`` (fewer if it is short), drawn with their
    own generator from ``seed``: the training data order is left alone."""
    from torch.utils.data import default_collate

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: count * batch_size]
    chunks = order.tolist()
    return [
        default_collate([dataset[i] for i in chunks[k : k + batch_size]]) for k in range(0, len(chunks), batch_size)
    ]


def _allocate(run: _Run, components: VideoComponents, dataset: Any, weight_dtype: torch.dtype) -> RankAllocation:
    """``--ranks auto``: per-layer ranks within ``--rank_budget`` from the base weights or (``--rank_proxy
    gradient``) from the gradient of the denoising loss over ``--rank_calibration_batches`` training batches
    (noise and timesteps of batch ``i`` from ``(seed, i)``). The report is logged."""
    from diffusers import DDPMScheduler

    from .adapters import allocate_adapter_ranks

    args = run.args
    batches, loss_fn = None, None
    if args.rank_proxy == "gradient":
        if run.sharded:
            raise InputError(
                "--rank_proxy gradient needs the whole UNet on one device: use --rank_proxy weight with FSDP"
            )
        noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
        batches = list(
            enumerate(calibration_batches(dataset, args.rank_calibration_batches, args.train_batch_size, args.seed))
        )

        def loss_fn(unet: Any, item: tuple[int, dict[str, Any]]) -> torch.Tensor:
            i, batch = item
            state = np.random.SeedSequence([args.seed, i], spawn_key=(1,)).generate_state(1, dtype=np.uint64)
            generator = torch.Generator("cpu").manual_seed(int(state[0]))
            return diffusion_loss(unet, components, noise_scheduler, batch, generator, 0.0, weight_dtype)

    return allocate_adapter_ranks(
        components.unet,
        args.rank_budget,
        args.target_modules,
        proxy=args.rank_proxy,
        batches=batches,
        loss_fn=loss_fn,
        seed=args.seed,
    )


def _build_model(
    run: _Run, components: VideoComponents, base_dir: str, weight_dtype: torch.dtype, dataset: Any
) -> _Adapted:
    """The adapter on the UNet (with ``--ranks auto``, at the ranks ``_allocate`` chose)."""
    from peft import get_peft_model

    from .adapters import accept_input_keyword, plan_adapter

    args = run.args
    allocation = _allocate(run, components, dataset, weight_dtype) if args.ranks == "auto" else None
    ranks = DEFAULT_RANKS[components.backbone] if args.ranks in (None, "auto") else args.ranks
    if allocation is not None and run.accelerator.is_main_process:
        (run.output_dir / "rank_allocation.txt").write_text(allocation.summary() + "\n")
    plan = plan_adapter(
        args.method,
        components.unet,
        ranks,
        alpha=args.alpha,
        target_modules=args.target_modules,
        init_weights=INIT_WEIGHTS[args.init_weights],
        core_init_scale=args.core_init_scale,
        lora_rank=args.lora_rank,
        rank_pattern=allocation,
    )
    model = get_peft_model(components.unet, plan.config)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    if args.method == "lora":
        accept_input_keyword(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "%s on %d layers of a %s: %d trainable parameters (Tucker-LoRA at ranks %s: %d)%s",
        "Tucker-LoRA" if plan.method == "tucker" else f"peft LoRA r={plan.lora_rank}",
        len(plan.layers),
        type(components.unet).__name__,
        n_trainable,
        f"allocated within {args.rank_budget}" if allocation is not None else tuple(ranks),
        plan.tucker_num_params,
        "" if plan.method == "tucker" else " (matched LoRA baseline)",
    )
    return _Adapted(components, base_dir, weight_dtype, tuple(ranks), plan, model, n_trainable, allocation)


def _build_data(run: _Run, components: VideoComponents) -> tuple[Any, torch.utils.data.DataLoader]:
    """The dataset (a grid of its first clips written as ``data_examples.png``) and its shuffled loader."""
    args = run.args
    dataset = load_dataset(
        args.data_dir,
        layout=args.data_layout,
        annotations=args.annotations,
        captions_csv=args.captions_csv,
        split=args.split,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        resolution=args.resolution or components.resolution,
        seed=args.seed,
        num_synthetic_videos=args.num_synthetic_videos,
    )
    if run.accelerator.is_main_process:
        _write_data_examples(dataset, run.output_dir / "data_examples.png")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.dataloader_num_workers,
    )
    return dataset, loader


def _build_optimisation(run: _Run, adapted: _Adapted, loader: Any) -> _Optimisation:
    """AdamW on the adapter, ``accelerator.prepare`` (sharding the UNet under FSDP2), the LR schedule, the EMA and
    what a checkpoint holds."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from .ema import AdapterEMA

    args, accelerator = run.args, run.accelerator
    model = adapted.model
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    if run.sharded:
        configure_wrap_policy(accelerator, adapted.components.unet)
        broadcast_adapter_init(model, accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # under FSDP2 accelerate swapped the optimizer's parameters for the sharded ones: clip and average those
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup = args.lr_warmup_steps if args.lr_warmup_steps is not None else round(0.05 * max_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    ema = None if args.no_ema else AdapterEMA(trainable, decay=args.ema_decay)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    _register_adapter_checkpointing(accelerator)
    state_io = ShardedCheckpointing(accelerator, model, optimizer) if run.sharded else accelerator
    noise_scheduler = DDPMScheduler.from_config(adapted.components.scheduler.config)
    return _Optimisation(
        model,
        loader,
        optimizer,
        lr_scheduler,
        noise_scheduler,
        ema,
        state_io,
        trainable,
        steps_per_epoch,
        max_steps,
        num_epochs,
        warmup,
    )


def _resume(run: _Run, state_io: Any, resume: Optional[Path]) -> int:
    """Load the checkpoint to resume from (every state accelerate and the adapter keep); the step it was saved at."""
    if resume is not None:
        state_io.load_state(str(resume))
        global_step = Checkpoints.step_of(resume)
        logger.info("resumed from %s (step %d)", resume, global_step)
        return global_step
    if run.args.resume_from_checkpoint:
        logger.info("no checkpoint in %s yet: starting a new run", run.output_dir)
    return 0


def _start_logs(run: _Run, global_step: int) -> Any:
    """The step log (cut back to ``global_step``), ``training_args.json`` and the trackers; returns the step log."""
    args, accelerator = run.args, run.accelerator
    step_log = StepLog(run.output_dir / TRAIN_LOG)
    if accelerator.is_main_process:
        step_log.truncate_after(global_step)  # a fresh run starts a new log; a resumed one drops the redone steps
        (run.output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=1, default=str))
    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers("tucker-lora-text-to-video", config={k: str(v) for k, v in vars(args).items()})
    return step_log


class _Loop:
    """The training loop: optimiser steps of accumulated micro-batches, each logged, checkpointed and validated on
    schedule, until ``stop_at``."""

    def __init__(
        self,
        run: _Run,
        adapted: _Adapted,
        opt: _Optimisation,
        dataset: Any,
        step_log: Any,
        validate: _Validator,
        result: TrainResult,
    ) -> None:
        self.run, self.adapted, self.opt, self.dataset = run, adapted, opt, dataset
        self.step_log, self.validate, self.result = step_log, validate, result
        self.stop_at = min(opt.max_steps, run.args.stop_after_steps or opt.max_steps)
        self.global_step = result.global_step
        self.micro, self.micro_losses, self.micro_videos = 0, [], 0
        self.step_lr = 0.0

    def run_epochs(self) -> int:
        """Train from ``global_step`` to ``stop_at``; returns the last step."""
        from tqdm.auto import tqdm

        run, opt = self.run, self.opt
        accelerator = run.accelerator
        self.progress = tqdm(
            total=opt.max_steps, initial=self.global_step, desc="train", disable=not accelerator.is_local_main_process
        )
        self.t_run = self.t_step = time.perf_counter()
        opt.model.train()
        first_epoch = self.global_step // opt.steps_per_epoch
        for epoch in range(first_epoch, opt.num_epochs):
            if self.global_step >= self.stop_at:
                break
            self.dataset.set_epoch(epoch)
            opt.loader.set_epoch(epoch)
            skip = (self.global_step - epoch * opt.steps_per_epoch) * run.args.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(opt.loader, skip) if skip else opt.loader
            for batch in batches:
                self.micro_step(batch)
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                if opt.ema is not None:
                    opt.ema.step()
                self.log_step(epoch)
                self.checkpoint()
                self.validate_on_schedule()
                self.t_step = time.perf_counter()  # checkpoint and validation time is not training throughput
                if self.global_step >= self.stop_at:
                    break
        self.progress.close()
        return self.global_step

    def micro_step(self, batch: dict[str, Any]) -> None:
        """Forward and backward of one micro-batch; the optimiser steps when the accumulation is complete."""
        args, accelerator, opt = self.run.args, self.run.accelerator, self.opt
        if self.micro == 0:
            self.step_lr = opt.lr_scheduler.get_last_lr()[0]  # the learning rate this optimiser step uses
        with accelerator.accumulate(opt.model):
            own, dropout = step_seeds(args.seed, self.global_step, self.micro, accelerator.process_index)
            torch.manual_seed(dropout)  # the UNet's dropout (UNet3D's temporal convs) depends on the step alone
            generator = torch.Generator("cpu").manual_seed(own)
            loss = diffusion_loss(
                opt.model,
                self.adapted.components,
                opt.noise_scheduler,
                batch,
                generator,
                args.caption_dropout,
                self.adapted.weight_dtype,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(opt.trainable, args.max_grad_norm)
            opt.optimizer.step()
            opt.lr_scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        self.micro_losses.append(loss.detach().float())
        self.micro_videos += len(batch["caption"])

    def log_step(self, epoch: int) -> None:
        """One line of the step log (loss over micro-batches and processes, lr, throughput, memory), the trackers
        and the progress bar."""
        args, accelerator = self.run.args, self.run.accelerator
        step_loss = accelerator.gather(torch.stack(self.micro_losses).mean()[None]).mean().item()
        videos = self.micro_videos * accelerator.num_processes
        self.micro, self.micro_losses, self.micro_videos = 0, [], 0
        now = time.perf_counter()
        record = {
            "step": self.global_step,
            "epoch": epoch,
            "loss": step_loss,
            "lr": self.step_lr,
            "videos_per_s": videos / (now - self.t_step),
            "peak_memory_mb": peak_memory_mb(accelerator.device),
            "time": now - self.t_run,
        }
        self.result.losses.append(step_loss)
        if accelerator.is_main_process:
            self.step_log.write(record)
        if args.report_to:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}")

    def checkpoint(self) -> None:
        """A checkpoint every ``--checkpointing_steps``, and at a stop before the last step."""
        run, opt, step = self.run, self.opt, self.global_step
        if step % run.args.checkpointing_steps == 0 or (step == self.stop_at < opt.max_steps):
            path = run.checkpoints.save(run.accelerator, step, save_state=opt.state_io.save_state)
            logger.info("checkpoint saved to %s", path)

    def validate_on_schedule(self) -> None:
        """Validation samples every ``--validation_steps`` and at the last step."""
        run, opt, step = self.run, self.opt, self.global_step
        args, accelerator = run.args, run.accelerator
        if args.validation_steps and (step % args.validation_steps == 0 or step == opt.max_steps):
            if accelerator.is_main_process or run.sharded:  # a sharded UNet runs on every process together
                path = self.validate(accelerator, opt.model, opt.ema, step)
                if accelerator.is_main_process:
                    self.result.validation_dirs.append(path)
            accelerator.wait_for_everyone()


def _save(run: _Run, adapted: _Adapted, opt: _Optimisation, step_log: Any, result: TrainResult) -> None:
    """A finished run writes ``adapter/`` and ``adapter_ema/`` (every process takes part: a sharded adapter is
    gathered) and its summary; a paused one says how to resume."""
    accelerator, output_dir = run.accelerator, run.output_dir
    if result.paused:
        logger.info(
            "stopped at step %d of %d: resume with --resume_from_checkpoint latest", result.global_step, opt.max_steps
        )
        return
    result.adapter_dir = output_dir / "adapter"
    save_adapter_folder(accelerator, opt.model, result.adapter_dir)
    if opt.ema is not None:
        result.ema_adapter_dir = output_dir / "adapter_ema"
        with opt.ema.swapped_in():
            save_adapter_folder(accelerator, opt.model, result.ema_adapter_dir)
    if accelerator.is_main_process:
        _write_summary(adapted, step_log, result)


def _write_summary(adapted: _Adapted, step_log: Any, result: TrainResult) -> None:
    """``summary.json`` (what was trained, where the outputs are, the loss over the first and last tenth of the
    steps) and its printed form."""
    plan = adapted.plan
    summary = {
        "method": plan.method,
        "backbone": adapted.components.backbone,
        "base_model": adapted.base_dir,
        "trainable_parameters": adapted.n_trainable,
        "tucker_parameters_at_these_ranks": plan.tucker_num_params,
        "lora_rank": plan.lora_rank,
        "ranks": "auto" if adapted.allocation is not None else list(adapted.ranks),
        "adapted_layers": len(plan.layers),
        **(
            {
                "rank_budget": adapted.allocation.budget,
                "rank_proxy": adapted.allocation.proxy,
                "rank_pattern": {n: list(a.ranks) for n, a in adapted.allocation.layers.items()},
            }
            if adapted.allocation is not None
            else {}
        ),
        "steps": result.global_step,
        "adapter": str(result.adapter_dir),
        "adapter_ema": str(result.ema_adapter_dir) if result.ema_adapter_dir else None,
        "train_log": str(step_log.path),
        "validation": [str(p) for p in result.validation_dirs],
    }
    losses = [r["loss"] for r in read_log(step_log.path)]  # the whole run, resumed parts included
    if losses:
        tenth = max(1, len(losses) // 10)
        summary["loss_first_tenth"] = sum(losses[:tenth]) / tenth
        summary["loss_last_tenth"] = sum(losses[-tenth:]) / tenth
    (result.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, result.output_dir)


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Run a training job from command-line arguments; see the module docstring."""
    args = parse_args(argv)
    resume = check_inputs(args)
    run = _setup(args)
    with contextlib.ExitStack() as run_context:  # what the run changes on the models is undone when it ends
        components, base_dir, weight_dtype = _load_components(run, run_context)
        dataset, loader = _build_data(run, components)
        adapted = _build_model(run, components, base_dir, weight_dtype, dataset)
        opt = _build_optimisation(run, adapted, loader)
        global_step = _resume(run, opt.state_io, resume)
        step_log = _start_logs(run, global_step)
        prompts = args.validation_prompts or example_captions(dataset, 2)
        resolution = args.resolution or adapted.components.resolution
        validate = _Validator(args, adapted.components, prompts, resolution)
        result = TrainResult(
            model=None, global_step=global_step, output_dir=run.output_dir, components=adapted.components
        )
        loop = _Loop(run, adapted, opt, dataset, step_log, validate, result)
        logger.info(
            "%d videos, %d processes x batch %d x accumulation %d; %d steps (%d per epoch), warm-up %d; stop at %d",
            len(dataset),
            run.accelerator.num_processes,
            args.train_batch_size,
            args.gradient_accumulation_steps,
            opt.max_steps,
            opt.steps_per_epoch,
            opt.warmup,
            loop.stop_at,
        )
        global_step = loop.run_epochs()
        run.accelerator.wait_for_everyone()
        result.model, result.global_step = run.accelerator.unwrap_model(opt.model), global_step
        result.paused = global_step < opt.max_steps
        _save(run, adapted, opt, step_log, result)
        run.accelerator.wait_for_everyone()
        run.accelerator.end_training()
    return result


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the example script: bad input prints ``error: ...`` and exits with status 2."""
    return run_cli(main, argv)
