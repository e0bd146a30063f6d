"""Layer math of Tucker-LoRA, each property checked against a reference that does not use the adapter code.

References: ``torch.nn.functional`` convolutions with the merged weight (padding modes written out with
``F.pad``), ``tensorly.tucker_to_tensor`` on numpy arrays, an einsum reconstruction of our own, numpy
matrix ranks of our own unfoldings, Proposition 1 counted by hand from the shapes, and peft's own LoRA
(Proposition 3 (ii)). Rank rules re-derived here from docs/design.md ("Ranks"), not imported from the library.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import time
from dataclasses import dataclass

import numpy as np
import peft
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tucker_lora  # noqa: F401  (registers the tuner with peft)
from conftest import einsum_reconstruct
from tucker_lora import TuckerLoraConfig, TuckerLoraLayer

MODES = ("o", "i", "t", "h", "w")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
ADAPTER = "default"

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------- references
def weight_modes(order: int) -> tuple[str, ...]:
    """(o, i), then the kernel modes right-aligned onto (t, h, w) (docs/design.md, "The object and notation")."""
    return ("o", "i") + ("t", "h", "w")[5 - order :]


def expected_layout(ranks: tuple[int, ...], shape: tuple[int, ...]) -> list[tuple[str, int, int, bool]]:
    """Per weight mode: (mode, dim, core size, pinned), by the rank rules (docs/design.md, "Ranks"): clip, pin on 0."""
    by_mode = dict(zip(MODES, ranks, strict=True))
    out = []
    for mode, dim in zip(weight_modes(len(shape)), shape, strict=True):
        r = by_mode[mode]
        out.append((mode, dim, 1, True) if r == 0 else (mode, dim, min(r, dim), False))
    return out


def prop1_count(ranks: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Proposition 1 by hand over the non-pinned modes: sum_n dim_n r_n + prod_n r_n."""
    trained = [(dim, r) for _, dim, r, pinned in expected_layout(ranks, shape) if not pinned]
    return sum(d * r for d, r in trained) + int(np.prod([r for _, r in trained]))


