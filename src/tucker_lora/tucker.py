"""Pure Tucker tensor math: mode products, reconstruction, rank rules, parameter counts.

No ``nn.Module`` and no state here. Notation follows the paper:

    dW = G x_1 U_o x_2 U_i x_3 U_t x_4 U_h x_5 U_w

with ``G`` the core (r_o, r_i, r_t, r_h, r_w) and ``U_n`` a (dim_n, r_n) factor per mode.
A layer of weight order N uses the first two modes (o, i) and the last N - 2 of (t, h, w).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: The paper's mode names, in the order ranks are given: ``(r_o, r_i, r_t, r_h, r_w)``.
MODES: tuple[str, ...] = ("o", "i", "t", "h", "w")
KERNEL_MODES: tuple[str, ...] = ("t", "h", "w")


def mode_names(order: int) -> tuple[str, ...]:
    """Mode names of a weight of ``order`` dims: kernel modes map right-aligned onto (t, h, w).

    Linear (O, I) -> (o, i); Conv1d -> (o, i, w); Conv2d -> (o, i, h, w); Conv3d -> all five.
    """
    if not 2 <= order <= 5:
        raise ValueError(f"a Tucker adapter needs a weight of order 2 to 5, got order {order}")
    return ("o", "i") + KERNEL_MODES[3 - (order - 2) :]


def mode_product(T: torch.Tensor, U: torch.Tensor, n: int) -> torch.Tensor:
    """Mode-n product ``T x_n U``.

    T: (d_0, ..., r, ..., d_{N-1}) with r at position n; U: (J, r).
    Returns (d_0, ..., J, ..., d_{N-1}): ``out[..., j, ...] = sum_r U[j, r] T[..., r, ...]``.
    """
    Tn = torch.movedim(T, n, -1)
    out = torch.mm(Tn.reshape(-1, Tn.shape[-1]), U.T).reshape(*Tn.shape[:-1], U.shape[0])
    return torch.movedim(out, -1, n)


def multi_mode_product(T: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``T x_1 U_1 x_2 U_2 ... x_N U_N``."""
    for n, U in enumerate(factors):
        T = mode_product(T, U, n)
    return T


