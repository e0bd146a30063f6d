"""Compatibility matrix: Tucker-LoRA and peft LoRA on the convolutions of diffusers video models.

    .venv/bin/python benchmarks/compat_matrix.py            # prints the markdown table of README.md

Every model is a tiny config of the diffusers class, built in code (no downloads). Each method adapts
the same layers, the default targets of ``tucker_lora.DEFAULT_TARGET_MODULES``, with a non-identity
adapter (Tucker-LoRA: ``init_weights=False``; peft LoRA: ``LoraConfig(init_lora_weights=False)``), then:

1. the forward runs and changes the output;
2. the unmerged output equals ``merge_and_unload()``'s output;
3. every adapter parameter receives a non-zero gradient;
4. ``save_pretrained`` -> ``PeftModel.from_pretrained`` onto a fresh copy of the base model reproduces
   the output (here in the same process; ``tests/test_compat.py`` also checks it in a fresh one).

A cell says "works" when all four pass, else the first failing check and its error.
``tests/test_compat.py`` imports ``CASES`` from this file and asserts each check for Tucker-LoRA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
from peft import PeftModel
from torch import nn

import tucker_lora
from tucker_lora.targets import default_target_names
from tucker_lora.testing import example_inputs, tiny_unet3d, tiny_unet_motion
from tucker_lora.video.tiny_unets import redraw_zero_weights

#: Tucker ranks (r_o, r_i, r_t, r_h, r_w) and peft LoRA rank used in the matrix.
RANKS = (4, 4, 2, 2, 2)
LORA_RANK = 4
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Case:
    """One model family: how to build it (deterministic given a seed), call it, and what it should adapt."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[nn.Module], dict[str, Any]]
    #: The layers the default targets must select, as an independent rule on (name, module).
    expected: Callable[[str, nn.Module], bool]

    def model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = redraw_zero_weights(self.build())
        return model.eval()


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``model(**inputs)`` as one tensor (``.sample`` of a diffusers output)."""
    out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _video(channels: int = 3, frames: int = 5, size: int = 16) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda model: {"sample": _randn(1, channels, frames, size, size)}


def _is_conv(name: str, module: nn.Module) -> bool:
    return isinstance(module, CONVS)


# ---------------------------------------------------------------------------------------------- builders


def _wan_vae() -> nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        attn_scales=[],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )


def _cogvideox_vae() -> nn.Module:
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 16),
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=2,
    )
    # small frame batches, so encode and decode run several calls chained through the causal convs' conv_cache
    vae.num_sample_frames_batch_size = 2
    vae.num_latent_frames_batch_size = 1
    return vae


def _hunyuan_vae() -> nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )


def _ltx_vae() -> nn.Module:
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo(
        latent_channels=4,
        block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        down_block_types=("LTXVideoDownBlock3D",) * 2,
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False),
        downsample_type=("conv", "conv"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        patch_size=1,
        patch_size_t=1,
    )


def _mochi_vae() -> nn.Module:
    from diffusers import AutoencoderKLMochi

    # Mochi's group norms have 32 groups: 32 channels is the least

    return AutoencoderKLMochi(
        encoder_block_out_channels=(32,) * 4,
        decoder_block_out_channels=(32,) * 4,
        latent_channels=4,
        layers_per_block=(1,) * 5,
        add_attention_block=(False,) * 5,
    )


def _svd_unet() -> nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=3,
    )


def _svd_inputs(model: nn.Module) -> dict[str, Any]:
    return {
        "sample": _randn(1, 3, 8, 8, 8),
        "timestep": torch.tensor([10.0]),
        "encoder_hidden_states": _randn(1, 1, 32, seed=1),
        "added_time_ids": _randn(1, 3, seed=2),
    }


def _i2vgen_unet() -> nn.Module:
    from diffusers import I2VGenXLUNet

    return I2VGenXLUNet(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        num_attention_heads=None,
    )


def _i2vgen_inputs(model: nn.Module) -> dict[str, Any]:
    return {
        "sample": _randn(1, 4, 3, 8, 8),
        "timestep": torch.tensor([10]),
        "fps": torch.tensor([8]),
        "image_latents": _randn(1, 4, 3, 8, 8, seed=1),
        "image_embeddings": _randn(1, 32, seed=2),
        "encoder_hidden_states": _randn(1, 3, 32, seed=3),
    }


def _wan_transformer() -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )


def _wan_transformer_inputs(model: nn.Module) -> dict[str, Any]:
    return {
        "hidden_states": _randn(1, 4, 3, 8, 8),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": _randn(1, 3, 16, seed=1),
    }


def _unet_rule(name: str, module: nn.Module) -> bool:
    """Temporal Conv3d of ``temp_convs`` and the resnets' Conv2d ``conv1``/``conv2``."""
    leaf = ["", "", ""] + name.split(".")
    return (isinstance(module, nn.Conv3d) and "temp_convs" in leaf) or (
        isinstance(module, nn.Conv2d) and leaf[-3] == "resnets" and leaf[-1] in ("conv1", "conv2")
    )


