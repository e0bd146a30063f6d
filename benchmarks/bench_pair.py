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
    python benchmarks/bench_pair.py --shape 2 --spatial 8 8 8 --columns "tucker auto" LyCORIS --rounds 300 --split

``--split`` also times, inside every call, the base layer's own two convolutions (its forward and its input
gradient: the same kernels on the same weight and input in every column) and pairs the rest of the step, what the
method itself adds, on its own: the base's time moves with where its buffers land (see ``PAD_MAX``) by as much as
the methods differ on the 1280-channel layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections.abc import Callable

import bench_layers
import bench_skinny
import torch
from torch import nn

from tucker_lora import functional
from tucker_lora.layer import TuckerLoraLayer

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


class BaseOps:
    """``--split``: the seconds the base layer's forward convolution and its input gradient take inside a call.

    Tucker columns run them through ``functional.ConvGeometry`` (``conv`` and ``input_grad`` with a weight of the
    base's shape: the base weight, or the merged one), timed there while the object is entered; any other column
    is timed by ``attach``: around its base convolution's forward and around that output's autograd node.
    """

    def __init__(self, weight_shape: torch.Size) -> None:
        self.weight_shape = weight_shape
        self.seconds = 0.0
        self._saved: dict[str, Callable] = {}

    def __enter__(self) -> BaseOps:
        for name in ("conv", "input_grad"):
            self._saved[name] = op = getattr(functional.ConvGeometry, name)
            setattr(functional.ConvGeometry, name, self._timed_op(op))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, op in self._saved.items():
            setattr(functional.ConvGeometry, name, op)

    def _timed_op(self, op: Callable) -> Callable:
        def timed(geometry, x, w, *rest):
            if w.shape != self.weight_shape:  # the adapter's small convolution
                return op(geometry, x, w, *rest)
            t0 = time.perf_counter()
            out = op(geometry, x, w, *rest)
            self._add_since(t0)
            return out

        return timed

    def _timed_forward(self, forward: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            y = forward(*args, **kwargs)
            self._add_since(t0)
            if y.grad_fn is not None:  # the convolution's own backward node
                start: list[float] = []
                y.grad_fn.register_prehook(lambda grads: start.append(time.perf_counter()))
                y.grad_fn.register_hook(lambda inputs, outputs: self._add_since(start[-1]))
            return y

        return timed

    def _add_since(self, t0: float) -> None:
        self.seconds += time.perf_counter() - t0

    def attach(self, name: str, column: nn.Module) -> None:
        """Time the base convolution of a column that does not run it through ``ConvGeometry``."""
        if isinstance(column, FreshWeight) or any(isinstance(m, TuckerLoraLayer) for m in column.modules()):
            return
        if isinstance(column, nn.ModuleDict):  # LyCORIS: its forward calls the conv's original forward
            column["adapter"].org_forward = self._timed_forward(column["adapter"].org_forward)
            return
        conv = getattr(column, "base_layer", column)  # peft LoRA wraps it; the frozen column is the conv itself
        if conv.weight.requires_grad:
            raise SystemExit(f"--split: column {name!r} trains the base weight, whose gradient is its whole cost")
        conv.forward = self._timed_forward(conv.forward)


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
    parser.add_argument(
        "--split",
        action="store_true",
        help="also pair the step without the base layer's own two convolutions (see BaseOps)",
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

    base_ops = BaseOps(columns["frozen base"].weight.shape)
    base_seconds: dict[str, list[float]] = {name: [] for name in modules}

    def split_step(name, module):
        base_ops.seconds = 0.0
        step(module)
        if base_ops.seconds == 0:
            raise SystemExit(f"--split: column {name!r} ran no base convolution where BaseOps times it")
        base_seconds[name].append(base_ops.seconds)

    if args.split:
        for name, module in modules.items():
            base_ops.attach(name, module)
        calls = {name: (lambda n=name, m=module: split_step(n, m)) for name, module in modules.items()}
    else:
        calls = {name: (lambda m=module: step(m)) for name, module in modules.items()}
    with base_ops if args.split else contextlib.nullcontext():
        timed = bench_skinny.interleaved(calls, args.warmup + args.rounds, cleanup)

    def last_rounds(t: list[float]) -> list[float]:  # the warm-up rounds (and split_step's untimed first calls) dropped
        return t[len(t) - args.rounds :]

    times = {name: last_rounds(t) for name, t in timed.items()}
    kind = "inference" if args.inference else "training step"
    result = {"shape": shape.name, "kind": kind, "jitter": args.jitter, "split": args.split, "times": times}
    lines = [f"**{shape.name}**, {result['kind']}, {args.rounds} rounds{', allocation jitter' * args.jitter}", ""]
    parts = {"": times}
    if args.split:
        base = result["base ops"] = parts[", base ops"] = {name: last_rounds(t) for name, t in base_seconds.items()}
        parts[", rest"] = {name: [t - b for t, b in zip(times[name], base[name], strict=True)] for name in times}
    for part, values in parts.items():
        medians = {name: 1e3 * statistics.median(t) for name, t in values.items()}
        lines.append(f"- median ms{part}: " + ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items()))
    for part, values in parts.items():
        for a, b in ((first, "frozen base"), (second, "frozen base"), (first, second)):
            ratios = [p / q for p, q in zip(values[a], values[b], strict=True)]
            med, low, high = median_interval(ratios)
            faster = sum(r < 1 for r in ratios)
            result[f"{a} / {b}{part}"] = {"median": med, "low": low, "high": high, "first_faster": faster}
            lines.append(
                f"- {a} / {b}{part}: {med:.4f} (95% interval {low:.4f}-{high:.4f}), faster in {faster} of {len(ratios)}"
            )
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in result.items() if k not in ("times", "base ops")}))
    return result


if __name__ == "__main__":
    main()
