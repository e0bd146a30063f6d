"""README.md and docs/**/*.md: runnable examples run, figures sit beside their commands, links resolve, and the
tables of measurements match the measurement files they come from.

The conventions these tests enforce:

- Runnable code: a fenced block whose info string is ``python runnable`` (GitHub highlights it as python) is
  run by ``test_runnable_block``, each block in a fresh namespace with a fresh temporary working directory. A
  failure names the file and the line of the block's opening fence, and the traceback's line numbers are the
  file's. Every python block of README.md must be runnable; a docs page may show plain ``python`` blocks that
  are not run (fragments that need your data or a GPU). ``CHECKS`` adds assertions about what a block made.
- Figures: every image ``![alt](path)`` sits next to the command that produced it: a fenced ``bash`` block
  whose opening or closing fence is at most ``FIGURE_DISTANCE`` lines from the image's line, with no heading
  line between the two.
- Links: every relative link and image path (outside code) resolves to a file or folder of the repository,
  and an ``#anchor`` into a markdown file names one of its headings (GitHub's slugs). ``PENDING`` lists the
  paths that other branches add; the lead empties it at merge, and a test fails once one of them exists.
- Measured tables: a table on the lines right after ``<!-- table: KIND SOURCE... -->`` is rendered from its
  measurement files by ``TABLES[KIND]`` and must equal that rendering. After re-measuring (the command is
  beside each table), ``python tests/test_docs.py`` rewrites every such table from its sources.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tucker_lora
from conftest import einsum_reconstruct

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250
FIGURE_DISTANCE = 12

#: Pages and figures that other branches add (their links are checked once they exist); emptied at merge.
PENDING: set[str] = set()


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string, the 1-based lines of its fences, its text and its section."""

    path: Path
    info: str
    start: int
    end: int
    code: str
    heading: str

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.start}"


FENCE = re.compile(r"^(```+|~~~+)\s*(.*)$")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$")


def parse(path: Path) -> tuple[list[Block], list[tuple[int, str]], list[str]]:
    """The file's fenced blocks, its headings as (line, text), and its lines with code blocks blanked."""
    lines = path.read_text().splitlines()
    blocks, headings, prose = [], [], []
    fence, info, start, body, heading = None, "", 0, [], ""
    for number, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, info, start, body = m.group(1), m.group(2).strip(), number, []
                prose.append("")
                continue
            h = HEADING.match(line)
            if h:
                heading = h.group(1)
                headings.append((number, heading))
            prose.append(line)
        elif m and m.group(1).startswith(fence) and not m.group(2):
            blocks.append(Block(path, info, start, number, "\n".join(body) + "\n", heading))
            fence = None
            prose.append("")
        else:
            body.append(line)
            prose.append("")
    assert fence is None, f"{rel(path)}:{start}: code block never closed"
    return blocks, headings, prose


def runnable_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse(p)[0] if b.info.split() == ["python", "runnable"]]


# ------------------------------------------------------------------------------------------ runnable blocks
def check_usage(ns: dict, cwd: Path) -> None:
    """README's usage example: default targets, a trained (non-zero) adapter, saved, reloaded, merged."""
    model, merged = ns["model"], ns["merged"]
    expected = {  # the UNet3D's default targets by hand: every temporal Conv3d and the resnets' two Conv2d
        name
        for name, module in ns["base_unet"]().named_modules()
        if (isinstance(module, torch.nn.Conv3d) and ".temp_convs." in name)
        or (isinstance(module, torch.nn.Conv2d) and re.search(r"\.resnets\.\d+\.conv[12]$", name))
    }
    assert len(expected) == 48 and set(model.base_model.targeted_module_names) == expected
    assert model.peft_config["default"].ranks == (4, 4, 3, 1, 1)
    assert (cwd / "out" / "adapter" / "adapter_model.safetensors").is_file()
    moved = {n.split(".tucker_lora_core")[0] for n, p in model.named_parameters() if "lora_core" in n and p.any()}
    # the training step moved the cores off zero wherever the loss reaches: all but the temporal blocks' first three
    # convs, whose gradient is zero while diffusers' zero-initialised last conv of the block (conv4) is zero
    reached = {n for n in expected if ".temp_convs." not in n or ".conv4." in n}
    assert {n.removeprefix("base_model.model.") for n in moved} == reached, "the training step left a core at zero"
    assert type(merged).__name__ == "UNet3DConditionModel"
    assert not any("tucker_lora" in n for n, _ in merged.named_parameters())
    args = (ns["latents"], ns["timesteps"], ns["text"])
    with torch.no_grad():
        out_merged = merged(*args).sample
        out_base = ns["base_unet"]().eval()(*args).sample
    torch.testing.assert_close(out_merged, ns["adapted"], atol=1e-5, rtol=1e-4)
    assert (out_base - ns["adapted"]).abs().max() > 1e-3  # the trained adapter changes the output
    # and the merged model is the base with W + alpha * dW, dW an einsum of each trained layer's core and factors
    by_hand = ns["base_unet"]().eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, tucker_lora.TuckerLoraLayer)]
    assert len(layers) == 48
    with torch.no_grad():
        for name, layer in layers:
            core, factors = layer.tucker_lora_core["default"], layer.factors("default")
            weight = by_hand.get_submodule(name.removeprefix("base_model.model.")).weight
            weight += layer.alpha["default"] * einsum_reconstruct(core, factors)
        torch.testing.assert_close(out_merged, by_hand(*args).sample, atol=1e-5, rtol=1e-4)


