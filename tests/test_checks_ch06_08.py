"""Checks of chapters 06-08 (tracing, ROME, evaluation): each accepts the reference and diagnoses typical mistakes with a specific message."""
from dataclasses import replace

import pytest
import torch

from engramlib import checks, memory as M
from engramlib.hooks import Trace, TraceDict
from engramlib.models import find_subject_range
from engramlib.rome import rome_weight_update


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


# --- chapter 06 ----------------------------------------------------------------------------------

def test_subject_token_range(tinyworld, capsys):
    checks.subject_token_range(find_subject_range, mt=tinyworld)
    assert "✓" in capsys.readouterr().out
    inclusive = lambda tok, p, s: (find_subject_range(tok, p, s)[0], find_subject_range(tok, p, s)[1] - 1)
    expect(lambda fn: checks.subject_token_range(fn, mt=tinyworld), inclusive, "exclusive")
    chars = lambda tok, p, s: (p.index(s), p.index(s) + len(s))
    expect(lambda fn: checks.subject_token_range(fn, mt=tinyworld), chars, "character positions")
    expect(lambda fn: checks.subject_token_range(fn, mt=tinyworld), lambda tok, p, s: 2, "pair")


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
    expect(checks.corrupt_subject, lambda e, s, t, n: ref(e, s, t, n)[1:], "same shape")


def restore(mt, prompt, subject, noise_draws, token=None, layer=None, *, rows=slice(1, None),
            module="block", where="one", average="noisy", answer_from="clean", noise_on=True):
    """The exercise's reference solution, with switches for the typical mistakes."""
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    batch = ids.repeat(len(noise_draws) + 1, 1)
    name = {"block": mt.spec.layer, "mlp": mt.spec.mlp}[module].format(layer) if token is not None else None

    def edit(h, hook_name):
        h = h.clone()
        if hook_name == mt.spec.embedding:
            if noise_on:
                h[rows, start:end] += noise_draws
        else:
            cols = {"one": [token], "all": slice(None)}[where]
            h[1:, cols] = h[0, cols]
        return h
    names = [mt.spec.embedding] + ([name] if name else [])
    with torch.no_grad(), TraceDict(mt.model, names, edit_output=edit):
        probs = torch.softmax(mt.model(input_ids=batch).logits[:, -1].float(), -1)
    answer = probs[0].argmax() if answer_from == "clean" else probs[1:].mean(0).argmax()
    return probs[1 if average == "noisy" else 0:, answer].mean().item()


def test_restore_one_state(tinyworld, capsys):
    check = lambda fn: checks.restore_one_state(fn, mt=tinyworld)
    check(restore)
    assert "✓" in capsys.readouterr().out
    expect(check, lambda *a, **k: restore(*a, **k, noise_on=False), "CLEAN probability")
    expect(check, lambda *a, **k: restore(*a, **k, average="all"), "row 0")
    expect(check, lambda *a, **k: restore(*a, **k, answer_from="corrupted"), "CLEAN run's top prediction")
    expect(check, lambda mt, p, s, d, token=None, layer=None: restore(mt, p, s, d), "nothing was restored")
    expect(check, lambda *a, **k: restore(*a, **k, where="all"), "more than one token")
    expect(check, lambda *a, **k: restore(*a, **k, module="mlp"), "MLP's output")
    expect(check, lambda mt, p, s, d, token=None, layer=None: restore(mt, p, s, d, token, layer and layer - 1),
           "INPUT")
    expect(check, lambda mt, p, s, d, token=None, layer=None: restore(mt, p, s, d[:, :, :5]),
           "shape error")        # noise of the wrong size: the shape error is explained
    expect(check, lambda *a, **k: torch.tensor([restore(*a, **k)] * 3), "one number")


def test_restore_one_state_check_needs_no_full_trace(tinyworld, monkeypatch, capsys):
    """The check computes only the entries it compares (no trace_loop, no trace)."""
    from engramlib import fast_trace, tracing
    boom = lambda *a, **k: pytest.fail("the check ran a full trace")
    monkeypatch.setattr(tracing, "trace_loop", boom)
    monkeypatch.setattr(fast_trace, "trace", boom)
    checks.restore_one_state(restore, mt=tinyworld)
    assert "✓" in capsys.readouterr().out


