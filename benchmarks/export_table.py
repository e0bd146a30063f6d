"""File size and error of a Tucker-LoRA adapter exported as LoRA, per format and rank (the table of docs/export.md).

    .venv/bin/python benchmarks/export_table.py outputs/demo/adapter --out outputs/export \\
        --ranks exact 3 2 1 0.99 0.9

For each rank and format, ``save_as_lora`` writes the file, and the file's own reader loads it into a fresh copy of
the base model: peft (``PeftModel.from_pretrained``), diffusers (``load_lora_adapter``, what a pipeline's
``load_lora_weights`` calls for its denoiser), LyCORIS (``create_lycoris_from_weights`` with the kohya prefix,
merged into the weights). Columns: the file's size; the largest per-layer relative Frobenius error of the update
that the export reports; and the output error of the reader's model on fixed inputs, ``||y_lora - y_tucker|| /
||y_tucker - y_base||`` (relative to what the adapter changes in the output).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tucker_lora import save_as_lora
from tucker_lora.adapted import load_adapter, load_base_model
from tucker_lora.export.cli import parse_rank
from tucker_lora.export.write import DIFFUSERS_WEIGHTS_NAME, FORMATS, denoiser_prefix
from tucker_lora.io import WEIGHTS_NAME
from tucker_lora.testing import example_inputs, model_output

FILES = {"peft": WEIGHTS_NAME, "diffusers": DIFFUSERS_WEIGHTS_NAME, "kohya": ""}


def read_back(format: str, path: Path, base: torch.nn.Module) -> torch.nn.Module | None:
    """``base`` (a fresh copy) with the exported file loaded by that format's reader (None: diffusers has no
    loader for this model class, e.g. ``UNet3DConditionModel``, which lacks ``PeftAdapterMixin``)."""
    if format == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(path)).eval()
    if format == "diffusers":
        if not hasattr(base, "load_lora_adapter"):
            return None
        base.load_lora_adapter(str(path / DIFFUSERS_WEIGHTS_NAME), prefix=denoiser_prefix(base))
        return base.eval()
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    prefix, LycorisNetwork.LORA_PREFIX = LycorisNetwork.LORA_PREFIX, "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, str(path), base)
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    network.merge_to(1.0)  # (apply_to as well would add the update a second time in the forward)
    return base.eval()


def measure(
    adapter_dir: str | Path, out: str | Path, ranks: Sequence[Any], base_dir: str | None = None, frames: int = 8
) -> list[dict[str, Any]]:
    """One row per (rank, format): ``{"rank", "format", "bytes", "weight_error", "output_error"}``."""
    out = Path(out)
    model = load_adapter(adapter_dir, base_dir).eval()
    base_path = base_dir or model.peft_config["default"].base_model_name_or_path
    fresh = load_base_model(base_path)
    inputs = example_inputs(fresh, frames=frames)
    with torch.no_grad():
        y_base, y_tucker = model_output(fresh, inputs), model_output(model, inputs)
    effect = float((y_tucker - y_base).norm())
    rows = []
    for rank in ranks:
        for format in FORMATS:
            name = f"{format}_{rank if rank is not None else 'exact'}"
            path = out / (f"{name}.safetensors" if format == "kohya" else name)
            errors = save_as_lora(path, model, rank=rank, format=format)
            reader = read_back(format, path, copy.deepcopy(fresh))
            if reader is not None:
                with torch.no_grad():
                    y = model_output(reader, inputs)
            rows.append(
                {
                    "rank": "exact" if rank is None else rank,
                    "format": format,
                    "bytes": (path / FILES[format] if FILES[format] else path).stat().st_size,
                    "weight_error": max(errors.values()),
                    "output_error": None if reader is None else float((y - y_tucker).norm()) / effect,
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter_dir")
    p.add_argument("--out", default="outputs/export")
    p.add_argument("--base", default=None)
    p.add_argument("--ranks", nargs="+", type=parse_rank, default=[None, 2, 1, 0.99])
    p.add_argument("--frames", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = measure(args.adapter_dir, args.out, args.ranks, args.base, args.frames)
    tucker = Path(args.adapter_dir) / WEIGHTS_NAME
    print(f"Tucker-LoRA adapter: {tucker.stat().st_size} bytes ({tucker})\n")
    print("| rank | format | file size (bytes) | largest layer error | output error |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        output = "no reader" if r["output_error"] is None else f"{r['output_error']:.2e}"
        print(f"| {r['rank']} | {r['format']} | {r['bytes']} | {r['weight_error']:.2e} | {output} |")


if __name__ == "__main__":
    main()
