"""Gathers what ``benchmarks/gpu_checks.sh`` measured into one markdown page (tables ready for ``docs/gpu.md``) and one
JSON file.

    python benchmarks/gpu_report.py WORK_DIR OUT_DIR --command "bash benchmarks/gpu_checks.sh"

WORK_DIR holds each section's files: ``status`` (a line ``name rc seconds`` per section run, ``name skipped`` per
section left out), ``<name>.log``, and the JSON of the table sections (``layers_*.json``: ``bench_layers.py``;
``unet_*.json``: ``bench_unet.py``). A section that timed out (rc 124) or failed shows what it wrote before that.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
from pathlib import Path

import bench_layers
import bench_unet
import torch

TITLES = {
    "tests": "CUDA tests (`pytest -m cuda`: the compute paths and the fused kernels on the GPU)",
    "layers_fp32": "Layer table, fp32, eager (synced and pipelined), with and without the fused Triton kernels",
    "layers_bf16": "Layer table, bf16 autocast, eager, with and without the fused Triton kernels",
    "compiled_ro": 'Layer table, fp32, `torch.compile(mode="reduce-overhead")` (CUDA graphs)',
    "compiled_ma": 'Layer table, fp32, `torch.compile(mode="max-autotune-no-cudagraphs")`',
    "unet_bf16": "End-to-end UNet3D (320-640-1280-1280, 16x32x32 latents), bf16 autocast, every method in one process",
    "unet_fp32": "End-to-end UNet3D (320-640-1280-1280, 16x32x32 latents), fp32, every method in one process",
}


def versions() -> str:
    names = ["torch", "triton", "peft", "diffusers", "lycoris-lora"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'cpu'})"
    return f"{device}; Python {platform.python_version()}; " + ", ".join(found)


def read_status(work: Path) -> list[tuple[str, str]]:
    """``[(section, what happened)]`` in the order the sections ran."""
    out = []
    path = work / "status"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, *rest = line.split()
        if rest == ["skipped"]:
            out.append((name, "skipped: the script's time budget was spent"))
            continue
        rc, seconds = rest[0].removeprefix("rc="), rest[1]
        note = {"0": "done", "124": "stopped at its time limit (what it wrote before is below)"}.get(rc, f"exit {rc}")
        out.append((name, f"{note}, {seconds}"))
    return out


def section(work: Path, name: str) -> tuple[str, object]:
    """The markdown and the JSON of one section."""
    if name == "tests":
        log = work / "tests.log"
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
        summary = [ln for ln in lines if " passed" in ln or " failed" in ln or " error" in ln or "no tests" in ln]
        text = summary[-1] if summary else (lines[-1] if lines else "(no output)")
        failures = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
        return "\n".join(["```", *failures, text, "```"]), {"summary": text, "failures": failures}
    path = work / f"{name}.json"
    if not path.is_file():
        return "(no table: see log.txt)", None
    data = json.loads(path.read_text())
    if name.startswith("unet"):
        return bench_unet.markdown(data), data
    return "\n\n".join(bench_layers.markdown(r) for r in data), data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--command", default="bash benchmarks/gpu_checks.sh")
    args = parser.parse_args(argv)
    status = read_status(args.work)
    date = datetime.date.today().isoformat()
    lines = [
        f"Measured {date} with `{args.command}` on {versions()}.",
        "",
        "Ratios are to the frozen layer (model) in the same round; each table's columns ran interleaved in one "
        "process. `tucker auto, fused`: the default Tucker adapter with the fused Triton kernels on.",
        "",
        "| section | result |",
        "|---|---|",
        *(f"| {name} | {what} |" for name, what in status),
    ]
    results: dict[str, object] = {"date": date, "command": args.command, "versions": versions(), "status": status}
    for name, _ in status:
        if name not in TITLES:
            continue
        text, data = section(args.work, name)
        lines += ["", f"### {TITLES[name]}", "", text]
        results[name] = data
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
