"""Command line of ``python -m tucker_lora.resize``.

    python -m tucker_lora.resize ADAPTER_DIR OUT (--ranks 4 4 1 1 1 | --energy 0.99) [--base BASE_MODEL_DIR]

ADAPTER_DIR is a Tucker-LoRA ``save_pretrained`` folder; the base model (``--base``, else the adapter config's
``base_model_name_or_path``) is a local diffusers pipeline or model folder. Bad input prints ``error: ...`` and
exits with status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

from ..adapted import error_summary, load_adapter
from ..cli import HelpFormatter, run_cli
from ..io import save_adapter
from . import resize_adapter

__all__ = ["resize_cli"]


def _resize(argv: Optional[Sequence[str]]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tucker_lora.resize",
        description="Re-compress a trained Tucker-LoRA adapter to smaller ranks (give --ranks or --energy).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("adapter_dir", help="Tucker-LoRA adapter folder (save_pretrained)")
    p.add_argument("out", help="folder for the resized adapter (may be ADAPTER_DIR itself)")
    p.add_argument(
        "--ranks",
        type=int,
        nargs=5,
        default=None,
        metavar="R",
        help="rank caps (r_o, r_i, r_t, r_h, r_w) (default: none, --energy decides)",
    )
    p.add_argument(
        "--energy",
        type=float,
        default=None,
        help="share of each layer's update energy to keep, in (0, 1] (default: none, --ranks decides)",
    )
    p.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument(
        "--adapter_name",
        default="default",
        help="the adapter of the folder to resize, by name (the one named 'default' unless given)",
    )
    args = p.parse_args(argv)
    model = load_adapter(args.adapter_dir, args.base)
    errors = resize_adapter(model, args.ranks, args.energy, args.adapter_name)
    save_adapter(model, args.out, selected_adapters=[args.adapter_name])
    print(f"wrote the resized adapter to {args.out}: {error_summary(errors)}")


def resize_cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_resize, argv, errors=(ValueError,))