def one_hot_centre(dim: int) -> torch.Tensor:
    U = torch.zeros(dim, 1)
    U[dim // 2, 0] = 1.0
    return U


def my_factors(layer: TuckerLoraLayer, ranks: tuple[int, ...], adapter: str = ADAPTER) -> list[torch.Tensor]:
    """The factor list read from the layer's own parameters, pinned modes filled with our own one-hot."""
    shape = tuple(layer.get_base_layer().weight.shape)
    out = []
    for mode, dim, r, pinned in expected_layout(ranks, shape):
        if pinned:
            assert adapter not in getattr(layer, f"tucker_lora_U_{mode}"), f"pinned mode {mode} has a stored factor"
            out.append(one_hot_centre(dim).to(layer.tucker_lora_core[adapter].dtype))
        else:
            U = getattr(layer, f"tucker_lora_U_{mode}")[adapter]
            assert tuple(U.shape) == (dim, r), f"U_{mode}: {tuple(U.shape)} != {(dim, r)}"
            out.append(U)
    return out


def tensorly_delta(layer: TuckerLoraLayer, ranks: tuple[int, ...], alpha: float) -> np.ndarray:
    """alpha * tucker_to_tensor((core, factors)) with tensorly's numpy backend, float64."""
    tl.set_backend("numpy")
    core = layer.tucker_lora_core[ADAPTER].detach().double().numpy()
    factors = [U.detach().double().numpy() for U in my_factors(layer, ranks)]
    return alpha * tl.tucker_to_tensor((core, factors))


def explicit_pads(padding, kernel, dilation) -> list[tuple[int, int]]:
    """(left, right) per spatial dim, as nn.ConvNd resolves int / tuple / 'same' / 'valid'."""
    n = len(kernel)
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [(p, p) for p in padding]


def reference_conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """nn.ConvNd's forward written with F.pad + F.convNd (independent of the adapter code)."""
    dim = weight.ndim - 2
    if padding_mode == "zeros":
        return FCONV[dim](x, weight, bias, stride, padding, dilation, groups)
    pads = explicit_pads(padding, weight.shape[2:], dilation)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last dim first
    return FCONV[dim](F.pad(x, flat, mode=padding_mode), weight, bias, stride, 0, dilation, groups)


def reference_forward(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base`` applied with its weight replaced by ``weight``, through torch.nn.functional only."""
    bias = None if base.bias is None else base.bias.detach().to(weight.dtype)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return reference_conv(x, weight, bias, base.stride, base.padding, base.dilation, base.groups, base.padding_mode)


def close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "", scale: float | None = None
) -> None:
    """Max error relative to ``scale``, by default the size of the reference (float32 work vs float64
    reference)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------- models
class Holder(nn.Module):
    """Puts one layer at the nested name ``inner.layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.layer(x)


def adapt(base: nn.Module, ranks, alpha: float = 1.0, init_weights=False, **kw):
    """A peft model around a copy of ``base``; returns (peft_model, adapted layer)."""
    pm = peft.get_peft_model(
        Holder(copy.deepcopy(base)),
        TuckerLoraConfig(target_modules=["inner.layer"], ranks=ranks, alpha=alpha, init_weights=init_weights, **kw),
    )
    layer = pm.base_model.model.inner.layer
    assert isinstance(layer, TuckerLoraLayer)
    return pm, layer


@torch.no_grad()
def randomise(layer: TuckerLoraLayer, ranks, gen: torch.Generator) -> None:
    """Generic (non-orthonormal) factors and an O(1) core, so no structure hides a wrong formula."""
    shape = tuple(layer.get_base_layer().weight.shape)
    for mode, dim, r, pinned in expected_layout(ranks, shape):
        if not pinned:
            U = getattr(layer, f"tucker_lora_U_{mode}")[ADAPTER]
            U.copy_(torch.randn(dim, r, generator=gen))
    core = layer.tucker_lora_core[ADAPTER]
    core.copy_(torch.randn(core.shape, generator=gen))


# ---------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Case:
    """One random layer + adapter + input."""

    base_kwargs: dict
    dim: int  # 0 = Linear
    ranks: tuple[int, ...]
    alpha: float
    in_shape: tuple[int, ...]
    seed: int

    def base(self) -> nn.Module:
        if self.dim == 0:
            return nn.Linear(**self.base_kwargs)
        return CONV[self.dim](**self.base_kwargs)


def channel_rank(dim: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, dim), st.integers(dim + 1, dim + 2))


def kernel_rank(k: int) -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(1, k), st.just(k + 1))


@st.composite
def linear_cases(draw) -> Case:
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    ranks = (draw(channel_rank(cout)), draw(channel_rank(cin))) + tuple(
        draw(st.integers(0, 3)) for _ in range(3)
    )  # r_t, r_h, r_w: ignored on a Linear, 0 included
    lead = draw(st.sampled_from([(), (2,), (2, 3)]))
    return Case(
        base_kwargs=dict(in_features=cin, out_features=cout, bias=draw(st.booleans())),
        dim=0,
        ranks=ranks,
        alpha=draw(st.sampled_from([1.0, 0.5, -2.0, 3.0])),
        in_shape=lead + (cin,),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def conv_cases(draw, dims=(1, 2, 3)) -> Case:
    dim = draw(st.sampled_from(dims))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    else:
        padding = kind
    if kind == "same":
        stride = 1  # torch refuses 'same' with stride > 1
    else:
        stride = draw(st.one_of(st.integers(1, 2), st.tuples(*[st.integers(1, 2)] * dim)))
    pads = explicit_pads(padding, kernel, dilation)
    # input sizes: at least one output position, and reflect/circular padding smaller than the input
    spatial = tuple(
        max(d * (k - 1) + 1, max(p) + 1) + draw(st.integers(0, 2))
        for k, d, p in zip(kernel, dilation, pads, strict=True)
    )
    batch = draw(st.sampled_from([(), (1,), (2,)]))  # () = unbatched input
    # ranks: r_o, r_i in [1, dim + 1] (dim + 1 clips), kernel modes in [0, k + 1] (0 pins, k + 1 clips),
    # the pinning and clipping values drawn often on purpose
    kr = {m: draw(kernel_rank(k)) for m, k in zip(("t", "h", "w")[3 - dim :], kernel, strict=True)}
    ranks = (draw(channel_rank(cout)), draw(channel_rank(cin // groups))) + tuple(
        kr[m] if m in kr else draw(st.integers(0, 3)) for m in ("t", "h", "w")
    )
    return Case(
        base_kwargs=dict(
            in_channels=cin,
            out_channels=cout,
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
            padding_mode=draw(st.sampled_from(PADDING_MODES)),
        ),
        dim=dim,
        ranks=ranks,
        alpha=draw(st.sampled_from([1.0, 0.5, -2.0, 3.0])),
        in_shape=batch + (cin,) + spatial,
        seed=draw(st.integers(0, 2**16)),
    )


CASES = {
    "linear": linear_cases(),
    "conv1d": conv_cases(dims=(1,)),
    "conv2d": conv_cases(dims=(2,)),
    "conv3d": conv_cases(dims=(3,)),
}


def build(case: Case):
    """(peft model, adapted layer, frozen base copy, input) for a case, everything seeded by the case."""
    gen = torch.Generator().manual_seed(case.seed)
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        base = case.base()
        pm, layer = adapt(base, case.ranks, alpha=case.alpha)
    randomise(layer, case.ranks, gen)
    x = torch.randn(case.in_shape, generator=gen)
    return pm, layer, base, x


# ---------------------------------------------------------------------------------------------- 1. properties
@pytest.mark.parametrize("kind", list(CASES))
@PROPERTY
@given(data=st.data())
def test_forward_equals_functional_with_merged_weight(kind, data):
    """(a) layer(x) == F.linear / F.convNd(x, W + get_delta_weight()), padding modes via F.pad, float64 reference."""
    case = data.draw(CASES[kind])
    pm, layer, base, x = build(case)
    y = pm(x)
    W = base.weight.detach().double() + layer.get_delta_weight(ADAPTER).detach().double()
    ref = reference_forward(base, x.double(), W)
    close(y, ref, 1e-5, f"{case}")
    assert y.dtype == torch.float32


@pytest.mark.parametrize("kind", list(CASES))
@PROPERTY
@given(data=st.data())
def test_delta_weight_equals_tensorly(kind, data):
    """(b) get_delta_weight() == alpha * tensorly.tucker_to_tensor((core, factors)); core/factor shapes by the rules."""
    case = data.draw(CASES[kind])
    _, layer, base, _ = build(case)
    shape = tuple(base.weight.shape)
    layout = expected_layout(case.ranks, shape)
    assert tuple(layer.tucker_lora_core[ADAPTER].shape) == tuple(r for _, _, r, _ in layout)
    delta = layer.get_delta_weight(ADAPTER)
    assert tuple(delta.shape) == shape and delta.dtype == base.weight.dtype
    ref = torch.from_numpy(tensorly_delta(layer, case.ranks, case.alpha))
    close(delta, ref, 1e-5, f"{case}")
    # the layer's own factor list agrees with ours (pinned modes: centre one-hot)
    for mine, theirs in zip(my_factors(layer, case.ranks), layer.factors(ADAPTER), strict=True):
        assert torch.equal(mine.detach(), theirs.detach())


@pytest.mark.parametrize("kind", list(CASES))
@PROPERTY
@given(data=st.data())
def test_gradients_equal_reference_graph(kind, data):
    """(c) d loss / d (x, core, U_n) through the adapter == through F.convNd with an einsum-merged weight."""
    case = data.draw(CASES[kind])
    pm, layer, base, x = build(case)
    x.requires_grad_(True)
    core = layer.tucker_lora_core[ADAPTER]
    factors = my_factors(layer, case.ranks)
    leaves = [x, core] + [U for U in factors if U.requires_grad]
    y = pm(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    got = torch.autograd.grad((y * g).sum(), leaves)

    trains = [U.requires_grad for U in factors]
    want = reference_grads(base, x, core, factors, case.alpha, g, trains)
    # float32 sums of many products against a float64 reference: the rounding error scales with the sum of the
    # products' magnitudes (the same gradient with every input replaced by its absolute value), not with the
    # result, which cancellation can make much smaller (a (1, 1) kernel factor's gradient sums every term)
    terms = reference_grads(base, x, core, factors, case.alpha, g, trains, magnitude=True)
    names = ["x", "core"] + [f"U{n}" for n in range(len(leaves) - 2)]
    for name, a, b, m in zip(names, got, want, terms, strict=True):
        close(a, b, 1e-5, f"grad {name} {case}", scale=1.0 + m.abs().max().item())


def reference_grads(base, x, core, factors, alpha, g, trains, magnitude: bool = False) -> list[torch.Tensor]:
    """Gradients of ``sum(g * conv(x, W + alpha * G x_n U_n))`` in float64 through ``F.convNd`` and einsum, with
    respect to x, the core and the factors flagged in ``trains``; with
    ``magnitude``, of the same expression on the absolute values of every input (the sum of the magnitudes of
    the products each gradient adds up)."""
    f = (lambda t: t.detach().double().abs()) if magnitude else (lambda t: t.detach().double())
    inputs = [f(t).requires_grad_(True) for t in [x, core, *factors]]
    x64, core64, *factors64 = inputs
    dW = (abs(alpha) if magnitude else alpha) * einsum_reconstruct(core64, factors64)
    ref = reference_forward(base, x64, f(base.weight) + dW)
    wanted = [x64, core64] + [U for U, t in zip(factors64, trains, strict=True) if t]
    return list(torch.autograd.grad((ref * f(g)).sum(), wanted))


# ---------------------------------------------------------------------------------------------- 2. multilinear rank
def unfolding(T: np.ndarray, n: int) -> np.ndarray:
    return np.moveaxis(T, n, 0).reshape(T.shape[n], -1)


@PROPERTY
@given(data=st.data())
def test_multilinear_rank_of_delta(data):
    """rank(dW_(n)) <= clipped r_n, and == min(r_n, prod_{m != n} r_m) for a generic random core.

    (A mode-n unfolding of a core of sizes r_1..r_N has rank at most prod of the other sizes, so that is the
    generic value when r_n exceeds it.)
    """
    case = data.draw(st.one_of(CASES["linear"], conv_cases(dims=(2, 3))))
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        pm, layer = adapt(case.base(), case.ranks, alpha=case.alpha, init_weights=False)
    pm.to(torch.float64)  # exact structure, so numpy's default rank tolerance applies
    delta = layer.get_delta_weight(ADAPTER).detach().numpy()
    assert delta.dtype == np.float64
    sizes = [r for _, _, r, _ in expected_layout(case.ranks, delta.shape)]
    for n, r_n in enumerate(sizes):
        rank = np.linalg.matrix_rank(unfolding(delta, n))
        others = int(np.prod(sizes[:n] + sizes[n + 1 :]))
        assert rank <= r_n, f"mode {n}: rank {rank} > r_n {r_n} ({case})"
        assert rank == min(r_n, others), f"mode {n}: rank {rank} != min({r_n}, {others}) ({case})"


# ---------------------------------------------------------------------------------------------- 3. Proposition 1
class ManyLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict(
                    {
                        "fc": nn.Linear(7, 5),
                        "c1": nn.Conv1d(3, 4, 5),
                        "c2": nn.Conv2d(4, 6, (3, 2)),
                    }
                ),
                nn.ModuleDict(
                    {
                        "c3": nn.Conv3d(6, 8, (3, 3, 3)),
                        "grouped": nn.Conv2d(6, 9, 3, groups=3),
                        "temporal": nn.Conv3d(8, 8, (3, 1, 1), bias=False),
                    }
                ),
            ]
        )
        self.head = nn.Linear(5, 2)  # not targeted


TARGETS = ("fc", "c1", "c2", "c3", "grouped", "temporal")
rank_tuples = st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(0, 4), st.integers(0, 4), st.integers(0, 4))


@PROPERTY
@given(ranks=rank_tuples, override=rank_tuples, overridden=st.sampled_from(TARGETS))
def test_proposition1_trainable_parameter_count(ranks, override, overridden):
    """get_nb_trainable_parameters / print_trainable_parameters / per-layer numel == Prop. 1 counted by hand."""
    model = ManyLayers()
    base_total = sum(p.numel() for p in model.parameters())
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules() if name.split(".")[-1] in TARGETS}
    pm = peft.get_peft_model(
        model,
        TuckerLoraConfig(target_modules=list(TARGETS), ranks=ranks, rank_pattern={overridden: override}),
    )
    per_layer = {
        name: prop1_count(override if name.endswith("." + overridden) else ranks, shape)
        for name, shape in shapes.items()
    }
    expected = sum(per_layer.values())

    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == base_total + expected
    for name, want in per_layer.items():
        layer = pm.base_model.model.get_submodule(name)
        assert isinstance(layer, TuckerLoraLayer)
        got = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert got == want, f"{name}: {got} trainable, Prop. 1 says {want}"
    assert all(not p.requires_grad for p in pm.base_model.model.head.parameters())

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", buf.getvalue())
    assert m, buf.getvalue()
    assert int(m.group(1).replace(",", "")) == expected
    assert int(m.group(2).replace(",", "")) == base_total + expected


# ---------------------------------------------------------------------------------------------- 4. pinning
@pytest.mark.parametrize(
    "conv, pinned_axes",
    [
        (nn.Conv3d(3, 4, (3, 3, 3)), {2: 1}),  # r_t = 0, T = 3: only tap 1
        (nn.Conv3d(3, 4, (2, 3, 3)), {2: 1}),  # even T = 2: centre index 1
        (nn.Conv1d(3, 4, 4), {2: 2}),  # r_w = 0, even W = 4: index 2
        (nn.Conv2d(3, 4, (3, 2)), {2: 1, 3: 1}),  # both kernel modes pinned
    ],
)
def test_pinned_mode_is_centre_tap_only(conv, pinned_axes):
    """r = 0 on a kernel mode: dW is exactly zero off the centre tap k // 2 along that mode, non-zero on it."""
    order = conv.weight.ndim
    by_mode = dict(zip(weight_modes(order), range(order), strict=True))
    ranks = tuple(0 if by_mode.get(m) in pinned_axes else 2 for m in MODES)
    torch.manual_seed(0)
    _, layer = adapt(conv, ranks, init_weights=False)
    delta = layer.get_delta_weight(ADAPTER).detach()
    support = torch.ones(delta.shape, dtype=torch.bool)  # where every pinned axis sits at its centre
    for axis, centre in pinned_axes.items():
        on_centre = torch.arange(delta.shape[axis]) == centre
        support &= on_centre.reshape([-1 if a == axis else 1 for a in range(delta.ndim)])
    assert torch.equal(delta[~support], torch.zeros_like(delta[~support])), "non-zero update off the centre tap"
    assert delta[support].abs().min() > 0, "zero update on the centre tap"


def test_pseudo_3d_adapter_mixes_no_time_steps():
    """r_t = 0 on a temporal-spatial Conv3d: the adapter's output at frame t depends on input frame t only."""
    torch.manual_seed(1)
    base = nn.Conv3d(3, 4, (3, 3, 3), padding=1)
    pm, _ = adapt(base, (2, 2, 0, 2, 2), init_weights=False)
    for j in range(4):
        x = torch.zeros(2, 3, 4, 5, 5)
        x[:, :, j] = torch.randn(2, 3, 5, 5)
        with torch.no_grad():
            update = pm(x) - base(x)
            base_update = base(x) - base(torch.zeros_like(x))
        for t in range(4):
            if t == j:
                assert update[:, :, t].abs().max() > 1e-3
            else:
                assert update[:, :, t].abs().max() < 1e-6, f"frame {j} leaks into frame {t}"
                if abs(t - j) == 1:  # the base conv itself does mix neighbouring frames
                    assert base_update[:, :, t].abs().max() > 1e-3


class Named(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"down_proj": layer})


@pytest.mark.parametrize(
    "layer, ranks, pattern",
    [
        (nn.Conv3d(3, 4, 3), (0, 2, 1, 1, 1), {}),
        (nn.Conv2d(3, 4, 3), (2, 0, 1, 1, 1), {}),
        (nn.Linear(3, 4), (0, 2, 1, 1, 1), {}),
        (nn.Conv1d(3, 4, 3), (2, 2, 1, 1, 1), {"down_proj": (2, 0, 1, 1, 1)}),
    ],
)
def test_zero_channel_rank_raises_naming_layer(layer, ranks, pattern):
    config = TuckerLoraConfig(target_modules=["down_proj"], ranks=ranks, rank_pattern=pattern)
    with pytest.raises(ValueError, match=re.escape("encoder.down_proj")):
        peft.get_peft_model(Named(layer), config)


# ---------------------------------------------------------------------------------------------- 5. Proposition 3 (ii)
PROP3_CONVS = [
    pytest.param(lambda: nn.Conv3d(4, 6, (3, 3, 3), stride=(1, 2, 1), padding=1), (3, 2, 2, 2, 3), id="conv3d"),
    pytest.param(lambda: nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0)), (2, 3, 0, 1, 1), id="conv3d-temporal-pinned"),
    pytest.param(lambda: nn.Conv3d(4, 6, (3, 3, 3), padding=1), (2, 3, 0, 2, 2), id="conv3d-pseudo3d"),
    pytest.param(lambda: nn.Conv2d(5, 6, (3, 2), stride=2, padding=(1, 0)), (4, 9, 2, 1, 2), id="conv2d-clipped"),
]


