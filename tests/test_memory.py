"""engramlib.memory: the claims chapters 01-02 make, checked numerically."""
import pytest
import torch

from engramlib import memory as M


def test_hebbian_recall_is_exact_for_orthonormal_keys():
    K, V = M.orthonormal_keys(10, 32), M.random_keys(10, 16, seed=1)
    W = M.hebbian_store(K, V)
    torch.testing.assert_close(M.recall(W, K), V)
    assert M.recall_accuracy(W, K, V) == 1.0


def test_store_equals_sum_of_updates_and_updates_are_pure():
    K, V = M.random_keys(4, 6), M.random_keys(4, 3, seed=2)
    W = torch.zeros(3, 6, dtype=M.DTYPE)
    for k, v in zip(K, V):
        before = W.clone()
        W2 = M.hebbian_update(W, k, v, lr=0.3)
        assert torch.equal(W, before)           # no in-place change
        W = W2
    torch.testing.assert_close(W, M.hebbian_store(K, V, lr=0.3))


def test_recall_of_random_keys_is_value_plus_crosstalk():
    K, V = M.random_keys(20, 64), M.random_keys(20, 16, seed=1)
    W = M.hebbian_store(K, V)
    for i in (0, 7):
        torch.testing.assert_close(M.recall(W, K[i]), V[i] + M.crosstalk(K, V, i))
    assert M.crosstalk(M.orthonormal_keys(5, 8), V[:5], 2).abs().max() < 1e-12


def test_random_keys_become_more_orthogonal_with_dimension():
    def mean_abs_overlap(d):
        K = M.random_keys(50, d)
        G = K @ K.T
        return (G - torch.eye(50, dtype=G.dtype)).abs().sum().item() / (50 * 49)
    assert mean_abs_overlap(512) < 0.5 * mean_abs_overlap(32)


def test_raw_recall_quality_depends_on_the_load_n_over_d():
    """Crosstalk grows like sqrt((n-1)/d): cosine(W k_i, v_i) ≈ 1/sqrt(1 + (n-1)/d) for every d."""
    for d in (32, 128):
        for load in (0.25, 1, 4):
            n = int(load * d)
            got = M.capacity_curve(d, [n], trials=3, measure="cosine")[0]
            assert abs(got - (1 + (n - 1) / d) ** -0.5) < 0.05, (d, n, got)


def test_cleanup_capacity_falls_with_load_and_grows_with_dimension():
    def half_capacity(d):
        ns = [int(d * r) for r in (0.25, 0.5, 1, 2, 4, 8, 16)]
        acc = M.capacity_curve(d, ns, trials=3)
        assert acc[0] == 1.0 and acc[-1] < 0.3
        assert all(a >= b - 0.02 for a, b in zip(acc, acc[1:])), acc      # falls with n
        return next(n for n, a in zip(ns, acc) if a < 0.5)
    assert half_capacity(32) < half_capacity(64) < half_capacity(128)


def test_noise_lowers_recall():
    clean = M.capacity_curve(64, [64], trials=3)[0]
    noisy = M.capacity_curve(64, [64], trials=3, noise=1.0)[0]
    assert noisy < clean


def test_partial_cue_keeps_a_fraction_and_still_recalls_with_orthonormal_keys():
    K, V = M.orthonormal_keys(8, 256), M.random_keys(8, 32, seed=1)
    W = M.hebbian_store(K, V)
    cue = M.partial_cue(K[3], keep=0.3)
    assert 0.15 < (cue != 0).double().mean() < 0.45
    assert M.cleanup(M.recall(W, cue), V).item() == 3


def test_anti_hebbian_forget_undoes_a_hebbian_update_exactly():
    K, V = M.random_keys(5, 10), M.random_keys(5, 4, seed=1)
    W = M.hebbian_store(K[:4], V[:4])
    torch.testing.assert_close(M.anti_hebbian_forget(M.hebbian_update(W, K[4], V[4], 0.7), K[4], V[4], 0.7), W)


def test_least_squares_memory_is_exact_for_independent_correlated_keys():
    K, V = M.correlated_keys(12, 16, rho=0.7), M.random_keys(12, 5, seed=1)
    torch.testing.assert_close(M.recall(M.least_squares_memory(K, V), K), V)
    assert M.recall_accuracy(M.hebbian_store(K, V), K, V) < 1.0   # Hebbian fails on these keys


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_rank_one_edit_writes_v_star_and_spares_stored_keys(rho):
    K, V = M.correlated_keys(10, 16, rho=rho, seed=3), M.random_keys(10, 6, seed=4)
    W = M.least_squares_memory(K, V)
    C_inv = torch.linalg.pinv(M.key_covariance(K))
    v_star = M.random_keys(1, 6, seed=5)[0]
    W_hat = M.rank_one_edit(W, K[2], v_star, C_inv)
    torch.testing.assert_close(W_hat @ K[2], v_star)
    others = [i for i in range(10) if i != 2]
    torch.testing.assert_close(M.recall(W_hat, K[others]), V[others])
    assert M.interference(W, W_hat, K, skip=2) < 1e-9


def test_naive_edit_is_hebbian_plus_anti_hebbian_and_damages_correlated_neighbours():
    K, V = M.correlated_keys(10, 16, rho=0.8, seed=3), M.random_keys(10, 6, seed=4)
    W = M.least_squares_memory(K, V)
    v_star = M.random_keys(1, 6, seed=5)[0]
    W_naive = M.naive_edit(W, K[2], v_star)
    k = K[2]   # unit key: W + v* kᵀ − (W k) kᵀ
    torch.testing.assert_close(W_naive, W + torch.outer(v_star, k) - torch.outer(W @ k, k))
    torch.testing.assert_close(W_naive @ k, v_star)
    assert M.interference(W, W_naive, K, skip=2) > 0.1


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="orthonormal"):
        M.orthonormal_keys(5, 3)
    with pytest.raises(ValueError, match="rho"):
        M.correlated_keys(3, 4, rho=1.0)
    with pytest.raises(ValueError, match="keys but"):
        M.hebbian_store(M.random_keys(3, 4), M.random_keys(2, 4))


def test_first_below_finds_the_first_crossing_with_few_calls():
    calls = []

    def accuracy(n):
        calls.append(n)
        return 1.0 if n < 37 else 0.9 if n < 40 else 0.5
    assert M.first_below(accuracy, 0.9) == 40          # exactly 0.9 (n = 37-39) is not below 0.9
    assert len(calls) < 20
    assert M.first_below(lambda n: 1.0 if n < 5000 else 0.0, 0.9) == 5000
    assert M.first_below(lambda n: 0.0, 0.9) == 1
    assert M.first_below(lambda n: 1 / (1 + n / 100), 0.5) == 101


def test_capacity_n_star_is_where_cleanup_recall_crosses_the_threshold_and_grows_faster_than_d():
    n32, n64 = M.capacity_n_star(32, trials=2), M.capacity_n_star(64, trials=2)
    acc = lambda d, n: M.capacity_curve(d, [n], trials=2)[0]
    assert acc(64, n64) < 0.9 <= acc(64, n64 - 1)
    assert n64 > 2 * n32                                   # after cleanup: faster than linear in d
