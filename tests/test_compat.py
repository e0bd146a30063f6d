"""Tucker-LoRA on the convolutions of the diffusers video models (the compatibility matrix).

The models are the tiny configs of ``benchmarks/compat_matrix.py`` (``CASES``): video VAEs whose Conv3d
are subclasses that override ``forward`` (Wan's causal conv with a frame cache, CogVideoX's chunked conv),
video UNets with temporal Conv3d, AnimateDiff's Conv2d + motion Linear, Wan's Conv3d patch embedding.
Each gets a non-identity adapter on its default targets (``target_modules=None``, so
``tucker_lora.DEFAULT_TARGET_MODULES``), and: the forward runs and changes the output; the wrapped
layers are the model's own module objects; ``merge_and_unload()`` gives the unmerged output; every
adapter parameter gets a gradient; save -> load in a fresh process gives the same output.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import peft  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import tucker_lora  # noqa: E402
from tucker_lora import DEFAULT_TARGET_MODULES, TuckerLoraConfig, TuckerLoraLayer  # noqa: E402
from tucker_lora.layer import is_plain  # noqa: E402
from tucker_lora.targets import default_pattern, default_target_names  # noqa: E402

MATRIX_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compat_matrix.py"
_spec = importlib.util.spec_from_file_location("compat_matrix", MATRIX_PATH)
compat = sys.modules["compat_matrix"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)

NAMES = list(compat.CASES)
RANKS = compat.RANKS
PREFIX = "base_model.model."


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (restored afterwards): fastest and steadiest for tiny models on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Adapted:
    """A case's model with a non-identity Tucker-LoRA on its default targets, and its outputs."""

    model: peft.PeftModel
    originals: dict[str, nn.Module]  # name -> module object of the base model before wrapping
    base_state: dict[str, torch.Tensor]
    targets: list[str]
    inputs: dict[str, Any]
    base_out: torch.Tensor
    unmerged: torch.Tensor


_ADAPTED: dict[str, Adapted] = {}


def adapted(name: str) -> Adapted:
    """Build (once per test session) the case ``name`` with ``TuckerLoraConfig(target_modules=None, ...)``."""
    if name not in _ADAPTED:
        case = compat.CASES[name]
        base = case.model()
        originals = dict(base.named_modules())
        base_state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
        targets = default_target_names(base)
        inputs = case.inputs(base)
        with torch.no_grad():
            base_out = compat.output(base, inputs)
        torch.manual_seed(1)
        model = peft.get_peft_model(base, TuckerLoraConfig(ranks=RANKS, init_weights=False)).eval()
        with torch.no_grad():
            unmerged = compat.output(model, inputs)
        _ADAPTED[name] = Adapted(model, originals, base_state, targets, inputs, base_out, unmerged)
    return _ADAPTED[name]


def tucker_layers(model: nn.Module) -> dict[str, TuckerLoraLayer]:
    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, TuckerLoraLayer)}


# ---------------------------------------------------------------------------------------------- default targets


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_select_the_intended_layers(name):
    """The mapping's regex, filtered to adaptable layers, selects exactly what the family's rule says."""
    case = compat.CASES[name]
    model = case.model()
    expected = [n for n, m in model.named_modules() if case.expected(n, m)]
    assert expected and default_target_names(model) == expected


@pytest.mark.parametrize("name", NAMES)
def test_adapter_wraps_the_models_own_layers(name):
    """Every default target is wrapped, around the very module object it was (a subclass is never rebuilt)."""
    a = adapted(name)
    layers = tucker_layers(a.model)
    assert sorted(layers) == sorted(a.targets)
    for key, layer in layers.items():
        assert layer.get_base_layer() is a.originals[key], key


def test_the_matrix_covers_conv3d_subclasses_that_override_forward():
    kinds = {type(adapted(n).originals[t]).__name__ for n in ("wan_vae", "cogvideox_vae") for t in adapted(n).targets}
    assert {"WanCausalConv3d", "CogVideoXSafeConv3d"} <= kinds
    patch = tucker_layers(adapted("wan_transformer").model)["patch_embedding"].get_base_layer()
    assert type(patch) is nn.Conv3d and patch.kernel_size == (1, 2, 2) and patch.stride == (1, 2, 2)


def test_mapping_is_exported_and_found_through_base_classes():
    assert tucker_lora.DEFAULT_TARGET_MODULES is DEFAULT_TARGET_MODULES
    assert {type(adapted(n).model.get_base_model()).__name__ for n in NAMES} <= set(DEFAULT_TARGET_MODULES)
    stand_in = type("UNet3DConditionModel", (nn.Module,), {})  # the lookup goes by class name
    subclass = type("MyUNet", (stand_in,), {})
    assert default_pattern(subclass()) == DEFAULT_TARGET_MODULES["UNet3DConditionModel"]
    assert default_pattern(nn.Linear(2, 2)) is None


def test_readme_lists_every_default_target_family_and_every_matrix_row():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Compatibility") :].split("\n## ")[0]
    assert all(f"`{key}`" in section for key in DEFAULT_TARGET_MODULES)
    assert all(f"| {case.family} |" in section for case in compat.CASES.values())
    assert "benchmarks/compat_matrix.py" in section


