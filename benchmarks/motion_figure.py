"""The picture of ``make demo`` (``motion_experiment.py compare``): which way each sample should move, which way the
base's and the adapter's samples move, and whether each is right, readable without its labels.

One block per (prompt, seed); in it a row for the base and a row for the adapter, sampled from the same noise:

- left, a black arrow: the target direction (the law of the adapter's domain for that prompt);
- every frame, left to right, enlarged ``scale`` times (nearest neighbour), with a thin line through the frame's
  centre and a dot on the shape's centroid (``motion_laws.centroid_track``), so a drift of one pixel per frame
  shows;
- right, an arrow of the direction the motion estimator reads (a ring: it stays put), and a check (green) where
  it is the target's or a cross (red) where it is not; the frames carry a border of the same colour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from motion_laws import centroid_track, direction_of, estimate_motion

from tucker_lora.video.data import DIRECTIONS
from tucker_lora.video.media import to_uint8

RIGHT, WRONG, TARGET, INK, FAINT = (30, 150, 60), (210, 40, 40), (15, 15, 15), (60, 60, 60), (150, 150, 150)


@dataclass
class Pair:
    """One prompt and seed: the target velocity ``(v_x, v_y)`` and the base's and the adapter's clip (T, H, W, 3)."""

    prompt: str
    seed: int
    target: tuple[float, float]
    base: Any
    adapter: Any


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def arrow(draw: Any, centre: tuple[float, float], direction: tuple[float, float], length: float, colour: Any) -> None:
    """A filled arrow of ``length`` pixels through ``centre``, pointing along ``direction`` (``y`` down)."""
    norm = math.hypot(*direction) or 1.0
    ux, uy = direction[0] / norm, direction[1] / norm
    px, py = -uy, ux  # perpendicular
    cx, cy = centre
    head, half, shaft = 0.42 * length, 0.3 * length, 0.1 * length
    tip = (cx + ux * length / 2, cy + uy * length / 2)
    tail = (cx - ux * length / 2, cy - uy * length / 2)
    neck = (tip[0] - ux * head, tip[1] - uy * head)
    draw.polygon(
        [
            (tail[0] + px * shaft, tail[1] + py * shaft),
            (neck[0] + px * shaft, neck[1] + py * shaft),
            (neck[0] + px * half, neck[1] + py * half),
            tip,
            (neck[0] - px * half, neck[1] - py * half),
            (neck[0] - px * shaft, neck[1] - py * shaft),
            (tail[0] - px * shaft, tail[1] - py * shaft),
        ],
        fill=colour,
    )


def mark(draw: Any, centre: tuple[float, float], size: float, right: bool) -> None:
    """A green check (``right``) or a red cross, ``size`` pixels across, drawn as thick lines."""
    cx, cy = centre
    s, width = size / 2, max(3, round(size / 7))
    if right:
        points = [(cx - s, cy), (cx - s / 3, cy + s * 0.65), (cx + s, cy - s * 0.7)]
        draw.line(points, fill=RIGHT, width=width, joint="curve")
    else:
        draw.line([(cx - s, cy - s), (cx + s, cy + s)], fill=WRONG, width=width)
        draw.line([(cx - s, cy + s), (cx + s, cy - s)], fill=WRONG, width=width)


def motion_figure(pairs: Sequence[Pair], path: Path, note: str = "", scale: int = 8) -> Path:
    """Draw ``pairs`` (see the module docstring) to the PNG ``path``, ``note`` under the header; returns it."""
    from PIL import Image, ImageDraw

    clips = [(to_uint8(p.base), to_uint8(p.adapter)) for p in pairs]
    t, h, w = clips[0][0].shape[:3]
    fw, fh, gap, border = w * scale, h * scale, 6, 4
    big, small = _font(26), _font(20)
    target_w, label_w, measured_w, mark_w, spacing = 200, 130, 140, 120, 30
    strip_w = t * fw + (t - 1) * gap + 2 * border
    row_h, title_h, block_gap, header_h = fh + 2 * border, 34, 26, 90
    block_h = title_h + 2 * row_h + 10
    width = target_w + label_w + strip_w + spacing + measured_w + mark_w + 20
    height = header_h + len(pairs) * (block_h + block_gap) - block_gap + 12
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    x_strip = target_w + label_w
    x_measured = x_strip + strip_w + spacing
    draw.text((target_w / 2, 24), "should move", fill=TARGET, font=big, anchor="mm")
    draw.text((x_strip + border, 24), "frame 1", fill=INK, font=big, anchor="lm")
    draw.text((x_strip + strip_w - border, 24), f"frame {t}", fill=INK, font=big, anchor="rm")
    draw.line([(x_strip + 120, 24), (x_strip + strip_w - 150, 24)], fill=FAINT, width=4)  # time runs this way
    arrow(draw, (x_strip + strip_w - 150, 24), (1, 0), 40, FAINT)
    draw.text((x_measured + measured_w / 2, 24), "moves", fill=INK, font=big, anchor="mm")
    draw.text((x_measured + measured_w + mark_w / 2, 24), "right?", fill=INK, font=big, anchor="mm")
    draw.text((x_strip, 56), note, fill=INK, font=small, anchor="lm")

    y = header_h
    for pair, videos in zip(pairs, clips, strict=True):
        draw.line([(10, y - block_gap / 2), (width - 10, y - block_gap / 2)], fill=(215, 215, 215), width=2)
        draw.text((x_strip, y + 4), f'prompt "{pair.prompt}", seed {pair.seed}', fill=INK, font=small)
        top = y + title_h
        arrow(draw, (target_w / 2, top + row_h + 5), pair.target, 150, TARGET)
        goal = direction_of(pair.target)
        for row, (who, clip) in enumerate(zip(("base", "adapter"), videos, strict=True)):
            ry = top + row * (row_h + 10)
            estimate = estimate_motion(clip)
            right = estimate.direction == goal
            colour = RIGHT if right else WRONG
            draw.text((target_w + label_w - 14, ry + row_h / 2), who, fill=INK, font=big, anchor="rm")
            draw.rectangle([x_strip, ry, x_strip + strip_w - 1, ry + row_h - 1], fill=colour)
            track = centroid_track(clip)
            for k in range(t):
                fx, fy = x_strip + border + k * (fw + gap), ry + border
                image.paste(Image.fromarray(clip[k]).resize((fw, fh), Image.NEAREST), (fx, fy))
                draw.line([(fx + fw / 2, fy), (fx + fw / 2, fy + fh - 1)], fill=(235, 235, 235), width=1)
                if track[k] is not None:
                    cx, cy = fx + (track[k][0] + 0.5) * scale, fy + (track[k][1] + 0.5) * scale
                    draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill="white", outline="black", width=2)
            centre = (x_measured + measured_w / 2, ry + row_h / 2)
            if estimate.direction == "none":  # stays put: a ring
                draw.ellipse([centre[0] - 22, centre[1] - 22, centre[0] + 22, centre[1] + 22], outline=colour, width=8)
            else:
                arrow(draw, centre, DIRECTIONS[estimate.direction], 100, colour)
            mark(draw, (x_measured + measured_w + mark_w / 2, ry + row_h / 2), 70, right)
        y += block_h + block_gap
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path
