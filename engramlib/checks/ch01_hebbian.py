"""Checks for chapter 01: Hebbian memory."""
from __future__ import annotations

import torch

from engramlib.checks._common import _call, _close, _fail, _ok, _update_rule, choice_between


def hebbian_update(fn):
    """Exercise 1.1: fn(W, k, v, lr) -> W + lr · v kᵀ."""
    _update_rule(fn, "hebbian_update", +1.0)
    _ok("hebbian_update")


def _cleanup_cases():
    """(v_hat, V, right index, index by raw dot product, index by Euclidean distance)."""
    f = lambda rows: torch.tensor(rows, dtype=torch.float64)
    return [
        # a long row wins the raw dot product; the right one is closest in angle (and in distance)
        (f([0.5, 0.9]), f([[10., 0.], [0.6, 0.8], [-1., 0.]]), 1, 0, 1),
        # v_hat is short: the nearest row in distance is a short one pointing elsewhere
        (f([0.3, 0.05]), f([[0., 0.3], [-1., 0.], [5., 0.]]), 2, 2, 0),
        # the answer is row 0 here (a function that ignores its inputs cannot pass all three)
        (f([-0.2, -1.0]), f([[-0.3, -0.8], [0., 0.3], [1., 1.]]), 0, 0, 0),
    ]


def cleanup_recall(fn):
    """Exercise 1.2: fn(v_hat, V) -> index of the row of V most similar (cosine) to v_hat."""
    answers = []
    for v_hat, V, _, _, _ in _cleanup_cases():
        got = _call(fn, v_hat, V, shape_hint="v_hat is (d_v,), V is (m, d_v)")
        if torch.is_tensor(got) and got.numel() > 1:
            _fail("return the index of the best row (an int), not a vector")
        if got is None:
            _fail("your function returned None: did you forget to return the index?")
        answers.append(int(got))
    right = [case[2] for case in _cleanup_cases()]
    if len(set(answers)) == 1:
        _fail(f"your function returned {answers[0]} for three different inputs (the right answers are "
              f"{right}): compute the similarity of v_hat to every row of V and return the best index")
    for got, (v_hat, V, ok, by_dot, by_distance) in zip(answers, _cleanup_cases()):
        if got == ok:
            continue
        cosines = torch.nn.functional.cosine_similarity(V, v_hat[None], dim=1)
        if got == by_dot:
            _fail(f"you picked row {got}, the one with the largest raw dot product (a long vector wins "
                  "for being long): compare cosine similarity (normalise both sides)")
        if got == by_distance:
            _fail(f"you picked row {got}, the nearest in Euclidean distance: v_hat = {v_hat.tolist()} is "
                  "short, so a short row pointing elsewhere is nearer than a long row pointing the same "
                  "way. Recall is judged by direction: use cosine similarity")
        if got == int(cosines.argmin()):
            _fail(f"you picked row {got}, the least similar row: use argmax of the similarity, not argmin")
        _fail(f"for v_hat = {v_hat.tolist()} expected row {ok}, got {got}")
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


# --- exercise 1.4: the capacity experiment ----------------------------------------------------------

def _trial_accuracy(d, n, seed, variant="right"):
    """One trial of the capacity experiment, the right way or with a typical mistake."""
    from engramlib import memory as M
    K, V = M.random_keys(n, d, seed=seed), M.random_keys(n, d, seed=seed + 1)
    W = M.hebbian_store(K, V) if variant != "transposed" else K.T @ V
    candidates = K if variant == "keys" else V
    return (M.cleanup(M.recall(W, K), candidates) == torch.arange(n)).double().mean().item()


def cleanup_accuracy(fn):
    """Exercise 1.4 (step 1): fn(d, n, trials, seed) -> mean over trials of the fraction of n random
    pairs recalled right after cleanup; trial t uses key seed seed + 1000 t, value seed + 1 more."""
    d, n, trials, seed = 16, 24, 3, 5
    seeds = [seed + 1000 * t for t in range(trials)]
    per_trial = [_trial_accuracy(d, n, s) for s in seeds]
    ref = sum(per_trial) / trials
    got = _call(fn, d, n, trials, seed, shape_hint=f"keys and values are (n, d) = ({n}, {d}); W is (d_v, d_k)")
    if torch.is_tensor(got):
        if got.numel() != 1:
            _fail(f"return one number (the mean accuracy), not a tensor of shape {tuple(got.shape)}")
        got = got.item()
    if not isinstance(got, (int, float)):
        _fail(f"return the accuracy as a number, got {type(got).__name__}")
    got = float(got)
    near = lambda x: abs(got - x) < 1e-9
    if got > 1 + 1e-9:
        _fail(f"got {got:g}, more than 1: divide the number of memories recalled right by n "
              "(and average over the trials) to get a fraction")
    if near(ref):
        _ok("cleanup_accuracy")
        return
    if near(per_trial[0]):
        _fail("that is the accuracy of the first trial only: average over all trials, each with its own "
              "keys and values (seed + 1000 t)")
    if near(sum(_trial_accuracy(d, n, s, "transposed") for s in seeds) / trials):
        _fail("you stored Kᵀ V, the transpose of the memory: W = Σ v_i k_iᵀ = Vᵀ K has shape "
              "(d_v, d_k), so that W k returns a value")
    if near(sum(_trial_accuracy(d, n, s, "keys") for s in seeds) / trials):
        _fail("you cleaned up among the keys: the recall W k_i is compared with the stored VALUES")
    _fail(f"expected {ref:.4f} (mean over {trials} trials of {per_trial}), got {got:.4f}: use the seeds "
          "of the task so your numbers can be compared with the library's")


class _Runaway(Exception):
    pass


