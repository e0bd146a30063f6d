"""A Tucker update as a LoRA (exact or truncated), and the truncation of a Tucker update to smaller ranks.

Pure tensor math on one layer's ``(core, factors, alpha)``: no module, no file. Notation of ``tucker.py``:
``dW = G x_1 U_o x_2 U_i x_3 U_t x_4 U_h x_5 U_w`` (a Linear has modes o, i; a ConvNd the last N - 2 kernel
modes too), and a LoRA of rank r is ``up . down`` with ``up`` (O, r) and ``down`` (r, I, k...), i.e. the
O x (I k) unfolding ``W_(1) = up @ down_(1)``.

- Exact: ``alpha dW_(1) = U_o . (alpha G x_2 U_i x_3 U_t ...)_(1)``, so ``up = U_o`` and ``down = alpha G
  x_2 U_i x_3 U_t x_4 U_h x_5 U_w`` (the core expanded along every mode but o) is a rank-r_o LoRA of the
  update, with no approximation. A pinned mode's factor is the centre-tap one-hot, so ``down`` is zero off
  the centre tap there.
- Truncated (``LoraSpectrum``): with ``U_n = Q_n R_n`` (reduced QR) and ``C = alpha G x_n R_n``,
  ``alpha dW_(1) = Q_o C_(1) (Q_i kron Q_t kron ...)^T``; the outer matrices have orthonormal columns, so
  the SVD ``C_(1) = P S V^T`` of the small (r_o x r_i r_t r_h r_w) matrix gives the SVD of the full
  unfolding: left vectors ``Q_o P``, singular values ``S``, right vectors ``V`` lifted by the ``Q_n``.
  Keeping the top r is the best rank-r LoRA (Eckart-Young); the relative Frobenius error is
  ``sqrt(sum_{j > r} S_j^2 / sum_j S_j^2)``. No full-size weight is formed or decomposed.
- Tucker truncation (``truncate_tucker``): the same QR makes the factors orthonormal, a HOOI of the small
  core ``C`` gives ``C ~ H x_n V_n``, and the new factors are ``Q_n V_n`` (core ``H``); the error
  ``||C - H x_n V_n|| / ||C||`` is the update's, since the ``Q_n`` preserve norms.

Everything is computed in float64; callers cast the results to the adapter's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from .decomposition import hooi
from .tucker import mode_product, orthonormalise, reconstruct, unfold

__all__ = [
    "LoraSpectrum",
    "exact_lora",
    "lora_shapes",
    "rank_for_energy",
    "truncate_tucker",
    "tucker_ranks_for_energy",
]

#: Relative energy below which a dropped direction counts as rounding (``energy=1.0`` keeps the rest).
ENERGY_ROUNDING = 1e-12


def _float64(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return core.detach().to(torch.float64), [U.detach().to(torch.float64) for U in factors]


def _expand_but_first(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``core x_2 U_2 x_3 U_3 ...``: every mode but the first (``factors[0]`` is not used)."""
    for n in range(1, core.ndim):
        core = mode_product(core, factors[n], n)
    return core


