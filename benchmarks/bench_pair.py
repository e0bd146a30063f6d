"""Two columns of ``bench_layers.py`` on one layer shape, paired round by round, with a confidence interval.

Where two methods differ by less than a table's run-to-run spread (Tucker and LyCORIS on the 1280-channel layer,
the merged and factored paths near the cost model's threshold), this says whether the gap is there at all: every
round times the frozen base and the two columns once each, in a new random order, and the result is the median of
the per-round ratios ``first / second`` with a 95% bootstrap interval of that median, and in how many rounds the
first was the faster. Columns are named as in ``bench_layers.py`` (a prefix is enough: ``LyCORIS``, ``peft LoRA``),
plus ``tucker merged, fresh weight``: the merged path with its weight formed in a new tensor on every call instead
of the reused buffer (``functional.scratch_like``), to time what the buffer saves.

    python benchmarks/bench_pair.py --shape 2 --columns "tucker auto" LyCORIS --rounds 1000 --jitter
    python benchmarks/bench_pair.py --shape 1 --columns "tucker merged" "tucker factored" --inference
    python benchmarks/bench_pair.py --shape 1 --columns "tucker merged" "tucker merged, fresh weight" --inference
    python benchmarks/bench_pair.py --shape 1 --spatial 8 8 16 --columns "tucker merged" "tucker factored"
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import bench_layers
import bench_skinny
import torch
from torch import nn

from tucker_lora import functional

FRESH = "tucker merged, fresh weight"

#: ``--jitter``'s largest pad in bytes. On the 1280-channel layer the time of the base convolution's input gradient
#: moved with nothing but where its buffers land: a 330 KB tensor allocated before it and held through it changed
#: Tucker's step by 0.993 (0.989-1.000), about the gap to LyCORIS there, so a comparison from one allocation pattern
#: can be luck. A random pad per call spreads the placements over the rounds.
PAD_MAX = 16 << 20


class Jitter:
    """Called before each timed call: frees the last pad and allocates a new one of a random size below ``PAD_MAX``
    bytes (never written, so it costs no page-ins), which stays alive through the call."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.pad: torch.Tensor | None = None

    def __call__(self) -> None:
        self.pad = None
        self.pad = torch.empty(self.rng.randrange(PAD_MAX // 4))


class FreshWeight(nn.Module):
    """The merged column with ``functional.scratch_like`` off in its forward: a new merged weight every call."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch_like = functional.scratch_like
        functional.scratch_like = lambda t: None
        try:
            return self.layer(x)
        finally:
            functional.scratch_like = scratch_like


def find_column(columns: dict[str, torch.nn.Module], name: str) -> str:
    """The column called ``name``, or the one column whose name starts with it."""
    if name in columns:
        return name
    matches = [c for c in columns if c.startswith(name)]
    if len(matches) != 1:
        raise SystemExit(f"column {name!r} matches {matches or 'none'} of {list(columns)}")
    return matches[0]


def median_interval(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(median, low, high)``: the median and the 2.5% and 97.5% points of the medians of ``draws`` bootstrap
    resamples."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.median(values), medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, default=2, help="index into bench_layers.SHAPES (CPU sizes)")
    parser.add_argument("--columns", nargs=2, default=["tucker auto", "LyCORIS"], metavar=("FIRST", "SECOND"))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs=5, default=(4, 4, 1, 1, 1))
    parser.add_argument("--inference", action="store_true", help="time the no-grad forward, not a training step")
    parser.add_argument("--spatial", type=int, nargs="+", help="the input's spatial size instead of the shape's")
    parser.add_argument(
        "--jitter",
        action="store_true",
        help="hold a pad tensor of random size (0-16 MB, untouched) across every timed call, so the call's own "
        "buffers land somewhere new each time (see PAD_MAX)",
    )
    args = parser.parse_args(argv)
    shape = bench_layers.SHAPES[args.shape]
    if args.spatial:
        size = (*shape.input[:2], *args.spatial)
        shape = bench_layers.Shape(
            f"{shape.name.rsplit(', ', 1)[0]}, {'x'.join(map(str, args.spatial))}", shape.conv, size
        )
    columns = bench_layers.build_columns(shape, tuple(args.ranks), "cpu")
    columns[FRESH] = FreshWeight(columns["tucker merged"])
    first, second = (find_column(columns, c) for c in args.columns)
    modules = {name: columns[name] for name in ("frozen base", first, second)}
    x = torch.randn(shape.input, requires_grad=True)
    with torch.no_grad():
        dy = torch.randn_like(bench_layers.call(columns["frozen base"], x))

    def step(module):
        if args.inference:
            with torch.no_grad():
                bench_layers.call(module, x)
        else:
            bench_layers.train_step(module, x, dy)

    jitter = Jitter() if args.jitter else lambda: None

    def cleanup():  # before every timed call: no gradient left from the last one
        for module in modules.values():
            module.zero_grad(set_to_none=True)
        x.grad = None
        jitter()

    calls = {name: (lambda m=module: step(m)) for name, module in modules.items()}
    timed = bench_skinny.interleaved(calls, args.warmup + args.rounds, cleanup)
    times = {name: t[args.warmup :] for name, t in timed.items()}  # the warm-up rounds dropped
    kind = "inference" if args.inference else "training step"
    result = {"shape": shape.name, "kind": kind, "jitter": args.jitter, "times": times}
    lines = [f"**{shape.name}**, {result['kind']}, {args.rounds} rounds{', allocation jitter' * args.jitter}", ""]
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    lines.append("- median ms: " + ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items()))
    for a, b in ((first, "frozen base"), (second, "frozen base"), (first, second)):
        ratios = [p / q for p, q in zip(times[a], times[b], strict=True)]
        med, low, high = median_interval(ratios)
        faster = sum(r < 1 for r in ratios)
        result[f"{a} / {b}"] = {"median": med, "low": low, "high": high, "first_faster": faster}
        lines.append(f"- {a} / {b}: {med:.4f} (95% interval {low:.4f}-{high:.4f}), faster in {faster} of {len(ratios)}")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in result.items() if k != "times"}))
    return result


if __name__ == "__main__":
    main()
