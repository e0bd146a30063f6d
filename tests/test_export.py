"""Export of Tucker-LoRA adapters to LoRA (``tucker_lora.convert_to_lora`` / ``save_as_lora``).

References, none of them this project's code: peft's own LoRA layers and diffusers' ``load_lora_weights``,
run in ONE fresh Python process that never imports tucker_lora; LyCORIS's ``create_lycoris_from_weights`` for
the kohya file; dense ``torch.linalg.svdvals`` of ``get_delta_weight()`` for the truncation errors. Adapters
are trained-like: a random core and factors perturbed off orthonormality.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import tucker_lora
from adapted_models import layers_of, perturbed, rel
from tucker_lora import TuckerLoraConfig, TuckerLoraLayer, convert_to_lora, save_as_lora
from tucker_lora.export.cli import export_cli
from tucker_lora.testing import example_inputs, model_output, tiny_unet3d, tiny_unet_motion

FRAMES = 3
ROOT = Path(__file__).resolve().parents[1]
#: AnimateDiff's motion-module layers without the ones its forward calls as ``proj_in(input=x)``.
MOTION_POSITIONAL = (
    r"(.*\.)?(resnets\.\d+\.conv[12]|motion_modules\.\d+\.transformer_blocks\.\d+\.attn\d+\.(to_q|to_k|to_v|to_out\.0))"
)
PIPE_CALL = dict(prompt="a red circle moving left", num_frames=2, num_inference_steps=2, guidance_scale=1.0)


# ---------------------------------------------------------------------------------------------- models
class CausalConv3d(nn.Conv3d):
    """A Conv3d that overrides ``forward`` (pads time causally, as Wan's causal conv does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, (1, 1, 1, 1, 2, 0)), self.weight, self.bias)


def torch_case(kind: str) -> tuple[nn.Module, TuckerLoraConfig, torch.Tensor]:
    """Base, config and input of each plain layer kind; rank patterns pin modes and exceed mode sizes."""
    torch.manual_seed(0)
    if kind == "conv3d":
        base = nn.Sequential(
            nn.Conv3d(4, 6, 3, padding=1),
            nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0)),
            nn.Conv3d(6, 5, 3, stride=(1, 2, 2), padding=1),
        )
        pattern = {"1": (16, 16, 0, 1, 1), "2": (2, 4, 3, 0, 0)}
        return (
            base,
            TuckerLoraConfig(ranks=(3, 3, 2, 2, 2), rank_pattern=pattern, alpha=0.7),
            torch.randn(2, 4, 5, 6, 6),
        )
    if kind == "conv2d_same":
        base = nn.Sequential(nn.Conv2d(4, 6, 3, padding="same"), nn.Conv2d(6, 5, (4, 2), padding="same"))
        pattern = {"1": (2, 2, 1, 0, 2)}
        return base, TuckerLoraConfig(ranks=(3, 3, 1, 2, 1), rank_pattern=pattern, alpha=1.3), torch.randn(2, 4, 7, 7)
    if kind == "conv1d":
        base = nn.Sequential(nn.Conv1d(4, 6, 5, padding=2), nn.Conv1d(6, 3, 3, stride=2))
        pattern = {"1": (8, 8, 1, 1, 0)}
        return base, TuckerLoraConfig(ranks=(3, 2, 1, 1, 3), rank_pattern=pattern), torch.randn(2, 4, 11)
    assert kind == "linear"
    base = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 12))
    return base, TuckerLoraConfig(ranks=(16, 16, 1, 1, 1), alpha=0.5), torch.randn(3, 8)


TORCH_KINDS = ("conv3d", "conv2d_same", "conv1d", "linear")


def torch_config(kind: str, base: nn.Module, config: TuckerLoraConfig) -> TuckerLoraConfig:
    config.target_modules = [n for n, _ in base.named_children()]
    config.init_weights = False
    return config


