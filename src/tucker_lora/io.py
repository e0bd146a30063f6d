"""Crash-safe adapter saving and checks of adapter files before peft reads them."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import AdapterFileError

#: The files of a peft ``save_pretrained`` adapter folder.
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a safetensors file's header against its size; return the header.

    Layout: an 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
    data_offsets}}``), then the tensor bytes, which must end exactly at the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"'{path}' is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise AdapterFileError(f"'{path}' is truncated or corrupted: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFileError(f"'{path}' is corrupted: its safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise AdapterFileError(f"'{path}' is corrupted: its safetensors header is not a JSON object")
    ends = [0]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise AdapterFileError(f"'{path}' is corrupted: tensor '{name}' has no valid data_offsets")
        ends.append(int(offsets[1]))
    data = size - 8 - n
    if max(ends) != data:
        kind = "truncated" if max(ends) > data else "corrupted"
        raise AdapterFileError(
            f"'{path}' is {kind}: its header describes {max(ends)} bytes of tensor data, the file holds {data}"
        )
    return header


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Write into a temporary sibling of ``target``; on success move each file into ``target``.

    Each file replaces its old version with one atomic rename, so a failure while writing leaves
    every file already in ``target`` as it was; files of ``target`` not written here are kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        yield stage
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            _fsync(src)
            dst = target / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def replace_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished folder ``src`` to ``dst`` (same file system), replacing any folder already there.

    The files of ``src`` are synced to disk first, then ``src`` is renamed to ``dst`` in one atomic rename.
    An existing ``dst`` is first renamed aside (``.{name}.old-*``) and deleted only once the new one is in
    place, so a crash at any point leaves a complete ``dst``, old or new (or, between the two renames, the
    old one under its aside name).
    """
    src, dst = Path(src), Path(dst)
    for path in (p for p in src.rglob("*") if p.is_file()):
        _fsync(path)
    aside = None
    if dst.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, aside / dst.name)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, **kwargs)``, crash-safe: files are staged, then renamed into place."""
    with staged_directory(save_directory) as stage:
        model.save_pretrained(str(stage), **kwargs)
