"""What the package's command lines share: bad input reported as ``error: ...`` with exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .errors import InputError

__all__ = ["run_cli"]


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command line's ``main``: bad input prints ``error: ...`` (no traceback) and gives exit status 2."""
    try:
        main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