def test_restore_one_state_check_matches_the_loop_reference(tinyworld):
    """The check's own batched run is `tracing._corrupted_run` (the loop's step), row by row."""
    from engramlib.checks.ch06_tracing import _draws, _row_probs, _trace_inputs
    from engramlib.tracing import _corrupted_run
    prompt, subject = "The Space Needle is in", "Space Needle"
    inputs = _trace_inputs(tinyworld, prompt, subject, _draws(tinyworld, subject, 2))
    for sites in ({}, {tinyworld.spec.layer.format(2): [2]}):
        assert _row_probs(tinyworld, inputs, sites)[1:].mean().item() == pytest.approx(
            _corrupted_run(tinyworld, inputs, sites), abs=1e-6)


def test_trace_by_loop(tinyworld, capsys):
    def loop(mt, prompt, subject, draws, skip_before_subject=False, transpose=False):
        T = len(mt.tokenizer(prompt)["input_ids"])
        start = find_subject_range(mt.tokenizer, prompt, subject)[0] if skip_before_subject else 0
        scores = torch.zeros(T, mt.n_layers)
        for t in range(start, T):
            for l in range(mt.n_layers):
                scores[t, l] = restore(mt, prompt, subject, draws, t, l)
        return scores.T if transpose else scores
    check = lambda fn: checks.trace_by_loop(fn, mt=tinyworld)
    check(loop)
    assert "✓" in capsys.readouterr().out
    expect(check, lambda *a: loop(*a, transpose=True), "one ROW per token")
    expect(check, lambda *a: loop(*a, skip_before_subject=True), "before the subject")
    expect(check, lambda mt, p, s, d: loop(mt, p, s, d).roll(1, dims=1), r"\(token 1, layer 0\)")


def test_indirect_effect(capsys):
    checks.indirect_effect(lambda r, t, l: r.scores[t, l] - r.low_score)
    assert "✓" in capsys.readouterr().out
    expect(checks.indirect_effect, lambda r, t, l: r.scores[t, l], "subtract the corrupted")
    expect(checks.indirect_effect, lambda r, t, l: r.high_score - r.scores[t, l], "still missing")
    expect(checks.indirect_effect, lambda r, t, l: (r.scores[t, l] - r.low_score) / r.total_effect, "share")


# --- chapter 07 ----------------------------------------------------------------------------------

def test_key_at_subject(tinyworld, capsys):
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


def loss(target_logp, now, init, delta, v_init, hp, *, nll="mean", kl="follow", reduction="batchmean",
         decay="follow", divide="squared", kl_weight=True):
    """ROME's loss (the exercise's reference), with switches for the typical mistakes."""
    direction = hp.kl if kl == "follow" else kl
    a, b = (init, now) if direction == "new||init" else (now, init)      # kl_div(input, target) = KL(target ‖ input)
    divide_by = {"batchmean": now.shape[0], "sum": 1, "mean": now.numel()}[reduction]
    kl_value = torch.nn.functional.kl_div(a, b, log_target=True, reduction="sum") / divide_by
    size = delta.norm() if (hp.weight_decay if decay == "follow" else decay) == "norm" else delta.norm() ** 2
    weight_decay = hp.v_weight_decay * size / (v_init.norm() ** 2 if divide == "squared" else v_init.norm())
    nll_value = {"mean": -target_logp.mean(), "sum": -target_logp.sum(), "sign": target_logp.mean()}[nll]
    total = nll_value + (hp.kl_factor if kl_weight else 1.0) * kl_value + weight_decay
    return {"nll": nll_value, "kl": kl_value, "weight_decay": weight_decay, "loss": total}


def test_v_star_loss(capsys):
    from engramlib import rome
    checks.v_star_loss(rome.v_star_loss)
    checks.v_star_loss(loss)
    assert capsys.readouterr().out.count("✓") == 2
    expect(checks.v_star_loss, lambda *a: loss(*a, nll="sign"), "wrong sign")
    expect(checks.v_star_loss, lambda *a: loss(*a, nll="sum"), "MEAN")
    expect(checks.v_star_loss, lambda *a: loss(*a, kl="init||new"), "other direction")
    expect(checks.v_star_loss, lambda *a: loss(*a, reduction="sum"), "batchmean")
    expect(checks.v_star_loss, lambda *a: loss(*a, reduction="mean"), "every entry")
    expect(checks.v_star_loss, lambda *a: loss(*a, decay="squared"), "not ‖δ‖²")
    expect(checks.v_star_loss, lambda *a: loss(*a, decay="norm"), "'squared' uses")   # 2nd case: squared
    expect(checks.v_star_loss, lambda *a: loss(*a, divide="norm"), "SQUARED norm")
    expect(checks.v_star_loss, lambda *a: loss(*a, kl_weight=False), "kl_factor")
    expect(checks.v_star_loss, lambda *a: loss(*a[:5], replace(a[5], v_weight_decay=1.0)), "v_weight_decay")
    expect(checks.v_star_loss, lambda *a: {"loss": loss(*a)["loss"]}, "keys")