def check_initialisation(ns: dict, cwd: Path) -> None:
    """docs/initialisation.md: HOOI factors from the weights, then from the gradient; cores stay zero."""
    model = ns["model"]
    assert len(model.base_model.targeted_module_names) == 48
    assert model.peft_config["default"].init_weights == "hooi"
    assert len(ns["energies"]) == 48 and all(0.0 < e <= 1.0 + 1e-6 for e in ns["energies"].values())
    cores = [p for n, p in model.named_parameters() if "tucker_lora_core" in n]
    assert len(cores) == 48 and not any(c.any() for c in cores)
    U = ns["factors"][0]
    torch.testing.assert_close(U.T @ U, torch.eye(4), atol=1e-5, rtol=0)


#: Extra assertions about what a runnable block made: (file, section heading) -> check(namespace, cwd).
CHECKS: dict[tuple[str, str], Callable[[dict, Path], None]] = {
    ("README.md", "Usage"): check_usage,
    ("docs/initialisation.md", "Initialisation: HOSVD and HOOI"): check_initialisation,
}


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.where)
def test_runnable_block(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile("\n" * block.start + block.code, str(block.path), "exec")  # tracebacks give the file's lines
    namespace: dict = {"__name__": "__docs__"}
    try:
        exec(code, namespace)
    except Exception:
        pytest.fail(f"{block.where}: the runnable block failed\n{traceback.format_exc()}", pytrace=False)
    check = CHECKS.get((rel(block.path), block.heading))
    if check is not None:
        check(namespace, tmp_path)


def test_every_check_has_its_block_and_readme_python_runs():
    found = {(rel(b.path), b.heading) for b in runnable_blocks()}
    assert set(CHECKS) <= found, f"no runnable block for {set(CHECKS) - found}"
    not_run = [b.where for b in parse(README)[0] if b.info.split()[:1] == ["python"] and b.info != "python runnable"]
    assert not not_run, f"README python blocks must be runnable (```python runnable): {not_run}"


def test_readme_length():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


# ------------------------------------------------------------------------------------------ figures and links
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)[^)]*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def figures_without_command(path: Path) -> list[str]:
    blocks, headings, prose = parse(path)
    commands = [b for b in blocks if b.info.split()[:1] in (["bash"], ["sh"], ["shell"])]
    heading_lines = [line for line, _ in headings]
    bad = []
    for number, line in enumerate(prose, 1):
        for target in IMAGE.findall(INLINE_CODE.sub("", line)):
            near = [
                b
                for b in commands
                for fence in (b.start, b.end)
                if abs(fence - number) <= FIGURE_DISTANCE
                and not any(min(fence, number) < h < max(fence, number) for h in heading_lines)
            ]
            if not near:
                bad.append(f"{rel(path)}:{number}: {target}")
    return bad


def test_every_figure_sits_next_to_its_command():
    bad = [item for p in doc_files() for item in figures_without_command(p)]
    assert not bad, f"figures with no ```bash block within {FIGURE_DISTANCE} lines (same section): {bad}"


def broken_links(path: Path) -> list[str]:
    bad = []
    for number, line in enumerate(parse(path)[2], 1):
        line = INLINE_CODE.sub("", line)
        for target in IMAGE.findall(line) + LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{rel(path)}:{number}: {target}"
            if ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{where} (outside the repository)")
            elif rel(dest) in PENDING:
                continue
            elif not dest.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for _, h in parse(dest)[1]}:
                bad.append(f"{where} (no heading #{anchor})")
    return bad