@pytest.mark.parametrize("make, ranks", PROP3_CONVS)
def test_prop3_tucker_to_lora(make, ranks):
    """Tucker -> LoRA: B = U_o, A = alpha * G x_2 U_i x_3 U_t ... (numpy einsum) in peft's LoRA: same output."""
    torch.manual_seed(2)
    base = make()
    alpha = 0.7
    tucker, layer = adapt(base, ranks, alpha=alpha)
    randomise(layer, ranks, torch.Generator().manual_seed(3))
    factors = [U.detach().double().numpy() for U in my_factors(layer, ranks)]
    G = layer.tucker_lora_core[ADAPTER].detach().double().numpy()
    order = G.ndim
    r = G.shape[0]
    src, dst = "abcde"[:order], "a" + "BCDE"[: order - 1]
    expr = src + "," + ",".join(dst[n] + src[n] for n in range(1, order)) + "->" + dst
    A = alpha * np.einsum(expr, G, *factors[1:])  # (r_o, I, k...)
    B = factors[0].reshape(factors[0].shape + (1,) * (order - 2))  # (O, r_o, 1...)

    lora = peft.get_peft_model(
        Holder(copy.deepcopy(base)), peft.LoraConfig(target_modules=["inner.layer"], r=r, lora_alpha=r)
    )
    lora_layer = lora.base_model.model.inner.layer
    assert lora_layer.scaling[ADAPTER] == 1.0
    with torch.no_grad():
        lora_layer.lora_A[ADAPTER].weight.copy_(torch.from_numpy(A).float())
        lora_layer.lora_B[ADAPTER].weight.copy_(torch.from_numpy(B).float())
    x = torch.randn((2, base.in_channels) + (5,) * (order - 2))
    with torch.no_grad():
        y_lora, y_tucker = lora(x), tucker(x)
    assert (y_lora - base(x)).abs().max() > 1e-2  # the update is not trivially zero
    close(y_tucker, y_lora, 1e-5, "tucker vs lora")


