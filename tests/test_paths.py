"""The compute paths (factored, merged, auto) against plain ``F.conv*d`` with the merged weight."""

from __future__ import annotations

import contextlib
import copy
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import einsum_reconstruct
from tucker_lora import TuckerLoraConfig, TuckerLoraLayer, functional
from tucker_lora.functional import AdaptedConv, ConvGeometry
from tucker_lora.testing import saved_activation_bytes
from tucker_lora.tucker import reconstruct

MODES = ["factored", "merged", "auto"]
#: CUDA runs the same checks when present (on a GPU machine: ``pytest -m cuda``); CI has only the CPU.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


def _adapt(base: nn.Module, ranks, mode: str, **kw) -> TuckerLoraLayer:
    pm = get_peft_model(
        nn.Sequential(base),
        TuckerLoraConfig(target_modules=["0"], ranks=ranks, init_weights=False, forward_mode=mode, **kw),
    )
    return pm.base_model.model[0]


def _reference(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base conv's own math (``nn.ConvNd._conv_forward``) with another weight: independent of the adapter."""
    ref = copy.deepcopy(base)
    del ref.weight
    ref.weight = weight
    return ref(x)


def _adapter_params(layer: TuckerLoraLayer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in layer.named_parameters() if "tucker_lora_" in n and p.requires_grad}


def _assert_matches_reference(layer: TuckerLoraLayer, base: nn.Module, x: torch.Tensor, x_ref=None) -> None:
    """Forward and the gradients of x and every trainable adapter parameter equal those of the base conv with
    ``W + get_delta_weight()`` (``_reference``, fed ``x_ref``, by default x itself), in float64."""
    params = _adapter_params(layer)
    y = layer(x)
    ref = _reference(base, x if x_ref is None else x_ref, base.weight + layer.get_delta_weight("default"))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, *params.values()], dy)
    expected = torch.autograd.grad(ref, [x, *params.values()], dy)
    for name, a, b in zip(["x", *params], got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)


conv_settings = st.fixed_dictionaries(
    {
        "dims": st.sampled_from([1, 2, 3]),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "padding": st.sampled_from([0, 1, 2, "same", "valid"]),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "bias": st.booleans(),
        "kernel": st.integers(1, 3),
        "in_ch": st.integers(1, 5),
        "out_ch": st.integers(1, 5),
        "ranks": st.tuples(*[st.integers(0 if n >= 2 else 1, 4) for n in range(5)]),
        "alpha": st.sampled_from([1.0, -0.5, 2.0]),
    }
)


def _edge(dims: int, **kw) -> dict:
    """A ``conv_settings`` draw: a plain stride-1 conv of kernel 2 with ``padding="same"`` (an odd total pad, split
    unevenly), alpha 2 and trained kernel modes, with ``kw`` changed."""
    cfg = {"dims": dims, "stride": 1, "dilation": 1, "padding": "same", "padding_mode": "zeros", "bias": True}
    cfg |= {"kernel": 2, "in_ch": 3, "out_ch": 4, "ranks": (2, 3, 2, 2, 2), "alpha": 2.0}
    return cfg | kw


#: Draws every run must include, whatever the fixed draws hold: even kernels with "same" on each Conv
#: (the asymmetric split), every padding mode with "same" and with an int, alpha != 1 with pinned modes.
EDGE_CASES = [
    *(_edge(dims) for dims in (1, 2, 3)),
    _edge(2, kernel=2, dilation=2),  # even total pad 2: the symmetric branch
    _edge(3, kernel=3, dilation=1, alpha=-0.5, ranks=(2, 2, 0, 1, 0)),
    *(_edge(2, padding_mode=m) for m in ("reflect", "replicate", "circular")),
    *(_edge(1, padding=2, kernel=3, padding_mode=m) for m in ("zeros", "reflect", "replicate", "circular")),
]


