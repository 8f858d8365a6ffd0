"""Instant checks for the exercises: `checks.<exercise>(your_function)`.

A check runs your function on small cases, compares it with the reference, and explains the most
likely mistake when it differs. On success it prints one line starting with ✓.
"""
from __future__ import annotations

import torch


def _fail(message: str):
    raise AssertionError(message)


def _ok(name: str):
    print(f"✓ {name} passed")


def _call(fn, *args, shape_hint: str = "", **kwargs):
    """Run the student's function; turn a shape error into a diagnosis (NotImplementedError passes)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except RuntimeError as err:
        if "size of tensor" in str(err) or "shape" in str(err) or "mat1 and mat2" in str(err):
            _fail(f"your function raised a shape error ({err}). {shape_hint}")
        raise


# --- chapter 00 ---------------------------------------------------------------------------------

def most_likely_next(fn, mt=None):
    """Exercise 0.1: fn(mt, prompt) -> the model's most likely next token, as text (e.g. ' Paris')."""
    from engramlib.models import load_model, next_token_probs
    mt = mt or load_model("tinyworld", device="cpu")
    for prompt in ("The capital of France is", "Lionel Messi professionally plays the sport of"):
        expected = mt.tokenizer.decode([int(next_token_probs(mt, [prompt])[0].argmax())])
        got = fn(mt, prompt)
        if isinstance(got, (int, torch.Tensor)):
            _fail(f"got a token id ({got!r}); turn it into text with mt.tokenizer.decode([token_id])")
        if isinstance(got, (list, tuple)):
            _fail("got a list: return one string, the single most likely token")
        if not isinstance(got, str):
            _fail(f"expected a string, got {type(got).__name__}")
        if got.strip() == expected.strip() and got != expected:
            _fail(f"got {got!r}, expected {expected!r}: keep the leading space, it is part of "
                  "GPT-2's token (no .strip())")
        if got != expected:
            _fail(f"for {prompt!r} got {got!r}, expected {expected!r}: take the argmax over the "
                  "vocabulary of the probabilities at the LAST position")
    _ok("most_likely_next")


# --- chapter 01: Hebbian memory ---------------------------------------------------------------

def _close(a, b, tol=1e-6) -> bool:
    return torch.is_tensor(a) and a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol)


def _update_rule(fn, name: str, sign: float):
    """Shared diagnosis for W ± lr · v kᵀ exercises (Hebbian: sign=+1, anti-Hebbian: sign=-1)."""
    W = torch.tensor([[1., 0.], [0., 1.], [2., 3.]], dtype=torch.float64)
    W_copy = W.clone()
    k = torch.tensor([1., 2.], dtype=torch.float64)
    v = torch.tensor([0., 2., -1.], dtype=torch.float64)
    got = _call(fn, W, k, v, lr=0.5, shape_hint="v kᵀ must have W's shape (d_v, d_k): use torch.outer(v, k), not torch.outer(k, v) (you computed k vᵀ)")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}: did you forget to return?")
    if not torch.equal(W, W_copy):
        _fail("your function changed W in place; return a new tensor (W + ..., not W += ...)")
    if got.shape == (2, 3):
        _fail("expected shape (3, 2) = (d_v, d_k), got (2, 3): you computed k vᵀ; use torch.outer(v, k)")
    if got.shape != (3, 2):
        _fail(f"expected shape (3, 2) = (d_v, d_k), got {tuple(got.shape)}")
    ref = W + sign * 0.5 * torch.outer(v, k)
    if _close(got, ref):
        return
    if _close(got, W + sign * torch.outer(v, k)):
        _fail("the learning rate is missing: multiply the outer product by lr")
    if _close(got, W - sign * 0.5 * torch.outer(v, k)):
        _fail("wrong sign: " + ("Hebbian learning adds lr · v kᵀ" if sign > 0 else
                                "anti-Hebbian forgetting subtracts lr · v kᵀ"))
    if _close(got, sign * 0.5 * torch.outer(v, k)):
        _fail("you returned only the change; add it to W")
    _fail(f"{name}: values differ from W {'+' if sign > 0 else '−'} lr · v kᵀ")


def hebbian_update(fn):
    """Exercise 1.1: fn(W, k, v, lr) -> W + lr · v kᵀ."""
    _update_rule(fn, "hebbian_update", +1.0)
    _ok("hebbian_update")


def cleanup_recall(fn):
    """Exercise 1.2: fn(v_hat, V) -> index of the row of V most similar (cosine) to v_hat."""
    V = torch.tensor([[10., 0.], [0.6, 0.8], [-1., 0.]], dtype=torch.float64)
    v_hat = torch.tensor([0.5, 0.9], dtype=torch.float64)       # closest in angle to row 1
    got = _call(fn, v_hat, V, shape_hint="v_hat is (d_v,), V is (m, d_v)")
    if torch.is_tensor(got) and got.numel() > 1:
        _fail("return the index of the best row (an int), not a vector")
    got = int(got)
    if got == 0:
        _fail("you picked row 0, the longest vector: compare cosine similarity (normalise both "
              "sides), not the raw dot product")
    if got == 2:
        _fail("you picked the least similar row: use argmax of the similarity, not argmin")
    if got != 1:
        _fail(f"expected index 1, got {got}")
    _ok("cleanup_recall")


def crosstalk(fn):
    """Exercise 1.3: fn(K, V, i) -> Σ_{j≠i} (k_j · k_i) v_j, shape (d_v,)."""
    from engramlib import memory
    K, V = memory.random_keys(5, 8, seed=3), memory.random_keys(5, 4, seed=4)
    got = _call(fn, K, V, 2, shape_hint="K is (n, d_k), V is (n, d_v); the overlaps K @ K[i] are (n,)")
    ref = memory.crosstalk(K, V, 2)
    if torch.is_tensor(got) and got.numel() == 1:
        _fail("return the crosstalk vector (d_v,), not its norm")
    if not torch.is_tensor(got) or got.shape != (4,):
        _fail(f"expected a tensor of shape (d_v,) = (4,), got {getattr(got, 'shape', type(got))}")
    if _close(got, ref + V[2] * (K[2] @ K[2])):
        _fail("you included memory i itself: crosstalk is what the OTHER memories add (j ≠ i)")
    if _close(got, memory.recall(memory.hebbian_store(K, V), K[2])):
        _fail("that is the whole recall W k_i; subtract memory i's own contribution")
    if not _close(got, ref):
        _fail("values differ from Σ_{j≠i} (k_j · k_i) v_j")
    _ok("crosstalk")


# --- chapter 02: anti-Hebbian editing ---------------------------------------------------------

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
