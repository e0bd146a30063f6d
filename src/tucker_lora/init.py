"""HOSVD / HOOI initialisers of the Tucker factors (paper section 3.2) and the proxies they decompose.

The math (pure functions on a torch tensor of any order; everything runs on the tensor's own device):

- ``hosvd(X, ranks)``: ``U_n <- top-r_n left singular vectors of X_(n)`` for every mode, then
  ``G <- X x_1 U_1^T ... x_N U_N^T``.
- ``hooi(X, ranks)``: from the HOSVD, mode by mode ``U_n <- top-r_n left singular vectors of
  (X x_{k != n} U_k^T)_(n)`` until the relative error ``||X - G x_1 U_1 ... x_N U_N|| / ||X||``
  (``= sqrt(1 - ||G||^2 / ||X||^2)`` with orthonormal factors) changes by less than ``tol``.

Both return ``(core, factors)`` with orthonormal factors ``U_n`` of shape (dim_n, r_n) and
``reconstruct(core, factors)`` the approximation of ``X``. Ranks follow DESIGN.md: one per mode,
``r_n >= dim_n`` clipped to ``dim_n`` (the factor is the identity, nothing to compute), and
``r_n == 0`` pins mode n to its centre index ``dim_n // 2`` (the centre tap of a kernel mode): its
factor is the fixed one-hot, the core has size 1 there, and the other modes are decomposed from
``X`` restricted to that slice. A weight of order 2 to 4 also takes the paper's 5-tuple
``(r_o, r_i, r_t, r_h, r_w)``, resolved exactly as the adapter layer resolves it.

Speed. Only the top r singular vectors are needed, and kernel unfoldings are very wide (a
1280x1280x3x3x3 kernel unfolds to 1280 x 34560 along o and i), so the default ``method="auto"``
never takes a full SVD of a wide unfolding:

- ``"gram"`` (what ``auto`` uses for a wide unfolding): eigenvectors of the Gram matrix
  ``X_(n) X_(n)^T`` (dim_n x dim_n). Exact up to rounding: the same subspace as the SVD wherever the
  r-th and (r+1)-th singular values are apart. The trailing small (kernel) modes get their Grams as
  partial traces of one small Gram of the kernel block, so no unfolding is copied for them.
- ``"svd"``: a thin SVD of the unfolding (what ``auto`` uses for a tall or small unfolding; the
  reference, and what tensorly's default does for every mode).
- ``"randomized"``: randomised subspace iteration with Rayleigh-Ritz extraction (Halko, Martinsson
  and Tropp 2011), iterated until the leading subspace moves by less than ``1e-4`` between two
  iterations. Faster still when the spectrum decays (trained weights, gradients); on a flat spectrum
  (i.i.d. random weights) it may stop before converging, so it is opt-in.

Mode products contract one mode at a time as batched matmuls on a ``(P, dim_n, S)`` view (no
unfolding copies), biggest rank reduction first; HOOI reuses the big first contraction between the
mode updates of a sweep. tensorly (whose ``tucker`` is the independent reference in the tests) is
not called here: its ``set_backend`` is global state, and its mode products copy each unfolding.

The model level:

- ``init_layer_from_weight`` / ``init_from_weights``: the proxy is the frozen base weight. Only the
  factors are set (they span the weight's leading mode subspaces); the core is left as the config
  made it (zero by default), so the model's output is unchanged. This is what
  ``TuckerLoraConfig(init_weights="hosvd" | "hooi")`` runs for every adapted layer.
- ``init_from_gradients(model, batches, loss_fn)``: the proxy is the gradient ``X = dL/dW`` of each
  adapted layer's base weight, accumulated over a few calibration batches (the adapters are switched
  off, so this is the gradient at the base weights, which is also the gradient at a fresh adapter
  with a zero core). With factors from the HOOI of ``X`` and a zero core, the first optimiser step
  moves the core along ``-X x_n U_n^T``, the largest such projection at these ranks.

Memory of the gradient proxy. A plain backward with the base weights unfrozen holds every adapted
layer's full weight gradient at once (as much memory again as the adapted weights). Here each
gradient is reduced the moment autograd has accumulated it (a ``post_accumulate_grad`` hook) and its
``.grad`` is freed, so at most one full weight gradient is alive at a time. What is kept per layer
is linear in the gradient, so it adds up exactly over batches (the proxy is the *sum* of the batch
gradients, not a sum of per-batch statistics):

1. range pass: for each large mode n (``dim_n > r_n + oversample``) a sketch
   ``Y_n = X x_{m != n} Omega_m^T`` that contracts the other large modes with fixed Gaussian
   ``Omega_m`` (dim_m x (r_m + oversample)) and keeps the small (kernel) modes whole;
   then ``Q_n`` = top ``r_n + oversample`` left singular vectors of ``Y_(n)``;
2. projection pass (the calibration batches again): ``C = X x_n Q_n^T`` over the large modes.

``C`` is the exact projection of the accumulated gradient onto the sketched subspaces, so
HOSVD / HOOI of ``C`` lifted by ``Q_n`` is HOSVD / HOOI of ``P X`` (exact when ``X``'s leading mode
subspaces lie in the sketches, as for gradients of low multilinear rank; a randomised range finder
with oversampling otherwise). Per layer this keeps ``sum_n dim_n * prod_{m != n} k_m`` numbers (with
``k_m = min(dim_m, r_m + oversample)``): about 2% of a 1280x1280x3x3x3 weight at ranks (4, 4, 1, 1, 1).
The price is a second forward/backward over the calibration batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .tucker import ModeRanks, centre_tap, mode_names, resolve_ranks, unfold

logger = logging.getLogger("tucker_lora")

Method = Literal["auto", "gram", "svd", "randomized"]
METHODS: tuple[str, ...] = ("auto", "gram", "svd", "randomized")
INIT_METHODS: tuple[str, ...] = ("hosvd", "hooi")

__all__ = [
    "captured_energy",
    "hooi",
    "hosvd",
    "init_from_gradients",
    "init_from_weights",
    "init_layer_from_weight",
    "leading_subspace",
]

#: Largest product of trailing mode sizes whose Grams come from one small Gram of that block.
_KERNEL_BLOCK = 64
#: Randomised subspace iteration: oversampling, iteration cap, subspace tolerance.
_RANDOMIZED_OVERSAMPLE = 10
_RANDOMIZED_ITERS = 15
_RANDOMIZED_TOL = 1e-4


# ---------------------------------------------------------------------------------------------- matrices
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gram(A: torch.Tensor, columns: bool = False) -> torch.Tensor:
    """``A A^T`` (or ``A^T A`` with ``columns``, used for a tall, narrow ``A``).

    ``A A^T`` on CPU goes through numpy's ``a @ a.T`` on the same buffer, which calls BLAS ``syrk`` (half
    the flops of a GEMM; no copy, zero-copy view of a contiguous CPU tensor). Elsewhere, and for
    ``A^T A`` (where torch is faster), a torch matmul on the tensor's own device.
    """
    if not columns and A.device.type == "cpu" and not A.requires_grad and A.dtype in (torch.float32, torch.float64):
        a = A.contiguous().numpy()
        return torch.from_numpy(a @ a.T)
    return A.mT @ A if columns else A @ A.mT


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of each column positive (a deterministic choice of sign)."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    return U * torch.where(signs == 0, torch.ones_like(signs), signs)


def _complete(U: torch.Tensor, r: int) -> torch.Tensor:
    """``U`` (m, c) orthonormal, extended to ``r`` orthonormal columns (same span for the first c)."""
    m, c = U.shape
    if c >= r:
        return U[:, :r]
    g = torch.Generator(device=U.device).manual_seed(c)
    extra = torch.randn(m, r - c, generator=g, device=U.device, dtype=U.dtype)
    Q, R = torch.linalg.qr(torch.cat([U, extra], dim=1))
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)


def _top_eigvecs(G: torch.Tensor, r: int) -> torch.Tensor:
    """Eigenvectors of the ``r`` largest eigenvalues of the symmetric ``G``, largest first.

    On CPU, LAPACK ``syevr`` for those ``r`` only (scipy, which tensorly depends on): about half the time
    of a full ``eigh`` at 1280 x 1280. Elsewhere ``torch.linalg.eigh`` on the tensor's device.
    """
    m = G.shape[0]
    cpu = G.device.type == "cpu" and not G.requires_grad and G.dtype in (torch.float32, torch.float64)
    if cpu and m > 64 and 2 * r < m:
        try:
            from scipy.linalg import eigh
        except ImportError:  # pragma: no cover - scipy comes with tensorly
            eigh = None
        if eigh is not None:
            _, V = eigh(G.numpy(), subset_by_index=[m - r, m - 1], driver="evr", check_finite=False)
            return torch.from_numpy(V[:, ::-1].copy())
    _, V = torch.linalg.eigh(G)
    return V[:, -r:].flip(-1)


def _randomized(A: torch.Tensor, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Top-r left singular vectors of ``A`` (m, n) by randomised subspace iteration with Rayleigh-Ritz."""
    m, n = A.shape
    k = min(m, r + _RANDOMIZED_OVERSAMPLE)
    if generator is None:
        generator = torch.Generator(device=A.device).manual_seed(0)
    Q = torch.linalg.qr(A @ torch.randn(n, k, generator=generator, device=A.device, dtype=A.dtype))[0]
    U_prev = None
    for _ in range(_RANDOMIZED_ITERS):
        Z = Q.mT @ A  # (k, n): A^T Q
        U = Q @ _top_eigvecs(Z @ Z.mT, r)  # Ritz vectors of A A^T in span(Q)
        if U_prev is not None:
            moved = torch.linalg.matrix_norm(U - U_prev @ (U_prev.mT @ U), ord=2)
            if moved < _RANDOMIZED_TOL:
                break
        U_prev = U
        Q = torch.linalg.qr(A @ Z.mT)[0]  # span(A A^T Q)
    return U