def _with_edge_cases(test):
    """``test`` with an explicit hypothesis ``@example`` for each of ``EDGE_CASES`` (seed 0)."""
    for cfg in reversed(EDGE_CASES):
        test = example(cfg=cfg, seed=0)(test)
    return test


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=25, deadline=None)
@given(cfg=conv_settings, seed=st.integers(0, 2**16))
@_with_edge_cases
def test_paths_match_reference_in_forward_and_every_gradient(mode, device, cfg, seed):
    if cfg["padding"] == "same" and cfg["stride"] > 1:
        cfg = cfg | {"stride": 1}
    torch.manual_seed(seed)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[cfg["dims"]]
    base = conv_cls(
        cfg["in_ch"],
        cfg["out_ch"],
        cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        padding_mode=cfg["padding_mode"],
        bias=cfg["bias"],
    ).to(device, torch.float64)
    layer = _adapt(base, cfg["ranks"], mode, alpha=cfg["alpha"]).to(device, torch.float64)
    x = torch.randn(2, cfg["in_ch"], *[7] * cfg["dims"], dtype=torch.float64, device=device, requires_grad=True)
    _assert_matches_reference(layer, base, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "factored"])
@pytest.mark.parametrize("pinned", [False, True])
def test_adapted_conv_function_gradcheck(pinned, merge, device):
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2))
    conv = conv.to(device, torch.float64)
    g = ConvGeometry.of(conv)
    f64 = {"dtype": torch.float64, "device": device}
    core = torch.randn(2, 3, 1 if pinned else 2, 2, 2, **f64, requires_grad=True)
    factors = [
        torch.randn(4, 2, **f64, requires_grad=True),
        torch.randn(3, 3, **f64, requires_grad=True),
        torch.tensor([[0.0], [1.0], [0.0]], **f64) if pinned else torch.randn(3, 2, **f64, requires_grad=True),
        torch.randn(2, 2, **f64, requires_grad=True),
        torch.randn(3, 2, **f64, requires_grad=True),
    ]
    x = torch.randn(2, 3, 4, 5, 7, **f64, requires_grad=True)
    weight = conv.weight.detach().requires_grad_()
    bias = conv.bias.detach().requires_grad_()

    def f(x, weight, bias, core, *factors):
        return AdaptedConv.apply(x, weight, bias, g, 0.7, merge, core, *factors)

    assert torch.autograd.gradcheck(f, (x, weight, bias, core, *factors))


