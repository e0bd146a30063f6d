"""The compute paths of an adapted layer (math and autograd only, no module state).

All give ``layer(x)`` with the weight ``W + alpha * dW``, ``dW = K x_1 U_o x_2 U_i`` where
``K = G x_3 U_t x_4 U_h x_5 U_w`` is the small (r_o, r_i, k...) kernel:

- factored: ``base(x) + alpha * U_o . conv(U_i^T x, K)``; dW is never formed. The channel
  projections are batched matmuls and the update is added into the base output in place.
- merged: one convolution with ``W + alpha * dW`` (``MergedConv``); its backward gets the input
  gradient from the same merged weight and the adapter gradients from the projections
  ``P = U_i^T x`` and ``Q = U_o^T dy`` and a small kernel-sized correlation, never forming the
  O x I x k weight gradient. It saves ``x`` only when ``U_i`` trains, otherwise ``P`` alone.
- module: the layer's own forward with its weight swapped (grouped convs, Conv subclasses that
  override ``forward``), always exact.

``choose_path`` is the cost model behind ``forward_mode="auto"``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT_GRAD = {1: nn.grad.conv1d_weight, 2: nn.grad.conv2d_weight, 3: nn.grad.conv3d_weight}


# ---------------------------------------------------------------------------------------------- tensors
_CORE, _KIN, _KOUT = "ab", "cde", "xyz"


@functools.cache
def _kernel_equations(n_kernel: int) -> tuple[str, str, tuple[str, ...]]:
    """einsum equations for ``K = G x_n U_n`` over ``n_kernel`` kernel modes, and its gradients."""
    kin, kout = _KIN[:n_kernel], _KOUT[:n_kernel]
    factors = [f"{o}{i}" for o, i in zip(kout, kin, strict=True)]
    forward = f"{_CORE}{kin},{','.join(factors)}->{_CORE}{kout}"
    d_core = f"{_CORE}{kout},{','.join(factors)}->{_CORE}{kin}"
    d_factors = tuple(
        f"{_CORE}{kout},{_CORE}{kin}{''.join(',' + f for m, f in enumerate(factors) if m != n)}->{factors[n]}"
        for n in range(n_kernel)
    )
    return forward, d_core, d_factors


def small_kernel(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``K = G x_3 U_t x_4 U_h x_5 U_w``: the core expanded along the kernel modes only.

    core: (r_o, r_i, r_k...); factors: all modes, (dim_n, r_n). Returns (r_o, r_i, k...).
    For a Linear (no kernel mode) this is the core itself. One ``einsum``: the same numbers as
    ``tucker.reconstruct`` restricted to the kernel modes, in one call.
    """
    if core.ndim == 2:
        return core
    return torch.einsum(_kernel_equations(core.ndim - 2)[0], core, *factors[2:])


def small_kernel_grads(
    dK: torch.Tensor, core: torch.Tensor, factors: Sequence[torch.Tensor], need: Sequence[bool]
) -> list[torch.Tensor | None]:
    """Gradients of ``small_kernel`` given ``dK``: ``[dG, dU_t, dU_h, dU_w]`` (None where not needed).

    ``dG = dK x_n U_n^T``; ``dU_n = dK_(n) (G x_{m != n} U_m)_(n)^T``.
    """
    kernel = list(factors[2:])
    _, d_core, d_factors = _kernel_equations(len(kernel))
    out: list[torch.Tensor | None] = [torch.einsum(d_core, dK, *kernel) if need[0] else None]
    for n, eq in enumerate(d_factors):
        others = [U for m, U in enumerate(kernel) if m != n]
        out.append(torch.einsum(eq, dK, core, *others) if need[n + 1] else None)
    return out


def _kernel_times_U_i(K: torch.Tensor, U_i: torch.Tensor) -> torch.Tensor:
    """``K x_2 U_i`` as (r_o, I * k): one bmm of U_i (I, r_i) with each K[a] (r_i, k)."""
    r_o, r_i = K.shape[:2]
    KI = torch.bmm(U_i.expand(r_o, -1, -1), K.reshape(r_o, r_i, -1))  # (r_o, I, k)
    return KI.reshape(r_o, -1)


