"""Fused Triton kernels for one adapted conv's factored path (``functional.AdaptedConv``), one launch each.

With ``P = U_i^T x``, ``z = conv(P, alpha K)``, ``Q = U_o^T dy`` and ``dP = conv_input(Q, alpha K)``:

- ``small_kernel``: ``alpha K = alpha G x_3 U_t x_4 U_h x_5 U_w`` as (r_o, r_i, k...), in one program; it also
  zeroes the accumulators the backward's passes add into (no separate memset launch).
- ``dy_pass``: ``Q`` and ``dU_o = sum_s dy z^T`` in one pass over dy.
- ``x_dp_pass``: ``dx += U_i dP`` and ``dU_i = sum_s x dP^T`` in one pass over (x, dP, dx).
- ``kernel_grads``: ``dG`` and ``dU_t, dU_h, dU_w`` from the small kernel's gradient, in one program.

The passes tile the positions (one program per sample, block of positions and group of channels, looping over
its channels); each program adds its share of ``dU_o`` / ``dU_i`` (and, with several channel groups, of ``Q``)
into a float32 (float64 for float64 inputs) accumulator with atomics, so those sums run in no fixed order
(``functional`` uses these kernels only where deterministic algorithms are off). Products are summed in float32
(float64 for float64 inputs) on CUDA cores.

Imported only where used (``functional.fused_kernels_on``): on CUDA, or on the CPU under the Triton interpreter
(``TRITON_INTERPRET=1``, for the tests). Every launch goes through ``launch`` (``benchmarks/count_ops.py``
counts them there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

#: Positions per program and channels per step of the two passes over the activations.
BLOCK_S = 128
BLOCK_C = 16


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: the one place every kernel of this module is launched."""
    kernel[grid](*args, **kwargs)


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _pow2(n: int, least: int = 2) -> int:
    return max(least, triton.next_power_of_2(n))


def ncs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides ``(n, c, s)`` of ``t`` (N, C, *S) seen as (N, C, S) without a copy, or None where its spatial dims do
    not collapse into one stride (contiguous and channels-last tensors both do)."""
    stride_s = None
    expected = None
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:], strict=True))):
        if size == 1:
            continue
        if stride_s is None:
            stride_s, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return t.stride(0), t.stride(1), 1 if stride_s is None else stride_s


def passes_apply(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be read by the passes as (N, C, S) (``ncs_strides``)."""
    return all(ncs_strides(t) is not None for t in tensors)


# ---------------------------------------------------------------------------------------------- the small kernel
@triton.jit
def _kron_tile(u_t, u_h, u_w, KT, KH, KW, RT, RH, RW, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """``(B, kk, rr, mk, mr)``: ``B[kk, rr] = U_t[t, p] U_h[h, q] U_w[w, r]`` (kk = (t, h, w), rr = (p, q, r)) as a
    (BLOCK_K, BLOCK_R) tile, its index ranges and their masks."""
    kk, rr = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_R)
    mk, mr = kk < KT * KH * KW, rr < RT * RH * RW
    mask = mk[:, None] & mr[None, :]
    t, h, w = kk // (KH * KW), (kk // KW) % KH, kk % KW
    p, q, r = rr // (RH * RW), (rr // RW) % RH, rr % RW
    b = tl.load(u_t + t[:, None] * RT + p[None, :], mask=mask, other=0.0).to(ACC)
    b *= tl.load(u_h + h[:, None] * RH + q[None, :], mask=mask, other=0.0).to(ACC)
    b *= tl.load(u_w + w[:, None] * RW + r[None, :], mask=mask, other=0.0).to(ACC)
    return b, kk, rr, mk, mr


