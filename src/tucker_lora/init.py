"""Model-level initialisers of the Tucker factors: from the frozen base weights, or from gradients.

The decompositions themselves (HOSVD, HOOI, leading subspaces) are pure functions in
``tucker_lora.decomposition``; ``hosvd``, ``hooi``, ``leading_subspace`` and ``captured_energy`` are
importable from here too.

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
from typing import Any

import torch
from torch import nn

from .decomposition import (
    DECOMPOSITIONS,
    captured_energy,
    complete,
    free_modes,
    full_factors,
    hooi,
    hooi_factors,
    hosvd,
    hosvd_factors,
    leading_subspace,
    project,
    restrict,
)
from .layer import TuckerLoraLayer
from .tucker import ModeRanks, unfold

logger = logging.getLogger("tucker_lora")

__all__ = [
    "captured_energy",
    "hooi",
    "hosvd",
    "init_from_gradients",
    "init_from_weights",
    "init_layer_from_weight",
    "leading_subspace",
]


# ---------------------------------------------------------------------------------------------- layers
def _adapted_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, TuckerLoraLayer]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, TuckerLoraLayer) and adapter_name in m.mode_ranks
    ]


def init_layer_from_weight(layer: TuckerLoraLayer, adapter_name: str, method: str = "hosvd") -> float | None:
    """Set the factors of one adapter of a ``TuckerLoraLayer`` from its frozen base weight; return the captured energy.

    ``method``: ``"hosvd"`` or ``"hooi"``. The core is not touched. A base weight or adapter on the meta
    device (empty-weight loading, which the checkpoint fills) is skipped and None returned. The first
    layer of each type logs its captured energy at INFO, every layer at DEBUG
    (``TuckerLoraLayer.init_from_weight``).
    """
    return layer.init_from_weight(adapter_name, method)


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
        energies[name] = layer.init_from_weight(adapter_name, method, report=False)
        kinds[name] = type(layer.get_base_layer()).__name__
    _log_summary(method, "the base weights", energies, kinds)
    return energies


# ---------------------------------------------------------------------------------------------- gradients
class _GradientSketch:
    """Linear sketches of a stream of weight gradients ``X = sum_b g_b`` of one layer (see the module docstring)."""

    def __init__(self, mr: ModeRanks, oversample: int, seed: int, device: torch.device) -> None:
        self.mr = mr
        self.shape = tuple(1 if p else d for d, p in zip(mr.dims, mr.pinned, strict=True))
        self.k = {n: min(self.shape[n], mr.ranks[n] + oversample) for n in free_modes(mr)}
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
        g = restrict(grad, self.mr)
        if self.phase == "range":
            for n in self.large:
                y = project(g, {m: self.omega[m] for m in self.large if m != n})
                self.Y[n] = y if n not in self.Y else self.Y[n].add_(y)
        else:
            c = project(g, self.Q)
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
        free = hosvd_factors(C, cmr, "auto")
        if method == "hooi":
            free, _ = hooi_factors(C, cmr, free, n_iter_max, tol, "auto")
        core = project(C, free)
        energy = captured_energy(C, core)
        lifted = {}
        for n in free_modes(self.mr):
            V = free.get(n, torch.eye(C.shape[n], dtype=C.dtype, device=C.device))
            V = complete(V, self.mr.ranks[n]) if V.shape[1] < self.mr.ranks[n] else V
            lifted[n] = self.Q[n] @ V if n in self.Q else V
        return full_factors(self.mr, lifted, core), energy


@contextlib.contextmanager
def _base_gradients_only(model: nn.Module, layers: Sequence[TuckerLoraLayer]) -> Iterator[list[nn.Parameter]]:
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
    if method not in DECOMPOSITIONS:
        raise ValueError(f"method must be one of {DECOMPOSITIONS}, got {method!r}")
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
        layer.set_factors(adapter_name, factors)
        kinds[name] = type(layer.get_base_layer()).__name__
        logger.debug("%s init of '%s' from gradients: captured energy %.4f", method, name, energies[name])
    if missed:
        warnings.warn(
            f"{len(missed)} adapted layers got no gradient from loss_fn and keep their factors: {missed[:5]}",
            stacklevel=2,
        )
    _log_summary(method, "gradients", energies, kinds)
    return energies
