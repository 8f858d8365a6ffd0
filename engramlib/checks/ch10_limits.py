"""Checks for chapter 10: the limits of localization and of editing."""
from __future__ import annotations

import torch

from engramlib.checks._common import _call, _fail, _ok


def _layer_tables(seed=0, n=40):
    """Synthetic (fact × layer) tables with a known answer. Four layers whose mean success falls as a
    curve (not a straight line); returns {name: (effects, scores, what the trace adds)}."""
    g = torch.Generator().manual_seed(seed)
    curve = torch.tensor([0.95, 0.10, 0.05, 0.02])
    noise = lambda scale: scale * torch.randn(n, 4, generator=g)
    own = torch.rand(n, 4, generator=g)
    return {
        # the trace and the success both follow the layer, and nothing else links them
        "layer only": (curve + noise(0.03), curve + noise(0.05), "none"),
        # within every layer, the facts that trace more strongly are the ones that edit better
        "trace within layers": (own, 0.3 * curve + 0.7 * own + noise(0.02), "much"),
    }


def trace_beyond_layer(fn):
    """Exercise 10.1: fn(effects, scores) -> a number near 0 when the trace effect says nothing about
    edit success that the layer does not already say, and large when it does (Hase et al. 2023).
    effects, scores: [n_facts, n_layers]."""
    from engramlib.limits import localization_vs_editing
    for name, (effects, scores, adds) in _layer_tables().items():
        got = _call(fn, effects.clone(), scores.clone(),
                    shape_hint="effects and scores are [n_facts, n_layers]: one row per fact, one column per layer")
        try:
            got = float(got)
        except (TypeError, ValueError):
            _fail(f"return one number, got {type(got).__name__}")
        if got != got:
            _fail("your function returned NaN: a correlation within a layer whose scores are all equal is "
                  "undefined; measure with something that stays defined (a fit's R², say)")
        stats = localization_vs_editing(effects, scores)
        pooled_r = stats["correlation"]
        if adds == "none" and got > 0.1:
            if abs(got - pooled_r) < 1e-3 or abs(got - pooled_r ** 2) < 1e-3:
                _fail(f"on a table where the trace carries nothing beyond the layer you returned {got:.2f}, the "
                      "correlation over all (fact, layer) pairs: both the trace and the success fall with the "
                      "layer, so they correlate through the layer alone. Compare facts WITHIN a layer, or ask what "
                      "the trace explains on top of the layer")
            if abs(got - _numeric_layer_adds(effects, scores)) < 1e-3:
                _fail(f"on a table where the trace carries nothing beyond the layer you returned {got:.2f}: the layer "
                      "entered your fit as one number (a straight line in the layer index), which cannot follow a "
                      "curve like 0.95, 0.10, 0.05, 0.02, so the trace soaks up what the line misses. Give each layer "
                      "its own value (one indicator column per layer)")
            if abs(got - stats["r2_both"]) < 1e-3:
                _fail(f"you returned {got:.2f}, what the layer and the trace explain TOGETHER; the question is what "
                      "the trace adds to what the layer alone explains")
            _fail(f"on a table where the success depends on the layer only (the trace follows the layer too, "
                  f"nothing else) you returned {got:.2f}; expected about 0")
        if adds == "much" and not 0.3 < got <= 1.0 + 1e-9:
            _fail(f"on a table where, within every layer, the facts that trace more strongly edit better, you "
                  f"returned {got:.2f}; expected a clearly positive share (the reference: "
                  f"{stats['trace_adds']:.2f})")
    _ok("trace_beyond_layer")


def _numeric_layer_adds(effects, scores):
    """What the trace adds to a fit on the layer's INDEX (one number, a straight line): the mistake
    that the "layer only" table catches."""
    from engramlib.limits import r_squared
    n, L = scores.shape
    layer = torch.arange(L, dtype=torch.float32).repeat(n)[:, None]
    both = torch.cat([layer, effects.flatten()[:, None]], dim=1)
    return r_squared(both, scores.flatten()) - r_squared(layer, scores.flatten())


