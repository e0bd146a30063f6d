"""Reading a folder of videos for evaluation: N frames per video, resized for the detector.

Protocol (StyleGAN-V / common_metrics_on_video_quality, the FVD code behind VideoCrafter's numbers):

- frames: exactly ``N`` (16) per video. A longer video is resampled with centre sampling: its ``T`` frames
  are split into ``N`` equal segments and the middle frame of each is kept, ``i_k = floor((k + 1/2) T / N)``
  (``sampling="first"`` keeps frames ``0 .. N-1`` instead, StyleGAN-V's temporal crop). A shorter or an
  unreadable video is an error naming the file; nothing is skipped silently.
- space: the shorter side resized to ``R`` (224; bilinear, ``align_corners=False``, no antialiasing, as the
  reference code), then the centre ``R x R`` crop.
- values: ``x / 127.5 - 1`` in ``[-1, 1]``, what the I3D detectors expect (the StyleGAN-V TorchScript
  with ``rescale=False``; the PyTorch I3D port's inputs), laid out as ``(3, N, R, R)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ClipError, InputError
from ..video.data import VIDEO_EXTENSIONS, probe_frames, read_caption_rows

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLINGS",
    "folder_digest",
    "frame_indices",
    "iter_video_batches",
    "list_videos",
    "read_prompts",
    "read_video",
    "to_detector_input",
]

SAMPLINGS = ("centre", "first")


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The video files under ``folder`` (any depth, sorted); an error names the folder if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"video folder '{folder}' does not exist or is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not paths:
        raise InputError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in '{folder}'")
    return paths


def folder_digest(paths: Sequence[Path], root: str | os.PathLike) -> str:
    """SHA-256 over the videos' paths relative to ``root`` and their sizes (changes when the set changes)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def frame_indices(total: int, num_frames: int, sampling: str = "centre") -> np.ndarray:
    """Indices of the ``num_frames`` frames kept from ``total``: ``floor((k + 1/2) total / num_frames)`` for
    ``"centre"`` (distinct, since ``total >= num_frames``), ``0 .. num_frames - 1`` for ``"first"``."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown frame sampling {sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    if total < num_frames:
        raise ValueError(f"cannot take {num_frames} frames from {total}")
    k = np.arange(num_frames)
    return k if sampling == "first" else ((2 * k + 1) * total) // (2 * num_frames)


def _decode(path: Path, keep: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Decode ``path`` as RGB frames: only the indices in ``keep`` (stopping after the last), or all of them."""
    import av

    wanted = None if keep is None else set(int(i) for i in keep)
    last = None if keep is None else max(wanted)
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"'{path}' has no video stream")
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if last is not None and index > last:
                    break
                if wanted is None or index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except InputError:
        raise
    except Exception as e:  # PyAV raises FFmpegError subclasses, OSError, ValueError, ...
        raise InputError(f"'{path}' cannot be decoded as a video ({type(e).__name__}: {e})") from e
    return frames


def _too_short(path: Path, total: int, num_frames: int) -> InputError:
    return InputError(
        f"'{path}' has {total} frames; the protocol takes {num_frames} per video (--num-frames), "
        "so every video needs at least that many"
    )


def read_video(path: str | os.PathLike, num_frames: int = 16, sampling: str = "centre") -> np.ndarray:
    """``num_frames`` frames of ``path`` as a (N, H, W, 3) uint8 array, chosen by ``frame_indices``.

    The frame count comes from the container's metadata when it has one (only the kept frames are kept
    while decoding); if it is missing or wrong, the whole video is decoded and counted.
    """
    path = Path(path)
    try:
        total = probe_frames(path)
    except ClipError as e:
        raise InputError(str(e)) from e
    if total is not None:
        if total < num_frames:
            raise _too_short(path, total, num_frames)
        frames = _decode(path, frame_indices(total, num_frames, sampling))
        if len(frames) == num_frames:
            return np.stack(frames)
    frames = _decode(path)  # no or wrong metadata: count by decoding
    if len(frames) < num_frames:
        raise _too_short(path, len(frames), num_frames)
    return np.stack([frames[i] for i in frame_indices(len(frames), num_frames, sampling)])


def to_detector_input(frames: torch.Tensor, resolution: int = 224) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (3, N, R, R) float in [-1, 1]: shorter side to ``R``, centre crop.

    The resized size is ``(R, ceil(W R / H))`` (or the transpose), bilinear without antialiasing.
    """
    x = frames.permute(0, 3, 1, 2).float()  # N, 3, H, W
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), resolution)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    x = x[:, :, top : top + resolution, left : left + resolution]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).transpose(0, 1).contiguous()


def iter_video_batches(
    paths: Sequence[Path], num_frames: int, sampling: str, batch_size: int, desc: str = "videos"
) -> Iterator[tuple[list[Path], list[np.ndarray]]]:
    """Read ``paths`` in order, ``batch_size`` at a time, with a progress bar over the videos."""
    with tqdm(total=len(paths), desc=desc, unit="video") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            frames = []
            for p in chunk:
                frames.append(read_video(p, num_frames, sampling))
                bar.update(1)
            yield chunk, frames


def read_prompts(csv_path: str | os.PathLike, paths: Sequence[Path], root: str | os.PathLike) -> dict[Path, list[str]]:
    """The prompt(s) of each video in ``paths`` from a CSV with a file and a caption column (as ``captions.csv``
    of a training folder: ``file,caption``; the file relative to ``root``, with or without its extension).

    Every video needs at least one prompt: the error lists those without one.
    """
    csv_path, root = Path(csv_path), Path(root)
    rows = read_caption_rows(csv_path, "prompts file", "CLIP-T needs a CSV with file,caption columns")
    by_name: dict[str, Path] = {}
    for p in paths:
        rel = p.relative_to(root)
        for key in (rel.as_posix(), rel.with_suffix("").as_posix(), p.stem):
            by_name.setdefault(key, p)
    prompts: dict[Path, list[str]] = {}
    for name, caption in rows:
        p = by_name.get(Path(name).as_posix()) or by_name.get(Path(name).with_suffix("").as_posix())
        if p is not None and caption:
            prompts.setdefault(p, []).append(caption)
    missing = [p.relative_to(root).as_posix() for p in paths if p not in prompts]
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise InputError(f"'{csv_path}' has no prompt for {shown}")
    return prompts
