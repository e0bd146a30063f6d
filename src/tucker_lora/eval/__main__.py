"""``python -m tucker_lora.eval ...``: the evaluation command (see ``tucker_lora.eval.cli``)."""

import sys

from .cli import cli

sys.exit(cli())