@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_linear_paths(mode):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = _adapt(base, (3, 2, 1, 1, 1), mode).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    ref = F.linear(x, base.weight + layer.get_delta_weight("default"), base.bias)
    torch.testing.assert_close(layer(x), ref)
    params = list(_adapter_params(layer).values())
    got = torch.autograd.grad(layer(x).sum(), [x, *params])
    for a, b in zip(got, torch.autograd.grad(ref.sum(), [x, *params]), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_modes_take_no_gradient_and_do_not_move(mode):
    torch.manual_seed(0)
    base = nn.Conv3d(4, 6, 3, padding=1)
    layer = _adapt(base, (3, 2, 2, 2, 2), mode, freeze_modes=("i", "t"))
    frozen = {"U_i": layer.tucker_lora_U_i["default"], "U_t": layer.tucker_lora_U_t["default"]}
    assert all(not p.requires_grad for p in frozen.values())
    before = {k: p.detach().clone() for k, p in frozen.items()}
    trained = {n: p.detach().clone() for n, p in _adapter_params(layer).items()}
    assert set(trained) == {
        "tucker_lora_core.default",
        "tucker_lora_U_o.default",
        "tucker_lora_U_h.default",
        "tucker_lora_U_w.default",
    }
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    x = torch.randn(2, 4, 3, 5, 5)
    layer(x).square().mean().backward()
    assert all(p.grad is None for p in frozen.values())
    opt.step()
    for k, p in frozen.items():
        assert torch.equal(p, before[k]), k
    assert all(not torch.equal(p, trained[n]) for n, p in _adapter_params(layer).items())
    # set_adapter / enable_adapters re-mark trainable params: the frozen modes must stay frozen
    layer.set_adapter("default")
    layer.enable_adapters(False)
    layer.enable_adapters(True)
    assert all(not p.requires_grad for p in frozen.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frozen", [("i",), ("o", "t", "h", "w"), "all"])
def test_frozen_modes_input_and_parameter_gradients_match_reference(mode, frozen):
    """Frozen factors change what the backward keeps (no x without U_i, no P without the core, kernel and U_o);
    the input gradient and the gradients of what still trains stay exact."""
    torch.manual_seed(0)
    base = nn.Conv3d(5, 6, 3, padding=1).double()
    freeze = () if frozen == "all" else frozen
    layer = _adapt(base, (3, 2, 2, 2, 2), mode, freeze_modes=freeze).double()
    if frozen == "all":  # the adapter as a fixed part of the model, gradients wanted for the input only
        layer.requires_grad_(False)
    x = torch.randn(2, 5, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    _assert_matches_reference(layer, base, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last_input_matches_reference(batch, dims, mode, device):
    """A channels-last input (``model.to(memory_format=torch.channels_last)``, common in diffusers) gives
    channels-last input gradients from the convolution backward; the adapter adds ``U_i dP`` into them in
    place, so it must follow their strides."""
    torch.manual_seed(0)
    conv, fmt = (nn.Conv2d, torch.channels_last) if dims == 2 else (nn.Conv3d, torch.channels_last_3d)
    base = conv(6, 7, 3, padding=1).double().to(device)
    layer = _adapt(base, (3, 2, 2, 1, 2), mode).double().to(device)
    x = torch.randn(batch, 6, *(4, 5, 5)[3 - dims :], dtype=torch.float64, device=device)
    x = x.to(memory_format=fmt).requires_grad_(True)
    _assert_matches_reference(layer, base, x, x_ref=x.contiguous())


@pytest.fixture
def split_everything(monkeypatch):
    """The CPU split of projections on for every size (it is off below ``SPLIT_MIN_NUMEL``), on 2 threads."""
    monkeypatch.setattr(functional, "SPLIT_MIN_NUMEL", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("spatial", [(4, 5, 6), (2, 3, 3), (3, 5, 5)], ids=["blocks-8", "blocks-2", "blocks-1"])
def test_split_projections_match_reference(spatial, channels_last, mode, split_everything):
    """The projections ``U_i^T x`` and ``U_o^T dy`` split into blocks along the positions (``split_blocks``: as many
    as divide their number) give the reference's forward and gradients, whatever the strides."""
    torch.manual_seed(0)
    S = spatial[0] * spatial[1] * spatial[2]
    assert functional.split_blocks(S, torch.empty(1)) == max(b for b in (8, 4, 2, 1) if S % b == 0)
    base = nn.Conv3d(5, 6, 3, padding=1).double()
    layer = _adapt(base, (3, 2, 2, 1, 2), mode).double()
    x = torch.randn(1, 5, *spatial, dtype=torch.float64)
    x = (x.to(memory_format=torch.channels_last_3d) if channels_last else x).requires_grad_(True)
    _assert_matches_reference(layer, base, x, x_ref=x.contiguous())


@pytest.mark.parametrize("mode", MODES)
def test_frozen_u_i_saves_only_the_projections(mode):
    """With U_i frozen the adapted conv keeps only P = U_i^T x (r_i / I of x) for the backward, instead of x
    (and, factored, z = conv(P, K)): r_i / I of what the unfrozen adapter keeps, and less than the frozen base
    conv keeps on its own."""
    torch.manual_seed(0)
    base = nn.Conv3d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 4, 8, 8)
    frozen_base = saved_activation_bytes(lambda: base(x.requires_grad_()))
    unfrozen = _adapt(copy.deepcopy(base), (4, 4, 1, 1, 1), mode)
    frozen = _adapt(copy.deepcopy(base), (4, 4, 1, 1, 1), mode, freeze_modes=("i",))
    x_bytes = x.numel() * x.element_size()  # y has as many
    assert frozen_base >= x_bytes  # torch's conv keeps x even with a frozen weight
    # adapter-sized extras: the small kernel K (r_o, r_i, 3, 3, 3) and what autograd keeps to build K (core,
    # the kernel factors' Kronecker product), each at most K's size
    adapter_bytes = 2 * 4 * 4 * 27 * 4
    projections = x_bytes * (4 / 32 + 4 / 32)  # P, and z where the factored forward computed it
    # unfrozen: x as well, for U_i's own gradient
    saved_unfrozen = saved_activation_bytes(lambda: unfrozen(x))
    assert x_bytes <= saved_unfrozen <= x_bytes + projections + adapter_bytes
    saved = saved_activation_bytes(lambda: frozen(x))
    assert saved - adapter_bytes <= 4 / 32 * x_bytes, saved / x_bytes  # P alone: r_i / I of x
    assert saved - adapter_bytes <= 4 / 32 * saved_unfrozen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_keeps_fp32_adapter(mode, device):
    torch.manual_seed(0)
    base = nn.Conv3d(8, 8, 3, padding=1).to(device)
    layer = _adapt(base, (4, 4, 2, 1, 1), mode)
    x = torch.randn(2, 8, 3, 6, 6, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16
    for p in _adapter_params(layer).values():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    ref = _reference(base, x, base.weight + layer.get_delta_weight("default"))
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1), nn.SiLU(), nn.Conv3d(6, 4, (3, 1, 1), padding=(1, 0, 0)))
    pm = get_peft_model(
        net, TuckerLoraConfig(target_modules=["0", "2"], init_weights=False, ranks=(3, 3, 2, 1, 1), forward_mode=mode)
    )
    x = torch.randn(2, 4, 3, 5, 5, requires_grad=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    plain = torch.autograd.grad(pm(x).square().sum(), [x, *params])
    ckpt = torch.autograd.grad(checkpoint(pm, x, use_reentrant=False).square().sum(), [x, *params])
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_functional_call_and_assigned_state_reach_the_adapter(mode):
    """The per-call path reads the core and factors from the ParameterDicts' own dicts; tensors put there by
    ``torch.func.functional_call`` and by ``load_state_dict(assign=True)`` are the ones it computes with: the output
    and the substituted tensors' gradients equal the base conv's with ``W + dW`` built from those tensors."""
    torch.manual_seed(0)
    base = nn.Conv3d(3, 5, 3, padding=1).double()
    layer = _adapt(base, (2, 2, 2, 1, 1), mode).double()
    x = torch.randn(1, 3, 4, 5, 5, dtype=torch.float64)
    new = {n: torch.randn_like(p, requires_grad=True) for n, p in _adapter_params(layer).items()}
    before = layer(x)
    y = torch.func.functional_call(layer, new, (x,))
    assert not torch.allclose(y, before)  # the substitution took effect
    mr = layer.mode_ranks["default"]
    core = new["tucker_lora_core.default"]
    factors = [new[f"tucker_lora_U_{m}.default"] for m in mr.modes]
    ref = _reference(base, x, base.weight + reconstruct(core, factors))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, list(new.values()), dy)
    expected = torch.autograd.grad(ref, list(new.values()), dy)
    for name, a, b in zip(new, got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)
    layer.load_state_dict({n: t.detach() for n, t in new.items()}, strict=False, assign=True)
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)


def test_auto_picks_by_shape():
    big_weight = _adapt(nn.Conv3d(64, 64, 3, padding=1), (4, 4, 1, 1, 1), "auto")
    assert big_weight._choose_path(torch.randn(1, 64, 2, 2, 2), big_weight.get_base_layer(), ["default"]) == "factored"
    big_input = _adapt(nn.Conv3d(8, 8, 3, padding=1), (4, 4, 1, 1, 1), "auto")
    assert big_input._choose_path(torch.randn(1, 8, 8, 16, 16), big_input.get_base_layer(), ["default"]) == "merged"


def test_auto_picks_by_grad_mode_between_the_factors():
    """With the weight at half the activations (between the training and inference factors of the CPU cost model),
    ``auto`` projects in training and merges in inference, and both give the reference output."""
    torch.manual_seed(0)
    base = nn.Conv3d(8, 8, 3, padding=1).double()
    layer = _adapt(base, (4, 4, 2, 1, 1), "auto").double()
    x = torch.randn(1, 8, 6, 6, 6, dtype=torch.float64)  # W = 1728 = 0.5 (x + y)
    train, infer = (functional.MERGED_WEIGHT_FACTOR["cpu"][k] for k in ("train", "infer"))
    assert train < 1728 / (2 * x.numel()) < infer
    assert layer._choose_path(x, base, ["default"]) == "factored"
    with torch.no_grad():
        assert layer._choose_path(x, base, ["default"]) == "merged"
        y = layer(x)
        ref = _reference(base, x, base.weight + layer.get_delta_weight("default"))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    _assert_matches_reference(layer, base, x.requires_grad_(True))


@pytest.fixture
def fresh_scratch():
    functional.release_scratch()
    yield
    functional.release_scratch()


def test_merged_layers_in_a_row_share_one_scratch_weight_and_stay_exact(fresh_scratch):
    """Merged layers of different sizes in a row write their weights into one per-thread buffer (grown for the
    larger, reused for the smaller); each forward consumes its weight before the next overwrites it, so outputs and
    every gradient through the stack equal the reference's."""
    torch.manual_seed(0)
    convs = [nn.Conv3d(3, 5, 3, padding=1), nn.Conv3d(5, 7, (3, 1, 1), padding=(1, 0, 0)), nn.Conv3d(7, 2, 1)]
    net = nn.Sequential(*convs).double()
    pm = get_peft_model(
        net, TuckerLoraConfig(target_modules=["0", "1", "2"], ranks=(2, 2, 1, 1, 1), init_weights=False,
                              forward_mode="merged"),
    ).double()  # fmt: skip
    layers = [pm.base_model.model[i] for i in range(3)]
    weights = [L.get_base_layer().weight + L.get_delta_weight("default") for L in layers]
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    y = pm(x)
    ref = x
    for L, w in zip(layers, weights, strict=True):
        ref = _reference(L.get_base_layer(), ref, w)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], dy)
    expected = torch.autograd.grad(ref, [x, *params], dy)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    (buffer,) = functional._SCRATCH.buffers.values()
    assert buffer.numel() == max(w.numel() for w in weights)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref, atol=1e-10, rtol=1e-10)
    assert functional._SCRATCH.buffers[(buffer.device, buffer.dtype)] is buffer  # reused, not reallocated


