"""Sharded training: FSDP2 (``fully_shard``) through accelerate's FSDP plugin, two CPU processes on gloo.

The reference for every sharded number is the unsharded two-process DDP run of the same script: the same
global batch per step (accelerate hands each process every other batch) and the same per-sample draws
(noise, timesteps, VAE samples come from (seed, step, micro-batch, process)). A single process with the
batch doubled would draw other noise, so it is not a like-for-like reference.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from tucker_lora.video.distributed import (  # noqa: E402
    block_class_names,
    configure_wrap_policy,
    to_index_keys,
    to_name_keys,
)
from tucker_lora.video.metrics import read_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_text_to_video.py"
FSDP_CONFIG = ROOT / "examples" / "accelerate_fsdp.yaml"
#: 4 optimiser steps of the tiny UNet3D default, checkpoint at step 2, 2 videos per step (one per process).
RUN = ["--max_train_steps", "4", "--learning_rate", "5e-3", "--checkpointing_steps", "2"]
RUN += ["--num_frames", "4", "--num_synthetic_videos", "8", "--validation_steps", "0"]

#: Runs the training script, then (when it finished) records the trained model's output on fixed inputs;
#: every process calls the model (a sharded model needs all of them).
HELPER = textwrap.dedent(
    """
    import os, sys
    import torch
    from tucker_lora.video.pipeline import encode_prompts
    from tucker_lora.video.train import main

    out = sys.argv[1]
    result = main(sys.argv[2:])
    if not result.paused:
        model, c = result.model.eval(), result.components
        g = torch.Generator().manual_seed(5)
        size = c.unet.config.sample_size
        x = torch.randn(2, c.unet.config.in_channels, 4, size, size, generator=g)
        t = torch.tensor([10, 700])
        with torch.no_grad():
            text = encode_prompts(c.tokenizer, c.text_encoder, ["a red circle moving left", ""])
            y = model(x, t, encoder_hidden_states=text).sample
        if int(os.environ["RANK"]) == 0:
            torch.save({"x": x, "t": t, "text": text, "y": y}, f"{out}/probe.pt")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, *args: str, mixed_precision: str = "no", timeout: int = 240) -> None:
    """Two processes under ``accelerate launch``: ``fsdp`` with the shipped config, ``ddp`` with ``--multi_gpu``;
    ``args``: the script (the training script or a helper) and its arguments."""
    how = ["--config_file", str(FSDP_CONFIG)] if kind == "fsdp" else ["--multi_gpu", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", mixed_precision, "--main_process_port", str(free_port()), *args]
    # CPU processes on gloo, also on a machine with a GPU (two processes cannot share one GPU under NCCL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def train(kind: str, helper: Path, out: Path, *args: str) -> None:
    """``RUN`` through the helper into ``out``."""
    launch(kind, str(helper), str(out), "--output_dir", str(out), *RUN, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``fsdp``: 2 steps, stop (checkpoint-2), resume from the sharded state for steps 3-4; ``ddp``: 4 steps."""
    tmp = tmp_path_factory.mktemp("fsdp")
    helper = tmp / "helper.py"
    helper.write_text(HELPER)
    fsdp, ddp = tmp / "fsdp", tmp / "ddp"
    train("fsdp", helper, fsdp, "--stop_after_steps", "2")
    assert (fsdp / "checkpoint-2").is_dir() and not (fsdp / "adapter").exists()
    train("fsdp", helper, fsdp, "--resume_from_checkpoint", "latest")
    train("ddp", helper, ddp)
    return {"fsdp": fsdp, "ddp": ddp}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, what: str) -> None:
    assert a.keys() == b.keys() and len(a) > 0, what
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{what} {k}: {m}")


# ---------------------------------------------------------------------------------------------- two processes
def test_sharded_training_matches_unsharded(runs):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    log, ref = read_log(fsdp / "train_log.jsonl"), read_log(ddp / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # steps 1-2 before the stop, 3-4 after the resume
    for r, q in zip(log, ref, strict=True):
        assert r["lr"] == pytest.approx(q["lr"], rel=1e-9)
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-4, abs=1e-6), (r, q)
    # the gathered adapters equal the unsharded run's to float noise (an optimiser step moves a weight by ~5e-3)
    for name in ("adapter", "adapter_ema"):
        ours, theirs = (
            load_file(fsdp / name / "adapter_model.safetensors"),
            load_file(ddp / name / "adapter_model.safetensors"),
        )
        assert_same_tensors(ours, theirs, atol=2e-4, what=name)
        assert any(v.abs().max() > 1e-3 for k, v in ours.items() if "core" in k)  # the cores moved from zero
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (fsdp, ddp)]
    for config, run in zip(configs, (fsdp, ddp), strict=True):
        assert config.pop("base_model_name_or_path") == str(run / "base_model")
        config["target_modules"] = sorted(config["target_modules"])  # (peft writes a set)
    assert configs[0] == configs[1]
    probe, probe_ddp = torch.load(fsdp / "probe.pt"), torch.load(ddp / "probe.pt")
    torch.testing.assert_close(probe["y"], probe_ddp["y"], rtol=0, atol=1e-4)


def test_sharded_checkpoint_has_the_unsharded_layout_and_state(runs):
    """checkpoint-2 of the sharded run: the same files as DDP's (adapter only, no base weights), the same
    optimizer state (full tensors, integer keys), EMA, scheduler and RNG states per process."""
    ours, theirs = runs["fsdp"] / "checkpoint-2", runs["ddp"] / "checkpoint-2"
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in theirs.iterdir())
    assert {"adapter_model.safetensors", "optimizer.bin", "random_states_1.pkl", "custom_checkpoint_0.pkl"} <= set(
        names
    )
    assert not [n for n in names if "fsdp" in n or n.startswith("model")]
    assert_same_tensors(
        load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors"), 1e-4, "ckpt"
    )
    opt, opt_ref = torch.load(ours / "optimizer.bin"), torch.load(theirs / "optimizer.bin")
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in opt_ref["param_groups"]]
    assert opt["param_groups"][0]["lr"] == pytest.approx(opt_ref["param_groups"][0]["lr"])
    assert opt["state"].keys() == opt_ref["state"].keys()
    for i, state in opt_ref["state"].items():
        assert torch.equal(opt["state"][i]["step"], state["step"])
        for key in ("exp_avg", "exp_avg_sq"):  # the averaged gradients: a sum instead of a mean would show here
            error = (opt["state"][i][key] - state[key]).abs().max()
            assert error <= 2e-3 * state[key].abs().max(), (i, key, error)
    ema = torch.load(ours / "custom_checkpoint_0.pkl", weights_only=False)
    ema_ref = torch.load(theirs / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema["num_updates"] == ema_ref["num_updates"] == 2
    for s, r in zip(ema["shadow"], ema_ref["shadow"], strict=True):
        assert s.shape == r.shape and not hasattr(s, "device_mesh")  # full tensors, not shards
        torch.testing.assert_close(s, r, rtol=0, atol=1e-4)


def test_gathered_adapter_loads_in_one_process_reproduces_the_sharded_output_and_lowers_the_loss(runs):
    from diffusers import DDPMScheduler
    from peft import PeftModel
    from torch.utils.data import default_collate

    import tucker_lora  # noqa: F401  (registers the tuner with peft)
    from tucker_lora.video.data import MovingShapesDataset
    from tucker_lora.video.pipeline import load_components
    from tucker_lora.video.train import diffusion_loss

    fsdp = runs["fsdp"]
    probe = torch.load(fsdp / "probe.pt")
    c = load_components(fsdp / "base_model")
    unet = c.unet.eval()
    with torch.no_grad():
        base = unet(probe["x"], probe["t"], encoder_hidden_states=probe["text"]).sample
        model = PeftModel.from_pretrained(unet, str(fsdp / "adapter")).eval()
        unmerged = model(probe["x"], probe["t"], encoder_hidden_states=probe["text"]).sample
    assert (probe["y"] - base).abs().max() > 1e-3  # the adapter changes the output, so the check can fail
    torch.testing.assert_close(unmerged, probe["y"], rtol=1e-5, atol=1e-5)

    scheduler = DDPMScheduler.from_config(c.scheduler.config)
    batch = default_collate([MovingShapesDataset(4, 4, 64, 0)[i] for i in range(4)])

    def loss() -> float:  # four clips, fixed noise and timesteps; eval mode (no dropout)
        with torch.no_grad():
            draws = [torch.Generator().manual_seed(seed) for seed in range(2)]
            return sum(diffusion_loss(model, c, scheduler, batch, g).item() for g in draws) / len(draws)

    after = loss()
    with model.disable_adapter():
        before = loss()
    assert after < before - 1e-3, (before, after)

    with torch.no_grad():
        merged_unet = model.merge_and_unload()
        merged = merged_unet(probe["x"], probe["t"], encoder_hidden_states=probe["text"]).sample
    torch.testing.assert_close(merged, probe["y"], rtol=1e-4, atol=1e-4)
    assert not any("tucker_lora" in n for n, _ in merged_unet.named_parameters())


# ---------------------------------------------------------------------------------------------- no processes
def test_wrap_policy_takes_the_unets_blocks_from_the_shipped_config():
    """The config's class list wraps every down/mid/up block of both backbones (names of the other dropped)."""
    import functools
    from types import SimpleNamespace

    import yaml
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from tucker_lora.video import InputError
    from tucker_lora.video.pipeline import tiny_components

    fsdp_config = yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"]
    assert fsdp_config["fsdp_version"] == 2 and fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    listed = fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")

    def accelerator(names):
        plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=names)
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))

    for backbone in ("unet3d", "animatediff"):
        unet = tiny_components(backbone, seed=0).unet
        blocks = {type(b).__name__ for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]}
        acc = accelerator(list(listed))
        assert set(configure_wrap_policy(acc, unet)) == blocks == set(block_class_names(unet))
        assert set(acc.state.fsdp_plugin.transformer_cls_names_to_wrap) == blocks
        assert configure_wrap_policy(accelerator(None), unet) == block_class_names(unet)  # no list: the blocks
    with pytest.raises(InputError, match="names no module of the UNetMotionModel"):
        configure_wrap_policy(accelerator(["CrossAttnDownBlock3D"]), unet)
    size_based = accelerator(None)
    size_based.state.fsdp_plugin.auto_wrap_policy = functools.partial(lambda m: False)
    assert configure_wrap_policy(size_based, unet) == []


