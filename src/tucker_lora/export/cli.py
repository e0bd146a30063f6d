"""Command lines of ``python -m tucker_lora.export`` and ``python -m tucker_lora.resize``.

    python -m tucker_lora.export ADAPTER_DIR OUT --format kohya [--rank 8 | --rank 0.99] [--base BASE_MODEL_DIR]
    python -m tucker_lora.resize ADAPTER_DIR OUT (--ranks 4 4 1 1 1 | --energy 0.99) [--base BASE_MODEL_DIR]

ADAPTER_DIR is a Tucker-LoRA ``save_pretrained`` folder. The base model (``--base``, else the adapter config's
``base_model_name_or_path``) is a local diffusers pipeline folder (its ``unet`` or ``transformer``) or a diffusers
model folder; it gives the layers' kernel sizes (pinned modes) and conv settings. Bad input prints
``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..io import WEIGHTS_NAME, check_safetensors

__all__ = ["export_cli", "load_adapter", "load_base_model", "parse_rank", "resize_cli"]


def parse_rank(text: str) -> int | float | None:
    """``exact`` -> None; ``8`` -> 8; ``0.99`` (or ``1.0``) -> an energy share."""
    if text == "exact":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rank must be 'exact', an integer or a float in (0, 1], got {text!r}"
        ) from None


def _diffusers_class(name: Optional[str], where: Path) -> Any:
    import diffusers

    cls = getattr(diffusers, name or "", None)
    if cls is None:
        raise ValueError(f"'{where}' names the model class {name!r}, which diffusers does not have")
    return cls


def load_base_model(path: str | Path) -> nn.Module:
    """The denoiser of a local diffusers pipeline folder (``unet`` or ``transformer``; a 2D UNet with the folder's
    ``motion_adapter`` becomes AnimateDiff's ``UNetMotionModel``), or a diffusers model folder. No download."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"base model '{root}' is not a folder (pass --base: a local diffusers pipeline or model)")
    if (root / "model_index.json").is_file():
        sub = next((s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None)
        if sub is None:
            raise ValueError(f"pipeline folder '{root}' has no unet/ or transformer/ with a config.json")
        config_file = root / sub / "config.json"
        name = json.loads(config_file.read_text()).get("_class_name")
        if name == "UNet2DConditionModel" and (root / "motion_adapter" / "config.json").is_file():
            from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

            unet2d = UNet2DConditionModel.from_pretrained(root, subfolder=sub, local_files_only=True)
            adapter = MotionAdapter.from_pretrained(root / "motion_adapter", local_files_only=True)
            return UNetMotionModel.from_unet2d(unet2d, adapter).eval()
        return _diffusers_class(name, config_file).from_pretrained(root, subfolder=sub, local_files_only=True).eval()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(f"base model '{root}' has neither model_index.json (a pipeline) nor config.json (a model)")
    name = json.loads(config_file.read_text()).get("_class_name")
    return _diffusers_class(name, config_file).from_pretrained(root, local_files_only=True).eval()


def load_adapter(adapter_dir: str | Path, base: Optional[str | Path] = None) -> Any:
    """``PeftModel.from_pretrained(base model, adapter_dir)`` for a Tucker-LoRA folder; each problem names the
    folder (no adapter_config.json, another peft type, a missing or damaged weights file, no base model)."""
    folder = Path(adapter_dir)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"'{folder}' is not a Tucker-LoRA adapter folder: it has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{config_file}' is not valid JSON ({e})") from e
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "TUCKER_LORA":
        raise ValueError(f"'{folder}' holds a {peft_type} adapter, not a Tucker-LoRA one (peft_type TUCKER_LORA)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"'{folder}' has no {WEIGHTS_NAME}")
    check_safetensors(weights)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"'{config_file}' names no base model: pass --base BASE_MODEL_DIR")
    from peft import PeftModel

    import tucker_lora  # noqa: F401  (registers the method with peft)

    return PeftModel.from_pretrained(load_base_model(base), str(folder))


def _run(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]]) -> int:
    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _summary(errors: dict[str, float]) -> str:
    worst = max(errors, key=errors.get)
    return f"{len(errors)} layers, largest relative error {errors[worst]:.3g} ('{worst}')"


def _export(argv: Optional[Sequence[str]]) -> None:
    from .write import FORMATS, save_as_lora

    p = argparse.ArgumentParser(
        prog="python -m tucker_lora.export", description="Export a Tucker-LoRA adapter as LoRA."
    )
    p.add_argument("adapter_dir", help="Tucker-LoRA adapter folder (save_pretrained)")
    p.add_argument("out", help="output: a folder (peft, diffusers) or a .safetensors file (kohya)")
    p.add_argument("--format", choices=FORMATS, default="peft")
    p.add_argument(
        "--rank", type=parse_rank, default=None, help="'exact' (default), an int rank, or a float energy share"
    )
    p.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter_name", default="default")
    p.add_argument("--skip_unsupported", action="store_true", help="leave out layers peft LoRA cannot hold exactly")
    args = p.parse_args(argv)
    model = load_adapter(args.adapter_dir, args.base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = save_as_lora(args.out, model, args.rank, args.adapter_name, args.format, args.skip_unsupported)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote a {args.format} LoRA to {args.out}: {_summary(errors)}")


def _resize(argv: Optional[Sequence[str]]) -> None:
    from ..io import save_adapter
    from ..resize import resize_adapter

    p = argparse.ArgumentParser(prog="python -m tucker_lora.resize", description="Resize a Tucker-LoRA adapter.")
    p.add_argument("adapter_dir", help="Tucker-LoRA adapter folder (save_pretrained)")
    p.add_argument("out", help="folder for the resized adapter (may be ADAPTER_DIR itself)")
    p.add_argument("--ranks", type=int, nargs=5, default=None, metavar="R", help="caps (r_o, r_i, r_t, r_h, r_w)")
    p.add_argument("--energy", type=float, default=None, help="share of each layer's update energy to keep")
    p.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter_name", default="default")
    args = p.parse_args(argv)
    model = load_adapter(args.adapter_dir, args.base)
    errors = resize_adapter(model, args.ranks, args.energy, args.adapter_name)
    save_adapter(model, args.out, selected_adapters=[args.adapter_name])
    print(f"wrote the resized adapter to {args.out}: {_summary(errors)}")


def export_cli(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_export, argv)


def resize_cli(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_resize, argv)
