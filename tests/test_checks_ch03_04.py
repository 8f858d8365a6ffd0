"""Checks of chapters 03-04 (grafting): each accepts the reference and diagnoses typical mistakes with a specific message."""
import pytest

from engramlib import checks


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


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


# --- the exercises that run on the model (TinyWorld, a few forward passes each) -----------------------

import random  # noqa: E402

import torch  # noqa: E402

from engramlib import graft as G  # noqa: E402
from engramlib.checks import ch03_04_grafting as C34  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from engramlib.models import load_model
    from engramlib.tinyworld.tasks import make_task
    mt = load_model("tinyworld")
    pre = G.get_state(mt)
    gen = torch.Generator().manual_seed(1)
    ft = {n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in pre.items()}   # a stand-in θ_ft
    return mt, pre, ft, make_task("polarity", n_train=64, n_test=16)


def _step(mt, pre, ft, S, enc, labels, label_ids, lr, gamma=torch.sigmoid, swap=False, reduction="mean",
          direction=-1.0, use_lr=True, detach=True):
    """The reference of exercise 3.3, or a typical mistake in it."""
    with torch.enable_grad():
        mask = {n: gamma(s) for n, s in S.items()}
        grafted = G.graft(ft, pre, mask) if swap else G.graft(pre, ft, mask)
        logits = G.label_logits(mt, enc, label_ids, grafted)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
        grads = torch.autograd.grad(loss, list(S.values()))
    new = {n: s + direction * (lr if use_lr else 1.0) * g for (n, s), g in zip(S.items(), grads)}
    if detach:
        new = {n: t.detach().requires_grad_() for n, t in new.items()}
    return new, loss.item()


def test_mask_step(tiny, capsys):
    mt, pre, ft, task = tiny
    check = lambda fn: C34.mask_step(fn, mt=mt, pre=pre, ft=ft, task=task)
    check(_step)
    assert "✓" in capsys.readouterr().out
    wrong = lambda **kw: (lambda *a: _step(*a, **kw))
    expect(check, wrong(direction=+1.0), "climbed")
    expect(check, wrong(use_lr=False), "learning rate")
    expect(check, lambda mt, pre, ft, S, *rest: (S, _step(mt, pre, ft, S, *rest)[1]), "did not move")
    expect(check, wrong(gamma=lambda s: s), "S itself")
    expect(check, wrong(gamma=lambda s: (torch.sigmoid(s) > 0.5).float()), "does not depend on S")
    expect(check, wrong(swap=True), "swapped")
    expect(check, wrong(reduction="sum"), "SUM")
    expect(check, wrong(detach=False), "leaf")
    expect(check, lambda *a: _step(*a)[0], "pair")
    expect(check, lambda *a: ({}, _step(*a)[1]), "same names")
    expect(check, lambda *a: (_step(*a)[0], "low"), "should be a number")
    expect(check, lambda *a: (_step(*a)[0], 0.0), "the loss before the step should be")
    expect(check, lambda mt, pre, ft, S, *rest: ({n: t[:1] for n, t in _step(mt, pre, ft, S, *rest)[0].items()},
                                                 _step(mt, pre, ft, S, *rest)[1]), "S's shape")
    expect(check, wrong(direction=-0.5), "differs from S − lr")


def _train(mt, task, frozen, steps, lr, batch_size=32, seed=0, optimiser=None, keep_grad=False,
           switch_on=True, invert=False, seed_shift=0, freeze=True):
    """The reference of exercise 4.2 (a manual SGD loop), or a typical mistake in it."""
    names = G.graftable_names(mt)
    params = dict(mt.model.named_parameters())
    label_ids = G.label_token_ids(mt, task["label_words"])
    rng = random.Random(seed + seed_shift)
    if switch_on:
        for n in names:
            params[n].requires_grad_(True)
    opt = optimiser([params[n] for n in names]) if optimiser else None
    for _ in range(steps):
        batch = rng.sample(task["train"], batch_size)
        enc = mt.tokenizer([p for p, _ in batch], return_tensors="pt", padding=True).to(mt.device)
        labels = torch.tensor([y for _, y in batch], device=mt.device)
        loss = torch.nn.functional.cross_entropy(G.label_logits(mt, enc, label_ids), labels)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                if freeze:
                    g = g * (frozen[n] if invert else ~frozen[n])
                if opt:
                    params[n].grad = g
                else:
                    params[n] -= lr * g
        if opt:
            opt.step()
    if not keep_grad:
        mt.model.requires_grad_(False)
    return G.get_state(mt)


def test_train_outside(tiny, capsys):
    mt, pre, ft, task = tiny
    check = lambda fn: C34.train_outside(fn, mt=mt, task=task)
    check(_train)
    check(lambda mt, task, frozen, steps, lr, batch_size=32, seed=0: G.finetune(
        mt, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed, frozen=frozen, progress=False))
    assert capsys.readouterr().out.count("✓") == 2
    wrong = lambda **kw: (lambda *a, **k: _train(*a, **k, **kw))
    expect(check, wrong(freeze=False), "frozen entries changed")
    expect(check, wrong(invert=True), "complement")
    expect(check, wrong(optimiser=lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01)), "weight decay")
    expect(check, wrong(switch_on=False), "requires_grad")
    expect(check, wrong(keep_grad=True), "still require grad")
    expect(check, wrong(seed_shift=1), "batches")
    expect(check, lambda *a, **k: None, "did not change")
    expect(check, lambda mt, task, frozen, *a, **k: (_train(mt, task, frozen, *a, **k), frozen)[1], "not the model's state")
    expect(check, lambda mt, task, frozen, *a, **k: (_train(mt, task, frozen, *a, **k), None)[1], "return the graftable state")
    assert all(torch.equal(t, pre[n]) for n, t in G.get_state(mt).items()), "the check restores the model"


