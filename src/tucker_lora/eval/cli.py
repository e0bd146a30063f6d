"""The evaluation command: FVD and CLIP-T of a folder of videos, efficiency from a training run, time-to-target.

    python examples/evaluate_videos.py samples/ --reference-videos ref/ --i3d i3d_torchscript.pt \\
        --clip clip-vit-large-patch14/ --num-frames 16 --resolution 224 --output scores.json

Prints the result as JSON (and writes it to ``--output``): ``fvd``, ``clip_t``, ``num_videos``, the
``settings``, and with ``--train-log`` / ``--adapter`` / ``--target-fvd`` the ``efficiency`` and
``time_to_target``. Bad input prints ``error: ...`` naming the file or setting and exits with status 2.
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
from ..video.metrics import StepLog
from . import efficiency
from .clip_score import ClipScorer
from .i3d import load_i3d
from .protocol import Protocol, fvd, reference_stats, score_videos
from .stats import write_atomic
from .videos import SAMPLINGS, list_videos, read_prompts

logger = logging.getLogger("tucker_lora.eval")

__all__ = ["build_parser", "cli", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate_videos",
        description="Score generated videos under the paper's protocol: FVD (I3D), CLIP-T, efficiency, time-to-target.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "videos", nargs="?", default=None, help="folder of generated videos, any depth (default: none, no scores)"
    )
    g = p.add_argument_group("FVD")
    g.add_argument(
        "--reference-stats",
        default=None,
        help="reference statistics .npz to read, or the cache to write (default: a cache in --reference-videos)",
    )
    g.add_argument(
        "--reference-videos",
        default=None,
        help="folder of reference videos, whose statistics are computed once and cached (default: none)",
    )
    g.add_argument(
        "--i3d", default=None, help="I3D detector: TorchScript file or InceptionI3d state dict (default: no FVD)"
    )
    g = p.add_argument_group("CLIP-T")
    g.add_argument(
        "--clip", default=None, help="local CLIPModel folder with tokenizer and preprocessor (default: no CLIP-T)"
    )
    g.add_argument("--prompts", default=None, help="CSV with file,caption columns (default: VIDEOS/captions.csv)")
    g = p.add_argument_group("protocol")
    g.add_argument("--num-frames", type=int, default=16, help="frames per video; longer videos are resampled")
    g.add_argument("--resolution", type=int, default=224, help="shorter side resized to this, then the centre crop")
    g.add_argument(
        "--frame-sampling",
        choices=SAMPLINGS,
        default="centre",
        help="centre: middle frame of N equal segments; first: frames 0..N-1",
    )
    g.add_argument("--batch-size", type=int, default=8, help="videos per detector / CLIP batch")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g = p.add_argument_group("efficiency and time-to-target")
    g.add_argument(
        "--train-log",
        default=None,
        help="train_log.jsonl of the training script, or its output folder (default: no efficiency)",
    )
    g.add_argument(
        "--adapter",
        default=None,
        help="adapter folder (peft save_pretrained) whose trainable parameters to count (default: none)",
    )
    g.add_argument("--fvd-log", default=None, help="JSONL of {time, fvd} per evaluated checkpoint (default: none)")
    g.add_argument(
        "--step", type=int, default=None, help="append this run's FVD at this training step to --fvd-log (default: no)"
    )
    g.add_argument(
        "--target-fvd", type=float, default=None, help="time-to-target threshold, read from --fvd-log (default: none)"
    )
    g.add_argument(
        "--baseline-fvd-log", default=None, help="a second run's FVD log: the time saved against it (default: none)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="also write the JSON to this file (default: print only)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Errors for option combinations that cannot work, before anything is loaded."""
    for name in ("num_frames", "resolution", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    wants_fvd = args.reference_stats is not None or args.reference_videos is not None
    if wants_fvd and args.i3d is None:
        raise InputError("FVD needs the I3D detector: pass --i3d PATH")
    if args.i3d is not None and not wants_fvd:
        raise InputError("--i3d computes FVD against a reference: pass --reference-stats or --reference-videos")
    if args.clip is not None and args.videos is None:
        raise InputError("CLIP-T needs a folder of videos")
    if args.step is not None and (args.fvd_log is None or args.train_log is None or not wants_fvd or not args.videos):
        raise InputError(
            "--step appends the FVD of VIDEOS to --fvd-log at the time --train-log gives for the step: it needs "
            "VIDEOS, a reference (--reference-stats/--reference-videos), --fvd-log and --train-log"
        )
    if args.target_fvd is not None and args.fvd_log is None:
        raise InputError("--target-fvd reads the (time, FVD) pairs of --fvd-log")
    if args.baseline_fvd_log is not None and args.target_fvd is None:
        raise InputError("--baseline-fvd-log needs --target-fvd")
    if not (wants_fvd or args.clip or args.train_log or args.adapter or args.target_fvd is not None):
        raise InputError(
            "nothing to evaluate: give --reference-stats/--reference-videos, --clip, --train-log, "
            "--adapter or --target-fvd"
        )


def evaluate_folder(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """FVD and CLIP-T of ``args.videos`` (and the reference statistics), as the JSON's top-level entries."""
    protocol = Protocol(args.num_frames, args.resolution, args.frame_sampling, args.batch_size, device)
    out: dict[str, Any] = {"fvd": None, "clip_t": None, "num_videos": None}
    settings: dict[str, Any] = {
        "num_frames": protocol.num_frames,
        "resolution": protocol.resolution,
        "frame_sampling": protocol.sampling,
    }
    detector = reference = ref_path = None
    if args.i3d is not None:
        detector = load_i3d(args.i3d, device)
        reference, ref_path, cached = reference_stats(detector, protocol, args.reference_videos, args.reference_stats)
        settings = {**protocol.settings(detector), "detector_path": str(detector.path)}
        out["reference"] = {
            "stats": str(ref_path),
            "videos": args.reference_videos,
            "num_videos": reference.count,
            "from_cache": cached,
        }
    clip = ClipScorer(args.clip, device) if args.clip else None
    if clip is not None:
        settings["clip"] = str(clip.path)
    out["settings"] = settings
    if args.videos is None:
        return out
    root = Path(args.videos)
    paths = list_videos(root)
    prompts = read_prompts(args.prompts or root / "captions.csv", paths, root) if clip is not None else None
    if detector is not None and len(paths) < 2:
        raise InputError(f"FVD needs at least 2 generated videos, '{root}' has {len(paths)}")
    features, scores = score_videos(paths, protocol, detector, clip, prompts, desc="generated videos")
    out["num_videos"] = len(paths)
    if features is not None:
        out["fvd"] = fvd(features, reference, ref_path)
    if scores is not None:
        out["clip_t"] = sum(scores) / len(scores)
        out["clip_t_per_video"] = {p.relative_to(root).as_posix(): s for p, s in zip(paths, scores, strict=True)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the evaluation; returns (and prints) the result."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"videos": args.videos, **evaluate_folder(args, device)}
    if args.train_log is not None:
        result["efficiency"] = efficiency.training_efficiency(args.train_log)
    if args.adapter is not None:
        result.setdefault("efficiency", {}).update(efficiency.trainable_parameters(args.adapter))
    if args.step is not None:
        record = {"step": args.step, "time": efficiency.step_time(args.train_log, args.step), "fvd": result["fvd"]}
        StepLog(args.fvd_log).write({**record, "videos": args.videos})
    if args.target_fvd is not None:
        pairs = efficiency.read_fvd_log(args.fvd_log)
        if args.baseline_fvd_log:
            baseline = efficiency.read_fvd_log(args.baseline_fvd_log)
            result["time_to_target"] = efficiency.time_saved(pairs, baseline, args.target_fvd)
        else:
            result["time_to_target"] = {
                "target_fvd": args.target_fvd,
                "time_s": efficiency.time_to_target(pairs, args.target_fvd),
            }
    text = json.dumps(result, indent=1)
    if args.output:
        write_atomic(args.output, lambda f: f.write(text.encode() + b"\n"))
    print(text)
    return result


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: bad input prints ``error: ...`` and exits with status 2."""
    return run_cli(main, argv)
