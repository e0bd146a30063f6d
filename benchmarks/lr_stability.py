"""The largest stable learning rate of Tucker-LoRA and of peft LoRA at the same parameter budget.

    python benchmarks/lr_stability.py                       # tiny UNet3D, SGD and AdamW, 2 seeds (docs/stability.md)
    python benchmarks/lr_stability.py layer --until_blowup  # one Conv3d, least squares: where each method blows up
    python benchmarks/lr_stability.py peft-toy              # peft's test model: the lr-0.5 SGD case, step by step

``unet`` (default): the tiny diffusers ``UNet3DConditionModel`` (``tucker_lora.testing.tiny_unet3d``) with its
default targets (temporal Conv3d + resnet Conv2d), Tucker-LoRA at ``--ranks`` and peft LoRA at the rank with the
closest parameter count (``matched_lora_rank``; ``lora_alpha = r``, so both apply ``1 * dW``), both at their
default initialisation. Each run trains one fixed batch (noise prediction with diffusers' DDPM noise, the
loss of the training scripts) for ``--steps`` steps from the same start, in eval mode (the UNet's
temporal convolutions have a dropout of 0.1; without it every run is deterministic); a run is *stable* when
every loss is finite and at most ``--blowup`` (1) times the first, and the last is below the first (training
never leaves the loss worse than it started). The learning
rate goes up by ``--factor`` from ``--start_sgd`` / ``--start_adamw`` until a run is not stable; the table
gives the largest stable one per method,
optimizer and seed (values per seed), the loss there, and the lr (of those tried) with the lowest last loss.

``layer``: one ``Conv3d(64, 64, 3)`` fitted by least squares to the output of a perturbed copy of itself
(``W + 0.1 * |W| * D / |D|``, ``D`` Gaussian), Tucker-LoRA ``--layer_ranks`` against peft LoRA at the matched
rank; the loss is a quadratic in ``dW``, so a run that is not stable has blown up, and what differs between the
methods is their parametrisation of ``dW`` alone (a product of 6 factors against 2).

``peft-toy``: peft's ``ModelConv3D`` test model (Conv3d 5->10 with a 3x3x3 kernel, then a Linear; inputs
``arange(90)``), 3 SGD steps at lr 0.5 on ``y.sum()`` as peft's ``test_parameters_after_loading_model``
does: the loss and largest parameter after each step, for Tucker-LoRA (4, 3, 2, 2, 2) and peft LoRA (r = 8).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from tucker_lora import TuckerLoraConfig
from tucker_lora.testing import example_inputs, model_output, tiny_unet3d
from tucker_lora.video.adapters import matched_lora_rank, plan_adapter

#: A run blew up when a loss is not finite or above this times the first.
BLOWUP = 100.0
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
}


@dataclass
class Run:
    lr: float
    losses: list[float]
    stable: bool


def training_batch(unet: nn.Module, batch: int, frames: int, seed: int) -> tuple[dict, torch.Tensor]:
    """One fixed noise-prediction batch: noisy latents at random DDPM timesteps, their text, and the noise."""
    from diffusers import DDPMScheduler

    inputs = example_inputs(unet, batch=batch, frames=frames, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(inputs["sample"].shape, generator=g)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inputs["sample"] = scheduler.add_noise(inputs["sample"], noise, inputs["timestep"])
    return inputs, noise


def train(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], optimizer: str, lr: float, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params, lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(loss_fn(model).item())
    return losses


def is_stable(losses: list[float], blowup: float) -> bool:
    first = losses[0]
    return all(math.isfinite(v) and v <= blowup * first for v in losses) and losses[-1] < first


def largest_stable_lr(make: Callable[[], nn.Module], loss_fn, optimizer: str, args) -> tuple[Run, Run, list[Run]]:
    """Raise the lr by ``args.factor`` from ``args.start_<optimizer>`` until a run is not stable, or with
    ``args.until_blowup`` until a run blows up (at most ``args.max_runs`` runs). Returns the largest
    stable run below the first unstable one, the run with the lowest last loss among those, and all runs."""
    runs, lr = [], getattr(args, f"start_{optimizer}")
    for _ in range(args.max_runs):
        losses = train(make(), loss_fn, optimizer, lr, args.steps)
        runs.append(Run(lr, losses, is_stable(losses, args.blowup)))
        if blew_up(losses) or not (runs[-1].stable or args.until_blowup):
            break
        lr *= args.factor
    stable = [r for r in runs if r.stable]
    if not stable:
        raise SystemExit(f"{optimizer}: not stable even at lr {runs[0].lr:g} ({runs[0].losses}); start lower")
    if runs[-1].stable:
        raise SystemExit(f"{optimizer}: still stable at lr {runs[-1].lr:g} after --max_runs; raise it")
    first_unstable = next(r for r in runs if not r.stable)
    below = [r for r in stable if r.lr < first_unstable.lr]
    return below[-1], min(below, key=lambda r: r.losses[-1]), runs


def blew_up(losses: list[float]) -> bool:
    """A loss not finite or above ``BLOWUP`` times the first."""
    return not all(math.isfinite(v) and v <= BLOWUP * losses[0] for v in losses)


def blowup_lr(runs: list[Run]) -> str:
    """The smallest lr tried that blew up ("-" if none did)."""
    lrs = [r.lr for r in runs if blew_up(r.losses)]
    return f"{min(lrs):.3g}" if lrs else "-"


def unet_table(args) -> None:
    torch.set_num_threads(args.threads)
    base = tiny_unet3d(seed=0)
    plans = {m: plan_adapter(m, base, tuple(args.ranks)) for m in ("tucker", "lora")}
    names = {
        "tucker": f"Tucker-LoRA {tuple(args.ranks)}",
        "lora": f"peft LoRA r={plans['lora'].lora_rank}",
    }
    print(
        f"tiny UNet3D, {len(plans['tucker'].layers)} target layers; trainable parameters: "
        + ", ".join(f"{names[m]} {p.num_params}" for m, p in plans.items())
    )
    print(
        f"{args.steps} steps on one batch ({args.batch} x {args.frames} frames), lr x{args.factor:g} from "
        f"{args.start_sgd:g} (SGD) / {args.start_adamw:g} (AdamW); stable: finite, <= {args.blowup:g}x the first "
        "loss, last < first\n"
    )
    rows = {}
    for optimizer in args.optimizers:
        for method, plan in plans.items():
            for seed in args.seeds:
                inputs, noise = training_batch(base, args.batch, args.frames, seed)

                def loss_fn(model, inputs=inputs, noise=noise):
                    return F.mse_loss(model_output(model, inputs), noise)

                def make(plan=plan, seed=seed):
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        return get_peft_model(copy.deepcopy(base), copy.deepcopy(plan.config)).eval()

                best, lowest, runs = largest_stable_lr(make, loss_fn, optimizer, args)
                rows[optimizer, method, seed] = best, lowest, blowup_lr(runs)
                trail = ", ".join(f"{r.lr:.3g}: {r.losses[-1]:.4g}{'' if r.stable else ' (unstable)'}" for r in runs)
                print(f"  {optimizer} {names[method]} seed {seed}: {trail}", flush=True)
    print_table({(o, names[m], s): v for (o, m, s), v in rows.items()}, args)


def layer_table(args) -> None:
    torch.set_num_threads(args.threads)
    rows = {}
    for seed in args.seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = nn.Sequential(nn.Conv3d(64, 64, 3, padding=1))
            x = torch.randn(2, 64, 4, 8, 8)
            target_layer = copy.deepcopy(base[0])
            with torch.no_grad():
                D = torch.randn_like(target_layer.weight)
                target_layer.weight += 0.1 * target_layer.weight.norm() * D / D.norm()
                target = target_layer(x)
        ranks = tuple(args.layer_ranks)
        rank = matched_lora_rank(base, ["0"], ranks)
        configs = {
            f"Tucker-LoRA {ranks}": TuckerLoraConfig(target_modules=["0"], ranks=ranks),
            f"peft LoRA r={rank}": LoraConfig(target_modules=["0"], r=rank, lora_alpha=rank),
        }
        for optimizer in args.optimizers:
            for name, config in configs.items():

                def make(config=config, seed=seed, base=base):
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        return get_peft_model(copy.deepcopy(base), copy.deepcopy(config))

                def loss_fn(model, x=x, target=target):
                    return F.mse_loss(model(x), target)

                count = sum(p.numel() for p in make().parameters() if p.requires_grad)
                if seed == args.seeds[0]:
                    print(f"  {optimizer} {name}: first step {first_step_size(make, loss_fn, optimizer)}")
                best, lowest, runs = largest_stable_lr(make, loss_fn, optimizer, args)
                rows[optimizer, f"{name} ({count} parameters)", seed] = best, lowest, blowup_lr(runs)
                trail = ", ".join(f"{r.lr:.3g}: {r.losses[-1]:.4g}{'' if r.stable else ' (unstable)'}" for r in runs)
                print(f"  {optimizer} {name} seed {seed}: {trail}", flush=True)
    print_table(rows, args)


def first_step(make: Callable[[], nn.Module], loss_fn, optimizer: str, lr: float = 1e-6) -> float:
    """How far one step at a small ``lr`` moves the layer's update ``dW``: ``|d dW| / (lr |dL/dW|)`` for SGD
    (1 for plain gradient descent on W), ``|d dW| / lr`` for AdamW (whose first step is ``lr`` per parameter)."""
    model = make()
    layer = model.base_model.model[0]  # the adapted layer of an nn.Sequential
    weight = layer.get_base_layer().weight
    before = layer.get_delta_weight("default").detach().double()
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad], lr)
    weight.requires_grad_(True)
    loss = loss_fn(model)
    loss.backward()
    grad = weight.grad.double().norm().item()
    weight.requires_grad_(False)
    opt.step()
    moved = (layer.get_delta_weight("default").detach().double() - before).norm().item()
    return moved / (lr * grad) if optimizer == "sgd" else moved / lr


def first_step_size(make: Callable[[], nn.Module], loss_fn, optimizer: str) -> str:
    size = first_step(make, loss_fn, optimizer)
    return f"|d dW| / (lr |dL/dW|) = {size:.3g}" if optimizer == "sgd" else f"|d dW| / lr = {size:.3g}"


def print_table(rows: dict, args) -> None:
    """The markdown table of ``rows[optimizer, method, seed] = (largest stable run, run with the lowest loss,
    smallest lr that blew up)``; each cell lists the seeds' values."""
    print(
        "\n| optimizer | method | largest stable lr | loss there (first -> last) | lr of the lowest last loss | "
        f"lowest last loss | smallest lr that blew up (a loss > {BLOWUP:g}x the first, or not finite) |"
    )
    print("|---|---|---|---|---|---|---|")
    methods = list(dict.fromkeys(m for _, m, _ in rows))
    for optimizer in args.optimizers:
        for method in methods:
            cells = [rows[optimizer, method, s] for s in args.seeds]
            largest = ", ".join(f"{b.lr:.3g}" for b, _, _ in cells)
            there = ", ".join(f"{b.losses[0]:.4g} -> {b.losses[-1]:.4g}" for b, _, _ in cells)
            at = ", ".join(f"{low.lr:.3g}" for _, low, _ in cells)
            low = ", ".join(f"{low.losses[-1]:.4g}" for _, low, _ in cells)
            blowup = ", ".join(n for _, _, n in cells)
            print(f"| {optimizer} | {method} | {largest} | {there} | {at} | {low} | {blowup} |")
    tucker, lora = methods[0], methods[-1]
    for optimizer in args.optimizers:
        ratios = [rows[optimizer, tucker, s][0].lr / rows[optimizer, lora, s][0].lr for s in args.seeds]
        print(f"\n{optimizer}: Tucker's largest stable lr / LoRA's: median {statistics.median(ratios):.3g}")