def optimise(mt, request, layer, hp, templates, *, clamp=True, kl=True, early_stop=True, extra_step=False,
             decay=True):
    """The v* loop of exercise 7.3 (the reference), with switches for the typical mistakes."""
    from engramlib import rome
    from engramlib.models import encode_with_targets
    loss_hp = hp if decay else replace(hp, v_weight_decay=0.0)
    subject, target = request["subject"], request["target_new"]["str"]
    prompts = [t.format(request["prompt"]).format(subject) for t in templates] + [f"{subject} is a"]
    n = len(templates)
    ids, mask, labels = encode_with_targets(mt, prompts, [target] * n + [None])
    rows = torch.arange(len(prompts))
    lookup = torch.tensor([find_subject_range(mt.tokenizer, p, subject, occurrence=0)[1] - 1 for p in prompts])
    delta = torch.zeros(mt.model.config.n_embd, requires_grad=True)
    with_delta = rows if kl else rows[:n]

    def add(h, name):
        h = h.clone()
        h[with_delta, lookup[with_delta]] += delta
        return h

    def run():
        with Trace(mt.model, mt.spec.mlp.format(layer), edit_output=add) as t:
            logits = mt.model(input_ids=ids, attention_mask=mask).logits
        return torch.log_softmax(logits.float(), -1), t.output
    with torch.no_grad():
        logp, out = run()
    v_init, kl_init = out[0, lookup[0]], logp[rows[n:], lookup[n:]]
    tr, tp = (labels != -100).nonzero(as_tuple=True)
    opt, losses = torch.optim.Adam([delta], lr=hp.v_lr), []
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        logp, _ = run()
        value = rome.v_star_loss(logp[tr, tp, labels[tr, tp]], logp[rows[n:], lookup[n:]], kl_init, delta,
                                 v_init, loss_hp)["loss"]
        losses.append(value.item())
        if (early_stop and value.item() < hp.early_stop_loss) or (step == hp.v_num_grad_steps - 1 and not extra_step):
            break
        value.backward()
        opt.step()
        with torch.no_grad():
            if clamp and delta.norm() > hp.clamp_norm_factor * v_init.norm():
                delta.mul_(hp.clamp_norm_factor * v_init.norm() / delta.norm())
    return delta.detach(), losses


def test_v_star_delta(tinyworld, capsys):
    check = lambda fn: checks.v_star_delta(fn, mt=tinyworld)
    check(optimise)
    assert "✓" in capsys.readouterr().out
    expect(check, lambda *a: optimise(*a, clamp=False), "never clamped")
    expect(check, lambda *a: optimise(*a, kl=False), "without the KL term")
    expect(check, lambda *a: optimise(*a, decay=False), "without the weight decay")
    expect(check, lambda *a: optimise(*a, early_stop=False), "early_stop_loss")
    expect(check, lambda *a: optimise(*a, extra_step=True), "without another step")
    expect(check, lambda mt, *a: (torch.zeros(mt.model.config.n_embd), [0.0]), "NLL alone")
    expect(check, lambda mt, *a: (torch.ones(3), [0.0]), "d_model")
    expect(check, lambda *a: optimise(*a)[0], "pair")


def test_conv1d_rank_one_edit(capsys):
    ref = lambda W, k, v, C_inv: M.rank_one_edit(W.T, k, v, C_inv).T
    checks.conv1d_rank_one_edit(ref)
    assert "✓" in capsys.readouterr().out
    expect(checks.conv1d_rank_one_edit, lambda W, k, v, C_inv: M.naive_edit(W.T, k, v).T, "naive")
    expect(checks.conv1d_rank_one_edit,
           lambda W, k, v, C_inv: M.rank_one_edit(W.T, k, v, torch.linalg.inv(C_inv)).T, "C⁻¹")
    expect(checks.conv1d_rank_one_edit, lambda W, k, v, C_inv: M.rank_one_edit(W.T, k, v, C_inv), "shape")


