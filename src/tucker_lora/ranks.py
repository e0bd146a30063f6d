"""Per-layer, per-mode Tucker ranks under a parameter budget, chosen from the mode spectra of a proxy.

``allocate_ranks(model, budget, ...)`` returns a ``rank_pattern`` for ``TuckerLoraConfig`` whose adapters
hold at most ``budget`` trainable parameters (Proposition 1, the count ``print_trainable_parameters``
gives). The design is in ``docs/rank-allocation.md``; in short, for a layer with proxy ``X`` (its base
weight, or the gradient of a loss w.r.t. it):

- captured energy of ranks ``r``: ``E(r) = ||X x_1 U_1^T ... x_N U_N^T||^2``, the energy the truncated
  HOSVD keeps, ``U_n`` the top-``r_n`` eigenvectors of ``X_(n) X_(n)^T`` (the centre tap for a pinned
  kernel mode). Exact, read off one small core (``LayerSpectra.core``); a lower bound of what the best
  rank-r adapter holds;
- greedy: from ``(1, 1, 0, 0, 0)`` on every layer (kernel modes pinned), take the affordable step of the
  highest ``w_l * (E(r') - E(r)) / (params(r') - params(r))``. A step raises one mode by one, or two where
  the Tucker core needs both (``r_n <= prod_{m != n} r_m``: a Linear grows as (r, r) -> (r + 1, r + 1)).
  Then an exchange pass lowers ranks that hold less per parameter than the best open step and spends
  again while the total grows; what is left goes to zero-gain steps, so less than one step stays unspent;
- normalisation ``w_l``: ``proxy="gradient"``: ``1 / sum_l ||X_l||^2`` (the first-order loss decrease of a
  step, ``eta * sum_l ||P_l X_l||^2``, adds raw gradient energies); ``proxy="weight"``: ``1 / ||X_l||^2``
  (a weight's scale is arbitrary across layers, the shape of its spectrum is not);
- ties (equal gain per parameter): fewer parameters first, one mode before two, then the layer name, then
  the mode order o, i, t, h, w. Layers are taken in name order, so ``named_modules`` order never matters.

``greedy_ranks`` is the allocation itself (spectra in, ranks out, no modules); ``mode_spectra`` turns a
tensor into spectra; ``weight_gradients`` collects the gradient proxy.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
from torch import nn

from .config import TuckerLoraConfig
from .init import leading_subspace
from .model import TuckerLoraModel
from .targets import adaptable_layer, required_default_targets
from .tucker import (
    KERNEL_MODES,
    MODES,
    centre_tap,
    mode_names,
    mode_product,
    num_params,
    resolve_ranks,
    validate_ranks,
)

logger = logging.getLogger("tucker_lora")

__all__ = [
    "LayerAllocation",
    "LayerSpectra",
    "PROXIES",
    "RankAllocation",
    "allocate_ranks",
    "greedy_ranks",
    "is_valid",
    "minimum_budget",
    "mode_spectra",
    "target_layers",
    "weight_gradients",
]

#: Values of ``proxy``.
PROXIES: tuple[str, ...] = ("weight", "gradient")
#: A step capturing less than this share of its layer's energy gains nothing: a float32 proxy of low multilinear
#: rank carries rounding energy of about 1e-12 of its total outside that rank; real spectra are not cut here.
ZERO_ENERGY = 1e-9
#: Entries of the proxy converted to float64 at a time while forming a Gram.
_CHUNK = 1 << 22

Ranks5 = tuple[int, int, int, int, int]


# ---------------------------------------------------------------------------------------------- spectra
@dataclass(frozen=True)
class LayerSpectra:
    """What the allocation needs of one layer's proxy ``X`` (shape ``dims``, modes ``modes``).

    ``eigenvalues[n]``: the largest eigenvalues of the mode-n Gram ``X_(n) X_(n)^T``, largest first, as many
    as mode n's rank may reach. ``core``: ``X x_1 B_1^T ... x_N B_N^T``, the HOSVD core truncated there, with
    ``B_n`` the eigenvectors of those eigenvalues; a kernel mode's ``B_n`` starts with the centre tap (index
    0: the pinned mode), its eigenvectors follow. ``energy``: ``||X||^2``.
    """

    modes: tuple[str, ...]
    dims: tuple[int, ...]
    energy: float
    eigenvalues: tuple[tuple[float, ...], ...]
    core: torch.Tensor

    def captured(self, ranks: Sequence[int]) -> float:
        """``||P X||^2`` for the rank-``ranks`` HOSVD projection ``P`` (one rank per mode, 0 = pinned): the
        energy of the ``ranks`` block of the core."""
        return float(self.core[_selection(self.modes, ranks)].square().sum())


def _max_ranks(max_ranks: object) -> dict[str, int]:
    caps = validate_ranks(max_ranks, "max_ranks")
    for mode, r in zip(MODES[:2], caps[:2], strict=True):
        if r < 1:
            raise ValueError(f"max_ranks: r_{mode} must be >= 1 (every adapter trains U_o and U_i), got {r}")
    return dict(zip(MODES, caps, strict=True))


def _limit(mode: str, dim: int, cap: int) -> int:
    """Highest rank mode ``mode`` may reach: ``min(dim, cap)``; a kernel mode of size 1 stays pinned (rank 1
    there spans the same single tap and only adds a redundant scalar)."""
    if mode in KERNEL_MODES and dim == 1:
        return 0
    return min(dim, cap)


def _selection(modes: Sequence[str], ranks: Sequence[int]) -> tuple[slice, ...]:
    """Index of the rank-``ranks`` block of a ``LayerSpectra.core`` (kernel modes: index 0 is the centre tap)."""
    return tuple(
        (slice(0, 1) if r == 0 else slice(1, 1 + r)) if mode in KERNEL_MODES else slice(0, r)
        for mode, r in zip(modes, ranks, strict=True)
    )


def mode_gram(X: torch.Tensor, n: int) -> torch.Tensor:
    """``X_(n) X_(n)^T`` in float64, ``(dim_n, dim_n)``; the proxy is converted a chunk at a time."""
    shape = X.shape
    P, d, S = math.prod(shape[:n]), shape[n], math.prod(shape[n + 1 :])
    X3 = X.detach().reshape(P, d, S)
    G = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    p_step = max(1, _CHUNK // max(d * S, 1))
    s_step = S if p_step > 1 else max(1, _CHUNK // d)
    for p in range(0, P, p_step):
        for s in range(0, S, s_step):
            A = X3[p : p + p_step, :, s : s + s_step].movedim(1, 0).reshape(d, -1).to(torch.float64)
            G.addmm_(A, A.mT)
    return G


def _top_eigh(G: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest eigenvalues of the symmetric ``G`` and their eigenvectors, largest first."""
    if m == 0:
        return G.new_zeros(0), G.new_zeros(G.shape[0], 0)
    if m < G.shape[0]:
        V = leading_subspace(None, m, "gram", gram=G).to(G.dtype)
        return ((G @ V) * V).sum(0), V  # Rayleigh quotients of exact eigenvectors: the eigenvalues
    values, V = torch.linalg.eigh(G)
    return values.flip(0), V.flip(1)


