"""What the installed ``tucker_lora_hook.pth`` costs: at start-up, and on ``import peft``.

    python benchmarks/bench_import_hook.py --runs 20

Each number is the minimum (and median) over ``--runs`` fresh interpreters, run one after the other:

- start-up: the hook module's own import time at interpreter start-up, as ``python -X importtime -c pass``
  reports it (cumulative microseconds of the ``tucker_lora_hook`` line), beside the whole ``site`` import;
- ``import peft``: wall time with the hook, and with the hook removed first (``tucker_lora_hook.uninstall()``),
  and the number of modules each leaves in ``sys.modules``;
- what the hook adds to ``import peft``: the wall time of ``import tucker_lora`` right after ``import peft``
  (hook removed), which is what the hook runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

ADDED = (
    "import sys, time, tucker_lora_hook\ntucker_lora_hook.uninstall()\nimport peft\nstart = time.perf_counter()\n"
    "import tucker_lora\nprint(time.perf_counter() - start)"
)
IMPORT_PEFT = (
    "import sys, time\n{prelude}\nstart = time.perf_counter()\nimport peft\n"
    "print(time.perf_counter() - start, len(sys.modules), 'tucker_lora' in sys.modules)"
)


def importtime_us(name: str) -> tuple[int, int]:
    """(hook cumulative us, site cumulative us) of one ``python -X importtime -c pass``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    found = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s+)(\S+)$", line)
        if m and m.group(4) in (name, "site"):
            found[m.group(4)] = int(m.group(2))
    if name not in found:
        raise SystemExit(f"{name} is not imported at start-up: is tucker_lora_hook.pth installed (pip install -e .)?")
    return found[name], found["site"]


def import_peft(prelude: str) -> tuple[float, int, bool]:
    code = IMPORT_PEFT.format(prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]), out[2] == "True"


def summary(values: list[float], unit: str, scale: float = 1.0) -> str:
    return f"min {min(values) * scale:.1f} {unit}, median {statistics.median(values) * scale:.1f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    hook, site = zip(*(importtime_us("tucker_lora_hook") for _ in range(args.runs)), strict=True)
    print(
        f"start-up, tucker_lora_hook import: {summary(list(hook), 'us')}; "
        f"whole site import: {summary(list(site), 'us')}"
    )
    for label, prelude in (
        ("with the hook", ""),
        ("hook removed", "import tucker_lora_hook; tucker_lora_hook.uninstall()"),
    ):
        runs = [import_peft(prelude) for _ in range(args.runs)]
        times = [t for t, _, _ in runs]
        modules, registered = runs[0][1], runs[0][2]
        print(f"import peft, {label}: {summary(times, 's')}; {modules} modules; tucker_lora imported: {registered}")
    run = [sys.executable, "-c", ADDED]
    added = [float(subprocess.run(run, capture_output=True, text=True, check=True).stdout) for _ in range(args.runs)]
    print(f"import tucker_lora right after import peft (what the hook adds): {summary(added, 'ms', 1e3)}")


if __name__ == "__main__":
    main()