def merged_reference(model: peft.PeftModel, x: torch.Tensor) -> torch.Tensor:
    """The plain layers with ``W + get_delta_weight()``, called through ``torch.func.functional_call``."""
    base = model.get_base_model()
    weights = {f"{n}.weight": layer.get_base_layer().weight + layer.get_delta_weight("default") for n, layer in
               layers_of(model).items()}  # fmt: skip
    plain = copy.deepcopy(base)
    for name, layer in layers_of(model).items():
        plain.set_submodule(name, copy.deepcopy(layer.get_base_layer()))
    return torch.func.functional_call(plain, weights, (x,))


# ---------------------------------------------------------------------------------------------- fresh process
CHILD = textwrap.dedent(
    """
    import json, sys

    # as where tucker_lora is not installed: its start-up hook (tucker_lora_hook.pth) off, its import refused
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "PostImportHook"]

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "tucker_lora":
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NotInstalled())
    import torch
    from safetensors.torch import load_file, save_file

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    torch.set_num_threads(1)
    for job in json.loads(open(sys.argv[1]).read()):
        folder, kind = job["folder"], job["kind"]
        if kind == "torch":
            base = torch.load(f"{folder}/base.pt", weights_only=False)
            model = PeftModel.from_pretrained(base, f"{folder}/lora").eval()
            with torch.no_grad():
                out = model(load_file(f"{folder}/inputs.safetensors")["x"])
        elif kind == "diffusers_model":
            import diffusers
            base = getattr(diffusers, job["class"]).from_pretrained(f"{folder}/base")
            model = PeftModel.from_pretrained(base, f"{folder}/lora").eval()
            with torch.no_grad():
                out = model(**load_file(f"{folder}/inputs.safetensors")).sample
        elif kind == "diffusers_lora":  # what a pipeline's load_lora_weights does for its UNet
            from diffusers import UNetMotionModel
            model = UNetMotionModel.from_pretrained(f"{job['base']}/base").eval()
            model.load_lora_adapter(f"{folder}/lora/pytorch_lora_weights.safetensors", prefix="unet")
            with torch.no_grad():
                out = model(**load_file(f"{job['base']}/inputs.safetensors")).sample
        else:
            from diffusers import AnimateDiffPipeline
            model = AnimateDiffPipeline.from_pretrained(f"{folder}/base")
            model.set_progress_bar_config(disable=True)
            model.load_lora_weights(f"{folder}/lora")
            call = job["call"]
            with torch.no_grad():
                out = model(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames
        n_lora = sum(isinstance(m, LoraLayer) for m in model.modules()) if kind != "pipeline" else sum(
            isinstance(m, LoraLayer) for m in model.unet.modules())
        save_file({"out": out.contiguous(), "n_lora": torch.tensor(n_lora)}, f"{folder}/out.safetensors")
    json.dump({"tucker_lora_imported": "tucker_lora" in sys.modules}, open(sys.argv[2], "w"))
    """
)


def _pipeline_parts():
    from tucker_lora.video.pipeline import tiny_components

    return tiny_components("animatediff", seed=0)


