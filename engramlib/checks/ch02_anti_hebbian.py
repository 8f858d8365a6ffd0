"""Checks for chapter 02: anti-Hebbian editing."""
from __future__ import annotations

import torch

from engramlib.checks._common import _letter, _call, _close, _fail, _ok, _update_rule, choice_between


def anti_hebbian_forget(fn):
    """Exercise 2.1: fn(W, k, v, lr) -> W − lr · v kᵀ."""
    _update_rule(fn, "anti_hebbian_forget", -1.0)
    _ok("anti_hebbian_forget")


def least_squares_memory(fn):
    """Exercise 2.2: fn(K, V) -> W (d_v, d_k) minimising Σ ‖W k_i − v_i‖²."""
    from engramlib import memory
    K = memory.correlated_keys(6, 10, rho=0.5, seed=1)
    V = memory.random_keys(6, 4, seed=2)
    got = _call(fn, K, V, shape_hint="K is (n, d_k) and V is (n, d_v); W must be (d_v, d_k)")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}")
    if got.shape == (10, 4):
        _fail("expected shape (d_v, d_k) = (4, 10), got (10, 4): transpose your result")
    if got.shape != (4, 10):
        _fail(f"expected shape (d_v, d_k) = (4, 10), got {tuple(got.shape)}")
    if _close(got, memory.hebbian_store(K, V)):
        _fail("that is the Hebbian memory Vᵀ K: exact only for orthonormal keys; these keys are "
              "correlated. Use the pseudo-inverse: Vᵀ (Kᵀ)⁺")
    if not _close(memory.recall(got, K), V, tol=1e-6):
        _fail("recall W k_i should return v_i exactly for these 6 independent keys")
    _ok("least_squares_memory")


def covariance_edit(fn):
    """Exercise 2.3: fn(W, k_star, v_star, C) -> Ŵ = W + (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)."""
    from engramlib import memory
    K = memory.correlated_keys(6, 8, rho=0.6, seed=5)
    V = memory.random_keys(6, 5, seed=6)
    W = memory.least_squares_memory(K, V)
    C = memory.key_covariance(K) + 1e-3 * torch.eye(8, dtype=K.dtype)
    k_star, v_star = K[0], memory.random_keys(1, 5, seed=7)[0]
    W_copy = W.clone()
    got = _call(fn, W, k_star, v_star, C, shape_hint="the update must have W's shape (d_out, d_in): torch.outer(residual, u), residual first")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}")
    if not torch.equal(W, W_copy):
        _fail("your function changed W in place; return a new matrix")
    if got.shape != W.shape:
        _fail(f"expected shape {tuple(W.shape)} (d_out, d_in), got {tuple(got.shape)}: "
              "the update is torch.outer(residual, u), residual first")
    C_inv = torch.linalg.inv(C)
    if _close(got, memory.rank_one_edit(W, k_star, v_star, C)):
        _fail("you used C where C⁻¹ belongs: u = C⁻¹ k* (torch.linalg.inv(C) @ k_star)")
    if _close(got, memory.naive_edit(W, k_star, v_star)):
        _fail("that is the naive edit (C = I): use u = C⁻¹ k* so the other keys are spared")
    if not _close(got @ k_star, v_star, tol=1e-6):
        _fail("the constraint Ŵ k* = v* does not hold: divide the update by uᵀ k* "
              "(u = C⁻¹ k*), and use the residual v* − W k*")
    if not _close(got, memory.rank_one_edit(W, k_star, v_star, C_inv)):
        _fail("Ŵ k* = v* holds, but Ŵ differs from W + (v* − W k*) uᵀ / (uᵀ k*), u = C⁻¹ k*")
    _ok("covariance_edit")


# --- exercise 2.4: the edit, end to end ---------------------------------------------------------------

_REPORT_KEYS = ("C", "W", "W_hat", "efficacy", "damage")


def _damage(W, W_hat, K, i, relative=True, skip=True):
    before, after = K @ W.T, K @ W_hat.T
    change = (after - before).norm(dim=1)
    if relative:
        change = change / before.norm(dim=1)
    if skip:
        change = torch.cat([change[:i], change[i + 1:]])
    return change.mean().item()