def reconstruct(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full tensor of a Tucker pair: ``G x_1 U_1 ... x_N U_N``, shape (U_1.shape[0], ..., U_N.shape[0])."""
    if core.ndim != len(factors):
        raise ValueError(f"core has {core.ndim} modes but {len(factors)} factors were given")
    return multi_mode_product(core, factors)


def unfold(T: torch.Tensor, n: int) -> torch.Tensor:
    """Mode-n unfolding ``T_(n)``: (dim_n, prod of the other dims), the other modes in their order."""
    return torch.movedim(T, n, 0).reshape(T.shape[n], -1)


def num_params(dims: Sequence[int], ranks: Sequence[int]) -> int:
    """Proposition 1: ``sum_n dim_n * r_n + prod_n r_n`` over the trained modes."""
    core = 1
    for r in ranks:
        core *= r
    return sum(d * r for d, r in zip(dims, ranks, strict=True)) + core


def centre_tap(size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The fixed factor of a pinned kernel mode: a (size, 1) one-hot at index ``size // 2``.

    Built on ``device`` itself (an ``arange`` comparison): no host-to-device copy, which on a GPU
    would stall the host at every call."""
    return (torch.arange(size, device=device) == size // 2).to(dtype or torch.get_default_dtype()).unsqueeze(1)


@dataclass(frozen=True)
class ModeRanks:
    """Resolved ranks of one layer, one entry per mode of its weight.

    ``ranks[n]`` is the core size along mode n; ``pinned[n]`` marks a kernel mode fixed to its
    centre tap (configured rank 0), whose factor is a constant one-hot and whose core size is 1.
    """

    modes: tuple[str, ...]
    dims: tuple[int, ...]
    ranks: tuple[int, ...]
    pinned: tuple[bool, ...]
    clipped: tuple[str, ...] = ()

    @property
    def trainable_modes(self) -> tuple[int, ...]:
        return tuple(n for n, p in enumerate(self.pinned) if not p)

    def num_params(self) -> int:
        """Trainable parameters: Proposition 1 over the modes that are not pinned (a pinned mode is collapsed)."""
        idx = self.trainable_modes
        return num_params([self.dims[n] for n in idx], [self.ranks[n] for n in idx])


def validate_ranks(ranks: object, where: str = "ranks") -> tuple[int, int, int, int, int]:
    """Check a user rank tuple ``(r_o, r_i, r_t, r_h, r_w)``: five non-negative integers."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise ValueError(f"{where} must be a sequence of 5 integers (r_o, r_i, r_t, r_h, r_w), got {ranks!r}")
    if len(ranks) != len(MODES):
        raise ValueError(
            f"{where} must have 5 entries in the paper's order (r_o, r_i, r_t, r_h, r_w), got {len(ranks)}: {ranks!r}"
        )
    out = []
    for mode, r in zip(MODES, ranks, strict=True):
        if isinstance(r, bool) or not isinstance(r, int):
            if isinstance(r, float) and r.is_integer():
                r = int(r)
            else:
                raise ValueError(f"{where}: r_{mode} must be an integer, got {r!r}")
        if r < 0:
            raise ValueError(f"{where}: r_{mode} must be >= 0, got {r}")
        out.append(int(r))
    return tuple(out)  # type: ignore[return-value]


def resolve_ranks(ranks: Sequence[int], weight_shape: Sequence[int], layer: str = "<layer>") -> ModeRanks:
    """Apply the rank rules (docs/design.md, "Ranks") to one weight shape.

    - ranks are given as (r_o, r_i, r_t, r_h, r_w); entries for modes the weight lacks are ignored;
    - ``r_n >= dim_n`` is clipped to ``dim_n``;
    - ``r_n == 0`` on a kernel mode pins it to the centre tap (core size 1, fixed one-hot factor);
    - ``r_o == 0`` or ``r_i == 0`` is an error naming the layer.
    """
    r_by_mode = dict(zip(MODES, validate_ranks(ranks), strict=True))
    modes = mode_names(len(weight_shape))
    out_r, pinned, clipped = [], [], []
    for mode, dim in zip(modes, weight_shape, strict=True):
        r = r_by_mode[mode]
        if r == 0:
            if mode in ("o", "i"):
                raise ValueError(f"layer '{layer}': r_{mode} = 0 would make the adapter empty; use r_{mode} >= 1")
            out_r.append(1)
            pinned.append(True)
            continue
        if r > dim:
            clipped.append(f"r_{mode} {r} -> {dim}")
            r = dim
        out_r.append(r)
        pinned.append(False)
    return ModeRanks(modes, tuple(int(d) for d in weight_shape), tuple(out_r), tuple(pinned), tuple(clipped))


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random (rows, cols) matrix with orthonormal columns (``rows >= cols``), from QR of a Gaussian."""
    A = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    # fix the column signs so the draw is unique given the Gaussian
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).float()


def block_diagonal_core(cores: Sequence[torch.Tensor], shared: Sequence[bool] | None = None) -> torch.Tensor:
    """Core of a sum of Tucker tensors with concatenated factors.

    ``sum_a G_a x_n U^a_n = D x_n [U^1_n ... U^A_n]`` where D is block diagonal: its block a,
    at offset ``sum_{b<a} r^b_n`` in every mode n, is ``G_a``. A ``shared`` mode has one factor
    common to all terms (size 1 in every core): there the blocks share offset 0 and add up.
    """
    order = cores[0].ndim
    shared = tuple(shared) if shared is not None else (False,) * order
    sizes = [1 if shared[n] else sum(c.shape[n] for c in cores) for n in range(order)]
    D = cores[0].new_zeros(sizes)
    offsets = [0] * order
    for G in cores:
        D[tuple(slice(o, o + s) for o, s in zip(offsets, G.shape, strict=True))] += G
        offsets = [o if shared[n] else o + G.shape[n] for n, o in enumerate(offsets)]
    return D


def orthonormalise(
    core: torch.Tensor, factors: Sequence[torch.Tensor], keep: Sequence[bool] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Same tensor, orthonormal factors: ``U_n = Q_n R_n`` (reduced QR), ``G <- G x_n R_n``.

    Each new rank is ``min(dim_n, r_n)``, so a concatenation whose rank exceeds the mode size is
    compressed without error (Proposition 4). Modes with ``keep[n]`` are left as they are.
    """
    keep = tuple(keep) if keep is not None else (False,) * len(factors)
    new_factors = []
    for n, U in enumerate(factors):
        if keep[n]:
            new_factors.append(U)
            continue
        Q, R = torch.linalg.qr(U, mode="reduced")
        core = mode_product(core, R, n)
        new_factors.append(Q)
    return core, new_factors
