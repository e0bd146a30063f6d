"""Command line of ``python -m tucker_lora.export``.

    python -m tucker_lora.export ADAPTER_DIR OUT --format kohya [--rank 8 | --rank 0.99] [--base BASE_MODEL_DIR]

ADAPTER_DIR is a Tucker-LoRA ``save_pretrained`` folder. The base model (``--base``, else the adapter config's
``base_model_name_or_path``) is a local diffusers pipeline folder (its ``unet`` or ``transformer``) or a diffusers
model folder; it gives the layers' kernel sizes (pinned modes) and conv settings. Bad input prints
``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Optional

from ..adapted import error_summary, load_adapter
from ..cli import HelpFormatter, run_cli

__all__ = ["export_cli", "parse_rank"]


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


def _export(argv: Optional[Sequence[str]]) -> None:
    from .write import FORMATS, save_as_lora

    p = argparse.ArgumentParser(
        prog="python -m tucker_lora.export",
        description="Export a Tucker-LoRA adapter as a LoRA file (exact, or truncated to a rank).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("adapter_dir", help="Tucker-LoRA adapter folder (save_pretrained)")
    p.add_argument("out", help="output: a folder (peft, diffusers) or a .safetensors file (kohya)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="peft",
        help="peft: a LoRA folder; diffusers: the file load_lora_weights reads; "
        "kohya: one .safetensors file (sd-scripts, LyCORIS, ComfyUI)",
    )
    p.add_argument(
        "--rank", type=parse_rank, default=None, help="'exact' (default), an int rank, or a float energy share"
    )
    p.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument(
        "--adapter_name",
        default="default",
        help="the adapter of the folder to export, by name (the one named 'default' unless given)",
    )
    p.add_argument("--skip_unsupported", action="store_true", help="leave out layers peft LoRA cannot hold exactly")
    args = p.parse_args(argv)
    model = load_adapter(args.adapter_dir, args.base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = save_as_lora(args.out, model, args.rank, args.adapter_name, args.format, args.skip_unsupported)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote a {args.format} LoRA to {args.out}: {error_summary(errors)}")


def export_cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_export, argv, errors=(ValueError,))