# --- chapter 08 ----------------------------------------------------------------------------------

def success(p_new, p_true, kind, *, flip_neighbors=True, strict=True, reduce="mean"):
    new_wins = p_new > p_true if strict else p_new >= p_true
    true_wins = p_true > p_new if strict else p_true >= p_new
    ok = true_wins if kind == "neighborhood" and flip_neighbors else new_wins
    return {"mean": ok.float().mean(), "sum": ok.float().sum(), "percent": 100 * ok.float().mean(),
            "none": ok.float()}[reduce]


def test_edit_success(capsys):
    checks.edit_success(success)
    assert "✓" in capsys.readouterr().out
    expect(checks.edit_success, lambda *a: success(*a, flip_neighbors=False), "OPPOSITE")
    expect(checks.edit_success, lambda *a: success(*a, reduce="sum"), "a count")
    expect(checks.edit_success, lambda *a: success(*a, reduce="percent"), "a percentage")
    expect(checks.edit_success, lambda *a: success(*a, reduce="none"), "one number")
    expect(checks.edit_success, lambda *a: success(*a, strict=False), "tie")
    expect(checks.edit_success, lambda p_new, p_true, kind: 1 - success(p_new, p_true, "rewrite")
           if kind == "neighborhood" else success(p_new, p_true, kind), "1 − the rewrite rate")
    # the count diagnosis holds for every kind, not only when the expected fraction differs from 1
    expect(checks.edit_success, lambda p_new, p_true, kind: success(p_new, p_true, kind, reduce="sum")
           if kind == "neighborhood" else success(p_new, p_true, kind), "'neighborhood'.*a count")


