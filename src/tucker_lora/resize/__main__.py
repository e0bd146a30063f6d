import sys

from ..export.cli import resize_cli

sys.exit(resize_cli())
