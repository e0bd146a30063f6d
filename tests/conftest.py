"""Shared toy models for the tests (peft-style: a Conv3d net with a Conv2d and a Linear head) and the
hypothesis profile."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

# Property tests draw the same examples on every run (a hash of each test), so CI is reproducible and a failure
# reruns as it was; HYPOTHESIS_PROFILE=explore draws new ones each run, to search further.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Without a GPU the fused Triton kernels (tests/test_fused_kernels.py) run under Triton's interpreter, which must be
# chosen before triton is first imported (triton.language's own functions are decorated then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class ToyVideoNet(nn.Module):
    """Conv3d -> per-frame Conv2d -> Linear head; small enough for many lifecycle tests."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(3, channels, 3, padding=1)
        self.temporal = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.conv2d = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.temporal(torch.relu(self.conv3d(x))))
        n, c, t, h, w = y.shape
        y = self.conv2d(y.transpose(1, 2).reshape(n * t, c, h, w))
        return self.head(y.mean(dim=(2, 3))).reshape(n, t, -1)


TARGETS = ["conv3d", "temporal", "conv2d", "head"]


@pytest.fixture
def toy() -> ToyVideoNet:
    torch.manual_seed(0)
    return ToyVideoNet()


@pytest.fixture
def video() -> torch.Tensor:
    return torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def run_python(code: str) -> str:
    """Run ``code`` (dedented) in a fresh interpreter in the tests folder (so it can import conftest); its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def einsum_expr(order: int) -> str:
    """``"abc,Aa,Bb,Cc->ABC"`` for ``order`` 3: the Tucker product ``G x_1 U_1 ... x_N U_N`` as one einsum."""
    src, dst = "abcde"[:order], "ABCDE"[:order]
    return src + "," + ",".join(d + s for d, s in zip(dst, src, strict=True)) + "->" + dst


def einsum_reconstruct(core, factors):
    """G x_1 U_1 ... x_N U_N as one einsum (works on torch tensors and numpy arrays): the tests' reference for the
    library's mode products."""
    import numpy as np

    lib = np if isinstance(core, np.ndarray) else torch
    return lib.einsum(einsum_expr(core.ndim), core, *factors)