@triton.jit
def _small_kernel(
    core, u_t, u_h, u_w, out, zero_a, zero_b, n_zero_a, n_zero_b, AB, KT, KH, KW, RT, RH, RW, alpha,
    ACC: tl.constexpr, BLOCK_AB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):  # fmt: skip
    K, R = KT * KH * KW, RT * RH * RW
    B, kk, rr, mk, mr = _kron_tile(u_t, u_h, u_w, KT, KH, KW, RT, RH, RW, ACC, BLOCK_K, BLOCK_R)
    for ab0 in range(0, AB, BLOCK_AB):
        ab = ab0 + tl.arange(0, BLOCK_AB)
        mab = ab < AB
        g = tl.load(core + ab[:, None] * R + rr[None, :], mask=mab[:, None] & mr[None, :], other=0.0).to(ACC)
        k = tl.sum(g[:, None, :] * B[None, :, :], axis=2) * alpha  # (BLOCK_AB, BLOCK_K): alpha G_(12) B^T
        tl.store(out + ab[:, None] * K + kk[None, :], k.to(out.dtype.element_ty), mask=mab[:, None] & mk[None, :])
    for i in range(0, n_zero_a, BLOCK_Z):
        offs = i + tl.arange(0, BLOCK_Z)
        tl.store(zero_a + offs, tl.zeros((BLOCK_Z,), zero_a.dtype.element_ty), mask=offs < n_zero_a)
    for i in range(0, n_zero_b, BLOCK_Z):
        offs = i + tl.arange(0, BLOCK_Z)
        tl.store(zero_b + offs, tl.zeros((BLOCK_Z,), zero_b.dtype.element_ty), mask=offs < n_zero_b)


