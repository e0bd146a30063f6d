"""Layer-level cost of Tucker-LoRA against the frozen base, peft LoRA, LyCORIS LoCon-Tucker and full fine-tuning.

For each layer shape, in one process and interleaved round-robin (so machine noise hits every
column alike), it times a training step (forward + backward with the input gradient, as for a
layer inside a network; the adapter also gets its parameter gradients) and an inference forward,
counts the bytes autograd saves for the backward (``saved_tensors_hooks``; deterministic), and measures
the peak memory of a training step through four copies of the layer in a row (so each layer's input is
kept alive only by what autograd saves).
Times are medians, reported as ratios to the frozen base layer. Baselines get the trainable
parameter count nearest to Tucker's: peft LoRA rank ``round(P / (I*k + O))`` (at least 1) and
LyCORIS LoCon-Tucker rank solving ``r*I + r*r*k + r*O = P``.

    python benchmarks/bench_layers.py                # CPU sizes (scaled down, see SHAPES)
    python benchmarks/bench_layers.py --full-size    # the issue's sizes (GPU)
    python benchmarks/bench_layers.py --device cuda --full-size --json out.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tucker_lora import TuckerLoraConfig
from tucker_lora.testing import saved_activation_bytes


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


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_columns(shape: Shape, ranks: tuple[int, ...], device: str) -> dict[str, nn.Module]:
    """Every method on its own copy of the same base layer, on ``device``."""
    torch.manual_seed(0)
    base = shape.conv().to(device).requires_grad_(False)
    columns: dict[str, nn.Module] = {"frozen base": base}
    for mode in ("factored", "merged", "auto"):
        cfg = TuckerLoraConfig(target_modules=["0"], ranks=ranks, init_weights=False, forward_mode=mode)
        columns[f"tucker {mode}"] = get_peft_model(nn.Sequential(copy.deepcopy(base)), cfg)
    budget = n_trainable(columns["tucker auto"])
    out_ch, in_ch, *k = base.weight.shape
    taps = math.prod(k)
    r_lora = max(1, round(budget / (in_ch * taps + out_ch)))
    lora = LoraConfig(r=r_lora, lora_alpha=r_lora, target_modules=["0"], init_lora_weights=False)
    columns[f"peft LoRA r={r_lora}"] = get_peft_model(nn.Sequential(copy.deepcopy(base)), lora)
    try:
        from lycoris.modules.locon import LoConModule

        r_ly = max(1, round((-(in_ch + out_ch) + math.sqrt((in_ch + out_ch) ** 2 + 4 * taps * budget)) / (2 * taps)))
        ly_base = copy.deepcopy(base)
        ly = LoConModule("bench", ly_base, lora_dim=r_ly, alpha=r_ly, use_tucker=True, bypass_mode=True).to(device)
        ly.apply_to()
        with torch.no_grad():
            ly.lora_up.weight.normal_(0, 0.01)
        columns[f"LyCORIS LoCon-Tucker r={r_ly}"] = nn.ModuleDict({"layer": ly_base, "adapter": ly})
    except ImportError:
        print("lycoris-lora not installed: LyCORIS column skipped (pip install lycoris-lora)")
    cfg = TuckerLoraConfig(
        target_modules=["0"], ranks=ranks, init_weights=False, forward_mode="merged", freeze_modes=("i",)
    )
    columns["tucker merged, freeze_modes=('i',)"] = get_peft_model(nn.Sequential(copy.deepcopy(base)), cfg)
    full = copy.deepcopy(base).requires_grad_(True)
    columns["full fine-tuning"] = full
    return columns


def call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module["layer"](x) if isinstance(module, nn.ModuleDict) else module(x)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = call(module, x)
    y.backward(dy)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


STACK = 4


def stack_step(stack: list[nn.Module], x: torch.Tensor) -> None:
    """Forward through the stack then backward: each layer's input is kept alive only by what autograd saves."""
    h = x.detach().requires_grad_(True)
    for module in stack:
        h = call(module, h)
    h.square().mean().backward()


def peak_step_mb(module: nn.Module, x: torch.Tensor, device: str) -> float:
    """Peak memory a training step of ``STACK`` copies of the layer in a row adds: CUDA max allocated, or on
    Linux the rise of the process's peak RSS (reset through ``/proc/self/clear_refs``) above the resident size
    before the step. Only layers with as many outputs as inputs and stride 1 stack."""
    stack = [copy.deepcopy(module) for _ in range(STACK)]
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stack_step(stack, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kb("VmRSS")
    stack_step(stack, x)
    return (_proc_status_kb("VmHWM") - before) / 1024


def bench_shape(shape: Shape, ranks: tuple[int, ...], device: str, repeats: int, warmup: int) -> dict:
    columns = build_columns(shape, ranks, device)
    x = torch.randn(shape.input, device=device, requires_grad=True)
    with torch.no_grad():
        dy = torch.randn_like(call(columns["frozen base"], x))
    train: dict[str, list[float]] = {name: [] for name in columns}
    infer: dict[str, list[float]] = {name: [] for name in columns}
    for i in range(warmup + repeats):
        for name, module in columns.items():  # round-robin: drift hits every column alike
            sync(device)
            t0 = time.perf_counter()
            train_step(module, x, dy)
            sync(device)
            t1 = time.perf_counter()
            with torch.no_grad():
                call(module, x)
            sync(device)
            t2 = time.perf_counter()
            module.zero_grad(set_to_none=True)
            x.grad = None
            if i >= warmup:
                train[name].append(t1 - t0)
                infer[name].append(t2 - t1)
    peak = {}
    for name, module in columns.items():
        module.zero_grad(set_to_none=True)
        x.grad = None
        peak[name] = peak_step_mb(module, x, device)
    floor_t, floor_i = statistics.median(train["frozen base"]), statistics.median(infer["frozen base"])
    rows = []
    for name, module in columns.items():
        rows.append(
            {
                "method": name,
                "params": n_trainable(module),
                "train_ms": 1e3 * statistics.median(train[name]),
                "train_ratio": statistics.median(train[name]) / floor_t,
                "infer_ratio": statistics.median(infer[name]) / floor_i,
                "saved_vs_x": saved_activation_bytes(lambda m=module: call(m, x)) / (x.numel() * x.element_size()),
                "peak_mb": peak[name],
            }
        )
    return {"shape": shape.name, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"**{result['shape']}**",
        "",
        "| method | params | step (ms) | train / frozen | inference / frozen | saved (x=1) | peak, 4 in a row (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['train_ms']:.1f} | {r['train_ratio']:.2f}x | "
            f"{r['infer_ratio']:.2f}x | {r['saved_vs_x']:.2f} | {r['peak_mb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large tensors mmapped and returned on free: honest RSS peaks
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-size", action="store_true", help="the issue's layer sizes instead of the CPU ones")
    parser.add_argument("--ranks", type=int, nargs=5, default=(4, 4, 1, 1, 1))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", type=int, nargs="*", help="indices of the shapes to run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    shapes = FULL_SHAPES if args.full_size else SHAPES
    if args.only:
        shapes = [shapes[i] for i in args.only]
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} ranks={tuple(args.ranks)}")
    results = []
    for shape in shapes:
        result = bench_shape(shape, tuple(args.ranks), args.device, args.repeats, args.warmup)
        results.append(result)
        print(markdown(result), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
