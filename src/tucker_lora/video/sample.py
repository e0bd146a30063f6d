"""Sample videos from a text-to-video model with a trained adapter (the command line of
``examples/sample_text_to_video.py``).

    python examples/sample_text_to_video.py --adapter outputs/demo/adapter_ema --prompts "a red circle moving right"

The base model is ``--pretrained_model_name_or_path`` (a local diffusers folder) or, by default, the
``base_model_name_or_path`` the adapter was trained on. The adapter (a peft ``save_pretrained`` folder:
Tucker-LoRA or the LoRA baseline) runs unmerged, or merged into the weights with ``--merge``
(``merge_and_unload``: a plain UNet, no adapter overhead). Without ``--adapter`` the base model samples.
Each (prompt, seed) gives one MP4 (or GIF); ``grid.png`` shows them all, one row each, every frame left to right
(at most 8, spread from the first to the last).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..cli import HelpFormatter, run_cli
from ..errors import InputError
from ..io import CONFIG_NAME
from .media import VIDEO_FORMATS

logger = logging.getLogger("tucker_lora.video.sample")

__all__ = ["build_parser", "load_adapted_unet", "main"]

DEFAULT_PROMPTS = ("a red circle moving right", "a blue square moving up")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The command line, grouped: model, adapter, sampling, output."""
    p = argparse.ArgumentParser(
        description="Sample text-to-video with a Tucker-LoRA (or LoRA) adapter.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="local diffusers pipeline folder (default: the adapter's base_model_name_or_path)",
    )
    g.add_argument(
        "--motion_adapter_name_or_path",
        default=None,
        help="MotionAdapter folder for a pipeline with a 2D UNet (default: its motion_adapter subfolder)",
    )
    g.add_argument("--device", default=None, help="torch device to sample on (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the pipeline is loaded in")
    g = p.add_argument_group("adapter")
    g.add_argument(
        "--adapter", default=None, help="adapter folder (peft save_pretrained) (default: none, the base model samples)"
    )
    g.add_argument("--merge", action="store_true", help="merge the adapter into the weights (merge_and_unload)")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="text prompts, one video per seed each")
    g.add_argument("--negative_prompt", default=None, help="negative prompt for guidance (default: none)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0], help="noise seeds, one video per prompt and seed")
    g.add_argument("--num_frames", type=int, default=16, help="frames per video")
    g.add_argument("--num_inference_steps", type=int, default=25, help="denoising steps")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance weight")
    g.add_argument("--height", type=int, default=None, help="frame height (default: the UNet's native size)")
    g.add_argument("--width", type=int, default=None, help="frame width (default: the UNet's native size)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="samples", help="folder for the videos and grid.png")
    g.add_argument("--video_format", choices=VIDEO_FORMATS, default="mp4", help="file format of the videos")
    g.add_argument("--fps", type=int, default=8, help="frames per second of the video files")
    return p


def _base_of(adapter: Path) -> Optional[str]:
    config = json.loads((adapter / CONFIG_NAME).read_text())
    return config.get("base_model_name_or_path")


def load_adapted_unet(unet: Any, adapter: str | Path, merge: bool = False) -> Any:
    """``unet`` with the adapter of a ``save_pretrained`` folder: unmerged (the adapted UNet) or merged."""
    from peft import PeftModel

    import tucker_lora  # noqa: F401  (registers the tuner with peft before the config is read)

    from .adapters import accept_input_keyword

    model = PeftModel.from_pretrained(unet, str(adapter))
    accept_input_keyword(model)  # peft LoRA layers inside AnimateDiff's motion modules (no-op for Tucker-LoRA)
    return model.merge_and_unload() if merge else model.get_base_model()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Sample and write the videos and the grid; returns ``{"videos": [paths], "grid": path}``."""
    from .media import frame_grid, spread_frames, write_video
    from .pipeline import generate, load_components

    args = build_parser().parse_args(argv)
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / CONFIG_NAME).is_file():
        raise InputError(f"adapter folder '{adapter}' has no {CONFIG_NAME} (expected a peft save_pretrained folder)")
    base = args.pretrained_model_name_or_path or (_base_of(adapter) if adapter is not None else None)
    if base is None:
        raise InputError("no base model: pass --pretrained_model_name_or_path (the adapter names none)")
    for name in ("num_frames", "num_inference_steps", "fps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    components = load_components(base, args.motion_adapter_name_or_path, torch_dtype=DTYPES[args.dtype])
    unet = components.unet
    if adapter is not None:
        unet = load_adapted_unet(unet, adapter, merge=args.merge)
    pipe = components.pipeline(unet=unet).to(device)
    height = args.height or components.resolution
    width = args.width or components.resolution
    videos = generate(
        pipe,
        args.prompts,
        args.seeds,
        args.num_frames,
        args.num_inference_steps,
        args.guidance_scale,
        height,
        width,
        negative_prompt=args.negative_prompt,
    )
    out = Path(args.output_dir)
    paths, labels = [], []
    for i, (prompt, seed, frames) in enumerate(videos):
        paths.append(write_video(frames, out / f"{i:02d}_seed{seed}.{args.video_format}", fps=args.fps))
        labels.append(f"{prompt} (seed {seed})")
    grid = frame_grid([v for _, _, v in videos], out / "grid.png", labels=labels, frames=spread_frames(args.num_frames))
    what = "base model" if adapter is None else f"adapter {adapter} ({'merged' if args.merge else 'unmerged'})"
    print(f"sampled {len(videos)} videos with {what} on {base}:")
    for path in paths:
        print(f"  {path}")
    print(f"frame grid (frames left to right): {grid}")
    return {"videos": paths, "grid": grid}


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the example script: bad input prints ``error: ...`` and exits with status 2."""
    return run_cli(main, argv)
