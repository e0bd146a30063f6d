"""The compute paths of an adapted layer (math and autograd only, no module state).

All give ``layer(x)`` with the weight ``W + alpha * dW``, ``dW = K x_1 U_o x_2 U_i`` where
``K = G x_3 U_t x_4 U_h x_5 U_w`` is the small (r_o, r_i, k...) kernel:

- factored: ``base(x) + alpha * U_o . conv(U_i^T x, K)``; dW is never formed. The channel
  projections are batched matmuls and the update is added into the base output in place.
- merged: one convolution with ``W + alpha * dW`` (on the CPU formed in a reused per-thread buffer,
  ``scratch_like``).
- Both run, for one adapter in training, as one autograd node (``AdaptedConv``) with one backward:
  the input gradient is the base weight's plus ``alpha * U_i conv_input(Q, K)``, and the adapter
  gradients come from the projections ``P = U_i^T x``, ``Q = U_o^T dy`` and a small kernel-sized
  correlation of the two: neither the merged weight nor the O x I x k weight gradient is formed
  there. It saves ``x`` only when ``U_i`` trains, otherwise ``P`` alone.
- eager (``factored_conv``, ``factored_linear``): the factored math through autograd, one adapter
  at a time (Linear layers, adapter dropout, several active adapters).
- module: the layer's own forward with its weight swapped (grouped convs, Conv subclasses that
  override ``forward``), always exact.
- fused (``FUSED_KERNELS``, off by default): ``AdaptedConv`` with its small-kernel products and its passes over
  dy and (x, dP) each one Triton launch (``triton_kernels``), on CUDA.

``choose_path`` is the cost model behind ``forward_mode="auto"`` (shapes, device and grad mode).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT_GRAD = {1: nn.grad.conv1d_weight, 2: nn.grad.conv2d_weight, 3: nn.grad.conv3d_weight}
_ZEROS = {1: (0,), 2: (0, 0), 3: (0, 0, 0)}  # output_padding of convolution_backward, per dims


# ---------------------------------------------------------------------------------------------- tensors
def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no call at all when it already is: on a GPU host every op counts)."""
    return t if t.dtype == dtype else t.to(dtype)


