"""HOSVD / HOOI initialisers (paper section 3.2): the math against independent references, the rank rules,
Proposition 4, init from the base weight through the config, and the gradient proxy."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import tensorly as tl
import torch
from peft import get_peft_model
from tensorly.decomposition import tucker as tl_tucker
from torch import nn

import tucker_lora.decomposition as tdec
import tucker_lora.init as tinit
from conftest import TARGETS
from tucker_lora import TuckerLoraConfig, TuckerLoraLayer
from tucker_lora.decomposition import hooi, hosvd, leading_subspace
from tucker_lora.init import init_from_gradients, init_from_weights
from tucker_lora.testing import default_targets, example_inputs, model_output, tiny_unet3d
from tucker_lora.tucker import centre_tap, reconstruct, resolve_ranks, unfold


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_error(X: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(X - reconstruct(core, factors)) / torch.linalg.vector_norm(X))


def unfolding_np(X: np.ndarray, n: int) -> np.ndarray:
    return np.moveaxis(X, n, 0).reshape(X.shape[n], -1)


def projector(U: torch.Tensor) -> np.ndarray:
    U = U.detach().double().numpy()
    return U @ U.T


def sin_max_angle(U: torch.Tensor, V: torch.Tensor) -> float:
    """Sine of the largest principal angle between span(U) and span(V) (same number of columns)."""
    Qu = np.linalg.qr(U.detach().double().numpy())[0]
    Qv = np.linalg.qr(V.detach().double().numpy())[0]
    return float(np.linalg.norm(Qv - Qu @ (Qu.T @ Qv), 2))


def np_project(X: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """``X x_1 U_1^T ... x_N U_N^T`` with numpy's tensordot, one mode at a time (independent of the library)."""
    for n, U in enumerate(factors):
        X = np.moveaxis(np.tensordot(U.T, X, axes=([1], [n])), 0, n)
    return X


def np_energy(X: np.ndarray, factors: list[np.ndarray]) -> float:
    """Share of ``||X||^2`` in its projection onto orthonormal factors: ``||X x_n U_n^T||^2 / ||X||^2``."""
    return float(np.sum(np_project(X, factors) ** 2) / np.sum(X**2))


def planted(shape, ranks, seed=0, noise=0.0, dtype=torch.float64):
    """A tensor of multilinear rank ``ranks`` (orthonormal factors, decaying core) plus optional noise."""
    g = gen(seed)
    factors = [
        torch.linalg.qr(torch.randn(d, r, generator=g, dtype=dtype))[0] for d, r in zip(shape, ranks, strict=True)
    ]
    core = torch.randn(*ranks, generator=g, dtype=dtype)
    for n, r in enumerate(ranks):  # a spectral gap in every mode
        scale = torch.linspace(3.0, 1.0, r, dtype=dtype).reshape([-1 if m == n else 1 for m in range(len(ranks))])
        core = core * scale
    X = reconstruct(core, factors)
    if noise:
        X = X + noise * torch.randn(shape, generator=g, dtype=dtype) * X.norm() / math.sqrt(X.numel())
    return X, factors


# --------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("method", ["auto", "gram", "svd"])
@pytest.mark.parametrize(
    "shape, ranks",
    [
        ((9, 7, 3, 3, 3), (3, 2, 2, 1, 2)),  # Conv3d
        ((12, 5, 3, 3), (4, 5, 1, 2)),  # Conv2d, r_i at full rank
        ((10, 40), (3, 4)),  # Linear, wide mode o, tall mode i
        ((6, 5, 4, 3, 2, 2), (2, 2, 2, 2, 1, 1)),  # order 6
        ((11,), (1,)),  # order 1: the unfolding is X itself, one singular vector
    ],
)
def test_hosvd_matches_numpy_svd_of_each_unfolding(shape, ranks, method):
    X = torch.randn(shape, generator=gen(0), dtype=torch.float64)
    core, factors = hosvd(X, ranks, method=method)
    assert core.shape == tuple(ranks)
    for n, (U, r) in enumerate(zip(factors, ranks, strict=True)):
        assert U.shape == (shape[n], r)
        np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-12)
        ref = np.linalg.svd(unfold(X, n).numpy())[0][:, :r]
        np.testing.assert_allclose(projector(U), ref @ ref.T, atol=1e-9)
    np.testing.assert_allclose(core.numpy(), np_project(X.numpy(), [U.numpy() for U in factors]), atol=1e-12)