def _counted(accuracy, limit=2000):
    calls = []

    def wrapped(n):
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if not isinstance(n, int):
            raise TypeError(f"the number of memories must be an int, got {n!r} (use // to halve)")
        if n < 1:
            raise ValueError(f"accuracy({n}) asked for: the number of memories starts at n = 1")
        calls.append(n)
        if len(calls) > limit:
            raise _Runaway(f"accuracy was called {limit:,} times and your search had not stopped: make "
                           "sure lo and hi get closer at every step")
        return accuracy(n)
    return wrapped, calls


def find_n_star(fn):
    """Exercise 1.4 (step 2): fn(accuracy, threshold) -> the smallest n with accuracy(n) < threshold,
    found by doubling then bisection (accuracy falls with n)."""
    def run(accuracy, threshold=0.9, limit=2000):
        wrapped, calls = _counted(accuracy, limit)
        got = _call(fn, wrapped, threshold)
        if torch.is_tensor(got) and got.numel() == 1:
            got = got.item()
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if not isinstance(got, int):
            _fail(f"return n* as an int, got {got!r}")
        return got, calls

    step = lambda n: 1.0 if n < 37 else 0.5
    got, _ = run(step)
    if got == 36:
        _fail("off by one: you returned 36, the LAST n that still recalls ≥ 90 %; n* is the FIRST n "
              "whose accuracy falls below the threshold (37 here)")
    if got == 38:
        _fail("off by one: you returned 38, but accuracy(37) is already below the threshold")
    if got != 37:
        _fail(f"accuracy(n) is 1.0 for n < 37 and 0.5 from 37 on: n* = 37, you returned {got}")

    plateau = lambda n: 1.0 if n < 30 else 0.9 if n < 37 else 0.5
    got, _ = run(plateau)
    if got == 30:
        _fail("you returned 30, where the accuracy is exactly 0.9: that is not BELOW 0.9 (use <, not ≤)")
    if got != 37:
        _fail(f"accuracy(n) is 1.0 below 30, exactly 0.9 on 30-36 and 0.5 from 37 on: n* = 37, got {got}")

    smooth = lambda n: 1 / (1 + n / 100)          # falls below 0.5 from n = 101 on
    got, _ = run(smooth, threshold=0.5)
    if got == 12:
        _fail("you compared with 0.9 whatever the threshold argument says: use `threshold`")
    if got != 101:
        _fail(f"with accuracy(n) = 1 / (1 + n/100) and threshold 0.5, n* = 101; you returned {got}")

    far = lambda n: 1.0 if n < 5000 else 0.0
    got, calls = run(far, limit=20000)
    if got != 5000:
        _fail(f"n* = 5000 here, you returned {got}: n* can lie beyond any fixed upper bound; keep "
              "doubling n until the accuracy falls below the threshold, then bisect")
    if len(calls) > 40:
        _fail(f"right answer, but accuracy was called {len(calls):,} times; each call stores and recalls n "
              "memories. Doubling then bisecting needs about 2·log2(n*) ≈ 25 calls")

    got, _ = run(lambda n: 0.5)
    if got != 1:
        _fail(f"when even one memory is recalled below the threshold, n* = 1; you returned {got}")
    _ok("find_n_star")


# --- exercise 1.5: a decision from the measured capacity -------------------------------------------

DIMENSION_CHOICES = (64, 128, 256, 512, 1024, 2048)


def choose_dimension(d, n=2000, trials=2):
    """Exercise 1.5: d -> the smallest d among DIMENSION_CHOICES that recalls ≥ 90 % of n = 2,000 random
    pairs after cleanup. The check measures the accuracy at the next smaller choice (it must fail),
    then at d (it must pass)."""
    from engramlib import memory as M
    if isinstance(d, float) and d.is_integer():
        d = int(d)
    if d not in DIMENSION_CHOICES:
        _fail(f"choose one of {DIMENSION_CHOICES}, got {d!r}")
    smaller = DIMENSION_CHOICES[DIMENSION_CHOICES.index(d) - 1] if d != DIMENSION_CHOICES[0] else None
    acc_smaller = M.capacity_curve(smaller, [n], trials=trials)[0] if smaller else 0.0
    if acc_smaller >= 0.9:                  # then d works too (capacity grows with d): d is not the smallest
        if d >= n:
            _fail(f"d = {d} works, but so does d = {smaller} ({acc_smaller:.0%}): you asked for about as many "
                  "dimensions as memories, the rule for a CLEAN raw recall. Cleanup only needs the right value "
                  "to beat the best wrong one (Predict 1.1: more memories than dimensions still came back)")
        _fail(f"d = {d} works, but so does d = {smaller} ({acc_smaller:.0%}): did you extrapolate n* in "
              "proportion to d (a fixed number of memories per dimension)? The measured n* grows faster: "
              "look at how much it grew from one doubling of d to the next")
    acc = M.capacity_curve(d, [n], trials=trials)[0]
    if acc < 0.9:
        _fail(f"at d = {d} only {acc:.0%} of the {n:,} memories come back after cleanup: n*(d) is below "
              f"{n:,}. Read the n* you measured above and follow its growth past the last dimension")
    print(f"✓ choose_dimension passed: d = {d} recalls {acc:.1%} of {n:,} memories, d = {smaller} only "
          f"{acc_smaller:.1%}")


# --- the predictions' answers (ties and boundary values count for both neighbouring choices) -------

def answer_1_1(accuracy):
    """Predict 1.1's right choice(s) from the accuracy after cleanup of 100 memories in d = 64."""
    return choice_between(accuracy, (0.25, 0.75, 0.99), "abcd")


def answer_1_2(ratio):
    """Predict 1.2's right choice(s) from n*(128) / n*(64)."""
    return choice_between(ratio, (1.3, 2.5), "abc")
