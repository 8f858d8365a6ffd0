"""Checks for chapter 08: evaluating edits."""
from __future__ import annotations

import copy

import torch

from engramlib.checks._common import _call, _fail, _ok, choice_between


def edit_success(fn):
    """Exercise 8.1: fn(p_new, p_true, kind) -> fraction of prompts where the edit 'succeeds':
    kind "rewrite"/"paraphrase": P(new) > P(true); kind "neighborhood": P(true) > P(new) (strictly:
    a tie is no success, as in the reference code)."""
    p_new = torch.tensor([0.9, 0.2, 0.6, 0.1, 0.3])
    p_true = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.3])          # the last prompt is a tie
    n = len(p_new)
    near = lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(b))
    for kind, expected in (("rewrite", 0.6), ("paraphrase", 0.6), ("neighborhood", 0.2)):
        got = _call(fn, p_new, p_true, kind)
        if torch.is_tensor(got) and got.numel() != 1:
            _fail(f"kind {kind!r}: return one number, the fraction of successes (the mean of the "
                  f"comparison), not one value per prompt (got shape {tuple(got.shape)})")
        got = float(got)
        flipped = 0.6 if kind == "neighborhood" else 0.2
        ties_count = 0.4 if kind == "neighborhood" else 0.8
        if near(got, flipped):
            _fail(f"kind {kind!r}: that is the opposite comparison. " +
                  ("For neighbourhood prompts success is the OPPOSITE: other subjects must keep their "
                   "true object, P(true) > P(new)" if kind == "neighborhood" else
                   "On rewrite and paraphrase prompts the edit succeeds when P(new) > P(true)"))
        if near(got, expected * n):
            _fail(f"kind {kind!r}: got {got:g}, a count; return a fraction (the mean of the successes)")
        if near(got, 100 * expected):
            _fail(f"kind {kind!r}: got {got:g}, a percentage; return a fraction between 0 and 1")
        if near(got, ties_count):
            _fail(f"kind {kind!r}: a tie (P(new) = P(true)) counted as a success; compare strictly (>), as "
                  "the reference code does" + (" (1 − the rewrite rate counts ties as successes)"
                                               if kind == "neighborhood" else ""))
        if not near(got, expected):
            _fail(f"kind {kind!r}: expected {expected}, got {got:g}")
    _ok("edit_success")


# --- scores over records -----------------------------------------------------------------------------

GROUPS = (("ES", "EM", "rewrite"), ("PS", "PM", "paraphrase"), ("NS", "NM", "neighborhood"))