def test_leading_subspace_methods_agree_and_complete():
    A = planted((60, 500), (8, 8), seed=1)[0].reshape(60, 500) + 0.01 * torch.randn(60, 500, generator=gen(2))
    ref = np.linalg.svd(A.numpy())[0][:, :5]
    for method in ("auto", "gram", "svd", "randomized"):
        U = leading_subspace(A, 5, method)
        np.testing.assert_allclose(projector(U), ref @ ref.T, atol=1e-6)
    # a matrix of rank 2 asked for 4 vectors: the top 2 and an orthonormal completion
    B = torch.randn(30, 2, generator=gen(3), dtype=torch.float64) @ torch.randn(
        2, 7, generator=gen(4), dtype=torch.float64
    )
    for method in ("auto", "gram", "svd"):
        U = leading_subspace(B, 4, method)
        np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-10)
        assert sin_max_angle(U[:, :2], torch.linalg.svd(B)[0][:, :2]) < 1e-8
    with pytest.raises(ValueError, match="method"):
        leading_subspace(A, 2, "qr")


def test_wide_unfoldings_never_take_a_full_svd(monkeypatch):
    """The default path reaches every mode of a kernel without an SVD of a wide unfolding."""
    svd = torch.linalg.svd

    def guarded(A, *args, **kwargs):
        assert A.shape[0] >= A.shape[1], f"SVD of a wide {tuple(A.shape)} matrix"
        return svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", guarded)
    X = torch.randn(64, 48, 3, 3, 3, generator=gen(0))
    core, factors = hooi(X, (4, 4, 1, 1, 1))
    assert core.shape == (4, 4, 1, 1, 1) and [U.shape[1] for U in factors] == [4, 4, 1, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hooi_matches_tensorly_tucker(seed):
    backend = tl.get_backend()
    X = torch.randn(8, 7, 3, 3, 3, generator=gen(seed), dtype=torch.float64)
    ranks = [3, 3, 2, 1, 2]
    core, factors = hooi(X, ranks, n_iter_max=200, tol=1e-12)
    assert tl.get_backend() == backend  # no global tensorly state touched
    with tl.backend_context("pytorch"):
        ref_core, ref_factors = tl_tucker(X, rank=ranks, n_iter_max=200, tol=1e-12, init="svd")
    assert rel_error(X, core, factors) == pytest.approx(rel_error(X, ref_core, ref_factors), abs=1e-8)
    assert tl.get_backend() == backend


def test_hosvd_hooi_rank_rules():
    X = torch.randn(6, 5, 3, 3, 3, generator=gen(0), dtype=torch.float64)
    # r_t = 0: mode t pinned to its centre tap; the rest is the decomposition of X there
    core, factors = hooi(X, (2, 9, 0, 1, 3))  # r_i = 9 > 5 is clipped, r_w = 3 is full
    assert core.shape == (2, 5, 1, 1, 3)
    torch.testing.assert_close(factors[2], torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64))
    torch.testing.assert_close(factors[1], torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(factors[4], torch.eye(3, dtype=torch.float64))
    ref_core, ref_factors = hooi(X[:, :, 1:2], (2, 5, 1, 1, 3))
    torch.testing.assert_close(core, ref_core)
    approx = reconstruct(core, factors)
    assert approx[:, :, [0, 2]].abs().max() == 0  # nothing outside the centre tap
    torch.testing.assert_close(approx[:, :, 1:2], reconstruct(ref_core, ref_factors))
    # the paper's 5-tuple on a Conv2d weight: r_t is ignored, resolved as the layer resolves it
    W = torch.randn(6, 5, 3, 3, generator=gen(1))
    core, factors = hosvd(W, (2, 2, 7, 0, 1))
    assert core.shape == (2, 2, 1, 1)
    assert factors[2].flatten().tolist() == [0.0, 1.0, 0.0]
    mr = resolve_ranks((2, 2, 7, 0, 1), W.shape)
    torch.testing.assert_close(hosvd(W, mr)[0], core)
    with pytest.raises(ValueError, match="one rank per mode"):
        hosvd(W, (2, 2, 1))
    with pytest.raises(ValueError, match="r_o = 0"):
        hosvd(W, (0, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        hosvd(torch.randn(6, 5, 3, 4), mr)


def test_dtypes_and_devices():
    """A float16 tensor is decomposed in float32, a float64 one in float64; the values are those of numpy's SVD of
    each unfolding of the same numbers (HOSVD) and the core their projection; HOOI's error is tensorly's."""
    X = torch.randn(10, 8, 3, generator=gen(0)).half()
    X64 = X.double().numpy()  # the float16 values exactly
    ranks = (2, 2, 1)
    for method, dtype, tol in ((hosvd, torch.float32, 1e-5), (hosvd, torch.float64, 1e-12)):
        core, factors = method(X.to(dtype) if dtype == torch.float64 else X, ranks)
        assert core.dtype == dtype and all(U.dtype == dtype for U in factors)
        for n, (U, r) in enumerate(zip(factors, ranks, strict=True)):
            ref = np.linalg.svd(unfolding_np(X64, n))[0][:, :r]
            np.testing.assert_allclose(projector(U), ref @ ref.T, atol=tol)
        expected = np_project(X64, [U.double().numpy() for U in factors])
        np.testing.assert_allclose(core.double().numpy(), expected, atol=tol * np.abs(X64).max())
    core, factors = hooi(X, ranks, n_iter_max=200, tol=1e-12)
    assert core.dtype == torch.float32 and all(U.dtype == torch.float32 for U in factors)
    with tl.backend_context("numpy"):
        ref_core, ref_factors = tl_tucker(X64, rank=list(ranks), n_iter_max=200, tol=1e-12, init="svd")
        ref_error = np.linalg.norm(X64 - tl.tucker_to_tensor((ref_core, ref_factors))) / np.linalg.norm(X64)
    error = np.linalg.norm(X64 - reconstruct(core, factors).double().numpy()) / np.linalg.norm(X64)
    assert error == pytest.approx(ref_error, abs=1e-5)


# --------------------------------------------------------------------------------------- Proposition 4
def test_proposition_4_monotone_exact_and_hooi_not_worse():
    X = torch.randn(7, 6, 3, 3, 3, generator=gen(5), dtype=torch.float64)
    full = (7, 6, 3, 3, 3)
    base = (2, 2, 1, 1, 1)
    for n in range(5):  # error non-increasing in each rank, the others fixed
        errors = []
        for r in range(1, full[n] + 1):
            ranks = list(base)
            ranks[n] = r
            core, factors = hosvd(X, ranks)
            errors.append(rel_error(X, core, factors))
            hooi_error = rel_error(X, *hooi(X, ranks, n_iter_max=50, tol=1e-12))
            assert hooi_error <= errors[-1] + 1e-12
            for U in factors:
                np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-12)
        assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False)), (n, errors)
    for method in (hosvd, hooi):
        core, factors = method(X, full)
        assert rel_error(X, core, factors) < 1e-13
        core, factors = method(X, (99, 99, 99, 99, 99))  # clipped to full rank
        assert rel_error(X, core, factors) < 1e-13