def _svd_rule(name: str, module: nn.Module) -> bool:
    """``conv1``/``conv2`` of every spatial (Conv2d) and temporal (Conv3d, kernel (3, 1, 1)) res block."""
    leaf = ["", ""] + name.split(".")
    return (
        isinstance(module, CONVS)
        and leaf[-2] in ("spatial_res_block", "temporal_res_block")
        and leaf[-1] != "conv_shortcut"
    )


def _motion_rule(name: str, module: nn.Module) -> bool:
    """Resnet Conv2d ``conv1``/``conv2`` and the attention Linear of the motion modules (not their feed-forward)."""
    leaf = ["", "", ""] + name.split(".")
    if isinstance(module, nn.Conv2d):
        return leaf[-3] == "resnets" and leaf[-1] in ("conv1", "conv2")
    return isinstance(module, nn.Linear) and "motion_modules" in leaf and ".ff." not in name


def _wan_transformer_rule(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Conv3d) or (isinstance(module, nn.Linear) and name.startswith("blocks."))


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("wan_vae", "Wan 2.1 VAE (`AutoencoderKLWan`, `WanCausalConv3d` + cache)", _wan_vae, _video(), _is_conv),
        Case(
            "cogvideox_vae",
            "CogVideoX VAE (`AutoencoderKLCogVideoX`, `CogVideoXSafeConv3d`)",
            _cogvideox_vae,
            _video(),
            _is_conv,
        ),
        Case("hunyuan_vae", "HunyuanVideo VAE (`AutoencoderKLHunyuanVideo`)", _hunyuan_vae, _video(), _is_conv),
        Case("ltx_vae", "LTX-Video VAE (`AutoencoderKLLTXVideo`)", _ltx_vae, _video(), _is_conv),
        Case(
            "mochi_vae",
            "Mochi VAE (`AutoencoderKLMochi`, `CogVideoXSafeConv3d`)",
            _mochi_vae,
            _video(frames=7),
            _is_conv,
        ),
        Case(
            "svd_unet",
            "Stable Video Diffusion (`UNetSpatioTemporalConditionModel`)",
            _svd_unet,
            _svd_inputs,
            _svd_rule,
        ),
        Case("i2vgen_unet", "I2VGen-XL (`I2VGenXLUNet`)", _i2vgen_unet, _i2vgen_inputs, _unet_rule),
        Case(
            "unet3d",
            "ModelScope / zeroscope (`UNet3DConditionModel`)",
            tiny_unet3d,
            lambda m: example_inputs(m, frames=3),
            _unet_rule,
        ),
        Case(
            "unet_motion",
            "AnimateDiff (`UNetMotionModel`, Conv2d + motion Linear)",
            tiny_unet_motion,
            lambda m: example_inputs(m, frames=3),
            _motion_rule,
        ),
        Case(
            "wan_transformer",
            "Wan 2.1 DiT (`WanTransformer3DModel`, Conv3d patch embedding)",
            _wan_transformer,
            _wan_transformer_inputs,
            _wan_transformer_rule,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------- the checks


def adapter_config(method: str, targets: list[str]) -> peft.PeftConfig:
    """A non-identity adapter config of ``method`` ("tucker_lora" or "lora") on exactly ``targets``."""
    if method == "tucker_lora":
        return tucker_lora.TuckerLoraConfig(target_modules=list(targets), ranks=RANKS, init_weights=False)
    return peft.LoraConfig(target_modules=list(targets), r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False)


def adapter_params(model: nn.Module, method: str) -> dict[str, nn.Parameter]:
    prefix = "tucker_lora_" if method == "tucker_lora" else "lora_"
    return {n: p for n, p in model.named_parameters() if prefix in n}


def _summary(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 90 else text[:87] + "..."
    return f"{type(exc).__name__}: {text}".replace("|", "/")


def run_case(case: Case, method: str) -> tuple[str, str]:
    """Run the four checks of ``method`` on ``case``: ("works" | the failing check, detail)."""
    base = case.model()
    targets = default_target_names(base)
    inputs = case.inputs(base)
    with torch.no_grad():
        base_out = output(base, inputs)

    stage = "wrap"
    try:
        torch.manual_seed(1)
        model = peft.get_peft_model(copy.deepcopy(base), adapter_config(method, targets)).eval()
        stage = "forward"
        with torch.no_grad():
            unmerged = output(model, inputs)
        if torch.allclose(unmerged, base_out, atol=1e-4):
            return stage, "the adapter does not change the output"

        stage = "merge"
        with torch.no_grad():
            merged = output(copy.deepcopy(model).merge_and_unload(), inputs)
        err = (merged - unmerged).abs().max().item()
        if err > 1e-5 * max(1.0, unmerged.abs().max().item()):
            return stage, f"merged output differs from the unmerged one by {err:.2e}"

        stage = "gradient"
        output(model, inputs).square().mean().backward()
        params = adapter_params(model, method)
        dead = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
        if dead or not params:
            return stage, f"{len(dead)} of {len(params)} adapter parameters get no gradient (e.g. {dead[:1]})"

        stage = "save/load"
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            reloaded = PeftModel.from_pretrained(case.model(), folder).eval()
            with torch.no_grad():
                again = output(reloaded, inputs)
        if not torch.allclose(again, unmerged, rtol=0, atol=1e-6):
            return stage, f"reloaded output differs by {(again - unmerged).abs().max().item():.2e}"
    except Exception as exc:  # the matrix reports every failure instead of stopping
        return stage, _summary(exc)
    return "works", f"{len(targets)} layers"


def layer_kinds(case: Case) -> str:
    """The adapted layer types of ``case`` with counts, e.g. ``24 WanCausalConv3d, 4 Conv2d``."""
    model = case.model()
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for name in default_target_names(model):
        kind = type(modules[name]).__name__
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"subset of: {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import diffusers

    print(f"torch {torch.__version__}, peft {peft.__version__}, diffusers {diffusers.__version__}\n")
    print("| model family | adapted layers (default targets) | Tucker-LoRA | peft LoRA |")
    print("|---|---|---|---|")
    failures = 0
    for name in args.cases:
        case = CASES[name]
        start = time.perf_counter()
        cells = []
        for method in ("tucker_lora", "lora"):
            status, detail = run_case(case, method)
            cells.append("works" if status == "works" else f"fails ({status}): {detail}")
            failures += method == "tucker_lora" and status != "works"
        print(f"| {case.family} | {layer_kinds(case)} | {cells[0]} | {cells[1]} |", flush=True)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