def small_kernel(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``K = G x_3 U_t x_4 U_h x_5 U_w``: the core expanded along the kernel modes only.

    core: (r_o, r_i, r_k...); factors: all modes, (dim_n, r_n). Returns (r_o, r_i, k...).
    As matrices, ``K_(12) = G_(12) (U_t kron U_h kron U_w)^T``: the Kronecker product of the
    kernel factors (a few hundred entries at most) and one matmul (``scaled_kernel``), differentiable
    by autograd with no einsum path search. For a Linear (no kernel mode) this is the core itself.
    """
    return core if core.ndim == 2 else scaled_kernel(core, factors[2:], 1.0)[0]


def scaled_kernel(
    core: torch.Tensor, kernel: Sequence[torch.Tensor], alpha: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(alpha K, kron_chain(kernel))``: ``alpha K = alpha G_(12) B^T`` as (r_o, r_i, k_t, k_h, k_w), with
    ``B = U_t kron U_h kron U_w`` the chain's first entry. Training and inference both build it here, so
    their outputs agree bitwise."""
    chain = kron_chain(kernel)
    r_o, r_i = core.shape[:2]
    K = torch.mm(core.reshape(r_o * r_i, -1), chain[0].T)
    return (K if alpha == 1 else K.mul_(alpha)).view(r_o, r_i, *(U.shape[0] for U in kernel)), chain


def kron_chain(factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[S_1, ..., S_m]`` with ``S_m = U_m`` and ``S_n = U_n kron S_{n+1}``: ``S_1`` is the whole product, the
    rest are what its gradient (``kron_grads``) needs."""
    chain = [factors[-1]]
    for U in reversed(factors[:-1]):
        chain.insert(0, torch.kron(U, chain[0]))
    return chain


def kron_grads(
    dB: torch.Tensor, factors: Sequence[torch.Tensor], chain: Sequence[torch.Tensor], needs: Sequence[bool]
) -> list[torch.Tensor | None]:
    """Gradients of ``B = U_1 kron ... kron U_m`` with respect to each ``U_n`` (``None`` where not ``needs``),
    given ``chain = kron_chain(factors)``.

    With ``B = U_1 kron S`` (``S = S_2``) and ``D = dB`` viewed as (k_1, k_S, r_1, r_S):
    ``dU_1[t, a] = sum_{j, l} D[t, j, a, l] S[j, l]`` and ``dS[j, l] = sum_{t, a} D[t, j, a, l] U_1[t, a]``,
    each one matrix-vector product; then the same on S.
    """
    grads: list[torch.Tensor | None] = []
    for n, U in enumerate(factors[:-1]):
        if not any(needs[n:]):
            break
        S = chain[n + 1]
        (k, r), (k_S, r_S) = U.shape, S.shape
        if r == r_S == 1:  # rank-one modes (the default kernel ranks): D is the (k, k_S) matrix dB as it stands
            D = dB.view(k, k_S)
            grads.append(torch.mm(D, S) if needs[n] else None)
            dB = torch.mm(D.T, U) if any(needs[n + 1 :]) else dB
            continue
        D = dB.view(k, k_S, r, r_S)
        grads.append(torch.mv(D.permute(0, 2, 1, 3).reshape(k * r, -1), S.reshape(-1)).view(k, r) if needs[n] else None)
        if any(needs[n + 1 :]):
            dB = torch.mv(D.permute(1, 3, 0, 2).reshape(k_S * r_S, -1), U.reshape(-1)).view(k_S, r_S)
    else:
        grads.append(dB if needs[-1] else None)
    return grads + [None] * (len(factors) - len(grads))


def _kernel_times_U_i(K: torch.Tensor, U_i: torch.Tensor) -> torch.Tensor:
    """``K x_2 U_i`` as (r_o, I * k): one bmm of U_i (I, r_i) with each K[a] (r_i, k)."""
    r_o, r_i = K.shape[:2]
    KI = torch.bmm(_as(U_i, K.dtype).expand(r_o, -1, -1), K.reshape(r_o, r_i, -1))  # (r_o, I, k)
    return KI.reshape(r_o, -1)


def merged_weight(
    weight: torch.Tensor, Ka: torch.Tensor, U_o: torch.Tensor, U_i: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``W + Ka x_1 U_o x_2 U_i`` (``Ka = alpha K``) in the weight's dtype, the last product fused with the sum
    (addmm); written into ``out`` (the weight's shape) when given."""
    KI = _as(_kernel_times_U_i(Ka, U_i), weight.dtype)
    W2, U_o = weight.reshape(weight.shape[0], -1), _as(U_o, weight.dtype)
    if out is None:
        return torch.addmm(W2, U_o, KI).view(weight.shape)
    torch.addmm(W2, U_o, KI, out=out.view(W2.shape))
    return out


def _eager_on_cpu(t: torch.Tensor) -> bool:
    """True for a CPU tensor outside ``torch.compile``: where the CPU-only measures of this module (the scratch
    buffer, split projections) apply; a compiled graph generates its own kernels and buffers."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


#: Device types on which ``AdaptedConv`` runs the fused Triton kernels of ``triton_kernels``: the small kernel and
#: its gradients each one launch instead of a chain of tiny products, and one pass over dy (``Q`` with ``dU_o``)
#: and one over (x, dP) (``dx += U_i dP`` with ``dU_i``) instead of two each. Off by default: ``auto`` takes them
#: only once ``benchmarks/gpu_checks.sh`` (``bench_layers.py`` with and without them, interleaved) measures them
#: faster on a GPU. ``TUCKER_LORA_FUSED=1`` turns them on for CUDA, ``fused_kernels()`` for a block of code.
FUSED_KERNELS: frozenset[str] = frozenset({"cuda"} if os.environ.get("TUCKER_LORA_FUSED") == "1" else ())

_TRITON: list[ModuleType | None] = []  # the imported triton_kernels module (None: triton missing), once imported


def _triton_kernels() -> ModuleType | None:
    if not _TRITON:
        try:
            from . import triton_kernels
        except ImportError:
            triton_kernels = None
        _TRITON.append(triton_kernels)
    return _TRITON[0]


def fused_kernels_on(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs the fused kernels: its device type is in ``FUSED_KERNELS``, triton imports,
    nothing is being compiled (a compiled graph fuses on its own), deterministic algorithms are off (the passes
    sum two gradients with atomics), and off CUDA only under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    device = x.device.type
    if device not in FUSED_KERNELS or torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
        return False
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton_kernels() is not None


@contextlib.contextmanager
def fused_kernels(*device_types: str) -> Iterator[None]:
    """``FUSED_KERNELS`` set to ``device_types`` while the block runs (``fused_kernels()``: off)."""
    global FUSED_KERNELS
    saved, FUSED_KERNELS = FUSED_KERNELS, frozenset(device_types)
    try:
        yield
    finally:
        FUSED_KERNELS = saved


def adapter_kernel(core: torch.Tensor, kernel: Sequence[torch.Tensor], alpha: float, x: torch.Tensor) -> torch.Tensor:
    """``alpha K`` (r_o, r_i, k...) for a call on ``x``: one fused launch (``fused_kernels_on``), written in the dtype
    the convolutions run in, or ``scaled_kernel``'s products in the core's."""
    if fused_kernels_on(x):
        return _triton_kernels().small_kernel(core, kernel, alpha, dtype=compute_dtype(x))
    return scaled_kernel(core, kernel, alpha)[0]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` runs in: autocast's for a float32 x where it is on, else x's."""
    enabled, dtype = autocast_state(x.device.type)
    return dtype if enabled and x.dtype == torch.float32 else x.dtype


class _Scratch(threading.local):
    """Per thread, one flat buffer per (device, dtype) that the merged path writes its weight into."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


_SCRATCH = _Scratch()


def scratch_like(t: torch.Tensor) -> torch.Tensor | None:
    """A buffer of ``t``'s shape and dtype, reused from call to call on this thread (grown when too small), for a
    tensor that is consumed before the next call; ``None`` where it does not pay or is not safe (off the CPU,
    under ``torch.compile``).

    On the CPU a fresh weight-sized allocation comes from the OS page by page (about a page fault per 4 KiB,
    each call); ``benchmarks/bench_pair.py`` (its ``fresh weight`` column) times what the buffer saves, and
    ``docs/performance.md`` has the numbers. The buffer holds the largest merged weight formed so far
    (``release_scratch`` frees it). It is made a normal tensor even under ``torch.inference_mode`` (an inference
    tensor could not be written once outside it). CUDA's caching allocator already reuses its blocks.
    """
    if not _eager_on_cpu(t):
        return None
    key = (t.device, t.dtype)
    buffer = _SCRATCH.buffers.get(key)
    if buffer is None or buffer.numel() < t.numel():
        with torch.inference_mode(False):
            buffer = _SCRATCH.buffers[key] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    return buffer[: t.numel()].view(t.shape)


def release_scratch() -> None:
    """Free this thread's merged-weight buffers (``scratch_like``)."""
    _SCRATCH.buffers.clear()


def channel_mix(x: torch.Tensor, M: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``M x`` along the channel dim: x (N, C, *S), M (C', C) -> (N, C', *S), one (batched) matmul;
    with ``out`` (N, C', *S), ``out += M x`` in place (fused, ``addmm_`` / ``baddbmm_``).

    Explicit ``mm`` / ``bmm`` (not ``matmul``, whose algorithm depends on ``requires_grad``), so results
    are bitwise the same in training and inference.
    """
    N = x.shape[0]
    if N == 1:  # one sample (a video batch of one): one matmul (a projection split across threads where that pays)
        x2 = x.reshape(x.shape[1], -1)
        if out is None:
            return _project(M, x2).view(1, M.shape[0], *x.shape[2:])
        out.view(M.shape[0], -1).addmm_(M, x2)
        return out
    x3, M3 = x.reshape(N, x.shape[1], -1), M.expand(N, -1, -1)
    if out is None:
        return torch.bmm(M3, x3).view(N, M.shape[0], *x.shape[2:])
    out.view(N, M.shape[0], -1).baddbmm_(M3, x3)
    return out


#: The rank-r projection ``M x`` (M: r x C) of a (C, S) activation runs on one thread in MKL. Split along S into
#: ``SPLIT_PER_THREAD`` blocks per thread, torch's batched matmul runs the blocks on every thread: faster on 2 or
#: more threads from ``SPLIT_MIN_NUMEL`` elements up, slower below that or on one thread. The rank-r update
#: ``out += M x`` (M: C x r) split the same way gained nothing, so it stays one ``addmm_``. Both constants are set
#: by ``benchmarks/bench_skinny.py``; its numbers are in ``docs/performance.md``.
SPLIT_PER_THREAD = 4
SPLIT_MIN_NUMEL = 1 << 18


def split_blocks(n: int, t: torch.Tensor) -> int:
    """How many blocks to split a projection of ``t`` into along a dim of size ``n`` (1: no split; always
    under ``torch.compile``, which generates its own kernels)."""
    if t.numel() < SPLIT_MIN_NUMEL or not _eager_on_cpu(t):
        return 1
    threads = torch.get_num_threads()
    return 1 if threads < 2 else blocks_dividing(n, SPLIT_PER_THREAD * threads)


def blocks_dividing(n: int, most: int) -> int:
    """The first of ``most, most // 2, ..., 1`` that divides ``n``."""
    while n % most:
        most //= 2
    return most


def _project(M: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``M x2``: M (r, C), x2 (C, S) -> (r, S), split into ``split_blocks`` column blocks where that pays."""
    b = split_blocks(x2.shape[1], x2)
    return torch.mm(M, x2) if b == 1 else blocked_mm(M, x2, b)


def blocked_mm(M: torch.Tensor, x2: torch.Tensor, b: int) -> torch.Tensor:
    """``M x2`` as ``b`` products of M (r, C) with the (C, S / b) column blocks of x2 in one batched matmul; b
    divides S."""
    C, S = x2.shape
    blocks = x2.reshape(C, b, S // b).transpose(0, 1)
    return torch.bmm(M.expand(b, -1, -1), blocks).transpose(0, 1).reshape(M.shape[0], S)


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

    def input_grad(self, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """``dx`` of ``conv(x, w)`` for the output gradient ``dy``; only x's shape is read (x may be any tensor of
        that shape and dtype)."""
        return torch.ops.aten.convolution_backward(
            dy, x, w, None, self.stride, self.padding, self.dilation, False, _ZEROS[self.dims], 1, (True, False, False)
        )[0]

    def weight_grad(self, x: torch.Tensor, shape: torch.Size, dy: torch.Tensor) -> torch.Tensor:
        return _CONV_WEIGHT_GRAD[self.dims](x, shape, dy, self.stride, self.padding, self.dilation)

    def grads(
        self, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, need_input: bool, need_weight: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dx, dw)`` of ``conv(x, w)`` for the output gradient ``dy``, in one call (x's values are read only
        for dw)."""
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, w, None, self.stride, self.padding, self.dilation, False, _ZEROS[self.dims], 1,
            (need_input, need_weight, False),
        )  # fmt: skip
        return dx, dw


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


def _merged_output(x, weight, bias, geometry: ConvGeometry, Ka, U_o, U_i) -> torch.Tensor:
    """``conv(x, W + Ka x_1 U_o x_2 U_i, b)`` (``Ka = alpha K``): the same kernels in training (inside
    ``AdaptedConv``, where autograd is off) and inference (where nothing it reads requires grad). The merged
    weight is consumed here, so it goes into the thread's scratch buffer (``scratch_like``)."""
    return geometry.conv(x, merged_weight(weight, Ka, U_o, U_i, out=scratch_like(weight)), bias)


def _factored_output(x, weight, bias, geometry: ConvGeometry, Ka, U_o, U_i):
    """``(y, P, z)``: ``y = conv(x, W, b) + U_o z`` with ``z = conv(P, alpha K)``, ``P = U_i^T x`` (x already
    prepared, ``Ka = alpha K``), where autograd records nothing (as ``_merged_output``)."""
    y = geometry.conv(x, weight, bias)
    P = channel_mix(x, _as(U_i.T, x.dtype))
    z = geometry.conv(P, _as(Ka, P.dtype))
    return channel_mix(z, _as(U_o, y.dtype), out=y), P, z


def _autocast(device_type: str, state: tuple[bool, torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast as it was (``autocast_state``); no context at all when it was off."""
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()


_CORE_ARG = 6  # position of the core in AdaptedConv.apply's arguments; the factors U_o, U_i, U_t... follow it


class AdaptedConv(torch.autograd.Function):
    """``conv(x, W + alpha * G x_1 U_o x_2 U_i x_3 U_t ..., b)`` as one autograd node, forming neither the
    O x I x k weight gradient nor (in the backward) the merged weight.

    Inputs: x (already padded by the geometry), the base weight and bias, the geometry, alpha, ``merge``, the
    core ``G`` and the factors ``U_o, U_i, U_t...`` (one per mode; pinned ones do not require grad). The
    small kernel ``K = G x_3 U_t x_4 U_h x_5 U_w`` is built inside, as ``G_(12) B^T`` with
    ``B = U_t kron U_h kron U_w``, so the whole adapter is this one node. The forward runs one convolution
    with the merged weight (``merge``) or the base convolution plus ``U_o conv(U_i^T x, alpha K)``
    (factored). The backward is the same for both: with ``P = U_i^T x``, ``Q = U_o^T dy``,
    ``dP = conv_input(Q, alpha K)`` and ``z = conv(P, alpha K)``,

        dx = conv_input(dy, W) + U_i dP     dK = alpha corr(P, Q)     dG_(12) = dK B
        dU_o = dy z^T                       dU_i = x dP^T             dB = dK^T G_(12) -> dU_t, dU_h, dU_w

    dP and dK come from one ``convolution_backward`` call. It saves ``x`` (and ``z``) only when ``U_i`` (or W)
    trains; otherwise ``P`` alone, and z is recomputed from it.

    With the fused kernels on (``fused_kernels_on``), the small kernel, its gradients, the pass over dy (Q and
    dU_o) and the pass over (x, dP) (``dx += U_i dP`` and dU_i) are one Triton launch each; the forward's launch
    also zeroes the accumulators that the two passes add dU_o and dU_i into.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: ConvGeometry, alpha: float, merge: bool, core, U_o, U_i, *kernel):  # type: ignore[override]
        need = ctx.needs_input_grad
        need_K = need[_CORE_ARG] or any(need[_CORE_ARG + 3 :])  # the core or a kernel factor trains
        need_U_o, need_U_i = need[_CORE_ARG + 1], need[_CORE_ARG + 2]
        ctx.fused = fused_kernels_on(x)
        acc_o = acc_i = None
        if ctx.fused:
            fused = _triton_kernels()
            acc_o = fused.accumulator(*U_o.shape, x) if need_U_o else None
            acc_i = fused.accumulator(*U_i.shape, x) if need_U_i else None
            zero = [a for a in (acc_o, acc_i) if a is not None]
            Ka, chain = fused.small_kernel(core, kernel, alpha, zero, dtype=compute_dtype(x)), []
        else:
            Ka, chain = scaled_kernel(core, kernel, alpha)
        ctx.n_kernel, ctx.passes_done = len(kernel), False
        if merge:
            y = _merged_output(x, weight, bias, geometry, Ka, U_o, U_i)
            P = channel_mix(x, _as(U_i.T, x.dtype)) if need_K or need_U_o else None
            z = None
        else:
            y, P, z = _factored_output(x, weight, bias, geometry, Ka, U_o, U_i)
        keep_x = need_U_i or need[1]
        ctx.geometry, ctx.alpha, ctx.need_K = geometry, alpha, need_K
        ctx.x_shape, ctx.autocast = x.shape, autocast_state(x.device.type)
        # z (r_o / O of y) is kept beside x, where it is small next to it; without x (U_i frozen) only P
        # (r_i / I of x) is kept and the backward recomputes z from it, one small convolution
        ctx.save_for_backward(
            x if keep_x else None, P, z if need_U_o and keep_x else None, weight, Ka, core, U_o, U_i, acc_o, acc_i,
            *kernel, *chain,
        )  # fmt: skip
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, P, z, weight, Ka, core, U_o, U_i, acc_o, acc_i, *rest = ctx.saved_tensors
        kernel, chain = rest[: ctx.n_kernel], rest[ctx.n_kernel :]
        g, need = ctx.geometry, ctx.needs_input_grad
        need_U_o, need_U_i = need[_CORE_ARG + 1], need[_CORE_ARG + 2]
        need_Q = need[0] or ctx.need_K or need_U_i
        grads: list[torch.Tensor | None] = [None] * len(need)
        with _autocast(dy.device.type, ctx.autocast):
            dtype = dy.dtype
            Kd = _as(Ka, dtype)
            if need_U_o and z is None:
                z = g.conv(_as(P, dtype), Kd)
            # the fused passes add into the accumulators the forward zeroed: once (a second backward of the same
            # graph takes the torch ops)
            fused = _triton_kernels() if ctx.fused and not ctx.passes_done else None
            if fused is not None and not fused.passes_apply(dy, *(t for t in (x, z) if t is not None)):
                fused = None
            ctx.passes_done = ctx.passes_done or fused is not None
            if fused is not None:  # Q and dU_o in one pass over dy
                Q = fused.dy_pass(dy, U_o, z, need_Q, acc_o) if need_Q or need_U_o else None
                grads[_CORE_ARG + 1] = _as(acc_o, U_o.dtype) if need_U_o else None
            else:
                # ordered so that each large tensor is read again soon after its last use (dy for Q and dU_o,
                # dx right after the base's input gradient writes it), while it may still be in cache
                if need_Q:
                    Q = channel_mix(dy, _as(U_o.T, dtype))  # (N, r_o, *S')
                if need_U_o:
                    grads[_CORE_ARG + 1] = _as(batched_outer(dy, _as(z, dtype)), U_o.dtype)
            if need_Q:
                P_in = _as(P, dtype) if P is not None else dy.new_empty(_projected_shape(ctx.x_shape, Ka))
                dP, dK = g.grads(P_in, Kd, Q, need[0] or need_U_i, ctx.need_K)
            x_pass = fused is not None and (need[0] or need_U_i) and fused.passes_apply(dP)
            if need_U_i and not x_pass:
                grads[_CORE_ARG + 2] = _as(batched_outer(_as(x, dtype), dP), U_i.dtype)
            dx = None
            if need[0]:  # the merged weight's input gradient, without forming it
                x_like = x if x is not None and x.dtype == dtype else dy.new_empty(ctx.x_shape)
                dx = g.input_grad(x_like, _as(weight, dtype), dy)
            if x_pass:  # dx += U_i dP and dU_i in one pass over (x, dP, dx)
                in_pass = dx if dx is not None and fused.passes_apply(dx) else None
                if in_pass is not None or need_U_i:
                    fused.x_dp_pass(x if need_U_i else None, dP, U_i, in_pass, acc_i)
                grads[_CORE_ARG + 2] = _as(acc_i, U_i.dtype) if need_U_i else None
                if dx is not None and in_pass is None:
                    dx = channel_mix(dP, _as(U_i, dtype), out=dx)
            elif need[0]:
                dx = channel_mix(dP, _as(U_i, dtype), out=dx)
            grads[0] = dx
            if need[1]:
                grads[1] = _as(g.weight_grad(_as(x, dtype), weight.shape, dy), weight.dtype)
            if need[2]:
                grads[2] = dy.sum(dim=[d for d in range(dy.ndim) if d != 1])
        if ctx.need_K:  # the tiny kernel-sized products in the parameters' precision, outside autocast
            if ctx.fused:
                core_grad, kernel_grads = _triton_kernels().kernel_grads(
                    dK, ctx.alpha, core, kernel, need[_CORE_ARG], need[_CORE_ARG + 3 :]
                )
            else:
                core_grad, kernel_grads = _kernel_grads(
                    _as(dK, core.dtype), ctx.alpha, core, kernel, chain, need[_CORE_ARG], need[_CORE_ARG + 3 :]
                )
            grads[_CORE_ARG : _CORE_ARG + 1], grads[_CORE_ARG + 3 :] = core_grad, kernel_grads
        return tuple(grads)


def _kernel_grads(
    dKa: torch.Tensor,
    alpha: float,
    core: torch.Tensor,
    kernel: Sequence[torch.Tensor],
    chain: Sequence[torch.Tensor],
    need_core: bool,
    need_kernel: Sequence[bool],
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """``([dG], [dU_t, dU_h, dU_w])`` from ``dKa``, the gradient of the scaled small kernel ``alpha K``
    (all in the core's dtype): ``dG_(12) = alpha dKa B`` and ``dB = alpha dKa^T G_(12)``, then through the
    Kronecker product."""
    dK = dKa.reshape(dKa.shape[0] * dKa.shape[1], -1)
    dK = dK if alpha == 1 else dK * alpha
    dG = torch.mm(dK, chain[0]).view(core.shape) if need_core else None
    if not any(need_kernel):
        return [dG], [None] * len(kernel)
    dB = torch.mm(dK.T, core.reshape(dK.shape[0], -1))
    return [dG], kron_grads(dB, kernel, chain, need_kernel)


def _projected_shape(x_shape: torch.Size, K: torch.Tensor) -> torch.Size:
    """Shape of ``P = U_i^T x``: x's with r_i channels."""
    return torch.Size((x_shape[0], K.shape[1], *x_shape[2:]))


def batched_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_{n, s} a[n, :, s] b[n, :, s]^T``: (N, A, *S), (N, B, *S) -> (A, B), with A wide and B a rank, as one
    (batched) matmul.

    Computed as written, not as the transpose of ``b a^T``, which was slower on the CPU with cold caches
    (``benchmarks/bench_skinny.py --cold``; numbers in ``docs/performance.md``)."""
    N, A, B = a.shape[0], a.shape[1], b.shape[1]
    if N == 1:
        return torch.mm(a.reshape(A, -1), b.reshape(B, -1).T)
    return torch.bmm(a.reshape(N, A, -1), b.reshape(N, B, -1).transpose(1, 2)).sum(0)


def adapted_conv(
    x: torch.Tensor,
    base: nn.Module,
    geometry: ConvGeometry,
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    alpha: float,
    merge: bool,
) -> torch.Tensor:
    """A plain conv layer's output with ``W + alpha * dW``, merged or factored (batched input or not).

    With autograd on, one ``AdaptedConv`` node; in inference the same forward kernels without it.
    """
    unbatched = x.ndim == core.ndim - 1
    if unbatched:
        x = x.unsqueeze(0)
    x = geometry.prepare(x)
    if torch.is_grad_enabled() and (
        x.requires_grad or base.weight.requires_grad or core.requires_grad or any(U.requires_grad for U in factors)
    ):
        y = AdaptedConv.apply(x, base.weight, base.bias, geometry, alpha, merge, core, *factors)
    else:
        Ka, U_o, U_i = adapter_kernel(core, factors[2:], alpha, x), factors[0], factors[1]
        if merge:
            y = _merged_output(x, base.weight, base.bias, geometry, Ka, U_o, U_i)
        else:
            y = _factored_output(x, base.weight, base.bias, geometry, Ka, U_o, U_i)[0]
    return y.squeeze(0) if unbatched else y


def module_forward(layer: nn.Module, weight: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run ``layer``'s own forward with its ``weight`` replaced (gradients flow into ``weight``)."""
    return torch.func.functional_call(layer, {"weight": weight}, args, kwargs, strict=False)


# ---------------------------------------------------------------------------------------------- cost model
#: ``choose_path`` takes the merged path when the weight has fewer entries than this factor times the input
#: and output activations together, per device type and grad mode. Merged forms ``W + alpha dW`` (a read of W
#: and a write of a weight-sized buffer; on the CPU a reused one, ``scratch_like``) where factored updates y in
#: place (a read and a write of y); in training both project x (``P`` is needed for the gradients), in inference
#: merged skips that projection too, so its crossing lies at a larger weight there. On CUDA a step is mostly
#: the host issuing ops, and forming the merged weight is more of them: ``auto`` always takes the factored path
#: there. Set by ``benchmarks/bench_pair.py`` (merged against factored, paired, ``--spatial`` moving the ratio
#: W / (x + y)) on the CPU and by ``benchmarks/bench_layers.py`` on a GPU; the numbers are in
#: ``docs/performance.md``.
MERGED_WEIGHT_FACTOR = {"cpu": {"train": 0.3, "infer": 1.0}, "cuda": {"train": 0.0, "infer": 0.0}}


def choose_path(weight_numel: int, x_numel: int, y_numel: int, device_type: str = "cpu", grad: bool = True) -> str:
    """``"merged"`` or ``"factored"`` for one plain conv call (``grad``: autograd records it).

    Both share one backward (``AdaptedConv``), so only the forwards differ. merged forms ``W + alpha * dW``
    (a read of the weight and a write of one weight-sized buffer) and, in training, projects x for the
    backward; factored projects x and adds ``alpha * U_o z`` into the base output in place (a read and a write
    of y). So in training merged trades the update of y for forming the weight, and in inference the projection
    of x as well: the crossing lies at a larger weight there (``MERGED_WEIGHT_FACTOR``).
    """
    factors = MERGED_WEIGHT_FACTOR.get(device_type, {"train": 1.0, "infer": 1.0})
    factor = factors["train" if grad else "infer"]
    return "merged" if weight_numel < factor * (x_numel + y_numel) else "factored"