def test_unknown_model_without_target_modules_lists_the_known_families():
    with pytest.raises(ValueError, match=r"target_modules is None.*AutoencoderKLWan.*name the modules"):
        peft.get_peft_model(nn.Sequential(nn.Conv3d(2, 2, 1)), TuckerLoraConfig())


# ---------------------------------------------------------------------------------------------- the four checks


@pytest.mark.parametrize("name", NAMES)
def test_forward_runs_and_the_adapter_changes_it(name):
    a = adapted(name)
    assert a.unmerged.shape == a.base_out.shape and torch.isfinite(a.unmerged).all()
    assert not torch.allclose(a.unmerged, a.base_out, atol=1e-4)


def _double(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("name", NAMES)
def test_merge_and_unload_matches_the_unmerged_output(name):
    """In float64, so that what is compared is the math (merged weight against the adapter's paths), not the
    float32 rounding of two orders of summation through a deep network."""
    a = adapted(name)
    model = copy.deepcopy(a.model).double()
    inputs = _double(a.inputs)
    with torch.no_grad():
        unmerged = compat.output(model, inputs)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, TuckerLoraLayer) for m in merged.modules())
        out = compat.output(merged, inputs)
    torch.testing.assert_close(
        unmerged.float(), a.unmerged, rtol=0, atol=1e-4 * max(1.0, a.unmerged.abs().max().item())
    )
    torch.testing.assert_close(out, unmerged, rtol=0, atol=1e-10 * max(1.0, unmerged.abs().max().item()))


@pytest.mark.parametrize("name", NAMES)
def test_every_adapter_parameter_gets_a_gradient(name):
    a = adapted(name)
    params = compat.adapter_params(a.model, "tucker_lora")
    assert params and all(p.requires_grad for p in params.values())
    try:
        compat.output(a.model, a.inputs).square().mean().backward()
        dead = [n for n, p in params.items() if p.grad is None or not (p.grad.abs().sum() > 0)]
        assert not dead, f"{len(dead)} of {len(params)} adapter parameters get no gradient: {dead[:3]}"
        frozen = [n for n, p in a.model.named_parameters() if n not in params and p.grad is not None]
        assert not frozen, frozen[:3]
    finally:
        a.model.zero_grad(set_to_none=True)


CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from safetensors.torch import load_file, save_file
    matrix, folder, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    spec = importlib.util.spec_from_file_location("compat_matrix", matrix)
    compat = sys.modules["compat_matrix"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)  # imports tucker_lora, which registers the tuner with peft
    from peft import PeftModel
    import tucker_lora
    torch.set_num_threads(1)
    for name in names:
        base = compat.CASES[name].model(seed=123)  # another seed: every base weight must come from the file
        base.load_state_dict(load_file(f"{folder}/{name}/base.safetensors"))
        model = PeftModel.from_pretrained(base, f"{folder}/{name}/adapter").eval()
        n_layers = sum(isinstance(m, tucker_lora.TuckerLoraLayer) for m in model.modules())
        with torch.no_grad():
            out = compat.output(model, load_file(f"{folder}/{name}/inputs.safetensors"))
        save_file({"out": out.contiguous(), "n_layers": torch.tensor(n_layers)}, f"{folder}/{name}/out.safetensors")
    """
)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory) -> Path:
    """Save every case's base weights, inputs and adapter; load them all in ONE fresh Python process."""
    folder = tmp_path_factory.mktemp("compat")
    for name in NAMES:
        a = adapted(name)
        (folder / name).mkdir()
        save_file(a.base_state, folder / name / "base.safetensors")
        save_file({k: v.contiguous() for k, v in a.inputs.items()}, folder / name / "inputs.safetensors")
        a.model.save_pretrained(folder / name / "adapter")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", CHILD, str(MATRIX_PATH), str(folder), json.dumps(NAMES)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_save_load_in_a_fresh_process_gives_the_same_output(name, reloaded):
    a = adapted(name)
    result = load_file(reloaded / name / "out.safetensors")
    assert result["n_layers"].item() == len(a.targets)
    torch.testing.assert_close(result["out"], a.unmerged, rtol=0, atol=1e-6)


def test_second_adapter_with_default_targets_lands_on_the_same_layers():
    model = compat.CASES["wan_transformer"].model()
    model = peft.get_peft_model(model, TuckerLoraConfig(ranks=RANKS, init_weights=False))
    model.add_adapter("second", TuckerLoraConfig(ranks=(2, 2, 1, 1, 1)))
    layers = tucker_layers(model)
    assert sorted(layers) == sorted(default_target_names(compat.CASES["wan_transformer"].model()))
    assert all(set(layer.tucker_lora_core) == {"default", "second"} for layer in layers.values())


# ---------------------------------------------------------------------------------------------- subclass semantics


def _with_merged_weight(layer: TuckerLoraLayer) -> nn.Module:
    """A copy of the base layer holding ``W + alpha * dW``: the reference for the adapted layer."""
    ref = copy.deepcopy(layer.get_base_layer())
    with torch.no_grad():
        ref.weight += layer.get_delta_weight("a")
    return ref


