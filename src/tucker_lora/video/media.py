"""Writing videos (MP4 through PyAV, GIF through Pillow) and the PNG grid of their frames.

A video here is a uint8 array of shape (T, H, W, 3), or a float array / tensor in [0, 1] of that
shape (what diffusers pipelines return with ``output_type="np"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_FORMATS", "frame_grid", "grid_frames", "spread_frames", "to_uint8", "write_video"]

#: The file formats ``write_video`` writes (by suffix).
VIDEO_FORMATS = ("mp4", "gif")


def to_uint8(video: Any) -> np.ndarray:
    """A video as a (T, H, W, 3) uint8 array; floats are read as [0, 1] and clipped."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video of shape (T, H, W, 3), got {video.shape}")
    if video.dtype != np.uint8:
        video = (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return video


def write_video(video: Any, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write ``video`` to ``path``: ``.gif`` with Pillow, anything else as H.264 (or MPEG-4 part 2) with PyAV.

    Odd heights/widths are padded by one pixel for the encoder (yuv420p needs even sizes). Without
    PyAV an MP4 request falls back to a GIF next to it. Returns the path written.
    """
    frames = to_uint8(video)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".gif":
        try:
            import av
        except ImportError:
            path = path.with_suffix(".gif")
            logger.warning("PyAV is not installed (pip install av): writing %s instead of an MP4", path)
        else:
            _write_av(av, frames, path, fps)
            return path
    images = [_pil(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def _write_av(av: Any, frames: np.ndarray, path: Path, fps: int) -> None:
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _pil(frame: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(frame, mode="RGB")


def grid_frames(num_frames: int) -> tuple[int, int, int]:
    """The indices of the first, middle and last frame."""
    return 0, (num_frames - 1) // 2, num_frames - 1


def spread_frames(num_frames: int, count: int = 8) -> tuple[int, ...]:
    """``count`` frame indices spread evenly from the first to the last (every frame if there are no more)."""
    if num_frames <= count:
        return tuple(range(num_frames))
    return tuple(round(k * (num_frames - 1) / (count - 1)) for k in range(count))


def frame_grid(
    videos: Sequence[Any],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    min_size: int = 128,
    pad: int = 2,
    frames: Sequence[int] | None = None,
) -> Path:
    """A PNG grid: one row per video, one column per frame index of ``frames`` (default t=0, t=mid, t=end: the
    paper's temporal slices), time running left to right.

    Small frames are enlarged (nearest neighbour) to at least ``min_size`` pixels; ``labels`` (one per
    row, e.g. the prompt and seed) are written above each row. Returns the path written.
    """
    from PIL import Image, ImageDraw

    rows = [to_uint8(v) for v in videos]
    if not rows:
        raise ValueError("frame_grid needs at least one video")
    h, w = rows[0].shape[1:3]
    scale = max(1, -(-min_size // min(h, w)))
    ch, cw = h * scale, w * scale
    label_h = 12 if labels else 0
    cols = ("t=0", "t=mid", "t=end") if frames is None else tuple(f"t={t}" for t in frames)
    header = 12
    width = pad + len(cols) * (cw + pad)
    height = header + len(rows) * (label_h + ch + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(cols):
        draw.text((pad + c * (cw + pad) + 2, 0), name, fill=(0, 0, 0))
    y = header
    for r, video in enumerate(rows):
        if video.shape[1:3] != (h, w):
            raise ValueError(f"frame_grid: video {r} has frames of {video.shape[1:3]}, video 0 of {(h, w)}")
        if labels:
            draw.text((pad + 2, y), str(labels[r]), fill=(0, 0, 0))
            y += label_h
        for c, t in enumerate(grid_frames(len(video)) if frames is None else frames):
            if not 0 <= t < len(video):
                raise ValueError(f"frame_grid: video {r} has {len(video)} frames, no frame {t}")
            image = _pil(video[t]).resize((cw, ch), Image.NEAREST)
            grid.paste(image, (pad + c * (cw + pad), y))
        y += ch + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