@pytest.mark.parametrize("method", [hosvd, hooi])
def test_exact_recovery_of_a_planted_tensor(method):
    ranks = (3, 2, 2, 1, 2)
    X, planted_factors = planted((20, 16, 3, 3, 3), ranks, seed=7)
    core, factors = method(X, ranks)
    assert rel_error(X, core, factors) < 1e-12
    for U, V in zip(factors, planted_factors, strict=True):
        assert sin_max_angle(U, V) < 1e-10
    # with noise the leading subspaces are still found, HOOI at least as well as HOSVD
    Xn, _ = planted((20, 16, 3, 3, 3), ranks, seed=7, noise=0.05)
    for U, V in zip(method(Xn, ranks)[1], planted_factors, strict=True):
        assert sin_max_angle(U, V) < 0.05


def test_randomized_finds_the_subspace_of_a_decaying_spectrum():
    X, _ = planted((200, 150, 3, 3, 3), (6, 6, 2, 2, 2), seed=3, noise=0.01, dtype=torch.float32)
    exact = hosvd(X, (4, 4, 1, 1, 1), method="svd")[1]
    fast = hosvd(X, (4, 4, 1, 1, 1), method="randomized")[1]
    for U, V in zip(fast, exact, strict=True):
        assert sin_max_angle(U, V) < 1e-3


