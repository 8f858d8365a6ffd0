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


# --- chapters 06-08 ---------------------------------------------------------------------------------

def test_subject_token_range(tinyworld, capsys):
    from engramlib.models import find_subject_range
    checks.subject_token_range(find_subject_range, mt=tinyworld)
    assert "✓" in capsys.readouterr().out
    inclusive = lambda tok, p, s: (find_subject_range(tok, p, s)[0], find_subject_range(tok, p, s)[1] - 1)
    expect(lambda fn: checks.subject_token_range(fn, mt=tinyworld), inclusive, "exclusive")
    chars = lambda tok, p, s: (p.index(s), p.index(s) + len(s))
    expect(lambda fn: checks.subject_token_range(fn, mt=tinyworld), chars, "character positions")


def test_corrupt_subject(capsys):
    def ref(e, s, t, n):
        out = e.clone()
        out[1:, s:t] += n
        return out
    checks.corrupt_subject(ref)
    assert "✓" in capsys.readouterr().out

    def in_place(e, s, t, n):
        e[1:, s:t] += n
        return e
    expect(checks.corrupt_subject, in_place, "in place")

    def all_rows(e, s, t, n):
        out = e.clone()
        out[:, s:t] += torch.cat([n[:1], n])
        return out
    expect(checks.corrupt_subject, all_rows, "row 0")

    def inclusive(e, s, t, n):
        out = e.clone()
        out[1:, s:t] += n
        out[1:, t] += 1.0
        return out
    expect(checks.corrupt_subject, inclusive, "outside")


def test_indirect_effect(capsys):
    checks.indirect_effect(lambda r, t, l: r.scores[t, l] - r.low_score)
    assert "✓" in capsys.readouterr().out
    expect(checks.indirect_effect, lambda r, t, l: r.scores[t, l], "subtract the corrupted")
    expect(checks.indirect_effect, lambda r, t, l: r.high_score - r.scores[t, l], "still missing")


def test_restore_one_state(tinyworld, capsys):
    from engramlib.tracing import trace_loop
    ref = lambda mt, p, s, t, l, noise, n: trace_loop(mt, p, s, samples=n, noise=noise).scores[t, l].item()
    checks.restore_one_state(ref, mt=tinyworld)
    assert "✓" in capsys.readouterr().out
    expect(lambda fn: checks.restore_one_state(fn, mt=tinyworld),
           lambda mt, p, s, t, l, noise, n: trace_loop(mt, p, s, samples=n, noise=noise).low_score,
           "restoration did not happen")


def test_key_at_subject(tinyworld, capsys):
    from engramlib.hooks import Trace
    from engramlib.models import find_subject_range

    def key(mt, text, subject, layer, position="last", which="input"):
        s, e = find_subject_range(mt.tokenizer, text, subject)
        with torch.no_grad(), Trace(mt.model, mt.spec.mlp_out.format(layer), retain_input=True) as t:
            mt.model(**mt.tokenizer(text, return_tensors="pt"))
        h = t.input if which == "input" else t.output
        return h[0, {"last": e - 1, "first": s, "end": -1}[position]]
    check = lambda fn: checks.key_at_subject(fn, mt=tinyworld)
    check(key)
    assert "✓" in capsys.readouterr().out
    expect(check, lambda *a: key(*a, position="first"), "FIRST subject token")
    expect(check, lambda *a: key(*a, position="end"), "last token of the prompt")
    expect(check, lambda *a: key(*a, which="output"), "INPUT")


def test_v_star_delta_rejects_a_zero_or_wrong_sized_delta(tinyworld):
    check = lambda fn: checks.v_star_delta(fn, mt=tinyworld)
    expect(check, lambda mt, *a: torch.zeros(mt.model.config.n_embd), "all zeros")
    expect(check, lambda mt, *a: torch.ones(3), "d_model")


def test_conv1d_rank_one_edit(capsys):
    ref = lambda W, k, v, C_inv: M.rank_one_edit(W.T, k, v, C_inv).T
    checks.conv1d_rank_one_edit(ref)
    assert "✓" in capsys.readouterr().out
    expect(checks.conv1d_rank_one_edit, lambda W, k, v, C_inv: M.naive_edit(W.T, k, v).T, "naive")
    expect(checks.conv1d_rank_one_edit,
           lambda W, k, v, C_inv: M.rank_one_edit(W.T, k, v, torch.linalg.inv(C_inv)).T, "C⁻¹")
    expect(checks.conv1d_rank_one_edit, lambda W, k, v, C_inv: M.rank_one_edit(W.T, k, v, C_inv), "shape")


def test_edit_success_and_harmonic_score(capsys):
    def ref(p_new, p_true, kind):
        ok = p_true > p_new if kind == "neighborhood" else p_new > p_true
        return ok.float().mean()
    checks.edit_success(ref)
    checks.harmonic_score(lambda a, b, c: 0.0 if min(a, b, c) <= 0 else 3 / (1 / a + 1 / b + 1 / c))
    assert capsys.readouterr().out.count("✓") == 2
    expect(checks.edit_success, lambda p_new, p_true, kind: (p_new > p_true).float().mean(), "OPPOSITE")
    expect(checks.harmonic_score, lambda a, b, c: (a + b + c) / 3, "HARMONIC")


def test_grafting_checks(capsys):
    from engramlib import graft as G
    checks.graft_formula(G.graft)
    checks.topk_mask(G.sigmoid_topk_mask)
    checks.lesion_region(lambda s, m, p: G.lesion(s, m, to="pre", pre=p))
    checks.freeze_gradients(lambda g, r: {n: t * ~r[n] for n, t in g.items()})
    assert capsys.readouterr().out.count("✓") == 4
    expect(checks.graft_formula, lambda pre, ft, m: G.graft(ft, pre, m), "swapped")
    expect(checks.graft_formula, lambda pre, ft, m: G.lottery_ticket(ft, m), "PRETRAINED")
    per_tensor = lambda s, k: {n: (t >= t.flatten().topk(min(k, t.numel())).values[-1]).float() for n, t in s.items()}
    expect(checks.topk_mask, per_tensor, "EACH tensor")
    expect(checks.lesion_region, lambda s, m, p: G.lesion(s, m, to="zero"), "zeroed")
    expect(checks.lesion_region, lambda s, m, p: G.graft(p, s, m), "graft")
    expect(checks.freeze_gradients, lambda g, r: {n: t * r[n] for n, t in g.items()}, "other way round")
    checks.region_overlap(G.region_overlap)
    inter = lambda a, b: sum(float((a[n] * b[n]).sum()) for n in a)
    size = lambda m: sum(float(t.sum()) for t in m.values())
    expect(checks.region_overlap, inter, "number of shared")
    expect(checks.region_overlap, lambda a, b: inter(a, b) / (size(a) + size(b) - inter(a, b)), "Jaccard")
    expect(checks.region_overlap, lambda a, b: inter(a, b) / max(size(a), size(b)), "LARGER")
    expect(checks.region_overlap, lambda a, b: sum(float((a[n] * b[n]).sum() / a[n].sum()) for n in a) / len(a),
           "all tensors together")