def leading_subspace(
    A: torch.Tensor | None, r: int, method: Method = "auto", gram: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-``r`` left singular vectors of a matrix ``A`` (m, n): an (m, r) matrix with orthonormal columns.

    ``r`` is clipped to ``m``; where ``A`` has fewer than ``r`` non-zero singular values the rest is
    an orthonormal completion. ``method``: ``"gram"`` (eigenvectors of ``A A^T``), ``"svd"`` (thin
    SVD), ``"randomized"`` (subspace iteration) or ``"auto"`` (Gram for a wide ``A``, SVD otherwise).
    ``gram``, if given, is ``A A^T`` already computed (``A`` may then be None for the Gram method).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    m, n = (gram.shape[0], math.inf) if A is None else A.shape
    r = min(int(r), m)
    ref = gram if A is None else A
    if r == m:
        return torch.eye(m, dtype=ref.dtype, device=ref.device)
    if method == "auto":
        method = "gram" if (gram is not None or n >= m) else "svd"
    if method == "gram":
        U = _top_eigvecs(gram if gram is not None else _gram(A), r)
    elif method == "svd":
        U = _complete(torch.linalg.svd(A, full_matrices=False)[0], r)
    elif 2 * (r + _RANDOMIZED_OVERSAMPLE) <= min(m, n):
        U = _randomized(A, r)
    else:  # a sketch would be as big as the matrix: no gain
        return leading_subspace(A, r, "auto")
    return _fix_signs(U)


# ---------------------------------------------------------------------------------------------- tensors
def mode_dot_t(X: torch.Tensor, U: torch.Tensor, n: int) -> torch.Tensor:
    """``X x_n U^T``: X (..., dim_n, ...), U (dim_n, r) -> (..., r, ...), as one (batched) matmul on a view."""
    shape = X.shape
    P, d, S = math.prod(shape[:n]), shape[n], math.prod(shape[n + 1 :])
    if S == 1:
        out = X.reshape(P, d) @ U
    elif P == 1:
        out = U.mT @ X.reshape(d, S)
    else:
        out = torch.matmul(U.mT, X.reshape(P, d, S))
    return out.reshape(*shape[:n], U.shape[1], *shape[n + 1 :])


def _project(X: torch.Tensor, factors: dict[int, torch.Tensor]) -> torch.Tensor:
    """``X x_n U_n^T`` for every n in ``factors``, biggest reduction (dim_n / r_n) first."""
    for n in sorted(factors, key=lambda m: factors[m].shape[1] / factors[m].shape[0]):
        X = mode_dot_t(X, factors[n], n)
    return X


def _mode_grams(X: torch.Tensor, modes: Sequence[int]) -> dict[int, torch.Tensor]:
    """Gram matrices ``X_(n) X_(n)^T`` of the given modes, without copying an unfolding of a trailing small mode.

    Modes inside the trailing block of at most ``_KERNEL_BLOCK`` entries (the kernel taps of a conv
    weight) take theirs as partial traces of that block's Gram ``B^T B``, B = X viewed (-1, block).
    """
    shape = X.shape
    start = X.ndim
    while start > 1 and math.prod(shape[start - 1 :]) <= _KERNEL_BLOCK:
        start -= 1
    grams: dict[int, torch.Tensor] = {}
    tail = [n for n in modes if n >= start]
    if tail:
        B = X.reshape(-1, math.prod(shape[start:]))
        K = _gram(B, columns=True).reshape(*shape[start:], *shape[start:])
        k = X.ndim - start
        for n in tail:
            j = n - start
            left = list(range(k))
            right = [k + j if i == j else i for i in range(k)]
            grams[n] = torch.einsum(K, left + right, [j, k + j])
    for n in modes:
        if n not in grams:
            grams[n] = _gram(unfold(X, n))
    return grams


def _as_mode_ranks(shape: Sequence[int], ranks: ModeRanks | Sequence[int]) -> ModeRanks:
    """Resolve ``ranks`` for a tensor of ``shape``: a ``ModeRanks``, one rank per mode, or the paper's 5-tuple."""
    shape = tuple(int(d) for d in shape)
    if isinstance(ranks, ModeRanks):
        if ranks.dims != shape:
            raise ValueError(f"ranks were resolved for shape {ranks.dims}, the tensor has shape {shape}")
        return ranks
    ranks = tuple(ranks)
    if len(ranks) == 5 and 2 <= len(shape) <= 4:
        return resolve_ranks(ranks, shape, "proxy")
    if len(ranks) != len(shape):
        raise ValueError(
            f"need one rank per mode of a tensor of shape {shape} (or a 5-tuple for orders 2-4), got {ranks}"
        )
    names = mode_names(len(shape)) if 2 <= len(shape) <= 5 else tuple(str(n) for n in range(len(shape)))
    out, pinned, clipped = [], [], []
    for name, d, r in zip(names, shape, ranks, strict=True):
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rank of mode {name} must be an integer >= 0, got {r!r}")
        if r > d:
            clipped.append(f"r_{name} {r} -> {d}")
        out.append(1 if r == 0 else min(r, d))
        pinned.append(r == 0)
    return ModeRanks(names, shape, tuple(out), tuple(pinned), tuple(clipped))


def _restrict(X: torch.Tensor, mr: ModeRanks) -> torch.Tensor:
    """``X`` at the centre index of every pinned mode (each kept as a size-1 mode), in the compute dtype."""
    for n, p in enumerate(mr.pinned):
        if p:
            X = X.narrow(n, X.shape[n] // 2, 1)
    return X.detach().to(_compute_dtype(X.dtype))


def _free_modes(mr: ModeRanks) -> list[int]:
    """Modes that need a decomposition: not pinned and not at full rank."""
    return [n for n in range(len(mr.dims)) if not mr.pinned[n] and mr.ranks[n] < mr.dims[n]]


def _full_factors(mr: ModeRanks, free: dict[int, torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    """All factors: the computed ones, one-hot centre taps for pinned modes, identities for full-rank modes."""
    out = []
    for n, (d, p) in enumerate(zip(mr.dims, mr.pinned, strict=True)):
        if p:
            out.append(centre_tap(d, like.device, like.dtype))
        elif n in free:
            out.append(free[n])
        else:
            out.append(torch.eye(d, device=like.device, dtype=like.dtype))
    return out


def _hosvd_factors(X: torch.Tensor, mr: ModeRanks, method: Method) -> dict[int, torch.Tensor]:
    free = _free_modes(mr)
    if method in ("auto", "gram"):
        wide = [n for n in free if X.shape[n] <= X.numel() // X.shape[n]]
        grams = _mode_grams(X, wide)
        return {
            n: leading_subspace(None, mr.ranks[n], "gram", grams[n])
            if n in grams
            else leading_subspace(unfold(X, n), mr.ranks[n], method)
            for n in free
        }
    return {n: leading_subspace(unfold(X, n), mr.ranks[n], method) for n in free}


def _hooi_factors(
    X: torch.Tensor,
    mr: ModeRanks,
    factors: dict[int, torch.Tensor],
    n_iter_max: int,
    tol: float,
    method: Method,
) -> tuple[dict[int, torch.Tensor], list[float]]:
    """HOOI sweeps (Gauss-Seidel over the free modes) from ``factors``; returns the factors and the errors."""
    free = sorted(factors)
    norm2 = _sq_norm(X)
    errors: list[float] = []
    if len(free) <= 1 or norm2 == 0.0:  # one free mode: the HOSVD is already optimal
        return factors, errors
    factors = dict(factors)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # first mode -> (its factor, X x_first U^T)
    for _ in range(n_iter_max):
        for n in free:
            others = {m: factors[m] for m in free if m != n}
            first = min(others, key=lambda m: others[m].shape[1] / others[m].shape[0])
            hit = cache.get(first)
            if hit is None or hit[0] is not others[first]:
                hit = (others[first], mode_dot_t(X, others[first], first))
                cache[first] = hit
            Y = _project(hit[1], {m: U for m, U in others.items() if m != first})
            factors[n] = leading_subspace(unfold(Y, n), mr.ranks[n], method if method != "randomized" else "auto")
        core = mode_dot_t(Y, factors[free[-1]], free[-1])
        errors.append(math.sqrt(max(norm2 - _sq_norm(core), 0.0) / norm2))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return factors, errors


def _decompose(
    X: torch.Tensor,
    ranks: ModeRanks | Sequence[int],
    method: Method,
    hooi_iters: int,
    tol: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mr = _as_mode_ranks(X.shape, ranks)
    Xr = _restrict(X, mr)
    free = _hosvd_factors(Xr, mr, method)
    if hooi_iters > 0:
        free, _ = _hooi_factors(Xr, mr, free, hooi_iters, tol, method)
    core = _project(Xr, free)
    return core, _full_factors(mr, free, core)


def hosvd(
    X: torch.Tensor, ranks: ModeRanks | Sequence[int], *, method: Method = "auto"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Higher-order SVD: ``U_n`` = top-``r_n`` left singular vectors of ``X_(n)``, ``G = X x_n U_n^T``.

    X: a tensor of any order (float64 stays float64, other dtypes are computed in float32) on any
    device. ranks: one per mode (``0`` pins a mode to its centre index, ``>= dim`` is clipped), a
    ``ModeRanks`` from ``resolve_ranks``, or the paper's ``(r_o, r_i, r_t, r_h, r_w)`` for orders 2-4.
    Returns ``(core, factors)``: core of shape (r_1, ..., r_N), factors (dim_n, r_n) orthonormal.
    """
    return _decompose(X, ranks, method, 0, 0.0)


def hooi(
    X: torch.Tensor,
    ranks: ModeRanks | Sequence[int],
    n_iter_max: int = 25,
    tol: float = 1e-6,
    *,
    method: Method = "auto",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Higher-order orthogonal iteration from the HOSVD (paper section 3.2); same arguments and result as ``hosvd``.

    Each sweep sets, mode after mode, ``U_n`` = top-``r_n`` left singular vectors of
    ``(X x_{k != n} U_k^T)_(n)``; it stops after ``n_iter_max`` sweeps or when the relative
    reconstruction error changes by less than ``tol`` between sweeps. The error never exceeds the HOSVD's.
    """
    return _decompose(X, ranks, method, max(int(n_iter_max), 1), tol)


def _sq_norm(X: torch.Tensor) -> float:
    """``||X||^2``: BLAS dot products over chunks of 2^20 entries, summed in float64 (no copy of a contiguous X).

    torch's float32 ``vector_norm`` of a 1280x1280x3x3x3 kernel is 0.7% off; this is within ~1e-7.
    """
    v = X.detach().reshape(-1)
    return math.fsum(float(torch.dot(c, c)) for c in v.split(1 << 20))


def captured_energy(X: torch.Tensor, core: torch.Tensor) -> float:
    """``||G||^2 / ||X||^2``: the share of ``X``'s energy its Tucker approximation holds (orthonormal factors)."""
    total = _sq_norm(X)
    return _sq_norm(core) / total if total > 0 else 1.0


# ---------------------------------------------------------------------------------------------- layers
def _adapted_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, Any]]:
    from .layer import TuckerLoraLayer

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, TuckerLoraLayer) and adapter_name in m.mode_ranks
    ]


@torch.no_grad()
def _set_factors(layer: Any, adapter_name: str, factors: Sequence[torch.Tensor]) -> None:
    from .layer import factor_attr

    mr = layer.mode_ranks[adapter_name]
    for n in mr.trainable_modes:
        getattr(layer, factor_attr(mr.modes[n]))[adapter_name].copy_(factors[n])


_FIRST_REPORTED: set[tuple[str, str]] = set()


@torch.no_grad()
def _init_from_weight(layer: Any, adapter_name: str, method: str) -> float | None:
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    weight = layer.get_base_layer().weight
    if weight.device.type == "meta" or layer.tucker_lora_core[adapter_name].device.type == "meta":
        return None  # empty-weight loading (low_cpu_mem_usage): the checkpoint fills the adapter
    mr = layer.mode_ranks[adapter_name]
    core, factors = (hooi if method == "hooi" else hosvd)(weight, mr)
    _set_factors(layer, adapter_name, factors)
    energy = captured_energy(_restrict(weight, mr), core)
    logger.debug("%s init of '%s' from its base weight: captured energy %.4f", method, layer.layer_name, energy)
    return energy


def init_layer_from_weight(layer: Any, adapter_name: str, method: str = "hosvd") -> float | None:
    """Set the factors of one adapter of a ``TuckerLoraLayer`` from its frozen base weight; return the captured energy.

    ``method``: ``"hosvd"`` or ``"hooi"``. The core is not touched. A base weight or adapter on the meta
    device (empty-weight loading, which the checkpoint fills) is skipped and None returned. The first
    layer of each type logs its captured energy at INFO, every layer at DEBUG.
    """
    energy = _init_from_weight(layer, adapter_name, method)
    kind = type(layer.get_base_layer()).__name__
    if energy is not None and (kind, method) not in _FIRST_REPORTED:
        _FIRST_REPORTED.add((kind, method))
        logger.info(
            "%s init from the base weight on %s layers (first: '%s', captured energy %.4f; each layer at DEBUG)",
            method,
            kind,
            layer.layer_name,
            energy,
        )
    return energy


def _progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="layer" if "layer" in desc else "batch")


def _log_summary(method: str, proxy: str, energies: dict[str, float], kinds: dict[str, str]) -> None:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for name, e in energies.items():
        if e is not None:
            by_kind[kinds[name]].append(e)
    for kind, values in sorted(by_kind.items()):
        logger.info(
            "%s init from %s: %d %s layers, captured energy mean %.4f (min %.4f, max %.4f)",
            method,
            proxy,
            len(values),
            kind,
            sum(values) / len(values),
            min(values),
            max(values),
        )


def init_from_weights(
    model: nn.Module, method: str = "hooi", adapter_name: str = "default", progress: bool = True
) -> dict[str, float]:
    """Set every adapted layer's factors from its base weight (a progress bar over layers, one log line per layer type).

    The same as ``TuckerLoraConfig(init_weights=method)`` does layer by layer at injection; use it to
    (re)initialise an existing adapter. Returns ``{layer name: captured energy}``.
    """
    layers = _adapted_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"no Tucker-LoRA layer holds adapter '{adapter_name}'")
    energies, kinds = {}, {}
    for name, layer in _progress(layers, len(layers), f"{method} init (layers)", progress):
        energies[name] = _init_from_weight(layer, adapter_name, method)
        kinds[name] = type(layer.get_base_layer()).__name__
    _log_summary(method, "the base weights", energies, kinds)
    return energies


# ---------------------------------------------------------------------------------------------- gradients
class _GradientSketch:
    """Linear sketches of a stream of weight gradients ``X = sum_b g_b`` of one layer (see the module docstring)."""

    def __init__(self, mr: ModeRanks, oversample: int, seed: int, device: torch.device) -> None:
        self.mr = mr
        self.shape = tuple(1 if p else d for d, p in zip(mr.dims, mr.pinned, strict=True))
        self.k = {n: min(self.shape[n], mr.ranks[n] + oversample) for n in _free_modes(mr)}
        self.large = [n for n, k in self.k.items() if k < self.shape[n]]
        g = torch.Generator(device=device).manual_seed(seed)
        self.omega = {
            n: torch.randn(self.shape[n], self.k[n], generator=g, device=device) / math.sqrt(self.k[n])
            for n in self.large
        }
        self.Y: dict[int, torch.Tensor] = {}
        self.Q: dict[int, torch.Tensor] = {}
        self.C: torch.Tensor | None = None
        self.phase = "range"

    def add(self, grad: torch.Tensor) -> None:
        g = _restrict(grad, self.mr)
        if self.phase == "range":
            for n in self.large:
                y = _project(g, {m: self.omega[m] for m in self.large if m != n})
                self.Y[n] = y if n not in self.Y else self.Y[n].add_(y)
        else:
            c = _project(g, self.Q)
            self.C = c if self.C is None else self.C.add_(c)

    def finish_range(self) -> None:
        """Orthonormal bases of the sketched ranges; the sketches are dropped."""
        for n in self.large:
            Y = self.Y.pop(n, None)
            if Y is not None:  # None: the layer got no gradient (decompose then returns None)
                self.Q[n] = leading_subspace(unfold(Y, n), self.k[n], "auto")
        self.omega.clear()
        self.phase = "project"

    def nbytes(self) -> int:
        tensors = list(self.Y.values()) + list(self.Q.values()) + list(self.omega.values())
        tensors += [self.C] if self.C is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def decompose(self, method: str, n_iter_max: int, tol: float) -> tuple[list[torch.Tensor], float] | None:
        """HOSVD / HOOI factors of the projected proxy ``C``, lifted to the layer, and the captured share of ``C``.

        None when no gradient reached the layer.
        """
        if self.C is None:
            return None
        C = self.C
        # C lives in the sketched subspaces: decompose it with ranks per mode, then lift by Q_n.
        ranks = [self.mr.ranks[n] if not self.mr.pinned[n] else 1 for n in range(len(self.shape))]
        cmr = ModeRanks(
            self.mr.modes,
            tuple(C.shape),
            tuple(min(r, d) for r, d in zip(ranks, C.shape, strict=True)),
            (False,) * len(self.shape),
        )
        free = _hosvd_factors(C, cmr, "auto")
        if method == "hooi":
            free, _ = _hooi_factors(C, cmr, free, n_iter_max, tol, "auto")
        core = _project(C, free)
        energy = captured_energy(C, core)
        lifted = {}
        for n in _free_modes(self.mr):
            V = free.get(n, torch.eye(C.shape[n], dtype=C.dtype, device=C.device))
            V = _complete(V, self.mr.ranks[n]) if V.shape[1] < self.mr.ranks[n] else V
            lifted[n] = self.Q[n] @ V if n in self.Q else V
        return _full_factors(self.mr, lifted, core), energy


@contextlib.contextmanager
def _base_gradients_only(model: nn.Module, layers: Sequence[Any]) -> Iterator[list[nn.Parameter]]:
    """Inside: only the adapted layers' base weights require grad and the adapters are off; all restored after."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    disabled = [(layer, layer._disable_adapters) for layer in layers]
    weights: list[nn.Parameter] = []
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for layer in layers:
            w = layer.get_base_layer().weight
            if not any(w is q for q in weights):
                weights.append(w)
            w.requires_grad_(True)
            layer._disable_adapters = True
        yield weights
    finally:
        for layer, flag in disabled:
            layer._disable_adapters = flag
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def init_from_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    method: str = "hooi",
    adapter_name: str = "default",
    *,
    oversample: int = 10,
    n_iter_max: int = 25,
    tol: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Set every adapted layer's factors from the gradient of ``loss_fn`` w.r.t. its frozen base weight.

    ``batches``: a few calibration batches (iterated twice, so a list or any re-iterable; a generator
    is read into a list). ``loss_fn(model, batch)`` returns a scalar loss. The gradient
    ``X = sum_b dL_b/dW`` is reduced as it is produced (see the module docstring for the memory
    argument) and each layer's factors are set from ``method`` (``"hosvd"`` or ``"hooi"``) of ``X``.
    The cores, the base weights and every ``requires_grad`` flag are left as they were.
    Returns ``{layer name: captured share of the sketched gradient's energy}``.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    layers = _adapted_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"no Tucker-LoRA layer holds adapter '{adapter_name}'")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"unmerge the adapters before a gradient init (merged: {merged[:3]})")
    batches = list(batches)
    if not batches:
        raise ValueError("init_from_gradients needs at least one calibration batch")
    sketches: dict[int, list[_GradientSketch]] = defaultdict(list)  # id(weight) -> sketches of its layers
    per_layer = []
    for i, (_, layer) in enumerate(layers):
        w = layer.get_base_layer().weight
        s = _GradientSketch(layer.mode_ranks[adapter_name], oversample, seed + i, w.device)
        sketches[id(w)].append(s)
        per_layer.append(s)

    with _base_gradients_only(model, [layer for _, layer in layers]) as weights:

        def reduce(p: torch.Tensor) -> None:
            with torch.no_grad():
                for s in sketches[id(p)]:
                    s.add(p.grad)
            p.grad = None

        for phase in ("range", "projection"):
            handles = [w.register_post_accumulate_grad_hook(reduce) for w in weights]
            try:
                for batch in _progress(batches, len(batches), f"gradient proxy, {phase} pass", progress):
                    with torch.enable_grad():
                        loss = loss_fn(model, batch)
                        loss.backward()
            finally:
                for h in handles:
                    h.remove()
            if phase == "range":
                for s in per_layer:
                    s.finish_range()

    energies, kinds, missed = {}, {}, []
    items = list(zip(layers, per_layer, strict=True))
    for (name, layer), s in _progress(items, len(items), f"{method} init from gradients (layers)", progress):
        result = s.decompose(method, n_iter_max, tol)
        if result is None:
            missed.append(name)
            continue
        factors, energies[name] = result
        _set_factors(layer, adapter_name, factors)
        kinds[name] = type(layer.get_base_layer()).__name__
        logger.debug("%s init of '%s' from gradients: captured energy %.4f", method, name, energies[name])
    if missed:
        warnings.warn(
            f"{len(missed)} adapted layers got no gradient from loss_fn and keep their factors: {missed[:5]}",
            stacklevel=2,
        )
    _log_summary(method, "gradients", energies, kinds)
    return energies