@pytest.mark.parametrize(
    "make, r", [(lambda: nn.Conv3d(4, 6, (3, 2, 3), padding=1), 3), (lambda: nn.Conv2d(5, 7, 3), 2)]
)
def test_prop3_lora_to_tucker(make, r):
    """LoRA -> Tucker: ranks (r, I, T, H, W), U_o = B, U_i/U_k = identity, core = A: same output as peft's LoRA."""
    torch.manual_seed(4)
    base = make()
    lora = peft.get_peft_model(
        Holder(copy.deepcopy(base)),
        peft.LoraConfig(target_modules=["inner.layer"], r=r, lora_alpha=r, init_lora_weights=False),
    )
    lora_layer = lora.base_model.model.inner.layer
    A = lora_layer.lora_A[ADAPTER].weight.detach()  # (r, I, k...)
    B = lora_layer.lora_B[ADAPTER].weight.detach().flatten(1)  # (O, r)
    full = dict(zip(weight_modes(base.weight.ndim), (r,) + tuple(base.weight.shape[1:]), strict=True))
    ranks = tuple(full.get(m, 1) for m in MODES)  # (r, I, T, H, W): full on the input side
    tucker, layer = adapt(base, ranks, alpha=1.0, init_weights=True)
    modes = weight_modes(base.weight.ndim)
    with torch.no_grad():
        layer.tucker_lora_core[ADAPTER].copy_(A)
        layer.tucker_lora_U_o[ADAPTER].copy_(B)
        for mode, dim in zip(modes[1:], base.weight.shape[1:], strict=True):
            getattr(layer, f"tucker_lora_U_{mode}")[ADAPTER].copy_(torch.eye(dim))
    x = torch.randn((2, base.in_channels) + (6,) * (base.weight.ndim - 2))
    with torch.no_grad():
        y_lora, y_tucker = lora(x), tucker(x)
    assert (y_lora - base(x)).abs().max() > 1e-2
    close(y_tucker, y_lora, 1e-5, "tucker vs lora")