def scores(mt, records, *, pooled=False, percent=True, flip_neighbors=True):
    """Exercise 8.2's reference (with switches for the typical mistakes)."""
    from engramlib.evaluate import compare_targets
    rows, pool = [], {}
    for record in records:
        rw = record["requested_rewrite"]
        row = {}
        for score, magnitude, kind, prompts in (
                ("ES", "EM", "rewrite", [rw["prompt"].format(rw["subject"])]),
                ("PS", "PM", "paraphrase", record["paraphrase_prompts"]),
                ("NS", "NM", "neighborhood", record["neighborhood_prompts"])):
            p = compare_targets(mt, list(prompts), rw["target_new"]["str"], rw["target_true"]["str"])
            ok = success(p["p_new"], p["p_true"], kind, flip_neighbors=flip_neighbors, reduce="none")
            gap = p["p_new"] - p["p_true"]
            gap = -gap if kind == "neighborhood" and flip_neighbors else gap
            row[score], row[magnitude] = ok.mean().item(), gap.mean().item()
            pool.setdefault(score, []).append(ok)
            pool.setdefault(magnitude, []).append(gap)
        rows.append(row)
    scale = 100 if percent else 1
    if pooled:
        return {k: scale * torch.cat(v).mean().item() for k, v in pool.items()}
    return {k: scale * sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def test_edit_scores(tinyworld, capsys):
    check = lambda fn: checks.edit_scores(fn, mt=tinyworld)
    check(scores)
    assert "✓" in capsys.readouterr().out
    expect(check, lambda mt, r: scores(mt, r, percent=False), "percent")
    expect(check, lambda mt, r: scores(mt, r, pooled=True), "pooled")
    expect(check, lambda mt, r: scores(mt, r, flip_neighbors=False), "TRUE object still wins")
    expect(check, lambda mt, r: {k: v for k, v in scores(mt, r).items() if k != "NM"}, "lacks")
    expect(check, lambda mt, r: list(scores(mt, r).values()), "return a dict")

    def magnitudes_wrong(mt, r):
        out = scores(mt, r)
        out["NM"] = -out["NM"]
        return out
    expect(check, magnitudes_wrong, "step 2")


def test_edit_scores_reference_is_the_librarys_summary(tinyworld):
    from engramlib.checks.ch08_evaluation import _aggregate, _gap, _per_prompt, _records, _right
    from engramlib.evaluate import record_metrics, summarize
    records = _records()
    library = summarize([record_metrics(tinyworld, r) for r in records])
    check = _aggregate(_per_prompt(tinyworld, records), _right, _gap)
    for key in ("ES", "PS", "NS", "EM", "PM", "NM"):
        assert check[key] == pytest.approx(library[key], abs=1e-4)


def test_edit_scores_records_tell_the_mistakes_apart(tinyworld):
    """The check's records make pooling and flipping visible in every success score that can show it."""
    from engramlib.checks.ch08_evaluation import _records
    ref = scores(tinyworld, _records())
    pooled, flipped = scores(tinyworld, _records(), pooled=True), scores(tinyworld, _records(), flip_neighbors=False)
    assert abs(pooled["PS"] - ref["PS"]) > 1 and abs(pooled["NS"] - ref["NS"]) > 1
    assert abs(flipped["NS"] - ref["NS"]) > 1


def test_combined_score(capsys):
    harmonic = lambda a, b, c: 0.0 if min(a, b, c) <= 0 else 3 / (1 / a + 1 / b + 1 / c)
    geometric = lambda a, b, c: (a * b * c) ** (1 / 3)
    checks.combined_score(harmonic)
    checks.combined_score(geometric)                       # another design with the four properties
    out = capsys.readouterr().out
    assert out.count("✓") == 2 and "25.0" in out           # the paper's S(100, 100, 10) is shown
    expect(checks.combined_score, lambda a, b, c: (a + b + c) / 3, "buy a failure")
    expect(checks.combined_score, lambda a, b, c: 0.4 * a + 0.2 * b + 0.4 * c, "breaks every neighbour")
    expect(checks.combined_score, lambda a, b, c: min(a, b, c), "no credit")
    expect(checks.combined_score, lambda a, b, c: 3 / (1 / a + 1 / b + 1 / c), "divides by zero")
    expect(checks.combined_score, lambda a, b, c: a * b * c, "plain product")
    expect(checks.combined_score, lambda a, b, c: harmonic(a, b, c) / 100, "percent")
    expect(checks.combined_score, lambda a, b, c: max(a, b, c) if min(a, b, c) else 0.0, "buy a failure")


def test_chapter_08_reveals_count_ties_and_boundaries(capsys):
    from engramlib.checks import _common
    # 8.1: a tie for the best NS counts for every tied method; within 10 points "all about the same" too
    assert checks.neighbour_answer({"ROME": 80.0, "naive (C = I)": 40.0, "FT (one layer)": 30.0}) == {"a"}
    assert checks.neighbour_answer({"ROME": 100.0, "naive (C = I)": 100.0, "FT (one layer)": 50.0}) == {"a", "b"}
    assert checks.neighbour_answer({"ROME": 90.0, "naive (C = I)": 85.0, "FT (one layer)": 80.0}) == {"a", "d"}
    assert checks.neighbour_answer({"ROME": 75.0, "naive (C = I)": 75.0, "FT (one layer)": 75.0}) == {"a", "b", "c", "d"}
    # 8.2: a share on a boundary belongs to both choices
    assert checks.kept_answer(0.97) == {"a"} and checks.kept_answer(0.95) == {"a", "b"}
    assert checks.kept_answer(0.8) == {"b", "c"} and checks.kept_answer(0.3) == {"d"}
    # a small run shows the full-size measurement, and the full-size answer counts too
    _common.PREDICTIONS.clear()
    checks.predict("t", "?", {"a": "x", "b": "y", "c": "z"}, answer="b")
    capsys.readouterr()
    checks.reveal("t", "50 %", "why", correct={"a", "b"})
    checks.reveal("t", "50 %", "why", correct="a", full_size=("40 edits: 90 %", {"b"}))
    checks.reveal("t", "50 %", "why", correct="a")
    checks.reveal("t", "50 %", "why", correct="c", full_size=("40 edits: 90 %", "a"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("✓; measured: 50 %") and lines[2].endswith("✓; measured: 50 %")
    assert "at full size: 40 edits: 90 %" in lines[3]
    assert "(answer: 'a')" in lines[5] and "(answer: 'a' or 'c')" in lines[7]
    _common.PREDICTIONS.clear()


def attribute(mt, prompt, subject, noise_draws, *, step="delta", grad_at="corrupted", add_low=True,
              rows="noisy", module="block"):
    """Exercise 6.6's reference solution (the notebook's), with switches for the typical mistakes."""
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    batch = ids.repeat(len(noise_draws) + 1, 1)
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    names = [{"block": mt.spec.layer, "mlp": mt.spec.mlp}[module].format(l) for l in range(mt.n_layers)]

    def corrupt(h, name):
        if name != mt.spec.embedding:
            return h
        h = h.clone()
        h[1:, start:end] += noise_draws
        return h.requires_grad_()
    with TraceDict(mt.model, [mt.spec.embedding] + names, edit_output=corrupt, detach=False) as rec:
        probs = torch.softmax(mt.model(input_ids=batch).logits[:, -1].float(), -1)
    p = probs[:, probs[0].argmax()]
    grads = torch.autograd.grad(p.sum(), [rec[n].output for n in names])   # row 0: its own gradient
    h = torch.stack([rec[n].output for n in names], dim=2).detach()        # [1 + S, T, L, d]
    g = torch.stack(grads, dim=2)
    g = g[:1] if grad_at == "clean" else g[1:]
    delta = {"delta": h[:1] - h[1:], "reversed": h[1:] - h[:1], "none": torch.ones_like(h[1:]),
             "clean state": h[:1].expand_as(h[1:])}[step]
    effect = (delta * g).sum(-1)                                            # [S, T, L]
    if rows == "all":
        effect = torch.cat([torch.zeros_like(effect[:1]), effect])
        return (p.mean() + effect.mean(0)).detach()
    return ((p[1:].mean() if add_low else 0) + effect.mean(0)).detach()


def test_attribution_patching(tinyworld, capsys):
    check = lambda fn: checks.attribution_patching(fn, mt=tinyworld)
    check(attribute)
    assert "✓" in capsys.readouterr().out
    expect(check, lambda *a: attribute(*a, add_low=False), "EFFECTS")
    expect(check, lambda *a: attribute(*a, step="reversed"), "wrong sign")
    expect(check, lambda *a: attribute(*a, step="none"), "Multiply it by the step")
    expect(check, lambda *a: attribute(*a, step="clean state"), "DIFFERENCE")
    expect(check, lambda *a: attribute(*a, grad_at="clean"), "CLEAN run")
    expect(check, lambda *a: attribute(*a, rows="all"), "averaged row 0")
    expect(check, lambda *a: attribute(*a).T, "one ROW per token")
    expect(check, lambda *a: attribute(*a, module="mlp"), r"\(token \d+, layer \d+\)")

    def zero_before(*a):
        out = attribute(*a)
        out[:1] = 0
        return out
    expect(check, zero_before, "before the subject")

    def exact(mt, prompt, subject, draws):                     # the trace itself, site by site
        T = len(mt.tokenizer(prompt)["input_ids"])
        return torch.tensor([[restore(mt, prompt, subject, draws, t, l) for l in range(mt.n_layers)]
                             for t in range(T)])
    expect(check, exact, "causal trace itself")


def test_attribution_patching_check_matches_the_library(tinyworld):
    """The check's own estimate is the library's `attribution_trace_kinds` (hidden state) on the
    same noise draws."""
    from engramlib.checks.ch06_tracing import _draws, _states_and_grads, _trace_inputs
    from engramlib.tracing import _attribution_grids
    prompt, subject = "The Space Needle is in", "Space Needle"
    inputs = _trace_inputs(tinyworld, prompt, subject, _draws(tinyworld, subject, 2))
    probs, H, G = _states_and_grads(tinyworld, inputs)
    ours = probs[1:].mean() + ((H[:1] - H[1:]) * G[1:]).sum(-1).mean(0)
    lib_inputs, low, grids = _attribution_grids(tinyworld, inputs, None)
    assert lib_inputs.answer_id == inputs.answer_id
    torch.testing.assert_close(ours, low + grids[None], atol=1e-5, rtol=0)


# --- issue 26: the decision exercises of chapters 06 and 07, and the reveals' answers -----------

def test_choose_edit_layer(capsys):
    from engramlib.checks.ch06_tracing import LAYER_CHOICE_TRACE, supported_layers
    right = "mlp @ last subject token"
    assert supported_layers(LAYER_CHOICE_TRACE[right], LAYER_CHOICE_TRACE["corrupted p"]) == {3, 4, 5}
    for layer in (3, 4, 5):                                   # the plateau, not only the argmax
        checks.choose_edit_layer(layer, right)
        assert "✓" in capsys.readouterr().out
    checks.choose_edit_layer(4, " MLP @ Last Subject Token ")          # spacing and case do not matter
    assert "✓" in capsys.readouterr().out
    choose = lambda args: checks.choose_edit_layer(*args)
    expect(choose, (1, "hidden @ last subject token"), "whole residual stream")      # the hidden-state peak
    expect(choose, (11, "hidden @ last token"), "restoring the answer itself")       # the last layer's state
    expect(choose, (8, "mlp @ last token"), "last subject token")                    # the answer's token
    expect(choose, (7, "attn @ last token"), "where the answer is assembled")
    expect(choose, (3, "attn @ last subject token"), "does not edit attention")
    expect(choose, (0, right), "where the noise went in")                            # the embedding
    expect(choose, (11, right), "too late")                                          # the last layer
    expect(choose, (1, right), "HIDDEN STATE")                                       # right row, hidden peak
    expect(choose, (8, right), "LAST token")                                         # right row, last token's MLP
    expect(choose, (6, right), "at its peak")                                        # beside the plateau
    expect(choose, (4, "the MLPs"), "one row")
    expect(choose, (12, right), "layers 0 to 11")


def test_answer_6_1_counts_ties_for_every_tied_token():
    s, e = 1, 3                                                        # subject tokens 1, 2; 5 tokens
    assert checks.answer_6_1([0.1, 0.2, 0.9, 0.1, 0.7], s, e) == {"b"}
    assert checks.answer_6_1([0.1, 0.9, 0.9, 0.1, 0.7], s, e) == {"a", "b"}
    assert checks.answer_6_1([0.1, 0.2, 0.9, 0.1, 0.9], s, e) == {"b", "d"}
    assert checks.answer_6_1([0.1, 0.2, 0.5, 0.9, 0.7], s, e) == {"c"}


def test_answer_6_2_bands_and_ties():
    assert checks.answer_6_2(0.52, 0.06) == {"b"}                      # TinyWorld, 60 facts (full size)
    assert checks.answer_6_2(0.57, 0.11) == {"b"}                      # TinyWorld, 12 facts (FAST)
    assert checks.answer_6_2(0.30, 0.28) == {"c"}
    assert checks.answer_6_2(0.10, 0.30) == {"a"}
    assert checks.answer_6_2(0.30, 0.25) == {"b", "c"}                 # exactly the margin: a tie
    assert checks.answer_6_2(0.25, 0.30) == {"a", "c"}


def test_answer_6_3_sites_gaps_and_ties():
    ref = torch.tensor([[0.1, 0.1], [0.9, 0.3], [0.2, 0.6]])
    assert checks.answer_6_3(ref, ref + torch.tensor([[0., 0.], [0.02, 0.], [0., 0.]])) == {"a"}
    assert checks.answer_6_3(ref, ref + torch.tensor([[0., 0.], [0.26, 0.], [0., 0.]])) == {"b"}
    assert checks.answer_6_3(ref, ref + torch.tensor([[0., 0.], [0.05, 0.], [0., 0.]])) == {"a", "b"}
    assert checks.answer_6_3(ref, torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.2, 0.8]])) == {"c"}
    tied = torch.tensor([[0.1, 0.1], [0.9, 0.3], [0.2, 0.9]])          # the trace ties on two sites
    assert checks.answer_6_3(tied, torch.tensor([[0.1, 0.1], [0.5, 0.3], [0.2, 0.98]])) == {"b"}
    assert checks.answer_6_3(tied, torch.tensor([[0.1, 0.1], [0.9, 0.3], [0.2, 0.9]])) == {"a"}
    # sites before the subject are left out: a larger value there does not count as the top site
    assert checks.answer_6_3(ref, torch.tensor([[0.99, 0.1], [0.9, 0.3], [0.2, 0.6]]), start=1) == {"a"}


