"""Motion of synthetic clips for the temporal-rank experiment and ``make demo``: temporal laws over the same
appearances, and an estimator of a clip's dominant motion.

Domains (``MotionDomainDataset``). Item ``i`` has the same colour, shape, radius and cross-axis offset under
every law; only the motion differs: ``"horizontal"`` (left / right as captioned, domain A), ``"reversed"``
(the same clips played backwards: "moving left" moves right; domain B of the experiment) or ``"vertical"``
(up / down). The shape crosses the frame at a constant speed ``v = (hi - lo) / (T - 1)`` pixels per frame,
``lo = r + 1``, ``hi = R - r - 1``, and its cross-axis position is uniform over ``[lo, hi]``. A reversed clip
holds exactly the frames of its horizontal twin, and a vertical one their transposes: only the order of the
frames tells the laws apart.

Estimator (``estimate_motion``). With ``b`` the clip's median colour (the background covers most pixels) and
``w_t(p) = max(0, ||I_t(p) - b|| - tau)`` the foreground weight of pixel ``p`` in frame ``t``:

- ``"centroid"``: ``c_t = sum_p w_t(p) p / sum_p w_t(p)``; the velocity is the least-squares slope of ``c_t``
  against ``t`` (frames with no foreground are left out);
- ``"phase"``: phase correlation of the foreground images of consecutive frames,
  ``R = F_{t+1} conj(F_t) / |F_{t+1} conj(F_t)|``, whose inverse FFT peaks at the shift from frame ``t`` to
  ``t + 1``; the peak is refined by a parabola through its neighbours and the shifts averaged.

Velocities are ``(v_x, v_y)`` in pixels per frame, ``y`` pointing down (image rows); the direction is the sign
of the larger component, or ``"none"`` below ``MIN_SPEED`` (a shape that stays put moves nowhere).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from tucker_lora.video.data import DIRECTIONS, MovingShapesDataset

__all__ = [
    "LAWS",
    "MotionDomainDataset",
    "MotionEstimate",
    "centroid_track",
    "direction_of",
    "estimate_motion",
    "law_velocity",
    "foreground_weights",
    "motion_score",
    "phase_correlation_shift",
]

#: The captioned directions of each temporal law.
LAWS: dict[str, tuple[str, ...]] = {
    "horizontal": ("left", "right"),
    "reversed": ("left", "right"),
    "vertical": ("up", "down"),
}
#: Laws whose clips move against their caption (played backwards).
BACKWARDS = frozenset({"reversed"})
#: Appearances of the motion domains: fewer than ``MovingShapesDataset``'s so a small model learns them fast.
DOMAIN_COLOURS = ("blue", "green", "red", "yellow")
DOMAIN_SHAPES = ("circle", "square")
#: Below this speed (pixels per frame) a clip has no direction; the domains move at about 1.2.
MIN_SPEED = 0.3


class MotionDomainDataset(MovingShapesDataset):
    """Moving shapes under one temporal law of ``LAWS``; item ``i`` looks the same under every law.

    Colour, shape, radius (0.15-0.2 of the frame) and cross-axis offset (uniform over the free range) are
    drawn from ``(seed, i)`` alone, the direction from the law's two with a separate draw, so domain A's and
    domain B's item ``i`` differ only in the axis of travel. ``first_index`` shifts the indices (disjoint
    training and held-out sets from one seed).
    """

    def __init__(
        self,
        law: str = "horizontal",
        num_videos: int = 64,
        num_frames: int = 8,
        resolution: int = 16,
        seed: int = 0,
        first_index: int = 0,
    ) -> None:
        if law not in LAWS:
            raise ValueError(f"unknown motion law {law!r}: expected one of {', '.join(LAWS)}")
        super().__init__(num_videos, num_frames, resolution, seed)
        self.law, self.first_index = law, first_index

    def describe(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"motion-domain:{self.seed}:{self.first_index + index}")
        return {
            "colour": rng.choice(DOMAIN_COLOURS),
            "shape": rng.choice(DOMAIN_SHAPES),
            "direction": LAWS[self.law][rng.randrange(2)],
            "radius": rng.uniform(0.15, 0.2) * self.resolution,
            "offset": rng.uniform(0.0, 1.0),
        }

    def clip(self, index: int) -> tuple[np.ndarray, str]:
        """(T, R, R, 3) uint8 frames and the caption of item ``index`` (frames reversed for a backwards law)."""
        frames, caption = super().clip(index)
        return (np.ascontiguousarray(frames[::-1]) if self.law in BACKWARDS else frames), caption

    def velocity(self, index: int) -> tuple[float, float]:
        """The ground-truth velocity ``(v_x, v_y)`` of item ``index``, pixels per frame (``y`` down)."""
        d = self.describe(index)
        return law_velocity(self.law, d["direction"], self.speed(d["radius"]))

    def speed(self, radius: float) -> float:
        """``(hi - lo) / (T - 1)``: the shape crosses from ``lo = r + 1`` to ``hi = R - r - 1`` over the clip."""
        return (self.resolution - 2 * radius - 2) / max(1, self.num_frames - 1)

    def mean_speed(self) -> float:
        """The speed at the mean radius (0.175 of the frame): the expected speed of a generated clip."""
        return self.speed(0.175 * self.resolution)


def direction_velocity(direction: str, speed: float) -> tuple[float, float]:
    """The velocity of ``speed`` pixels per frame in ``direction`` (a key of ``DIRECTIONS``)."""
    dx, dy = DIRECTIONS[direction]
    return dx * speed, dy * speed


def law_velocity(law: str, direction: str, speed: float) -> tuple[float, float]:
    """The velocity a clip of ``law`` captioned ``direction`` has: the caption's, or its opposite if backwards."""
    vx, vy = direction_velocity(direction, speed)
    return (-vx, -vy) if law in BACKWARDS else (vx, vy)


