"""Layer-level cost of Tucker-LoRA against the frozen base, peft LoRA, LyCORIS LoCon-Tucker and full fine-tuning.

For each layer shape, in one process and interleaved in rounds (every column once per round, in a new
random order each round, so machine drift and whatever the previous column left in the caches and the
allocator hit every column alike), it times a training step (forward + backward with the input gradient,
as for a layer inside a network; the adapter also gets its parameter gradients) and an inference forward,
counts the bytes autograd saves for the backward (``saved_tensors_hooks``; deterministic), and measures
the peak memory of a training step through four copies of the layer in a row (so each layer's input is
kept alive only by what autograd saves; on CPU in a child process, see ``peaks_in_child``).
Times are medians, reported as ratios to the frozen base layer (the median of per-round ratios); on CUDA
each step is synchronised, and a "pipelined" column also times steps queued back to back (as inside a
network, where the host runs ahead).
Baselines get the trainable parameter count nearest to Tucker's: peft LoRA rank ``round(P / (I*k + O))``
(at least 1) and LyCORIS LoCon-Tucker rank solving ``r*I + r*r*k + r*O = P``.

    python benchmarks/bench_layers.py                # CPU sizes (scaled down, see SHAPES)
    python benchmarks/bench_layers.py --runs 3       # three fresh processes, medians of their ratios
    python benchmarks/bench_layers.py --full-size    # the full-size layers (GPU)
    python benchmarks/bench_layers.py --device cuda --full-size --json out.json
    python benchmarks/bench_layers.py --compile reduce-overhead   # every column under torch.compile
    python benchmarks/bench_layers.py --device cuda --full-size --fused   # a column with the fused Triton kernels
    python benchmarks/bench_layers.py --columns "tucker auto" "peft LoRA"  # some columns (and the frozen base)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tucker_lora import TuckerLoraConfig, functional
from tucker_lora.testing import peak_memory_added, saved_activation_bytes, sharing_copy


@dataclass(frozen=True)
class Shape:
    name: str
    conv: Callable[[], nn.Module]
    input: tuple[int, ...]


FULL_SHAPES = [
    Shape("Conv3d 320x320x(3,3,3), 16x32x32", lambda: nn.Conv3d(320, 320, 3, padding=1), (1, 320, 16, 32, 32)),
    Shape(
        "Conv3d 640x640x(3,1,1), 16x32x32",
        lambda: nn.Conv3d(640, 640, (3, 1, 1), padding=(1, 0, 0)),
        (1, 640, 16, 32, 32),
    ),
    Shape("Conv3d 1280x1280x(3,3,3), 8x8x8", lambda: nn.Conv3d(1280, 1280, 3, padding=1), (1, 1280, 8, 8, 8)),
    Shape("Conv2d 320x320x(3,3), 16 frames of 64x64", lambda: nn.Conv2d(320, 320, 3, padding=1), (16, 320, 64, 64)),
]
#: CPU sizes: the same kernels with activations (and the two widest layers' channels) scaled down.
SHAPES = [
    Shape("Conv3d 320x320x(3,3,3), 8x16x16", lambda: nn.Conv3d(320, 320, 3, padding=1), (1, 320, 8, 16, 16)),
    Shape(
        "Conv3d 640x640x(3,1,1), 8x16x16",
        lambda: nn.Conv3d(640, 640, (3, 1, 1), padding=(1, 0, 0)),
        (1, 640, 8, 16, 16),
    ),
    Shape("Conv3d 1280x1280x(3,3,3), 4x4x4", lambda: nn.Conv3d(1280, 1280, 3, padding=1), (1, 1280, 4, 4, 4)),
    Shape("Conv2d 320x320x(3,3), 8 frames of 32x32", lambda: nn.Conv2d(320, 320, 3, padding=1), (8, 320, 32, 32)),
]
#: A layer so small that its arithmetic is nothing: what each method costs per call on the host.
TINY = Shape(
    "Conv3d 16x16x(3,3,3), 4x4x4 (per-call overhead)", lambda: nn.Conv3d(16, 16, 3, padding=1), (1, 16, 4, 4, 4)
)
FULL_SHAPES.append(TINY)
SHAPES.append(TINY)


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def adapted_layer(base: nn.Module, config) -> nn.Module:
    """The layer peft's ``config`` makes of ``base`` (``sharing_copy``). Columns are called at the layer, as inside a
    network: peft's model-level wrappers (``PeftModel``, the tuner model) run once per network step, not once
    per layer, and LyCORIS's column has none."""
    return get_peft_model(nn.Sequential(sharing_copy(base)), config).base_model.model[0]


