"""Every exercise check accepts the reference and diagnoses typical mistakes with a specific message."""
import pytest
import torch

from engramlib import checks, memory as M


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def test_hebbian_update(capsys):
    checks.hebbian_update(M.hebbian_update)
    assert "✓" in capsys.readouterr().out
    expect(checks.hebbian_update, lambda W, k, v, lr: W + lr * torch.outer(k, v), "k vᵀ")
    expect(checks.hebbian_update, lambda W, k, v, lr: W + torch.outer(v, k), "learning rate")
    expect(checks.hebbian_update, lambda W, k, v, lr: W.add_(lr * torch.outer(v, k)), "in place")
    expect(checks.hebbian_update, lambda W, k, v, lr: lr * torch.outer(v, k), "only the change")
    expect(checks.hebbian_update, lambda W, k, v, lr: W - lr * torch.outer(v, k), "sign")


def test_cleanup_recall(capsys):
    checks.cleanup_recall(lambda v_hat, V: M.cleanup(v_hat, V))
    assert "✓" in capsys.readouterr().out
    expect(checks.cleanup_recall, lambda v_hat, V: (V @ v_hat).argmax(), "cosine")
    expect(checks.cleanup_recall,
           lambda v_hat, V: torch.nn.functional.cosine_similarity(V, v_hat[None]).argmin(), "argmax")
    expect(checks.cleanup_recall, lambda v_hat, V: V[1], "index")


def test_crosstalk(capsys):
    checks.crosstalk(M.crosstalk)
    assert "✓" in capsys.readouterr().out
    expect(checks.crosstalk, lambda K, V, i: (K @ K[i]) @ V, "itself")
    expect(checks.crosstalk, lambda K, V, i: M.crosstalk(K, V, i).norm(), "norm")


def test_anti_hebbian_forget(capsys):
    checks.anti_hebbian_forget(M.anti_hebbian_forget)
    assert "✓" in capsys.readouterr().out
    expect(checks.anti_hebbian_forget, M.hebbian_update, "subtracts")
    expect(checks.anti_hebbian_forget, lambda W, k, v, lr: W - torch.outer(v, k), "learning rate")
    expect(checks.anti_hebbian_forget, lambda W, k, v, lr: W - lr * torch.outer(k, v), "k vᵀ")


def test_least_squares_memory(capsys):
    checks.least_squares_memory(M.least_squares_memory)
    assert "✓" in capsys.readouterr().out
    expect(checks.least_squares_memory, M.hebbian_store, "pseudo-inverse")
    expect(checks.least_squares_memory, lambda K, V: M.least_squares_memory(K, V).T, "transpose")


def test_covariance_edit(capsys):
    ref = lambda W, k, v, C: M.rank_one_edit(W, k, v, torch.linalg.inv(C))
    checks.covariance_edit(ref)
    assert "✓" in capsys.readouterr().out
    expect(checks.covariance_edit, lambda W, k, v, C: M.rank_one_edit(W, k, v, C), "C⁻¹")
    expect(checks.covariance_edit, lambda W, k, v, C: M.naive_edit(W, k, v), "naive")

    def unnormalised(W, k, v, C):
        u = torch.linalg.inv(C) @ k
        return W + torch.outer(v - W @ k, u)
    expect(checks.covariance_edit, unnormalised, "uᵀ k")

    def transposed(W, k, v, C):
        u = torch.linalg.inv(C) @ k
        return W + torch.outer(u, v - W @ k) / (u @ k)
    expect(checks.covariance_edit, transposed, "shape")