def test_untested_accelerate_is_refused_before_its_state_is_written(monkeypatch):
    """Outside the tested accelerate releases the CPU FSDP2 switch and the adapter-only checkpoints stop with a message
    naming the installed version and the tested range; the accelerator's state is left as it was."""
    from types import SimpleNamespace

    import accelerate
    from accelerate.utils import DistributedType

    from tucker_lora.errors import InputError
    from tucker_lora.video.distributed import ShardedCheckpointing, check_accelerate, enable_fsdp

    installed = accelerate.__version__
    check_accelerate("this", installed)  # the installed release is a tested one
    for version in ("1.7.0", "1.16.3", "1.12.0rc1"):
        check_accelerate("this", version)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for version in ("1.6.0", "1.17.0", "1.17.0.dev0", "2.0.0", "not-a-version"):
        monkeypatch.setattr(accelerate, "__version__", version)
        acc = SimpleNamespace(
            state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None), mixed_precision="no"
        )
        expected = rf"accelerate {re.escape(version)} is installed.*accelerate>=1\.7,<1\.17"
        with pytest.raises(InputError, match=rf"FSDP2 on the CPU .*tested on accelerate 1\.7 to 1\.16.*{expected}"):
            enable_fsdp(acc)
        assert acc.state.distributed_type == DistributedType.MULTI_CPU and acc.state.fsdp_plugin is None
        with pytest.raises(InputError, match=rf"sharded checkpoints .*{expected}"):
            ShardedCheckpointing(acc, None, None)


