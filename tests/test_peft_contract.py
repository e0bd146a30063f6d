"""What peft and diffusers expect of an adapter method: adapter dtypes (``autocast_adapter_dtype``),
``in_features`` / ``out_features``, the scaling API behind diffusers' ``set_adapters``, and diffusers' model
and adapter-file APIs on the tiny UNetMotionModel."""

from __future__ import annotations

import copy

import pytest
import tensorly as tl
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from conftest import TARGETS, ToyVideoNet
from tucker_lora import TuckerLoraConfig, TuckerLoraLayer
from tucker_lora.testing import default_targets, example_inputs, model_output, tiny_unet_motion


def tucker_delta(layer: TuckerLoraLayer, adapter: str, alpha: float) -> torch.Tensor:
    """``alpha * G x_1 U_1 ... x_N U_N`` in float64, by tensorly (independent of tucker_lora's reconstruct)."""
    with tl.backend_context("pytorch"):
        core = layer.tucker_lora_core[adapter].detach().double()
        return alpha * tl.tucker_to_tensor((core, [U.detach().double() for U in layer.factors(adapter)]))


def adapter_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "tucker_lora_" in n}


# ------------------------------------------------------------------------------------------- autocast_adapter_dtype
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_adapter_dtype_follows_autocast_adapter_dtype(dtype, autocast, low_cpu_mem_usage, tmp_path):
    """peft's matrix (test_adapter_dtype_autocast): float32 adapters with autocast, the base model's dtype
    without, through get_peft_model, add_adapter, PeftModel.from_pretrained and load_adapter; the loaded
    tensors are the saved ones and the loaded model computes what the saved one did."""
    torch.manual_seed(0)
    base = ToyVideoNet().to(dtype)
    expected = torch.float32 if autocast else dtype
    config = TuckerLoraConfig(target_modules=TARGETS, ranks=(3, 2, 2, 2, 2), init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast)
    model.add_adapter("other", copy.deepcopy(config), autocast_adapter_dtype=autocast)
    assert adapter_dtypes(model) == {expected}
    x = torch.randn(1, 3, 3, 5, 5).to(dtype)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])

    loaded = PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
    )
    loaded.load_adapter(
        tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert adapter_dtypes(loaded) == {expected}
    saved = model.state_dict()
    for key, value in loaded.state_dict().items():
        if "tucker_lora_" in key:
            assert torch.equal(value, saved[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_diffusers_add_adapter_keeps_the_models_dtype():
    """diffusers' add_adapter (peft's inject_adapter_in_model, no autocast) leaves the adapter in the model's
    dtype, as it leaves a peft LoRA adapter."""
    base = tiny_unet_motion().to(torch.bfloat16)
    tucker, lora = copy.deepcopy(base), copy.deepcopy(base)
    tucker.add_adapter(TuckerLoraConfig(target_modules=["conv1"]))
    lora.add_adapter(LoraConfig(target_modules=["conv1"]))
    assert adapter_dtypes(tucker) == {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.bfloat16}


class ReflectConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward (the adapter then runs merged into the weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))


LOW_PRECISION_LAYERS = {
    "linear": (lambda: nn.Linear(8, 6), (3, 4, 1, 1, 1), (3, 8)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (3, 2, 2, 1, 1), (2, 4, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 2, 1, 2, 2), (2, 4, 6, 6)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (3, 2, 1, 2, 0), (2, 4, 6, 6)),
    "conv2d-subclass": (lambda: ReflectConv2d(4, 6, 3), (3, 2, 1, 2, 2), (2, 4, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (3, 2, 0, 2, 2), (1, 4, 3, 5, 5)),
}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize(("forward_mode", "adapters"), [("factored", 1), ("merged", 1), ("auto", 2)])
@pytest.mark.parametrize("kind", sorted(LOW_PRECISION_LAYERS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_adapter_computes_the_update(kind, dtype, tol, forward_mode, adapters):
    """With autocast_adapter_dtype=False the fp16 / bf16 adapter runs every compute path (factored, merged, the
    merged-weight module path of a subclass, grouped, several adapters at once) in the base dtype: output and
    core gradient close to a float64 reference built from the same tensors."""
    make, ranks, in_shape = LOW_PRECISION_LAYERS[kind]
    torch.manual_seed(3)
    base = make().to(dtype)
    config = TuckerLoraConfig(
        target_modules=["layer"], ranks=ranks, alpha=1.5, init_weights=False, forward_mode=forward_mode
    )
    model = get_peft_model(Holder(copy.deepcopy(base)), config, autocast_adapter_dtype=False)
    names = ["default"]
    if adapters == 2:
        second = TuckerLoraConfig(target_modules=["layer"], ranks=ranks, init_weights=False)
        model.add_adapter("second", second, autocast_adapter_dtype=False)
        model.base_model.set_adapter(["default", "second"])
        names.append("second")
    layer = model.base_model.model.layer
    assert adapter_dtypes(model) == {dtype}
    x = torch.randn(in_shape).to(dtype)
    y = model(x)
    assert y.dtype == dtype
    core = layer.tucker_lora_core["default"]
    others = sum(tucker_delta(layer, a, layer.tucker_lora_alpha[a]) for a in names[1:])
    ref_core = core.detach().double().requires_grad_(True)
    with tl.backend_context("pytorch"):
        ref_delta = 1.5 * tl.tucker_to_tensor((ref_core, [U.detach().double() for U in layer.factors("default")]))
    ref = copy.deepcopy(base).double()
    params = {"weight": ref.weight.detach() + others + ref_delta, "bias": ref.bias.detach()}
    ref_y = torch.func.functional_call(ref, params, (x.double(),))
    scale = 1.0 + ref_y.abs().max().item()
    assert (y.double() - ref_y).abs().max().item() <= tol * scale
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y * g.to(dtype)).sum().backward()
    (ref_grad,) = torch.autograd.grad((ref_y * g.double()).sum(), ref_core)
    assert core.grad.dtype == dtype
    assert (core.grad.double() - ref_grad).abs().max().item() <= 4 * tol * (1.0 + ref_grad.abs().max().item())


# ------------------------------------------------------------------------------------------- in_features / out_features
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(7, 5),
        lambda: nn.Conv1d(4, 6, 3),
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda: nn.Conv2d(3, 9, 1),
        lambda: nn.Conv3d(5, 10, 3),
    ],
    ids=["linear", "conv1d", "conv2d-grouped", "conv2d-1x1", "conv3d"],
)
def test_in_and_out_features_match_peft_lora(make):
    """Every adapter layer has peft's ``in_features`` / ``out_features`` (a conv's in / out channels), equal to
    what peft LoRA's layer reports for the same base layer."""
    base = make()
    tucker = get_peft_model(Holder(copy.deepcopy(base)), TuckerLoraConfig(target_modules=["layer"]))
    lora = get_peft_model(Holder(copy.deepcopy(base)), LoraConfig(target_modules=["layer"], r=2))
    t, lo = tucker.base_model.model.layer, lora.base_model.model.layer
    assert (t.in_features, t.out_features) == (lo.in_features, lo.out_features)
    expected = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else None
    expected = expected or (base.in_channels, base.out_channels)
    assert (t.in_features, t.out_features) == expected


# ------------------------------------------------------------------------------------------- scaling API
def _scale_of(layer, adapter: str) -> float:
    """The applied scale over the configured one: Tucker ``alpha / tucker_lora_alpha``, LoRA ``scaling / (alpha/r)``."""
    if isinstance(layer, TuckerLoraLayer):
        return layer.alpha[adapter] / layer.tucker_lora_alpha[adapter]
    return layer.scaling[adapter] / (layer.lora_alpha[adapter] / layer.r[adapter])


def test_set_scale_scale_layer_unscale_layer_follow_peft_lora():
    """The same calls on a Tucker layer and a peft LoRA layer leave the same relative scale after each call."""
    base = Holder(nn.Linear(6, 4))
    tucker = get_peft_model(copy.deepcopy(base), TuckerLoraConfig(target_modules=["layer"], alpha=3.0))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["layer"], r=2, lora_alpha=6))
    for model in (tucker, lora):
        model.add_adapter("b", copy.deepcopy(model.peft_config["default"]))
        model.base_model.set_adapter(["default", "b"])
    t, lo = tucker.base_model.model.layer, lora.base_model.model.layer
    calls = [
        ("set_scale", ("b", 0.25)),
        ("scale_layer", (3.0,)),
        ("scale_layer", (1.0,)),
        ("unscale_layer", (3.0,)),
        ("set_scale", ("missing", 5.0)),
        ("scale_layer", (0.5,)),
        ("unscale_layer", (None,)),
    ]
    for name, args in calls:
        getattr(t, name)(*args)
        getattr(lo, name)(*args)
        for adapter in ("default", "b"):
            assert _scale_of(t, adapter) == pytest.approx(_scale_of(lo, adapter)), (name, args, adapter)