def direction_of(velocity: Sequence[float]) -> str:
    """``left`` / ``right`` / ``up`` / ``down``: the sign of the larger component of ``(v_x, v_y)``."""
    vx, vy = float(velocity[0]), float(velocity[1])
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


@dataclass
class MotionEstimate:
    """The dominant motion of a clip: velocity ``(v_x, v_y)`` in pixels per frame, ``None`` if no foreground."""

    velocity: Optional[tuple[float, float]]

    @property
    def direction(self) -> str:
        """``direction_of(velocity)``, or ``"none"`` without foreground or below ``MIN_SPEED``."""
        return "none" if self.velocity is None or self.speed < MIN_SPEED else direction_of(self.velocity)

    @property
    def speed(self) -> float:
        return 0.0 if self.velocity is None else float(np.hypot(*self.velocity))


def _as_float_video(video: Any) -> torch.Tensor:
    """(T, H, W, 3) uint8 / float in [0, 1] -> float64 tensor in [0, 1]."""
    v = torch.as_tensor(np.ascontiguousarray(video))
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video of shape (T, H, W, 3), got {tuple(v.shape)}")
    return v.double() / 255.0 if v.dtype == torch.uint8 else v.double()


def foreground_weights(video: Any, tau: float = 0.15) -> torch.Tensor:
    """``w_t(p) = max(0, ||I_t(p) - b|| - tau)``, ``b`` the median colour of the clip: (T, H, W), colours in [0, 1]."""
    v = _as_float_video(video)
    background = v.reshape(-1, 3).median(dim=0).values
    return ((v - background).norm(dim=-1) - tau).clamp_min(0.0)


