"""Checks of chapter 09 (mass and sequential editing): each accepts the reference and diagnoses the
mistake it is written for."""
import pytest
import torch

from engramlib import checks
from engramlib.memit import alphaedit_weight_update, memit_weight_update, nullspace_projection


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def test_mass_update(capsys):
    checks.mass_update(lambda K, R, C, lam: memit_weight_update(K, R, C, lam).double())
    assert "✓" in capsys.readouterr().out
    expect(checks.mass_update, lambda K, R, C, lam: memit_weight_update(K, R, C, lam).T, "transpose")
    expect(checks.mass_update, lambda K, R, C, lam: memit_weight_update(K, R, C, 1.0), "λ is missing")
    expect(checks.mass_update, lambda K, R, C, lam: R.T @ K @ torch.linalg.inv(C + lam * K.T @ K),
           "wrong term")
    expect(checks.mass_update, lambda K, R, C, lam: R.T @ K @ torch.linalg.pinv(lam * C), "own term")
    expect(checks.mass_update, lambda K, R, C, lam: R.T @ K @ (lam * C + K.T @ K), "inverse")
    expect(checks.mass_update, lambda K, R, C, lam: R.T @ K @ torch.linalg.inv(
        lam * torch.eye(C.shape[0], dtype=C.dtype) + K.T @ K), "identity where their covariance C belongs")
    expect(checks.mass_update, lambda K, R, C, lam: R.T @ K, "not the minimiser")


def test_mass_update_messages_do_not_give_the_formula_away():
    import inspect
    source = inspect.getsource(checks.mass_update)
    messages = " ".join(line for line in source.splitlines() if "_fail(" in line or line.strip().startswith('"'))
    assert "KᵀK" not in messages and "(λC" not in messages and "⁻¹" not in (checks.mass_update.__doc__ or "")


def test_alphaedit_update(capsys):
    def reference(K, R, C, threshold, K_prev_cov, alpha):
        return alphaedit_weight_update(K, R, nullspace_projection(C, threshold), K_prev_cov, alpha)
    checks.alphaedit_update(reference)
    assert "✓" in capsys.readouterr().out

    def large_eigenvalues(K, R, C, threshold, K_prev_cov, alpha):
        e, U = torch.linalg.eigh(C)
        U0 = U[:, e >= threshold]
        return alphaedit_weight_update(K, R, U0 @ U0.T, K_prev_cov, alpha)
    expect(checks.alphaedit_update, large_eigenvalues, "SMALL eigenvalues")
    expect(checks.alphaedit_update, lambda K, R, C, t, Kp, a: alphaedit_weight_update(
        K, R, torch.eye(C.shape[0], dtype=C.dtype), Kp, a), "identity")
    expect(checks.alphaedit_update, lambda K, R, C, t, Kp, a: reference(K, R, C, t, torch.zeros_like(Kp), a),
           "earlier edits")
    expect(checks.alphaedit_update, lambda K, R, C, t, Kp, a: reference(K, R, C, t, Kp, a).T, "transpose")

    def projection_inside_only(K, R, C, threshold, K_prev_cov, alpha):
        P = nullspace_projection(C, threshold).double()
        A = P @ (K.T @ K + K_prev_cov) + alpha * torch.eye(K.shape[1], dtype=torch.float64)
        return R.T @ K @ torch.linalg.inv(A)             # P missing at the end
    expect(checks.alphaedit_update, projection_inside_only, "old keys' outputs change")


def test_disabling_steps(capsys):
    def reference(n_edits, ppl, jump):
        return [n_edits[i] for i in range(1, len(ppl)) if ppl[i] > jump * ppl[i - 1]]
    checks.disabling_steps(reference)
    assert "✓" in capsys.readouterr().out
    expect(checks.disabling_steps, lambda n, p, j: [i for i in range(1, len(p)) if p[i] > j * p[i - 1]], "index")
    expect(checks.disabling_steps, lambda n, p, j: [n[i - 1] for i in range(1, len(p)) if p[i] > j * p[i - 1]],
           "AFTER")
    expect(checks.disabling_steps, lambda n, p, j: [n[i] for i in range(1, len(p)) if p[i] > j * p[0]], "first")
    expect(checks.disabling_steps, lambda n, p, j: [n[i] for i in range(1, len(p)) if p[i] >= j * p[i - 1]], ">=")
    expect(checks.disabling_steps, lambda n, p, j: None, "None")
    additive = lambda n, p, j: [n[i] for i in range(1, len(p)) if p[i] - p[i - 1] > j]
    expect(checks.disabling_steps, additive, "factor")


def test_paraphrase_choices_count_every_tie():
    assert checks.paraphrase_choices({"rome": 0.70, "memit": 0.962, "alphaedit": 0.962}) == {"b", "c"}
    assert checks.paraphrase_choices({"rome": 0.95, "memit": 0.962, "alphaedit": 0.962}) == {"b", "c", "d"}
    assert checks.paraphrase_choices({"rome": 0.305, "memit": 0.585, "alphaedit": 0.68}) == {"c"}   # full size
    assert checks.paraphrase_choices({"rome": 0.5, "memit": 0.5, "alphaedit": 0.5}) == {"a", "b", "c", "d"}


def test_speed_choices_hold_ties_on_the_edges():
    assert checks.speed_choices(89, 598, 94.1, 80.7) == {"a"}                   # TinyWorld at full size
    assert checks.speed_choices(10, 30, 70.0, 80.0) == {"b"}
    assert checks.speed_choices(10, 30, 75.0, 80.0) == {"a", "b"}               # exactly 5 points below
    assert checks.speed_choices(10, 12.5, 90.0, 80.0) == {"d", "a"}             # exactly 1.25x
    assert checks.speed_choices(10, 8, 90.0, 80.0) == {"c", "d"}                # exactly 0.8x
    assert checks.speed_choices(10, 5, 90.0, 80.0) == {"c"}