def test_wan_causal_conv_passes_the_frame_cache_through():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    torch.manual_seed(0)
    conv = WanCausalConv3d(4, 6, 3, padding=1)
    layer = TuckerLoraLayer(conv, "a", layer_name="conv", ranks=RANKS, init_weights=False)
    ref = _with_merged_weight(layer)
    x, cache = torch.randn(1, 4, 3, 5, 5), torch.randn(1, 4, 2, 5, 5)
    with torch.no_grad():
        for args, kwargs in [((x,), {}), ((x, cache), {}), ((x,), {"cache_x": cache})]:
            torch.testing.assert_close(layer(*args, **kwargs), ref(*args, **kwargs), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x, cache), layer(x), atol=1e-4)  # the cache really is used
    assert not is_plain(conv) and is_plain(nn.Conv3d(4, 6, 3))


class ChunkedConv3d(nn.Conv3d):
    """``CogVideoXSafeConv3d``'s chunking (overlapping time chunks, one ``super().forward`` each), always on."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        chunks = torch.chunk(input, 3, dim=2)
        chunks = [chunks[0]] + [torch.cat((chunks[i - 1][:, :, -k + 1 :], chunks[i]), 2) for i in range(1, 3)]
        outputs = []
        for chunk in chunks:
            outputs.append(super().forward(chunk))
        return torch.cat(outputs, dim=2)


def test_chunked_conv_runs_its_own_chunking_with_the_adapted_weight():
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXSafeConv3d

    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 5, 5, requires_grad=True)
    for conv in (ChunkedConv3d(4, 6, 3), CogVideoXSafeConv3d(4, 6, 3)):
        layer = TuckerLoraLayer(conv, "a", layer_name="conv", ranks=RANKS, init_weights=False)
        ref = _with_merged_weight(layer)
        y = layer(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        plain = nn.functional.conv3d(x, ref.weight, ref.bias)  # chunking is exact
        torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert layer.tucker_lora_core["a"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- bad input


def test_unsupported_layer_type_is_named_with_the_supported_types():
    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.ConvTranspose3d(2, 2, 3))
    with pytest.raises(TypeError, match=r"'1' is a ConvTranspose3d.*Linear, Conv1d, Conv2d, Conv3d"):
        peft.get_peft_model(model, TuckerLoraConfig(target_modules=["0", "1"]))


class Int8Conv3d(nn.Conv3d):
    """A weight-only quantised conv: int8 weight, float scale, dequantised in its forward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        q = (self.weight.detach() * 127).round().to(torch.int8)
        del self.weight
        self.weight = nn.Parameter(q, requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight.float() / 127, self.bias)


class QuantTensor(torch.Tensor):
    """Stands in for a quantised tensor subclass that reports a float dtype."""


def _quant_tensor_conv() -> nn.Conv3d:
    conv = nn.Conv3d(2, 2, 3)
    conv.weight = nn.Parameter(torch.Tensor._make_subclass(QuantTensor, conv.weight.detach()), requires_grad=False)
    return conv


@pytest.mark.parametrize(
    "make, match",
    [(lambda: Int8Conv3d(2, 2, 3), "Parameter of dtype torch.int8"), (_quant_tensor_conv, "QuantTensor")],
    ids=["int8", "tensor-subclass"],
)
def test_quantised_weight_is_refused_by_name(make, match):
    model = nn.Sequential(nn.Conv3d(2, 2, 1), make())
    with pytest.raises(TypeError, match=rf"layer '1': weight is a {match}.*plain floating-point"):
        peft.get_peft_model(model, TuckerLoraConfig(target_modules=["0", "1"]))


def test_base_weight_on_meta_errors_at_forward_instead_of_returning_garbage():
    """torch's CPU conv reads a meta weight as uninitialised memory without an error; the adapted layer stops."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Linear(4, 4))
    model = peft.get_peft_model(model, TuckerLoraConfig(target_modules=["0", "1"], init_weights=False))
    with pytest.raises(RuntimeError, match=r"layer '0': the base weight is on the meta device"):
        model(torch.randn(1, 2, 3, 4, 4))
    with model.disable_adapter(), pytest.raises(RuntimeError, match="meta device"):
        model(torch.randn(1, 2, 3, 4, 4))
    y = model(torch.empty(1, 2, 3, 4, 4, device="meta"))  # shape tracing on meta is fine
    assert y.is_meta and y.shape == (1, 3, 3, 4, 4)


def test_adapter_left_on_meta_errors_at_forward():
    """``low_cpu_mem_usage`` creates the adapter on meta; running before loading it is an error, not garbage."""
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1))
    model = peft.inject_adapter_in_model(TuckerLoraConfig(target_modules=["0"]), model, low_cpu_mem_usage=True)
    with pytest.raises(RuntimeError, match=r"layer '0': adapter 'default' \(tucker_lora_\w+\) is on the meta device"):
        model(torch.randn(1, 2, 3, 4, 4))