# ---------------------------------------------------------------------------------------------- 6. dtypes, devices
DTYPE_LAYERS = [
    pytest.param(lambda: nn.Linear(8, 6), (3, 4, 1, 1, 1), (3, 8), id="linear"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 2, 1, 2, 2), (2, 4, 6, 6), id="conv2d"),
    pytest.param(
        lambda: nn.Conv2d(4, 6, 3, groups=2, padding_mode="reflect", padding=1),
        (3, 2, 1, 0, 2),
        (2, 4, 5, 5),
        id="conv2d-grouped-reflect",
    ),
    pytest.param(lambda: nn.Conv3d(4, 6, (3, 3, 3), padding=1), (3, 2, 0, 2, 2), (1, 4, 3, 5, 5), id="conv3d"),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("make, ranks, in_shape", DTYPE_LAYERS)
def test_low_precision_base(make, ranks, in_shape, dtype, tol):
    """fp16/bf16 base: float32 adapter parameters, base-dtype delta and output, close to a float64 reference."""
    torch.manual_seed(5)
    base = make().to(dtype)
    pm, layer = adapt(base, ranks, alpha=1.5)
    randomise(layer, ranks, torch.Generator().manual_seed(6))
    adapter_params = [p for n, p in pm.named_parameters() if "tucker_lora_" in n]
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params)
    assert layer.get_base_layer().weight.dtype == dtype
    assert layer.get_delta_weight(ADAPTER).dtype == dtype
    x = torch.randn(in_shape).to(dtype)
    with torch.no_grad():
        y = pm(x)
    assert y.dtype == dtype
    dW = 1.5 * einsum_reconstruct(
        layer.tucker_lora_core[ADAPTER].detach().double(), [U.detach().double() for U in my_factors(layer, ranks)]
    )
    ref = reference_forward(base, x.double(), base.weight.detach().double() + dW)
    close(y, ref, tol, f"{dtype}")


