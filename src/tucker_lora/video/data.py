"""Text-video training data: MSR-VTT, a folder of videos with ``captions.csv``, synthetic moving shapes.

Every dataset yields ``{"pixel_values": float tensor (3, T, R, R) in [-1, 1], "caption": str}``: T frames
taken at a stride, each resized (shorter side to R) and centre-cropped to R x R.

Readers decode with PyAV (``pip install av``). A video that cannot be opened or holds fewer than
``(T - 1) * stride + 1`` frames is skipped with a warning that names the file: when the dataset is
built (from the container's metadata) and again, should decoding fail later, in ``__getitem__``,
which then serves the next readable clip instead of raising in the middle of an epoch.

Randomness (the start frame of a clip, which caption of a video) is a function of
``(seed, epoch, index)`` alone; call ``set_epoch`` each epoch. So a resumed run reads the same clips
as an uninterrupted one, and the synthetic dataset is the same for the same seed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ClipError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipError",
    "MovingShapesDataset",
    "VideoCaptionDataset",
    "folder_dataset",
    "load_dataset",
    "msrvtt_dataset",
    "probe_frames",
    "read_frames",
    "to_pixel_values",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif")
CAPTIONS_CSV = "captions.csv"
_FILE_COLUMNS = ("file", "video", "path", "filename", "file_name", "video_path", "video_id")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "title")


# ---------------------------------------------------------------------------------------------- decoding
def _av() -> Any:
    try:
        import av
    except ImportError as e:  # pragma: no cover - the video extra installs it
        raise InputError("reading videos needs PyAV: pip install av (or pip install 'tucker-lora[video]')") from e
    return av


def clip_span(num_frames: int, stride: int) -> int:
    """Frames a clip of ``num_frames`` frames taken every ``stride`` frames spans."""
    return (num_frames - 1) * stride + 1


def probe_frames(path: str | os.PathLike) -> Optional[int]:
    """The number of frames of a video from its container's metadata (None if it does not say).

    Raises ``ClipError`` when the file cannot be opened or has no video stream.
    """
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(f"'{path}' has no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            if stream.duration and stream.time_base and stream.average_rate:
                return int(round(float(stream.duration * stream.time_base * stream.average_rate))) or None
            if container.duration and stream.average_rate:
                return int(round(container.duration / av.time_base * float(stream.average_rate))) or None
            return None
    except ClipError:
        raise
    except Exception as e:  # PyAV raises FFmpegError subclasses, OSError, ValueError, ...
        raise ClipError(f"'{path}' cannot be read as a video ({type(e).__name__}: {e})") from e


def read_frames(path: str | os.PathLike, num_frames: int, stride: int = 1, start: int = 0) -> np.ndarray:
    """Decode frames ``start, start + stride, ...`` (``num_frames`` of them) as a (T, H, W, 3) uint8 array.

    Raises ``ClipError`` when the file cannot be decoded or ends before the last frame.
    """
    av = _av()
    wanted = start + clip_span(num_frames, stride)
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(f"'{path}' has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index >= wanted:
                    break
                if index >= start and (index - start) % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except ClipError:
        raise
    except Exception as e:
        raise ClipError(f"'{path}' cannot be decoded ({type(e).__name__}: {e})") from e
    if len(frames) < num_frames:
        raise ClipError(
            f"'{path}' is too short: {num_frames} frames at stride {stride} from frame {start} need "
            f"{wanted} frames, it has {start + (len(frames) - 1) * stride + 1 if frames else 'none'}"
        )
    return np.stack(frames)


def to_pixel_values(frames: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (3, T, R, R) float in [-1, 1]: shorter side resized to R, centre crop."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()  # T, 3, H, W
    h, w = x.shape[-2:]
    if min(h, w) != resolution:
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    x = x[:, :, top : top + resolution, left : left + resolution]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------- datasets
def _rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{index}")


class VideoCaptionDataset(Dataset):
    """Videos with one or more captions each; a clip of ``num_frames`` frames at ``frame_stride`` per item.

    ``items``: ``(video path, [captions])``. Files that cannot be opened, or whose metadata says they are
    shorter than a clip, are skipped here with a warning naming them; an empty result is an
    ``InputError`` naming ``source``. Each epoch an item gets a start frame and one of its captions
    drawn from ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, Sequence[str]]],
        num_frames: int = 8,
        frame_stride: int = 1,
        resolution: int = 64,
        seed: int = 0,
        source: str = "",
    ) -> None:
        if num_frames < 1 or frame_stride < 1 or resolution < 1:
            raise InputError(
                f"num_frames, frame_stride and resolution must be >= 1, got {num_frames}, {frame_stride}, {resolution}"
            )
        self.num_frames, self.frame_stride, self.resolution = num_frames, frame_stride, resolution
        self.seed, self.epoch, self.source = seed, 0, source
        span = clip_span(num_frames, frame_stride)
        self.items: list[tuple[Path, list[str]]] = []
        self.frame_counts: list[Optional[int]] = []
        skipped = []
        for path, captions in items:
            try:
                count = probe_frames(path)
                if count is not None and count < span:
                    raise ClipError(
                        f"'{path}' is too short: {count} frames, a clip of {num_frames} frames at stride "
                        f"{frame_stride} needs {span}"
                    )
            except ClipError as e:
                logger.warning("skipping %s", e)
                skipped.append(str(path))
                continue
            self.items.append((Path(path), list(captions)))
            self.frame_counts.append(count)
        if not self.items:
            detail = f"; skipped {len(skipped)}: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
            raise InputError(f"no usable videos in {source or 'the dataset'}{detail if skipped else ''}")
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def clip(self, index: int) -> tuple[np.ndarray, str]:
        """The raw (T, H, W, 3) uint8 frames and caption of item ``index`` this epoch (raises ``ClipError``)."""
        path, captions = self.items[index]
        rng = _rng(self.seed, self.epoch, index)
        count = self.frame_counts[index]
        span = clip_span(self.num_frames, self.frame_stride)
        start = rng.randint(0, count - span) if count is not None else 0
        caption = rng.choice(captions)
        return read_frames(path, self.num_frames, self.frame_stride, start), caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.items)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                frames, caption = self.clip(j)
            except ClipError as e:
                logger.warning("skipping %s; serving the next readable clip instead", e)
                self._bad.add(j)
                continue
            return {"pixel_values": to_pixel_values(frames, self.resolution), "caption": caption}
        raise RuntimeError(f"no readable video left in {self.source or 'the dataset'}")