def _records():
    """Three TinyWorld records, unedited: two as they are (the new object loses everywhere), one with
    new and true objects swapped (it 'wins') and fewer paraphrase and neighbourhood prompts, so
    pooling the prompts and flipping a comparison both give numbers of their own."""
    from engramlib.facts import counterfact_records
    full = [r for r in counterfact_records()
            if len(r["paraphrase_prompts"]) >= 2 and len(r["neighborhood_prompts"]) >= 4]
    a, b, c = full[0], full[len(full) // 3], full[2 * len(full) // 3]
    rw = dict(b["requested_rewrite"], target_new=b["requested_rewrite"]["target_true"],
              target_true=b["requested_rewrite"]["target_new"])
    b = dict(b, requested_rewrite=rw, paraphrase_prompts=b["paraphrase_prompts"][:1],
             neighborhood_prompts=b["neighborhood_prompts"][:2])
    return [a, b, c]


def _per_prompt(mt, records) -> list:
    """For each record, {kind: (p_new [n], p_true [n])} from `evaluate.compare_targets`."""
    from engramlib.evaluate import compare_targets
    out = []
    for r in records:
        rw = r["requested_rewrite"]
        prompts = {"rewrite": [rw["prompt"].format(rw["subject"])], "paraphrase": list(r["paraphrase_prompts"]),
                   "neighborhood": list(r["neighborhood_prompts"])}
        c = {k: compare_targets(mt, p, rw["target_new"]["str"], rw["target_true"]["str"]) for k, p in prompts.items()}
        out.append({k: (v["p_new"], v["p_true"]) for k, v in c.items()})
    return out


def _aggregate(per_prompt, success, magnitude, pooled=False) -> dict:
    """Scores in percent from per-prompt probabilities. success(p_new, p_true, kind) -> bool [n],
    magnitude(...) -> [n]; pooled: average over all prompts instead of per record first."""
    out = {}
    for score, mag, kind in GROUPS:
        s = [success(*r[kind], kind).float() for r in per_prompt]
        m = [magnitude(*r[kind], kind).float() for r in per_prompt]
        if pooled:
            out[score], out[mag] = 100 * torch.cat(s).mean().item(), 100 * torch.cat(m).mean().item()
        else:
            out[score] = 100 * sum(x.mean().item() for x in s) / len(s)
            out[mag] = 100 * sum(x.mean().item() for x in m) / len(m)
    return out


def _right(p_new, p_true, kind):
    return p_true > p_new if kind == "neighborhood" else p_new > p_true


def _gap(p_new, p_true, kind):
    return p_true - p_new if kind == "neighborhood" else p_new - p_true


def edit_scores(fn, mt=None):
    """Exercise 8.2: fn(mt, records) -> {"ES", "PS", "NS", "EM", "PM", "NM"} in percent on the model as
    it is: each record's success rate and mean probability gap per kind of prompt, then the mean
    over records (as `evaluate.summarize` and the reference code). Checked in two steps: the three
    success scores, then the three magnitudes."""
    from engramlib.models import load_model
    mt = mt if mt is not None and mt.name == "tinyworld" else load_model("tinyworld", device="cpu")
    records = _records()
    got = _call(fn, mt, copy.deepcopy(records))           # a copy: yours may change it
    per_prompt = _per_prompt(mt, records)
    ref = _aggregate(per_prompt, _right, _gap)          # = evaluate.summarize(record_metrics) (tested)
    if not isinstance(got, dict):
        _fail(f'return a dict {{"ES": ..., "PS": ..., "NS": ..., "EM": ..., "PM": ..., "NM": ...}}, got '
              f"{type(got).__name__}")
    missing = [k for k in ("ES", "PS", "NS", "EM", "PM", "NM") if k not in got]
    if missing:
        _fail(f"the dict lacks {missing}: return all six scores")
    got = {k: float(got[k]) for k in ("ES", "PS", "NS", "EM", "PM", "NM")}
    near = lambda a, b: abs(a - b) < 1e-3
    pooled = _aggregate(per_prompt, _right, _gap, pooled=True)
    flipped = _aggregate(per_prompt, lambda n, t, k: t > n if k != "neighborhood" else n > t,
                         lambda n, t, k: -_gap(n, t, k))
    unflipped = _aggregate(per_prompt, lambda n, t, k: n > t, lambda n, t, k: n - t)
    for step, keys in (("step 1, the success scores", ("ES", "PS", "NS")),
                       ("step 2, the magnitudes", ("EM", "PM", "NM"))):
        for key in keys:
            if near(got[key], ref[key]):
                continue
            where = f"{step}: {key} = {got[key]:.2f}, expected {ref[key]:.2f}"
            if near(100 * got[key], ref[key]):
                _fail(f"{where}: report percent (× 100), as the paper's tables")
            if near(got[key], pooled[key]):
                _fail(f"{where}: you pooled the prompts of all records; average within each record "
                      "first, then over the records (a record with many neighbours must not weigh more)")
            if key in ("NS", "NM") and near(got[key], unflipped[key]):
                _fail(f"{where}: on neighbourhood prompts the edit succeeds when the TRUE object still "
                      "wins, P(true) > P(new) (kind \"neighborhood\")" +
                      (", and the magnitude is P(true) − P(new)" if key == "NM" else ""))
            if near(got[key], flipped[key]):
                _fail(f"{where}: the comparison is the wrong way round")
            _fail(f"{where}. Score every prompt with evaluate.compare_targets(mt, prompts, new, true)")
    _ok("edit_scores")


def combined_score(fn):
    """Exercise 8.3: fn(ES, PS, NS) -> one score for an edit method, in percent, designed so that
    (1) a method at x on all three scores x, (2) a method that fails one of them completely scores 0,
    (3) excellence on two cannot buy a failure on the third, (4) improving any one of them raises it.
    Any design with these properties passes; Meng et al. (2022) use the harmonic mean."""
    def score(*args):
        try:
            return float(fn(*args))
        except NotImplementedError:
            raise
        except ZeroDivisionError:
            _fail(f"S{args} divides by zero: a score of 0 has no reciprocal or logarithm, so decide what a "
                  "method that fails one metric completely deserves, and return it before dividing")
        except Exception as err:
            _fail(f"your function raised {type(err).__name__}: {err}")
    for x in (20.0, 75.0, 100.0):
        got = score(x, x, x)
        if abs(got - x) < 1e-6:
            continue
        if abs(got - x / 100) < 1e-6:
            _fail(f"S({x:g}, {x:g}, {x:g}) = {got:g}: keep the scores' scale, percent (a method at {x:g} on "
                  f"everything should score {x:g})")
        if abs(got - x ** 3) < 1e-3 or abs(got - x ** 3 / 1e4) < 1e-3:
            _fail(f"S({x:g}, {x:g}, {x:g}) = {got:g}: a plain product changes the scale (a method at {x:g} on "
                  f"everything should score {x:g}); take the product's cube root, or another mean")
        _fail(f"S({x:g}, {x:g}, {x:g}) = {got:g}: a method at {x:g} on all three should score {x:g}")
    lopsided, even = score(100.0, 100.0, 10.0), score(70.0, 70.0, 70.0)
    if lopsided >= even:
        _fail(f"S(100, 100, 10) = {lopsided:g} is not below S(70, 70, 70) = {even:g}: a method that leaks "
              "into 90 % of the neighbours scores as well as one that is decent everywhere; perfect efficacy "
              "and generalisation must not buy a failure of specificity (the arithmetic mean lets them)")
    zero = score(100.0, 100.0, 0.0)
    if zero != 0.0:
        _fail(f"S(100, 100, 0) = {zero:g}: an edit that breaks every neighbour (NS = 0) is no usable edit, "
              "whatever its efficacy; the score should be 0")
    better = score(90.0, 60.0, 60.0)
    if better <= score(60.0, 60.0, 60.0):
        _fail(f"S(90, 60, 60) = {better:g} is not above S(60, 60, 60): a method that improves one metric "
              "gets no credit (the minimum ignores everything but the worst score)")
    print(f"  your S(100, 100, 10) = {lopsided:.1f}, S(90, 60, 60) = {better:.1f}; the paper's S, the harmonic "
          f"mean, gives {3 / (1 / 100 + 1 / 100 + 1 / 10):.1f} and {3 / (1 / 90 + 2 / 60):.1f}")
    _ok("combined_score")


# --- the answers of the chapter's predictions: a tie or a boundary value counts for every side -------

METHOD_CHOICES = {"ROME": "a", "naive (C = I)": "b", "FT (one layer)": "c"}


def neighbour_answer(ns: dict) -> set:
    """Predict 8.1's right choices from {method: NS}: every method tied for the highest NS, and 'd'
    ('all about the same') when the NS of all methods lie within 10 points (10 included)."""
    best, worst = max(ns.values()), min(ns.values())
    out = {METHOD_CHOICES[name] for name, value in ns.items() if value >= best - 1e-9}
    return out | (choice_between(best - worst, [10.0], "dx") - {"x"})


def kept_answer(kept: float) -> set:
    """Predict 8.2's right choices from the fraction of unrelated facts kept: 'a' 95 % or more,
    'b' 80-95 %, 'c' 50-80 %, 'd' below 50 % (a value on a boundary counts for both sides)."""
    return choice_between(float(kept), [0.5, 0.8, 0.95], "dcba")


# What the chapter measures on TinyWorld at full size (ENGRAM_FAST unset, CPU), shown next to a small
# run's numbers by the reveals, whose right choices count too: (measurement, right choices). 8.2 was
# measured with the notebook's code at 6 and 40 edits (6: 99.3 % kept, all 6 edits hold). 8.1 needs
# none: at the FAST size ROME's NS already leads both other edits by 20 points or more on TinyWorld
# (the chapter's asserts).
FULL_SIZE_08 = {
    "8.2": ("40 edits: 86.0 % of 150 unrelated facts kept, 97.5 % of the edits hold", kept_answer(0.86)),
}
