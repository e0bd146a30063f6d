"""The skinny matmuls of the adapter on the CPU: one ``mm`` against the same product split into blocks, and the
two orientations of a factor gradient.

An adapter's channel projections are a rank-r projection ``P = M x`` (M: r x C, x: C x S) and a rank-r update
``y += M z`` (M: C x r, z: r x S) of full-size activations. MKL runs these shapes on one thread; split into
blocks (along S for the projection, along the rows of y for the update), torch's batched matmul runs the blocks
on every thread. This script times both ways (``SPLIT_PER_THREAD`` blocks per thread), interleaved in rounds
(medians, and the median of per-round ratios), for activation sizes around the threshold ``SPLIT_MIN_NUMEL`` and for
the layer sizes of ``bench_layers.py``, on the threads torch uses (``--threads``). The adapter splits
only the projection (``functional.split_blocks``), from ``SPLIT_MIN_NUMEL`` elements up and on two threads or
more; the update is not split, as this benchmark finds no gain in splitting it (docs/performance.md).

A factor gradient ``dU = sum_n x_n z_n^T`` (x: N x C x S/N, z: N x r x S/N) is timed as written (``x z^T``) and as
the transpose of ``z x^T``, with the activations split into ``--batch`` samples (the adapter computes it as
written, ``functional.batched_outer``). ``--cold`` evicts the caches (writes a 64 MiB buffer) before every call, as in a
network, where the previous layer's work has displaced the activations.

    python benchmarks/bench_skinny.py
    python benchmarks/bench_skinny.py --threads 1
    python benchmarks/bench_skinny.py --cold --batch 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from tucker_lora import functional

#: (C, S): channels and spatial positions of the activation; 2^16 to 2^21 elements.
SIZES = [(320, 256), (320, 512), (1280, 256), (320, 1024), (640, 1024), (320, 2048), (640, 2048), (320, 8192)]


def cases(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, M_proj: torch.Tensor, M_up: torch.Tensor, per_thread: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """The four timed calls: the projection ``M_proj x`` and the update ``y += M_up z``, each as one mm and split
    into ``per_thread`` blocks (fewer where they do not divide the size)."""
    (C, S), r = x.shape, z.shape[0]
    b_proj, b_up = functional.blocks_dividing(S, per_thread), functional.blocks_dividing(C, per_thread)
    return {
        "projection mm": lambda: torch.mm(M_proj, x),
        "projection split": lambda: functional.blocked_mm(M_proj, x, b_proj),  # the adapter's own split
        "update addmm_": lambda: y.addmm_(M_up, z),
        "update split": lambda: (
            y.view(b_up, C // b_up, S).baddbmm_(M_up.view(b_up, C // b_up, r), z.expand(b_up, -1, -1)).view(C, S)
        ),
    }


def outer_cases(x: torch.Tensor, z: torch.Tensor, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The factor gradient ``sum_n x_n z_n^T`` of x (C, S) and z (r, S) split into ``batch`` samples (fewer where they
    do not divide S), (C, r): as written and as the transpose of ``z x^T``."""
    (C, S), r = x.shape, z.shape[0]
    batch = functional.blocks_dividing(S, batch)
    x3 = x.view(C, batch, S // batch).transpose(0, 1).contiguous()
    z3 = z.view(r, batch, S // batch).transpose(0, 1).contiguous()
    return {
        "outer x z^T": lambda: functional.batched_outer(x3, z3),
        "outer (z x^T)^T": lambda: functional.batched_outer(z3, x3).T,
    }


def random_case(C: int, S: int, r: int) -> tuple[torch.Tensor, ...]:
    """x, y (C, S), z (r, S), M_proj (r, C), M_up (C, r)."""
    return torch.randn(C, S), torch.randn(C, S), torch.randn(r, S), torch.randn(r, C), torch.randn(C, r)


def interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, before: Callable[[], object] = lambda: None
) -> dict[str, list[float]]:
    """Seconds per call, every call once per round in a new random order (``before`` runs untimed before each)."""
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k in random.sample(list(calls), len(calls)):
            before()
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs=2, action="append", metavar=("C", "S"))
    parser.add_argument("--batch", type=int, default=1, help="samples the factor gradient's activations split into")
    parser.add_argument("--cold", action="store_true", help="evict the caches before every call")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    flush = torch.empty(16 << 20 if args.cold else 0)  # 64 MiB, twice this machine's L3
    before = (lambda: flush.add_(1.0)) if args.cold else (lambda: None)
    print(
        f"{args.threads} threads, rank {args.rank}, {args.rounds} rounds, "
        f"{functional.SPLIT_PER_THREAD} blocks per thread, factor gradient over {args.batch} sample(s)"
        + (", caches evicted before each call" if args.cold else "")
    )
    print(
        "| C x S | elements | projection mm (us) | split | ratio | update addmm_ (us) | split | ratio "
        "| outer x z^T (us) | (z x^T)^T | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for C, S in args.sizes or SIZES:
        x, y, z, M_proj, M_up = random_case(C, S, args.rank)
        calls = cases(x, y, z, M_proj, M_up, functional.SPLIT_PER_THREAD * args.threads)
        calls.update(outer_cases(x, z, args.batch))
        t = interleaved(calls, args.rounds, before)
        med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
        ratio = {
            kind: statistics.median(a / b for a, b in zip(t[other], t[plain], strict=True))
            for kind, other, plain in (
                ("projection", "projection split", "projection mm"),
                ("update", "update split", "update addmm_"),
                ("outer", "outer (z x^T)^T", "outer x z^T"),
            )
        }
        rows.append({"C": C, "S": S, **med, **{f"{k} ratio": v for k, v in ratio.items()}})
        print(
            f"| {C} x {S} | {C * S:,} | {med['projection mm']:.0f} | {med['projection split']:.0f} | "
            f"{ratio['projection']:.2f} | {med['update addmm_']:.0f} | {med['update split']:.0f} | "
            f"{ratio['update']:.2f} | {med['outer x z^T']:.0f} | {med['outer (z x^T)^T']:.0f} | "
            f"{ratio['outer']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
