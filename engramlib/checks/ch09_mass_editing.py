"""Checks for chapter 09: many memories at once (MEMIT) and one after another (AlphaEdit)."""
from __future__ import annotations

import torch

from engramlib.checks._common import _call, _close, _fail, _ok, _tensor


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
    lam·tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖² (the chapter's objective)."""
    K, R, C, _ = _toy()
    lam = 2.0
    got = _call(fn, K.clone(), R.clone(), C.clone(), lam,
                shape_hint="K is (n, d_in) with one key per ROW; the square matrices of the normal equations "
                           "are (d_in, d_in), like C")
    d_out, d_in = R.shape[1], K.shape[1]
    _tensor(got, "ΔW (d_out, d_in)", (d_out, d_in),
            ": the update maps keys (d_in) to values (d_out), like W itself")
    inv = torch.linalg.inv
    A = lam * C + K.T @ K
    ref = R.T @ K @ inv(A)
    if _close(got, ref, 1e-6):
        _ok("mass_update")
        return
    identity = torch.eye(d_in, dtype=torch.float64)
    if _close(got, R.T @ K @ inv(C + K.T @ K), 1e-6):
        _fail("λ is missing: your ΔW is the one for λ = 1; the first term of the objective weighs the old keys "
              "by λ")
    if _close(got, R.T @ K @ inv(lam * identity + K.T @ K), 1e-6):
        _fail("your ΔW treats the old keys as if they were spread evenly over all directions (the identity "
              "where their covariance C belongs): the penalty is how much the OLD keys' outputs move, and "
              "that depends on the directions they actually use")
    if _close(got, R.T @ K @ inv(lam * C + K.T @ K / lam), 1e-6) or _close(got, R.T @ K @ inv(C + lam * K.T @ K), 1e-6):
        _fail("λ multiplies the wrong term: it weighs the OLD keys (the first term of the objective), not the "
              "new ones")
    if _close(got, R.T @ K @ torch.linalg.pinv(lam * C), 1e-6):
        _fail("the new keys' own term is missing: the second part of the objective also contributes a "
              "(d_in, d_in) term that multiplies ΔW")
    if _close(got, R.T @ K @ A, 1e-6):
        _fail("you multiplied by the (d_in, d_in) matrix of the normal equations instead of by its inverse "
              "(torch.linalg.solve or inv)")
    fit = (got @ K.T - R.T).norm() / R.norm()
    _fail(f"your ΔW is not the minimiser of the objective (its relative misfit on the new keys is {fit:.3f}; "
          f"the minimiser's is {(ref @ K.T - R.T).norm() / R.norm():.3f}). Set the gradient to zero again and "
          "check which side of ΔW each matrix stands on")


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
    d_out, d_in = R.shape[1], K.shape[1]
    _tensor(got, "ΔW (d_out, d_in)", (d_out, d_in))
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
    ppl = [3.0, 3.1, 6.0, 6.2, 8.0, 20.0]
    got = _call(fn, list(n_edits), list(ppl), 1.5)
    if got is None:
        _fail("your function returned None: return a list of edit counts")
    got = list(got)
    if got == [20, 40, 50]:
        _fail("`jump` is a factor: a jump is a perplexity more than `jump` TIMES the one before, not more than "
              "`jump` above it (6.2 → 8.0 is a rise of 1.8 but only 1.3-fold)")
    if got == [20, 50]:
        edge = list(_call(fn, [0, 1, 2], [3.0, 4.5, 6.75], 1.5))
        if edge == [2]:
            _fail("`jump` is a factor: a jump is a perplexity more than `jump` TIMES the one before, not more "
                  "than `jump` above it")
        if edge != []:
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


def paraphrase_choices(paraphrase: dict, tie: float = 0.03) -> set:
    """Predict 9.3's right answers from each method's paraphrase accuracy (fractions): the method(s)
    with the highest one (every tied method counts), and "d" when all are within `tie` of each other."""
    letters = {"rome": "a", "memit": "b", "alphaedit": "c"}
    best = max(paraphrase.values())
    out = {letters[m] for m, v in paraphrase.items() if v >= best - 1e-9}
    if best - min(paraphrase.values()) <= tie + 1e-9:
        out.add("d")
    return out


def speed_choices(t_memit: float, t_rome: float, ns_memit: float, ns_rome: float) -> set:
    """Predict 9.2's right answers from the editing times (seconds) and NS (percent) of one MEMIT batch
    and of the same edits by ROME in sequence: "c" ROME faster (under 0.8x MEMIT's time), "d" about the
    same (0.8x to 1.25x), else "a" or "b" by whether MEMIT's NS is within 5 points of ROME's or better.
    A value on an edge counts for both sides (a tie)."""
    ratio, gap = t_rome / t_memit, ns_memit - ns_rome
    out = set()
    if ratio <= 0.8:
        out.add("c")
    if 0.8 <= ratio <= 1.25:
        out.add("d")
    if ratio >= 1.25:
        out |= ({"a"} if gap >= -5 else set()) | ({"b"} if gap <= -5 else set())
    return out