def mode_spectra(X: torch.Tensor, max_ranks: Sequence[int] = (16, 16, 3, 3, 3)) -> LayerSpectra:
    """Mode spectra and truncated HOSVD core of a weight-shaped tensor ``X`` (order 2 to 5), up to ``max_ranks``.

    ``max_ranks`` is the paper's ``(r_o, r_i, r_t, r_h, r_w)`` (modes map as in ``tucker.mode_names``). Grams
    and the core are float64 (the core, at most ``16 x 16 x 4 x 4 x 4``, on the CPU); the first (largest)
    contraction runs in the proxy's own precision, on its device.
    """
    caps = _max_ranks(max_ranks)
    X = X.detach()
    modes = mode_names(X.ndim)
    dims = tuple(int(d) for d in X.shape)
    energy, eigenvalues, bases = 0.0, [], []
    for n, (mode, d) in enumerate(zip(modes, dims, strict=True)):
        G = mode_gram(X, n)
        if n == 0:
            energy = float(G.trace())
        values, V = _top_eigh(G, _limit(mode, d, caps[mode]))
        eigenvalues.append(tuple(float(v) for v in values.clamp_min(0)))
        if mode in KERNEL_MODES:
            V = torch.cat([centre_tap(d, G.device, G.dtype), V], dim=1)
        bases.append(V)
    core = X if X.dtype == torch.float64 else X.float()
    for n in sorted(range(X.ndim), key=lambda m: bases[m].shape[1] / bases[m].shape[0]):  # biggest cut first
        core = mode_product(core, bases[n].T.to(core.dtype), n).to(torch.float64)
    return LayerSpectra(modes, dims, energy, tuple(eigenvalues), core.cpu())