def test_every_link_and_image_resolves():
    bad = [item for p in doc_files() for item in broken_links(p)]
    assert not bad, f"broken links: {bad}"


def test_pending_paths_are_still_missing():
    arrived = sorted(p for p in PENDING if (ROOT / p).exists())
    assert not arrived, f"{arrived} exist now: remove them from PENDING in tests/test_docs.py"


# ------------------------------------------------------------------------------------------ measured tables
def layer_results(source: str) -> dict[str, dict[str, dict]]:
    """``bench_layers.py --json``: {shape label: {method: row}}, method names without the baselines' rank."""
    shapes = json.loads((ROOT / source).read_text())
    return {
        re.sub(r" \(median of \d+ runs\)$", "", s["shape"]): {
            re.sub(r" r=\d+$", "", row["method"]): row for row in s["rows"]
        }
        for s in shapes
    }


def unet_results(source: str) -> dict[str, dict]:
    """``bench_unet.py`` output: {method: {trainable, step_s, peak_mb, ratio}}; the ratio is the interleaved
    rounds' paired median where the run has them, else the step over the frozen step of separate processes."""
    rows, paired = {}, {}
    for line in (ROOT / source).read_text().splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            if "interleaved" in item:
                paired = {m: {"step_s": v[0], "ratio": v[1]} for m, v in item["interleaved"].items()}
            else:
                rows[item["method"]] = dict(item)
    frozen = rows["frozen"]["step_s"]
    for method, row in rows.items():
        row.update(paired.get(method, {"ratio": row["step_s"] / frozen}))
    return rows


def motion_results(source: str) -> dict[str, dict[str, list[str]]]:
    """``motion_experiment.py``'s results.md: {backbone: {method: the row's cells}}."""
    tables, backbone = {}, None
    for line in (ROOT / source).read_text().splitlines():
        m = re.match(r"\*\*(\w+)\*\*", line)
        if m:
            backbone = m.group(1)
            tables[backbone] = {}
        elif backbone and line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[backbone][cells[0]] = cells
    return tables


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def spread(row: dict, key: str) -> str:
    """``1.03x (1.00-1.05)``: the median of the runs and, from several runs, the lowest and the highest."""
    runs = row.get(f"{key}_ratio_runs") or []
    return ratio(row[f"{key}_ratio"]) + (f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else "")


def train_cell(row: dict) -> str:
    """A training step over the frozen one; on CUDA ``synced / pipelined``."""
    if row.get("train_pipelined_ratio") is not None:
        return f"{ratio(row['train_ratio'])} / {ratio(row['train_pipelined_ratio'])}"
    return spread(row, "train")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + [
        "---:" if all(re.match(r"[-\d.,x (/)–]+$", r[i]) for r in rows) else "---" for i in range(1, len(header))
    ]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


FROZEN, AUTO, FREEZE_I = "frozen base", "tucker auto", "tucker auto, freeze_modes=('i',)"
LORA, LYCORIS = "peft LoRA", "LyCORIS LoCon-Tucker"
TRAIN_COLUMNS = {
    "Tucker auto": AUTO,
    "Tucker factored": "tucker factored",
    "Tucker merged": "tucker merged",
    "auto, `freeze_modes=('i',)`": FREEZE_I,
    "peft LoRA (matched)": LORA,
    "LyCORIS LoCon-Tucker (matched)": LYCORIS,
    "full fine-tuning": "full fine-tuning",
}


