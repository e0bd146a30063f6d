"""The fused Triton kernels (``tucker_lora.triton_kernels``) against the torch ops they replace and against plain
``F.conv*d`` with the merged weight. On a machine without CUDA they run under the Triton interpreter
(``TRITON_INTERPRET=1``, set in conftest.py before triton is imported); without triton the module is skipped."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from tucker_lora import TuckerLoraConfig, functional  # noqa: E402
from tucker_lora import triton_kernels as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []


@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels launched while the test runs."""
    names: list[str] = []
    launch = tk.launch

    def counted(kernel, grid, *args, **kwargs):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tk, "launch", counted)
    return names


def _reference_layer(layer, x):
    """The base conv's own module with ``W + get_delta_weight()`` swapped in: independent of the adapter's paths."""
    base = layer.get_base_layer()
    weight = base.weight + layer.get_delta_weight("default")
    return torch.func.functional_call(base, {"weight": weight}, (x,))


def _adapt(base, ranks, mode, **kw):
    config = TuckerLoraConfig(target_modules=["0"], ranks=ranks, init_weights=False, forward_mode=mode, **kw)
    return get_peft_model(nn.Sequential(base), config).base_model.model[0]


@pytest.mark.parametrize(
    "ranks, kernel",
    [((4, 4, 1, 1, 1), (3, 3, 3)), ((3, 2, 2, 3, 2), (3, 2, 3)), ((2, 3, 2, 2), (3, 3)), ((2, 2, 2), (5,))],
    ids=["conv3d-rank-one", "conv3d", "conv2d", "conv1d"],
)
def test_small_kernel_and_its_gradients_match_the_torch_products(ranks, kernel, launches):
    """``alpha K`` and ``dG, dU_t, dU_h, dU_w`` from the two one-program kernels equal ``scaled_kernel`` and
    ``_kernel_grads`` (float64); the forward launch zeroes what it is given."""
    g = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64, "device": DEVICE}
    core = torch.randn(ranks, generator=g).to(**f64)
    factors = [torch.randn(k, r, generator=g).to(**f64) for k, r in zip(kernel, ranks[2:], strict=True)]
    acc = torch.full((5, 3), 7.0, **f64)
    Ka = tk.small_kernel(core, factors, -0.7, zero=[acc])
    ref, chain = functional.scaled_kernel(core, factors, -0.7)
    torch.testing.assert_close(Ka, ref, rtol=1e-12, atol=1e-12)
    assert not acc.any()
    dKa = torch.randn(Ka.shape, generator=g).to(**f64)
    needs = [True] * len(factors)
    (dG,), dU = tk.kernel_grads(dKa, -0.7, core, factors, True, needs)
    (dG_ref,), dU_ref = functional._kernel_grads(dKa, -0.7, core, factors, chain, True, needs)
    torch.testing.assert_close(dG, dG_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(dU, dU_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert launches == ["_small_kernel", "_kernel_grads"]


@pytest.mark.parametrize("groups", [None, 2], ids=["auto-groups", "2-groups"])
@pytest.mark.parametrize("batch, channels_last", [(1, False), (2, False), (2, True)])
def test_passes_match_the_torch_products(batch, channels_last, groups, monkeypatch):
    """``Q, dU_o`` from one pass over dy and ``dx += U_i dP, dU_i`` from one pass over (x, dP, dx) equal
    ``channel_mix`` and ``batched_outer``, contiguous or channels-last, one sample or several, with the channels in
    one group per block of positions or split into groups (whose shares of Q are summed with atomics)."""
    monkeypatch.setattr(tk, "CHANNEL_GROUPS", groups)
    g = torch.Generator().manual_seed(1)
    f64 = {"dtype": torch.float64, "device": DEVICE}
    big = torch.randn(batch, 37, 3, 5, 9, generator=g).to(**f64)  # 135 positions: a partial block of BLOCK_S
    if channels_last:
        big = big.to(memory_format=torch.channels_last_3d)
    small = torch.randn(batch, 3, 3, 5, 9, generator=g).to(**f64)
    U = torch.randn(37, 3, generator=g).to(**f64)
    acc = torch.zeros(37, 3, **f64)
    Q = tk.dy_pass(big, U, small, True, acc)
    torch.testing.assert_close(Q, functional.channel_mix(big, U.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc, functional.batched_outer(big, small), rtol=1e-12, atol=1e-12)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    dx = torch.randn(big.shape, generator=g).to(**f64).to(memory_format=layout)
    expected = dx + functional.channel_mix(small, U)
    acc.zero_()
    tk.x_dp_pass(big, small, U, dx, acc)
    torch.testing.assert_close(dx, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc, functional.batched_outer(big, small), rtol=1e-12, atol=1e-12)


LAYERS = [
    pytest.param(lambda: nn.Conv3d(6, 7, 3, padding=1), (3, 2, 1, 1, 1), (2, 6, 3, 4, 5), {}, id="conv3d-default"),
    pytest.param(
        lambda: nn.Conv3d(5, 4, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 2, 2, 3), (1, 5, 4, 5, 6), {},
        id="conv3d-strided",
    ),
    pytest.param(lambda: nn.Conv2d(6, 5, 3, padding=1), (3, 3, 1, 2, 1), (3, 6, 5, 5), {}, id="conv2d"),
    pytest.param(
        lambda: nn.Conv3d(6, 7, 3, padding=1), (3, 2, 0, 1, 1), (1, 6, 3, 4, 5), {"freeze_modes": ("i",)},
        id="conv3d-pinned-frozen-i",
    ),
]  # fmt: skip


@pytest.mark.parametrize("mode", ["factored", "merged"])
@pytest.mark.parametrize("make, ranks, shape, kw", LAYERS)
def test_fused_layer_matches_reference_in_forward_and_every_gradient(make, ranks, shape, kw, mode, launches):
    """With the fused kernels on, an adapted conv's output and the gradients of x and of every trainable adapter
    tensor equal those of the base conv with ``W + dW`` (float64), and its training forward equals its inference
    forward bitwise."""
    torch.manual_seed(2)
    base = make().double().to(DEVICE)
    layer = _adapt(base, ranks, mode, alpha=0.6, **kw).double().to(DEVICE)
    params = {n: p for n, p in layer.named_parameters() if "tucker_lora_" in n and p.requires_grad}
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with functional.fused_kernels(DEVICE):
        y = layer(x)
        with torch.no_grad():
            y_infer = layer(x)
    assert "_small_kernel" in launches
    ref = _reference_layer(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(y, y_infer)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, *params.values()], dy)
    expected = torch.autograd.grad(ref, [x, *params.values()], dy)
    for name, a, b in zip(["x", *params], got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    assert {"_dy_pass", "_x_dp_pass", "_kernel_grads"} <= set(launches)


def test_second_backward_of_one_graph_equals_the_first(launches):
    """The passes add into accumulators the forward zeroed once; a second backward through the same graph
    (``retain_graph``) takes the torch ops and gives the same gradients."""
    torch.manual_seed(3)
    layer = _adapt(nn.Conv3d(4, 5, 3, padding=1).double(), (2, 2, 1, 1, 1), "factored").double().to(DEVICE)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(1, 4, 3, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with functional.fused_kernels(DEVICE):
        y = layer(x)
    first = torch.autograd.grad(y.square().sum(), [x, *params], retain_graph=True)
    passes = launches.count("_dy_pass")
    second = torch.autograd.grad(y.square().sum(), [x, *params])
    assert passes == 1 and launches.count("_dy_pass") == 1
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_kernels_stay_off_by_default_and_under_deterministic_algorithms(launches):
    layer = _adapt(nn.Conv3d(4, 5, 3, padding=1), (2, 2, 1, 1, 1), "factored").to(DEVICE)
    x = torch.randn(1, 4, 3, 4, 4, device=DEVICE)
    layer(x).sum().backward()
    with functional.fused_kernels(DEVICE):
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            layer(x).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    assert launches == []


@pytest.mark.parametrize("precision", ["bf16-model", "bf16-autocast"])
def test_fused_layer_in_low_precision_matches_the_torch_ops(precision):
    """A bf16 base layer with float32 adapter parameters, or float32 under bf16 autocast: the fused kernels' output
    and gradients (float32 where the parameters are) stay as close to a float64 reference as the torch ops'."""
    torch.manual_seed(4)
    base = nn.Conv3d(8, 6, 3, padding=1).to(DEVICE)
    layer = _adapt(base, (3, 3, 1, 1, 1), "factored").to(DEVICE)
    with torch.no_grad():
        layer.tucker_lora_core["default"].normal_()
    params = [p for n, p in layer.named_parameters() if "tucker_lora_" in n and p.requires_grad]
    x = torch.randn(2, 8, 3, 5, 5, device=DEVICE)
    ref_layer = _adapt(copy.deepcopy(base).double(), (3, 3, 1, 1, 1), "factored")  # float64, the same adapter
    ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref_params = [p for n, p in ref_layer.named_parameters() if "tucker_lora_" in n and p.requires_grad]
    ref = ref_layer(x.double().requires_grad_(True))
    dy = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, ref_params, dy)
    if precision == "bf16-model":
        layer.get_base_layer().to(torch.bfloat16)
        x = x.bfloat16()
    amp = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    errors = {}
    for fused in ((), (DEVICE,)):
        with functional.fused_kernels(*fused), amp:
            y = layer(x)
        grads = torch.autograd.grad(y, params, dy.to(y.dtype))
        assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
        errors[bool(fused)] = [
            ((a.double() - b).norm() / b.norm()).item() for a, b in zip([y, *grads], [ref, *expected], strict=True)
        ]
    for torch_ops, fused in zip(errors[False], errors[True], strict=True):
        assert fused < max(2 * torch_ops, 1e-2), errors