def test_to_float64_and_meta_move_adapter_parameters():
    """model.to(float64) / .to('meta') carry the adapter parameters; float64 output matches a float64 reference."""
    torch.manual_seed(7)
    base = nn.Conv3d(3, 4, (3, 2, 3), padding=1)
    ranks = (2, 2, 0, 1, 2)
    pm, layer = adapt(base, ranks)
    pm.to(torch.float64)
    adapter_params = [p for n, p in pm.named_parameters() if "tucker_lora_" in n]
    assert len(adapter_params) == 5  # core, U_o, U_i, U_h, U_w (t pinned)
    assert all(p.dtype == torch.float64 for p in adapter_params)
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    y = pm(x)
    assert y.dtype == torch.float64
    dW = einsum_reconstruct(layer.tucker_lora_core[ADAPTER].detach(), [U.detach() for U in my_factors(layer, ranks)])
    ref = reference_forward(base, x, base.weight.detach().double() + dW)
    close(y, ref, 1e-12, "float64")

    pm.to("meta")
    assert all(p.is_meta for p in pm.parameters())
    assert all(p.is_meta for n, p in pm.named_parameters() if "tucker_lora_" in n)
    out = pm(x.to("meta"))
    assert out.is_meta and out.shape == ref.shape


# ---------------------------------------------------------------------------------------------- 7. keyword calls
KWARG_LAYERS = [
    pytest.param(lambda: nn.Linear(5, 4), (2, 3, 1, 1, 1), (3, 5), id="linear"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 3, 1, 2, 0), (2, 4, 5, 5), id="conv2d"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 2, 1, 2, 2), (2, 4, 5, 5), id="conv2d-grouped"),
    pytest.param(lambda: nn.Conv3d(2, 3, 3, padding="same"), (2, 2, 0, 2, 2), (1, 2, 3, 4, 4), id="conv3d"),
]