@pytest.fixture(scope="module")
def motion_two_adapters():
    """The tiny UNetMotionModel with Tucker adapters 'a' (alpha 1) and 'b' (alpha 2) through diffusers' API."""
    base = tiny_unet_motion()
    model = copy.deepcopy(base)
    targets = default_targets(model)
    torch.manual_seed(1)
    model.add_adapter(TuckerLoraConfig(target_modules=targets, ranks=(2, 2, 1, 1, 1), init_weights=False), "a")
    model.add_adapter(
        TuckerLoraConfig(target_modules=targets, ranks=(3, 2, 1, 2, 2), alpha=2.0, init_weights=False), "b"
    )
    return base, model, example_inputs(model, frames=2)


def _mixed_reference(base, model, inputs, weights: dict[str, float]) -> torch.Tensor:
    """The base model with ``W + sum_a w_a * alpha_a * dW_a`` (summed in float64) on every adapted layer."""
    ref = copy.deepcopy(base)
    layers = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, TuckerLoraLayer):
                weight = layers[name].weight
                delta = sum(
                    w * tucker_delta(layer, adapter, layer.tucker_lora_alpha[adapter])
                    for adapter, w in weights.items()
                    if adapter in layer.tucker_lora_core
                )
                weight.copy_(weight.double() + delta)
        return model_output(ref, inputs)


