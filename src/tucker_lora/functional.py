"""The compute paths of an adapted layer (math only, no module state).

Both give ``layer(x)`` with the weight ``W + alpha * dW``:

- factored: ``base(x) + alpha * U_o . conv(U_i^T x, K)`` with the small kernel
  ``K = G x_3 U_t x_4 U_h x_5 U_w`` (r_o, r_i, k...); dW is never formed.
- merged: the layer's own forward with its weight swapped for ``W + alpha * dW``
  (exact for grouped convs and for Conv subclasses that override ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .tucker import multi_mode_product

ConvFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def small_kernel(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``K = G x_3 U_t x_4 U_h x_5 U_w``: the core expanded along the kernel modes only.

    core: (r_o, r_i, r_k...); factors: all modes, (dim_n, r_n). Returns (r_o, r_i, k...).
    For a Linear (no kernel mode) this is the core itself.
    """
    eye = [torch.eye(r, device=core.device, dtype=core.dtype) for r in core.shape[:2]]
    return multi_mode_product(core, list(eye) + list(factors[2:]))


def channel_mix(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``M x`` along the channel dim: x (N, C, *S), M (C', C) -> (N, C', *S), one batched matmul."""
    return torch.matmul(M, x.flatten(2)).unflatten(2, x.shape[2:])


def factored_delta(
    x: torch.Tensor, core: torch.Tensor, factors: Sequence[torch.Tensor], conv: ConvFn | None
) -> torch.Tensor:
    """``dW * x`` without forming dW.

    Linear (``conv is None``): ``x U_i G^T U_o^T`` on x (..., I).
    Conv: ``U_o . conv(U_i^T x, K)`` on x (N, I, *S) (or unbatched (I, *S)); ``conv`` applies the base
    layer's stride, padding, dilation and padding mode to any (input, weight) pair.
    """
    U_o, U_i = factors[0], factors[1]
    if conv is None:
        return torch.matmul(torch.matmul(torch.matmul(x, U_i), core.T), U_o.T)
    unbatched = x.ndim == core.ndim - 1
    if unbatched:
        x = x.unsqueeze(0)
    z = conv(channel_mix(x, U_i.T), small_kernel(core, factors))
    y = channel_mix(z, U_o)
    return y.squeeze(0) if unbatched else y


def merged_forward(layer: nn.Module, weight: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run ``layer``'s own forward with its ``weight`` replaced (gradients flow into ``weight``)."""
    return torch.func.functional_call(layer, {"weight": weight}, args, kwargs, strict=False)
