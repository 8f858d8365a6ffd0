"""Toy associative memories (chapters 01-02): one matrix W stores key -> value pairs.

Shapes: a key k is (d_k,), a value v is (d_v,), the memory W is (d_v, d_k), and recall is W k.
Many keys at once are the rows of K (n, d_k); their values the rows of V (n, d_v).

Formation    hebbian_store / hebbian_update     W += lr · v kᵀ  ("fire together, wire together")
Retrieval    recall, cleanup                     v̂ = W k, then the nearest stored value
Capacity     capacity_curve, capacity_n_star     recall quality against the number of memories n
Forgetting   anti_hebbian_forget                 W -= lr · v kᵀ
Modification naive_edit, rank_one_edit           W + (v* − W k*) uᵀ / (uᵀ k*),  u = k* or C⁻¹ k*

`rank_one_edit` with C = E[k kᵀ] is ROME's update (Meng et al. 2022, eq. 2); chapter 07 applies
this same function to a GPT-2 MLP.
"""
from __future__ import annotations

import torch

DTYPE = torch.float64   # toy memories are tiny: use double precision so exact claims are exact


# --- keys and values --------------------------------------------------------------------------

def random_keys(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n random unit vectors in d dimensions: (n, d). In high dimension they are nearly orthogonal."""
    gen = torch.Generator().manual_seed(seed)
    K = torch.randn(n, d, generator=gen, dtype=DTYPE)
    return K / K.norm(dim=1, keepdim=True)


def orthonormal_keys(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n orthonormal vectors in d >= n dimensions: (n, d)."""
    if n > d:
        raise ValueError(f"cannot have {n} orthonormal keys in {d} dimensions (need n <= d)")
    Q, _ = torch.linalg.qr(random_keys(d, d, seed).T)
    return Q.T[:n].contiguous()


def correlated_keys(n: int, d: int, rho: float, seed: int = 0,
                    common_seed: int | None = None) -> torch.Tensor:
    """n unit keys whose pairwise cosine similarity is about `rho` (0 <= rho < 1): (n, d).

    Every key shares one common direction c: k_i ∝ sqrt(rho)·c + sqrt(1 − rho)·z_i.
    c is drawn with `common_seed` (default seed + 1): equal common seeds give keys from one
    distribution, different `seed`s give different keys from it."""
    if not 0 <= rho < 1:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    common = random_keys(1, d, seed + 1 if common_seed is None else common_seed)[0]
    K = rho ** 0.5 * common + (1 - rho) ** 0.5 * random_keys(n, d, seed)
    return K / K.norm(dim=1, keepdim=True)


# --- formation and retrieval ------------------------------------------------------------------

def hebbian_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: float = 1.0) -> torch.Tensor:
    """Return W + lr · v kᵀ (a new tensor; W is not changed).  W: (d_v, d_k), k: (d_k,), v: (d_v,)."""
    return W + lr * torch.outer(v, k)


def hebbian_store(K: torch.Tensor, V: torch.Tensor, lr: float = 1.0) -> torch.Tensor:
    """Store all pairs at once: W = lr · Σ_i v_i k_iᵀ = lr · Vᵀ K.  K: (n, d_k), V: (n, d_v) -> (d_v, d_k)."""
    if K.shape[0] != V.shape[0]:
        raise ValueError(f"{K.shape[0]} keys but {V.shape[0]} values")
    return lr * V.T @ K


