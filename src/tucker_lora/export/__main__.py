import sys

from .cli import export_cli

sys.exit(export_cli())
