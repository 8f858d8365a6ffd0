"""Checks for chapter 08: evaluating edits."""
from __future__ import annotations

import copy

import torch

from engramlib.checks._common import _call, _fail, _ok


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


def harmonic_score(fn):
    """Exercise 8.3: fn(ES, PS, NS) -> their harmonic mean (0 if any is 0)."""
    got = float(_call(fn, 100.0, 50.0, 100.0))
    if abs(got - 250 / 3) < 1e-6:
        _fail("that is the arithmetic mean; the score is the HARMONIC mean 3 / (1/ES + 1/PS + 1/NS), "
              "which punishes a method that fails on any one of the three")
    if abs(got - 75.0) > 1e-6:
        _fail(f"expected 75.0 for (100, 50, 100), got {got}")
    try:
        zero = float(fn(100.0, 0.0, 100.0))
    except ZeroDivisionError:
        _fail("dividing by zero when a score is 0: the harmonic mean is 0 then (test for it first)")
    except NotImplementedError:
        raise
    except Exception as err:
        _fail(f"your function raised {type(err).__name__}: {err}")
    if zero != 0.0:
        _fail(f"a score of 0 on any metric gives S = 0 (got {zero:g})")
    _ok("harmonic_score")
