"""Kernel-launching aten ops per call of one adapted layer: what each adapter adds over the frozen layer.

On a GPU a small layer's step is mostly the host issuing ops, one kernel launch (or a few) each, so the number of
ops an adapter adds is a deterministic proxy for its cost there, countable on any machine. ``OpCounter`` records
every aten op that reaches the backend below autograd (a ``TorchDispatchMode``), forward and backward, and leaves
out the ops that launch nothing:

- views and other aliases (``OpOverload.is_view``: ``view``, ``reshape`` when it aliases, ``expand``, ``t``,
  ``transpose``, ``permute``, ``unsqueeze``, ``squeeze``, ``slice``, ``select``, ``as_strided``, ``detach``,
  ``alias``, ...): new metadata over the same storage;
- ``METADATA_ONLY``: ``_unsafe_view`` (a view of a fresh result that autograd treats as a new tensor),
  allocations left uninitialised (``empty``, ``empty_strided``, ``new_empty``, ``new_empty_strided``,
  ``empty_like``: the caching allocator, no kernel) and shape queries (``sym_size``, ``sym_stride``,
  ``sym_numel``, ``sym_storage_offset``, ``is_same_size``).

Everything else counts once per call, ``copy_``, ``clone``, ``_to_copy``, ``fill_`` and ``zero_`` included (each
a kernel). A Triton kernel of ``tucker_lora.triton_kernels`` counts once per launch (``count_triton``; under the
interpreter its own copies of the arguments are not counted). One aten op
can run more than one kernel inside (``convolution_backward`` with two outputs runs cuDNN's data and weight
gradients); the table counts it once for every method alike.

A training step is the layer's forward and ``backward(dy)`` with the input requiring grad (as inside a network)
and every gradient set to ``None`` before it (as an optimiser's ``zero_grad`` leaves them, so autograd stores the
first gradient without adding it); an inference call is the forward under ``torch.no_grad``. Each is counted on a
second call, after a warm-up call (built-once constants such as the pinned modes' centre taps are not per-call).
The columns are those of ``benchmarks/bench_layers.py`` (the same layers, CPU sizes; op counts do not depend on
sizes, except which path ``auto`` takes: on CUDA it is always the factored one). One thread: the CPU-only split
of projections (``functional.split_blocks``) stays off, as on a GPU.

    python benchmarks/count_ops.py                       # default ranks and (8, 8, 3, 3, 3), every shape
    python benchmarks/count_ops.py --ranks 4 4 1 1 1 --only 0 --json counts.json
    TRITON_INTERPRET=1 python benchmarks/count_ops.py --triton   # the fused-kernel path, counted on the CPU
    python benchmarks/count_ops.py --dtype bfloat16              # a bf16 model, its adapters in float32
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator

import bench_layers
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tucker_lora import functional

#: Aten ops (overload packets) that launch no kernel although their schema does not mark them as views.
METADATA_ONLY = frozenset(
    {
        "_unsafe_view",
        "empty",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "empty_like",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "is_same_size",
    }
)


def launches(func: torch._ops.OpOverload) -> bool:
    """True for an aten op that runs a kernel (see the module docstring for what is left out)."""
    return not func.is_view and func.overloadpacket.__name__ not in METADATA_ONLY


class OpCounter(TorchDispatchMode):
    """Records the kernel-launching aten ops run while it is entered (``ops``: their names, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches(func):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.ops)


@contextlib.contextmanager
def counting(triton: bool = False) -> Iterator[OpCounter]:
    """An ``OpCounter`` entered for the block; with ``triton``, the launches of ``tucker_lora.triton_kernels``
    recorded too (as ``triton:<kernel>``)."""
    counter = OpCounter()
    with contextlib.ExitStack() as stack:
        if triton:
            stack.enter_context(count_triton(counter))
        stack.enter_context(counter)
        yield counter


@contextlib.contextmanager
def count_triton(counter: OpCounter) -> Iterator[None]:
    """Route every launch of ``tucker_lora.triton_kernels`` through ``counter``."""
    from tucker_lora import triton_kernels

    launch = triton_kernels.launch

    def counted(kernel, grid, *args, **kwargs):
        counter.ops.append(f"triton:{kernel.fn.__name__}")
        with _disable_current_modes():  # the interpreter's own copies of the arguments are no launches
            return launch(kernel, grid, *args, **kwargs)

    triton_kernels.launch = counted
    try:
        yield
    finally:
        triton_kernels.launch = launch


