"""Frechet distance between Gaussian fits of features (the distance behind FID and FVD).

For ``N(mu_1, S_1)`` and ``N(mu_2, S_2)``:

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})

``S_1 S_2`` is not symmetric, and ``scipy.linalg.sqrtm`` of it loses accuracy (or returns complex
values) when the covariances are near-singular, as they are with fewer samples than features. Here
``Tr((S_1 S_2)^{1/2})`` is taken from symmetric eigenproblems instead: with ``R = S_1^{1/2}`` (from
``eigh``), ``S_1 S_2 = R (R S_2)`` has the same eigenvalues as the symmetric PSD matrix ``R S_2 R``, so

    Tr((S_1 S_2)^{1/2}) = sum_k sqrt(lambda_k(R S_2 R)),   lambda_k >= 0.

Both eigendecompositions are backward stable, need no inverse and stay real. Eigenvalues below
``D eps lambda_max`` (the numerical-rank cutoff of ``np.linalg.matrix_rank``) are rounding noise of a
(near-)singular matrix and count as 0: their square roots, about ``sqrt(eps) = 1e-8`` each, would otherwise
add up over the null space. Everything runs in float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "gaussian_fit", "psd_sqrt", "trace_sqrt_product"]


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``mu = (1/N) sum_n f_n`` and unbiased covariance ``S = (1/(N-1)) sum_n (f_n - mu)(f_n - mu)^T``
    of ``features`` (N, D), as ``np.cov(features, rowvar=False)`` (the convention of the FVD code in use)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs features of shape (N >= 2, D), got {f.shape}")
    mu = f.mean(axis=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _cut(lam: np.ndarray) -> np.ndarray:
    """Eigenvalues with those below the numerical-rank cutoff ``D eps lambda_max`` (and negatives) set to 0."""
    tol = max(float(lam.max(initial=0.0)), 0.0) * lam.size * np.finfo(np.float64).eps
    return np.where(lam > tol, lam, 0.0)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """``S^{1/2} = V diag(sqrt(lambda)) V^T`` for a symmetric PSD ``S = V diag(lambda) V^T`` (noise cut to 0)."""
    s = np.asarray(sigma, dtype=np.float64)
    lam, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_cut(lam))) @ v.T


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
    """``Tr((S_1 S_2)^{1/2}) = sum_k sqrt(lambda_k(S_1^{1/2} S_2 S_1^{1/2}))`` (see the module docstring)."""
    r = psd_sqrt(sigma_1)
    m = r @ np.asarray(sigma_2, dtype=np.float64) @ r
    return float(np.sqrt(_cut(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """``d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2) - 2 Tr((S_1 S_2)^{1/2})``, clipped at 0 (it is >= 0 exactly)."""
    mu_1, mu_2 = np.asarray(mu_1, dtype=np.float64), np.asarray(mu_2, dtype=np.float64)
    sigma_1, sigma_2 = np.asarray(sigma_1, dtype=np.float64), np.asarray(sigma_2, dtype=np.float64)
    d = mu_1.shape[0] if mu_1.ndim == 1 else -1
    for name, shape, want in (
        ("mu_2", mu_2.shape, (d,)),
        ("sigma_1", sigma_1.shape, (d, d)),
        ("sigma_2", sigma_2.shape, (d, d)),
    ):
        if d < 0 or shape != want:
            raise ValueError(f"Frechet distance: {name} has shape {shape}, expected {want} (mu_1 is {mu_1.shape})")
    mean_term = float(np.sum((mu_1 - mu_2) ** 2))
    trace_term = float(np.trace(sigma_1) + np.trace(sigma_2)) - 2.0 * trace_sqrt_product(sigma_1, sigma_2)
    return max(mean_term + trace_term, 0.0)
