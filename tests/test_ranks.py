"""``tucker_lora.allocate_ranks``: per-layer, per-mode ranks under a parameter budget.

References: numpy SVDs of the unfoldings and tensorly's mode products (spectra, captured energy), the
parameter count peft reports for the adapted model (the budget), planted teacher-student models whose
proxies have known multilinear ranks (where the ranks go), and a hand-written Proposition 1.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from tensorly.tenalg import multi_mode_dot
from torch import nn

import tucker_lora
from tucker_lora import TuckerLoraLayer, allocate_ranks
from tucker_lora.ranks import greedy_ranks, mode_spectra, weight_gradients
from tucker_lora.testing import example_inputs, model_output, tiny_conv3d_net, tiny_unet3d
from tucker_lora.tucker import MODES, centre_tap, mode_names, reconstruct

DOC = Path(__file__).resolve().parents[1] / "docs" / "rank-allocation.md"


# ---------------------------------------------------------------------------------------------- helpers
def prop1(dims, ranks5) -> int:
    """Proposition 1 by hand: ``sum_n d_n r_n + prod_n r_n`` over the modes of the layer that are not pinned."""
    r = dict(zip(MODES, ranks5, strict=True))
    kept = [(d, min(r[m], d)) for m, d in zip(mode_names(len(dims)), dims, strict=True) if r[m] > 0]
    return sum(d * k for d, k in kept) + math.prod(k for _, k in kept)


def planted(shape, ranks5, g: torch.Generator, norm: float = 1.0) -> torch.Tensor:
    """A tensor of multilinear rank ``ranks5`` (paper order; 0 on a kernel mode: all of it on the centre tap)."""
    r = dict(zip(MODES, ranks5, strict=True))
    factors, core_shape = [], []
    for mode, d in zip(mode_names(len(shape)), shape, strict=True):
        if r[mode] == 0:
            factors.append(centre_tap(d, dtype=torch.float64))
            core_shape.append(1)
        else:
            factors.append(torch.linalg.qr(torch.randn(d, r[mode], generator=g, dtype=torch.float64))[0])
            core_shape.append(r[mode])
    X = reconstruct(torch.randn(*core_shape, generator=g, dtype=torch.float64), factors)
    return (X * norm / X.norm()).float()


#: name: (layer builder, planted ranks); a kernel mode planted at 0 holds its energy on the centre tap, one
#: planted at 1 on a random (off-centre) direction; the temporal conv's size-1 h, w stay pinned.
SPECS = {
    "video": (lambda: nn.Conv3d(5, 6, 3), (3, 2, 1, 2, 0)),
    "temporal": (lambda: nn.Conv3d(6, 6, (3, 1, 1)), (2, 2, 2, 0, 0)),
    "frame": (lambda: nn.Conv2d(4, 8, 3), (4, 2, 0, 0, 2)),
    "wave": (lambda: nn.Conv1d(4, 5, 3), (2, 2, 0, 0, 1)),
    "head": (lambda: nn.Linear(6, 7), (3, 3, 0, 0, 0)),
}
NORMS = {"video": 1.0, "temporal": 2.0, "frame": 3.0, "wave": 0.5, "head": 1.5}


class Branches(nn.Module):
    """Independent layers, each fed its own input; modules registered in the order given."""

    def __init__(self, order=None, specs=SPECS) -> None:
        super().__init__()
        for name in order or specs:
            self.add_module(name, specs[name][0]())

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name, x in inputs.items()}


def whitened_inputs(layer: nn.Module, g: torch.Generator) -> torch.Tensor:
    """Kernel-sized inputs (one output position each) whose flattened rows are orthonormal: summed over the
    batch, the patch covariance is the identity, so the regression gradient is exactly ``-delta``."""
    n = math.prod(layer.weight.shape[1:])
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()
    return Q.reshape(n, *layer.weight.shape[1:])


def teacher_student(seed: int = 0, norms=NORMS, specs=SPECS):
    """A student, calibration batches and a loss whose gradient w.r.t. each weight is minus a planted delta.

    The teacher is the student with ``W + delta`` per layer; the loss is ``0.5 * ||student(x) - teacher(x)||^2``
    over whitened inputs, split into two batches (the proxy is their sum)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = Branches(specs=specs)
    layers = {n: getattr(student, n) for n in specs}
    deltas = {n: planted(tuple(m.weight.shape), specs[n][1], g, norms[n]) for n, m in layers.items()}
    inputs = {n: whitened_inputs(m, g) for n, m in layers.items()}
    with torch.no_grad():
        targets = {n: _forward(m, inputs[n], m.weight + deltas[n]) for n, m in layers.items()}
    batches = [{n: (x[i::2], targets[n][i::2]) for n, x in inputs.items()} for i in range(2)]
    return student, batches, deltas


