"""``tucker_lora.resize_adapter``: re-compressing a trained adapter to rank caps or an energy share.

References: the dense deltas ``get_delta_weight()`` before and after (errors), tensorly's HOOI of the dense
delta (quality at the same ranks), a numpy HOSVD of the dense delta over every smaller rank tuple (the
energy rule's minimality), and peft's save / load in a fresh model (round trip).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import peft
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tucker as tl_tucker
from torch import nn

from adapted_models import layers_of, perturbed
from tucker_lora import TuckerLoraConfig, resize_adapter, save_adapter
from tucker_lora.resize.cli import resize_cli
from tucker_lora.testing import tiny_unet3d
from tucker_lora.tucker import num_params


def adapted(seed: int = 0) -> peft.PeftModel:
    """Three Conv3d (3x3x3, (3,1,1) with r_t pinned, strided with h, w pinned) and a Linear, trained-like
    (random core, every core and factor moved off orthonormality)."""
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Conv3d(4, 6, 3, padding=1),
        nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0)),
        nn.Conv3d(6, 5, 3, stride=(1, 2, 2), padding=1),
        nn.Flatten(2),
        nn.Linear(27, 7),
    )
    pattern = {"1": (5, 4, 0, 1, 1), "2": (4, 4, 3, 0, 0), "4": (5, 6, 1, 1, 1)}
    config = TuckerLoraConfig(
        target_modules=["0", "1", "2", "4"], ranks=(4, 3, 3, 2, 2), rank_pattern=pattern, alpha=0.8, init_weights=False
    )
    return perturbed(base, config, seed=seed + 1)


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.get_delta_weight("default").detach().double() for n, layer in layers_of(model).items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "tucker_lora_" in k}


X = torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def test_energy_one_changes_nothing():
    """Layers at full multilinear rank are left bitwise as they were; where a mode's rank exceeds the product of
    the others' (layer '1': r_o = 5 > 4, layer '4': r_i = 6 > 5), only its directions holding no energy go, and
    the update stays the same."""
    model = adapted()
    before, ranks = adapter_state(model), {n: layer.mode_ranks["default"] for n, layer in layers_of(model).items()}
    old = deltas(model)
    with torch.no_grad():
        out = model(X)
    errors = resize_adapter(model, energy=1.0)
    for name, layer in layers_of(model).items():
        r = ranks[name].ranks
        full = tuple(min(r_n, math.prod(r) // r_n) for r_n in r)  # a generic core's multilinear rank
        assert layer.mode_ranks["default"].ranks == full
        if full == r:
            assert errors[name] == 0.0
            assert all(torch.equal(v, before[k]) for k, v in adapter_state(model).items() if f".{name}." in k)
        else:
            assert errors[name] < 1e-12
            assert float((deltas(model)[name] - old[name]).norm() / old[name].norm()) < 1e-6
    assert {"0", "2"} == {n for n in ranks if errors[n] == 0.0}
    with torch.no_grad():
        torch.testing.assert_close(model(X), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("caps", ((2, 2, 1, 1, 1), (3, 2, 2, 1, 2), (1, 1, 3, 3, 3)))
def test_caps_give_errors_that_match_the_dense_deltas(caps):
    model = adapted()
    old_ranks = {n: layer.mode_ranks["default"] for n, layer in layers_of(model).items()}
    old = deltas(model)
    errors = resize_adapter(model, ranks=caps)
    new = deltas(model)
    for name, layer in layers_of(model).items():
        mr, before = layer.mode_ranks["default"], old_ranks[name]
        assert mr.pinned == before.pinned  # pinned modes stay pinned
        cap = dict(zip("oithw", caps, strict=True))
        assert mr.ranks == tuple(
            1 if p else min(r, cap[m]) for m, r, p in zip(before.modes, before.ranks, before.pinned, strict=True)
        )
        dense = float((new[name] - old[name]).norm() / old[name].norm())
        assert errors[name] == pytest.approx(dense, abs=1e-6), name
        if mr.ranks != before.ranks:
            assert errors[name] > 1e-3
            with tl.backend_context("pytorch"):  # tensorly's HOOI of the dense delta at the same ranks
                core, factors = tl_tucker(old[name], rank=list(mr.ranks), n_iter_max=50, tol=1e-10, init="svd")
                reference = float((tl.tucker_to_tensor((core, factors)) - old[name]).norm() / old[name].norm())
            assert errors[name] <= reference + 1e-4, name
    model(X).sum().backward()  # the resized adapter trains
    assert all(p.grad is not None for n, p in model.named_parameters() if "tucker_lora_" in n and p.requires_grad)


def _hosvd_kept(dW: np.ndarray, ranks: tuple[int, ...]) -> float:
    """Share of ||dW||^2 the truncated HOSVD at ``ranks`` keeps (numpy SVD of each unfolding)."""
    core = dW
    for n, r in enumerate(ranks):
        U = np.linalg.svd(np.moveaxis(dW, n, 0).reshape(dW.shape[n], -1), full_matrices=False)[0][:, :r]
        core = np.moveaxis(np.tensordot(U.T, np.moveaxis(core, n, 0), axes=1), 0, n)
    return float((core**2).sum() / (dW**2).sum())


@pytest.mark.parametrize("energy", (0.8, 0.95, 0.999))
def test_energy_keeps_the_share_with_the_fewest_parameters(energy):
    model = adapted()
    old_ranks = {n: layer.mode_ranks["default"] for n, layer in layers_of(model).items()}
    old = deltas(model)
    errors = resize_adapter(model, energy=energy)
    for name, layer in layers_of(model).items():
        mr, before = layer.mode_ranks["default"], old_ranks[name]
        assert 1 - errors[name] ** 2 >= energy - 1e-9, name
        dW = old[name].numpy()
        free = [n for n, p in enumerate(mr.pinned) if not p]
        dims = [mr.dims[n] for n in free]
        chosen = num_params(dims, [mr.ranks[n] for n in free])
        for ranks in itertools.product(*(range(1, r + 1) for r in before.ranks)):
            if num_params(dims, [ranks[n] for n in free]) < chosen:  # every cheaper tuple keeps less (HOSVD)
                assert _hosvd_kept(dW, ranks) < energy + 1e-9, (name, ranks)
    assert any(layer.mode_ranks["default"] != old_ranks[n] for n, layer in layers_of(model).items())


def test_resized_adapter_saves_and_reloads_bitwise(tmp_path):
    base = tiny_unet3d(0)
    model = perturbed(base, TuckerLoraConfig(ranks=(4, 4, 3, 1, 1), init_weights=False), scale=0.2)
    before = {n: layer.mode_ranks["default"] for n, layer in layers_of(model).items()}
    errors = resize_adapter(model, energy=0.9)
    assert max(errors.values()) <= math.sqrt(0.1) + 1e-9
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(saved["rank_pattern"]) == len(errors)
    reloaded = peft.PeftModel.from_pretrained(tiny_unet3d(0), tmp_path / "adapter")
    ours, theirs = adapter_state(model), adapter_state(reloaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ranks = {n: layer.mode_ranks["default"] for n, layer in layers_of(model).items()}
    assert {n: layer.mode_ranks["default"] for n, layer in layers_of(reloaded).items()} == ranks
    assert sum(r.ranks != before[n].ranks for n, r in ranks.items()) > len(ranks) // 2


def test_dtype_and_requires_grad_are_kept():
    model = adapted()
    model.base_model.model[0].tucker_lora_core["default"].requires_grad_(False)
    layer = layers_of(model)["1"]
    for p in (layer.tucker_lora_core["default"], *layer.tucker_lora_U_o.values(), *layer.tucker_lora_U_i.values()):
        p.data = p.data.to(torch.float64)
    resize_adapter(model, ranks=(2, 2, 2, 2, 2))
    assert not model.base_model.model[0].tucker_lora_core["default"].requires_grad
    assert model.base_model.model[0].tucker_lora_U_o["default"].requires_grad
    assert layer.tucker_lora_core["default"].dtype == torch.float64 and layer.tucker_lora_core["default"].shape[0] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    (
        (dict(ranks=(2, 2, 0, 1, 1)), "layer '0': ranks r_t = 0 would pin a trained mode"),
        (dict(ranks=(0, 2, 1, 1, 1)), "r_o = 0"),
        (dict(ranks=(2, 2, 1)), "5 entries"),
        (dict(ranks=(2, -1, 1, 1, 1)), "r_i must be >= 0"),
        (dict(energy=0.0), r"energy .* in \(0, 1\]"),
        (dict(energy=1.5), r"energy .* in \(0, 1\]"),
        (dict(energy=float("nan")), "energy must be a number"),
        (dict(energy=True), "energy must be a number"),
        (dict(), "needs ranks"),
        (dict(energy=0.9, adapter_name="other"), "adapter 'other'"),
    ),
)
def test_bad_input_is_named_and_changes_nothing(kwargs, message):
    model = adapted()
    before = adapter_state(model)
    with pytest.raises(ValueError, match=message):
        resize_adapter(model, **kwargs)
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_merged_adapter_is_refused():
    model = adapted()
    model.base_model.model[2].merge()
    with pytest.raises(ValueError, match="layer '2': adapter 'default' is merged"):
        resize_adapter(model, energy=0.9)


def test_command_line_resizes_a_saved_adapter(tmp_path, capsys):
    base = tiny_unet3d(0)
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, TuckerLoraConfig(ranks=(4, 4, 3, 1, 1), init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    args = [str(tmp_path / "adapter"), str(tmp_path / "small"), "--ranks", "2", "2", "1", "1", "1"]
    assert resize_cli(args + ["--base", str(tmp_path / "base")]) == 0
    assert "wrote the resized adapter" in capsys.readouterr().out
    reloaded = peft.PeftModel.from_pretrained(tiny_unet3d(0), tmp_path / "small")
    assert {layer.mode_ranks["default"].ranks[:3] for layer in layers_of(reloaded).values()} == {(2, 2, 1)}
    assert resize_cli([str(tmp_path / "nothing"), str(tmp_path / "x"), "--energy", "0.5"]) == 2
    assert "is not a Tucker-LoRA adapter folder" in capsys.readouterr().err
