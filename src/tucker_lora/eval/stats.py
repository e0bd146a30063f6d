"""Reference statistics of the FVD: the Gaussian fit ``(mu, sigma)`` of the reference videos' I3D features.

Saved as ``.npz`` with ``mu`` (D,), ``sigma`` (D, D), ``count`` (the number of videos), ``settings`` (the
protocol, as JSON: detector hash, frames, resolution, frame sampling, value range, feature size) and
``source`` (a digest of the reference folder, to notice when it changed). Statistics are only ever
compared under the settings they were computed with: any difference is an error naming the setting and
the file. Files are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import InputError
from .frechet import gaussian_fit

__all__ = ["FeatureStats", "SettingsMismatchError", "check_settings", "load_stats", "settings_key", "write_atomic"]


class SettingsMismatchError(InputError):
    """Reference statistics computed under other protocol settings than this run's."""


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as they read back from JSON (tuples become lists), so saved and fresh ones compare equal."""
    return json.loads(json.dumps(dict(settings), sort_keys=True))


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short hash of the settings (names a cache file per protocol)."""
    return hashlib.sha256(json.dumps(_canonical(settings), sort_keys=True).encode()).hexdigest()[:12]


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, sync it, then rename it to ``path`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_settings(found: Mapping[str, Any], expected: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise ``SettingsMismatchError`` naming the first setting in which ``found`` (from ``path``) differs."""
    found, expected = _canonical(found), _canonical(expected)
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            raise SettingsMismatchError(
                f"reference statistics '{path}' were computed with {key}={found.get(key)!r}, this run uses "
                f"{key}={expected.get(key)!r}: recompute them with --reference-videos (and another "
                "--reference-stats file) or run with the settings they were made with"
            )


@dataclass
class FeatureStats:
    """``mu`` and ``sigma`` of ``count`` feature vectors, under ``settings``; ``source`` identifies the videos."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_features(cls, features: np.ndarray, settings: Mapping[str, Any], source: str = "") -> FeatureStats:
        mu, sigma = gaussian_fit(features)
        return cls(mu, sigma, int(len(features)), _canonical(settings), source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.npz`` atomically (temporary file + rename)."""
        arrays = {
            "mu": self.mu,
            "sigma": self.sigma,
            "count": np.int64(self.count),
            "settings": np.array(json.dumps(_canonical(self.settings), sort_keys=True)),
            "source": np.array(self.source),
        }
        return write_atomic(path, lambda f: np.savez(f, **arrays))


def load_stats(path: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> FeatureStats:
    """Read statistics saved by ``FeatureStats.save``; with ``settings``, check they were made under them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference statistics file '{path}' does not exist (compute it with --reference-videos)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma", "count", "settings") if k not in data.files]
            if missing:
                raise InputError(f"'{path}' is not a reference statistics file: it has no {', '.join(missing)}")
            stats = FeatureStats(
                mu=np.asarray(data["mu"], dtype=np.float64),
                sigma=np.asarray(data["sigma"], dtype=np.float64),
                count=int(data["count"]),
                settings=json.loads(str(data["settings"])),
                source=str(data["source"]) if "source" in data.files else "",
            )
    except InputError:
        raise
    except Exception as e:  # not a zip / npz, truncated, bad JSON
        raise InputError(f"reference statistics file '{path}' cannot be read ({type(e).__name__}: {e})") from e
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else 0
    if d == 0 or stats.sigma.shape != (d, d):
        raise InputError(f"'{path}' is corrupted: mu has shape {stats.mu.shape}, sigma {stats.sigma.shape}")
    if settings is not None:
        check_settings(stats.settings, settings, path)
    return stats