def reset_grads(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def count_call(fn: Callable[[], None], before: Callable[[], None], triton: bool = False) -> list[str]:
    """The ops of ``fn``'s second call (``before`` runs ahead of each call, uncounted)."""
    before()
    fn()
    before()
    with counting(triton) as counter:
        fn()
    return counter.ops


def count_column(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, triton: bool = False) -> dict[str, list[str]]:
    """``{"train": ops, "infer": ops}`` of one column (a layer of ``bench_layers.build_columns``)."""

    def train() -> None:
        bench_layers.call(module, x).backward(dy)

    def infer() -> None:
        with torch.no_grad():
            bench_layers.call(module, x)

    reset = lambda: reset_grads(module, x)  # noqa: E731
    return {"train": count_call(train, reset, triton), "infer": count_call(infer, reset, triton)}


def auto_path(module: nn.Module, x: torch.Tensor, grad: bool) -> str:
    """The path ``forward_mode="auto"`` takes for this call of a Tucker column."""
    from tucker_lora.layer import TuckerLoraLayer

    layer = next(m for m in module.modules() if isinstance(m, TuckerLoraLayer))
    with torch.set_grad_enabled(grad):
        return layer._choose_path(x, layer.get_base_layer(), layer._active())


def count_shape(
    shape: bench_layers.Shape, ranks: tuple[int, ...], triton: bool = False, dtype: torch.dtype = torch.float32
) -> dict:
    """Ops per column on one shape, and what each adds over the frozen base. ``dtype``: the base layer's weights and
    the input in it, the adapters' parameters left in float32 (as peft keeps them for a half-precision model)."""
    columns = bench_layers.build_columns(shape, ranks, "cpu")
    del columns["full fine-tuning"]  # not an adapter
    base = columns["frozen base"]
    for p in base.parameters():  # every column computes with these very tensors (``sharing_copy``)
        p.data = p.data.to(dtype)
    x = torch.randn(shape.input, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        dy = torch.randn_like(base(x))
    counts = {}
    for name, module in columns.items():
        try:
            counts[name] = count_column(module, x, dy, triton)
        except RuntimeError as error:  # a method that cannot take this dtype mix
            print(f"{shape.name}, {name}: {str(error).splitlines()[0]}", file=sys.stderr)
    frozen = counts["frozen base"]
    rows = []
    columns = {name: columns[name] for name in counts}
    for name, ops in counts.items():
        row = {
            "method": name,
            "train": len(ops["train"]),
            "infer": len(ops["infer"]),
            "train_added": len(ops["train"]) - len(frozen["train"]),
            "infer_added": len(ops["infer"]) - len(frozen["infer"]),
            "train_ops": added_ops(ops["train"], frozen["train"]),
            "infer_ops": added_ops(ops["infer"], frozen["infer"]),
        }
        if name.startswith("tucker auto"):
            row["paths"] = {g: auto_path(columns[name], x, g == "train") for g in ("train", "infer")}
        rows.append(row)
    return {"shape": shape.name, "ranks": list(ranks), "triton": triton, "dtype": str(dtype), "rows": rows}


def added_ops(ops: list[str], frozen: list[str]) -> dict[str, int]:
    """The multiset difference ``ops - frozen`` as ``{op: count}`` (negative where the column runs fewer)."""
    diff = collections.Counter(ops)
    diff.subtract(collections.Counter(frozen))
    return {op: n for op, n in sorted(diff.items()) if n}


def markdown(results: list[dict]) -> str:
    lines = [
        "| shape | ranks | method | training step: ops added | inference call: ops added |",
        "|---|---|---|---:|---:|",
    ]
    for result in results:
        ranks = ",".join(map(str, result["ranks"]))
        for row in result["rows"]:
            if row["method"] == "frozen base":
                lines.append(f"| {result['shape']} | {ranks} | frozen base (total) | {row['train']} | {row['infer']} |")
                continue
            method = row["method"]
            if "paths" in row:
                method += f" ({row['paths']['train']} / {row['paths']['infer']})"
            lines.append(f"| {result['shape']} | {ranks} | {method} | {row['train_added']} | {row['infer_added']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs=5, action="append", help="default: (4,4,1,1,1) and (8,8,3,3,3)")
    parser.add_argument("--only", type=int, nargs="*", help="indices of bench_layers.SHAPES to count")
    parser.add_argument("--triton", action="store_true", help="the fused Triton kernels on (TRITON_INTERPRET=1)")
    parser.add_argument("--ops", action="store_true", help="also list the ops each method adds")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the base layer's and input's"
    )
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ranks_list = [tuple(r) for r in args.ranks] if args.ranks else [(4, 4, 1, 1, 1), (8, 8, 3, 3, 3)]
    shapes = [bench_layers.SHAPES[i] for i in args.only] if args.only else bench_layers.SHAPES
    with triton_switch(args.triton):
        dtype = getattr(torch, args.dtype)
        results = [count_shape(shape, ranks, args.triton, dtype) for ranks in ranks_list for shape in shapes]
    print(markdown(results))
    if args.ops:
        for result in results:
            for row in result["rows"][1:]:
                print(f"{result['shape']} {result['ranks']} {row['method']}: train {row['train_ops']}")
                print(f"{result['shape']} {result['ranks']} {row['method']}: infer {row['infer_ops']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def triton_switch(on: bool) -> contextlib.AbstractContextManager:
    """The fused kernels on for the CPU (under the Triton interpreter) while entered, when ``on``."""
    if on and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--triton counts on the CPU under the Triton interpreter: set TRITON_INTERPRET=1")
    return functional.fused_kernels("cpu") if on else contextlib.nullcontext()


if __name__ == "__main__":
    main(sys.argv[1:])
