"""The evaluation protocol: a folder of videos -> I3D features and CLIP-T scores; reference statistics, cached.

The paper evaluates every method with one protocol: 16 frames at 224 x 224 per video (``videos``), FVD as
the Frechet distance (``frechet``) between Gaussian fits of Kinetics-400 I3D features (``i3d``) of the
generated videos and of a shared reference set, whose statistics are computed once and cached (``stats``),
and CLIP-T (``clip_score``). The settings that change the numbers are recorded with the statistics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputError
from .clip_score import ClipScorer
from .frechet import frechet_distance
from .i3d import Detector
from .stats import FeatureStats, load_stats, settings_key
from .videos import folder_digest, iter_video_batches, list_videos, to_detector_input

logger = logging.getLogger(__name__)

__all__ = ["Protocol", "fvd", "reference_stats", "score_videos"]


@dataclass(frozen=True)
class Protocol:
    """Frames per video, resolution, frame sampling; batch size and device (which do not change the numbers)."""

    num_frames: int = 16
    resolution: int = 224
    sampling: str = "centre"
    batch_size: int = 8
    device: torch.device = torch.device("cpu")

    def settings(self, detector: Detector) -> dict[str, Any]:
        """Everything that changes the features: saved with reference statistics and checked when they are read."""
        return {
            **detector.settings(),
            "num_frames": self.num_frames,
            "resolution": self.resolution,
            "frame_sampling": self.sampling,
            "resize": "shorter side, bilinear, centre crop",
            "value_range": [-1, 1],
        }


def score_videos(
    paths: Sequence[Path],
    protocol: Protocol,
    detector: Optional[Detector] = None,
    clip: Optional[ClipScorer] = None,
    prompts: Optional[dict[Path, list[str]]] = None,
    desc: str = "videos",
) -> tuple[Optional[np.ndarray], Optional[list[float]]]:
    """Decode each video once; return its I3D features (N, D) (with a detector) and CLIP-T scores (with CLIP)."""
    features, scores = [], []
    for chunk, frames in iter_video_batches(paths, protocol.num_frames, protocol.sampling, protocol.batch_size, desc):
        if detector is not None:
            clips = [to_detector_input(torch.from_numpy(f).to(protocol.device), protocol.resolution) for f in frames]
            features.append(detector(torch.stack(clips)))
        if clip is not None:
            scores += clip.scores(frames, [prompts[p] for p in chunk])
    return (np.concatenate(features) if detector is not None else None), (scores if clip is not None else None)


def default_cache(videos: Path, settings: dict[str, Any]) -> Path:
    """Where reference statistics of a folder are cached without ``--reference-stats``: one file per protocol."""
    return videos / f"fvd_reference_{settings_key(settings)}.npz"


def reference_stats(
    detector: Detector,
    protocol: Protocol,
    videos: Optional[str | os.PathLike] = None,
    stats_path: Optional[str | os.PathLike] = None,
) -> tuple[FeatureStats, Path, bool]:
    """The reference statistics and their file, and whether they came from the cache.

    With ``videos``: the cache (``stats_path``, or ``default_cache``) if it holds this protocol's statistics of
    the same videos, else computed and written there. Without: read from ``stats_path``. A cache made under
    other settings is an error (``SettingsMismatchError``).
    """
    settings = protocol.settings(detector)
    if videos is None:
        return load_stats(stats_path, settings), Path(stats_path), True
    videos = Path(videos)
    paths = list_videos(videos)
    digest = folder_digest(paths, videos)
    cache = Path(stats_path) if stats_path is not None else default_cache(videos, settings)
    if cache.is_file():
        stats = load_stats(cache, settings)
        if stats.source == digest:
            logger.info("reference statistics of '%s' loaded from the cache '%s'", videos, cache)
            return stats, cache, True
        logger.info("the videos in '%s' changed since '%s' was written: recomputing it", videos, cache)
    if len(paths) < 2:
        raise InputError(f"FVD needs at least 2 reference videos, '{videos}' has {len(paths)}")
    features, _ = score_videos(paths, protocol, detector, desc="reference videos")
    stats = FeatureStats.from_features(features, settings, source=digest)
    stats.save(cache)
    logger.info("reference statistics of %d videos in '%s' cached in '%s'", stats.count, videos, cache)
    return stats, cache, False


def fvd(features: np.ndarray, reference: FeatureStats, reference_path: Path) -> float:
    """FVD: the Frechet distance between the Gaussian fit of ``features`` and the reference statistics."""
    generated = FeatureStats.from_features(features, reference.settings)
    if generated.mu.shape != reference.mu.shape:
        raise InputError(
            f"the detector gives {generated.mu.shape[0]} features, the reference statistics '{reference_path}' have "
            f"{reference.mu.shape[0]}"
        )
    for name, count in (("generated videos", generated.count), (f"reference '{reference_path}'", reference.count)):
        if count < generated.mu.shape[0]:
            logger.warning(
                "%s: %d videos for %d features, so the covariance is singular and FVD is biased upwards; the "
                "literature uses 2048 videos",
                name,
                count,
                generated.mu.shape[0],
            )
    return frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)
