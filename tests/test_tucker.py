"""Pure Tucker math in ``tucker_lora.tucker`` against numpy and tensorly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.tenalg import mode_dot

from tucker_lora import tucker

shapes = st.lists(st.integers(1, 4), min_size=2, max_size=5)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, data=st.data())
def test_mode_product_and_reconstruct_match_tensorly(shape, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    core = rng.standard_normal(shape)
    factors = [rng.standard_normal((data.draw(st.integers(1, 5)), r)) for r in shape]
    n = data.draw(st.integers(0, len(shape) - 1))
    got = tucker.mode_product(torch.from_numpy(core), torch.from_numpy(factors[n]), n).numpy()
    np.testing.assert_allclose(got, mode_dot(core, factors[n], n), rtol=1e-12, atol=1e-12)
    full = tucker.reconstruct(torch.from_numpy(core), [torch.from_numpy(f) for f in factors]).numpy()
    np.testing.assert_allclose(full, tl.tucker_to_tensor((core, factors)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(tucker.unfold(torch.from_numpy(full), n).numpy(), tl.unfold(full, n))


def test_mode_names_right_aligned():
    assert tucker.mode_names(2) == ("o", "i")
    assert tucker.mode_names(3) == ("o", "i", "w")
    assert tucker.mode_names(4) == ("o", "i", "h", "w")
    assert tucker.mode_names(5) == ("o", "i", "t", "h", "w")
    with pytest.raises(ValueError, match="order 2 to 5"):
        tucker.mode_names(6)


def test_resolve_ranks_rules():
    mr = tucker.resolve_ranks((8, 2, 0, 5, 1), (6, 4, 3, 3, 3), "blocks.0")
    assert mr.ranks == (6, 2, 1, 3, 1) and mr.pinned == (False, False, True, False, False)
    assert mr.clipped == ("r_o 8 -> 6", "r_h 5 -> 3")
    # Proposition 1 over the trained modes; the pinned t mode is collapsed
    assert mr.num_params() == 6 * 6 + 4 * 2 + 3 * 3 + 3 * 1 + 6 * 2 * 3 * 1
    conv2d = tucker.resolve_ranks((4, 4, 7, 2, 2), (16, 8, 3, 3), "c")
    assert conv2d.modes == ("o", "i", "h", "w") and conv2d.ranks == (4, 4, 2, 2)
    with pytest.raises(ValueError, match="layer 'c': r_i = 0"):
        tucker.resolve_ranks((4, 0, 1, 1, 1), (16, 8, 3, 3), "c")


def test_centre_tap():
    assert tucker.centre_tap(3).flatten().tolist() == [0.0, 1.0, 0.0]
    assert tucker.centre_tap(2).flatten().tolist() == [0.0, 1.0]


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_block_core_sum_and_orthonormalise_are_exact(data):
    order = data.draw(st.integers(2, 5))
    dims = [data.draw(st.integers(1, 5)) for _ in range(order)]
    shared = [n >= 2 and data.draw(st.booleans()) for n in range(order)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    terms, expected = [], 0
    for _ in range(data.draw(st.integers(1, 3))):
        ranks = [1 if shared[n] else data.draw(st.integers(1, 4)) for n in range(order)]
        core = torch.randn(ranks, generator=g, dtype=torch.float64)
        factors = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(dims, ranks, strict=True)]
        terms.append((core, factors))
    for n in range(order):  # a shared mode has one factor common to every term
        if shared[n]:
            for _core, factors in terms:
                factors[n] = terms[0][1][n]
    expected = sum(tl.tucker_to_tensor((c.numpy(), [f.numpy() for f in fs])) for c, fs in terms)
    D = tucker.block_diagonal_core([c for c, _ in terms], shared)
    cat = [terms[0][1][n] if shared[n] else torch.cat([fs[n] for _, fs in terms], 1) for n in range(order)]
    np.testing.assert_allclose(tucker.reconstruct(D, cat).numpy(), expected, atol=1e-10)
    core, ortho = tucker.orthonormalise(D, cat, keep=shared)
    np.testing.assert_allclose(tucker.reconstruct(core, ortho).numpy(), expected, atol=1e-9)
    for n, U in enumerate(ortho):
        if not shared[n]:
            assert U.shape[1] <= dims[n]
            np.testing.assert_allclose((U.T @ U).numpy(), np.eye(U.shape[1]), atol=1e-10)


def test_orthonormal_columns():
    U = tucker.orthonormal(7, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-6, rtol=0)


def test_full_rank_is_exact():
    """Proposition 4, second half: at full ranks, identity factors and core = dW represent any dW."""
    target = torch.randn(4, 3, 2, 3, 3, dtype=torch.float64)
    mr = tucker.resolve_ranks((9, 9, 9, 9, 9), target.shape)
    assert mr.ranks == tuple(target.shape)
    eye = [torch.eye(d, dtype=torch.float64) for d in target.shape]
    torch.testing.assert_close(tucker.reconstruct(target, eye), target)
