"""The lr-0.5 case of peft's test_parameters_after_loading_model, as docs/stability.md explains it."""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from tucker_lora import TuckerLoraConfig

ROOT = Path(__file__).resolve().parents[1]


def test_peft_lr_half_case_diverges_for_peft_lora_too():
    """peft's test_parameters_after_loading_model at lr 0.5 (docs/stability.md): the loss, sum(log_softmax),
    has no minimum, and peft LoRA's own loss is non-finite after the 3 steps too; at lr 1e-3 both stay finite."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from lr_stability import ModelConv3D
    finally:
        sys.path.pop(0)
    X = torch.arange(90).view(9, 10)
    configs = [
        TuckerLoraConfig(target_modules=["conv3d", "lin0"], ranks=(4, 3, 2, 2, 2)),
        LoraConfig(target_modules=["conv3d", "lin0"]),
    ]
    for lr, config in itertools.product((0.5, 1e-3), configs):
        torch.manual_seed(0)
        model = get_peft_model(ModelConv3D(), copy.deepcopy(config))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(3):
            opt.zero_grad()
            model(X).sum().backward()
            opt.step()
        with torch.no_grad():
            finite = bool(torch.isfinite(model(X).sum()))
        assert finite == (lr == 1e-3), (lr, type(config).__name__)


def test_first_sgd_step_is_the_gradient_projected_onto_the_adapter():
    """docs/stability.md's first-step sizes: one SGD step from the default init moves dW by lr * P(G), P the
    projection onto the factors' subspaces (Tucker-LoRA), and by lr * G A^T A (peft LoRA, s = 1); the
    benchmark's ``first_step`` equals |P(G)| / |G| computed here with tensorly."""
    import tensorly as tl

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from lr_stability import first_step
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv3d(6, 5, 3, padding=1))
    x, target = torch.randn(2, 6, 3, 4, 4), torch.randn(2, 5, 3, 4, 4)
    weight = base[0].weight.detach().clone().requires_grad_(True)
    G = torch.autograd.grad(((base[0]._conv_forward(x, weight, base[0].bias) - target) ** 2).mean(), weight)[0]

    def loss_fn(model):
        return ((model(x) - target) ** 2).mean()

    for config in (
        TuckerLoraConfig(target_modules=["0"], ranks=(3, 2, 2, 1, 2)),
        LoraConfig(target_modules=["0"], r=2, lora_alpha=2),
    ):

        def make(config=config):
            torch.manual_seed(1)
            return get_peft_model(copy.deepcopy(base), copy.deepcopy(config))

        layer = make().base_model.model[0]
        G64 = G.double()
        if isinstance(config, TuckerLoraConfig):
            with tl.backend_context("pytorch"):
                P = [U.detach().double() @ U.detach().double().T for U in layer.factors("default")]
                moved = tl.tenalg.multi_mode_dot(G64, P)
        else:
            A = layer.lora_A["default"].weight.detach().double().reshape(2, -1)
            moved = G64.reshape(5, -1) @ A.T @ A
        want = moved.norm().item() / G64.norm().item()
        assert abs(first_step(make, loss_fn, "sgd") - want) <= 1e-4 * want, type(config).__name__