def ms(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def layers_train(source: str) -> list[str]:
    """The training step of every layer shape as a ratio to the frozen layer, every column."""
    rows = [
        [shape, ms(methods[FROZEN]["train_ms"])] + [train_cell(methods[m]) for m in TRAIN_COLUMNS.values()]
        for shape, methods in layer_results(source).items()
    ]
    return table(["layer", "frozen step (ms)", *TRAIN_COLUMNS], rows)


def layers_infer(source: str) -> list[str]:
    """Unmerged inference as a ratio to the frozen layer; what autograd saves; the peak of four layers."""
    columns = {"Tucker auto": AUTO, "Tucker factored": "tucker factored", "Tucker merged": "tucker merged"}
    columns |= {"peft LoRA": LORA, "LyCORIS": LYCORIS}
    trio = (FROZEN, AUTO, FREEZE_I)
    rows = []
    for shape, methods in layer_results(source).items():
        rows.append(
            [shape]
            + [spread(methods[m], "infer") for m in columns.values()]
            + [" / ".join(f"{methods[m]['saved_vs_x']:.2f}" for m in trio)]
            + [" / ".join(f"{methods[m]['peak_mb']:.1f}" for m in trio)]
        )
    header = ["layer", *columns, "saved, x = 1: frozen / auto / auto freeze i"]
    return table([*header, "peak of 4 (MB): frozen / auto / auto freeze i"], rows)


def speed_summary(cpu_layers: str, cpu_unet: str, gpu_layers: str, gpu_unet: str) -> list[str]:
    """README: the training step over the frozen one, Tucker auto against the baselines, CPU and GPU."""
    cpu, gpu = layer_results(cpu_layers), layer_results(gpu_layers)
    by_kernel = {shape.split(", ")[0]: methods for shape, methods in gpu.items()}
    rows = []
    for shape, methods in cpu.items():
        kernel = shape.split(", ")[0]
        if "per-call" not in shape and kernel in by_kernel:
            rows.append(
                [kernel]
                + [ratio(d[m]["train_ratio"]) for d in (methods, by_kernel[kernel]) for m in (AUTO, LORA, LYCORIS)]
            )
    unets = [unet_results(cpu_unet), unet_results(gpu_unet)]
    rows.append(
        ["UNet3DConditionModel, end to end"]
        + [
            ratio(u[m]["ratio"]) if m else "–"
            for u in unets
            for m in ("tucker (4,4,1,1,1)", "peft LoRA (matched)", None)
        ]
    )
    header = ["training step / frozen", "CPU: Tucker-LoRA", "peft LoRA", "LyCORIS"]
    return table(header + ["GPU (H100): Tucker-LoRA", "peft LoRA", "LyCORIS"], rows)


UNET_METHODS = {
    "frozen": "frozen",
    "Tucker-LoRA (4,4,1,1,1)": "tucker (4,4,1,1,1)",
    "Tucker-LoRA (8,8,3,1,1)": "tucker (8,8,3,1,1)",
    "peft LoRA": "peft LoRA (matched)",
    "full fine-tuning": "full fine-tuning",
}


def memory_summary(cpu_unet: str, gpu_unet: str) -> list[str]:
    """README: peak memory of a UNet3D training step, CPU and GPU."""
    rows = [
        [label] + [f"{unet_results(source)[m]['peak_mb']:.0f}" for m in UNET_METHODS.values()]
        for label, source in (("CPU", cpu_unet), ("GPU (H100)", gpu_unet))
    ]
    return table(["peak memory (MB)", *UNET_METHODS], rows)


MOTION_METHODS = {
    "base (no adaptation)": "base (no adaptation)",
    "Tucker-LoRA (4,4,0,1,1), frame-wise": "tucker (4,4,0,1,1)",
    "Tucker-LoRA (4,4,1,1,1)": "tucker (4,4,1,1,1)",
    "Tucker-LoRA (4,4,3,1,1)": "tucker (4,4,3,1,1)",
    "Tucker-LoRA (8,8,3,3,3)": "tucker (8,8,3,3,3)",
    "peft LoRA, same budget": "LoRA ~ tucker (8,8,3,3,3)",
    "LyCORIS LoCon-Tucker, same budget": "LyCORIS ~ tucker (8,8,3,3,3)",
    "full fine-tuning": "full fine-tuning",
}


def motion_summary(source: str) -> list[str]:
    """README: parameters, held-out loss and share of reversed samples (means over seeds), both backbones."""
    results = motion_results(source)

    def cells(backbone: str, method: str) -> list[str]:
        row = results[backbone][method]
        return [row[2], row[3].split(" ± ")[0], row[4].split(" ± ")[0]]

    rows = [[label] + cells("unet3d", m) + cells("conv3d", m) for label, m in MOTION_METHODS.items()]
    header = ["method", "UNet3D: params", "loss", "reversed", "3x3x3 Conv3d UNet: params", "loss", "reversed"]
    return table(header, rows)


#: Uniform tuples of the temporal-rank experiment and the allocated methods at their parameter counts.
ALLOCATION_BUDGETS = ("(4,4,1,1,1)", "(8,8,3,3,3)")
ALLOCATION_PROXIES = ("gradient", "weight")


def motion_allocation(source: str) -> list[str]:
    """Allocated against uniform ranks at the same parameter count (``motion_experiment.py``'s results.json): mean
    ± std over seeds of the held-out loss and the share of samples moving as B says, and in how many seeds each
    allocation's loss is below the uniform tuple's (same seed: same data order, noise and init draws)."""
    results = json.loads((ROOT / source).read_text())
    summary = {(r["backbone"], r["method"]): r for r in results["summary"]}
    losses: dict[tuple[str, str], dict[int, float]] = {}
    for r in results["runs"]:
        losses.setdefault((r["backbone"], r["method"]), {})[r["seed"]] = r["loss"]

    def pm(row: dict, key: str, fmt: str) -> str:
        return f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}"

    rows = []
    for backbone in dict.fromkeys(b for b, _ in summary):
        for ranks in ALLOCATION_BUDGETS:
            uniform = summary[(backbone, f"tucker {ranks}")]
            allocated = [summary[(backbone, f"allocated ({p}) ~ tucker {ranks}")] for p in ALLOCATION_PROXIES]
            below = []
            for p, row in zip(ALLOCATION_PROXIES, allocated, strict=True):
                mine, base = losses[(backbone, row["method"])], losses[(backbone, uniform["method"])]
                below.append(f"{p} {sum(mine[s] < base[s] for s in mine)}/{len(mine)}")
            rows.append(
                [backbone, f"{ranks}: {uniform['params']:,}"]
                + [pm(r, "loss", ".4f") for r in (uniform, *allocated)]
                + [", ".join(below)]
                + [pm(r, "correct", ".2f") for r in (uniform, *allocated)]
            )
    header = ["backbone", "uniform tuple: params", "loss: uniform", "allocated, gradient", "allocated, weight",
              "seeds with a lower loss than uniform", "direction correct: uniform", "allocated, gradient",
              "allocated, weight"]  # fmt: skip
    return table(header, rows)


