"""The peft lifecycle with Tucker-LoRA, each step against plain torch on the base weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

import tucker_lora
from conftest import TARGETS, ToyVideoNet
from tucker_lora import TuckerLoraConfig, TuckerLoraLayer


def _config(**kw) -> TuckerLoraConfig:
    kw.setdefault("target_modules", list(TARGETS))
    return TuckerLoraConfig(**kw)


def _layers(model: torch.nn.Module) -> dict[str, TuckerLoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, TuckerLoraLayer)}


def _reference_model(base: ToyVideoNet, peft_model, adapters: list[str]) -> ToyVideoNet:
    """A plain copy of ``base`` whose weights are W + sum of the adapters' get_delta_weight."""
    ref = copy.deepcopy(base)
    layers = _layers(peft_model)
    with torch.no_grad():
        for name in TARGETS:
            if name in layers:
                for a in adapters:
                    if a in layers[name].tucker_lora_core:
                        getattr(ref, name).weight += layers[name].get_delta_weight(a)
    return ref


def test_get_peft_model_identity_at_init_and_trainable_count(toy, video):
    base_out = toy(video)
    pm = get_peft_model(copy.deepcopy(toy), _config())
    assert torch.equal(pm(video), base_out)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("tucker_lora_" in n for n in trainable)
    assert set(_layers(pm)) == set(TARGETS)


def test_non_identity_adapter_matches_merged_reference(toy, video):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    ref = _reference_model(toy, pm, ["default"])
    out = pm(video)
    assert not torch.allclose(out, toy(video), atol=1e-4)
    torch.testing.assert_close(out, ref(video), atol=1e-5, rtol=1e-5)


def test_inject_adapter_in_model_and_state_dict_round_trip(toy, video):
    model = inject_adapter_in_model(_config(init_weights=False), copy.deepcopy(toy))
    assert isinstance(model, ToyVideoNet) and set(_layers(model)) == set(TARGETS)
    state = get_peft_model_state_dict(model)
    assert state and all("tucker_lora_" in k for k in state)
    other = inject_adapter_in_model(_config(), copy.deepcopy(toy))
    assert not torch.allclose(other(video), model(video))
    result = set_peft_model_state_dict(other, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(other(video), model(video), atol=0, rtol=0)


def test_save_pretrained_is_adapter_only(toy, tmp_path):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".json", ".safetensors"}) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    n_adapter = sum(p.numel() for n, p in pm.named_parameters() if "tucker_lora_" in n)
    assert sum(t.numel() for t in saved.values()) == n_adapter
    assert all("tucker_lora_" in k and "base_layer" not in k for k in saved)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TUCKER_LORA" and cfg["ranks"] == [4, 4, 1, 1, 1]


def test_from_pretrained_same_process(toy, video, tmp_path):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False, ranks=(3, 2, 2, 1, 3)))
    out = pm(video)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)
    assert isinstance(loaded.peft_config["default"], TuckerLoraConfig)
    assert loaded.peft_config["default"].ranks == (3, 2, 2, 1, 3)
    torch.testing.assert_close(loaded(video), out, atol=0, rtol=0)


def test_merge_unmerge_restores_weights(toy, video):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    out = pm(video)
    before = {n: getattr(toy, n).weight.clone() for n in TARGETS}
    pm.base_model.merge_adapter()
    assert all(layer.merged for layer in _layers(pm).values())
    torch.testing.assert_close(pm(video), out, atol=1e-5, rtol=1e-5)
    pm.base_model.unmerge_adapter()
    for name, layer in _layers(pm).items():
        torch.testing.assert_close(layer.get_base_layer().weight, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(pm(video), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_nan_and_merges_nothing(toy, how):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    layers = _layers(pm)
    with torch.no_grad():
        layers["conv2d"].tucker_lora_core["default"][0, 0, 0, 0] = float("nan")
    before = {n: layer.get_base_layer().weight.clone() for n, layer in layers.items()}
    with pytest.raises(ValueError, match="conv2d"):
        getattr(pm.base_model, how)(safe_merge=True)
    for name, layer in _layers(pm).items():
        assert torch.equal(layer.get_base_layer().weight, before[name]), name
        assert not layer.merged


def test_merge_and_unload_gives_plain_model(toy, video):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    out = pm(video)
    merged = pm.merge_and_unload()
    assert type(merged) is ToyVideoNet and not _layers(merged)
    assert type(merged.conv3d) is torch.nn.Conv3d
    torch.testing.assert_close(merged(video), out, atol=1e-5, rtol=1e-5)


def test_unload_returns_original_base(toy, video):
    base_out = toy(video)
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    unloaded = pm.unload()
    assert not _layers(unloaded)
    assert torch.equal(unloaded(video), base_out)


def test_disable_adapter_context(toy, video):
    base_out = toy(video)
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    out = pm(video)
    with pm.disable_adapter():
        assert torch.equal(pm(video), base_out)
    torch.testing.assert_close(pm(video), out, atol=0, rtol=0)


def test_several_named_adapters(toy, video):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False), adapter_name="one")
    pm.add_adapter("two", _config(init_weights=False, ranks=(2, 2, 0, 1, 1)))
    assert pm.active_adapter == "one"
    out_a = pm(video)
    pm.set_adapter("two")
    out_b = pm(video)
    torch.testing.assert_close(out_b, _reference_model(toy, pm, ["two"])(video), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_a, out_b)
    # only the active adapter trains
    grads = {n: p.requires_grad for n, p in pm.named_parameters() if "tucker_lora_" in n}
    assert all(g == (".two" in n) for n, g in grads.items())
    # both active at once: W + dW_a + dW_b
    pm.base_model.set_adapter(["one", "two"])
    torch.testing.assert_close(pm(video), _reference_model(toy, pm, ["one", "two"])(video), atol=1e-5, rtol=1e-5)
    pm.base_model.set_adapter("one")
    pm.delete_adapter("two")
    assert all("two" not in layer.tucker_lora_core for layer in _layers(pm).values())
    torch.testing.assert_close(pm(video), out_a, atol=0, rtol=0)