def merged_weight(
    weight: torch.Tensor, K: torch.Tensor, U_o: torch.Tensor, U_i: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``W + alpha * K x_1 U_o x_2 U_i`` in the weight's dtype, the last product fused with the sum (addmm)."""
    KI = _kernel_times_U_i(K, U_i).to(weight.dtype)
    out = torch.addmm(weight.reshape(weight.shape[0], -1), U_o.to(weight.dtype), KI, alpha=alpha)
    return out.view(weight.shape)


def channel_mix(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``M x`` along the channel dim: x (N, C, *S), M (C', C) -> (N, C', *S), one batched matmul.

    Explicit ``bmm`` (not ``matmul``, whose algorithm depends on ``requires_grad``), so results are
    bitwise the same in training and inference.
    """
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    return torch.bmm(M.expand(x.shape[0], -1, -1), x3).view(x.shape[0], M.shape[0], *x.shape[2:])


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ConvGeometry:
    """Stride / padding / dilation of a plain ``nn.ConvNd``, with its padding made explicit.

    ``pad`` (an ``F.pad`` spec with ``pad_mode``) is applied to the input first when the layer pads
    with a non-zero mode or asymmetrically ("same" with an even kernel); the convolution itself then
    uses the symmetric zero ``padding``.
    """

    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[int, ...] | None = None
    pad_mode: str = "constant"

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        dims = conv.weight.ndim - 2
        kernel = conv.weight.shape[2:]
        if conv.padding_mode != "zeros":
            pad = tuple(conv._reversed_padding_repeated_twice)
            return cls(dims, conv.stride, (0,) * dims, conv.dilation, pad, conv.padding_mode)
        if conv.padding == "valid":
            return cls(dims, conv.stride, (0,) * dims, conv.dilation)
        if conv.padding == "same":
            total = [d * (k - 1) for d, k in zip(conv.dilation, kernel, strict=True)]
            if all(t % 2 == 0 for t in total):
                return cls(dims, conv.stride, tuple(t // 2 for t in total), conv.dilation)
            pad = tuple(p for t in reversed(total) for p in (t // 2, t - t // 2))
            return cls(dims, conv.stride, (0,) * dims, conv.dilation, pad)
        return cls(dims, conv.stride, tuple(conv.padding), conv.dilation)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it (explicitly padded where needed)."""
        return x if self.pad is None else F.pad(x, self.pad, mode=self.pad_mode)

    def conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _CONV[self.dims](x, w, bias, self.stride, self.padding, self.dilation)

    def input_grad(self, shape: torch.Size, w: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        dims = self.dims
        empty = dy.new_empty(shape)  # only its shape is read
        return torch.ops.aten.convolution_backward(
            dy, empty, w, None, self.stride, self.padding, self.dilation, False, (0,) * dims, 1, (True, False, False)
        )[0]

    def weight_grad(self, x: torch.Tensor, shape: torch.Size, dy: torch.Tensor) -> torch.Tensor:
        return _CONV_WEIGHT_GRAD[self.dims](x, shape, dy, self.stride, self.padding, self.dilation)


# ---------------------------------------------------------------------------------------------- paths
def factored_linear(
    y: torch.Tensor, x: torch.Tensor, core: torch.Tensor, U_o: torch.Tensor, U_i: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``y + alpha * x U_i G^T U_o^T`` for a Linear on x (..., I), the last matmul fused with the addition."""
    z = torch.mm(torch.mm(x.reshape(-1, x.shape[-1]), U_i), core.T)
    return torch.addmm(y.reshape(-1, y.shape[-1]), z, U_o.T, alpha=alpha).view(y.shape)


def factored_conv(
    y: torch.Tensor,
    x: torch.Tensor,
    geometry: ConvGeometry,
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    alpha: float,
) -> torch.Tensor:
    """``y + alpha * U_o . conv(U_i^T x, K)`` on batched x (N, I, *S); y is the base output (N, O, *S')."""
    U_o, U_i = factors[0], factors[1]
    P = geometry.prepare(channel_mix(x, U_i.T))
    z = geometry.conv(P, small_kernel(core, factors))
    N = z.shape[0]
    y3 = y.view(N, y.shape[1], -1)  # the base output, which nothing saved: add into it in place
    y3.baddbmm_(U_o.expand(N, -1, -1).to(y.dtype), z.reshape(N, z.shape[1], -1).to(y.dtype), alpha=alpha)
    return y


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of autocast on a device type; the meta device has no autocast."""
    if device_type == "meta":
        return False, torch.float32
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _merged_output(
    x, weight, bias, geometry: ConvGeometry, alpha: float, core, factors
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv(x, W + alpha * dW, b), K)``, computed without autograd (the same kernels in training and inference)."""
    with torch.no_grad():
        K = small_kernel(core, factors)
        return geometry.conv(x, merged_weight(weight, K, factors[0], factors[1], alpha), bias), K


_CORE_ARG = 5  # position of the core in MergedConv.apply's arguments; the factors follow it


class MergedConv(torch.autograd.Function):
    """``conv(x, W + alpha * K x_1 U_o x_2 U_i, b)`` with a backward that never forms the O x I x k gradient.

    Inputs: x (already padded by the geometry), the base weight and bias, the geometry, alpha, the
    core, then every factor in mode order (U_o, U_i, kernel modes).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: ConvGeometry, alpha: float, core, *factors):  # type: ignore[override]
        U_i = factors[1]
        y, K = _merged_output(x, weight, bias, geometry, alpha, core, factors)
        train_factors = ctx.needs_input_grad[_CORE_ARG + 1 :]
        adapter_grad = ctx.needs_input_grad[_CORE_ARG] or any(train_factors)
        keep_x = train_factors[1] or ctx.needs_input_grad[1]
        P = channel_mix(x, U_i.T.to(x.dtype)) if adapter_grad and not keep_x else None
        ctx.geometry, ctx.alpha, ctx.n_factors = geometry, alpha, len(factors)
        ctx.x_shape, ctx.autocast = x.shape, autocast_state(x.device.type)
        ctx.save_for_backward(x if keep_x else None, P, K, weight, core, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, P, K, weight, core, *factors = ctx.saved_tensors
        g, alpha = ctx.geometry, ctx.alpha
        U_o, U_i = factors[0], factors[1]
        need = ctx.needs_input_grad
        enabled, dtype = ctx.autocast
        grads: list[torch.Tensor | None] = [None] * (_CORE_ARG + 1 + ctx.n_factors)
        with torch.autocast(dy.device.type, dtype=dtype, enabled=enabled):
            if need[0]:
                merged = merged_weight(weight, K, U_o, U_i, alpha)
                grads[0] = g.input_grad(ctx.x_shape, merged.to(dy.dtype), dy)
            if need[1]:
                grads[1] = g.weight_grad(x.to(dy.dtype), weight.shape, dy).to(weight.dtype)
            if need[2]:
                grads[2] = dy.sum(dim=[d for d in range(dy.ndim) if d != 1])
            if any(need[_CORE_ARG:]):
                grads[_CORE_ARG:] = _merged_adapter_grads(x, P, K, dy, g, alpha, core, factors, need[_CORE_ARG:])
        return tuple(grads)


def _merged_adapter_grads(x, P, K, dy, g: ConvGeometry, alpha, core, factors, need) -> list[torch.Tensor | None]:
    """Gradients of core and factors from ``P = U_i^T x``, ``Q = U_o^T dy`` and kernel-sized correlations."""
    U_o, U_i = factors[0], factors[1]
    dtype = dy.dtype
    if P is None:
        P = channel_mix(x, U_i.T.to(x.dtype))
    P = P.to(dtype)
    Q = channel_mix(dy, U_o.T.to(dtype))  # (N, r_o, *S')
    Kd = K.to(dtype)
    out: list[torch.Tensor | None] = [None] * len(need)
    if need[0] or any(need[3:]):
        dK = alpha * g.weight_grad(P, K.shape, Q).to(K.dtype)  # (r_o, r_i, k...) = corr(P, Q)
        grads = small_kernel_grads(dK, core, factors, [need[0], *need[3:]])
        out[0] = grads[0]
        out[3:] = grads[1:]
    if need[1]:  # U_o: dy z^T with z = conv(P, K)
        z = g.conv(P, Kd)
        out[1] = alpha * _batch_outer(dy, z).to(U_o.dtype)
    if need[2]:  # U_i: x dP^T with dP = conv_input(Q, K)
        dP = g.input_grad(P.shape, Kd, Q)
        out[2] = alpha * _batch_outer(x.to(dtype), dP).to(U_i.dtype)
    return out


def _batch_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_{n, s} a[n, :, s] b[n, :, s]^T``: (N, A, *S), (N, B, *S) -> (A, B)."""
    N = a.shape[0]
    return torch.bmm(a.reshape(N, a.shape[1], -1), b.reshape(N, b.shape[1], -1).transpose(1, 2)).sum(0)


def merged_conv(
    x: torch.Tensor,
    base: nn.Module,
    geometry: ConvGeometry,
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    alpha: float,
) -> torch.Tensor:
    """A plain conv layer's output with ``W + alpha * dW`` through ``MergedConv`` (batched or not)."""
    unbatched = x.ndim == core.ndim - 1
    if unbatched:
        x = x.unsqueeze(0)
    x = geometry.prepare(x)
    needs_graph = x.requires_grad or base.weight.requires_grad or core.requires_grad
    if torch.is_grad_enabled() and (needs_graph or any(U.requires_grad for U in factors)):
        y = MergedConv.apply(x, base.weight, base.bias, geometry, alpha, core, *factors)
    else:  # inference: the same numbers without the autograd Function
        y, _ = _merged_output(x, base.weight, base.bias, geometry, alpha, core, factors)
    return y.squeeze(0) if unbatched else y


def module_forward(layer: nn.Module, weight: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run ``layer``'s own forward with its ``weight`` replaced (gradients flow into ``weight``)."""
    return torch.func.functional_call(layer, {"weight": weight}, args, kwargs, strict=False)


# ---------------------------------------------------------------------------------------------- cost model
def choose_path(weight_numel: int, x_numel: int, y_numel: int) -> str:
    """``"merged"`` or ``"factored"`` for one plain conv call.

    merged pays for forming ``W + alpha * dW`` (a read and a write of the weight, in the forward and
    again in the backward) and four reads of x / dy for the adapter gradients; factored pays about
    eight passes over the full-size activations (projecting x, adding into y, their gradients and
    the extra input gradient). Measured on CPU (``benchmarks/bench_layers.py``), merged wins when
    the weight has fewer entries than the input and output activations together.
    """
    return "merged" if weight_numel < x_numel + y_numel else "factored"