def unet_table(source: str) -> list[str]:
    """The end-to-end table ``bench_unet.py`` prints last, as it printed it."""
    lines = (ROOT / source).read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| method"))
    return [line.rstrip() for line in lines[start:] if line.startswith("|")]


def motion_table(source: str, backbone: str) -> list[str]:
    """One backbone's table of ``motion_experiment.py``'s results.md, as it printed it."""
    lines = (ROOT / source).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{backbone}**"))
    block = []
    for line in lines[start + 1 :]:
        if block and not line.startswith("|"):
            break
        if line.startswith("|"):
            block.append(line.rstrip())
    return block


#: (shape as count_ops.py names it, ranks, column header) of the op-count table.
OPS_COLUMNS = (
    ("Conv3d 320x320x(3,3,3), 8x16x16", [4, 4, 1, 1, 1], "Conv3d 3x3x3 (4,4,1,1,1)"),
    ("Conv3d 320x320x(3,3,3), 8x16x16", [8, 8, 3, 3, 3], "Conv3d 3x3x3 (8,8,3,3,3)"),
    ("Conv3d 640x640x(3,1,1), 8x16x16", [4, 4, 1, 1, 1], "Conv3d (3,1,1) (4,4,1,1,1)"),
    ("Conv2d 320x320x(3,3), 8 frames of 32x32", [4, 4, 1, 1, 1], "Conv2d 3x3, 8 frames (4,4,1,1,1)"),
)


def ops_table(torch_source: str, fused_source: str) -> list[str]:
    """Ops each adapter adds per training step / inference call (``count_ops.py --json``, without and with
    ``--triton``); ``(a)`` where ``auto`` took the merged path."""

    def runs(source: str) -> dict[tuple[str, tuple[int, ...]], dict[str, dict]]:
        results = json.loads((ROOT / source).read_text())
        return {(r["shape"], tuple(r["ranks"])): {row["method"]: row for row in r["rows"]} for r in results}

    def cell(row: dict, bold: bool = False) -> str:
        text = f"{row['train_added']} / {row['infer_added']}"
        text = f"**{text}**" if bold else text
        return text + (" (a)" if "merged" in row.get("paths", {}).values() else "")

    def find(rows: dict[str, dict], prefix: str) -> dict:
        return next(row for method, row in rows.items() if method.startswith(prefix))

    torch_ops, fused = runs(torch_source), runs(fused_source)
    freeze = "tucker auto, freeze_modes=('i',)"
    specs = [
        ("Tucker factored, torch ops", torch_ops, "tucker factored", False),
        ("Tucker merged, torch ops", torch_ops, "tucker merged", False),
        ('Tucker `freeze_modes=("i",)`, torch ops', torch_ops, freeze, False),
        ("**Tucker factored, fused kernels**", fused, "tucker factored", True),
        ("Tucker merged, fused kernels", fused, "tucker merged", False),
        ('Tucker `freeze_modes=("i",)`, fused kernels', fused, freeze, False),
        ("peft LoRA (matched rank)", torch_ops, "peft LoRA", False),
        ("LyCORIS LoCon-Tucker (matched rank)", torch_ops, "LyCORIS", False),
    ]
    rows = [
        [label] + [cell(find(source[(shape, tuple(ranks))], prefix), bold) for shape, ranks, _ in OPS_COLUMNS]
        for label, source, prefix, bold in specs
    ]
    return table(["method"] + [header for _, _, header in OPS_COLUMNS], rows)


