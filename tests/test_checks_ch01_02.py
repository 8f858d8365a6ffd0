"""Checks of chapters 01-02 (Hebbian and anti-Hebbian memories): each accepts the reference and diagnoses typical mistakes with a specific message."""
import pytest
import torch

from engramlib import checks, memory as M
from engramlib.checks import ch01_hebbian as C1, ch02_anti_hebbian as C2


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
    expect(checks.cleanup_recall, lambda v_hat, V: (V @ v_hat).argmax(), "raw dot product")
    expect(checks.cleanup_recall,
           lambda v_hat, V: torch.nn.functional.cosine_similarity(V, v_hat[None]).argmin(), "argmax")
    expect(checks.cleanup_recall, lambda v_hat, V: V[1], "index")
    expect(checks.cleanup_recall, lambda v_hat, V: 1, "three different inputs")          # a constant
    expect(checks.cleanup_recall, lambda v_hat, V: (V - v_hat).norm(dim=1).argmin(), "Euclidean")
    expect(checks.cleanup_recall, lambda v_hat, V: None, "return")


def test_crosstalk(capsys):
    checks.crosstalk(M.crosstalk)
    assert "✓" in capsys.readouterr().out
    expect(checks.crosstalk, lambda K, V, i: (K @ K[i]) @ V, "itself")
    expect(checks.crosstalk, lambda K, V, i: M.crosstalk(K, V, i).norm(), "norm")


def _accuracy(d, n, trials, seed=0, keys_seed=lambda s, t: s + 1000 * t, store=M.hebbian_store,
              candidates="V", divide=True):
    accs = []
    for t in range(trials):
        K = M.random_keys(n, d, seed=keys_seed(seed, t))
        V = M.random_keys(n, d, seed=keys_seed(seed, t) + 1)
        hits = (M.cleanup(M.recall(store(K, V), K), V if candidates == "V" else K) == torch.arange(n)).sum().item()
        accs.append(hits / n if divide else hits)
    return sum(accs) / trials


def test_cleanup_accuracy(capsys):
    C1.cleanup_accuracy(_accuracy)
    C1.cleanup_accuracy(lambda d, n, trials, seed=0: M.capacity_curve(d, [n], trials=trials, seed=seed)[0])
    assert capsys.readouterr().out.count("✓") == 2
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: _accuracy(d, n, trials, seed, divide=False), "more than 1")
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: _accuracy(d, n, trials, seed, keys_seed=lambda s, t: s),
           "first trial only")
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: _accuracy(d, n, trials, seed, store=lambda K, V: K.T @ V),
           "transpose")
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: _accuracy(d, n, trials, seed, candidates="K"),
           "among the keys")
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: _accuracy(d, n, trials, seed + 1), "seeds")
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: torch.tensor([0.5, 0.5]), "one number")
    expect(C1.cleanup_accuracy, lambda d, n, trials, seed=0: "high", "as a number")


def _bisect(accuracy, threshold=0.9, strict=True, answer="first below", cap=None, fixed=None):
    """The reference search, or a typical mistake in it."""
    threshold = fixed if fixed is not None else threshold
    below = (lambda a: a < threshold) if strict else (lambda a: a <= threshold)
    if below(accuracy(1)):
        return 1
    lo, hi = 1, 2
    while not below(accuracy(hi)) and (cap is None or hi < cap):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if below(accuracy(mid)):
            hi = mid
        else:
            lo = mid
    return hi if answer == "first below" else lo