def _centroids(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which frames have foreground (bool over ``t``), and their centroids ``c_t``: x and y, one per kept frame."""
    h, wd = w.shape[1:]
    mass = w.sum(dim=(1, 2))
    keep = mass > 1e-6
    ys, xs = torch.meshgrid(torch.arange(h, dtype=w.dtype), torch.arange(wd, dtype=w.dtype), indexing="ij")
    cx = (w * xs).sum(dim=(1, 2))[keep] / mass[keep]
    cy = (w * ys).sum(dim=(1, 2))[keep] / mass[keep]
    return keep, cx, cy


def _centroid_velocity(w: torch.Tensor) -> Optional[tuple[float, float]]:
    keep, cx, cy = _centroids(w)
    if int(keep.sum()) < 2:
        return None
    times = torch.arange(w.shape[0], dtype=w.dtype)[keep]
    tc = times - times.mean()
    denom = (tc**2).sum()
    return float((tc * (cx - cx.mean())).sum() / denom), float((tc * (cy - cy.mean())).sum() / denom)


def centroid_track(video: Any, tau: float = 0.15) -> list[Optional[tuple[float, float]]]:
    """The foreground centroid ``c_t = (x, y)`` of every frame in pixels, ``None`` for a frame with no foreground."""
    keep, cx, cy = _centroids(foreground_weights(video, tau))
    kept = iter(zip(cx.tolist(), cy.tolist(), strict=True))
    return [next(kept) if k else None for k in keep.tolist()]


def _parabolic_peak(values: torch.Tensor, index: int) -> float:
    """Sub-sample offset of a peak from the parabola through ``values[index - 1 : index + 2]`` (circular)."""
    n = values.shape[0]
    left, centre, right = values[(index - 1) % n], values[index], values[(index + 1) % n]
    denom = left - 2 * centre + right
    return 0.0 if abs(float(denom)) < 1e-12 else float(0.5 * (left - right) / denom)


def phase_correlation_shift(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The shift ``(s_x, s_y)`` with ``b(p) ~ a(p - s)``: the peak of ``ifft(F_b conj(F_a) / |F_b conj(F_a)|)``.

    Integer peak refined per axis by a parabola through its neighbours; shifts wrap to ``[-N/2, N/2)``.
    """
    cross = torch.fft.fft2(b) * torch.fft.fft2(a).conj()
    r = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-12)).real
    h, w = r.shape
    iy, ix = divmod(int(torch.argmax(r)), w)
    sy = iy + _parabolic_peak(r[:, ix], iy)
    sx = ix + _parabolic_peak(r[iy, :], ix)
    wrap = lambda s, n: (s + n / 2) % n - n / 2  # noqa: E731
    return wrap(sx, w), wrap(sy, h)


def _phase_velocity(w: torch.Tensor) -> Optional[tuple[float, float]]:
    mass = w.sum(dim=(1, 2))
    pairs = [(t, t + 1) for t in range(w.shape[0] - 1) if mass[t] > 1e-6 and mass[t + 1] > 1e-6]
    if not pairs:
        return None
    shifts = np.array([phase_correlation_shift(w[s], w[e]) for s, e in pairs])
    return float(shifts[:, 0].mean()), float(shifts[:, 1].mean())


def estimate_motion(video: Any, method: str = "centroid", tau: float = 0.15) -> MotionEstimate:
    """The dominant motion of a (T, H, W, 3) clip (uint8, or float in [0, 1]); see the module docstring."""
    w = foreground_weights(video, tau)
    if method == "centroid":
        return MotionEstimate(_centroid_velocity(w))
    if method == "phase":
        return MotionEstimate(_phase_velocity(w))
    raise ValueError(f"unknown motion estimator {method!r}: expected 'centroid' or 'phase'")


def motion_score(
    videos: Sequence[Any], targets: Sequence[Sequence[float]], method: str = "centroid"
) -> dict[str, float]:
    """How well clips follow their target velocities.

    ``correct``: the fraction whose estimated direction is the target's; ``velocity_error``: the mean of
    ``||v_est - v_target||`` in pixels per frame (a clip with no foreground counts as ``v_est = 0``);
    ``speed``: the mean estimated speed.
    """
    if len(videos) != len(targets) or not videos:
        raise ValueError(f"motion_score needs as many targets as videos (> 0), got {len(videos)} and {len(targets)}")
    estimates = [estimate_motion(v, method) for v in videos]
    correct = [e.direction == direction_of(t) for e, t in zip(estimates, targets, strict=True)]
    errors = [
        float(np.hypot(*(np.asarray(e.velocity or (0.0, 0.0)) - np.asarray(t, dtype=float))))
        for e, t in zip(estimates, targets, strict=True)
    ]
    return {
        "correct": float(np.mean(correct)),
        "velocity_error": float(np.mean(errors)),
        "speed": float(np.mean([e.speed for e in estimates])),
    }