def _table():
    """A hand-made fact table: {subject: {relation: object}}."""
    return {"Atomium": {"P131": "Brussels"},
            "Brussels": {"P17": "Belgium"}, "Paris": {"P17": "France"}, "Lyon": {"P17": "France"},
            "Belgium": {"P30": "Europe", "P37": "Dutch"}, "France": {"P30": "Europe", "P37": "French"},
            "Japan": {"P30": "Asia", "P37": "Japanese"},
            "Osaka": {"P17": "Japan"}}


RULES = {("P131", "P17"): "P17", ("P159", "P17"): "P17", ("P17", "P30"): "P30", ("P17", "P37"): "P37"}


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
        (_request("Belgium", "P36", "Brussels", "Paris"), [],
         "the edit is about Belgium's capital (P36); no rule starts from that relation, so nothing ripples "
         "(Brussels and Paris have countries, but 'the country of Belgium's capital' is not a fact of Belgium)"),
    ]
    for request, want, why in cases:
        got = _call(fn, request, index, RULES)
        if got is None:
            _fail("your function returned None: return a list of (relation, before, after) tuples")
        got = list(got)
        if any(len(tuple(x)) != 3 for x in got):
            _fail("each check is a tuple (relation, before, after)")
        got_set = {tuple(x) for x in got}
        if got_set == set(want) and len(got) == len(want):
            continue
        who = f"{request['subject']} ({request['relation_id']}) → {request['target_new']['str']}"
        if got_set == set(want) and len(got) > len(want):
            _fail(f"{who}: the same check appears {len(got) - len(want) + 1} times: two rules lead to the same "
                  "inherited relation, and only one of them starts from the EDITED relation; a rule applies only "
                  "when its first relation is the request's relation_id")
        swapped = {(r, a, b) for r, b, a in want}
        if want and got_set == swapped:
            _fail(f"{who}: before and after are swapped: 'before' comes from the OLD object "
                  "(target_true), 'after' from the new one")
        if not want and got:
            _fail(f"{who}: expected no check ({why}), got {got}")
        _fail(f"{who}: expected {sorted(want)}, got {sorted(got_set)} ({why})")
    stored = dict(index, Atomium={"P131": "Brussels", "P17": "Belgium"})
    got = _call(fn, _request("Atomium", "P131", "Brussels", "Paris"), stored, RULES)
    if list(got):
        _fail("when the table already stores the subject's fact of the inherited relation, it is a direct "
              "fact, not a ripple: skip it (ripple_checks treats it as an 'unchanged' check)")
    _ok("two_hop_checks")


def generate_answer(fn, mt=None):
    """Exercise 10.3: fn(mt, prompt, max_new_tokens=8) -> the model's own answer: greedy decoding, each
    token fed back, up to the first stop character (. , ; newline) or the end-of-text token; the text
    before the stop, stripped."""
    from engramlib.facts import load_facts
    from engramlib.limits import generate_answer as reference
    from engramlib.models import known_facts, load_model
    mt = mt or load_model("tinyworld")
    facts = known_facts(mt, load_facts()[::97])[:3] or load_facts()[:3]      # a random stand-in knows none
    multi = [f for f in known_facts(mt, load_facts()[::7]) if len(mt.tokenizer(" " + f.object)["input_ids"]) >= 2][:2]
    prompts = [f.prompt for f in facts + multi] + ["It is not true that " + facts[0].prompt]
    for prompt in prompts:
        want = reference(mt, prompt)
        got = _call(fn, mt, prompt)
        if not isinstance(got, str):
            _fail(f"return the decoded answer as a string, got {type(got).__name__}")
        if got == want:
            continue
        words = got.split()
        if len(words) > 1 and len(set(words)) == 1:
            _fail(f"{prompt!r}: you returned {got!r}: the same token again and again. Append each generated token "
                  "to the input before predicting the next one")
        if got.strip() == want:
            _fail(f"{prompt!r}: you returned {got!r}: strip the space that GPT-2 puts in front of a word")
        if want and got.strip().rstrip(".,;").strip() == want:
            _fail(f"{prompt!r}: you returned {got!r}: the stop character ends the answer but is not part of it")
        if want and got.startswith(want):
            _fail(f"{prompt!r}: you returned {got!r}, the model's answer is {want!r}: stop at the first token that "
                  "holds a stop character, not after a fixed number of tokens")
        _fail(f"{prompt!r}: expected {want!r}, got {got!r}. Greedy means the argmax of the last position's "
              "logits at every step")
    _ok("generate_answer")