# ---------------------------------------------------------------------------------------------- the greedy
def _paper(modes: Sequence[str], ranks: Sequence[int]) -> Ranks5:
    """Layer ranks (one per mode) as the paper's 5-tuple; absent modes get 0 (ignored by ``resolve_ranks``)."""
    by_mode = dict(zip(modes, ranks, strict=True))
    return tuple(by_mode.get(m, 0) for m in MODES)  # type: ignore[return-value]


def is_valid(ranks: Sequence[int]) -> bool:
    """A Tucker core of sizes ``ranks`` uses all of them: ``r_n <= prod_{m != n} r_m`` (a pinned mode counts 1)."""
    sizes = [max(r, 1) for r in ranks]
    return all(r == 0 or r <= math.prod(sizes) // sizes[n] for n, r in enumerate(ranks))


class _Layer:
    """Greedy state of one layer: ranks (one per mode), their limits, and a table of ``E(r)`` for every ``r``
    up to the limits (prefix sums of the squared core)."""

    def __init__(self, name: str, spectra: LayerSpectra, caps: dict[str, int], weight: float) -> None:
        self.name, self.spectra, self.weight = name, spectra, weight
        self.modes, self.dims = spectra.modes, spectra.dims
        self.limit = [_limit(m, d, caps[m]) for m, d in zip(self.modes, self.dims, strict=True)]
        self.floor = ZERO_ENERGY * spectra.energy
        for n, values in enumerate(spectra.eigenvalues):
            if len(values) < self.limit[n] or spectra.core.shape[n] < self.limit[n] + (self.modes[n] in KERNEL_MODES):
                raise ValueError(f"layer '{name}': the spectra of mode {self.modes[n]} stop short of max_ranks")
        # table[idx(r)] = E(r): cumulative sums of the squared core along o, i, and along the eigen part
        # (indices 1, 2, ...) of a kernel mode, whose index 0 (the centre tap) stays apart
        table = spectra.core.square().numpy()
        for n, mode in enumerate(self.modes):
            if mode in KERNEL_MODES:
                rest = np.cumsum(np.take(table, range(1, table.shape[n]), axis=n), axis=n)
                table = np.concatenate([np.take(table, [0], axis=n), rest], axis=n)
            else:
                table = np.cumsum(table, axis=n)
        self.table = table
        self.kernel = [m in KERNEL_MODES for m in self.modes]
        self.start = [0 if k else 1 for k in self.kernel]  # (1, 1, 0, 0, 0)
        self.ranks = list(self.start)
        self.energy = self.captured(self.ranks)
        self._moves: dict[tuple[int, ...], list[tuple]] = {}

    def captured(self, ranks: Sequence[int]) -> float:
        return float(self.table[tuple(r if k else r - 1 for r, k in zip(ranks, self.kernel, strict=True))])

    def num_params(self, ranks: Sequence[int]) -> int:
        """Proposition 1 over the modes that are not pinned (as ``resolve_ranks(...).num_params()``)."""
        kept = [(d, r) for d, r in zip(self.dims, ranks, strict=True) if r > 0]
        return num_params([d for d, _ in kept], [r for _, r in kept])

    def moves(self) -> list[tuple]:
        """Heap entries of the steps from the current ranks: one mode, or two modes, up by one.

        Phase 0 (first, by gain per parameter): valid steps (``is_valid``) that capture more energy. Phase 1
        (the rest of the budget): the other valid steps.
        Phase 2 (the last parameters, when no valid step fits): single steps to a redundant core size.
        Each entry ends with the ranks it starts from (it is stale once the layer has moved on).
        """
        origin = tuple(self.ranks)
        if origin in self._moves:
            return self._moves[origin]
        base = self.num_params(origin)
        out = []
        for step, after in self.neighbours(1):
            valid = is_valid(after)
            if not valid and len(step) > 1:
                continue
            cost = self.num_params(after) - base
            gain = self.captured(after) - self.energy if valid else 0.0
            gain = gain if gain > self.floor else 0.0
            phase = 2 if not valid else 0 if gain > 0 else 1
            out.append((phase, -self.weight * gain / cost, cost, len(step), self.name, step, origin))
        self._moves[origin] = out
        return out

    def neighbours(self, by: int) -> Iterator[tuple[tuple[int, ...], list[int]]]:
        """``(step, ranks)`` for every one or two modes moved by ``by`` and still within their range."""
        movable = [n for n, r in enumerate(self.ranks) if self.start[n] <= r + by <= self.limit[n]]
        for step in [(n,) for n in movable] + list(itertools.combinations(movable, 2)):
            after = list(self.ranks)
            for n in step:
                after[n] += by
            yield step, after

    def take(self, step: Sequence[int], by: int = 1) -> None:
        for n in step:
            self.ranks[n] += by
        self.energy = self.captured(self.ranks)


def greedy_ranks(
    spectra: Mapping[str, LayerSpectra],
    budget: int,
    max_ranks: Sequence[int] = (16, 16, 3, 3, 3),
    normalise: str = "total",
) -> dict[str, Ranks5]:
    """The allocation: ranks per layer (paper 5-tuples) of at most ``budget`` trainable parameters in all.

    Start: ``(1, 1, 0, 0, 0)`` on every layer (r_o = r_i = 1, kernel modes pinned). Then, while a step fits
    the budget, take the one of the highest captured-energy gain per added parameter; a step raises one mode
    by one, or two modes where a Tucker core needs both (``is_valid``). Then the exchange pass (``_exchange``).
    Once nothing gains, the rest of the budget goes to the other valid steps, best gain per parameter then
    cheapest first, and when none fits,
    to single steps to a redundant core size, so less than the cheapest single step is left. Ties: fewer
    parameters, one mode before two, layer name, mode order. ``normalise``: ``"total"`` weighs every gain by
    ``1 / sum_l ||X_l||^2``, ``"layer"`` by ``1 / ||X_l||^2``. The order of ``spectra`` never matters.
    """
    if normalise not in ("total", "layer"):
        raise ValueError(f"normalise must be 'total' or 'layer', got {normalise!r}")
    caps = _max_ranks(max_ranks)
    names = sorted(spectra)
    total = math.fsum(spectra[n].energy for n in names)

    def weight(s: LayerSpectra) -> float:
        scale = total if normalise == "total" else s.energy
        return 1.0 / scale if scale > 0 else 0.0

    layers = {n: _Layer(n, spectra[n], caps, weight(spectra[n])) for n in names}
    left = budget - minimum_budget(spectra[n].dims for n in names)
    if left < 0:
        raise ValueError(_below_minimum(budget, len(names), budget - left))
    left = _exchange(layers, _spend(layers, left, gaining=True))
    _spend(layers, left, gaining=False)
    return {n: _paper(layers[n].modes, layers[n].ranks) for n in names}


def _spend(layers: Mapping[str, _Layer], left: int, gaining: bool) -> int:
    """Take the best affordable step (heap order) until none fits; returns the parameters left. ``gaining``:
    phase-0 steps only (see ``_Layer.moves``). A step that does not fit now never will (``left`` only shrinks)."""

    def fitting(layer: _Layer) -> list[tuple]:
        return [e for e in layer.moves() if e[2] <= left and (e[0] == 0 or not gaining)]

    heap = [entry for layer in layers.values() for entry in fitting(layer)]
    heapq.heapify(heap)
    while heap:
        _, _, cost, _, name, step, origin = heapq.heappop(heap)
        layer = layers[name]
        if origin != tuple(layer.ranks) or cost > left:  # stale, or no longer affordable
            continue
        layer.take(step)
        left -= cost
        for entry in fitting(layer):
            heapq.heappush(heap, entry)
    return left


def _objective(layers: Mapping[str, _Layer]) -> float:
    return math.fsum(layer.weight * layer.energy for layer in layers.values())


def _exchange(layers: Mapping[str, _Layer], left: int) -> int:
    """Local search after the greedy: lower one or two modes of a layer by one (to a valid tuple) when the ranks
    given up hold less energy per parameter than the best step still open, spend again, and keep the change
    only if the captured energy grows. Undoes early steps that later ones made poor (a mode raised only so
    that another could grow) and small gains taken because the better step did not fit. Ends when no such
    change helps; each kept change raises the objective, so it ends."""
    while True:
        price = max((-e[1] for layer in layers.values() for e in layer.moves() if e[0] == 0), default=None)
        if price is None:  # nothing left to gain anywhere
            return left
        candidates = []
        for name, layer in layers.items():
            base = layer.num_params(layer.ranks)
            for step, lower in layer.neighbours(-1):
                if is_valid(lower):
                    freed = base - layer.num_params(lower)
                    lost = layer.weight * (layer.energy - layer.captured(lower))
                    if lost / freed < price:
                        candidates.append((lost / freed, len(step), name, step, freed))
        before = _objective(layers)
        for *_, name, step, freed in sorted(candidates):
            saved = {k: (list(layer.ranks), layer.energy) for k, layer in layers.items()}
            layers[name].take(step, -1)
            after_left = _spend(layers, left + freed, gaining=True)
            if _objective(layers) > before:
                left = after_left
                break
            for k, (ranks, energy) in saved.items():
                layers[k].ranks, layers[k].energy = ranks, energy
        else:
            return left


def _start_params(dims: Sequence[int]) -> int:
    """Parameters of the smallest adapter of a weight of shape ``dims``: ranks (1, 1, 0, 0, 0)."""
    return resolve_ranks((1, 1, 0, 0, 0), tuple(dims)).num_params()


def minimum_budget(shapes: Iterable[Sequence[int]]) -> int:
    """The smallest budget for layers of these weight shapes: every one at ranks (1, 1, 0, 0, 0)."""
    return sum(_start_params(dims) for dims in shapes)


def _below_minimum(budget: int, layers: int, minimum: int) -> str:
    return (
        f"budget {budget} is below the smallest adapter on these {layers} layers: ranks (1, 1, 0, 0, 0) everywhere "
        f"need {minimum} trainable parameters; give a budget >= {minimum} or fewer target_modules"
    )


# ---------------------------------------------------------------------------------------------- the model
def target_layers(
    model: nn.Module,
    target_modules: Optional[Union[list[str], str]] = None,
    exclude_modules: Optional[Union[list[str], str]] = None,
) -> dict[str, nn.Module]:
    """``{name: layer}`` of the layers a ``TuckerLoraConfig`` with these ``target_modules`` / ``exclude_modules``
    adapts, in name order (an already wrapped layer gives its base layer).

    ``target_modules=None``: the model's default targets (``tucker_lora.DEFAULT_TARGET_MODULES``); otherwise
    peft's own matching (exact names or dotted suffixes for a list, a full-match regex for a string,
    ``"all-linear"``).
    """
    if target_modules is None:
        target_modules = required_default_targets(model)
    # peft expands "all-linear" in inject_adapter with this helper; do the same
    config = _maybe_include_all_linear_layers(
        TuckerLoraConfig(target_modules=target_modules, exclude_modules=exclude_modules), model
    )
    found: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(key + ".")  # its base_layer and adapter internals are never targets of their own
        if TuckerLoraModel._check_target_module_exists(config, key):
            found[key] = adaptable_layer(module, key)
    if not found:
        raise ValueError(f"target_modules {target_modules!r} match no module of the {type(model).__name__}")
    return dict(sorted(found.items()))


def weight_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The gradient proxy ``X_W = sum_b dL_b / dW`` of each named weight, over the calibration ``batches``.

    ``loss_fn(model, batch)`` returns a scalar. Only these weights take a gradient; each is added into a
    float32 sum (float64 for a float64 weight) the moment autograd has it, and its ``.grad`` is freed, so
    what stays alive is one gradient-sized sum per weight. Every ``requires_grad`` flag and ``.grad`` is
    restored. The random state inside is ``torch.manual_seed(seed)`` (the caller's is left alone), so a
    ``loss_fn`` that draws noise or timesteps gives the same proxy for the same seed.
    """
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    unique = {id(w): w for w in weights.values()}
    sums: dict[int, torch.Tensor] = {}

    def accumulate(p: torch.Tensor) -> None:
        with torch.no_grad():
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            if id(p) in sums:
                sums[id(p)].add_(p.grad.to(dtype))
            else:
                sums[id(p)] = p.grad.to(dtype, copy=True)
        p.grad = None

    cuda = sorted({p.device.index or 0 for p, _, _ in saved if p.device.type == "cuda"})
    handles = []
    count = 0
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for w in unique.values():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(accumulate))
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            torch.manual_seed(seed)
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise TypeError(f"loss_fn(model, batch) must return a scalar tensor, got {got}")
                if not loss.requires_grad:
                    raise ValueError("loss_fn's loss does not depend on any targeted weight (no gradient to follow)")
                loss.backward()
                count += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
    if count == 0:
        raise ValueError("proxy='gradient' needs at least one calibration batch")
    missed = [name for name, w in weights.items() if id(w) not in sums]
    if missed:
        warnings.warn(
            f"{len(missed)} targeted layers got no gradient from loss_fn and keep the smallest adapter unless "
            f"budget is left over: {missed[:5]}",
            stacklevel=3,
        )
    return {
        name: sums[id(w)] if id(w) in sums else torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()
    }


# ---------------------------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class LayerAllocation:
    """One layer of an allocation: ``ranks`` (paper 5-tuple), its trainable parameters, the proxy's energy
    ``||X||^2`` and the share of it the rank-``ranks`` HOSVD projection captures (exact)."""

    modes: tuple[str, ...]
    dims: tuple[int, ...]
    ranks: Ranks5
    num_params: int
    energy: float
    captured: float


class RankAllocation(dict):
    """A ``rank_pattern``: ``{escaped layer name: (r_o, r_i, r_t, r_h, r_w)}``, plus the report.

    Keys are ``re.escape`` of full module names, deepest names first, so peft's pattern rule (the first key
    matching the name or a dotted suffix of it) picks each layer's own entry. Attributes: ``layers`` (``{name:
    LayerAllocation}``, name order), ``budget``, ``num_params`` (their sum), ``proxy``, and the
    ``target_modules`` / ``exclude_modules`` it was given; ``to_config(**kwargs)`` builds the matching
    ``TuckerLoraConfig``; ``summary()`` is a table.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerAllocation],
        budget: int,
        proxy: str,
        target_modules: Optional[Union[list[str], str]],
        exclude_modules: Optional[Union[list[str], str]],
    ) -> None:
        order = sorted(layers, key=lambda n: (-n.count("."), n))
        super().__init__((re.escape(n), layers[n].ranks) for n in order)
        self.layers = dict(sorted(layers.items()))
        self.budget = budget
        self.proxy = proxy
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.num_params = sum(a.num_params for a in self.layers.values())

    def to_config(self, **kwargs: Any) -> TuckerLoraConfig:
        """``TuckerLoraConfig(target_modules=..., exclude_modules=..., rank_pattern=self, **kwargs)``."""
        return TuckerLoraConfig(
            target_modules=self.target_modules, exclude_modules=self.exclude_modules, rank_pattern=dict(self), **kwargs
        )

    def summary(self) -> str:
        """One line per layer: shape, ranks (r_o, r_i, r_t, r_h, r_w), parameters, share of the proxy's energy
        over all layers, captured share of the layer's own; then the totals."""
        total = math.fsum(a.energy for a in self.layers.values())
        width = max(len("layer"), *(len(n) for n in self.layers))
        lines = [f"{'layer':<{width}}  {'shape':<18} {'ranks':<17} {'params':>7} {'energy':>7} {'captured':>8}"]
        for name, a in self.layers.items():
            share = a.energy / total if total > 0 else 0.0
            shape = "x".join(map(str, a.dims))
            ranks = "(" + ", ".join(map(str, a.ranks)) + ")"
            lines.append(f"{name:<{width}}  {shape:<18} {ranks:<17} {a.num_params:>7} {share:>7.3f} {a.captured:>8.3f}")
        lines.append(f"{self.num_params} of {self.budget} parameters on {len(self.layers)} layers ({self.proxy} proxy)")
        return "\n".join(lines)