def test_fsdp_version_1_is_refused_and_2_accepted(monkeypatch):
    """An accelerate config with ``fsdp_version: 1`` stops with a message naming the version and FSDP2."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tucker_lora.errors import InputError
    from tucker_lora.video.distributed import enable_fsdp

    def accelerator(version: int) -> SimpleNamespace:
        plugin = SimpleNamespace(fsdp_version=version)
        return SimpleNamespace(
            state=SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin), mixed_precision="no"
        )

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(InputError, match=r"fsdp_version 1 in the accelerate config: .*needs FSDP2 \(fsdp_version: 2"):
        enable_fsdp(accelerator(1))
    assert enable_fsdp(accelerator(2)) is True
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert enable_fsdp(accelerator(1)) is False  # no FSDP asked for: nothing to refuse


def test_optimizer_state_keys_convert_to_torchs_own_format_and_back():
    """The sharded checkpoint's optimizer.bin is torch's ``Optimizer.state_dict()`` (integer keys)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    converted, reference = to_index_keys(full), opt.state_dict()
    assert converted["param_groups"] == reference["param_groups"]
    assert converted["state"].keys() == reference["state"].keys() == {0, 1, 2}
    for i, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(converted["state"][i][key], value), (i, key)
    back = to_name_keys(converted, ["0.weight", "2.weight", "2.bias"], "ckpt")
    assert back["param_groups"][0]["params"] == full["param_groups"][0]["params"]
    assert back["state"].keys() == full["state"].keys()
    with pytest.raises(ValueError, match="holds 3 parameters, the adapter has 2"):
        to_name_keys(converted, ["0.weight", "2.weight"], "ckpt")