# --------------------------------------------------------------------------------------- weight proxy
@pytest.mark.parametrize("init", ["hosvd", "hooi"])
def test_config_init_from_weight_keeps_outputs_and_spans_leading_subspaces(toy, video, init):
    with torch.no_grad():  # plant structure in the conv3d so its leading subspaces are well separated
        toy.conv3d.weight.copy_(planted(toy.conv3d.weight.shape, (3, 2, 2, 2, 2), seed=1, noise=0.01)[0].float())
    ref = toy(video)
    weights = {n: m.weight.detach().clone() for n, m in toy.named_modules() if n in TARGETS}
    model = get_peft_model(toy, TuckerLoraConfig(target_modules=TARGETS, ranks=(2, 2, 1, 0, 1), init_weights=init))
    torch.testing.assert_close(model(video), ref, rtol=0, atol=0)
    for name, layer in model.named_modules():
        if not isinstance(layer, TuckerLoraLayer):
            continue
        mr = layer.mode_ranks["default"]
        W = weights[name.rsplit(".", 1)[-1]].double()
        assert not layer.tucker_lora_core["default"].any()
        X = tdec.restrict(W, mr)  # the weight at the centre tap of pinned modes
        ref_core, ref_factors = (hooi if init == "hooi" else hosvd)(X.double(), [r for r in mr.ranks])
        for n, U in enumerate(layer.factors("default")):
            assert U.dtype == torch.float32
            if mr.pinned[n]:
                torch.testing.assert_close(U, centre_tap(mr.dims[n]))
                continue
            if init == "hosvd":  # principal angles to the top singular vectors of the (restricted) unfolding
                ref = torch.from_numpy(np.linalg.svd(unfold(X, n).numpy())[0][:, : mr.ranks[n]])
                assert sin_max_angle(U, ref) < 1e-3, (name, n)
            assert sin_max_angle(U, ref_factors[n]) < 1e-3, (name, n)


def test_core_init_scale_gives_small_core_with_weight_factors(toy):
    model = get_peft_model(
        toy,
        TuckerLoraConfig(target_modules=["conv3d"], ranks=(2, 2, 1, 1, 1), init_weights="hosvd", core_init_scale=1e-3),
    )
    layer = model.base_model.model.conv3d
    core = layer.tucker_lora_core["default"]
    assert 0 < core.abs().max() < 1e-2
    ref = hosvd(layer.get_base_layer().weight.detach(), (2, 2, 1, 1, 1))
    for U, V in zip(layer.factors("default"), ref[1], strict=True):
        assert sin_max_angle(U, V) < 1e-4


def test_config_accepts_the_init_names_and_round_trips(toy, video, tmp_path, monkeypatch):
    from peft import PeftModel

    assert TuckerLoraConfig(target_modules=["x"], init_weights="hooi").init_weights == "hooi"
    with pytest.raises(ValueError, match="init_weights"):
        TuckerLoraConfig(target_modules=["x"], init_weights="svd")
    model = get_peft_model(copy.deepcopy(toy), TuckerLoraConfig(target_modules=TARGETS, init_weights="hooi"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)
    torch.testing.assert_close(loaded(video), model(video))
    # loading on empty weights does not decompose anything: the checkpoint fills the adapter
    calls = []
    monkeypatch.setattr(tdec, "hooi", lambda *a, **k: calls.append(1) or hooi(*a, **k))
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path, low_cpu_mem_usage=True)
    assert calls == []
    torch.testing.assert_close(loaded(video), model(video))


