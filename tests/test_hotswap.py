"""``tucker_lora.hotswap_adapter``: a saved adapter's tensors copied into a loaded one, on a compiled model
without recompiling; refusals name the layer and change nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from tucker_lora import TuckerLoraConfig, hotswap_adapter


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(x).mean(2)
        return self.fc(self.c2(torch.relu(y)).mean((2, 3)))


SMALL_RANKS = (2, 2, 0, 2, 2)


def _save_small(base: nn.Module, path: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    kwargs = dict(target_modules=["c3", "c2", "fc"], ranks=SMALL_RANKS, init_weights=False) | config
    get_peft_model(copy.deepcopy(base), TuckerLoraConfig(**kwargs)).save_pretrained(path)
    return path


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_hotswap_on_a_compiled_model_runs_the_new_adapter_without_recompiling(tmp_path, fresh_dynamo):
    """After hotswap_adapter the compiled model gives the new adapter's output (exactly when alpha is the
    same; alpha folded into the core otherwise), and torch._dynamo compiles no new graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = Small()
    x = torch.randn(2, 2, 3, 5, 5)
    first = _save_small(base, tmp_path / "first", 1)
    same_alpha = _save_small(base, tmp_path / "same", 2)
    other_alpha = _save_small(base, tmp_path / "other", 3, alpha=3.0, alpha_pattern={"fc": 0.5})
    model = PeftModel.from_pretrained(copy.deepcopy(base), first)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x)
        compiled(x)  # the second call recompiles once (the first fills the layers' centre-tap cache)
        counters.clear()
        for path, exact in ((same_alpha, True), (other_alpha, False)):
            hotswap_adapter(compiled, path)
            y = compiled(x)
            want = PeftModel.from_pretrained(copy.deepcopy(base), path)(x)
            if exact:
                assert torch.equal(y, want)
            else:
                torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
                assert (y - base(x)).abs().max() > 1e-2  # the swapped adapter is not a no-op
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert model.base_model.model.fc.alpha["default"] == 1.0  # the attribute dynamo guards on is untouched


def test_hotswap_refuses_different_ranks_naming_the_layer_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    base = Small()
    first = _save_small(base, tmp_path / "first", 1)
    other = _save_small(base, tmp_path / "other", 2, rank_pattern={"c2": (2, 1, 1, 2, 2)})
    model = PeftModel.from_pretrained(copy.deepcopy(base), first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'c2'.*ranks differ"):
        hotswap_adapter(model, other)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"no Tucker-LoRA adapter named 'nope' is loaded \(loaded: \['default'\]\)"):
        hotswap_adapter(model, first, adapter_name="nope")


def test_hotswap_zeroes_layers_the_new_adapter_lacks_and_refuses_new_layers(tmp_path):
    torch.manual_seed(0)
    base = Small()
    x = torch.randn(2, 2, 3, 5, 5)
    full = _save_small(base, tmp_path / "full", 1)
    part = _save_small(base, tmp_path / "part", 2, target_modules=["c3", "fc"])
    model = PeftModel.from_pretrained(copy.deepcopy(base), full)
    hotswap_adapter(model, part)
    assert not model.base_model.model.c2.tucker_lora_core["default"].any()
    with torch.no_grad():
        torch.testing.assert_close(model(x), PeftModel.from_pretrained(copy.deepcopy(base), part)(x), rtol=0, atol=0)
    narrow = PeftModel.from_pretrained(copy.deepcopy(base), part)
    with pytest.raises(ValueError, match=r"adapts layer 'c2', which adapter 'default' does not adapt"):
        hotswap_adapter(narrow, full)


def test_hotswap_refuses_a_lora_folder_and_a_merged_adapter(tmp_path):
    torch.manual_seed(0)
    base = Small()
    get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["fc"])).save_pretrained(tmp_path / "lora")
    first = _save_small(base, tmp_path / "first", 1)
    model = PeftModel.from_pretrained(copy.deepcopy(base), first)
    with pytest.raises((ValueError, TypeError)):
        hotswap_adapter(model, tmp_path / "lora")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into layer"):
        hotswap_adapter(model, first)