@pytest.mark.parametrize("weights", [(0.5, 1.0), (0.0, 0.0), (-1.0, 0.3)])
def test_diffusers_set_adapters_mixes_with_the_weights(motion_two_adapters, weights):
    """set_adapters(["a", "b"], weights) gives W + w_a dW_a + w_b dW_b to 1e-4; weights 0 give the base output."""
    base, model, inputs = motion_two_adapters
    model.set_adapters(["a", "b"], weights=list(weights))
    assert model.active_adapters() == ["a", "b"]
    with torch.no_grad():
        y = model_output(model, inputs)
        base_y = model_output(base, inputs)
    want = _mixed_reference(base, model, inputs, dict(zip("ab", weights, strict=True)))
    assert (y - want).abs().max().item() < 1e-4
    if weights == (0.0, 0.0):
        assert (y - base_y).abs().max().item() < 1e-5
    else:
        assert (want - base_y).abs().max().item() > 1e-2  # the mix matters


def test_diffusers_enable_disable_delete_and_lora_scale(motion_two_adapters):
    """disable_adapters gives the base output, enable_adapters the mix again, cross_attention_kwargs' scale
    multiplies it for one call (diffusers' scale_layer / unscale_layer), delete_adapters removes one adapter."""
    base, original, inputs = motion_two_adapters
    model = copy.deepcopy(original)
    model.set_adapters(["a", "b"], weights=[0.5, 1.0])
    with torch.no_grad():
        base_y = model_output(base, inputs)
        model.disable_adapters()
        assert (model_output(model, inputs) - base_y).abs().max().item() < 1e-5
        model.enable_adapters()
        scaled = model_output(model, {**inputs, "cross_attention_kwargs": {"scale": 0.5}})
        half = _mixed_reference(base, model, inputs, {"a": 0.25, "b": 0.5})
        assert (scaled - half).abs().max().item() < 1e-4
        mixed = _mixed_reference(base, model, inputs, {"a": 0.5, "b": 1.0})
        assert (model_output(model, inputs) - mixed).abs().max().item() < 1e-4  # enabled again, scale undone
        model.delete_adapters("a")
        assert list(model.peft_config) == ["b"] and model.active_adapters() == ["b"]
        only_b = _mixed_reference(base, model, inputs, {"b": 1.0})
        assert (model_output(model, inputs) - only_b).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------- diffusers' file API
def test_diffusers_save_and_load_lora_adapter_round_trip(motion_two_adapters, tmp_path):
    """save_lora_adapter on a Tucker adapter writes a peft adapter folder; load_lora_adapter (fresh model) and
    PeftModel.from_pretrained read it back to the same output; a LoRA adapter still takes diffusers' own path."""
    base, original, inputs = motion_two_adapters
    model = copy.deepcopy(original)
    model.set_adapters(["b"], weights=[1.0])
    model.save_lora_adapter(tmp_path / "b", adapter_name="b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with torch.no_grad():
        want = model_output(model, inputs)
        fresh = copy.deepcopy(base)
        fresh.load_lora_adapter(tmp_path / "b", adapter_name="b")
        torch.testing.assert_close(model_output(fresh, inputs), want, rtol=0, atol=0)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
        torch.testing.assert_close(model_output(peft_model, inputs), want, rtol=0, atol=0)

    lora = copy.deepcopy(base)
    lora.add_adapter(LoraConfig(target_modules=["conv1"], init_lora_weights=False), "l")
    lora.save_lora_adapter(tmp_path / "lora", adapter_name="l")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    again = copy.deepcopy(base)
    again.load_lora_adapter(
        tmp_path / "lora", prefix=None, adapter_name="l", weight_name="pytorch_lora_weights.safetensors"
    )
    with torch.no_grad():
        torch.testing.assert_close(model_output(again, inputs), model_output(lora, inputs), rtol=0, atol=1e-6)


def test_diffusers_load_lora_adapter_refuses_tucker_tensors_in_a_lora_file(motion_two_adapters, tmp_path):
    """A LoRA file (or state dict) holding Tucker-LoRA tensors is refused by name instead of loading nothing."""
    base, original, _ = motion_two_adapters
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(original, adapter_name="a")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "pytorch_lora_weights.safetensors")
    for source in (state, tmp_path):
        with pytest.raises(ValueError, match=r"holds Tucker-LoRA tensors \(e\.g\. '[^']*tucker_lora_.*save_as_lora"):
            copy.deepcopy(base).load_lora_adapter(source, adapter_name="x")