def test_from_pretrained_trainable_with_a_hosvd_config_loads_the_checkpoint_and_trains(toy, video, tmp_path):
    """``PeftModel.from_pretrained(..., is_trainable=True)`` on an adapter saved with ``init_weights="hosvd"``: every
    adapter tensor is the saved one (the checkpoint overwrites the decomposition), trainable, and a step moves it."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model = get_peft_model(copy.deepcopy(toy), TuckerLoraConfig(target_modules=TARGETS, init_weights="hosvd"))
    g = gen(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path, is_trainable=True)
    params = {n: p for n, p in loaded.named_parameters() if "tucker_lora_" in n}
    assert len(params) == len(saved) and all(p.requires_grad for p in params.values())
    for key, value in saved.items():  # peft saves "...tucker_lora_core" for "...tucker_lora_core.default"
        torch.testing.assert_close(params[f"{key}.default"], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded(video), model(video), rtol=0, atol=0)
    loaded(video).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params.items() if "core" in n)


def test_init_from_weights_on_a_diffusers_unet(caplog):
    unet = tiny_unet3d()
    inputs = example_inputs(unet)
    with torch.no_grad():
        ref = model_output(unet, inputs)
    model = get_peft_model(unet, TuckerLoraConfig(target_modules=default_targets(unet), ranks=(4, 4, 2, 1, 1)))
    with caplog.at_level("INFO", logger="tucker_lora"):
        energies = init_from_weights(model, "hooi", progress=False)
    assert len(energies) == len(model.base_model.targeted_module_names) == 48
    layers = dict(model.named_modules())
    for name, energy in energies.items():  # the share of the weight (at the centre taps) in its projection
        layer = layers[name]
        mr = layer.mode_ranks["default"]
        W = layer.get_base_layer().weight.detach().double().numpy()
        X = W[tuple(slice(d // 2, d // 2 + 1) if p else slice(None) for d, p in zip(mr.dims, mr.pinned, strict=True))]
        taps = (d // 2 for d in mr.dims)
        factors = [U.detach().double().numpy() for U in layer.factors("default")]
        free = [U[i : i + 1] if p else U for U, p, i in zip(factors, mr.pinned, taps, strict=True)]
        assert energy == pytest.approx(np_energy(X, free), abs=1e-4), name
    summary = [r.getMessage() for r in caplog.records if "captured energy mean" in r.getMessage()]
    assert len(summary) == 2 and any("Conv3d" in s for s in summary) and any("Conv2d" in s for s in summary)
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, inputs), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no Tucker-LoRA layer"):
        init_from_weights(model, "hooi", adapter_name="other", progress=False)
    with pytest.raises(ValueError, match="method"):
        init_from_weights(model, "svd", progress=False)


# --------------------------------------------------------------------------------------- gradient proxy
class Student(nn.Module):
    def __init__(self, channels: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def teacher_student(seed: int = 0, channels: int = 12):
    """A Conv3d student and a teacher whose weight differs by a planted Tucker update of ranks (2, 2, 1, 1, 1)."""
    torch.manual_seed(seed)
    student = Student(channels)
    delta, factors = planted((channels, channels, 3, 3, 3), (2, 2, 1, 1, 1), seed=seed + 1, dtype=torch.float32)
    delta = delta * (student.conv.weight.norm() / delta.norm())
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.conv.weight.add_(delta)
    batches = []
    g = gen(seed + 2)
    for _ in range(3):
        x = torch.randn(4, channels, 4, 8, 8, generator=g)
        with torch.no_grad():
            batches.append((x, teacher(x)))
    return student, batches, factors


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


def loss_drop_after_one_step(model: nn.Module, batches, lr: float) -> tuple[float, float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = sum(float(mse(model, b)) for b in batches)
    opt.zero_grad()
    sum(mse(model, b) for b in batches).backward()
    opt.step()
    with torch.no_grad():
        after = sum(float(mse(model, b)) for b in batches)
    return before, before - after


def test_gradient_hooi_init_beats_random_orthonormal_init_after_one_step():
    """The ideal update is the planted one. Gradient-HOOI factors find its subspaces, so one SGD step on the
    (zero) core lowers the loss about as much as from the planted factors themselves (the oracle), and far
    more than from random orthonormal factors (the default init)."""
    ranks = (2, 2, 1, 1, 1)
    drops = {}
    for init in ("random", "gradient", "oracle"):
        student, batches, planted_factors = teacher_student()
        model = get_peft_model(student, TuckerLoraConfig(target_modules=["conv"], ranks=ranks))
        layer = model.base_model.model.conv
        if init == "gradient":
            X = dense_gradient(model, layer, batches, mse).double().numpy()
            energies = init_from_gradients(model, batches, mse, "hooi", progress=False)
            # the sketches are as large as the layer here (12 channels <= r + oversample): the proxy is the gradient
            factors = [U.detach().double().numpy() for U in layer.factors("default")]
            (energy,) = energies.values()
            assert energy == pytest.approx(np_energy(X, factors), abs=1e-5) and energy > 0.5
            for U, V in zip(layer.factors("default"), planted_factors, strict=True):
                assert sin_max_angle(U, V) < 0.2  # the gradient's leading subspaces are the planted ones
        elif init == "oracle":
            layer.set_factors("default", [U.float() for U in planted_factors])
        _, drops[init] = loss_drop_after_one_step(model, batches, lr=2.0)
        assert drops[init] > 0
    print(
        f"one SGD step: loss drop with gradient-HOOI factors {drops['gradient']:.4g}, planted (oracle) "
        f"{drops['oracle']:.4g}, random orthonormal {drops['random']:.3g}: x{drops['gradient'] / drops['random']:.0f}"
    )
    assert drops["gradient"] > 0.9 * drops["oracle"]
    assert drops["gradient"] > 100 * drops["random"]


def dense_gradient(model: nn.Module, layer: TuckerLoraLayer, batches, loss_fn) -> torch.Tensor:
    """The plain way: unfreeze the base weight and let autograd accumulate its full gradient."""
    w = layer.get_base_layer().weight
    w.requires_grad_(True)
    layer._disable_adapters = True
    try:
        for b in batches:
            loss_fn(model, b).backward()
        return w.grad.detach().clone()
    finally:
        w.grad = None
        w.requires_grad_(False)
        layer._disable_adapters = False


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
def test_streamed_gradient_proxy_equals_the_dense_gradient(method):
    """With sketches at least as large as the gradient's multilinear rank, the reduced-as-produced proxy gives
    the factors of the dense accumulated gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 20, 3, padding=1), nn.ReLU(), nn.Flatten(2), nn.Linear(27, 30))
    # (r_o > r_i on the Linear would leave HOOI's last o-vector arbitrary: its projected unfolding has r_i columns)
    config = TuckerLoraConfig(target_modules=["0", "3"], ranks=(3, 2, 1, 0, 2), rank_pattern={"3": (3, 3, 1, 1, 1)})
    model = get_peft_model(net, config)
    g = gen(1)
    batches = [torch.randn(1, 3, 3, 3, 3, generator=g) for _ in range(2)]

    def loss_fn(m, x):
        return m(x).square().sum()

    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, TuckerLoraLayer)}
    dense = {k: dense_gradient(model, layer, batches, loss_fn) for k, layer in layers.items()}
    # HOOI run to its fixed point on both sides: a tolerance-based stop would compare two unfinished iterates
    # (after 25 sweeps they still differ by sin angles of ~3e-3, and how far depends on the BLAS build)
    converged = {"n_iter_max": 200, "tol": 0.0}
    init_from_gradients(model, batches, loss_fn, method, oversample=40, progress=False, **converged)
    for key, layer in layers.items():
        mr = layer.mode_ranks["default"]
        ref = hooi(dense[key].double(), mr, **converged)[1] if method == "hooi" else hosvd(dense[key].double(), mr)[1]
        for n, (U, V) in enumerate(zip(layer.factors("default"), ref, strict=True)):
            assert sin_max_angle(U, V) < 1e-4, (key, n)