def test_adapter_state_dict_loads_through_peft_key_mapping_and_refuses_a_mismatch():
    """What a sharded resume loads (on one process here): peft's saved keys map back onto the model's."""
    from peft import get_peft_model, get_peft_model_state_dict

    from tucker_lora.video.adapters import plan_adapter
    from tucker_lora.video.distributed import load_adapter_state_dict
    from tucker_lora.video.pipeline import tiny_components

    def adapted(ranks: tuple[int, ...], seed: int) -> torch.nn.Module:
        unet = tiny_components("unet3d", seed=0).unet
        torch.manual_seed(seed)
        return get_peft_model(unet, plan_adapter("tucker", unet, ranks, init_weights=False).config)

    source, target = adapted((4, 4, 1, 1, 1), 1), adapted((4, 4, 1, 1, 1), 2)
    saved = get_peft_model_state_dict(source)
    assert not all(torch.equal(v, get_peft_model_state_dict(target)[k]) for k, v in saved.items())
    load_adapter_state_dict(target, saved, "ckpt")
    assert_same_tensors(get_peft_model_state_dict(target), saved, atol=0, what="loaded")
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state_dict(adapted((2, 2, 1, 1, 1), 3), saved, "ckpt")
    with pytest.raises(ValueError, match="'ckpt' does not fit the model: missing"):
        load_adapter_state_dict(target, dict(list(saved.items())[1:]), "ckpt")


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_sharded_accumulation_and_validation_sampling_match_ddp(tmp_path):
    """Gradient accumulation (FSDP2's no-sync path) and validation sampling (every process runs the sharded
    UNet; the main process writes) give DDP's adapter and DDP's frames."""
    from PIL import Image

    args = ["--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3"]
    args += [
        "--num_frames",
        "4",
        "--num_synthetic_videos",
        "8",
        "--validation_steps",
        "2",
        "--num_inference_steps",
        "2",
    ]
    for kind in ("fsdp", "ddp"):
        launch(kind, str(TRAIN), "--output_dir", str(tmp_path / kind), *args)
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    assert_same_tensors(
        load_file(fsdp / "adapter" / "adapter_model.safetensors"),
        load_file(ddp / "adapter" / "adapter_model.safetensors"),
        atol=2e-4,
        what="adapter",
    )
    grids = [
        np.asarray(Image.open(run / "validation" / "step-000002" / "grid.png"), dtype=np.int16) for run in (fsdp, ddp)
    ]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2


@pytest.mark.slow
def test_sharded_animatediff_in_bf16_saves_a_float32_adapter_that_loads(tmp_path):
    """AnimateDiff's motion blocks as units, bf16 mixed precision (bf16 gathers, fp32 adapter master weights)."""
    from peft import PeftModel

    import tucker_lora  # noqa: F401  (registers the tuner with peft)
    from tucker_lora.video.pipeline import load_components

    out = tmp_path / "ad"
    args = ["--backbone", "animatediff", "--max_train_steps", "2", "--num_frames", "4", "--validation_steps", "0"]
    launch("fsdp", str(TRAIN), "--output_dir", str(out), *args, mixed_precision="bf16")
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    unet = load_components(out / "base_model").unet
    model = PeftModel.from_pretrained(unet, str(out / "adapter_ema"))
    assert sum("tucker_lora_core" in n for n, _ in model.named_parameters()) == sum("core" in k for k in weights)
