"""Mutation smoke test: apply known one-line bugs to a copy of the repository and check the fast tests catch each.

Each entry of ``MUTATIONS`` names a file, an exact snippet of it (it must occur exactly once), its replacement,
and the tests expected to catch the bug. For every mutation the script copies the repository to a temporary
folder once, writes the mutated file there, runs ``pytest -q -x -m "not slow"`` on that mutation's tests (or,
with ``--full``, the whole default run) against the copy's ``src``, restores the file, and prints a table:
mutation, caught or not, the tests that failed. It exits non-zero when a mutation survives, a snippet does not
occur exactly once, or the unmutated copy fails its tests.

    python tools/mutation_smoke.py                # every mutation, its own tests (a few minutes on 2 cores)
    python tools/mutation_smoke.py --full         # every mutation against the whole default test run
    python tools/mutation_smoke.py --only alpha   # the mutations whose name contains "alpha"
    python tools/mutation_smoke.py --list         # check the snippets and list the mutations, run nothing

Not collected by pytest (``testpaths`` is ``tests``); ``tests/test_mutation_smoke.py`` checks that every snippet
still occurs exactly once, so the list cannot go stale silently.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Left out of the copy: version control, environments, caches and run outputs.
IGNORED = (
    ".git",
    ".venv",
    "venv",
    "outputs",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    "*.egg-info",
)


@dataclass(frozen=True)
class Mutation:
    """A one-line bug: ``original`` (exactly once in ``path``) replaced by ``replacement``; ``tests`` are the pytest
    arguments (files or node ids) expected to catch it, all in the default (not slow) run."""

    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "centre tap index",
        "src/tucker_lora/tucker.py",
        "(torch.arange(size, device=device) == size // 2)",
        "(torch.arange(size, device=device) == (size - 1) // 2)",
        ("tests/test_layer_math.py",),
    ),
    Mutation(
        "orthonormalisation transpose",
        "src/tucker_lora/tucker.py",
        "core = mode_product(core, R, n)",
        "core = mode_product(core, R.T, n)",
        ("tests/test_lifecycle.py",),
    ),
    Mutation(
        "even-kernel same split",
        "src/tucker_lora/functional.py",
        "for p in (t // 2, t - t // 2)",
        "for p in (t - t // 2, t // 2)",
        ("tests/test_paths.py",),
    ),
    Mutation(
        "U_i dP term of dx",
        "src/tucker_lora/functional.py",
        "            elif need[0]:\n                dx = channel_mix(dP, _as(U_i, dtype), out=dx)",
        "            elif need[0]:\n                pass",
        ("tests/test_paths.py",),
    ),
    Mutation(
        "alpha in the kernel gradient",
        "src/tucker_lora/functional.py",
        "dK = dK if alpha == 1 else dK * alpha",
        "dK = dK",
        ("tests/test_paths.py",),
    ),
    Mutation(
        "alpha on the eager path",
        "src/tucker_lora/layer.py",
        "return factored_conv(result, x, self._geometry, core, factors, alpha)",
        "return factored_conv(result, x, self._geometry, core, factors, 1.0)",
        ("tests/test_paths.py",),
    ),
    Mutation(
        "alpha on the eager Linear path",
        "src/tucker_lora/layer.py",
        "return factored_linear(result, x, core, factors[0], factors[1], alpha)",
        "return factored_linear(result, x, core, factors[0], factors[1], 1.0)",
        ("tests/test_layer_math.py",),
    ),
    Mutation(
        "Kronecker-gradient transpose",
        "src/tucker_lora/functional.py",
        "D.permute(0, 2, 1, 3)",
        "D.permute(2, 0, 1, 3)",
        ("tests/test_paths.py",),
    ),
    Mutation(
        "gradient sketch keeps the last batch (projection)",
        "src/tucker_lora/init.py",
        "self.C = c if self.C is None else self.C.add_(c)",
        "self.C = c",
        ("tests/test_init.py",),
    ),
    Mutation(
        "gradient sketch keeps the last batch (range)",
        "src/tucker_lora/init.py",
        "self.Y[n] = y if n not in self.Y else self.Y[n].add_(y)",
        "self.Y[n] = y",
        ("tests/test_init.py",),
    ),
    Mutation(
        "trailing-bytes check",
        "src/tucker_lora/io.py",
        "if max(ends) != data:",
        "if max(ends) > data:",
        ("tests/test_bad_input.py",),
    ),
    Mutation(
        "LoRA alpha in --method lora",
        "src/tucker_lora/video/adapters.py",
        "lora_alpha=alpha * rank",
        "lora_alpha=alpha",
        ("tests/test_video.py::test_lora_baseline_scales_its_update_by_alpha",),
    ),
    Mutation(
        "rank clipping logged per layer",
        "src/tucker_lora/layer.py",
        "if key not in _CLIPPING_REPORTED:",
        "if True:",
        ("tests/test_lifecycle.py",),
    ),
    Mutation(
        "fsdp_version 1 accepted",
        "src/tucker_lora/video/distributed.py",
        "if state.fsdp_plugin.fsdp_version != 2:",
        "if state.fsdp_plugin.fsdp_version not in (1, 2):",
        ("tests/test_fsdp.py::test_fsdp_version_1_is_refused_and_2_accepted",),
    ),
    Mutation(
        "auto merges on CUDA",
        "src/tucker_lora/functional.py",
        '"cuda": {"train": 0.0, "infer": 0.0}',
        '"cuda": {"train": 0.3, "infer": 1.0}',
        ("tests/test_paths.py",),
    ),
)


def occurrences(mutation: Mutation, root: Path = ROOT) -> int:
    """How often the mutation's snippet occurs in its file (0 when the file is missing)."""
    path = root / mutation.path
    return path.read_text().count(mutation.original) if path.is_file() else 0