def _forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def regression(model: nn.Module, batch) -> torch.Tensor:
    out = model({n: xy[0] for n, xy in batch.items()})
    return sum(0.5 * (out[n] - xy[1]).square().sum() for n, xy in batch.items())


def planted_budget(specs=SPECS) -> int:
    shapes = {n: tuple(b().weight.shape) for n, (b, _) in specs.items()}
    return sum(prop1(shapes[n], r) for n, (_, r) in specs.items())


def peft_ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each adapted layer's ranks as peft built them (pinned modes as 0), by layer name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TuckerLoraLayer):
            mr = module.mode_ranks["default"]
            by_mode = {m: 0 if p else r for m, r, p in zip(mr.modes, mr.ranks, mr.pinned, strict=True)}
            out[name.removeprefix("base_model.model.")] = tuple(by_mode.get(m, 0) for m in MODES)
    return out


def check_budget(model: nn.Module, allocation, budget: int, max_ranks=(16, 16, 3, 3, 3)) -> int:
    """Acceptance 1 through peft: at most ``budget`` trainable parameters, and fewer by less than the largest
    (here: the smallest) one-mode step still open. Returns the count."""
    peft_model = get_peft_model(copy.deepcopy(model), allocation.to_config())
    count = peft_model.get_nb_trainable_parameters()[0]
    assert count == allocation.num_params <= budget
    assert peft_ranks(peft_model) == {n: a.ranks for n, a in allocation.layers.items()}  # every key hits its layer
    caps = dict(zip(MODES, max_ranks, strict=True))
    steps = []
    for a in allocation.layers.values():
        for mode, d in zip(mode_names(len(a.dims)), a.dims, strict=True):
            r = dict(zip(MODES, a.ranks, strict=True))
            if r[mode] < min(d, caps[mode]) and not (mode in "thw" and d == 1):
                up = dict(r, **{mode: r[mode] + 1})
                steps.append(prop1(a.dims, tuple(up[m] for m in MODES)) - prop1(a.dims, a.ranks))
    if steps:
        assert budget - count < min(steps) <= max(steps)
    return count