def _number(x, name):
    if torch.is_tensor(x):
        if x.numel() != 1:
            _fail(f"report[{name!r}] should be one number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if not isinstance(x, (int, float)):
        _fail(f"report[{name!r}] should be a number, got {type(x).__name__}")
    return float(x)


def edit_report(fn):
    """Exercise 2.4: fn(K, V, i, v_star, method) -> {"C", "W", "W_hat", "efficacy", "damage"}: the
    least-squares memory of (K, V), memory i rewritten to v_star by the naive (method="naive") or the
    C⁻¹ edit (method="C", C = KᵀK/n), cos(Ŵ k_i, v*) and the mean relative change of the others."""
    from engramlib import memory as M
    K = M.correlated_keys(6, 10, rho=0.6, seed=1)        # 6 keys in 10 dimensions: C has rank 6
    V = M.random_keys(6, 4, seed=2) * torch.tensor([0.5, 1., 2., 3., 1.5, 0.7], dtype=K.dtype)[:, None]
    v_star, i = M.random_keys(1, 4, seed=7)[0], 2      # values of different lengths: relative ≠ absolute
    K_copy, V_copy = K.clone(), V.clone()
    W = M.least_squares_memory(K, V)
    C = K.T @ K / len(K)
    refs = {"naive": M.naive_edit(W, K[i], v_star), "C": M.rank_one_edit(W, K[i], v_star, torch.linalg.pinv(C))}
    for method in ("naive", "C"):
        try:
            got = _call(fn, K, V, i, v_star, method,
                        shape_hint="K is (n, d_k) = (6, 10), V is (n, d_v) = (6, 4); W and Ŵ are (d_v, d_k)")
        except AssertionError as err:
            text = str(err)
            if "scalar type" in text or "dtype" in text or "Double" in text or "Float" in text:
                _fail("two dtypes met in one product: torch.eye makes float32 by default, the keys are "
                      "float64. Create the identity with dtype=K.dtype (and device=K.device)")
            if "size mismatch" in text:
                _fail(f"{text}: a shape error. K is (n, d_k) = (6, 10), V is (n, d_v) = (6, 4), "
                      "the memory W and the edited Ŵ are (d_v, d_k) = (4, 10), C is (d_k, d_k)")
            if "singular" in text or "invertible" in text:
                _fail("C is singular here (6 keys in 10 dimensions: rank 6): use the pseudo-inverse "
                      "torch.linalg.pinv")
            raise
        if not (torch.equal(K, K_copy) and torch.equal(V, V_copy)):
            _fail("your function changed K or V in place; leave the inputs alone")
        if not isinstance(got, dict) or set(_REPORT_KEYS) - set(got):
            missing = sorted(set(_REPORT_KEYS) - set(got)) if isinstance(got, dict) else _REPORT_KEYS
            _fail(f"return a dict with the keys {', '.join(_REPORT_KEYS)} (missing: {', '.join(missing)})")
        # step 1: the memory
        W_got = got["W"]
        if not torch.is_tensor(W_got) or W_got.shape != (4, 10):
            shape = tuple(W_got.shape) if torch.is_tensor(W_got) else type(W_got).__name__
            _fail(f"report['W'] should be the memory, shape (d_v, d_k) = (4, 10), got {shape}")
        if _close(W_got, M.hebbian_store(K, V)):
            _fail("report['W'] is the Hebbian memory Vᵀ K; these keys are correlated: store them with the "
                  "least-squares memory (exercise 2.2, or M.least_squares_memory)")
        if not _close(W_got, W):
            _fail("report['W'] is not the least-squares memory of (K, V): Vᵀ (Kᵀ)⁺")
        # step 2: the key covariance
        C_got = got["C"]
        if not torch.is_tensor(C_got):
            _fail(f"report['C'] should be a tensor, got {type(C_got).__name__}")
        if C_got.shape == (6, 6):
            _fail("report['C'] has shape (n, n) = (6, 6): that is K Kᵀ, the keys' overlaps with each other. "
                  "C = Kᵀ K / n lives in key space, shape (d_k, d_k) = (10, 10)")
        if C_got.shape != (10, 10):
            _fail(f"report['C'] should have shape (d_k, d_k) = (10, 10), got {tuple(C_got.shape)}")
        centred = K - K.mean(0)
        if _close(C_got, centred.T @ centred / len(K)) or _close(C_got, torch.cov(K.T)):
            _fail("report['C'] is the centred covariance (you subtracted the mean key). ROME's C is the "
                  "uncentred second moment E[k kᵀ] = Kᵀ K / n: the mean direction is what the keys share, "
                  "and the edit must avoid it too")
        if _close(C_got, K.T @ K):
            _fail("report['C'] is Kᵀ K: divide by n to get the mean E[k kᵀ] (the edit itself would not "
                  "change, the scale cancels in u / uᵀk*, but C is defined as a mean)")
        if not _close(C_got, C):
            _fail("report['C'] differs from Kᵀ K / n")
        # step 3: the edit
        W_hat = got["W_hat"]
        if not torch.is_tensor(W_hat) or W_hat.shape != (4, 10):
            shape = tuple(W_hat.shape) if torch.is_tensor(W_hat) else type(W_hat).__name__
            _fail(f"report['W_hat'] should have W's shape (4, 10), got {shape}")
        if method == "naive" and _close(W_hat, refs["C"]):
            _fail("with method='naive' the direction is u = k* itself (C = I); you used C⁻¹")
        if method == "C":
            if _close(W_hat, refs["naive"]):
                _fail("with method='C' the direction is u = C⁻¹ k*; you made the naive edit (u = k*)")
            with torch.no_grad():
                inv = torch.linalg.inv(C)
            if _close(W_hat, M.rank_one_edit(W, K[i], v_star, inv), tol=1e-3) or \
                    (not _close(W_hat, refs["C"]) and _damage(W, W_hat, K, i) > 1e-3):
                _fail("the edit damages the other memories although you used C: C is singular here (6 keys "
                      "in 10 dimensions, rank 6), and torch.linalg.inv of a singular matrix returns huge, "
                      "meaningless numbers instead of an error. Use the pseudo-inverse torch.linalg.pinv")
        if not _close(W_hat @ K[i], v_star, tol=1e-6):
            _fail("Ŵ k_i ≠ v*: the edit must write the new value exactly (the residual v* − W k_i, "
                  "divided by uᵀ k_i)")
        if not _close(W_hat, refs[method]):
            _fail(f"report['W_hat'] writes v* but differs from the {method} edit "
                  "W + (v* − W k_i) uᵀ / (uᵀ k_i)")
        # step 4: the measurements
        efficacy = _number(got["efficacy"], "efficacy")
        if abs(efficacy - 1) > 1e-6:
            before = torch.nn.functional.cosine_similarity(W @ K[i], v_star, dim=0).item()
            if abs(efficacy - before) < 1e-6:
                _fail("report['efficacy'] is the cosine BEFORE the edit (W k_i); measure it with Ŵ")
            _fail(f"report['efficacy'] should be cos(Ŵ k_i, v*) = 1 (the edit writes v* exactly), got {efficacy:.4f}")
        damage = _number(got["damage"], "damage")
        ref = _damage(W, W_hat, K, i)
        if method == "naive" and abs(damage - ref) > 1e-6:
            if abs(damage - _damage(W, W_hat, K, i, skip=False)) < 1e-6:
                _fail("report['damage'] includes memory i itself, which the edit was meant to change: "
                      "average over the OTHER memories (j ≠ i)")
            if abs(damage - _damage(W, W_hat, K, i, relative=False)) < 1e-6:
                _fail("report['damage'] is the absolute change ‖Ŵ k_j − W k_j‖: divide by ‖W k_j‖ "
                      "so that memories of different sizes count alike")
            _fail(f"report['damage'] should be the mean over j ≠ i of ‖Ŵ k_j − W k_j‖ / ‖W k_j‖ = "
                  f"{ref:.4f}, got {damage:.4f}")
        if method == "C" and damage > 1e-6:
            _fail(f"report['damage'] is {damage:.2e} for the C⁻¹ edit, whose Ŵ spares the other keys exactly: "
                  "measure ‖Ŵ k_j − W k_j‖ / ‖W k_j‖ for j ≠ i")
    _ok("edit_report")


# --- exercise 2.5: find the bug in a colleague's experiment -----------------------------------------

BUG_CHOICES = {"a": "torch.linalg.pinv should be torch.linalg.inv",
               "b": "C is built from the values, not from the keys",
               "c": "the damage must include the edited memory i",
               "d": "C must be centred (the mean key subtracted)"}


def find_the_bug(bug, fixed):
    """Exercise 2.5: bug -> the letter of BUG_CHOICES that explains the colleague's result; fixed(K, V, i,
    v_star) -> {method: (efficacy, damage)}, the colleague's experiment with that one thing corrected."""
    from engramlib import memory as M
    bug = _letter(bug, BUG_CHOICES)
    if bug == "a":
        _fail("pinv is right here: C of 10 keys in 64 dimensions has rank 10 and no inverse. inv would "
              "return huge numbers and make the damage worse, not better (exercise 2.4's hint 3)")
    if bug == "c":
        _fail("leaving out memory i is right: its change is the edit we asked for. The damage the colleague "
              "reports is to the OTHER memories, and that is the number that is too large")
    if bug == "d":
        _fail("ROME's C is the uncentred second moment E[k kᵀ] (exercise 2.4); centring it removes the "
              "direction the correlated keys share, the one the edit most needs to avoid")
    K = M.correlated_keys(10, 64, rho=0.8, seed=11)
    V = M.random_keys(10, 64, seed=12)
    v_star = M.random_keys(1, 64, seed=13)[0]
    got = _call(fixed, K, V, 0, v_star, shape_hint="K and V are (10, 64), v_star is (64,)")
    if not isinstance(got, dict) or set(got) != {"C", "naive"}:
        _fail('return the same dict as the colleague\'s function: {"C": (efficacy, damage), "naive": (...)}')
    (eff_c, dmg_c), (eff_n, dmg_n) = got["C"], got["naive"]
    if abs(eff_c - 1) > 1e-6 or abs(eff_n - 1) > 1e-6:
        _fail(f"after your fix an edit no longer writes v* (efficacy {eff_c:.3f} and {eff_n:.3f}): change "
              "only the line with the bug")
    if dmg_c > 1e-6:
        _fail(f"your fixed experiment still finds damage {dmg_c:.3f} with the C⁻¹ edit (naive {dmg_n:.3f}): C must "
              "describe the directions that the stored KEYS use, since the edit is read through W k")
    if dmg_n < 0.1:
        _fail("the naive edit should still damage the correlated memories: change only the line with the bug")
    print(f"✓ find_the_bug passed: with C from the keys the C⁻¹ edit's damage is {dmg_c:.1e}, the naive "
          f"edit's {dmg_n:.2f}")


# --- the predictions' answers (ties and boundary values count for both neighbouring choices) -------

def answer_2_1(others_after_mean, change):
    """Predict 2.1's right choice(s): d if the other memories fell below a cosine of 0.5, b if nothing
    changed, else c (better on average) or a (worse); a mean change of exactly 0 is a tie of a and c."""
    if others_after_mean < 0.5:
        return {"d"}
    if float(change.abs().max()) < 1e-9:
        return {"b"}
    return choice_between(float(change.mean()), (0.0,), "ac")


def answer_2_2(naive_damage, c_damage):
    """Predict 2.2's right choice(s) from the damage at the highest correlation."""
    return choice_between(c_damage, (1e-6, 0.5 * naive_damage), "cba")


def answer_2_3(sampled_damage, naive_damage):
    """Predict 2.3's right choice(s): zero, less than a third of the naive edit's, or more."""
    return choice_between(sampled_damage, (1e-6, naive_damage / 3), "abc")
