"""Peak memory and step time of the training script sharded with FSDP2 against DDP and one plain process.

    .venv/bin/python benchmarks/bench_fsdp.py --device cpu                           # 2 processes on gloo
    python benchmarks/bench_fsdp.py --device cuda --num_processes 1 --steps 20        # one GPU: fsdp, ddp, single
    python benchmarks/bench_fsdp.py --device cuda --num_processes 1 -- \\
        --pretrained_model_name_or_path ./zeroscope_v2_576w --resolution 256 --num_frames 16   # a real UNet

Each mode runs ``examples/train_text_to_video.py`` for ``--steps`` optimiser steps (no checkpoints, no
validation) in a subprocess: ``fsdp`` under ``accelerate launch --config_file examples/accelerate_fsdp.yaml``,
``ddp`` under ``torchrun`` (accelerate's DDP; ``accelerate launch --multi_gpu`` refuses one process),
``single`` as ``python examples/train_text_to_video.py`` (one process only). From the run's
``train_log.jsonl`` it reports the peak memory (main process: CUDA's max allocated on a GPU, peak RSS on
the CPU) and the median step time after ``--warmup`` steps. Arguments after ``--`` go to the training
script (the default is the tiny random UNet3D on synthetic data). Under FSDP the UNet stays on the CPU
until ``fully_shard`` moves each process's shard to the GPU, so the GPU peak holds 1/N of the frozen base
plus the gathered blocks; on the CPU every process builds the whole base first, so peak RSS shows no
saving there. With one process nothing is sharded: the comparison then shows FSDP's overhead (its
all-gather buffers and per-block hooks) against DDP at the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_text_to_video.py"
FSDP_CONFIG = ROOT / "examples" / "accelerate_fsdp.yaml"
MODES = ("fsdp", "ddp", "single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(mode: str, processes: int, mixed_precision: str) -> list[str]:
    """The launcher part of one mode's command line (the training script's arguments follow)."""
    if mode == "single":
        return [sys.executable, str(TRAIN), "--mixed_precision", mixed_precision]
    if mode == "ddp":  # torchrun, as accelerate launch refuses --multi_gpu with one process
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launch += ["--master_port", str(free_port())]
        return [*launch, str(TRAIN), "--mixed_precision", mixed_precision]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    launch += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", mixed_precision]
    return [*launch, "--main_process_port", str(free_port()), str(TRAIN)]


def summarise(log: Path, warmup: int) -> dict[str, float]:
    """Peak memory (MiB, max over the steps) and the median step time (s) after ``warmup`` steps."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if len(records) <= warmup + 1:
        raise SystemExit(f"{log}: {len(records)} steps logged, need more than --warmup + 1 = {warmup + 1}")
    times = [b["time"] - a["time"] for a, b in zip(records[warmup:-1], records[warmup + 1 :], strict=True)]
    return {
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
        "step_s": statistics.median(times),
        "videos_per_s": statistics.median(r["videos_per_s"] for r in records[warmup + 1 :]),
        "final_loss": records[-1]["loss"],
    }


def run(mode: str, args: argparse.Namespace, train_args: list[str]) -> dict[str, float]:
    out = Path(args.output_dir) / mode
    cmd = command(mode, args.num_processes, args.mixed_precision) + ["--output_dir", str(out)]
    cmd += ["--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.steps + 1)]
    cmd += ["--validation_steps", "0", "--seed", str(args.seed), *train_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the script picks gloo on a machine without a visible GPU
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{mode} failed (exit {proc.returncode}): {' '.join(cmd)}")
    result = summarise(out / "train_log.jsonl", args.warmup)
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--num_processes", type=int, default=None, help="default: 1 on cuda, 2 on cpu")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: fsdp ddp (and single at 1)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the step time")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: bf16 on cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/bench_fsdp")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible")
    args.num_processes = args.num_processes or (1 if args.device == "cuda" else 2)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    modes = args.modes or (["fsdp", "ddp", "single"] if args.num_processes == 1 else ["fsdp", "ddp"])
    if "single" in modes and args.num_processes != 1:
        p.error("mode 'single' is one process: use --num_processes 1")
    if args.steps <= args.warmup + 1:
        p.error(f"--steps must exceed --warmup + 1 = {args.warmup + 1}")

    results = {}
    for mode in modes:
        results[mode] = run(mode, args, train_args)
        print(f"{mode}: {json.dumps({k: round(v, 4) for k, v in results[mode].items()})}", flush=True)
    memory = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    setup = f"{args.num_processes} process(es), mixed precision {args.mixed_precision}, {args.steps} steps"
    print(f"\n{args.device}, {setup}:")
    print(f"{'mode':<8}{'peak MiB (' + memory + ')':>28}{'step s (median)':>18}{'videos/s':>10}{'vs ddp':>9}")
    for mode, r in results.items():
        ratio = r["peak_memory_mb"] / results["ddp"]["peak_memory_mb"] if "ddp" in results else float("nan")
        print(f"{mode:<8}{r['peak_memory_mb']:>28.1f}{r['step_s']:>18.3f}{r['videos_per_s']:>10.2f}{ratio:>9.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"config": config, "train_args": train_args, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