def _find_videos(root: Path) -> dict[str, Path]:
    """Video files under ``root`` by relative path and by stem."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            out.setdefault(path.relative_to(root).as_posix(), path)
            out.setdefault(path.stem, path)
    return out


def _pick_column(header: Sequence[str], choices: Sequence[str], what: str, csv_path: Path) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for c in choices:
        if c in lowered:
            return lowered[c]
    raise InputError(f"'{csv_path}' has no {what} column: expected one of {', '.join(choices)}, found {list(header)}")


def _warn_missing(missing: list[str], where: str) -> None:
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        logger.warning("skipping %d captioned videos not found in %s: %s", len(missing), where, shown)


def read_caption_rows(csv_path: Path, what: str, why: str) -> list[tuple[str, str]]:
    """The ``(file, caption)`` rows (stripped; rows without a file skipped) of a CSV with a header naming a file
    column (``file``, ``video``, ``path``, ...) and a caption column (``caption``, ``text`` or ``prompt``).
    A missing file is an error saying ``what`` it is and ``why`` it is needed."""
    if not csv_path.is_file():
        raise InputError(f"{what} '{csv_path}' does not exist ({why})")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise InputError(f"'{csv_path}' is empty: expected a header with a file and a caption column")
        file_col = _pick_column(reader.fieldnames, _FILE_COLUMNS, "file", csv_path)
        caption_col = _pick_column(reader.fieldnames, _CAPTION_COLUMNS, "caption", csv_path)
        return [(r[file_col].strip(), (r[caption_col] or "").strip()) for r in reader if r.get(file_col)]


def folder_dataset(
    root: str | os.PathLike, captions_csv: Optional[str | os.PathLike] = None, **kwargs: Any
) -> VideoCaptionDataset:
    """A folder of videos and a CSV of captions (default ``root/captions.csv``).

    The CSV has a header with a file column (``file``, ``video``, ``path``, ...; relative to ``root``,
    with or without the extension) and a caption column (``caption``, ``text`` or ``prompt``); a video
    may have several rows (several captions).
    """
    root = Path(root)
    csv_path = Path(captions_csv) if captions_csv else root / CAPTIONS_CSV
    rows = read_caption_rows(csv_path, "captions file", f"a video folder needs a {CAPTIONS_CSV}")
    videos = _find_videos(root)
    captions: dict[Path, list[str]] = {}
    missing = []
    for name, caption in rows:
        path = videos.get(Path(name).as_posix()) or videos.get(Path(name).stem)
        if path is None:
            missing.append(name)
            continue
        captions.setdefault(path, []).append(caption)
    _warn_missing(missing, str(root))
    return VideoCaptionDataset(list(captions.items()), source=f"'{root}' ({csv_path.name})", **kwargs)


def _msrvtt_captions(data: Any, split: Optional[str]) -> dict[str, list[str]]:
    """Captions by video id from the MSR-VTT annotation formats in use.

    - ``train_val_videodatainfo.json`` / ``MSRVTT_data.json``: ``{"videos": [{"video_id", "split"}],
      "sentences": [{"video_id", "caption"}]}``;
    - ``MSR_VTT.json`` (COCO style): ``{"annotations": [{"image_id", "caption"}]}``;
    - a list of ``{"video_id" | "video", "caption": str | [str]}``.
    """
    out: dict[str, list[str]] = {}
    if isinstance(data, dict) and "sentences" in data:
        keep = None
        if split is not None and "videos" in data:
            keep = {v["video_id"] for v in data["videos"] if v.get("split") == split}
        for s in data["sentences"]:
            if keep is None or s["video_id"] in keep:
                out.setdefault(str(s["video_id"]), []).append(str(s["caption"]))
    elif isinstance(data, dict) and "annotations" in data:
        for a in data["annotations"]:
            out.setdefault(str(a["image_id"]), []).append(str(a["caption"]))
    elif isinstance(data, list):
        for entry in data:
            vid = entry.get("video_id", entry.get("video"))
            caps = entry.get("caption", entry.get("captions", []))
            out.setdefault(str(vid), []).extend([caps] if isinstance(caps, str) else [str(c) for c in caps])
    else:
        raise ValueError("unknown layout: expected 'sentences', 'annotations' or a list of {video_id, caption}")
    return out


def _find_annotations(root: Path) -> Path:
    known = ("train_val_videodatainfo.json", "MSRVTT_data.json", "MSR_VTT.json", "test_videodatainfo.json")
    for folder in (root, root / "annotation", root / "annotations"):
        for name in known:
            if (folder / name).is_file():
                return folder / name
    found = [p for folder in (root, root / "annotation", root / "annotations") for p in sorted(folder.glob("*.json"))]
    if len(found) == 1:
        return found[0]
    raise InputError(
        f"no MSR-VTT annotation file in '{root}': expected one of {', '.join(known)} (or pass the annotations path)"
        + (f"; found several JSON files: {', '.join(map(str, found))}" if found else "")
    )


def msrvtt_dataset(
    root: str | os.PathLike, annotations: Optional[str | os.PathLike] = None, split: Optional[str] = None, **kwargs: Any
) -> VideoCaptionDataset:
    """MSR-VTT: ``videoNNNN.mp4`` files anywhere under ``root`` and the JSON annotations with captions.

    ``annotations`` defaults to the known file names under ``root`` (or ``root/annotation``);
    ``split`` (``train``, ``validate``, ``test``) filters by the annotations' split where they have one.
    """
    root = Path(root)
    ann = Path(annotations) if annotations else _find_annotations(root)
    if not ann.is_file():
        raise InputError(f"MSR-VTT annotation file '{ann}' does not exist")
    try:
        captions = _msrvtt_captions(json.loads(ann.read_text(encoding="utf-8")), split)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"'{ann}' is not an MSR-VTT annotation file: {e}") from e
    videos = _find_videos(root)
    items, missing = [], []
    for vid, caps in captions.items():
        path = videos.get(vid) or videos.get(Path(vid).stem)
        if path is None:
            missing.append(vid)
        else:
            items.append((path, caps))
    _warn_missing(missing, str(root))
    return VideoCaptionDataset(items, source=f"'{root}' ({ann.name})", **kwargs)


# ---------------------------------------------------------------------------------------------- synthetic
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


class MovingShapesDataset(Dataset):
    """Synthetic clips of one coloured shape crossing a grey frame, captioned with its motion.

    Item ``i`` is a function of ``(seed, i)`` only: colour, shape, direction (caption
    ``"a red circle moving left"``), size and the position across the motion. The shape moves at a
    constant speed from one side towards the other over the clip.
    """

    def __init__(self, num_videos: int = 64, num_frames: int = 8, resolution: int = 64, seed: int = 0) -> None:
        if num_videos < 1:
            raise InputError(f"the synthetic dataset needs at least one video, got num_videos={num_videos}")
        self.num_videos, self.num_frames, self.resolution, self.seed = num_videos, num_frames, resolution, seed

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs (kept for the same interface as the readers)."""

    def __len__(self) -> int:
        return self.num_videos

    def describe(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"shapes:{self.seed}:{index}")
        return {
            "colour": rng.choice(sorted(COLOURS)),
            "shape": rng.choice(SHAPES),
            "direction": rng.choice(sorted(DIRECTIONS)),
            "radius": rng.uniform(0.12, 0.2) * self.resolution,
            "offset": rng.uniform(0.3, 0.7),
        }

    def caption(self, index: int) -> str:
        d = self.describe(index)
        return f"a {d['colour']} {d['shape']} moving {d['direction']}"

    def clip(self, index: int) -> tuple[np.ndarray, str]:
        """(T, R, R, 3) uint8 frames and the caption of item ``index``."""
        d = self.describe(index)
        res, r = self.resolution, d["radius"]
        dx, dy = DIRECTIONS[d["direction"]]
        lo, hi = r + 1, res - r - 1
        yy, xx = torch.meshgrid(torch.arange(res) + 0.5, torch.arange(res) + 0.5, indexing="ij")
        colour = torch.tensor(COLOURS[d["colour"]], dtype=torch.uint8)
        frames = torch.full((self.num_frames, res, res, 3), 60, dtype=torch.uint8)
        for t in range(self.num_frames):
            frac = t / max(1, self.num_frames - 1)
            along = lo + (hi - lo) * (frac if dx + dy > 0 else 1 - frac)
            across = lo + (hi - lo) * d["offset"]
            cx, cy = (along, across) if dx else (across, along)
            frames[t][_shape_mask(d["shape"], xx - cx, yy - cy, r)] = colour
        return frames.numpy(), self.caption(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frames, caption = self.clip(index)
        return {"pixel_values": to_pixel_values(frames, self.resolution), "caption": caption}


def _shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return (x.abs() <= r * 0.85) & (y.abs() <= r * 0.85)
    return (y <= r) & (y >= -r) & (x.abs() <= (y + r) / 2)  # triangle, apex up


# ---------------------------------------------------------------------------------------------- entry point
def load_dataset(
    data_dir: Optional[str | os.PathLike] = None,
    layout: str = "auto",
    annotations: Optional[str | os.PathLike] = None,
    captions_csv: Optional[str | os.PathLike] = None,
    split: Optional[str] = None,
    num_frames: int = 8,
    frame_stride: int = 1,
    resolution: int = 64,
    seed: int = 0,
    num_synthetic_videos: int = 64,
) -> Dataset:
    """The training dataset: synthetic moving shapes without ``data_dir``, else the reader for its layout.

    ``layout``: ``"auto"`` (a ``captions.csv`` means a folder, JSON annotations mean MSR-VTT), ``"folder"``,
    ``"msrvtt"`` or ``"synthetic"``.
    """
    if layout == "synthetic" or (data_dir is None and layout == "auto"):
        return MovingShapesDataset(num_synthetic_videos, num_frames, resolution, seed)
    if data_dir is None:
        raise InputError(f"--data_layout {layout} needs --data_dir")
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(
            f"data directory '{root}' does not exist" if not root.exists() else f"'{root}' is not a directory"
        )
    spec = dict(num_frames=num_frames, frame_stride=frame_stride, resolution=resolution, seed=seed)
    if layout == "auto":
        if captions_csv or (root / CAPTIONS_CSV).is_file():
            layout = "folder"
        elif annotations or any(root.glob("*.json")) or any(root.glob("annotation*/*.json")):
            layout = "msrvtt"
        else:
            raise InputError(
                f"cannot tell the layout of '{root}': expected a {CAPTIONS_CSV} (a folder of videos) or MSR-VTT JSON "
                "annotations"
            )
    if layout == "folder":
        return folder_dataset(root, captions_csv, **spec)
    if layout == "msrvtt":
        return msrvtt_dataset(root, annotations, split, **spec)
    raise InputError(f"unknown data layout {layout!r}: expected auto, folder, msrvtt or synthetic")


def example_captions(dataset: Dataset, count: int) -> list[str]:
    """``count`` distinct captions of the dataset's first items (default validation prompts)."""
    out: list[str] = []
    for i in range(len(dataset)):
        caption = dataset.caption(i) if hasattr(dataset, "caption") else dataset.items[i][1][0]
        if caption not in out:
            out.append(caption)
        if len(out) == count:
            break
    return out