def test_rank_and_alpha_patterns(toy):
    cfg = _config(
        ranks=(2, 2, 1, 1, 1),
        rank_pattern={"temporal": (5, 3, 3, 1, 1), "conv2d": (1, 1, 0, 2, 2)},
        alpha_pattern={"head": 0.5},
        alpha=2.0,
    )
    layers = _layers(get_peft_model(copy.deepcopy(toy), cfg))
    assert layers["temporal"].mode_ranks["default"].ranks == (5, 3, 3, 1, 1)
    assert layers["conv2d"].mode_ranks["default"].ranks == (1, 1, 2, 2)
    assert layers["conv3d"].mode_ranks["default"].ranks == (2, 2, 1, 1, 1)
    assert layers["head"].alpha["default"] == 0.5 and layers["conv3d"].alpha["default"] == 2.0


def test_alpha_scales_the_update(toy):
    torch.manual_seed(3)
    one = _layers(get_peft_model(copy.deepcopy(toy), _config(init_weights=False)))["conv3d"]
    torch.manual_seed(3)
    three = _layers(get_peft_model(copy.deepcopy(toy), _config(init_weights=False, alpha=3.0)))["conv3d"]
    torch.testing.assert_close(three.get_delta_weight("default"), 3 * one.get_delta_weight("default"))


def test_modules_to_save_trains_and_round_trips(toy, video, tmp_path):
    cfg = _config(target_modules=["conv3d", "conv2d"], modules_to_save=["head"], init_weights=False)
    pm = get_peft_model(copy.deepcopy(toy), cfg)
    head = [p for n, p in pm.named_parameters() if "head" in n and p.requires_grad]
    assert head, "modules_to_save must make the head trainable"
    with torch.no_grad():
        for p in head:
            p.add_(0.5)
    out = pm(video)
    pm.save_pretrained(tmp_path)
    assert any("head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)
    torch.testing.assert_close(loaded(video), out, atol=0, rtol=0)


@pytest.mark.parametrize(
    "ranks_a, ranks_b, weights",
    [
        ((4, 4, 1, 1, 1), (4, 4, 1, 1, 1), (1.0, 1.0)),
        ((2, 3, 0, 1, 1), (3, 1, 2, 2, 1), (0.7, -1.3)),  # pinned + trained t mode, negative weight
        ((6, 6, 3, 3, 3), (5, 4, 3, 2, 3), (0.5, 2.0)),  # concatenated ranks exceed the mode sizes
        ((2, 2, 0, 0, 0), (3, 3, 0, 0, 0), (1.0, 0.25)),  # all kernel modes pinned in both
    ],
)
def test_add_weighted_adapter_is_exact(toy, video, tmp_path, ranks_a, ranks_b, weights):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False, ranks=ranks_a, alpha=1.5), adapter_name="one")
    pm.add_adapter("two", _config(init_weights=False, ranks=ranks_b, alpha=0.5, target_modules=TARGETS[:3]))
    pm.add_weighted_adapter(["one", "two"], list(weights), "mix")
    for name, layer in _layers(pm).items():
        expected = weights[0] * layer.get_delta_weight("one")
        if "two" in layer.tucker_lora_core:
            expected = expected + weights[1] * layer.get_delta_weight("two")
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-5, rtol=1e-4, msg=name)
        mr = layer.mode_ranks["mix"]
        assert all(r <= d for r, d in zip(mr.ranks, mr.dims, strict=True))
    pm.set_adapter("mix")
    out = pm(video)
    pm.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path / "mix")
    torch.testing.assert_close(loaded(video), out, atol=1e-6, rtol=1e-6)