def _run_pipeline(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**PIPE_CALL, generator=torch.Generator().manual_seed(0), output_type="pt").frames


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict:
    """Every exact export of this module, loaded by peft / diffusers in ONE fresh process without tucker_lora.

    Returns ``{case: (expected output, n exported layers, the child's output, its LoRA layer count)}`` and
    ``"imported"``: whether the child imported tucker_lora.
    """
    root = tmp_path_factory.mktemp("fresh")
    jobs, expected = [], {}
    for kind in TORCH_KINDS:
        base, config, x = torch_case(kind)
        folder = root / kind
        folder.mkdir()
        torch.save(copy.deepcopy(base), folder / "base.pt")
        save_file({"x": x}, folder / "inputs.safetensors")
        model = perturbed(base, torch_config(kind, base, config))
        with torch.no_grad():
            out = model(x)
            assert rel(out, merged_reference(model, x)) < 1e-5  # the Tucker model is W + dW itself
        save_as_lora(folder / "lora", model)
        expected[kind] = (out, len(layers_of(model)))
        jobs.append({"folder": str(folder), "kind": "torch"})
    for name, build, targets in (("unet3d", tiny_unet3d, None), ("unet_motion", tiny_unet_motion, MOTION_POSITIONAL)):
        folder = root / name
        base = build(0)
        base.save_pretrained(folder / "base")
        inputs = example_inputs(base, frames=FRAMES)
        save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
        pattern = {r"resnets\.\d+\.conv1": (3, 2, 1, 0, 2)}
        config = TuckerLoraConfig(
            target_modules=targets, ranks=(4, 4, 2, 1, 1), rank_pattern=pattern, init_weights=False
        )
        untouched = copy.deepcopy(base)
        model = perturbed(base, config, seed=1)
        with torch.no_grad():
            expected[name] = (model_output(model, inputs), len(layers_of(model)))
        save_as_lora(folder / "lora", model)
        jobs.append({"folder": str(folder), "kind": "diffusers_model", "class": type(base).__name__})
    # AnimateDiff with its default targets, motion-module proj_in / proj_out included: the diffusers export leaves
    # those out; diffusers' loader reads the file, and the UNet gives the Tucker output without them
    model = perturbed(untouched, TuckerLoraConfig(ranks=(4, 4, 2, 1, 1), init_weights=False), seed=3)
    folder = root / "motion_skip"
    with pytest.warns(UserWarning, match="left out"):
        save_as_lora(folder / "lora", model, format="diffusers", skip_unsupported=True)
    left_out = [layer for n, layer in layers_of(model).items() if n.endswith(("proj_in", "proj_out"))]
    with torch.no_grad():
        for layer in left_out:
            layer.tucker_lora_core["default"].zero_()
        expected["motion_skip"] = (model_output(model, inputs), len(layers_of(model)) - len(left_out))
    jobs.append({"folder": str(folder), "kind": "diffusers_lora", "base": str(root / "unet_motion")})
    # the AnimateDiff pipeline, Tucker-LoRA on the resnet convs, exported in diffusers' format
    folder = root / "pipeline"
    parts = _pipeline_parts()
    parts.save(folder / "base")
    config = TuckerLoraConfig(
        target_modules=r"(.*\.)?resnets\.\d+\.conv[12]", ranks=(4, 3, 1, 2, 0), init_weights=False
    )
    unet = perturbed(parts.unet, config, seed=2)
    expected["pipeline"] = (_run_pipeline(parts.pipeline(unet=unet.get_base_model())), len(layers_of(unet)))
    save_as_lora(folder / "lora", unet, format="diffusers")
    jobs.append({"folder": str(folder), "kind": "pipeline", "call": PIPE_CALL})

    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, str(root / "jobs.json"), str(root / "child.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {"imported": json.loads((root / "child.json").read_text())["tucker_lora_imported"]}
    for job in jobs:
        name = Path(job["folder"]).name
        got = load_file(Path(job["folder"]) / "out.safetensors")
        results[name] = (*expected[name], got["out"], int(got["n_lora"]))
    return results


def test_fresh_process_never_imported_tucker_lora(fresh):
    assert fresh["imported"] is False


@pytest.mark.parametrize("case", (*TORCH_KINDS, "unet3d", "unet_motion"))
def test_exact_export_loaded_by_peft_gives_the_tucker_output(fresh, case):
    expected, n_layers, got, n_lora = fresh[case]
    assert n_lora == n_layers  # target_modules selects exactly the exported layers
    assert rel(got, expected) < 1e-5


def test_motion_layers_left_out_load_in_diffusers(fresh):
    """The AnimateDiff export without proj_in / proj_out, read by diffusers' ``load_lora_adapter``, gives the
    Tucker-adapted UNet with those two kinds of layer switched off."""
    expected, n_layers, got, n_lora = fresh["motion_skip"]
    assert n_lora == n_layers
    assert rel(got, expected) < 1e-5


def test_diffusers_export_loaded_by_animatediff_pipeline_gives_the_tucker_video(fresh):
    expected, n_layers, got, n_lora = fresh["pipeline"]
    assert n_lora == n_layers
    assert float((got - expected).abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------- the files
def test_peft_folder_has_a_lora_config_with_scale_one(tmp_path):
    base, config, _ = torch_case("conv3d")
    model = perturbed(base, torch_config("conv3d", base, config))
    lora_config, state = convert_to_lora(model)
    ranks = {n: layer.mode_ranks["default"].ranks[0] for n, layer in layers_of(model).items()}
    assert ranks == {"0": 3, "1": 6, "2": 2}  # r_o of each layer (6: clipped to the output channels)
    for name, r in ranks.items():
        assert state[f"base_model.model.{name}.lora_A.weight"].shape[0] == r
    save_as_lora(tmp_path / "lora", model)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["r"] == saved["lora_alpha"] and saved["rank_pattern"] == saved["alpha_pattern"]
    assert set(load_file(tmp_path / "lora" / "adapter_model.safetensors")) == set(state)


def test_pinned_modes_give_a_down_kernel_zero_off_the_centre_tap():
    base, config, _ = torch_case("conv3d")
    model = perturbed(base, torch_config("conv3d", base, config))
    _, state = convert_to_lora(model)
    down_t = state["base_model.model.1.lora_A.weight"]  # (3, 1, 1) kernel, t pinned
    down_hw = state["base_model.model.2.lora_A.weight"]  # 3x3x3 kernel, h and w pinned
    assert down_t[:, :, [0, 2]].abs().max() == 0 and down_t[:, :, 1].abs().max() > 0
    off = torch.ones(3, 3, dtype=torch.bool)
    off[1, 1] = False
    assert down_hw[:, :, :, off].abs().max() == 0 and down_hw[:, :, :, 1, 1].abs().max() > 0


def test_target_modules_become_a_regex_when_a_name_is_also_the_suffix_of_another():
    base = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "block": nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3)})})
    model = perturbed(base, TuckerLoraConfig(target_modules="conv", init_weights=False))  # the root conv only
    assert list(layers_of(model)) == ["conv"]
    lora_config, _ = convert_to_lora(model)
    fresh = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "block": nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3)})})
    lora = peft.get_peft_model(fresh, lora_config)
    assert sorted(n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)) == [
        "base_model.model.conv"
    ]