def _tables(mlp0_text=0.02, early_text=0.0, late_scattered_text=0.22):
    """Location tables like TinyWorld's at the test size: facts recalled and plain text's next tokens right."""
    names = [f"MLP {i}" for i in range(8)] + [f"attention {i}" for i in range(8)] + ["early half", "late half"]
    facts = {n: {"contiguous": 1.0, "scattered": 1.0} for n in names}
    text = {n: {"contiguous": 0.53, "scattered": 0.54} for n in names}
    facts["MLP 0"]["contiguous"], text["MLP 0"]["contiguous"] = 0.0, mlp0_text
    facts["early half"] = {"contiguous": 0.0, "scattered": 0.04}
    facts["late half"] = {"contiguous": 0.71, "scattered": 0.04}
    text["early half"] = {"contiguous": early_text, "scattered": late_scattered_text}
    text["late half"] = {"contiguous": 0.47, "scattered": late_scattered_text}
    return facts, text, 0.53


def test_read_lesions(capsys):
    facts, text, intact = _tables()
    C34.read_lesions("b", "b", facts, text, intact)
    assert "✓" in capsys.readouterr().out
    check = lambda mlp0, half, tables=(facts, text, intact): C34.read_lesions(mlp0, half, *tables)
    for mlp0, half, message in (("a", "b", "look at the control"), ("c", "b", "most single modules cost little"),
                                ("d", "b", "it is needed"), ("b", "a", "did cost some"),
                                ("b", "c", "breaks the model for every input"), ("e", "b", "answer mlp0")):
        with pytest.raises(AssertionError, match=message):
            check(mlp0, half)
    # a model where zeroing MLP 0 spares plain text: then (a) is the right reading and (b) is diagnosed
    spared = _tables(mlp0_text=0.52, early_text=0.5, late_scattered_text=0.5)
    C34.read_lesions("a", "c", *spared)
    with pytest.raises(AssertionError, match="support \\(a\\)"):
        check("b", "c", spared)
    with pytest.raises(AssertionError, match="almost intact"):
        check("a", "b", spared)


def test_overlap_control(capsys):
    C34.overlap_control("c")
    assert "✓" in capsys.readouterr().out
    for choice, message in (("a", "chance only"), ("b", "repeats the measurement"), ("d", "different SKILL"),
                            ("x", "one of")):
        with pytest.raises(AssertionError, match=message):
            C34.overlap_control(choice)


def test_chapter_03_04_answers_with_ties_and_at_the_test_size():
    # ties: on an edge both neighbouring choices count
    assert C34.answer_3_1(0.1, 1.0, 0.95) == {"a", "b"}
    assert C34.answer_3_1(0.3, 0.9, 0.95) == {"b", "c"}
    assert C34.answer_3_2(0.85, 0.95, 0.5) == {"a", "b"} and C34.answer_3_2(0.6, 0.95, 0.5) == {"b", "c"}
    assert C34.answer_3_3(0.4, 0.5) == {"a", "b"} and C34.answer_3_3(0.5, 0.4) == {"a", "c"}
    assert C34.answer_4_1(1.0, 0.95) == {"a", "b"} and C34.answer_4_1(1.0, 0.7) == {"b", "c"}
    assert C34.answer_4_2(1.0, 0.95, 0.5) == {"a", "b"} and C34.answer_4_2(1.0, 0.55, 0.5) == {"b", "c"}
    assert C34.answer_4_3(0.4) == {"b", "c"}
    # the test size's measurements (TinyWorld) and the full run's (benchmarks/graft_table.py, quoted in
    # the chapters) give the same answers
    assert C34.answer_3_1(0.20, 1.0, 1.0) == {"b"} and C34.answer_3_1(0.27, 1.0, 1.0) == {"b"}
    facts, _, _ = _tables()
    assert C34.answer_3_3(facts["MLP 0"]["contiguous"], facts["MLP 0"]["scattered"]) == {"b"}
    assert C34.answer_4_3(0.505) == C34.answer_4_3(0.502) == {"c"}
    assert C34.answer_4_2(1.0, 1.0, 0.5) == {"a"}          # the full run: A kept 100 % (the chapter adds it at FAST)


def test_read_lesions_cannot_decide_without_a_control(capsys):
    """A model that predicts no plain text (the random stand-in) gives the control nothing to lose:
    the check says so instead of judging."""
    regions = {"MLP 0": {"contiguous": 0.7, "scattered": 0.7}, "late half": {"contiguous": 0.5, "scattered": 0.1},
               "early half": {"contiguous": 0.0, "scattered": 0.1}}
    checks.read_lesions("b", "b", regions, regions, 0.0)
    assert "cannot decide" in capsys.readouterr().out