def test_find_n_star(capsys):
    C1.find_n_star(_bisect)
    C1.find_n_star(lambda accuracy, threshold=0.9: M.first_below(accuracy, threshold))
    assert capsys.readouterr().out.count("✓") == 2
    expect(C1.find_n_star, lambda a, t=0.9: _bisect(a, t, answer="last above"), "off by one")
    expect(C1.find_n_star, lambda a, t=0.9: _bisect(a, t, strict=False), "not BELOW")
    expect(C1.find_n_star, lambda a, t=0.9: _bisect(a, t, fixed=0.9), "threshold argument")
    expect(C1.find_n_star, lambda a, t=0.9: _bisect(a, t, cap=1024), "upper bound")
    linear = lambda a, t=0.9: next(n for n in range(1, 10 ** 6) if a(n) < t)
    expect(C1.find_n_star, linear, "called")
    expect(C1.find_n_star, lambda a, t=0.9: max(2, _bisect(a, t)), "even one memory")

    def endless(a, t=0.9):
        lo, hi = 1, 2
        while True:
            a((lo + hi) // 2)
    expect(C1.find_n_star, endless, "had not stopped")
    expect(C1.find_n_star, lambda a, t=0.9: a(0), "starts at n = 1")
    expect(C1.find_n_star, lambda a, t=0.9: float(_bisect(a, t)) + 0.5, "as an int")
    expect(C1.find_n_star, lambda a, t=0.9: _bisect(a, t) + 1, "already below")
    expect(C1.find_n_star, lambda a, t=0.9: a(1.5), "use // to halve")
    expect(C1.find_n_star, lambda a, t=0.9: 3 * _bisect(a, t), "n\\* = 37")


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


def _report(K, V, i, v_star, method="C", store=M.least_squares_memory, cov="mean", inverse=torch.linalg.pinv,
            eye_dtype=True, efficacy_of="after", damage="relative-others", naive_when=("naive",)):
    """The reference of exercise 2.4, or a typical mistake in one of its steps."""
    W = store(K, V)
    C = {"mean": K.T @ K / len(K), "gram": K @ K.T / len(K), "sum": K.T @ K,
         "centred": torch.cov(K.T, correction=0)}[cov]
    if method in naive_when:
        C_inv = torch.eye(K.shape[1], dtype=K.dtype if eye_dtype else torch.float32, device=K.device)
    else:
        C_inv = inverse(K.T @ K / len(K) if cov == "gram" else C)
    W_hat = M.rank_one_edit(W, K[i], v_star, C_inv)
    before, after = M.recall(W, K), M.recall(W_hat, K)
    change = (after - before).norm(dim=1)
    if damage != "absolute":
        change = change / before.norm(dim=1)
    others = torch.arange(len(K), device=K.device) != i
    measured = change[others] if damage != "all" else change
    efficacy = torch.nn.functional.cosine_similarity(after[i] if efficacy_of == "after" else before[i], v_star, dim=0)
    return {"C": C, "W": W, "W_hat": W_hat, "efficacy": efficacy.item(), "damage": measured.mean().item()}


def test_edit_report(capsys):
    C2.edit_report(_report)
    assert "✓" in capsys.readouterr().out
    wrong = lambda **kw: (lambda K, V, i, v_star, method="C": _report(K, V, i, v_star, method, **kw))
    expect(C2.edit_report, wrong(store=M.hebbian_store), "Hebbian")
    expect(C2.edit_report, wrong(store=lambda K, V: M.least_squares_memory(K, V).T), "shape")
    expect(C2.edit_report, wrong(cov="gram"), "K Kᵀ")
    expect(C2.edit_report, wrong(cov="centred"), "centred")
    expect(C2.edit_report, wrong(cov="sum"), "divide by n")
    expect(C2.edit_report, wrong(inverse=torch.linalg.inv), "pseudo-inverse")
    expect(C2.edit_report, wrong(eye_dtype=False), "dtype")
    expect(C2.edit_report, wrong(naive_when=("naive", "C")), "naive edit")
    expect(C2.edit_report, wrong(naive_when=()), "you used C⁻¹")
    expect(C2.edit_report, wrong(efficacy_of="before"), "BEFORE")
    expect(C2.edit_report, wrong(damage="all"), "itself")
    expect(C2.edit_report, wrong(damage="absolute"), "absolute")
    expect(C2.edit_report, lambda K, V, i, v_star, method="C": {"C": None}, "keys")
    expect(C2.edit_report, lambda *a: {**_report(*a), "C": "C"}, "should be a tensor")
    expect(C2.edit_report, lambda *a: {**_report(*a), "W_hat": _report(*a)["W_hat"].T}, "W's shape")
    expect(C2.edit_report, lambda *a: {**_report(*a), "W_hat": _report(*a)["W"]}, "write the new value")
    expect(C2.edit_report, lambda *a: {**_report(*a), "efficacy": 0.5}, "should be cos")
    expect(C2.edit_report, lambda *a: {**_report(*a), "efficacy": "high"}, "should be a number")
    expect(C2.edit_report, lambda *a: {**_report(*a), "damage": 0.5}, "mean over")

    def unnormalised(K, V, i, v_star, method="C"):
        report = _report(K, V, i, v_star, method)
        W = report["W"]
        return {**report, "W_hat": W + 2 * (report["W_hat"] - W)}
    expect(C2.edit_report, unnormalised, "write the new value")

    def in_place(K, V, i, v_star, method="C"):
        K /= 1.0001
        return _report(K, V, i, v_star, method)
    expect(C2.edit_report, in_place, "in place")


def test_choose_dimension(capsys):
    C1.choose_dimension(256)
    assert "✓" in capsys.readouterr().out
    expect(C1.choose_dimension, 128, "only")                    # too small: n*(128) ≈ 700
    expect(C1.choose_dimension, 512, "in proportion to d")      # linear extrapolation from d = 128
    expect(C1.choose_dimension, 2048, "as many dimensions as memories")
    expect(C1.choose_dimension, 300, "choose one of")


def _experiment(C_of):
    """The colleague's experiment of exercise 2.5 with C computed by C_of(K, V)."""
    def run(K, V, i, v_star):
        W = M.least_squares_memory(K, V)
        out = {}
        for method, C_inv in (("C", torch.linalg.pinv(C_of(K, V))), ("naive", torch.eye(K.shape[1], dtype=K.dtype))):
            W_hat = M.rank_one_edit(W, K[i], v_star, C_inv)
            out[method] = (torch.nn.functional.cosine_similarity(W_hat @ K[i], v_star, dim=0).item(),
                           M.interference(W, W_hat, K, skip=i))
        return out
    return run


def test_find_the_bug(capsys):
    fixed, buggy = _experiment(lambda K, V: K.T @ K / len(K)), _experiment(lambda K, V: V.T @ V / len(V))
    C2.find_the_bug("b", fixed)
    assert "✓" in capsys.readouterr().out
    assert buggy(M.correlated_keys(10, 64, rho=0.8, seed=3), M.random_keys(10, 64, seed=2), 0,
                 M.random_keys(1, 64, seed=99)[0])["C"][1] > 0.5         # the bug the notebook shows
    for letter, message in (("a", "no inverse"), ("c", "OTHER memories"), ("d", "uncentred"), ("e", "one of")):
        with pytest.raises(AssertionError, match=message):
            C2.find_the_bug(letter, fixed)
    with pytest.raises(AssertionError, match="KEYS"):
        C2.find_the_bug("b", buggy)                                    # the right letter, the fix not made
    centred = _experiment(lambda K, V: (K - K.mean(0)).T @ (K - K.mean(0)) / len(K))
    with pytest.raises(AssertionError, match="KEYS"):
        C2.find_the_bug("b", centred)


def test_reveal_accepts_every_tied_choice(capsys):
    checks.PREDICTIONS.clear()
    checks.predict("t", "?", {"a": "x", "b": "y"}, answer="b")
    checks.reveal("t", 1, "", correct={"a", "b"})
    assert "✓" in capsys.readouterr().out
    checks.reveal("t", 1, "", correct="a")
    assert "(answer: 'a')" in capsys.readouterr().out
    checks.reveal("t", 1, "", correct={"a", "c"})
    assert "(answer: 'a' or 'c')" in capsys.readouterr().out
    checks.PREDICTIONS.clear()
    assert checks.choice_between(0.5, (0.25, 0.75), "abc") == {"b"}
    assert checks.choice_between(0.75, (0.25, 0.75), "abc") == {"b", "c"}


def test_chapter_01_02_answers_with_ties_and_at_the_test_size():
    # ties: a value on an edge counts for both neighbouring choices
    assert C1.answer_1_1(0.99) == {"c", "d"} and C1.answer_1_1(0.75) == {"b", "c"}
    assert C1.answer_1_2(2.5) == {"b", "c"}
    assert C2.answer_2_1(0.9, torch.tensor([0.1, -0.1])) == {"a", "c"}
    assert C2.answer_2_2(1.0, 0.5) == {"a", "b"} and C2.answer_2_3(0.3, 0.9) == {"b", "c"}
    # the measurements at the test size (2 trials, 3 seeds) agree with the full size (5 trials, 10 seeds)
    for trials in (2, 5):
        assert C1.answer_1_1(M.capacity_curve(64, [100], trials=trials)[0]) == {"d"}
        ratio = M.capacity_n_star(128, trials=trials) / M.capacity_n_star(64, trials=trials)
        assert C1.answer_1_2(ratio) == {"c"}
    V = M.random_keys(10, 64, seed=2)
    for seeds in (3, 10):
        naive, c_edit = [], []
        for s in range(seeds):
            K = M.correlated_keys(10, 64, rho=0.95, seed=s)
            W, target = M.least_squares_memory(K, V), M.random_keys(1, 64, seed=100 + s)[0]
            naive.append(M.interference(W, M.naive_edit(W, K[0], target), K, skip=0))
            c_edit.append(M.interference(W, M.rank_one_edit(W, K[0], target, torch.linalg.pinv(M.key_covariance(K))), K, skip=0))
        assert C2.answer_2_2(sum(naive) / seeds, sum(c_edit) / seeds) == {"c"}
