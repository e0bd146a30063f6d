"""Tucker-LoRA on the three tiny video models of ``tucker_lora.testing``.

Per model: training touches only adapter parameters and lowers the loss; save -> load in a fresh
Python process reproduces the output; ``merge_and_unload`` matches the unmerged output; the adapter
sits on the intended layer kinds (temporal (3,1,1) Conv3d, Conv2d, motion-module Linear, 3x3x3 Conv3d).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import peft  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tucker_lora import TuckerLoraConfig, TuckerLoraLayer  # noqa: E402
from tucker_lora.testing import (  # noqa: E402
    BUILDERS,
    default_target_modules,
    default_targets,
    example_inputs,
    model_output,
)

MODELS = list(BUILDERS)
RANKS = (4, 4, 2, 2, 2)
FRAMES = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one intra-op thread (restored afterwards).

    The tiny models are fastest on one thread; on a 2-vCPU machine two spinning OpenMP threads were
    seen to stall for seconds per step, which made this file 3-10x slower and its timing erratic.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapted(model: nn.Module, init_weights: bool, seed: int = 1, **kwargs) -> peft.PeftModel:
    """``get_peft_model`` with the default targets; the adapter's random draws seeded by ``seed``."""
    config = TuckerLoraConfig(
        target_modules=default_targets(model), ranks=RANKS, alpha=1.0, init_weights=init_weights, **kwargs
    )
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def tucker_layers(model: nn.Module) -> dict[str, TuckerLoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TuckerLoraLayer)}


def strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


# ---------------------------------------------------------------------------------------------- builders


@pytest.mark.parametrize("name", MODELS)
def test_builders_are_deterministic_and_shape_preserving(name):
    a, b = BUILDERS[name](0), BUILDERS[name](0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    other = BUILDERS[name](1).state_dict().values()
    assert not all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), other, strict=True))
    inputs = example_inputs(a, frames=FRAMES)
    with torch.no_grad():
        out = model_output(a, inputs)
    sample = inputs.get("sample", inputs.get("x"))
    assert out.shape == sample.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- 1. training