# ---------------------------------------------------------------------------------------------- truncation
def _dense_tail(layer: TuckerLoraLayer) -> torch.Tensor:
    dW = layer.get_delta_weight("default").detach().double()
    return torch.linalg.svdvals(dW.reshape(dW.shape[0], -1))


def _lora_error(layer: TuckerLoraLayer, down: torch.Tensor, up: torch.Tensor) -> float:
    dW = layer.get_delta_weight("default").detach().double()
    return rel((up.double().flatten(1) @ down.double().flatten(1)).reshape(dW.shape), dW)


@pytest.mark.parametrize("kind", ("conv3d", "linear"))
def test_truncated_errors_match_a_dense_svd_and_fall_with_rank(tmp_path, kind):
    base, config, _ = torch_case(kind)
    model = perturbed(base, torch_config(kind, base, config))
    layers = layers_of(model)
    previous = {name: float("inf") for name in layers}
    for rank in range(1, 8):
        errors = save_as_lora(tmp_path / f"r{rank}", model, rank=rank)
        _, state = convert_to_lora(model, rank=rank)
        for name, layer in layers.items():
            S = _dense_tail(layer)
            r = min(rank, len(S))
            dense = float(S[r:].norm() / S.norm())
            assert errors[name] == pytest.approx(dense, abs=1e-6)
            down, up = state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"]
            assert down.shape[0] <= rank and _lora_error(layer, down, up) == pytest.approx(dense, abs=1e-6)
            assert errors[name] <= previous[name] + 1e-12
            previous[name] = errors[name]
    assert max(previous.values()) < 1e-6  # full rank: exact