class ModelConv3D(nn.Module):
    """peft's ``ModelConv3D`` (tests/test_custom_models.py): Conv3d(5, 10, 3) -> ReLU -> Linear(10, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = torch.stack([X.float()] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        X = torch.relu(self.conv3d(X)).flatten(1)
        return F.log_softmax(self.lin0(X), dim=-1)


def peft_toy(args) -> None:
    X = torch.arange(90).view(9, 10)
    configs = {
        "Tucker-LoRA (4, 3, 2, 2, 2)": TuckerLoraConfig(target_modules=["conv3d", "lin0"], ranks=(4, 3, 2, 2, 2)),
        "peft LoRA r=8": LoraConfig(target_modules=["conv3d", "lin0"]),
    }
    print(f"peft's ModelConv3D, X = arange(90), SGD lr {args.lr:g} on y.sum(), seed 0")
    print("| method | step | loss before the step | largest abs(parameter) after the step |")
    print("|---|---|---|---|")
    for name, config in configs.items():
        torch.manual_seed(0)
        model = get_peft_model(ModelConv3D(), config).train()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        for step in range(1, args.toy_steps + 1):
            opt.zero_grad()
            loss = model(X).sum()
            loss.backward()
            opt.step()
            top = max(p.detach().abs().max().item() for p in model.parameters() if p.requires_grad)
            print(f"| {name} | {step} | {loss.item():.4g} | {top:.3g} |")
        with torch.no_grad():
            print(f"| {name} | after | {model(X).sum().item():.4g} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="unet", choices=["unet", "layer", "peft-toy"])
    parser.add_argument("--ranks", type=int, nargs=5, default=[4, 4, 1, 1, 1])
    parser.add_argument("--layer_ranks", type=int, nargs=5, default=[8, 8, 3, 3, 3])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=sorted(OPTIMIZERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--start_sgd", type=float, default=1.0, help="first SGD learning rate tried")
    parser.add_argument("--start_adamw", type=float, default=1e-4, help="first AdamW learning rate tried")
    parser.add_argument("--factor", type=float, default=2.0, help="learning-rate step")
    parser.add_argument("--max_runs", type=int, default=30)
    parser.add_argument("--blowup", type=float, default=1.0, help="a loss above this times the first is unstable")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--until_blowup", action="store_true", help="go on past the first unstable lr until a run blows up"
    )
    parser.add_argument("--lr", type=float, default=0.5, help="peft-toy: the SGD learning rate")
    parser.add_argument("--toy_steps", type=int, default=3)
    args = parser.parse_args()
    {"unet": unet_table, "layer": layer_table, "peft-toy": peft_toy}[args.what](args)


if __name__ == "__main__":
    main()