def recall(W: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """What the memory returns for key(s) k: W k.  k: (d_k,) -> (d_v,), or K: (n, d_k) -> (n, d_v)."""
    return k @ W.T


def cleanup(v_hat: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Index of the stored value most similar (cosine) to each recalled vector.

    v_hat: (d_v,) -> () or (n, d_v) -> (n,);  V: (m, d_v) the candidate values."""
    sims = torch.nn.functional.normalize(v_hat, dim=-1) @ torch.nn.functional.normalize(V, dim=-1).T
    return sims.argmax(-1)


def recall_accuracy(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> float:
    """Fraction of keys whose recall, cleaned up among the rows of V, is their own value."""
    return (cleanup(recall(W, K), V) == torch.arange(len(K))).double().mean().item()


def crosstalk(K: torch.Tensor, V: torch.Tensor, i: int) -> torch.Tensor:
    """The part of Hebbian recall of key i that comes from the *other* memories: (d_v,).

    recall(hebbian_store(K, V), k_i) = (k_i·k_i) v_i + Σ_{j≠i} (k_j·k_i) v_j; this is the sum."""
    overlaps = K @ K[i]                 # (n,): k_j · k_i
    overlaps[i] = 0.0
    return overlaps @ V


def partial_cue(k: torch.Tensor, keep: float, seed: int = 0) -> torch.Tensor:
    """k with all but a fraction `keep` of its coordinates set to zero (a partial cue): (d_k,)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(k.shape[-1], generator=gen) < keep
    return k * mask.to(k.dtype)


def noisy_cue(k: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    """k plus Gaussian noise whose norm is about `noise` × ‖k‖: (d_k,)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(k.shape, generator=gen, dtype=k.dtype)
    return k + noise * k.norm() * z / z.norm()


def recall_cosine(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> float:
    """Mean cosine similarity between the raw recall W k_i and the stored value v_i (1 = perfect)."""
    return torch.nn.functional.cosine_similarity(recall(W, K), V, dim=-1).mean().item()


def capacity_curve(d: int, n_values, trials: int = 5, noise: float = 0.0, seed: int = 0,
                   measure: str = "cleanup") -> list:
    """Hebbian recall quality for each number of memories n in `n_values` (mean over trials),
    with random unit keys and values in d dimensions and cues with relative noise `noise`.

    measure="cleanup": fraction recalled correctly after cleanup among the n stored values.
    measure="cosine": mean cosine(W k_i, v_i) of the raw recall; about 1/sqrt(1 + (n-1)/d),
    a function of the load n/d alone."""
    if measure not in ("cleanup", "cosine"):
        raise ValueError(f"measure must be 'cleanup' or 'cosine', got {measure!r}")
    out = []
    for n in n_values:
        scores = []
        for t in range(trials):
            K = random_keys(n, d, seed=seed + 1000 * t)
            V = random_keys(n, d, seed=seed + 1000 * t + 1)
            cues = K if noise == 0 else torch.stack([noisy_cue(k, noise, seed + j) for j, k in enumerate(K)])
            W = hebbian_store(K, V)
            if measure == "cosine":
                scores.append(recall_cosine(W, cues, V))
            else:
                scores.append((cleanup(recall(W, cues), V) == torch.arange(n)).double().mean().item())
        out.append(sum(scores) / trials)
    return out


def first_below(accuracy, threshold: float = 0.9, start: int = 1) -> int:
    """The smallest n >= start with accuracy(n) < threshold, for an accuracy that falls with n.

    Doubles n until the accuracy falls below `threshold`, then bisects: about 2·log2(n*) calls of
    `accuracy` instead of n*. Invariant of the bisection: accuracy(lo) >= threshold > accuracy(hi).
    With a noisy accuracy it returns a crossing (accuracy(n*) < threshold <= accuracy(n* - 1))."""
    if accuracy(start) < threshold:
        return start
    lo, hi = start, 2 * start
    while accuracy(hi) >= threshold:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if accuracy(mid) < threshold:
            hi = mid
        else:
            lo = mid
    return hi


def capacity_n_star(d: int, threshold: float = 0.9, trials: int = 3, seed: int = 0,
                    noise: float = 0.0) -> int:
    """n*: the smallest number of memories at which Hebbian recall after cleanup (the mean of
    `capacity_curve(..., measure="cleanup")` over `trials`) falls below `threshold`, in d dimensions."""
    return first_below(lambda n: capacity_curve(d, [n], trials=trials, noise=noise, seed=seed)[0],
                       threshold)


# --- forgetting and modification --------------------------------------------------------------

def anti_hebbian_forget(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: float = 1.0) -> torch.Tensor:
    """Return W − lr · v kᵀ: the Hebbian update run backwards.  W: (d_v, d_k), k: (d_k,), v: (d_v,)."""
    return W - lr * torch.outer(v, k)


def least_squares_memory(K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The best linear memory: W minimising Σ_i ‖W k_i − v_i‖², i.e. W = Vᵀ (Kᵀ)⁺.

    K: (n, d_k), V: (n, d_v) -> (d_v, d_k). Exact recall when the keys are linearly independent."""
    return V.T @ torch.linalg.pinv(K.T)


def key_covariance(K: torch.Tensor) -> torch.Tensor:
    """C = E[k kᵀ] = Kᵀ K / n, the (uncentred) key covariance: (d_k, d_k)."""
    return K.T @ K / K.shape[0]


def rank_one_edit(W: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor,
                  C_inv: torch.Tensor) -> torch.Tensor:
    """Return Ŵ with Ŵ k* = v*, changing W as little as possible under C (Meng et al. 2022, eq. 2).

    W: (d_out, d_in)   k_star: (d_in,)   v_star: (d_out,)   C_inv: (d_in, d_in)
    """
    u = C_inv @ k_star                      # direction in key space that spares other keys
    residual = v_star - W @ k_star          # what the memory gets wrong today
    return W + torch.outer(residual, u) / (u @ k_star)


def naive_edit(W: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """The rank-one edit with C = I: forget what k* recalls, write v* (anti-Hebbian + Hebbian).

    For a unit key this is W + v* k*ᵀ − (W k*) k*ᵀ. Shapes as in `rank_one_edit`."""
    return rank_one_edit(W, k_star, v_star, torch.eye(k_star.shape[0], dtype=W.dtype))


def interference(W_before: torch.Tensor, W_after: torch.Tensor, K: torch.Tensor,
                 skip: int | None = None) -> float:
    """Mean ‖W_after k − W_before k‖ / ‖W_before k‖ over the keys in K (except index `skip`):
    how much an edit disturbed the other memories (0 = untouched)."""
    before, after = recall(W_before, K), recall(W_after, K)
    change = (after - before).norm(dim=1) / before.norm(dim=1).clamp(min=1e-12)
    if skip is not None:
        change = torch.cat([change[:skip], change[skip + 1:]])
    return change.mean().item()
