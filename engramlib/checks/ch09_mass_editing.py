"""Checks for chapter 09: many memories at once (MEMIT) and one after another (AlphaEdit)."""
from __future__ import annotations

import torch

from engramlib.checks._common import _call, _close, _fail, _ok


def _toy(n_new=3, d_in=6, d_out=4, seed=0):
    """Small float64 problem: new keys K (n, d_in), residuals R (n, d_out), a covariance C (d_in, d_in)
    of 40 old keys that span only 4 of the 6 directions (so C has a null space)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n_new, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n_new, d_out, generator=g, dtype=torch.float64)
    basis = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    K0 = torch.randn(40, 4, generator=g, dtype=torch.float64) @ basis
    return K, R, K0.T @ K0 / 40, K0


def mass_update(fn):
    """Exercise 9.1: fn(K, R, C, lam) -> ΔW (d_out, d_in) minimising
    lam·tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖², i.e. ΔW = Rᵀ K (lam C + KᵀK)⁻¹."""
    K, R, C, _ = _toy()
    lam = 2.0
    got = _call(fn, K.clone(), R.clone(), C.clone(), lam,
                shape_hint="K is (n, d_in) with one key per ROW; KᵀK is (d_in, d_in), like C")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}: did you forget to return ΔW?")
    d_out, d_in = R.shape[1], K.shape[1]
    if got.shape == (d_in, d_out):
        _fail(f"expected ΔW of shape (d_out, d_in) = ({d_out}, {d_in}), got its transpose: the update maps "
              "keys (d_in) to values (d_out), so it is Rᵀ K (...)⁻¹, not (...)⁻¹ Kᵀ R")
    if got.shape != (d_out, d_in):
        _fail(f"expected ΔW of shape (d_out, d_in) = ({d_out}, {d_in}), got {tuple(got.shape)}")
    A = lam * C + K.T @ K
    ref = R.T @ K @ torch.linalg.inv(A)
    if _close(got, ref, 1e-6):
        _ok("mass_update")
        return
    if _close(got, R.T @ K @ torch.linalg.inv(C + K.T @ K), 1e-6):
        _fail("λ is missing: the old keys weigh λC in the normal equations, (λC + KᵀK)")
    if _close(got, R.T @ K @ torch.linalg.inv(lam * C + K.T @ K / lam), 1e-6) or \
            _close(got, R.T @ K @ torch.linalg.inv(C + lam * K.T @ K), 1e-6):
        _fail("λ multiplies the wrong term: it weighs the OLD keys' covariance C, not the new keys")
    if _close(got, R.T @ K @ torch.linalg.pinv(lam * C), 1e-6):
        _fail("the new keys' own term KᵀK is missing from the inverse: (λC + KᵀK)⁻¹")
    if _close(got, R.T @ K @ A, 1e-6):
        _fail("you multiplied by (λC + KᵀK) instead of by its inverse (torch.linalg.solve or inv)")
    fit = (got @ K.T - R.T).norm() / R.norm()
    _fail(f"values differ from Rᵀ K (λC + KᵀK)⁻¹ (relative misfit on the new keys {fit:.3f}); "
          "check the order of the products")


def alphaedit_update(fn):
    """Exercise 9.2: fn(K, R, C, threshold, K_prev_cov, alpha) -> ΔW (d_out, d_in):
    P = U₀U₀ᵀ over the eigenvectors of C with eigenvalue < threshold, then
    ΔW = Rᵀ K (P (KᵀK + K_prev_cov) + αI)⁻¹ P (AlphaEdit, Fang et al. 2025)."""
    from engramlib.memit import alphaedit_weight_update, nullspace_projection
    K, R, C, K0 = _toy()
    Kp = torch.randn(2, K.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Kp_cov = Kp.T @ Kp
    threshold, alpha = 1e-6, 0.5
    got = _call(fn, K.clone(), R.clone(), C.clone(), threshold, Kp_cov.clone(), alpha,
                shape_hint="K is (n, d_in) with one key per row; P, C and K_prev_cov are (d_in, d_in)")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}: did you forget to return ΔW?")
    d_out, d_in = R.shape[1], K.shape[1]
    if got.shape == (d_in, d_out):
        _fail(f"expected ΔW of shape (d_out, d_in) = ({d_out}, {d_in}), got its transpose")
    if got.shape != (d_out, d_in):
        _fail(f"expected ΔW of shape (d_out, d_in) = ({d_out}, {d_in}), got {tuple(got.shape)}")
    got = got.double()
    P = nullspace_projection(C, threshold).double()
    ref = alphaedit_weight_update(K, R, P, Kp_cov, alpha).double()
    old_change = (got @ K0.T).norm() / (got.norm() * K0.norm())
    if _close(got, ref, 1e-4):
        if old_change > 1e-5:
            _fail("ΔW changes what the old keys recall: it must end with P (ΔW = ΔW P)")
        _ok("alphaedit_update")
        return
    if old_change > 1e-4:
        identity = torch.eye(d_in, dtype=torch.float64)
        if _close(got, alphaedit_weight_update(K, R, identity, Kp_cov, alpha).double(), 1e-4):
            _fail("the old keys' outputs change (ΔW k₀ ≠ 0): your P is the identity; keep only the "
                  "eigenvectors whose eigenvalue is BELOW the threshold")
        _fail("the old keys' outputs change (ΔW k₀ ≠ 0): keep the eigenvectors with SMALL eigenvalues "
              "(the directions the old keys never use), and make P = U₀ U₀ᵀ the last factor of ΔW")
    if _close(got, alphaedit_weight_update(K, R, P, torch.zeros_like(Kp_cov), alpha).double(), 1e-4):
        _fail("the earlier edits' keys are missing: add K_prev_cov to KᵀK inside the inverse")
    if _close(got, alphaedit_weight_update(K, R, P, Kp_cov, 0.0).double(), 1e-4):
        _fail("the ridge term αI is missing from the inverse")
    _fail("values differ from Rᵀ K (P (KᵀK + K_prev_cov) + αI)⁻¹ P; check which side P multiplies "
          "inside the inverse (P M, not M P) and that the last factor is P")


def disabling_steps(fn):
    """Exercise 9.3: fn(n_edits, perplexities, jump) -> the n_edits values after which the perplexity
    is more than `jump` times what it was at the step before (Gupta et al. 2024's disabling edits)."""
    n_edits = [0, 10, 20, 30, 40, 50]
    ppl = [3.0, 3.1, 6.0, 6.2, 6.2, 20.0]
    got = _call(fn, list(n_edits), list(ppl), 1.5)
    if got is None:
        _fail("your function returned None: return a list of edit counts")
    got = list(got)
    if got == [20, 50]:
        if list(_call(fn, [0, 1, 2], [3.0, 4.5, 6.75], 1.5)) != []:
            _fail("a step exactly `jump` times the one before is not a jump: compare with >, not >=")
        if list(_call(fn, [0], [3.0], 1.5)) != []:
            _fail("a single measurement has no jump: return []")
        _ok("disabling_steps")
        return
    if got == [2, 5]:
        _fail("return the number of edits at the step (n_edits[i]), not the index i")
    if got == [10, 40]:
        _fail("report the step AFTER which the perplexity jumped (n_edits[i]), not the one before it")
    if got == [20, 30, 40, 50]:
        _fail("compare each step with the step just before it, not with the first one")
    _fail(f"expected [20, 50] for perplexities {ppl} at {n_edits} edits with jump 1.5, got {got}")
