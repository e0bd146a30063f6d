"""End-to-end training step of a diffusers UNet3DConditionModel: Tucker-LoRA against the frozen model,
peft LoRA at a matched parameter count and full fine-tuning.

Peak memory: each method runs alone in its own subprocess (a few warm-up steps, then timed steps of
noise prediction with AdamW) and reports the process's peak RSS (CPU) or CUDA's max allocated memory.
Time: then every method's model is built in one more process and the steps are interleaved, one per
method per round in a new random order each round (``--rounds``); the ratio is the median over rounds
of each step over the frozen step of the same round, so the machine's drift between processes does not
enter it. "frozen" is the floor: forward and backward to the noisy latents (which the paper re-attaches
with ``requires_grad_``), nothing trained.

    python benchmarks/bench_unet.py                     # CPU-sized UNet (see --channels)
    python benchmarks/bench_unet.py --device cuda --channels 320 640 1280 1280 --frames 16 --size 32
    python benchmarks/bench_unet.py --device cuda --channels 320 640 1280 1280 --frames 16 --size 32 --in-process \
        --fused --autocast bf16 --json unet.json   # one process: no peaks of each method alone, the peak each step adds

``--in-process`` skips the per-method processes (each builds its own model: slow at full size) and reports, from
the interleaved process, the most memory a step of each method adds over what is in use before it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import subprocess
import sys
import time

import torch

from tucker_lora import functional
from tucker_lora.testing import peak_memory_added, sharing_copy
from tucker_lora.video.metrics import peak_memory_mb

METHODS = ["frozen", "tucker (4,4,1,1,1)", "tucker (8,8,3,1,1)", "peft LoRA (matched)", "full fine-tuning"]
#: ``--fused``: Tucker at the default ranks with the fused Triton kernels (``functional.fused_kernels``).
FUSED = "tucker (4,4,1,1,1), fused"
TARGETS = r".*(temp_convs\.\d+\.conv(1\.2|\d\.3)|resnets\.\d+\.conv\d)"


def build_unet(channels: list[int]):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    n = len(channels)
    return UNet3DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=64,
        attention_head_dim=8,
    )


def lora_rank_for(unet, budget: int) -> int:
    """peft LoRA rank whose parameter count on the same targets is closest to ``budget``."""
    import re

    per_rank = 0
    for name, module in unet.named_modules():
        if re.fullmatch(TARGETS, name) and hasattr(module, "weight"):
            out_ch, in_ch, *k = module.weight.shape
            per_rank += in_ch * int(torch.tensor(k).prod()) + out_ch
    return max(1, round(budget / per_rank))


def wrap(unet, method: str, budget: int):
    from peft import LoraConfig, get_peft_model

    from tucker_lora import TuckerLoraConfig

    if method == "frozen":
        return unet.requires_grad_(False)
    if method == "full fine-tuning":
        return unet.requires_grad_(True)
    if method.startswith("tucker"):
        ranks = (4, 4, 1, 1, 1) if "4,4,1" in method else (8, 8, 3, 1, 1)
        return get_peft_model(unet, TuckerLoraConfig(target_modules=TARGETS, ranks=ranks))
    r = lora_rank_for(unet, budget)
    return get_peft_model(unet, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights="gaussian"))


class Run:
    """One method's model, optimiser and fixed inputs, ready to take training steps."""

    def __init__(self, args: argparse.Namespace, method: str, budget: int, unet=None) -> None:
        """``unet``: the model to wrap (by default a new one)."""
        device = args.device
        if unet is None:
            with torch.device(device):  # random init on the device: the full-size UNet builds in seconds on a GPU
                unet = build_unet(args.channels)
        self.model = wrap(unet, method, budget).to(device)
        self.device = device
        self.amp = (
            torch.autocast(device.split(":")[0], dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast])
            if args.autocast != "none"
            else contextlib.nullcontext()
        )
        self.forward = torch.compile(self.model, mode=args.compile) if args.compile else self.model
        self.new_step = torch.compiler.cudagraph_mark_step_begin if args.compile == "reduce-overhead" else lambda: None
        device_type = device.split(":")[0]
        self.fused = (lambda: functional.fused_kernels(device_type)) if method == FUSED else contextlib.nullcontext
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, 4, args.frames, args.size, args.size)
        self.latents = torch.randn(shape, generator=g).to(device)
        self.noise = torch.randn(shape, generator=g).to(device)
        self.text = torch.randn(args.batch, 8, 64, generator=g).to(device)
        self.t = torch.tensor([500] * args.batch, device=device)

    def step(self) -> float:
        """One noise-prediction step with AdamW; its wall time in seconds (CUDA synchronised)."""
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        noisy = (0.7 * self.latents + 0.7 * self.noise).detach().requires_grad_(True)
        self.new_step()
        with self.amp, self.fused():
            pred = self.forward(noisy, self.t, encoder_hidden_states=self.text).sample
            torch.nn.functional.mse_loss(pred.float(), self.noise).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    """One method alone in this process: its trainable count, median step and peak memory (printed as JSON)."""
    run = Run(args, args.method, args.budget)
    if run.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [run.step() for _ in range(args.warmup + args.steps)][args.warmup :]
    print(
        json.dumps(
            {
                "method": args.method,
                "trainable": sum(p.numel() for p in run.params),
                "step_s": statistics.median(times),
                "peak_mb": peak_memory_mb(torch.device(run.device)),
            }
        )
    )


