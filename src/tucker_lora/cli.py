"""What the package's command lines share: bad input reported as ``error: ...`` with exit status 2, and help
that shows each option's default once."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .errors import InputError

__all__ = ["HelpFormatter", "run_cli"]

_DEFAULT = re.compile(r"\bdefault\b")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default shown once: ``(default: X)`` is appended unless the help already says what
    the default is (it has the word "default"), the default is None (the help then says what happens without the
    option) or the option is a flag. A list default is shown as it is typed (``0 1``, quoted where needed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = action.nargs == 0  # store_true / store_false / store_const
        if _DEFAULT.search(text) or default is None or default is argparse.SUPPRESS or flag:
            return text
        shown = shlex.join(str(v) for v in default) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def run_cli(
    main: Callable[[Optional[Sequence[str]]], Any],
    argv: Optional[Sequence[str]] = None,
    errors: tuple[type[Exception], ...] = (InputError,),
) -> int:
    """Run a command line's ``main``: bad input (``errors``) prints ``error: ...`` (no traceback) and gives exit
    status 2."""
    try:
        main(argv)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