def test_sketched_gradient_proxy_is_exact_for_a_low_rank_gradient():
    """Sketches smaller than the layer (r + oversample < dim in both modes) still give the dense gradient's
    factors when its rank fits in them: a Linear fed 2 tokens per batch, over 2 batches, has rank <= 4."""
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(27, 30)), TuckerLoraConfig(target_modules=["0"], ranks=(3, 3, 1, 1, 1))
    )
    layer = model.base_model.model[0]
    g = gen(1)
    batches = [torch.randn(2, 27, generator=g) for _ in range(2)]

    def loss_fn(m, x):
        return (m(x) - 1).square().sum()

    dense = dense_gradient(model, layer, batches, loss_fn)
    init_from_gradients(model, batches, loss_fn, "hooi", oversample=5, progress=False)
    sketch_sizes = (min(30, 3 + 5), min(27, 3 + 5))
    assert sketch_sizes == (8, 8) and torch.linalg.matrix_rank(dense) <= 4
    for U, V in zip(layer.factors("default"), hooi(dense.double(), (3, 3))[1], strict=True):
        assert sin_max_angle(U, V) < 1e-4


def test_gradient_proxy_memory_and_state_restored(monkeypatch):
    """At most one adapted weight's full gradient is alive whenever a gradient is reduced; the per-layer state
    is a small fraction of the weights; flags, grads, weights and outputs are as before."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv3d(96, 96, 3, padding=1) for _ in range(4)])
    model = get_peft_model(net, TuckerLoraConfig(target_modules=["0", "1", "2", "3"], ranks=(4, 4, 1, 1, 1)))
    weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, TuckerLoraLayer)]
    before = [w.detach().clone() for w in weights]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(1, 96, 4, 6, 6, generator=gen(0))
    with torch.no_grad():
        ref = model(x)
    live, state = [], {}
    add = tinit._GradientSketch.add

    def counting_add(self, grad):
        live.append(sum(w.grad is not None for w in weights))
        add(self, grad)
        state[id(self)] = max(state.get(id(self), 0), self.nbytes())

    monkeypatch.setattr(tinit._GradientSketch, "add", counting_add)
    init_from_gradients(model, [x, x.flip(2)], lambda m, b: m(b).square().mean(), progress=False)
    assert len(live) == 2 * 2 * 4 and max(live) == 1  # 2 passes x 2 batches x 4 layers, one gradient at a time
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    # kept per layer: ~ 2 * (r + oversample) / channels of its weight (30% at 96 channels, 2% at 1280)
    assert len(state) == 4 and sum(state.values()) < 0.35 * weight_bytes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for w, b in zip(weights, before, strict=True):
        torch.testing.assert_close(w, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # zero cores: still the base model


def test_gradient_proxy_errors_and_generators(toy, video):
    model = get_peft_model(toy, TuckerLoraConfig(target_modules=TARGETS))

    def loss_fn(m, b):
        return m(b).square().mean()

    energies = init_from_gradients(model, (video * s for s in (1.0, 0.5)), loss_fn, "hosvd", progress=False)
    assert len(energies) == len(TARGETS)
    with pytest.raises(ValueError, match="method"):
        init_from_gradients(model, [video], loss_fn, "svd")
    with pytest.raises(ValueError, match="at least one"):
        init_from_gradients(model, [], loss_fn)
    with pytest.raises(ValueError, match="no Tucker-LoRA layer"):
        init_from_gradients(model, [video], loss_fn, adapter_name="nope")
    with pytest.warns(UserWarning, match="no gradient"):
        init_from_gradients(model, [video], lambda m, b: m.base_model.model.conv3d(b).square().mean(), progress=False)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        init_from_gradients(model, [video], loss_fn)


# --------------------------------------------------------------------------------------- speed
@pytest.mark.slow
def test_full_size_kernel_hosvd_is_fast():
    """1280x1280x3x3x3: tensorly's default takes ~10 s here (a full SVD of each 1280 x 34560 unfolding)."""
    X = torch.randn(1280, 1280, 3, 3, 3, generator=gen(0))
    hosvd(X, (4, 4, 1, 1, 1))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        hosvd(X, (4, 4, 1, 1, 1))
        times.append(time.perf_counter() - start)
    assert min(times) < 1.5


def test_config_init_runs_once_over_the_model_with_a_summary_per_layer_type(tmp_path, caplog):
    import logging

    from peft import PeftModel

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Linear(8, 8))
    cfg = TuckerLoraConfig(target_modules=["0", "1", "2"], init_weights="hosvd")
    with caplog.at_level(logging.INFO, logger="tucker_lora"):
        model = get_peft_model(copy.deepcopy(base), cfg)
    summaries = [r.getMessage() for r in caplog.records if "init from the base weights" in r.getMessage()]
    assert sorted(m.split(": ")[1].split(" layers")[0] for m in summaries) == ["1 Conv2d", "1 Conv3d", "1 Linear"]
    model.save_pretrained(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tucker_lora"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # the checkpoint overwrites it: no decomposition
    assert not [r for r in caplog.records if "init from" in r.getMessage()]
