"""Bad input gets a clear error that names the layer, the mode or the file; nothing saved is lost."""

from __future__ import annotations

import copy
import json
import re
import struct

import peft.peft_model
import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import TARGETS
from tucker_lora import AdapterFileError, TuckerLoraConfig, save_adapter
from tucker_lora.io import check_safetensors


@pytest.mark.parametrize(
    "ranks, match",
    [
        ((4, 4, 1, 1), "5 entries"),
        ((4, 4, 1, 1, 1, 1), "5 entries"),
        ((4, -1, 1, 1, 1), "r_i must be >= 0"),
        ((4, 4, 1.5, 1, 1), "r_t must be an integer"),
        ((4, 4, "1", 1, 1), "r_t must be an integer"),
        ((4, 4, True, 1, 1), "r_t must be an integer"),
        ("44111", "sequence of 5 integers"),
        (4, "sequence of 5 integers"),
    ],
)
def test_bad_ranks(ranks, match):
    with pytest.raises(ValueError, match=match):
        TuckerLoraConfig(target_modules=["x"], ranks=ranks)
    with pytest.raises(ValueError, match=r"rank_pattern\['conv'\]"):
        TuckerLoraConfig(target_modules=["x"], rank_pattern={"conv": ranks})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_weights": "svd"}, "init_weights"),
        ({"init_weights": 1}, "init_weights"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha_pattern": {"conv": "big"}}, r"alpha_pattern\['conv'\]"),
        ({"dropout": 1.0}, "dropout"),
        ({"core_init_scale": -0.1}, "core_init_scale"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuckerLoraConfig(target_modules=["x"], **kwargs)


def test_zero_channel_rank_names_the_layer(toy):
    cfg = TuckerLoraConfig(target_modules=TARGETS, rank_pattern={"temporal": (0, 4, 1, 1, 1)})
    with pytest.raises(ValueError, match="'temporal'.*r_o"):
        get_peft_model(toy, cfg)


def test_target_modules_matching_nothing(toy):
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(toy, TuckerLoraConfig(target_modules=["no_such_layer"]))


def test_unsupported_target_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match="'1' is a LayerNorm"):
        get_peft_model(model, TuckerLoraConfig(target_modules=["0", "1"]))


def test_missing_target_modules(toy):
    with pytest.raises(ValueError, match="target_modules is None"):
        get_peft_model(toy, TuckerLoraConfig())


def _saved(toy, path, **kw):
    pm = get_peft_model(copy.deepcopy(toy), TuckerLoraConfig(target_modules=TARGETS, init_weights=False, **kw))
    pm.save_pretrained(path)
    return pm


def test_checkpoint_with_other_ranks_names_layer_and_shapes(toy, tmp_path):
    _saved(toy, tmp_path, ranks=(4, 4, 1, 1, 1))
    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["rank_pattern"] = {"conv2d": [2, 4, 1, 1, 1]}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer 'conv2d'.*U_o.*\(6, 4\) in the checkpoint but \(6, 2\)"):
        PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)


def test_checkpoint_for_another_base_model(toy, tmp_path):
    from conftest import ToyVideoNet

    _saved(toy, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"layer '(conv3d|temporal|conv2d)': tucker_lora_U_[oi] has shape \(6, 4\) in the checkpoint but \(8, 4\)",
    ):
        PeftModel.from_pretrained(ToyVideoNet(channels=8), tmp_path)


def test_truncated_safetensors_names_the_file(toy, tmp_path):
    _saved(toy, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 40])
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors' is truncated"):
        PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)


def test_trailing_bytes_after_the_tensor_data_name_the_file(toy, tmp_path):
    """Bytes after the end of the tensor data: refused with the library's error naming the file (not safetensors')."""
    _saved(toy, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 16)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors' is corrupted: its header describes"):
        PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)


def test_check_safetensors_on_a_file_written_byte_by_byte(tmp_path):
    """The layout by hand (8-byte little-endian header length, JSON header, tensor bytes): the exact file passes
    and loads; one extra byte or one missing byte is an error naming the file and both sizes."""
    from safetensors.torch import load_file

    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    exact = struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)
    path = tmp_path / "hand.safetensors"
    path.write_bytes(exact)
    assert check_safetensors(path)["t"]["data_offsets"] == [0, 8]
    assert load_file(path)["t"].tolist() == [1.0, 2.0]
    for data, kind, holds in ((exact + b"x", "corrupted", 9), (exact[:-1], "truncated", 7)):
        path.write_bytes(data)
        message = f"'{path}' is {kind}: its header describes 8 bytes of tensor data, the file holds {holds}"
        with pytest.raises(AdapterFileError, match=re.escape(message)):
            check_safetensors(path)


@pytest.mark.parametrize("damage", ["header", "short", "garbage"])
def test_corrupted_safetensors_names_the_file(toy, tmp_path, damage):
    _saved(toy, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "header":
        data[10:20] = b"\xff" * 10
    elif damage == "short":
        data = data[:5]
    else:
        data = bytearray(b"this is not a safetensors file at all" * 3)
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors'"):
        PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path)


def test_failed_save_keeps_the_previous_checkpoint(toy, tmp_path, monkeypatch):
    old = get_peft_model(copy.deepcopy(toy), TuckerLoraConfig(target_modules=TARGETS, init_weights=False))
    save_adapter(old, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", broken_save)
    new = get_peft_model(copy.deepcopy(toy), TuckerLoraConfig(target_modules=TARGETS, init_weights=False, alpha=2.0))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(new, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not [p for p in tmp_path.parent.iterdir() if ".saving-" in p.name]
    monkeypatch.undo()
    save_adapter(new, tmp_path)  # a good save replaces the adapter files and keeps the rest
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha"] == 2.0
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path).peft_config["default"].alpha == 2.0