def test_scratch_is_per_thread_and_released(fresh_scratch):
    w = torch.empty(4, 3, 3)
    here = functional.scratch_like(w)
    assert here.shape == w.shape and functional.scratch_like(w).data_ptr() == here.data_ptr()
    other = []
    t = threading.Thread(target=lambda: other.append(functional.scratch_like(w).data_ptr()))
    t.start()
    t.join()
    assert other[0] != here.data_ptr()
    assert functional.scratch_like(torch.empty(2, 3, device="meta")) is None
    functional.release_scratch()
    assert not functional._SCRATCH.buffers


@pytest.mark.parametrize("first", ["inference_mode", "no_grad", "train"])
def test_merged_scratch_survives_inference_mode_and_training_in_any_order(first, fresh_scratch):
    """The merged weight's buffer, first made under ``first``, serves inference mode, no-grad and training calls
    after it with the reference's outputs (an inference tensor as buffer could not be written outside inference
    mode)."""
    torch.manual_seed(0)
    base = nn.Conv3d(4, 5, 3, padding=1).double()
    layer = _adapt(base, (2, 2, 1, 1, 1), "merged").double()
    x = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    ref = _reference(base, x, base.weight + layer.get_delta_weight("default")).detach()
    contexts = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "train": contextlib.nullcontext}
    for name in [first, *contexts]:
        with contexts[name]():
            torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)
    _assert_matches_reference(layer, base, x.clone().requires_grad_(True))