def lora_shapes(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` as LoRA weights: a Linear's (r, I) and (O, r); a ConvNd's (r, I, k...) and (O, r, 1...)."""
    ones = (1,) * (down.ndim - 2)
    return down.contiguous(), up.reshape(*up.shape, *ones).contiguous()


def exact_lora(core: torch.Tensor, factors: Sequence[torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` with ``up . down = alpha dW`` exactly: ``up = U_o``, ``down = alpha G x_2 U_i x_3 U_t ...``.

    core: (r_o, r_i, r_k...); factors: one per mode, (dim_n, r_n). float64 results of rank r_o.
    """
    G, Us = _float64(core, factors)
    return lora_shapes(Us[0], _expand_but_first(alpha * G, Us))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold ``energy`` of ``sum S^2`` (peft's rule; 1 for a zero update)."""
    cumulative = torch.cumsum(singular_values.to(torch.float64) ** 2, 0)
    total = float(cumulative[-1])
    if total == 0.0:
        return 1
    k = int(torch.searchsorted(cumulative, torch.tensor(energy * total, dtype=torch.float64))) + 1
    return min(k, singular_values.numel())


@dataclass(frozen=True)
class LoraSpectrum:
    """The SVD of one layer's ``alpha dW_(1)`` (O x I k), from its Tucker factors.

    ``left``: (O, q) orthonormal ``Q_o P``; ``singular_values``: (q,) descending; ``right``: (q, r_i, r_k...)
    the rows of ``V^T`` as small cores, lifted to (q, I, k...) by ``right_factors`` ``[Q_i, Q_k...]``.
    ``q = min(r_o, r_i r_t r_h r_w)``.
    """

    left: torch.Tensor
    singular_values: torch.Tensor
    right: torch.Tensor
    right_factors: list[torch.Tensor]

    @classmethod
    def of(
        cls,
        core: torch.Tensor,
        factors: Sequence[torch.Tensor],
        alpha: float,
        pinned: Optional[Sequence[bool]] = None,
    ) -> LoraSpectrum:
        """QR of the factors (pinned one-hot factors are kept as they are), SVD of the small ``C_(1)``."""
        G, Us = _float64(core, factors)
        C, Qs = orthonormalise(alpha * G, Us, keep=pinned)
        P, S, Vh = torch.linalg.svd(unfold(C, 0), full_matrices=False)
        return cls(Qs[0] @ P, S, Vh.reshape(-1, *C.shape[1:]), [torch.eye(1, dtype=C.dtype)] + Qs[1:])

    @property
    def max_rank(self) -> int:
        return self.singular_values.numel()

    def rank(self, rank: int | float) -> int:
        """An int ``rank`` capped at ``max_rank``; a float is an energy share (``rank_for_energy``)."""
        if isinstance(rank, float):
            return rank_for_energy(self.singular_values, rank)
        return min(int(rank), self.max_rank)

    def error(self, rank: int) -> float:
        """Relative Frobenius error of the best rank-``rank`` LoRA: ``||S_{>rank}|| / ||S||`` (0 for a zero update)."""
        S2 = self.singular_values**2
        total = float(S2.sum())
        return math.sqrt(float(S2[rank:].sum()) / total) if total > 0 else 0.0

    def lora(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` of the best rank-``rank`` LoRA: ``up = Q_o P_r`` (orthonormal), ``down = S_r V_r^T``
        lifted by ``Q_i, Q_t, ...``."""
        S = self.singular_values[:rank]
        core = self.right[:rank] * S.reshape(-1, *(1,) * (self.right.ndim - 1))
        return lora_shapes(self.left[:, :rank], _expand_but_first(core, self.right_factors))


# ---------------------------------------------------------------------------------------------- Tucker truncation
def _hosvd_rotation(C: torch.Tensor) -> torch.Tensor:
    """``D = C x_n W_n^T`` with ``W_n`` a full basis of left singular vectors of ``C_(n)`` (descending; a mode
    whose rank exceeds its unfolding's rank gets directions of zero energy): truncating ``D`` to
    ``[:t_1, ..., :t_N]`` is the truncated HOSVD, and ``||D[:t]||^2`` the energy it keeps."""
    for n in range(C.ndim):
        W = torch.linalg.svd(unfold(C, n), full_matrices=True)[0]
        C = mode_product(C, W.T, n)
    return C


def tucker_ranks_for_energy(
    C: torch.Tensor, dims: Sequence[int], caps: Sequence[int], energy: float, pinned: Sequence[bool]
) -> tuple[int, ...]:
    """The ranks ``t_n <= caps[n]`` with the fewest parameters (``sum dim_n t_n + prod t_n`` over the modes that
    are not pinned) whose truncated HOSVD of ``C`` keeps at least ``energy`` of ``||C||^2`` (exhaustive over
    every rank tuple: the prefix sums of ``D^2`` give each tuple's kept energy at once). HOOI on those ranks
    keeps at least as much. A zero ``C`` gets ranks 1; where even the caps keep less, the caps."""
    kept = _hosvd_rotation(C)[tuple(slice(0, c) for c in caps)] ** 2
    for n in range(kept.ndim):
        kept = torch.cumsum(kept, n)
    total = float((C**2).sum())
    feasible = kept >= (energy - ENERGY_ROUNDING) * total
    if not feasible.any():  # the caps cannot hold that much: the caps win
        return tuple(caps)
    grids = torch.meshgrid(*(torch.arange(1, c + 1, dtype=torch.float64) for c in caps), indexing="ij")
    free = [n for n, p in enumerate(pinned) if not p]
    params = sum(dims[n] * grids[n] for n in free) + math.prod(grids[n] for n in free)
    fewest = feasible & (params == params[feasible].min())
    index = torch.unravel_index(torch.argmax(torch.where(fewest, kept, -1.0)), kept.shape)  # ties: most energy
    return tuple(int(i) + 1 for i in index)


def truncate_tucker(
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    pinned: Sequence[bool],
    caps: Optional[Sequence[int]] = None,
    energy: Optional[float] = None,
) -> Optional[tuple[torch.Tensor, list[torch.Tensor], float]]:
    """Re-compress ``G x_n U_n`` (any factors) to ranks ``<= caps`` and, with ``energy``, to the fewest
    parameters keeping that share of its energy (``tucker_ranks_for_energy``); pinned modes stay pinned.

    Returns ``(core, factors, relative_error)`` in float64 with orthonormal factors (``Q_n V_n``), or None when
    the ranks would not change (the layer is left exactly as it is).
    """

    G, Us = _float64(core, factors)
    C, Qs = orthonormalise(G, Us, keep=pinned)
    current = tuple(C.shape)
    caps = tuple(min(c, r) for c, r in zip(caps or current, current, strict=True))
    dims = [U.shape[0] for U in Us]
    ranks = caps if energy is None else tucker_ranks_for_energy(C, dims, caps, energy, pinned)
    if ranks == current:
        return None
    H, Vs = hooi(C, list(ranks))
    error = torch.linalg.vector_norm(C - reconstruct(H, Vs)) / torch.linalg.vector_norm(C).clamp_min(1e-300)
    return H, [Q @ V for Q, V in zip(Qs, Vs, strict=True)], float(error)