def test_float_rank_picks_the_smallest_rank_holding_that_energy():
    base, config, _ = torch_case("conv3d")
    model = perturbed(base, torch_config("conv3d", base, config))
    for energy in (0.5, 0.9, 0.99, 1.0):
        _, state = convert_to_lora(model, rank=energy)
        for name, layer in layers_of(model).items():
            S2 = _dense_tail(layer) ** 2
            share = torch.cumsum(S2, 0) / S2.sum()
            expected = int((share < energy - 1e-9).sum()) + 1  # first k whose top-k share reaches energy
            assert state[f"base_model.model.{name}.lora_A.weight"].shape[0] == min(expected, len(S2))


# ---------------------------------------------------------------------------------------------- kohya
def _zoo() -> nn.ModuleDict:
    """Every layer kind, including the ones a peft LoRA cannot hold."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "conv3d": nn.Conv3d(4, 6, 3, padding=1),
            "temporal": nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0)),
            "causal": CausalConv3d(4, 5, 3),
            "grouped": nn.Conv2d(4, 6, 3, groups=2),
            "dilated": nn.Conv2d(4, 6, 3, dilation=2, padding=2),
            "reflect": nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
            "conv1d": nn.Conv1d(4, 6, 3),
            "head": nn.Linear(6, 3),
        }
    )


ZOO_PATTERN = {"temporal": (3, 3, 0, 1, 1), "conv3d": (2, 3, 3, 0, 2)}


def test_kohya_file_read_by_lycoris_merges_to_the_tucker_weights(tmp_path, monkeypatch):
    fresh = _zoo()
    model = perturbed(
        _zoo(), TuckerLoraConfig(target_modules=list(fresh), rank_pattern=ZOO_PATTERN, init_weights=False)
    )
    expected = {n: layer.get_base_layer().weight + layer.get_delta_weight("default") for n, layer in
                layers_of(model).items()}  # fmt: skip
    errors = save_as_lora(tmp_path / "lora.safetensors", model, format="kohya")
    assert set(errors) == set(fresh)
    keys = load_file(tmp_path / "lora.safetensors")
    assert keys["lora_unet_conv3d.lora_down.weight"].shape == (2, 4, 3, 3, 3)  # 5-D kernel
    assert keys["lora_unet_conv3d.alpha"].item() == 2.0  # alpha / rank = 1

    assert len(_lycoris_merge(fresh, tmp_path / "lora.safetensors", monkeypatch)) == len(fresh)
    for name, module in fresh.items():
        torch.testing.assert_close(module.weight, expected[name], rtol=0, atol=1e-5, msg=name)


def _lycoris_merge(model: nn.Module, path: Path, monkeypatch) -> list[str]:
    """LyCORIS reads the kohya file (its prefix set to ``lora_unet``) and merges it into ``model``'s weights;
    returns the names of the modules it made."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    network, _ = create_lycoris_from_weights(1.0, str(path), model)
    network.merge_to(1.0)  # (apply_to as well would add the update a second time in the forward)
    return [lora.lora_name for lora in network.loras]


def test_kohya_export_of_the_tiny_unet3d_merges_in_lycoris(tmp_path, monkeypatch):
    fresh = tiny_unet3d(0)
    model = perturbed(copy.deepcopy(fresh), TuckerLoraConfig(ranks=(4, 4, 2, 1, 1), init_weights=False))
    expected = {n: layer.get_base_layer().weight + layer.get_delta_weight("default") for n, layer in
                layers_of(model).items()}  # fmt: skip
    save_as_lora(tmp_path / "unet.safetensors", model, format="kohya")
    assert len(_lycoris_merge(fresh, tmp_path / "unet.safetensors", monkeypatch)) == len(expected)
    modules = dict(fresh.named_modules())
    for name, weight in expected.items():
        torch.testing.assert_close(modules[name].weight, weight, rtol=0, atol=1e-5, msg=name)