class Fused(nn.Module):
    """A Tucker column with the fused Triton kernels on for its calls (``functional.fused_kernels``): each forward
    decides, and the backward of that call follows it."""

    def __init__(self, layer: nn.Module, device_type: str) -> None:
        super().__init__()
        self.layer, self.device_type = layer, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with functional.fused_kernels(self.device_type):
            return self.layer(x)


FUSED = "tucker auto, fused"


def build_columns(
    shape: Shape, ranks: tuple[int, ...], device: str, fused: bool = False, only: list[str] | None = None
) -> dict[str, nn.Module]:
    """Every method on the same base layer (its weight shared, ``sharing_copy``), on ``device``; with ``fused``,
    also ``tucker auto`` with the fused Triton kernels; ``only``: the frozen base and the columns of these names
    (a baseline's `` r=N`` left out)."""
    torch.manual_seed(0)
    base = shape.conv().to(device).requires_grad_(False)
    columns: dict[str, nn.Module] = {"frozen base": base}
    for mode in ("factored", "merged", "auto"):
        cfg = TuckerLoraConfig(target_modules=["0"], ranks=ranks, init_weights=False, forward_mode=mode)
        columns[f"tucker {mode}"] = adapted_layer(base, cfg)
    budget = n_trainable(columns["tucker auto"])
    out_ch, in_ch, *k = base.weight.shape
    taps = math.prod(k)
    r_lora = max(1, round(budget / (in_ch * taps + out_ch)))
    lora = LoraConfig(r=r_lora, lora_alpha=r_lora, target_modules=["0"], init_lora_weights=False)
    columns[f"peft LoRA r={r_lora}"] = adapted_layer(base, lora)
    try:
        from lycoris.modules.locon import LoConModule

        r_ly = max(1, round((-(in_ch + out_ch) + math.sqrt((in_ch + out_ch) ** 2 + 4 * taps * budget)) / (2 * taps)))
        ly_base = sharing_copy(base)
        ly = LoConModule("bench", ly_base, lora_dim=r_ly, alpha=r_ly, use_tucker=True, bypass_mode=True).to(device)
        ly.apply_to()
        with torch.no_grad():
            ly.lora_up.weight.normal_(0, 0.01)
        columns[f"LyCORIS LoCon-Tucker r={r_ly}"] = nn.ModuleDict({"layer": ly_base, "adapter": ly})
    except ImportError:
        print("lycoris-lora not installed: LyCORIS column skipped (pip install lycoris-lora)")
    cfg = TuckerLoraConfig(target_modules=["0"], ranks=ranks, init_weights=False, freeze_modes=("i",))
    columns["tucker auto, freeze_modes=('i',)"] = adapted_layer(base, cfg)
    full = sharing_copy(base)  # the same storage, trainable
    for name, t in base.named_parameters():
        setattr(full, name, nn.Parameter(t.detach()))
    columns["full fine-tuning"] = full
    if fused:
        cfg = TuckerLoraConfig(target_modules=["0"], ranks=ranks, init_weights=False)
        columns[FUSED] = Fused(adapted_layer(base, cfg), torch.device(device).type)
    if only:
        columns = {n: m for n, m in columns.items() if n == "frozen base" or n.split(" r=")[0] in only}
    return columns


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """The column's layer under ``torch.compile(mode=mode)`` (its parameters shared with ``module``): what is
    left of each method's cost once the host no longer issues its ops one by one."""
    if isinstance(module, nn.ModuleDict):
        return nn.ModuleDict({"layer": torch.compile(module["layer"], mode=mode), "adapter": module["adapter"]})
    return torch.compile(module, mode=mode)


def call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module["layer"](x) if isinstance(module, nn.ModuleDict) else module(x)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = call(module, x)
    y.backward(dy)


STACK = 4


def stack_step(stack: list[nn.Module], x: torch.Tensor) -> None:
    """Forward through the stack then backward: each layer's input is kept alive only by what autograd saves."""
    h = x.detach().requires_grad_(True)
    for module in stack:
        h = call(module, h)
    h.square().mean().backward()


def peak_step_mb(module: nn.Module, x: torch.Tensor, device: str) -> float:
    """Peak memory a training step of ``STACK`` copies of the layer in a row adds (``peak_memory_added``: CUDA max
    allocated, or on Linux the rise of the process's peak RSS above the resident size before the step). Only
    layers with as many outputs as inputs and stride 1 stack."""
    stack = [copy.deepcopy(module) for _ in range(STACK)]
    with peak_memory_added(torch.device(device)) as mem:
        stack_step(stack, x)
    return mem["peak_mb"]