_ONE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _three_modes(kernel: Sequence[torch.Tensor], core: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """The kernel factors as (U_t, U_h, U_w), a constant 1 x 1 one in front for the modes a Conv1d / Conv2d lacks,
    and the sizes ``[r_o * r_i, k_t, k_h, k_w, r_t, r_h, r_w]`` the two small-kernel launches take."""
    key = (core.device, core.dtype)
    one = _ONE.get(key)
    if one is None:
        one = _ONE[key] = torch.ones(1, 1, device=core.device, dtype=core.dtype)
    U = [one] * (3 - len(kernel)) + [u.contiguous() for u in kernel]
    return U, [core.shape[0] * core.shape[1], *(u.shape[0] for u in U), *(u.shape[1] for u in U)]


def small_kernel(
    core: torch.Tensor,
    kernel: Sequence[torch.Tensor],
    alpha: float,
    zero: Sequence[torch.Tensor] = (),
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha K`` (r_o, r_i, k...) in ``dtype`` (by default the core's; summed in float32 or float64 either way),
    and every tensor of ``zero`` (at most two, contiguous) set to 0 by the same launch."""
    U, dims = _three_modes(kernel, core)
    shape = (*core.shape[:2], *(u.shape[0] for u in kernel))
    out = torch.empty(shape, device=core.device, dtype=dtype or core.dtype)
    n_zero = [z.numel() for z in zero] + [0] * (2 - len(zero))
    zero = list(zero) + [out] * (2 - len(zero))  # a placeholder where there is nothing to zero
    launch(
        _small_kernel, (1,), core.contiguous(), *U, out, *zero, *n_zero, *dims, float(alpha),
        ACC=_acc_dtype(core.dtype)[1], BLOCK_AB=16, BLOCK_K=_pow2(math.prod(dims[1:4])),
        BLOCK_R=_pow2(math.prod(dims[4:])), BLOCK_Z=256,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- kernel gradients
@triton.jit
def _mode_grad(M, idx_k, idx_r, out, K_N, R_N, BLOCK_KN: tl.constexpr, BLOCK_RN: tl.constexpr):
    """``out[a, b] = sum of M[kk, rr] over idx_k[kk] == a and idx_r[rr] == b`` (out: (K_N, R_N))."""
    a, b = tl.arange(0, BLOCK_KN), tl.arange(0, BLOCK_RN)
    sel_k = (idx_k[:, None] == a[None, :]).to(M.dtype)  # (BLOCK_K, BLOCK_KN)
    sel_r = (idx_r[:, None] == b[None, :]).to(M.dtype)  # (BLOCK_R, BLOCK_RN)
    by_r = tl.sum(M[:, :, None] * sel_r[None, :, :], axis=1)  # (BLOCK_K, BLOCK_RN)
    d = tl.sum(sel_k[:, :, None] * by_r[:, None, :], axis=0)  # (BLOCK_KN, BLOCK_RN)
    tl.store(
        out + a[:, None] * R_N + b[None, :], d.to(out.dtype.element_ty), mask=(a[:, None] < K_N) & (b[None, :] < R_N)
    )


@triton.jit
def _kernel_grads(
    dk, core, u_t, u_h, u_w, d_core, d_t, d_h, d_w, AB, KT, KH, KW, RT, RH, RW, alpha,
    NEED_CORE: tl.constexpr, NEED_T: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_AB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KN: tl.constexpr,
    BLOCK_RN: tl.constexpr,
):  # fmt: skip
    K, R = KT * KH * KW, RT * RH * RW
    B, kk, rr, mk, mr = _kron_tile(u_t, u_h, u_w, KT, KH, KW, RT, RH, RW, ACC, BLOCK_K, BLOCK_R)
    dB = tl.zeros((BLOCK_K, BLOCK_R), ACC)  # dB = alpha dKa^T G_(12)
    for ab0 in range(0, AB, BLOCK_AB):
        ab = ab0 + tl.arange(0, BLOCK_AB)
        mab = ab < AB
        d = tl.load(dk + ab[:, None] * K + kk[None, :], mask=mab[:, None] & mk[None, :], other=0.0).to(ACC) * alpha
        if NEED_CORE:  # dG_(12) = alpha dKa B
            dg = tl.sum(d[:, :, None] * B[None, :, :], axis=1)
            tl.store(
                d_core + ab[:, None] * R + rr[None, :], dg.to(d_core.dtype.element_ty), mask=mab[:, None] & mr[None, :]
            )
        if NEED_T or NEED_H or NEED_W:
            g = tl.load(core + ab[:, None] * R + rr[None, :], mask=mab[:, None] & mr[None, :], other=0.0).to(ACC)
            dB += tl.sum(d[:, :, None] * g[:, None, :], axis=0)
    t, h, w = kk // (KH * KW), (kk // KW) % KH, kk % KW
    p, q, r = rr // (RH * RW), (rr // RW) % RH, rr % RW
    m = mk[:, None] & mr[None, :]
    # through B[(t,h,w), (p,q,r)] = U_t[t,p] U_h[h,q] U_w[w,r]: dU_t[t,p] = sum dB U_h[h,q] U_w[w,r], and so on
    if NEED_T:
        Uh = tl.load(u_h + h[:, None] * RH + q[None, :], mask=m, other=0.0).to(ACC)
        Uw = tl.load(u_w + w[:, None] * RW + r[None, :], mask=m, other=0.0).to(ACC)
        _mode_grad(dB * Uh * Uw, t, p, d_t, KT, RT, BLOCK_KN, BLOCK_RN)
    if NEED_H:
        Ut = tl.load(u_t + t[:, None] * RT + p[None, :], mask=m, other=0.0).to(ACC)
        Uw = tl.load(u_w + w[:, None] * RW + r[None, :], mask=m, other=0.0).to(ACC)
        _mode_grad(dB * Ut * Uw, h, q, d_h, KH, RH, BLOCK_KN, BLOCK_RN)
    if NEED_W:
        Ut = tl.load(u_t + t[:, None] * RT + p[None, :], mask=m, other=0.0).to(ACC)
        Uh = tl.load(u_h + h[:, None] * RH + q[None, :], mask=m, other=0.0).to(ACC)
        _mode_grad(dB * Ut * Uh, w, r, d_w, KW, RW, BLOCK_KN, BLOCK_RN)


def kernel_grads(
    dKa: torch.Tensor,
    alpha: float,
    core: torch.Tensor,
    kernel: Sequence[torch.Tensor],
    need_core: bool,
    need_kernel: Sequence[bool],
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """``([dG], [dU_t, dU_h, dU_w])`` (as ``functional._kernel_grads``) from ``dKa``, the gradient of ``alpha K``,
    in the core's and factors' dtypes (``None`` where not needed)."""
    U, dims = _three_modes(kernel, core)
    needs = [False] * (3 - len(kernel)) + list(need_kernel)
    d_core = torch.empty_like(core) if need_core else None
    d_kernel = [torch.empty_like(u) if need else None for u, need in zip(U, needs, strict=True)]
    placeholder = core  # never written where its flag is off
    launch(
        _kernel_grads, (1,), dKa.contiguous(), core.contiguous(), *U, placeholder if d_core is None else d_core,
        *(placeholder if d is None else d for d in d_kernel), *dims, float(alpha), NEED_CORE=need_core,
        NEED_T=needs[0], NEED_H=needs[1], NEED_W=needs[2], ACC=_acc_dtype(core.dtype)[1], BLOCK_AB=8,
        BLOCK_K=_pow2(math.prod(dims[1:4])), BLOCK_R=_pow2(math.prod(dims[4:])), BLOCK_KN=_pow2(max(dims[1:4])),
        BLOCK_RN=_pow2(max(dims[4:])),
    )  # fmt: skip
    return [d_core], d_kernel[3 - len(kernel) :]


# ---------------------------------------------------------------------------------------------- the passes
#: Channel groups per block of positions in the passes: ``None`` picks enough for two programs per multiprocessor
#: (``channel_groups``); a number forces it (the tests use it to run the grouped case on the CPU).
CHANNEL_GROUPS: int | None = None
_SM_COUNT: dict[int, int] = {}


def channel_groups(tiles: int, channels: int, device: torch.device) -> int:
    """How many groups of channels a pass splits each block of positions into: on CUDA enough programs for two per
    multiprocessor where there are few blocks of positions (a deep layer's small activations), with at least 64
    channels per group; one elsewhere."""
    if CHANNEL_GROUPS is not None:
        return max(1, min(CHANNEL_GROUPS, triton.cdiv(channels, BLOCK_C)))
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(2 * _SM_COUNT[index] // max(tiles, 1), triton.cdiv(channels, 64)))


@triton.jit
def _pass_block(C, S, R, C_GROUP, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's sample ``n``, channels ``[c_begin, c_end)``, positions ``s`` and ranks ``r`` (with masks)."""
    c_begin = tl.program_id(1) * C_GROUP
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    r = tl.arange(0, BLOCK_R)
    return tl.program_id(2), c_begin, tl.minimum(c_begin + C_GROUP, C), s, r, s < S, r < R


@triton.jit
def _dy_pass(
    dy, u_o, z, q, du_o, C, S, R, C_GROUP, s_dy_n, s_dy_c, s_dy_s, s_z_n, s_z_c, s_z_s, s_q_n, s_q_c, s_q_s, s_u_c,
    s_u_r, NEED_Q: tl.constexpr, ATOMIC_Q: tl.constexpr, NEED_DU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, s, r, ms, mr = _pass_block(C, S, R, C_GROUP, BLOCK_S, BLOCK_R)
    dy += n * s_dy_n
    if NEED_DU:
        zt = tl.load(z + n * s_z_n + r[:, None] * s_z_c + s[None, :] * s_z_s, mask=mr[:, None] & ms[None, :], other=0.0)
        zt = zt.to(ACC)  # (BLOCK_R, BLOCK_S)
    q_acc = tl.zeros((BLOCK_R, BLOCK_S), ACC)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c < c_end
        d = tl.load(dy + c[:, None] * s_dy_c + s[None, :] * s_dy_s, mask=mc[:, None] & ms[None, :], other=0.0).to(ACC)
        if NEED_Q:  # Q += U_o[c]^T dy[c]
            u = tl.load(u_o + c[:, None] * s_u_c + r[None, :] * s_u_r, mask=mc[:, None] & mr[None, :], other=0.0)
            q_acc += tl.sum(u.to(ACC)[:, :, None] * d[:, None, :], axis=0)
        if NEED_DU:  # dU_o[c] += dy[c] z^T over this block of positions
            part = tl.sum(d[:, None, :] * zt[None, :, :], axis=2)
            tl.atomic_add(du_o + c[:, None] * R + r[None, :], part, mask=mc[:, None] & mr[None, :])
    if NEED_Q:
        q_ptr = q + n * s_q_n + r[:, None] * s_q_c + s[None, :] * s_q_s
        if ATOMIC_Q:  # this group's channels' share of Q
            tl.atomic_add(q_ptr, q_acc, mask=mr[:, None] & ms[None, :])
        else:
            tl.store(q_ptr, q_acc.to(q.dtype.element_ty), mask=mr[:, None] & ms[None, :])


def dy_pass(
    dy: torch.Tensor, U_o: torch.Tensor, z: torch.Tensor | None, need_q: bool, du_acc: torch.Tensor | None
) -> torch.Tensor | None:
    """``Q = U_o^T dy`` (N, r_o, *S) in dy's dtype (None unless ``need_q``) and, with ``z`` and ``du_acc``
    (O, r_o, zeroed), ``du_acc += sum_{n,s} dy z^T``: one pass over dy. Where the channels are split into groups
    (``channel_groups``), the groups add their shares of Q into a zeroed float32 Q (two more ops: the zeroing, and
    the cast to dy's dtype where that differs)."""
    N, C = dy.shape[:2]
    S, R = dy[0, 0].numel(), U_o.shape[1]
    tiles = triton.cdiv(S, BLOCK_S)
    groups = channel_groups(tiles * N, C, dy.device)
    c_group = triton.cdiv(triton.cdiv(C, groups), BLOCK_C) * BLOCK_C
    groups = triton.cdiv(C, c_group)
    atomic_q = need_q and groups > 1
    acc = _acc_dtype(du_acc.dtype if du_acc is not None else dy.dtype)
    q = None
    if need_q:
        shape = (N, R, *dy.shape[2:])
        q = torch.zeros(shape, device=dy.device, dtype=acc[0]) if atomic_q else dy.new_empty(shape)
    need_du = du_acc is not None
    launch(
        _dy_pass, (tiles, groups, N), dy, U_o, z if need_du else dy, q if need_q else dy, du_acc if need_du else U_o,
        C, S, R, c_group, *ncs_strides(dy), *ncs_strides(z if need_du else dy), *ncs_strides(q if need_q else dy),
        *U_o.stride(), NEED_Q=need_q, ATOMIC_Q=atomic_q, NEED_DU=need_du, ACC=acc[1], BLOCK_C=BLOCK_C,
        BLOCK_S=BLOCK_S, BLOCK_R=_pow2(R),
    )  # fmt: skip
    return q.to(dy.dtype) if atomic_q else q


@triton.jit
def _x_dp_pass(
    x, dp, u_i, dx, du_i, C, S, R, C_GROUP, s_x_n, s_x_c, s_x_s, s_p_n, s_p_c, s_p_s, s_dx_n, s_dx_c, s_dx_s, s_u_c,
    s_u_r, NEED_DX: tl.constexpr, NEED_DU: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, s, r, ms, mr = _pass_block(C, S, R, C_GROUP, BLOCK_S, BLOCK_R)
    p = tl.load(dp + n * s_p_n + r[:, None] * s_p_c + s[None, :] * s_p_s, mask=mr[:, None] & ms[None, :], other=0.0)
    p = p.to(ACC)  # (BLOCK_R, BLOCK_S)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c < c_end
        m = mc[:, None] & ms[None, :]
        if NEED_DU:  # dU_i[c] += x[c] dP^T over this block of positions
            xt = tl.load(x + n * s_x_n + c[:, None] * s_x_c + s[None, :] * s_x_s, mask=m, other=0.0).to(ACC)
            part = tl.sum(xt[:, None, :] * p[None, :, :], axis=2)
            tl.atomic_add(du_i + c[:, None] * R + r[None, :], part, mask=mc[:, None] & mr[None, :])
        if NEED_DX:  # dx[c] += U_i[c] dP
            u = tl.load(u_i + c[:, None] * s_u_c + r[None, :] * s_u_r, mask=mc[:, None] & mr[None, :], other=0.0)
            update = tl.sum(u.to(ACC)[:, :, None] * p[None, :, :], axis=1)
            dx_ptr = dx + n * s_dx_n + c[:, None] * s_dx_c + s[None, :] * s_dx_s
            old = tl.load(dx_ptr, mask=m, other=0.0).to(ACC)
            tl.store(dx_ptr, (old + update).to(dx.dtype.element_ty), mask=m)


def x_dp_pass(
    x: torch.Tensor | None, dP: torch.Tensor, U_i: torch.Tensor, dx: torch.Tensor | None, du_acc: torch.Tensor | None
) -> None:
    """``dx += U_i dP`` in place (with ``dx``) and ``du_acc += sum_{n,s} x dP^T`` (with ``x`` and ``du_acc``,
    (I, r_i), zeroed): one pass over x, dP and dx."""
    need_dx, need_du = dx is not None, du_acc is not None
    big = dx if need_dx else x
    N, C = big.shape[:2]
    S, R = big[0, 0].numel(), U_i.shape[1]
    tiles = triton.cdiv(S, BLOCK_S)
    c_group = triton.cdiv(triton.cdiv(C, channel_groups(tiles * N, C, big.device)), BLOCK_C) * BLOCK_C
    launch(
        _x_dp_pass, (tiles, triton.cdiv(C, c_group), N), x if need_du else dP, dP, U_i, dx if need_dx else dP,
        du_acc if need_du else U_i, C, S, R, c_group, *ncs_strides(x if need_du else dP), *ncs_strides(dP),
        *ncs_strides(dx if need_dx else dP), *U_i.stride(), NEED_DX=need_dx, NEED_DU=need_du,
        ACC=_acc_dtype(du_acc.dtype if need_du else dP.dtype)[1], BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S,
        BLOCK_R=_pow2(R),
    )  # fmt: skip


def accumulator(rows: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (rows, rank) accumulator for a pass's atomics, in the summing dtype of ``like``
    (``small_kernel`` zeroes it)."""
    return torch.empty(rows, rank, device=like.device, dtype=_acc_dtype(like.dtype)[0])
