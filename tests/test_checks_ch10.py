"""Checks of chapter 10 (limits): each accepts the reference and diagnoses the mistake it is written for;
the reveals' right answers hold ties and fall back on the full-size number at the test size."""
import pytest
import torch

from engramlib import checks, limits


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def test_trace_beyond_layer(capsys):
    checks.trace_beyond_layer(lambda e, s: limits.localization_vs_editing(e, s)["trace_adds"])
    assert "✓" in capsys.readouterr().out

    def within_layers(effects, scores):           # the other control: correlate facts within each layer
        r = [torch.corrcoef(torch.stack([effects[:, j], scores[:, j]]))[0, 1] ** 2 for j in range(scores.shape[1])]
        return float(sum(r) / len(r))
    checks.trace_beyond_layer(within_layers)
    assert "✓" in capsys.readouterr().out

    pooled = lambda e, s: limits.localization_vs_editing(e, s)["correlation"]
    expect(checks.trace_beyond_layer, pooled, "correlation over all")
    expect(checks.trace_beyond_layer, lambda e, s: limits.localization_vs_editing(e, s)["r2_trace"], "correlation over all")
    expect(checks.trace_beyond_layer, lambda e, s: limits.localization_vs_editing(e, s)["r2_both"], "TOGETHER")

    def numeric_layer(effects, scores):
        n, L = scores.shape
        layer = torch.arange(L, dtype=torch.float32).repeat(n)[:, None]
        both = torch.cat([layer, effects.flatten()[:, None]], dim=1)
        return limits.r_squared(both, scores.flatten()) - limits.r_squared(layer, scores.flatten())
    expect(checks.trace_beyond_layer, numeric_layer, "indicator column per layer")
    expect(checks.trace_beyond_layer, lambda e, s: "small", "one number")


def reference_two_hop(request, index, rules):
    s, r = request["subject"], request["relation_id"]
    old, new = request["target_true"]["str"], request["target_new"]["str"]
    out = []
    for (edited, hop), inherited in rules.items():
        a, b = index.get(old, {}).get(hop), index.get(new, {}).get(hop)
        if edited == r and a and b and a != b and inherited not in index.get(s, {}):
            out.append((inherited, a, b))
    return out


def test_two_hop_checks(capsys):
    checks.two_hop_checks(reference_two_hop)
    assert "✓" in capsys.readouterr().out
    swapped = lambda q, i, r: [(x, b, a) for x, a, b in reference_two_hop(q, i, r)]
    expect(checks.two_hop_checks, swapped, "swapped")

    def keeps_equal_answers(request, index, rules):
        out = []
        for (edited, hop), inherited in rules.items():
            a = index.get(request["target_true"]["str"], {}).get(hop)
            b = index.get(request["target_new"]["str"], {}).get(hop)
            if edited == request["relation_id"] and a and b:
                out.append((inherited, a, b))
        return out
    expect(checks.two_hop_checks, keeps_equal_answers, "equal")

    def no_relation_filter(request, index, rules):        # Hint 1 ignored: every rule, whatever was edited
        return [x for (edited, hop), inherited in rules.items()
                for x in reference_two_hop(request, index, {(request["relation_id"], hop): inherited})]
    expect(checks.two_hop_checks, no_relation_filter, "EDITED relation")

    def ignores_stored(request, index, rules):
        index = {k: v for k, v in index.items()}
        index[request["subject"]] = {}
        return reference_two_hop(request, index, rules)
    expect(checks.two_hop_checks, ignores_stored, "direct fact")
    expect(checks.two_hop_checks, lambda q, i, r: None, "None")


def test_generate_answer(tinyworld, capsys):
    check = lambda fn: checks.generate_answer(fn, mt=tinyworld)
    check(limits.generate_answer)
    assert "✓" in capsys.readouterr().out

    @torch.no_grad()
    def decode(mt, prompt, steps=8, feed_back=True, stop=True, cut=True, strip=True):
        ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"]
        first = ids
        new = []
        for _ in range(steps):
            nxt = mt.model(input_ids=ids).logits[0, -1].argmax().item()
            new.append(nxt)
            if stop and any(c in mt.tokenizer.decode([nxt]) for c in limits.STOP):
                break
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1) if feed_back else first
        text = mt.tokenizer.decode(new)
        if cut:
            for c in limits.STOP:
                text = text.split(c)[0]
        return text.strip() if strip else text

    check(lambda mt, p, max_new_tokens=8: decode(mt, p))                        # the same as the reference
    assert "✓" in capsys.readouterr().out
    expect(check, lambda mt, p, max_new_tokens=8: decode(mt, p, stop=False, cut=False), "stop at the first token")
    expect(check, lambda mt, p, max_new_tokens=8: decode(mt, p, cut=False), "not part of it")
    expect(check, lambda mt, p, max_new_tokens=8: decode(mt, p, strip=False), "strip the space")
    expect(check, lambda mt, p, max_new_tokens=8: decode(mt, p, feed_back=False, stop=False), "again and again")
    expect(check, lambda mt, p, max_new_tokens=8: 1, "string")


BANDS = {"a": (0.9, 1.0), "b": (0.6, 0.9), "c": (0.0, 0.6)}


def test_banded_reveals_hold_ties_and_use_the_full_size_at_the_test_size():
    assert checks.band_choices(0.75, BANDS) == {"b"}
    assert checks.band_choices(0.9, BANDS) == {"a", "b"}                       # on the edge: a tie
    assert checks.band_choices(0.6, BANDS) == {"b", "c"}
    # Predict 10.2 at the test size: 75 % of 12 checks kept, 46 % at full size -> the full size decides
    assert checks.decided_choices(0.75, 12, BANDS, full=0.46) == {"c"}
    assert checks.decided_choices(0.75, 60, BANDS, full=0.46) == {"b"}          # a large sample decides itself
    assert checks.decided_choices(0.75, 12, BANDS, full=None) == {"b"}          # nothing quoted: the sample
    # Predict 10.3: the negation gap, at a shared edge
    negation = {"a": (-1.0, -0.2), "b": (-0.2, 0.2), "c": (0.2, 1.0)}
    assert checks.decided_choices(0.2, 40, negation) == {"b", "c"}
    assert checks.decided_choices(float("nan"), 0, negation) == set()


def test_reveal_accepts_every_tied_choice(capsys):
    checks.PREDICTIONS.clear()
    checks.predict("t.1", "?", {"a": "x", "b": "y", "c": "z"}, answer="b")
    checks.reveal("t.1", "tied", "", correct={"b", "c"})
    assert "✓" in capsys.readouterr().out
    checks.reveal("t.1", "not tied", "", correct="a")
    assert "(answer: 'a')" in capsys.readouterr().out
    checks.reveal("t.1", "undecided", "", correct=set())
    assert "cannot decide" in capsys.readouterr().out
    checks.PREDICTIONS.clear()