# ---------------------------------------------------------------------------------------------- spectra
@pytest.mark.parametrize(
    "shape, ranks",
    [((7, 5, 3, 3, 3), (3, 2, 0, 1, 2)), ((6, 4, 3, 3), (2, 3, 0, 0, 1)), ((9, 6), (4, 2, 0, 0, 0))],
)
def test_spectra_and_captured_energy_match_numpy_and_tensorly(shape, ranks):
    X = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = mode_spectra(X, (5, 5, 3, 3, 3))
    x = X.numpy()
    assert s.energy == pytest.approx(float((x**2).sum()), rel=1e-12)
    layer_ranks = []
    factors = []
    for n, mode in enumerate(mode_names(len(shape))):
        unfolding = np.moveaxis(x, n, 0).reshape(shape[n], -1)
        U, sv, _ = np.linalg.svd(unfolding, full_matrices=False)
        k = min(shape[n], 5 if mode in "oi" else 3)
        np.testing.assert_allclose(s.eigenvalues[n], sv[:k] ** 2, rtol=1e-10)
        r = dict(zip(MODES, ranks, strict=True))[mode]
        layer_ranks.append(r)
        if r == 0:  # pinned: the centre tap
            factors.append(np.eye(shape[n])[:, [shape[n] // 2]])
        else:
            factors.append(U[:, :r])
    tl.set_backend("numpy")
    projected = multi_mode_dot(x, factors, transpose=True)
    assert s.captured(layer_ranks) == pytest.approx(float((projected**2).sum()), rel=1e-9)


def test_spectra_of_a_float32_proxy_in_chunks(monkeypatch):
    """A float32 proxy: Grams summed chunk by chunk in float64 equal float64 numpy."""
    import tucker_lora.ranks as ranks

    monkeypatch.setattr(ranks, "_CHUNK", 50)  # many chunks, across both loops
    X = torch.randn(6, 5, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    s = mode_spectra(X)
    x = X.double().numpy()
    for n in range(5):
        unfolding = np.moveaxis(x, n, 0).reshape(X.shape[n], -1)
        expected = np.linalg.svd(unfolding, compute_uv=False) ** 2
        np.testing.assert_allclose(s.eigenvalues[n], expected[: len(s.eigenvalues[n])], rtol=1e-9)
    assert [len(v) for v in s.eigenvalues] == [6, 5, 3, 3, 3]


# ---------------------------------------------------------------------------------------------- acceptance 3
def test_gradient_proxy_puts_the_ranks_where_they_were_planted():
    student, batches, deltas = teacher_student()
    grads = weight_gradients(student, {n: getattr(student, n).weight for n in SPECS}, batches, regression)
    for n, delta in deltas.items():  # the setup: the proxy is exactly minus the planted update
        torch.testing.assert_close(grads[n], -delta, atol=1e-5, rtol=0)
    budget = planted_budget()
    allocation = allocate_ranks(student, budget, list(SPECS), "gradient", batches, regression)
    assert {n: a.ranks for n, a in allocation.layers.items()} == {n: r for n, (_, r) in SPECS.items()}
    assert all(a.captured == pytest.approx(1.0, abs=1e-6) for a in allocation.layers.values())
    check_budget(student, allocation, budget)

    # more budget: the planted ranks are reached first, the rest is spent on top of them
    more = allocate_ranks(student, budget + 60, list(SPECS), "gradient", batches, regression)
    for name, (_, r) in SPECS.items():
        assert all(a >= b for a, b in zip(more.layers[name].ranks, r, strict=True)), name
    check_budget(student, more, budget + 60)


@st.composite
def planted_layers(draw):
    """1 to 3 layers of random order and shape (kernel taps 1, 3 or 5), each with valid planted ranks."""
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        order = draw(st.integers(2, 5))
        dims = [draw(st.integers(2, 10)) for _ in range(2)] + [
            draw(st.sampled_from([1, 3, 5])) for _ in range(order - 2)
        ]
        ranks = [draw(st.integers(1, min(d, 6))) for d in dims[:2]]
        ranks += [draw(st.integers(0, min(d, 3))) if d > 1 else 0 for d in dims[2:]]
        sizes = [max(r, 1) for r in ranks]
        if any(r > math.prod(sizes) // sizes[n] for n, r in enumerate(ranks)):  # not a multilinear rank
            continue
        by_mode = dict(zip(mode_names(order), ranks, strict=True))
        layers.append((tuple(dims), tuple(by_mode.get(m, 0) for m in MODES), draw(st.sampled_from([0.5, 1.0, 4.0]))))
    return layers


@settings(max_examples=30, deadline=None)
@given(planted_layers(), st.integers(0, 2**16))
def test_planted_ranks_are_found_at_their_budget_for_any_shapes(layers, seed):
    g = torch.Generator().manual_seed(seed)
    spectra = {f"l{i}": mode_spectra(planted(d, r, g, norm), (6, 6, 3, 3, 3)) for i, (d, r, norm) in enumerate(layers)}
    want = {f"l{i}": r for i, (_, r, _) in enumerate(layers)}
    budget = sum(prop1(d, r) for d, r, _ in layers)
    for normalise in ("total", "layer"):
        assert greedy_ranks(spectra, budget, (6, 6, 3, 3, 3), normalise) == want


def test_gradient_proxy_weighs_layers_by_their_share_of_the_loss():
    """Two layers planted alike, one with 4x the gradient: under a tight budget it gets the larger adapter."""
    specs = {n: (lambda: nn.Conv2d(4, 8, 3), (4, 2, 0, 2, 2)) for n in ("a", "b")}
    for big in ("a", "b"):  # either name, so the tie-break is not what decides
        student, batches, _ = teacher_student(1, {n: 4.0 if n == big else 1.0 for n in specs}, specs)
        allocation = allocate_ranks(student, planted_budget(specs) // 2, ["a", "b"], "gradient", batches, regression)
        small = "a" if big == "b" else "b"
        assert allocation.layers[big].num_params > allocation.layers[small].num_params


def test_weight_proxy_puts_the_ranks_where_they_were_planted_and_ignores_each_layers_scale():
    g = torch.Generator().manual_seed(5)
    model = Branches()
    with torch.no_grad():
        for name, (_, r) in SPECS.items():
            layer = getattr(model, name)
            layer.weight.copy_(planted(tuple(layer.weight.shape), r, g, NORMS[name]))
    budget = planted_budget()
    allocation = allocate_ranks(model, budget, list(SPECS), "weight")
    assert {n: a.ranks for n, a in allocation.layers.items()} == {n: r for n, (_, r) in SPECS.items()}
    check_budget(model, allocation, budget)

    # per-layer normalisation: scaling one layer's weight (by a power of two, exactly) changes nothing
    tight = allocate_ranks(model, budget * 2 // 3, list(SPECS), "weight")
    with torch.no_grad():
        model.frame.weight.mul_(64.0)
    assert allocate_ranks(model, budget * 2 // 3, list(SPECS), "weight") == tight


# ---------------------------------------------------------------------------------------------- acceptance 1
@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet3d()


@pytest.fixture(scope="module")
def unet_targets(unet) -> list[str]:
    """The layers peft adapts with the default ``TuckerLoraConfig()`` (target_modules=None)."""
    return get_peft_model(copy.deepcopy(unet), tucker_lora.TuckerLoraConfig()).base_model.targeted_module_names


def minimum(model: nn.Module, names: list[str]) -> int:
    """The smallest budget by hand: (1, 1, 0, 0, 0) on every target, ``O + I + 1`` parameters each."""
    layers = dict(model.named_modules())
    return sum(layers[n].weight.shape[0] + layers[n].weight.shape[1] + 1 for n in names)


@pytest.mark.parametrize("budget", ["minimum + 1", 8000, 25000, 10**7])
def test_budget_holds_on_a_video_unet_weight_proxy(unet, unet_targets, budget):
    budget = minimum(unet, unet_targets) + 1 if budget == "minimum + 1" else budget
    allocation = allocate_ranks(unet, budget, proxy="weight")
    check_budget(unet, allocation, budget)
    # default targets as TuckerLoraConfig resolves them; size-1 kernel modes stay pinned
    assert set(allocation.layers) == set(unet_targets)
    for a in allocation.layers.values():
        r = dict(zip(mode_names(len(a.dims)), a.dims, strict=True))
        assert all(a.ranks[MODES.index(m)] == 0 for m, d in r.items() if m in "thw" and d == 1)


def test_budget_holds_with_the_gradient_proxy():
    model = tiny_conv3d_net()
    batches = [example_inputs(model, batch=1, frames=2, seed=s) for s in range(2)]

    def loss_fn(m, b):
        return (m(**b) - torch.randn_like(b["x"])).square().mean()

    targets = ["conv_in", "conv1", "conv2", "downsample", "upsample", "conv_out"]
    for budget in (3000, 9000):
        allocation = allocate_ranks(model, budget, targets, "gradient", batches, loss_fn, (8, 8, 3, 3, 3))
        check_budget(model, allocation, budget, (8, 8, 3, 3, 3))
        assert len(allocation) == 8


def test_a_budget_below_the_smallest_adapter_is_an_error_naming_the_minimum(unet, unet_targets):
    least = minimum(unet, unet_targets)
    with pytest.raises(ValueError, match=f"below the smallest adapter on these 48 layers.* need {least} trainable"):
        allocate_ranks(unet, least - 1, proxy="weight")
    assert allocate_ranks(unet, least, proxy="weight").num_params == least


def test_rank_pattern_keys_pick_their_own_layer_when_one_name_ends_another():
    """'conv' is a dotted suffix of 'block.conv': peft's first matching key must be each layer's own."""
    model = nn.Module()
    model.conv = nn.Conv2d(3, 8, 3)
    model.block = nn.Module()
    model.block.conv = nn.Conv2d(8, 8, 3)
    with torch.no_grad():
        model.conv.weight.copy_(planted((8, 3, 3, 3), (1, 1, 0, 0, 0), torch.Generator().manual_seed(0)))
    allocation = allocate_ranks(model, 200, ["conv"], proxy="weight")
    assert allocation.layers["conv"].ranks != allocation.layers["block.conv"].ranks
    check_budget(model, allocation, 200)


# ---------------------------------------------------------------------------------------------- acceptance 2
def test_deterministic_for_a_seed_and_the_callers_random_state_is_left_alone():
    model = tiny_conv3d_net()
    batches = [example_inputs(model, batch=1, frames=2, seed=0)]

    def noisy(m, b):  # draws from the global generator, as a diffusion loss draws noise and timesteps
        return (m(**b) - torch.randn_like(b["x"])).square().mean()

    def run(seed):
        state = torch.get_rng_state()
        a = allocate_ranks(model, 6000, ["conv1", "conv2"], "gradient", batches, noisy, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        return a, [x.energy for x in a.layers.values()]

    (a, energies), (b, energies_again), (_, other) = run(7), run(7), run(8)
    assert a == b and energies == energies_again
    assert energies != other  # the seed is what fixes the noise


def test_independent_of_the_order_of_named_modules():
    """The same layers registered in reverse order: same pattern and report, with either proxy. 'twin' and
    'twin2' hold the same weight, so their steps tie exactly and the tie-break decides."""
    specs = dict(SPECS, twin=SPECS["frame"], twin2=SPECS["frame"])
    forward, batches, _ = teacher_student(2, dict(NORMS, twin=1.0, twin2=1.0), specs)
    with torch.no_grad():
        forward.twin2.weight.copy_(forward.twin.weight)
    backward = Branches(tuple(reversed(specs)), specs)
    backward.load_state_dict(forward.state_dict())
    assert [n for n, _ in forward.named_modules()] != [n for n, _ in backward.named_modules()]

    for proxy in ("weight", "gradient"):
        kwargs = {} if proxy == "weight" else {"batches": batches, "loss_fn": regression}
        results = [allocate_ranks(m, 260, list(specs), proxy, **kwargs) for m in (forward, backward)]
        assert list(results[0].items()) == list(results[1].items())
        assert results[0].layers == results[1].layers
    # budgets one step above the minimum: the twins tie, and the name decides which one takes the step
    decided = 0
    for budget in range(26, 40):  # minimum 2 * (8 + 4 + 1)
        pair = [allocate_ranks(m, budget, ["twin", "twin2"], "weight") for m in (forward, backward)]
        assert pair[0] == pair[1]
        decided += pair[0].layers["twin"].ranks != pair[0].layers["twin2"].ranks
    assert decided


# ---------------------------------------------------------------------------------------------- the parts
def test_weight_gradients_equal_the_summed_autograd_gradients_and_restore_the_model():
    model = tiny_conv3d_net()
    batches = [example_inputs(model, batch=1, frames=2, seed=s) for s in range(3)]

    def loss_fn(m, b):
        return m(**b).square().mean()

    reference = {}
    for b in batches:
        model.zero_grad()
        loss_fn(model, b).backward()
        for n in ("conv_in", "block_mid.conv1"):
            g = dict(model.named_modules())[n].weight.grad
            reference[n] = reference.get(n, 0) + g.clone()
    model.zero_grad(set_to_none=True)
    model.conv_out.requires_grad_(False)
    marker = torch.ones_like(model.conv_in.bias)
    model.conv_in.bias.grad = marker
    weights = {"conv_in": model.conv_in.weight, "block_mid.conv1": model.block_mid.conv1.weight}
    grads = weight_gradients(model, weights, batches, loss_fn)
    for n, g in grads.items():
        torch.testing.assert_close(g, reference[n], rtol=1e-5, atol=1e-7)
    assert model.conv_in.bias.grad is marker and model.conv_in.weight.grad is None
    assert not model.conv_out.weight.requires_grad and model.conv_in.weight.requires_grad


def test_greedy_takes_the_best_gain_per_parameter_by_hand():
    """Two 2x2 'Linear' proxies with singular values (3, 1) and (2, 1.5); each starts at (1, 1), 5 parameters.

    A lone r_o or r_i of 2 is redundant (a 2x1 core has rank 1), so each grows as a pair, to (2, 2) for
    2 + 2 + 4 - 1 = 7 parameters: layer a gains 1, layer b 2.25, so b grows first, whether gains are
    weighed by the total energy (1 / 16.25 both) or per layer (1 / 10 vs 1 / 6.25)."""
    spectra = {
        "a": mode_spectra(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)), (2, 2, 0, 0, 0)),
        "b": mode_spectra(torch.diag(torch.tensor([2.0, 1.5], dtype=torch.float64)), (2, 2, 0, 0, 0)),
    }
    caps = (2, 2, 0, 0, 0)
    for normalise in ("total", "layer"):
        assert greedy_ranks(spectra, 10 + 7, caps, normalise) == {"a": (1, 1, 0, 0, 0), "b": (2, 2, 0, 0, 0)}
    assert greedy_ranks(spectra, 10 + 14, caps) == {"a": (2, 2, 0, 0, 0), "b": (2, 2, 0, 0, 0)}
    # 3 left after b's pair: not enough for a's pair, so a lone (redundant) r_o of 2 spends it
    assert greedy_ranks(spectra, 10 + 7 + 3, caps) == {"a": (2, 1, 0, 0, 0), "b": (2, 2, 0, 0, 0)}
    assert greedy_ranks(spectra, 10 + 6, caps) == {"a": (2, 1, 0, 0, 0), "b": (2, 1, 0, 0, 0)}


def test_the_exchange_pass_lowers_a_rank_that_only_made_room(monkeypatch):
    """A Conv3d proxy of multilinear rank (4, 4, 1, 1, 2) plus a whisper of noise, at the budget of those ranks.

    Growing one mode at a time, the greedy raises the cheap t (3 taps) early, so that r_o may pass r_i r_h r_w,
    and ends at (3, 4, 2, 1, 2); once r_w has grown, t = 2 holds only noise: the exchange pass lowers it and
    spends the freed parameters on r_o."""
    import tucker_lora.ranks as ranks

    g = torch.Generator().manual_seed(0)
    X = planted((24, 16, 3, 3, 3), (4, 4, 1, 1, 2), g).double()
    X = X + 1e-3 * torch.randn(X.shape, generator=g, dtype=torch.float64) / X.numel() ** 0.5
    spectra = {"conv": mode_spectra(X)}
    budget = prop1((24, 16, 3, 3, 3), (4, 4, 1, 1, 2))
    assert greedy_ranks(spectra, budget, normalise="layer") == {"conv": (4, 4, 1, 1, 2)}
    monkeypatch.setattr(ranks, "_exchange", lambda layers, left: left)
    assert greedy_ranks(spectra, budget, normalise="layer") == {"conv": (3, 4, 2, 1, 2)}  # the greedy alone


def test_bad_input_is_refused_with_a_clear_error():
    model = Branches()
    batches = [{}]
    for budget in (0, -5, 2.5, True, "100", None):
        with pytest.raises(ValueError, match="budget must be a positive integer"):
            allocate_ranks(model, budget, list(SPECS), "weight")
    with pytest.raises(ValueError, match=r"proxy must be one of \('weight', 'gradient'\), got 'hessian'"):
        allocate_ranks(model, 1000, list(SPECS), "hessian")
    with pytest.raises(ValueError, match="needs calibration batches and loss_fn.*batches and loss_fn not given"):
        allocate_ranks(model, 1000, list(SPECS))
    with pytest.raises(ValueError, match="loss_fn not given"):
        allocate_ranks(model, 1000, list(SPECS), "gradient", batches)
    for bad, message in [
        ((16, 16, 3, 3), "must have 5 entries"),
        ((0, 16, 3, 3, 3), "max_ranks: r_o must be >= 1"),
        ((16, 16, -1, 3, 3), "max_ranks: r_t must be >= 0"),
        ("16", "must be a sequence of 5 integers"),
        ((16, 16, 3.5, 3, 3), "r_t must be an integer"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            allocate_ranks(model, 1000, list(SPECS), "weight", max_ranks=bad)
    with pytest.raises(ValueError, match="match no module of the Branches"):
        allocate_ranks(model, 1000, ["nope"], "weight")
    with pytest.raises(ValueError, match="DEFAULT_TARGET_MODULES has no entry for a Branches"):
        allocate_ranks(model, 1000, proxy="weight")
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with pytest.raises(TypeError, match="target module '1' is a GroupNorm"):
        allocate_ranks(norm, 1000, ["0", "1"], "weight")
    with pytest.raises(ValueError, match="at least one calibration batch"):
        allocate_ranks(model, 1000, list(SPECS), "gradient", [], regression)
    with pytest.raises(TypeError, match=r"must return a scalar tensor, got shape \(2,\)"):
        allocate_ranks(model, 1000, list(SPECS), "gradient", [0], lambda m, b: torch.ones(2))


def test_the_docs_examples_run_as_written(capsys):
    """Every python block of docs/rank-allocation.md, in order; the first prints the first text block."""
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict = {}
    exec(blocks[0], namespace)
    printed = capsys.readouterr().out.strip()
    assert printed == re.search(r"```text\n(.*?)```", text, re.S).group(1).strip()
    exec(blocks[1], namespace)
    unet = namespace["unet"]
    assert unet.get_nb_trainable_parameters()[0] <= 20_000 and namespace["pattern"].proxy == "gradient"


def test_summary_and_config_round_trip(unet, tmp_path):
    model = unet
    allocation = allocate_ranks(model, 8000, proxy="weight")
    config = allocation.to_config(alpha=2.0)
    assert config.rank_pattern == dict(allocation) and config.alpha == 2.0 and config.target_modules is None
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    assert peft_ranks(loaded) == {n: a.ranks for n, a in allocation.layers.items()}
    lines = allocation.summary().splitlines()
    assert len(lines) == len(allocation) + 2 and lines[-1].startswith(f"{allocation.num_params} of 8000 parameters")
    inputs = example_inputs(model)
    torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs))  # zero core