# ---------------------------------------------------------------------------------------------- edge cases
def _dense_delta(layer: TuckerLoraLayer, name: str, alpha: float) -> torch.Tensor:
    """``alpha G x_1 U_o x_2 U_i ...`` as one einsum of the layer's parameters (pinned modes: a one-hot at
    ``dim // 2``, built here), differentiable in them: independent of the adapter's own products."""
    mr = layer.mode_ranks[name]
    core = layer.tucker_lora_core[name]
    factors = []
    for mode, dim, pinned in zip(mr.modes, mr.dims, mr.pinned, strict=True):
        if pinned:
            U = torch.zeros(dim, 1, dtype=core.dtype, device=core.device)
            U[dim // 2, 0] = 1.0
        else:
            U = getattr(layer, f"tucker_lora_U_{mode}")[name]
        factors.append(U)
    return alpha * einsum_reconstruct(core, factors)


def _without_bias(base: nn.Module) -> nn.Module:
    conv = copy.deepcopy(base)
    conv.bias = None
    return conv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel", [2, 4])
def test_even_kernel_same_padding_matches_explicitly_padded_conv(kernel, dims, mode):
    """``padding="same"`` with an even kernel pads ``t // 2`` in front and the rest behind (t = k - 1, odd), as
    torch does: the adapted layer equals F.conv*d of the explicitly padded input with ``W + alpha dW`` (dW an
    einsum of its parameters) and torch's own ``padding="same"`` layer with that weight."""
    torch.manual_seed(0)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    base = conv_cls(3, 4, kernel, padding="same").double()
    layer = _adapt(base, (2, 3, 2, 2, 2), mode, alpha=2.0).double()
    x = torch.randn(2, 3, *[6] * dims, dtype=torch.float64, requires_grad=True)
    W = base.weight + _dense_delta(layer, "default", 2.0)
    t = kernel - 1
    explicit = F.pad(x, [t // 2, t - t // 2] * dims)
    ref = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims](explicit, W, base.bias)
    y = layer(x)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(_reference(base, x, W), ref, atol=1e-10, rtol=1e-10)  # torch's own "same"
    dy = torch.randn_like(ref)
    params = _adapter_params(layer)
    got = torch.autograd.grad(y, [x, *params.values()], dy)
    expected = torch.autograd.grad(ref, [x, *params.values()], dy)
    for name, a, b in zip(["x", *params], got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)


#: Eager-path draws every run includes: several adapters at alpha != 1, dropout, both, an even kernel with "same".
EAGER_EDGE_CASES = [
    {"adapters": 2, "dropout": 0.0, "alpha": 2.0, "cfg": _edge(3, kernel=3, padding=1)},
    {"adapters": 1, "dropout": 0.5, "alpha": -0.5, "cfg": _edge(2, kernel=3, padding=1, padding_mode="reflect")},
    {"adapters": 2, "dropout": 0.5, "alpha": 2.0, "cfg": _edge(1)},
    {"adapters": 2, "dropout": 0.0, "alpha": 3.0, "cfg": _edge(2)},
]


def _eager_config(ranks, alpha: float, case: dict) -> TuckerLoraConfig:
    return TuckerLoraConfig(target_modules=["0"], ranks=ranks, alpha=alpha, dropout=case["dropout"], init_weights=False)


@settings(max_examples=10, deadline=None)
@given(
    case=st.fixed_dictionaries(
        {
            "adapters": st.integers(1, 2),
            "dropout": st.sampled_from([0.0, 0.5]),
            "alpha": st.sampled_from([1.0, -0.5, 2.0]),
            "cfg": conv_settings,
        }
    ),
    seed=st.integers(0, 2**16),
)
@example(case=EAGER_EDGE_CASES[0], seed=0)
@example(case=EAGER_EDGE_CASES[1], seed=0)
@example(case=EAGER_EDGE_CASES[2], seed=0)
@example(case=EAGER_EDGE_CASES[3], seed=0)
def test_eager_path_matches_the_dense_weights(case, seed):
    """Several active adapters or adapter dropout (the eager factored path, in training): the output and the
    gradients of x and of every adapter parameter equal those of ``base(x) + sum_a conv(dropout_a(x), alpha_a dW_a)``
    with each dW_a an einsum of its parameters and the same dropout masks (drawn in the order of the adapters)."""
    cfg, n = case["cfg"], case["adapters"]
    if cfg["padding"] == "same":
        cfg = cfg | {"stride": 1}
    if n == 1 and case["dropout"] == 0.0:
        case = case | {"dropout": 0.5}  # one adapter without dropout takes AdaptedConv, tested above
    torch.manual_seed(seed)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[cfg["dims"]]
    base = conv_cls(
        cfg["in_ch"], cfg["out_ch"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], padding_mode=cfg["padding_mode"], bias=cfg["bias"],
    ).double()  # fmt: skip
    alphas = {"default": case["alpha"], "second": cfg["alpha"]}
    names = list(alphas)[:n]
    ranks = {"default": cfg["ranks"], "second": (2, 1, 2, 1, 2)}
    pm = get_peft_model(nn.Sequential(copy.deepcopy(base)), _eager_config(ranks["default"], alphas["default"], case))
    if n == 2:
        pm.add_adapter("second", _eager_config(ranks["second"], alphas["second"], case))
        pm.base_model.set_adapter(names)
    pm.double().train()
    layer = pm.base_model.model[0]
    assert layer._choose_path(torch.empty(1, cfg["in_ch"], 7), layer.get_base_layer(), names) == "eager"
    x = torch.randn(2, cfg["in_ch"], *[7] * cfg["dims"], dtype=torch.float64, requires_grad=True)
    torch.manual_seed(seed + 1)
    y = pm(x)
    torch.manual_seed(seed + 1)
    dropped = [F.dropout(x, case["dropout"], training=True) if case["dropout"] else x for _ in names]
    update = _without_bias(base)
    ref = _reference(base, x, base.weight)
    for a, x_a in zip(names, dropped, strict=True):
        ref = ref + torch.func.functional_call(update, {"weight": _dense_delta(layer, a, alphas[a])}, (x_a,))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    params = _adapter_params(layer)
    assert len(params) > 0
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, *params.values()], dy)
    expected = torch.autograd.grad(ref, [x, *params.values()], dy)
    for pname, a, b in zip(["x", *params], got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=pname)


def test_auto_on_cuda_is_always_factored():
    """On CUDA ``auto`` never merges, in training or inference, whatever the ratio of weight to activations (the
    CPU merges the smallest weights there); a stand-in for a CUDA input reaches the same choice through the layer."""
    sizes = [(10, 10**7, 10**7), (10**3, 10**5, 10**5), (10**6, 10**3, 10**3), (1, 1, 1)]
    for grad in (True, False):
        assert functional.choose_path(10, 10**6, 10**6, "cpu", grad=grad) == "merged"
        for weight, x, y in sizes:
            assert functional.choose_path(weight, x, y, "cuda", grad=grad) == "factored", (weight, x, y, grad)
    layer = _adapt(nn.Conv3d(8, 8, 3, padding=1), (4, 4, 1, 1, 1), "auto")
    big_input = torch.empty(1, 8, 8, 16, 16)
    assert layer._choose_path(big_input, layer.get_base_layer(), ["default"]) == "merged"  # on the CPU
    cuda_like = SimpleNamespace(numel=big_input.numel, device=torch.device("cuda"))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert layer._choose_path(cuda_like, layer.get_base_layer(), ["default"]) == "factored"