def test_answer_6_3_at_the_fast_and_full_size_of_tinyworld():
    """The Space Needle's top MLP site (the last subject token, MLP 0) measured on TinyWorld: the
    trace 0.950 and the estimate 1.012 at FAST size (5 noise samples), 0.938 and 1.194 at full size
    (10): the same answer, the same site off by more than 0.05."""
    for trace_top, estimate_top in ((0.950, 1.012), (0.938, 1.194)):
        ref = torch.tensor([[0.1, 0.1], [trace_top, 0.2], [0.3, 0.1]])
        est = ref.clone()
        est[1, 0] = estimate_top
        assert checks.answer_6_3(ref, est) == {"b"}
    assert checks.choice_between(0.26, (0.05,), "ab") == {"b"}         # what the FAST reveal falls back on


def fixed_update(W, k_star, k_write, delta, C_inv):
    u = C_inv @ k_star
    return W + torch.outer(delta, u) / (u @ k_write)


def test_find_update_bug(capsys):
    from engramlib.checks.ch07_rome import colleague_update
    checks.find_update_bug("c", fixed_update)
    assert "✓" in capsys.readouterr().out
    checks.find_update_bug(" C ", rome_weight_update)                   # the library's own update passes
    assert "✓" in capsys.readouterr().out
    bug = lambda letter: lambda fn: checks.find_update_bug(letter, fn)
    expect(bug("a"), fixed_update, "direction is right")
    expect(bug("b"), fixed_update, "describes the KEYS")
    expect(bug("d"), fixed_update, "already the residual")
    expect(bug("e"), fixed_update, "one of a, b, c, d")
    fix = bug("c")
    expect(fix, colleague_update, "colleague's update unchanged")

    def in_place(W, k_star, k_write, delta, C_inv):
        W += fixed_update(W, k_star, k_write, delta, C_inv) - W
        return W
    expect(fix, in_place, "in place")
    expect(fix, lambda W, ks, kw, d, Ci: fixed_update(W, ks, kw, d, Ci) - W, "only the change")

    def from_k_write(W, k_star, k_write, delta, C_inv):
        u = C_inv @ k_write
        return W + torch.outer(delta, u) / (u @ k_write)
    expect(fix, from_k_write, "direction changed")

    def naive(W, k_star, k_write, delta, C_inv):
        return W + torch.outer(delta, k_star) / (k_star @ k_write)
    expect(fix, naive, "C⁻¹ is gone")

    def with_C(W, k_star, k_write, delta, C_inv):
        C = torch.linalg.inv(C_inv)
        return fixed_update(W, k_star, k_write, delta, C)
    expect(fix, with_C, "C where C⁻¹ belongs")

    def by_u_norm(W, k_star, k_write, delta, C_inv):
        u = C_inv @ k_star
        return W + torch.outer(delta, u) / (u @ u)
    expect(fix, by_u_norm, "factor in front of δ")
    expect(fix, lambda W, ks, kw, d, Ci: fixed_update(W, ks, kw, d, Ci).T, "W's shape")


