import sys

from .cli import resize_cli

sys.exit(resize_cli())