def test_add_weighted_adapter_keeps_pinned_modes_pinned(toy):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False, ranks=(2, 2, 0, 1, 1)), adapter_name="one")
    pm.add_adapter("two", _config(init_weights=False, ranks=(2, 2, 0, 1, 1)))
    pm.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
    delta = _layers(pm)["conv3d"].get_delta_weight("mix")
    assert torch.count_nonzero(delta[:, :, [0, 2]]) == 0
    assert _layers(pm)["conv3d"].mode_ranks["mix"].pinned[2]


def test_rank_clipping_is_logged_once(monkeypatch, caplog):
    """Ranks above the mode sizes: one INFO line per layer type and clipping for the whole process, naming the
    clipped modes, however many layers and models clip the same way; nothing when no rank is clipped."""
    import logging

    import tucker_lora.layer

    monkeypatch.setattr(tucker_lora.layer, "_CLIPPING_REPORTED", set())

    def net() -> torch.nn.Sequential:
        return torch.nn.Sequential(*[torch.nn.Conv2d(4, 4, 3) for _ in range(3)])

    def clipping_lines(ranks) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tucker_lora"):
            get_peft_model(net(), _config(target_modules=["0", "1", "2"], ranks=ranks))
        return [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]

    assert clipping_lines((2, 2, 1, 1, 1)) == []
    (line,) = clipping_lines((8, 8, 1, 3, 5))
    assert "Conv2d" in line and "r_o 8 -> 4, r_i 8 -> 4, r_w 5 -> 3" in line
    assert clipping_lines((8, 8, 1, 3, 5)) == []  # a second model clipping the same way: already said


def test_import_registers_a_real_peft_type():
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType("TUCKER_LORA") is PeftType.TUCKER_LORA is tucker_lora.TUCKER_LORA
    assert PeftType["TUCKER_LORA"].value == "TUCKER_LORA" and PeftType.TUCKER_LORA in list(PeftType)
    assert TuckerLoraConfig().peft_type.value == "TUCKER_LORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TUCKER_LORA"] is TuckerLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TUCKER_LORA] is tucker_lora.TuckerLoraModel


def test_linear_only_model_matches_functional_reference():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(7, 5))
    pm = get_peft_model(
        copy.deepcopy(lin), TuckerLoraConfig(target_modules=["0"], init_weights=False, ranks=(2, 3, 1, 1, 1))
    )
    layer = _layers(pm)["0"]
    x = torch.randn(3, 7)
    w = lin[0].weight + layer.get_delta_weight("default")
    torch.testing.assert_close(pm(x), F.linear(x, w, lin[0].bias), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Linear(6, 5),
        torch.nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"),
        torch.nn.Conv2d(6, 4, 3, padding=1, groups=2),
        torch.nn.Conv3d(6, 4, (3, 1, 1), stride=(1, 2, 2)),
    ],
    ids=["linear", "conv2d-reflect", "conv2d-grouped", "conv3d"],
)
def test_dropout_acts_on_the_adapter_input_only(layer):
    torch.manual_seed(0)
    base = torch.nn.Sequential(layer)
    pm = get_peft_model(copy.deepcopy(base), TuckerLoraConfig(target_modules=["0"], init_weights=False, dropout=0.5))
    adapted = _layers(pm)["0"]
    x = torch.randn(2, 6) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 6, *([5] * (layer.weight.ndim - 2)))
    delta = adapted.get_delta_weight("default")
    pm.train()
    torch.manual_seed(7)
    out = pm(x)
    torch.manual_seed(7)
    x_drop = F.dropout(x, 0.5, training=True)
    delta_only = copy.deepcopy(layer)
    with torch.no_grad():
        delta_only.weight.copy_(delta)
        delta_only.bias = None
    torch.testing.assert_close(out, layer(x) + delta_only(x_drop), atol=1e-5, rtol=1e-5)
    pm.eval()
    merged = copy.deepcopy(layer)
    with torch.no_grad():
        merged.weight += delta
    torch.testing.assert_close(pm(x), merged(x), atol=1e-5, rtol=1e-5)


def test_low_cpu_mem_usage_loading(toy, video, tmp_path):
    pm = get_peft_model(copy.deepcopy(toy), _config(init_weights=False))
    out = pm(video)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.testing.assert_close(loaded(video), out, atol=0, rtol=0)


@pytest.mark.parametrize("exclude", [["temporal", "head"], r"(temporal|head)"])
def test_exclude_modules(toy, exclude):
    pm = get_peft_model(copy.deepcopy(toy), _config(exclude_modules=exclude))
    assert set(_layers(pm)) == {"conv3d", "conv2d"}