@pytest.mark.parametrize("make, ranks, in_shape", KWARG_LAYERS)
def test_keyword_input_call(make, ranks, in_shape):
    """layer(input=x) == layer(x) == the merged-weight reference."""
    torch.manual_seed(8)
    base = make()
    _, layer = adapt(base, ranks)
    x = torch.randn(in_shape)
    with torch.no_grad():
        y_kw, y_pos = layer(input=x), layer(x)
    torch.testing.assert_close(y_kw, y_pos, rtol=0, atol=1e-7)
    ref = reference_forward(base, x.double(), base.weight.detach().double() + layer.get_delta_weight(ADAPTER).double())
    close(y_kw, ref, 1e-5, "input= call")


# ---------------------------------------------------------------------------------------------- 8. torch.compile
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, (3, 3, 3), padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(x).mean(2)
        y = self.c2(torch.relu(y))
        return self.fc(y.mean((2, 3)))


def small_adapted():
    torch.manual_seed(9)
    model = Small()
    ref_model = copy.deepcopy(model)
    pm = peft.get_peft_model(
        model, TuckerLoraConfig(target_modules=["c3", "c2", "fc"], ranks=(2, 2, 0, 2, 2), init_weights=False)
    )
    # independent reference: a plain copy of the model whose weights are W + einsum-reconstructed dW
    with torch.no_grad():
        for name in ("c3", "c2", "fc"):
            layer = pm.base_model.model.get_submodule(name)
            dW = einsum_reconstruct(layer.tucker_lora_core[ADAPTER], my_factors(layer, (2, 2, 0, 2, 2)))
            ref_model.get_submodule(name).weight.add_(dW)
    return pm, ref_model, torch.randn(2, 2, 3, 5, 5)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_inductor_training_step_matches_eager(fresh_dynamo):
    """Inductor (C++ on the CPU), ``fullgraph=True``: the compiled training step (forward, then the backward that
    AOTAutograd compiled with it) gives eager's output and the gradients of the input and of every adapter
    tensor. Measured ~21 s on a cold cache on 2 CPU cores (forward alone), so not marked slow."""
    pm, ref_model, x = small_adapted()
    params = [p for p in pm.parameters() if p.requires_grad]
    x.requires_grad_(True)
    start = time.perf_counter()
    y_c = torch.compile(pm, fullgraph=True)(x)
    g_c = torch.autograd.grad(y_c.square().sum(), [x, *params])
    elapsed = time.perf_counter() - start
    y_e = pm(x)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=1e-5)
    close(y_c, ref_model(x), 1e-5, "inductor vs merged reference")
    g_e = torch.autograd.grad(y_e.square().sum(), [x, *params])
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    print(f"inductor compile + first training step: {elapsed:.1f} s")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_adapted_unet3d_training_step_compiles_as_one_graph(backend, fresh_dynamo):
    """The tiny UNet3D with Tucker-LoRA on its default targets: dynamo captures the whole training forward as one
    graph (``fullgraph=True`` fails on any graph break), AOTAutograd traces the adapters' backward with it, and the
    compiled step's output and every adapter gradient equal eager's. Under inductor the C++ compilation of this
    graph takes minutes on 2 CPU cores: that case is marked slow (``test_compile_inductor_training_step_matches_eager``
    runs inductor on a small model in the default run)."""
    pytest.importorskip("diffusers")
    from tucker_lora.testing import default_targets, example_inputs, model_output, tiny_unet3d

    unet = tiny_unet3d()
    pm = peft.get_peft_model(unet, TuckerLoraConfig(target_modules=default_targets(unet), init_weights=False))
    pm.eval()  # the temporal convs' dropout off (compiled and eager would draw different masks); autograd stays on
    inputs = example_inputs(pm, frames=3)
    params = [p for p in pm.parameters() if p.requires_grad]
    assert any("tucker_lora_core" in n for n, p in pm.named_parameters() if p.requires_grad)
    y_c = model_output(torch.compile(pm, fullgraph=True, backend=backend), inputs)
    g_c = torch.autograd.grad(y_c.square().mean(), params)
    y_e = model_output(pm, inputs)
    g_e = torch.autograd.grad(y_e.square().mean(), params)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


