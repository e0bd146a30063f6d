"""Every command line's ``--help``, read as a user reads it: each option has help, and says its default once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The package's command lines, as a user starts them.
COMMANDS = {
    "train": [str(ROOT / "examples" / "train_text_to_video.py")],
    "sample": [str(ROOT / "examples" / "sample_text_to_video.py")],
    "evaluate": [str(ROOT / "examples" / "evaluate_videos.py")],
    "python -m tucker_lora.eval": ["-m", "tucker_lora.eval"],
    "python -m tucker_lora.export": ["-m", "tucker_lora.export"],
    "python -m tucker_lora.resize": ["-m", "tucker_lora.resize"],
}
#: How many options each command has at least (so a parse that found none fails).
MIN_OPTIONS = {"python -m tucker_lora.export": 7, "python -m tucker_lora.resize": 6}
_WORD_DEFAULT = re.compile(r"\bdefault\b")


def help_entries(text: str) -> dict[str, str]:
    """``{invocation: help}`` of every argument in argparse's ``--help`` output.

    After the usage block, an argument starts on a line indented by two spaces (``  --name METAVAR  help``)
    and its help continues on lines indented further; section headings start at the margin.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if not line.strip())  # the usage block ends at a blank line
    entries: dict[str, str] = {}
    current = None
    for line in lines[start:]:
        if not line.strip() or not line.startswith(" "):
            current = None  # a blank line or a section heading
            continue
        if re.match(r"^  \S", line):
            invocation, _, help_text = line.strip().partition("  ")
            current = invocation.strip()
            entries[current] = help_text.strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help_and_one_default(name):
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run(
        [sys.executable, *COMMANDS[name], "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = help_entries(proc.stdout)
    entries.pop("-h, --help")
    assert len(entries) >= MIN_OPTIONS.get(name, 10), sorted(entries)  # the parse found the options
    problems = []
    for invocation, text in entries.items():
        flag = invocation.startswith("-") and " " not in invocation  # e.g. --merge: on or off, no value
        positional = not invocation.startswith("-")  # required, or optional with its default in the help
        defaults = len(_WORD_DEFAULT.findall(text))
        if not text:
            problems.append(f"{invocation}: no help")
        elif defaults > 1 or defaults != (0 if flag else 1) and not positional:
            problems.append(f"{invocation}: 'default' {defaults} times in {text!r}")
    assert not problems, "\n".join(problems)


def test_help_parser_reads_argparse_layout():
    """The reader on a hand-written help text: wrapped help, a long invocation on its own line, a heading."""
    text = (
        "usage: x [-h] [--a A]\n"
        "\n"
        "Some description.\n"
        "\n"
        "group:\n"
        "  --a A       first line\n"
        "              second line (default: 1)\n"
        "  --very_long_option VERY_LONG_OPTION\n"
        "              its help\n"
        "  --flag      a switch\n"
    )
    assert help_entries(text) == {
        "--a A": "first line second line (default: 1)",
        "--very_long_option VERY_LONG_OPTION": "its help",
        "--flag": "a switch",
    }
