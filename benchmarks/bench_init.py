"""Benchmark of the HOSVD / HOOI initialisers (``tucker_lora.decomposition``, ``tucker_lora.init``) on CPU.

    .venv/bin/python benchmarks/bench_init.py kernel   # one 1280x1280x3x3x3 kernel: ours vs tensorly's default
    .venv/bin/python benchmarks/bench_init.py unet     # every targeted layer of a full-size UNet3DConditionModel
    .venv/bin/python benchmarks/bench_init.py memory   # peak memory: gradient proxy vs plain backward vs training
    .venv/bin/python benchmarks/bench_init.py all

``unet`` builds diffusers' ``UNet3DConditionModel()`` at its default (ModelScope-size) config with random
weights (1.41 B parameters, about 6 GB in float32), adapts the layers ``tucker_lora.testing.default_targets``
selects (the temporal Conv3d and the resnet Conv2d: 132 layers, 755 M weights) at ranks (4, 4, 1, 1, 1),
and times ``init_from_weights`` with HOSVD and HOOI against one forward pass of the UNet on a 16-frame
32x32 latent (batch 1, 77 text tokens). Timings are the best of ``--repeat`` runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

RANKS = (4, 4, 1, 1, 1)


def best_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def sin_max_angle(U: torch.Tensor, V: torch.Tensor) -> float:
    Qu, Qv = torch.linalg.qr(U.double())[0], torch.linalg.qr(V.double())[0]
    return float(torch.linalg.matrix_norm(Qv - Qu @ (Qu.T @ Qv), ord=2))


# ---------------------------------------------------------------------------------------------- kernel
def power_law_kernel(shape, seed: int = 0) -> torch.Tensor:
    """An i.i.d. kernel with singular values decaying as 1/j along o and i (more like a trained weight)."""
    from tucker_lora.decomposition import mode_dot_t

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(shape, generator=g)
    for n in (0, 1):
        d = shape[n]
        Q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        X = mode_dot_t(X, (Q * (1.0 / torch.arange(1, d + 1))) @ Q.T, n)
    return X


def reference_hosvd_factors(X: torch.Tensor) -> list[torch.Tensor]:
    """HOSVD factors in float64 (eigenvectors of each unfolding's float64 Gram): the accuracy reference."""
    factors = []
    for n, r in enumerate(RANKS):
        A = torch.movedim(X, n, 0).reshape(X.shape[n], -1).double()
        factors.append(torch.linalg.eigh(A @ A.T)[1][:, -r:])
    return factors


def bench_kernel(repeat: int) -> list[dict]:
    import tensorly as tl
    from tensorly.decomposition import tucker
    from tensorly.decomposition._tucker import initialize_tucker

    from tucker_lora.decomposition import captured_energy, hooi, hosvd

    shape = (1280, 1280, 3, 3, 3)
    rows = []

    def row(kernel, method, seconds, X, ref, core, factors):
        sins = [sin_max_angle(U, V) for U, V in zip(factors, ref, strict=True)]
        rows.append(
            dict(
                kernel=kernel,
                method=method,
                seconds=seconds,
                sin_channels=max(sins[:2]),
                sin_kernel=max(sins[2:]),
                energy=captured_energy(X, core),
            )
        )

    for kernel, X in (
        ("i.i.d.", torch.randn(shape, generator=torch.Generator().manual_seed(0))),
        ("1/j spectrum", power_law_kernel(shape)),
    ):
        ref = reference_hosvd_factors(X)
        with tl.backend_context("pytorch"):
            t, (core, factors) = best_time(
                lambda X=X: initialize_tucker(
                    X, list(RANKS), list(range(5)), init="svd", svd="truncated_svd", random_state=0
                ),
                1,
            )
            row(kernel, "tensorly HOSVD (its default: full SVD per unfolding)", t, X, ref, core, factors)
            t, (core, factors) = best_time(lambda X=X: tucker(X, rank=list(RANKS)), 1)
            row(kernel, "tensorly tucker (HOOI, its defaults)", t, X, ref, core, factors)
        hosvd(X, RANKS)  # warm-up
        for method in ("auto", "randomized"):
            t, (core, factors) = best_time(lambda X=X, method=method: hosvd(X, RANKS, method=method), repeat)
            row(kernel, f"tucker_lora hosvd, method={method}", t, X, ref, core, factors)
        t, (core, factors) = best_time(lambda X=X: hooi(X, RANKS), repeat)
        row(kernel, "tucker_lora hooi", t, X, ref, core, factors)

    print(
        "\n| kernel 1280x1280x3x3x3, ranks (4,4,1,1,1) | method | seconds "
        "| max sin angle to float64 HOSVD, o/i | same, t/h/w | captured energy |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        hooi_row = "HOOI" in r["method"] or "hooi" in r["method"]  # HOOI moves away from the HOSVD on purpose
        sins = ("", "") if hooi_row else (f"{r['sin_channels']:.1e}", f"{r['sin_kernel']:.1e}")
        print(f"| {r['kernel']} | {r['method']} | {r['seconds']:.2f} | {sins[0]} | {sins[1]} | {r['energy']:.4g} |")
    return rows


# ---------------------------------------------------------------------------------------------- unet
def build_unet():
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    return UNet3DConditionModel().eval()  # default config: ModelScope text-to-video size


def unet_inputs(frames: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(1, 4, frames, size, size, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 77, 1024, generator=g),
    )


def bench_unet(repeat: int) -> list[dict]:
    from peft import get_peft_model

    from tucker_lora import TuckerLoraConfig
    from tucker_lora.init import init_from_weights
    from tucker_lora.testing import default_targets

    start = time.perf_counter()
    unet = build_unet()
    print(f"built UNet3DConditionModel() in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    inputs = unet_inputs(16, 32)
    with torch.no_grad():
        unet(**inputs)  # warm-up
        t_forward, _ = best_time(lambda: unet(**inputs), repeat)
    model = get_peft_model(unet, TuckerLoraConfig(target_modules=default_targets(unet), ranks=RANKS))
    n_layers = len(model.base_model.targeted_module_names)
    rows = [dict(what="one forward, 16x32x32 latent, no grad", seconds=t_forward)]
    for method in ("hosvd", "hooi"):
        t, energies = best_time(lambda method=method: init_from_weights(model, method), repeat)
        rows.append(dict(what=f"init_from_weights, {method}, {n_layers} layers", seconds=t))
    print(f"\n| UNet3DConditionModel() (1.41 B params), {n_layers} targeted layers | seconds | x forward |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['seconds']:.1f} | {r['seconds'] / t_forward:.2f} |")
    return rows


# ---------------------------------------------------------------------------------------------- memory
def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return math.nan


def _memory_child(mode: str, frames: int, size: int, n_batches: int) -> None:
    """One measurement in a fresh process: peak RSS above the loaded, adapted model."""
    from peft import get_peft_model

    from tucker_lora import TuckerLoraConfig, TuckerLoraLayer
    from tucker_lora.init import init_from_gradients
    from tucker_lora.testing import default_targets

    unet = build_unet()
    model = get_peft_model(unet, TuckerLoraConfig(target_modules=default_targets(unet), ranks=RANKS))
    batches = [unet_inputs(frames, size, seed=s) for s in range(n_batches)]
    targets = [
        torch.randn(1, 4, frames, size, size, generator=torch.Generator().manual_seed(100 + s))
        for s in range(n_batches)
    ]

    def loss_fn(m, batch):
        i = next(k for k, b in enumerate(batches) if b is batch)
        return (m(**batch).sample - targets[i]).square().mean()

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_mib("VmRSS")
    start = time.perf_counter()
    if mode == "train":  # one training step's backward with the adapter (base frozen), accumulated over the batches
        for batch in batches:
            loss_fn(model, batch).backward()
    elif mode == "plain":  # the naive proxy: unfreeze the adapted base weights, let autograd accumulate .grad
        layers = [m for m in model.modules() if isinstance(m, TuckerLoraLayer)]
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            layer.get_base_layer().weight.requires_grad_(True)
            layer._disable_adapters = True
        for batch in batches:
            loss_fn(model, batch).backward()
    else:
        init_from_gradients(model, batches, loss_fn, "hooi", progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(mode=mode, peak_above_model_mib=_rss_mib("VmHWM") - base, model_mib=base, seconds=seconds)))


def bench_memory(frames: int, size: int, n_batches: int) -> list[dict]:
    rows = []
    for mode in ("train", "plain", "proxy"):
        cmd = [sys.executable, __file__, "_memory_child", mode, str(frames), str(size), str(n_batches)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    labels = {
        "train": "training backward with the adapter (base frozen)",
        "plain": "plain backward, adapted base weights unfrozen (all .grad held)",
        "proxy": "init_from_gradients (hooi, two passes)",
    }
    print(
        f"\n| UNet3DConditionModel(), {n_batches} batches of {frames}x{size}x{size} "
        "| peak RSS above the loaded model (MiB) | seconds |"
    )
    print("|---|---|---|")
    for r in rows:
        print(f"| {labels[r['mode']]} | {r['peak_above_model_mib']:.0f} | {r['seconds']:.0f} |")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kernel", "unet", "memory", "all"])
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--frames", type=int, default=4, help="memory: latent frames (default 4)")
    parser.add_argument("--size", type=int, default=16, help="memory: latent height and width (default 16)")
    parser.add_argument("--batches", type=int, default=2, help="memory: calibration batches (default 2)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", file=sys.stderr)
    if args.what in ("kernel", "all"):
        bench_kernel(args.repeat)
    if args.what in ("unet", "all"):
        bench_unet(args.repeat)
    if args.what in ("memory", "all"):
        bench_memory(args.frames, args.size, args.batches)


if __name__ == "__main__":
    main()