FULLGRAPH_LAYERS = [
    pytest.param(lambda: nn.Linear(5, 4), (2, 3, 1, 1, 1), (3, 5), id="linear"),
    pytest.param(
        lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (2, 2, 1, 1, 2), (2, 3, 6), id="conv1d"
    ),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 2, 1, 2, 2), (2, 4, 5, 5), id="conv2d-grouped"),
    pytest.param(lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 0, 2, 2), (1, 2, 3, 4, 4), id="conv3d-pinned"),
]


@pytest.mark.parametrize("make, ranks, in_shape", FULLGRAPH_LAYERS)
def test_adapted_forward_has_no_graph_break(make, ranks, in_shape, fresh_dynamo):
    """torch._dynamo.explain finds no graph break, and fullgraph=True compiles and matches the reference."""
    torch.manual_seed(10)
    base = make()
    _, layer = adapt(base, ranks)
    x = torch.randn(in_shape)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    ref = reference_forward(base, x.double(), base.weight.detach().double() + layer.get_delta_weight(ADAPTER).double())
    close(y, ref, 1e-5, "fullgraph")


# ---------------------------------------------------------------------------------------------- 9. initialisation
INIT_LAYERS = [
    pytest.param(lambda: nn.Linear(5, 4), (2, 3, 1, 1, 1), (3, 5), id="linear"),
    pytest.param(
        lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="replicate"), (2, 2, 1, 1, 0), (2, 3, 6), id="conv1d"
    ),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), (2, 2, 1, 2, 2), (2, 4, 7, 7), id="conv2d-grouped"),
    pytest.param(lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 0, 2, 2), (1, 2, 3, 4, 4), id="conv3d"),
]


@pytest.mark.parametrize("make, ranks, in_shape", INIT_LAYERS)
def test_default_init_is_identity_random_init_is_not(make, ranks, in_shape):
    torch.manual_seed(11)
    base = make()
    x = torch.randn(in_shape)
    with torch.no_grad():
        y_base = base(x)
        pm_id, _ = adapt(base, ranks, init_weights=True)
        pm_rand, _ = adapt(base, ranks, init_weights=False)
        pm_small, _ = adapt(base, ranks, init_weights=True, core_init_scale=0.1)
        close(pm_id(x), y_base, 1e-6, "default init")
        assert (pm_rand(x) - y_base).abs().max() > 1e-4
        assert (pm_small(x) - y_base).abs().max() > 1e-4