def test_truncated_kohya_file_merged_by_lycoris_has_the_reported_errors(tmp_path, monkeypatch):
    fresh = _zoo()
    W = {n: m.weight.detach().clone() for n, m in fresh.items()}
    model = perturbed(
        _zoo(), TuckerLoraConfig(target_modules=list(fresh), rank_pattern=ZOO_PATTERN, init_weights=False)
    )
    dW = {n: layer.get_delta_weight("default") for n, layer in layers_of(model).items()}
    errors = save_as_lora(tmp_path / "lora.safetensors", model, rank=2, format="kohya")
    _lycoris_merge(fresh, tmp_path / "lora.safetensors", monkeypatch)
    for name, module in fresh.items():
        assert rel(module.weight.detach() - W[name], dW[name]) == pytest.approx(errors[name], abs=1e-5), name
    assert sum(e > 0.01 for e in errors.values()) >= 5  # rank 2 truncates most layers here


# ---------------------------------------------------------------------------------------------- unsupported layers
def test_layers_peft_lora_cannot_hold_are_named_or_left_out(tmp_path):
    model = perturbed(_zoo(), TuckerLoraConfig(target_modules=list(_zoo()), init_weights=False))
    with pytest.raises(ValueError) as info:
        convert_to_lora(model)
    message = str(info.value)
    for name, why in (
        ("causal", "overrides forward"),
        ("grouped", "groups=2"),
        ("dilated", "dilation=(2, 2)"),
        ("reflect", "padding_mode='reflect'"),
    ):
        assert f"'{name}' (" in message and why in message
    for name in ("conv3d", "temporal", "conv1d", "head"):
        assert f"'{name}'" not in message
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match="'causal'"):
        save_as_lora(tmp_path / "lora", model)
    assert not (tmp_path / "lora").exists()

    with pytest.warns(UserWarning, match="'grouped'"):
        lora_config, state = convert_to_lora(model, skip_unsupported=True)
    assert {k.split(".")[2] for k in state} == {"conv3d", "temporal", "conv1d", "head"}


def test_animatediff_motion_layers_called_with_input_keyword_are_refused_or_left_out(tmp_path):
    """``proj_in`` / ``proj_out`` of the motion modules are called as ``proj_in(input=x)``: peft's LoRA Linear
    raises a TypeError there, so the export names them; with skip_unsupported they are left out (and the file
    loads and runs in diffusers: ``test_motion_layers_left_out_load_in_diffusers``)."""
    model = perturbed(tiny_unet_motion(0), TuckerLoraConfig(ranks=(2, 2, 1, 1, 1), init_weights=False))
    keyword = sorted(n for n in layers_of(model) if n.endswith(("proj_in", "proj_out")) and "motion" in n)
    assert keyword
    with pytest.raises(ValueError) as info:
        save_as_lora(tmp_path / "lora", model, format="diffusers")
    for name in keyword:
        assert f"'{name}' (called as self.{name.rsplit('.', 1)[1]}(input=...)" in str(info.value)
    assert not (tmp_path / "lora").exists()
    with pytest.warns(UserWarning, match="left out") as caught:
        save_as_lora(tmp_path / "lora", model, format="diffusers", skip_unsupported=True)
    message = next(str(w.message) for w in caught if "left out" in str(w.message))
    assert all(f"'{name}'" in message for name in keyword)
    saved = {
        k.split(".lora_")[0].removeprefix("unet.")
        for k in load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    }
    assert saved == set(layers_of(model)) - set(keyword)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rank", (0, -3, 1.5, 0.0, float("nan"), True, "8"))
def test_bad_ranks_are_refused_before_anything_is_written(tmp_path, rank):
    base, config, _ = torch_case("linear")
    model = perturbed(base, torch_config("linear", base, config))
    with pytest.raises(ValueError, match="rank"):
        save_as_lora(tmp_path / "lora", model, rank=rank)
    assert not (tmp_path / "lora").exists()


