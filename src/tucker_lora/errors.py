"""The errors tucker-lora raises for bad input: each message names the thing at fault (a path, a layer, an argument).

``InputError`` is what the command lines turn into ``error: ...`` and exit status 2 (``tucker_lora.cli.run_cli``);
every error about user input derives from it. This module imports nothing, so any module may import it.
"""

from __future__ import annotations

__all__ = ["AdapterFileError", "ClipError", "InputError"]


class InputError(ValueError):
    """Bad input from the user (a path, a dataset, an argument); the message names the thing."""


class AdapterFileError(InputError):
    """An adapter file on disk is unreadable (truncated, corrupted or not safetensors)."""


class ClipError(RuntimeError):
    """A video file that cannot be used: unreadable, no video stream, or too short."""