def bench_shape(
    shape: Shape,
    ranks: tuple[int, ...],
    device: str,
    repeats: int,
    warmup: int,
    autocast: str = "none",
    peaks_only: bool = False,
    peaks_elsewhere: Callable[[], dict[str, float]] | None = None,
    compile_mode: str | None = None,
    fused: bool = False,
    only: list[str] | None = None,
) -> dict:
    """Times, saved bytes and peaks of every column on one shape (``peaks_only``: just ``{column: peak MB}``).
    ``peaks_elsewhere`` gives the peaks from another process (CPU: measured under a malloc setting that
    would distort the timings). ``fused`` and ``only``: as ``build_columns`` (no fused column when compiling: a
    compiled graph does not run them)."""
    columns = build_columns(shape, ranks, device, fused=fused and not compile_mode, only=only)
    amp = (
        torch.autocast(device.split(":")[0], dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[autocast]))
        if autocast != "none"
        else contextlib.nullcontext()
    )
    x = torch.randn(shape.input, device=device, requires_grad=True)
    if peaks_only:
        return {name: column_peak(name, module, x, device, amp) for name, module in columns.items()}
    with torch.no_grad():
        dy = torch.randn_like(call(columns["frozen base"], x))
    timed = {n: compiled(m, compile_mode) for n, m in columns.items()} if compile_mode else columns
    # CUDA graphs reuse their output buffers: each call starts a new step, so the last one's outputs may be overwritten
    new_step = torch.compiler.cudagraph_mark_step_begin if compile_mode == "reduce-overhead" else lambda: None
    train: dict[str, list[float]] = {name: [] for name in columns}
    infer: dict[str, list[float]] = {name: [] for name in columns}
    order = random.Random(0)
    for i in range(warmup + repeats):
        names = list(columns)
        order.shuffle(names)  # each round in a new order: drift, and what the column before leaves, hit all alike
        for name in names:
            module = timed[name]
            sync(device)
            t0 = time.perf_counter()
            with amp:
                new_step()
                train_step(module, x, dy)
            sync(device)
            t1 = time.perf_counter()
            with torch.no_grad(), amp:
                new_step()
                call(module, x)
            sync(device)
            t2 = time.perf_counter()
            module.zero_grad(set_to_none=True)
            x.grad = None
            if i >= warmup:
                train[name].append(t1 - t0)
                infer[name].append(t2 - t1)
    pipelined = {}
    if device.startswith("cuda"):  # steps queued back to back, one sync: the GPU's own time where it is the bottleneck
        for name, module in timed.items():
            sync(device)
            t0 = time.perf_counter()
            with amp:
                for _ in range(repeats):
                    new_step()
                    train_step(module, x, dy)
                    module.zero_grad(set_to_none=True)
                    x.grad = None
            sync(device)
            pipelined[name] = (time.perf_counter() - t0) / repeats
    peak = peaks_elsewhere() if peaks_elsewhere else {n: column_peak(n, m, x, device, amp) for n, m in columns.items()}
    rows = []
    for name, module in columns.items():
        rows.append(
            {
                "method": name,
                "params": n_trainable(module),
                "train_ms": 1e3 * statistics.median(train[name]),
                "train_ratio": paired_ratio(train[name], train["frozen base"]),
                "train_pipelined_ratio": pipelined[name] / pipelined["frozen base"] if pipelined else None,
                "infer_ratio": paired_ratio(infer[name], infer["frozen base"]),
                "saved_vs_x": saved_activation_bytes(lambda m=module: call(m, x)) / (x.numel() * x.element_size()),
                "peak_mb": peak[name],
            }
        )
    suffix = "" if autocast == "none" else f", autocast {autocast}"
    suffix += f", compiled ({compile_mode})" if compile_mode else ""
    return {"shape": shape.name + suffix, "rows": rows}


def paired_ratio(times: list[float], floor: list[float]) -> float:
    """Median over rounds of (this column's time / the frozen base's time in the same round): each ratio pairs
    two runs a few milliseconds apart, so slow drifts of the machine cancel."""
    return statistics.median(t / f for t, f in zip(times, floor, strict=True))


def median_of_runs(runs: list[list[dict]]) -> list[dict]:
    """Per shape and column, the median of each ratio (and of the step time) over whole runs of the script, and
    each ratio's values in every run (``<ratio>_runs``: how far one run may land from the median)."""
    merged = []
    for shape_runs in zip(*runs, strict=True):
        rows = []
        for row_runs in zip(*(r["rows"] for r in shape_runs), strict=True):
            row = dict(row_runs[0])
            for key in ("train_ms", "train_ratio", "train_pipelined_ratio", "infer_ratio"):
                if row[key] is not None:
                    row[key] = statistics.median(r[key] for r in row_runs)
                    if key.endswith("ratio"):
                        row[f"{key}_runs"] = [r[key] for r in row_runs]
            rows.append(row)
        merged.append({"shape": f"{shape_runs[0]['shape']} (median of {len(runs)} runs)", "rows": rows})
    return merged


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv less the options ``names`` and their values (``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(f"{n}=" for n in names)):
            out.append(a)
    return out