def test_colleague_update_is_exact_when_the_keys_agree():
    """The bug shows only where k_write ≠ k*: that is the symptom exercise 7.5 starts from."""
    from engramlib.checks.ch07_rome import _update_case, colleague_update
    W, k_star, k_write, delta, C, C_inv = _update_case()
    assert torch.allclose(colleague_update(W, k_star, k_star, delta, C_inv),
                          rome_weight_update(W, k_star, k_star, delta, C_inv))
    assert not torch.allclose(colleague_update(W, k_star, k_write, delta, C_inv) @ k_write,
                              W @ k_write + delta, atol=1e-3)


def test_answer_7_1_bands_and_ties():
    assert checks.answer_7_1(15.7) == {"c"}                            # TinyWorld, 60 other facts (FAST)
    assert checks.answer_7_1(14.8) == {"c"}                            # TinyWorld, 200 (full size)
    assert checks.answer_7_1(1.5) == {"a"}
    assert checks.answer_7_1(5.0) == {"b"}
    assert checks.answer_7_1(2.0) == {"a", "b"}
    assert checks.answer_7_1(10.0) == {"b", "c"}


def test_answer_7_2():
    assert checks.answer_7_2(" Rome", " Paris") == {"a"}
    assert checks.answer_7_2("Rome", "Rome") == {"b"}
    assert checks.answer_7_2("Paris", "Rome") == {"c"}
    assert checks.answer_7_2("London", "Paris") == {"d"}
    assert checks.answer_7_2("Rome", "London") == {"d"}