#: KIND -> renderer(*sources) for ``<!-- table: KIND SOURCE... -->``.
TABLES: dict[str, Callable[..., list[str]]] = {
    "layers-train": layers_train,
    "layers-infer": layers_infer,
    "speed-summary": speed_summary,
    "memory-summary": memory_summary,
    "motion-summary": motion_summary,
    "unet": unet_table,
    "motion": motion_table,
    "motion-allocation": motion_allocation,
    "ops": ops_table,
}
MARKER = re.compile(r"^<!-- table: (\S+)((?: \S+)*) -->$")


def measured_tables(path: Path) -> list[tuple[int, int, int, list[str], list[str]]]:
    """(marker line index, table start, table end, table as written, table rendered) for every marked table;
    the table starts on the line after its marker and one blank line between them."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m:
            assert m.group(1) in TABLES, f"{rel(path)}:{i + 1}: unknown table kind {m.group(1)!r}"
            start = i + 2 if i + 1 < len(lines) and not lines[i + 1].strip() else i + 1
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            found.append((i, start, end, lines[start:end], TABLES[m.group(1)](*m.group(2).split())))
    return found


def test_measured_tables_match_their_files():
    stale = []
    for path in doc_files():
        for i, _, _, written, rendered in measured_tables(path):
            if written != rendered:
                stale.append(f"{rel(path)}:{i + 1}: expected\n" + "\n".join(rendered))
    assert not stale, "tables that differ from their measurement files (python tests/test_docs.py rewrites them):\n" + (
        "\n\n".join(stale)
    )


def test_measured_tables_are_marked():
    """The README's result tables and every table of the performance pages come from a measurement file."""
    assert len(measured_tables(README)) == 3
    for name in ("performance.md", "gpu.md", "experiments/temporal-rank.md"):
        path = ROOT / "docs" / name
        lines = path.read_text().splitlines()
        marked = {start for _, start, _, _, _ in measured_tables(path)}
        tables = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
        unmarked = [i + 1 for i in tables if i not in marked]
        assert marked and not unmarked, f"docs/{name}: tables without a <!-- table: ... --> marker at lines {unmarked}"


def test_renderers_read_the_measurements():
    """The renderers pick the right cells (hand-checked against the files)."""
    cpu = layer_results("docs/layers_cpu.json")["Conv3d 640x640x(3,1,1), 8x16x16"]
    assert spread(cpu[AUTO], "train") == "1.06x (1.05-1.11)" and cpu[LORA]["params"] == 5120
    assert statistics.median(cpu[LYCORIS]["train_ratio_runs"]) == cpu[LYCORIS]["train_ratio"]
    assert unet_results("docs/unet_cpu.txt")["peft LoRA (matched)"]["ratio"] == pytest.approx(1.1296, abs=1e-4)
    assert unet_results("docs/gpu/unet_fp32.md")["tucker (4,4,1,1,1)"]["ratio"] == pytest.approx(0.243 / 0.220, 1e-2)
    ops = ops_table("docs/ops_torch.json", "docs/ops_fused.json")
    assert ops[2].split(" | ")[1:] == ["17 / 6", "21 / 6", "17 / 6", "16 / 5 |"]  # factored: 11 mm, 2 mul, ...
    assert ops[4].split(" | ")[3:] == ["17 / 5 (a)", "15 / 4 (a) |"]  # merged inference there


def rewrite_tables() -> None:
    """Rewrite every marked table from its measurement files (run after re-measuring)."""
    for path in doc_files():
        lines = path.read_text().splitlines()
        for _, start, end, _, rendered in reversed(measured_tables(path)):
            lines[start:end] = rendered
        path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    rewrite_tables()
    sys.exit(0)