def test_unknown_format_and_wrong_targets_are_refused(tmp_path):
    base, config, _ = torch_case("linear")
    model = perturbed(base, torch_config("linear", base, config))
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        save_as_lora(tmp_path / "x", model, format="onnx")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_as_lora(tmp_path / "lora.bin", model, format="kohya")
    with pytest.raises(ValueError, match="adapter 'other'"):
        save_as_lora(tmp_path / "x", model, adapter_name="other")
    with pytest.raises(ValueError, match="no Tucker-LoRA layer"):
        convert_to_lora(nn.Linear(3, 3))
    model.save_pretrained(tmp_path / "tucker")
    with pytest.raises(ValueError, match="holds a TUCKER_LORA adapter"):
        save_as_lora(tmp_path / "tucker", model)
    assert json.loads((tmp_path / "tucker" / "adapter_config.json").read_text())["peft_type"] == "TUCKER_LORA"


@pytest.mark.parametrize("format", ("peft", "kohya"))
def test_a_failed_write_leaves_the_old_export_as_it_was(tmp_path, monkeypatch, format):
    base, config, _ = torch_case("linear")
    model = perturbed(base, torch_config("linear", base, config))
    target = tmp_path / ("lora.safetensors" if format == "kohya" else "lora")
    save_as_lora(target, model, format=format)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    import tucker_lora.export.write as write

    real = write._save_safetensors

    def half_then_fail(tensors, path):
        real(tensors, path)
        path.write_bytes(path.read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(write, "_save_safetensors", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_as_lora(target, model, rank=1, format=format)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no half-written file, no temporary folder left behind


# ---------------------------------------------------------------------------------------------- command line
def test_command_line_exports_a_saved_adapter(tmp_path, capsys, monkeypatch):
    base = tiny_unet3d(0)
    base.save_pretrained(tmp_path / "base")
    model = perturbed(base, TuckerLoraConfig(ranks=(4, 4, 0, 1, 1), init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")  # where the CLI finds the base
    model.save_pretrained(tmp_path / "adapter")
    assert export_cli([str(tmp_path / "adapter"), str(tmp_path / "k.safetensors"), "--format", "kohya"]) == 0
    assert "largest relative error 0 " in capsys.readouterr().out
    save_as_lora(tmp_path / "k2.safetensors", model, format="kohya")
    ours, theirs = load_file(tmp_path / "k2.safetensors"), load_file(tmp_path / "k.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # a rank from the command line, through the package's ``__main__`` (what ``python -m`` runs), --base given
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text().replace(str(tmp_path / "base"), "nowhere")
    )
    argv = ["x", str(tmp_path / "adapter"), str(tmp_path / "p"), "--rank", "2", "--base", str(tmp_path / "base")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("tucker_lora.export", run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 2
    # the docs' table script on this adapter: each format read back by its own reader
    spec = importlib.util.spec_from_file_location("export_table", ROOT / "benchmarks" / "export_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    with pytest.warns(UserWarning, match="no load_lora_adapter"):
        rows = table.measure(tmp_path / "adapter", tmp_path / "table", [None], str(tmp_path / "base"), frames=2)
    errors = {r["format"]: r["output_error"] for r in rows}
    assert errors["diffusers"] is None  # diffusers has no LoRA loader for a UNet3DConditionModel
    assert errors["peft"] < 1e-5 and errors["kohya"] < 1e-5


@pytest.mark.parametrize(
    "make, message",
    (
        (lambda d: d.mkdir(), "has no adapter_config.json"),
        (
            lambda d: (d.mkdir(), (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')),
            "holds a LORA adapter",
        ),
        (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{not json")), "is not valid JSON"),
        (
            lambda d: (d.mkdir(), (d / "adapter_config.json").write_text('{"peft_type": "TUCKER_LORA"}')),
            "has no adapter_model.safetensors",
        ),
    ),
)
def test_command_line_names_a_folder_that_is_not_a_tucker_adapter(tmp_path, capsys, make, message):
    make(tmp_path / "adapter")
    assert export_cli([str(tmp_path / "adapter"), str(tmp_path / "out"), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "adapter") in err
    assert not (tmp_path / "out").exists()


def test_public_names():
    assert {"convert_to_lora", "save_as_lora", "resize_adapter"} <= set(tucker_lora.__all__)
