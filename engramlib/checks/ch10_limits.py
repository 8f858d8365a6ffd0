"""Checks for chapter 10: the limits of localization and of editing."""
from __future__ import annotations

from engramlib.checks._common import _call, _fail, _ok


def rewrite_score(fn):
    """Exercise 10.1: fn(p_before, p_after) -> (p_after − p_before) / (1 − p_before) (Hase et al. 2023)."""
    cases = [((0.2, 0.6), 0.5), ((0.0, 0.9), 0.9), ((0.5, 0.25), -0.5), ((0.9, 0.99), 0.9)]
    for (before, after), want in cases:
        got = _call(fn, before, after)
        try:
            got = float(got)
        except (TypeError, ValueError):
            _fail(f"return a number, got {type(got).__name__}")
        if abs(got - want) < 1e-9:
            continue
        if abs(got - (after - before)) < 1e-9:
            _fail(f"rewrite_score({before}, {after}) = {got:g}: that is the raw rise; divide it by the room "
                  "there was to rise, 1 − p_before")
        if abs(got - (after - before) / max(after, 1e-12)) < 1e-9 or abs(got - (after - before) / (1 - after)) < 1e-9:
            _fail(f"rewrite_score({before}, {after}) = {got:g}: divide by 1 − p_before (the room before the edit)")
        if abs(got - max(0.0, want)) < 1e-9:
            _fail(f"rewrite_score({before}, {after}) = {got:g}: an edit that LOWERS p(new) scores below 0; "
                  "do not clip")
        _fail(f"rewrite_score({before}, {after}): expected {want:g}, got {got:g}")
    _ok("rewrite_score")


def _table():
    """A hand-made fact table: {subject: {relation: object}}."""
    return {"Atomium": {"P131": "Brussels"},
            "Brussels": {"P17": "Belgium"}, "Paris": {"P17": "France"}, "Lyon": {"P17": "France"},
            "Belgium": {"P30": "Europe", "P37": "Dutch"}, "France": {"P30": "Europe", "P37": "French"},
            "Japan": {"P30": "Asia", "P37": "Japanese"},
            "Osaka": {"P17": "Japan"}}


RULES = {("P131", "P17"): "P17", ("P17", "P30"): "P30", ("P17", "P37"): "P37"}


def _request(subject, relation, old, new):
    return {"subject": subject, "relation_id": relation, "prompt": "{}",
            "target_true": {"str": old}, "target_new": {"str": new}}


def two_hop_checks(fn):
    """Exercise 10.2: fn(request, index, rules) -> [(relation, before, after)]: for each rule
    (edited relation, relation of the object) -> inherited relation whose edited relation is the
    request's, the inherited fact's answer with the old object and with the new one, where both are
    in the table and differ, and the subject has no stored fact of that relation."""
    index = _table()
    cases = [
        (_request("Atomium", "P131", "Brussels", "Paris"), [("P17", "Belgium", "France")],
         "a landmark moved from Brussels to Paris is now in France"),
        (_request("Osaka", "P17", "Japan", "France"), [("P30", "Asia", "Europe"), ("P37", "Japanese", "French")],
         "a city moved to another country gets that country's continent and language"),
        (_request("Lyon", "P17", "France", "Belgium"), [("P37", "French", "Dutch")],
         "France and Belgium are both in Europe: the continent does not change, so it is no ripple "
         "(skip rules whose two answers are equal)"),
        (_request("Atomium", "P131", "Brussels", "Atlantis"), [],
         "'Atlantis' is not in the table: no check can be built (skip objects the table does not know)"),
    ]
    for request, want, why in cases:
        got = _call(fn, request, index, RULES)
        if got is None:
            _fail("your function returned None: return a list of (relation, before, after) tuples")
        got_set = {tuple(x) for x in got}
        if got_set == set(want) and len(list(got)) == len(want):
            continue
        if any(len(tuple(x)) != 3 for x in got):
            _fail("each check is a tuple (relation, before, after)")
        swapped = {(r, a, b) for r, b, a in want}
        if want and got_set == swapped:
            _fail(f"{request['subject']}: before and after are swapped: 'before' comes from the OLD object "
                  "(target_true), 'after' from the new one")
        if not want and got:
            _fail(f"{request['subject']} → {request['target_new']['str']}: expected no check ({why}), got {got}")
        _fail(f"{request['subject']} → {request['target_new']['str']}: expected {sorted(want)}, got "
              f"{sorted(got_set)} ({why})")
    stored = dict(index, Atomium={"P131": "Brussels", "P17": "Belgium"})
    got = _call(fn, _request("Atomium", "P131", "Brussels", "Paris"), stored, RULES)
    if list(got):
        _fail("when the table already stores the subject's fact of the inherited relation, it is a direct "
              "fact, not a ripple: skip it (ripple_checks treats it as an 'unchanged' check)")
    _ok("two_hop_checks")


def greedy_exact_match(fn, mt=None):
    """Exercise 10.3: fn(mt, prompt, target) -> True when greedy decoding after `prompt` produces
    exactly the tokens of ' ' + target (each generated token fed back), else False."""
    from engramlib.limits import greedy_exact_match as reference
    from engramlib.facts import load_facts
    from engramlib.models import known_facts, load_model
    mt = mt or load_model("tinyworld")
    n_tokens = lambda f: len(mt.tokenizer(" " + f.object)["input_ids"])
    facts = known_facts(mt, load_facts()[::97])
    multi = known_facts(mt, [f for f in load_facts() if n_tokens(f) >= 2][::7])[:2]   # e.g. "North America"
    if len(multi) < 2 and not mt.random_weights:
        raise RuntimeError("this model knows too few multi-token objects for the check; use TinyWorld")
    cases = [(f.prompt, f.object) for f in facts[:2] + multi]
    cases += [(f.prompt, "Rome" if f.object != "Rome" else "Paris") for f in facts[:2]]
    for f in multi:                         # right first token, wrong rest: only the whole target counts
        first = mt.tokenizer.decode(mt.tokenizer(" " + f.object)["input_ids"][:1]).strip()
        cases.append((f.prompt, first + " Zzyzx"))
    for prompt, target in cases:
        want = reference(mt, prompt, target)
        got = _call(fn, mt, prompt, target)
        if not isinstance(got, bool) and got not in (0, 1):
            _fail(f"return True or False, got {got!r}")
        if bool(got) == want:
            continue
        if want is False and got:
            _fail(f"{prompt!r} → {target!r}: you said it matches, but greedy decoding does not produce the "
                  "whole target: compare EVERY token of ' ' + target, not only the first")
        _fail(f"{prompt!r} → {target!r}: greedy decoding produces the target, you said it does not. Did you "
              "tokenize the target with its leading space (' ' + target) and feed each generated token back?")
    _ok("greedy_exact_match")