def runs_in_children(args: argparse.Namespace) -> list[dict]:
    """``--runs N``: the whole benchmark N times, each in a fresh process, then the medians of their ratios."""
    runs = []
    for k in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            cmd = [sys.executable, __file__, *_without_options(sys.argv[1:], ("--runs", "--json")), "--json", out]
            print(f"run {k + 1} of {args.runs}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                runs.append(json.load(f))
    return median_of_runs(runs)


def column_peak(name: str, module: nn.Module, x: torch.Tensor, device: str, amp) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    with amp:
        return peak_step_mb(module, x, device)


def ratio_cell(row: dict, key: str) -> str:
    """``1.08x``, or over several runs ``1.08x (1.06-1.10)``: the median and the lowest and highest run."""
    runs = row.get(f"{key}_runs")
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if runs and len(runs) > 1 else ""
    return f"{row[key]:.2f}x{spread}"


def markdown(result: dict) -> str:
    pipelined = result["rows"][0]["train_pipelined_ratio"] is not None
    lines = [
        f"**{result['shape']}**",
        "",
        "| method | params | step (ms) | train / frozen |"
        + (" train, pipelined |" if pipelined else "")
        + " inference / frozen | saved (x=1) | peak, 4 in a row (MB) |",
        "|---|---:|---:|---:|" + ("---:|" if pipelined else "") + "---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['train_ms']:.1f} | {ratio_cell(r, 'train_ratio')} | "
            + (f"{ratio_cell(r, 'train_pipelined_ratio')} | " if pipelined else "")
            + f"{ratio_cell(r, 'infer_ratio')} | {r['saved_vs_x']:.2f} | {r['peak_mb']:.1f} |"
        )
    return "\n".join(lines)


def peaks_in_child(args: argparse.Namespace, index: int) -> Callable[[], dict[str, float]]:
    """The CPU peaks of shape ``index``, measured in a child process with large tensors mmapped and returned on
    free (``MALLOC_MMAP_THRESHOLD_``), so the rise of the peak RSS is honest; the timings stay in a process with
    the default allocator, as users run."""

    def run() -> dict[str, float]:
        cmd = [sys.executable, __file__, "--peaks-only", "--only", str(index), "--device", args.device]
        cmd += ["--ranks", *map(str, args.ranks), "--autocast", args.autocast]
        cmd += ["--full-size"] * args.full_size + ["--fused"] * args.fused
        cmd += ["--columns", *args.columns] if args.columns else []
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-size", action="store_true", help="the full-size layers instead of the CPU ones")
    parser.add_argument("--ranks", type=int, nargs=5, default=(4, 4, 1, 1, 1))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", type=int, nargs="*", help="indices of the shapes to run")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none", help="mixed precision")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument("--runs", type=int, default=1, help="whole runs, each in a fresh process; medians reported")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="time every column under torch.compile (mode; reduce-overhead adds CUDA graphs on a GPU); the first "
        "--warmup rounds include the compilation",
    )
    parser.add_argument("--fused", action="store_true", help=f"add the column {FUSED!r} (CUDA, triton)")
    parser.add_argument(
        "--columns", nargs="+", help="only the frozen base and these columns (names as printed, without ' r=N')"
    )
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    shapes = FULL_SHAPES if args.full_size else SHAPES
    indices = args.only if args.only else range(len(shapes))
    bench = functools.partial(
        bench_shape,
        ranks=tuple(args.ranks),
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        autocast=args.autocast,
        compile_mode=args.compile,
        fused=args.fused,
        only=args.columns,
    )
    if args.peaks_only:
        (index,) = indices
        print(json.dumps(bench(shapes[index], peaks_only=True)))
        return
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"device={args.device} ({name}) torch={torch.__version__} ranks={tuple(args.ranks)} autocast={args.autocast}"
        + (" cudnn.benchmark" if args.cudnn_benchmark else "")
    )
    if args.runs > 1:
        results = runs_in_children(args)
        print("\n\n".join(markdown(r) for r in results), flush=True)
    else:
        results = []
        for index in indices:
            elsewhere = None if args.device.startswith("cuda") else peaks_in_child(args, index)
            result = bench(shapes[index], peaks_elsewhere=elsewhere)
            results.append(result)
            print(markdown(result), "\n", flush=True)
            write_json(args.json, results)  # after every shape: a run stopped part-way keeps what it measured
    write_json(args.json, results)


def write_json(path: str | None, results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