def stale(mutations: tuple[Mutation, ...] = MUTATIONS, root: Path = ROOT) -> list[str]:
    """One line per mutation whose snippet does not occur exactly once in its file."""
    return [
        f"{m.name}: snippet occurs {n} times in {m.path} (must be exactly once)"
        for m in mutations
        if (n := occurrences(m, root)) != 1
    ]


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)")


def run_pytest(copy: Path, args: list[str], timeout: float) -> tuple[int, list[str], str]:
    """``pytest -q -x -m "not slow"`` on ``args`` in ``copy`` with its own ``src`` first on the path: (exit status,
    the ``FAILED`` / ``ERROR`` test ids, the output's tail)."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", "-rfE", *args]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, [], out[-2000:] + f"\n(timed out after {timeout:.0f} s)"
    out = proc.stdout + proc.stderr
    failed = list(dict.fromkeys(m.group(1) for line in out.splitlines() if (m := FAILED.match(line))))
    return proc.returncode, failed, out[-2000:]


def check_copy_imports_itself(copy: Path) -> None:
    """The tests in the copy must import the copy's package (not an installed one), or every mutation survives."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    out = subprocess.run(
        [sys.executable, "-c", "import tucker_lora; print(tucker_lora.__file__)"],
        cwd=copy / "tests", env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports tucker_lora from {out}, not from {copy / 'src'}")


def table(rows: list[tuple[str, str, str]]) -> str:
    head = ("mutation", "caught", "failed tests")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(2)]
    lines = [f"| {head[0]:<{widths[0]}} | {head[1]:<{widths[1]}} | {head[2]}"]
    lines.append(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * 14}")
    lines += [f"| {a:<{widths[0]}} | {b:<{widths[1]}} | {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="run the whole default test run per mutation")
    p.add_argument("--only", default="", help="only the mutations whose name contains this text")
    p.add_argument("--list", action="store_true", help="check the snippets and list the mutations; run nothing")
    p.add_argument("--skip-baseline", action="store_true", help="do not first run the tests on the unmutated copy")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = p.parse_args(argv)

    mutations = tuple(m for m in MUTATIONS if args.only in m.name)
    problems = stale(mutations)
    for line in problems:
        print(line, file=sys.stderr)
    if args.list or problems:
        for m in mutations:
            print(f"{m.name}: {m.path}: {' '.join(m.tests)}")
        return 1 if problems else 0

    with tempfile.TemporaryDirectory(prefix="mutation-smoke-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*IGNORED))
        check_copy_imports_itself(copy)
        if not args.skip_baseline:
            baseline = [] if args.full else list(dict.fromkeys(t for m in mutations for t in m.tests))
            status, failed, tail = run_pytest(copy, baseline, args.timeout)
            if status != 0:
                print(f"the unmutated copy fails its tests ({', '.join(failed) or status}):\n{tail}", file=sys.stderr)
                return 1
        rows, survivors = [], 0
        for m in mutations:
            target = copy / m.path
            clean = target.read_text()
            target.write_text(clean.replace(m.original, m.replacement, 1))
            start = time.perf_counter()
            try:
                status, failed, tail = run_pytest(copy, [] if args.full else list(m.tests), args.timeout)
            finally:
                target.write_text(clean)
            caught = status != 0 and bool(failed)
            survivors += not caught
            detail = ", ".join(failed) if failed else f"none (pytest exit {status})"
            rows.append((m.name, "yes" if caught else "NO", detail))
            print(f"{m.name}: {'caught' if caught else 'SURVIVED'} in {time.perf_counter() - start:.0f} s", flush=True)
            if not caught:
                print(tail, file=sys.stderr)
    print()
    print(table(rows))
    print(f"\n{len(rows) - survivors} of {len(rows)} mutations caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