def allocate_ranks(
    model: nn.Module,
    budget: int,
    target_modules: Optional[Union[list[str], str]] = None,
    proxy: str = "gradient",
    batches: Optional[Iterable[Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    max_ranks: Sequence[int] = (16, 16, 3, 3, 3),
    *,
    exclude_modules: Optional[Union[list[str], str]] = None,
    seed: int = 0,
) -> RankAllocation:
    """Per-layer, per-mode ranks for the targeted layers of ``model`` within ``budget`` trainable parameters.

    Returns a ``rank_pattern`` for ``TuckerLoraConfig`` (a dict; see ``RankAllocation`` for its report and
    ``to_config``). ``get_peft_model(model, allocation.to_config())`` then has at most ``budget`` trainable
    parameters, and fewer by less than one step (unless every mode reaches ``max_ranks``).

    Args:
        model: the base model (before ``get_peft_model``).
        budget: trainable parameters of all adapters together, a positive integer; below the smallest adapter
            on every targeted layer (ranks (1, 1, 0, 0, 0)) it is an error that names that minimum.
        target_modules: as in ``TuckerLoraConfig`` (None: the model's default targets).
        proxy: ``"gradient"`` (the gradient of ``loss_fn`` over ``batches`` w.r.t. each base weight, summed)
            or ``"weight"`` (the base weights; needs no data, ignores ``batches`` / ``loss_fn``).
        batches, loss_fn: calibration data and ``loss_fn(model, batch) -> scalar`` for the gradient proxy.
        max_ranks: the highest rank per mode ``(r_o, r_i, r_t, r_h, r_w)`` (r_o, r_i >= 1; 0 keeps a kernel
            mode pinned); a rank never exceeds its mode's size.
        exclude_modules: as in ``TuckerLoraConfig``.
        seed: the random state ``loss_fn`` runs under (the result is the same for the same seed).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
        raise ValueError(f"budget must be a positive integer (trainable parameters), got {budget!r}")
    budget = int(budget)
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES}, got {proxy!r}")
    if proxy == "gradient" and (batches is None or loss_fn is None):
        missing = " and ".join(n for n, v in (("batches", batches), ("loss_fn", loss_fn)) if v is None)
        raise ValueError(
            f"proxy='gradient' needs calibration batches and loss_fn(model, batch); {missing} not given "
            "(or use proxy='weight', which needs no data)"
        )
    _max_ranks(max_ranks)
    layers = target_layers(model, target_modules, exclude_modules)
    for name, layer in layers.items():
        if layer.weight.device.type == "meta":
            raise ValueError(f"layer '{name}': the weight is on the meta device; load the weights first")
    minimum = minimum_budget(tuple(layer.weight.shape) for layer in layers.values())
    if budget < minimum:
        raise ValueError(_below_minimum(budget, len(layers), minimum))

    if proxy == "gradient":
        proxies = weight_gradients(model, {n: layer.weight for n, layer in layers.items()}, batches, loss_fn, seed)
    else:
        proxies = {n: layer.weight.detach() for n, layer in layers.items()}
    spectra = {}
    for name in layers:
        spectra[name] = mode_spectra(proxies.pop(name), max_ranks)  # a gradient sum is freed once reduced
    ranks = greedy_ranks(spectra, budget, max_ranks, "total" if proxy == "gradient" else "layer")

    report = {}
    for name, s in spectra.items():
        mr = resolve_ranks(ranks[name], s.dims, name)
        layer_ranks = [0 if p else r for r, p in zip(mr.ranks, mr.pinned, strict=True)]
        captured = s.captured(layer_ranks) / s.energy if s.energy > 0 else 1.0
        report[name] = LayerAllocation(s.modes, s.dims, ranks[name], mr.num_params(), s.energy, captured)
    allocation = RankAllocation(report, budget, proxy, target_modules, exclude_modules)
    logger.info("rank allocation (%s proxy):\n%s", proxy, allocation.summary())
    return allocation