def base_copy(base, method: str):
    """The model ``method`` wraps: ``base``'s weights themselves, or its own copy of them for full fine-tuning."""
    return copy.deepcopy(base) if method == "full fine-tuning" else sharing_copy(base)


def interleaved(args: argparse.Namespace, budget: int | None, methods: list[str]) -> dict[str, dict]:
    """Every method's model in this one process, ``--rounds`` rounds of one step each in a new random order:
    ``{method: {"trainable", "step_s": median step, "ratio": median over rounds of step / frozen step in the same
    round, "peak_added_mb": what the last warm-up step added over the memory in use before it}}``. Pairing each
    step with the frozen one a few seconds apart cancels the machine's drift, which separate processes do not.
    The frozen, Tucker and LoRA models share one set of base weights (``sharing_copy``): separate copies of one
    model differ in speed by where their weights land in memory. Full fine-tuning, which trains them, has its own.
    ``budget`` None: Tucker (4,4,1,1,1)'s trainable count, read from its model here, sets LoRA's rank.
    """
    with torch.device(args.device):
        base = build_unet(args.channels)
    runs: dict[str, Run] = {}
    for m in sorted(methods, key=lambda m: m != "tucker (4,4,1,1,1)"):  # Tucker's count is LoRA's budget
        runs[m] = Run(args, m, budget or 0, base_copy(base, m))
        if budget is None and m == "tucker (4,4,1,1,1)":
            budget = sum(p.numel() for p in runs[m].params)
    peaks = {}
    for m, run in runs.items():
        for i in range(args.warmup):
            with (
                peak_memory_added(torch.device(args.device)) if i == args.warmup - 1 else contextlib.nullcontext() as p
            ):
                run.step()
            peaks[m] = p["peak_mb"] if p is not None else float("nan")
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = random.Random(0)
    for _ in range(args.rounds):
        names = list(methods)
        order.shuffle(names)
        for m in names:
            times[m].append(runs[m].step())
    floor = times["frozen"]
    return {
        m: {
            "trainable": sum(p.numel() for p in runs[m].params),
            "step_s": statistics.median(ts),
            "ratio": statistics.median(t / f for t, f in zip(ts, floor, strict=True)),
            "peak_added_mb": peaks.get(m, float("nan")),
        }
        for m, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none", help="mixed precision")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of the interleaved timing, every method in one process (0: each process's own timing)",
    )
    parser.add_argument("--in-process", action="store_true", help="no process per method (see the docstring)")
    parser.add_argument("--fused", action="store_true", help=f"add the method {FUSED!r} (CUDA, triton)")
    parser.add_argument("--methods", nargs="+", help="only these methods (and the frozen floor)")
    parser.add_argument(
        "--compile", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"), help="torch.compile mode"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        worker(args)
        return
    methods = METHODS + [FUSED] * args.fused
    if args.methods:
        methods = ["frozen"] + [m for m in methods if m != "frozen" and m in args.methods]

    common = [
        "--device", args.device, "--channels", *map(str, args.channels), "--frames", str(args.frames),
        "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--autocast", args.autocast,
    ] + (["--compile", args.compile] if args.compile else [])  # fmt: skip
    print(f"UNet3DConditionModel channels={args.channels} latents {args.frames}x{args.size}x{args.size} "
          f"batch={args.batch} device={args.device} threads={torch.get_num_threads()} "
          f"autocast={args.autocast} compile={args.compile}")  # fmt: skip
    if args.in_process:
        paired = interleaved(args, None, methods)
        rows = [{"method": m, **paired[m]} for m in methods]
        head, peak = f"step (s), median of {args.rounds} | step / frozen, paired", "peak added by a step (MB)"
    else:
        rows, budget = [], 0
        for method in methods:  # peaks (and a first timing) each in its own process
            cmd = [sys.executable, __file__, *common, "--method", method, "--budget", str(budget)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            print(out, flush=True)
            rows.append(row)
            if method == "tucker (4,4,1,1,1)":
                budget = row["trainable"]
        peak = "peak memory (MB)"
        if args.rounds:
            paired = interleaved(args, budget, methods)
            print(json.dumps({"interleaved": paired, "rounds": args.rounds}), flush=True)
            head = f"step (s), median of {args.rounds} | step / frozen, paired"
            for r in rows:
                r["step_s"], r["ratio"] = paired[r["method"]]["step_s"], paired[r["method"]]["ratio"]
        else:
            head = "step (s) | step / frozen"
            for r in rows:
                r["ratio"] = r["step_s"] / rows[0]["step_s"]
    result = {"config": vars(args), "head": head, "peak": peak, "rows": rows}
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def markdown(result: dict) -> str:
    """The table of a run (``main``'s result, as written by ``--json``)."""
    lines = [f"| method | trainable params | {result['head']} | {result['peak']} |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mb = r.get("peak_mb", r.get("peak_added_mb"))
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {r['ratio']:.2f}x | {mb:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