@pytest.mark.parametrize("name", MODELS)
def test_training_changes_only_adapter_parameters_and_lowers_loss(name):
    model = BUILDERS[name](0)
    inputs = example_inputs(model, frames=FRAMES)
    with torch.no_grad():
        base_out = model_output(model, inputs)
    target = base_out + 0.1 * torch.randn(base_out.shape, generator=torch.Generator().manual_seed(7))

    peft_model = adapted(model, init_weights=True)
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    is_adapter = {n: "tucker_lora_" in n for n in before}
    assert any(is_adapter.values())
    trainable = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {n for n in before if is_adapter[n]}

    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model_output(peft_model, inputs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    after = dict(peft_model.named_parameters())
    for n, p in after.items():
        if not is_adapter[n]:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    changed = [n for n, p in after.items() if is_adapter[n] and not torch.equal(p, before[n])]
    assert changed, "no adapter parameter changed"
    assert any("tucker_lora_core" in n for n in changed)
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------------- 2. save / load

CHILD = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from tucker_lora.testing import BUILDERS, model_output
    name, folder = sys.argv[1], sys.argv[2]
    base = BUILDERS[name](123)  # a different seed: every base weight must come from the saved state dict
    base.load_state_dict(load_file(folder + "/base.safetensors"))
    import tucker_lora  # registers the tuner with peft
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, folder + "/adapter").eval()
    n_layers = sum(isinstance(m, tucker_lora.TuckerLoraLayer) for m in model.modules())
    with torch.no_grad():
        out = model_output(model, load_file(folder + "/inputs.safetensors"))
    save_file({"out": out.contiguous(), "n_layers": torch.tensor(n_layers)}, folder + "/out.safetensors")
    """
)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_in_fresh_process_gives_identical_outputs(name, tmp_path):
    model = BUILDERS[name](0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    inputs = example_inputs(model, frames=FRAMES)
    save_file(inputs, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        base_out = model_output(model, inputs)

    peft_model = adapted(model, init_weights=False).eval()
    with torch.no_grad():
        expected = model_output(peft_model, inputs)
    assert not torch.allclose(expected, base_out, atol=1e-4), "init_weights=False should change the output"
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = load_file(tmp_path / "out.safetensors")
    assert result["n_layers"].item() == len(tucker_layers(peft_model))
    torch.testing.assert_close(result["out"], expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 3. merge


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unload_matches_unmerged_output(name):
    model = BUILDERS[name](0)
    inputs = example_inputs(model, frames=FRAMES)
    with torch.no_grad():
        base_out = model_output(model, inputs)
    peft_model = adapted(model, init_weights=False).eval()
    with torch.no_grad():
        unmerged = model_output(peft_model, inputs)
    assert not torch.allclose(unmerged, base_out, atol=1e-4)

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, TuckerLoraLayer) for m in merged.modules())
    assert not any("tucker_lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out = model_output(merged, inputs)
    scale = unmerged.abs().max().item()
    torch.testing.assert_close(out, unmerged, rtol=0, atol=1e-5 * max(1.0, scale))


# ---------------------------------------------------------------------------------------------- 4. placement


def _kinds(layers: dict[str, TuckerLoraLayer]) -> dict[str, set]:
    """{layer type name: set of kernel sizes (None for Linear)} of the wrapped base layers."""
    out: dict[str, set] = {}
    for layer in layers.values():
        base = layer.get_base_layer()
        out.setdefault(type(base).__name__, set()).add(getattr(base, "kernel_size", None))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_adapter_sits_on_the_intended_layers(name):
    model = BUILDERS[name](0)
    expected = default_target_modules(model)
    all_conv3d = [n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    peft_model = adapted(model, init_weights=False)
    layers = {strip_peft_prefix(n): m for n, m in tucker_layers(peft_model).items()}
    assert sorted(layers) == sorted(expected)
    kinds = _kinds(layers)
    if name == "unet3d":
        assert kinds == {"Conv3d": {(3, 1, 1)}, "Conv2d": {(3, 3)}}
        assert all(".temp_convs." in n for n, m in layers.items() if isinstance(m.get_base_layer(), nn.Conv3d))
        assert len(layers) == 48
    elif name == "unet_motion":
        assert kinds == {"Conv2d": {(3, 3)}, "Linear": {None}}
        linears = [n for n, m in layers.items() if isinstance(m.get_base_layer(), nn.Linear)]
        assert linears and all(".motion_modules." in n for n in linears)
        assert any(n.endswith("motion_modules.0.proj_in") for n in linears)
        assert len(layers) == 86
    else:
        assert kinds == {"Conv3d": {(3, 3, 3)}}
        assert sorted(layers) == sorted(all_conv3d)
        assert len(layers) == 8
    # every adapter has a non-trivial core and reaches the output through the layer's delta weight
    for layer in layers.values():
        assert layer.get_delta_weight("default").abs().max() > 0


def test_motion_proj_in_keyword_call():
    """The AnimateDiff motion modules call ``proj_in(input=hidden_states)``: the adapter must apply there too."""
    model = BUILDERS["unet_motion"](0)
    inputs = example_inputs(model, frames=FRAMES)
    with torch.no_grad():
        base_out = model_output(model, inputs)
    config = TuckerLoraConfig(target_modules=r".*motion_modules\.\d+\.proj_in", ranks=RANKS, init_weights=False)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(model, config).eval()
    layers = tucker_layers(peft_model)
    assert len(layers) == 7 and all(isinstance(m.get_base_layer(), nn.Linear) for m in layers.values())

    layer = next(iter(layers.values()))
    x = torch.randn(2, 5, layer.get_base_layer().in_features)
    with torch.no_grad():
        by_keyword, by_position = layer(input=x), layer(x)
        reference = nn.functional.linear(x, layer.get_base_layer().weight + layer.get_delta_weight("default"))
    torch.testing.assert_close(by_keyword, by_position, rtol=0, atol=0)
    torch.testing.assert_close(by_keyword, reference + layer.get_base_layer().bias, rtol=1e-5, atol=1e-5)

    peft_model.train()
    out = model_output(peft_model, inputs)
    assert not torch.allclose(out.detach(), base_out, atol=1e-4), "adapters on proj_in did not change the output"
    out.square().mean().backward()
    for layer in layers.values():
        assert layer.tucker_lora_core["default"].grad is not None
        assert layer.tucker_lora_core["default"].grad.abs().max() > 0


def test_default_targets_are_peft_suffixes_matching_exactly_the_selection():
    for name in MODELS:
        model = BUILDERS[name](0)
        targets = default_targets(model)
        selected = set(default_target_modules(model))
        matched = {n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)}
        assert matched == selected, name
    assert default_targets(BUILDERS["unet3d"](0)) == [
        "conv1.2",
        "conv2.3",
        "conv3.3",
        "conv4.3",
        "resnets.0.conv1",
        "resnets.0.conv2",
        "resnets.1.conv1",
        "resnets.1.conv2",
    ]
