"""Checks of chapter 10 (limits): each accepts the reference and diagnoses the mistake it is written for."""
import pytest
import torch

from engramlib import checks, limits


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def test_rewrite_score(capsys):
    checks.rewrite_score(limits.rewrite_score)
    assert "✓" in capsys.readouterr().out
    expect(checks.rewrite_score, lambda b, a: a - b, "raw rise")
    expect(checks.rewrite_score, lambda b, a: (a - b) / (1 - a), "1 − p_before")
    expect(checks.rewrite_score, lambda b, a: max(0.0, (a - b) / (1 - b)), "do not clip")
    expect(checks.rewrite_score, lambda b, a: "high", "number")


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

    def ignores_stored(request, index, rules):
        index = {k: v for k, v in index.items()}
        index[request["subject"]] = {}
        return reference_two_hop(request, index, rules)
    expect(checks.two_hop_checks, ignores_stored, "direct fact")
    expect(checks.two_hop_checks, lambda q, i, r: None, "None")


def test_greedy_exact_match(tinyworld, capsys):
    checks.greedy_exact_match(limits.greedy_exact_match, mt=tinyworld)
    assert "✓" in capsys.readouterr().out

    @torch.no_grad()
    def first_token_only(mt, prompt, target):
        ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return mt.model(input_ids=ids).logits[0, -1].argmax().item() == mt.tokenizer(" " + target)["input_ids"][0]
    expect(lambda fn: checks.greedy_exact_match(fn, mt=tinyworld), first_token_only, "EVERY token")

    @torch.no_grad()
    def no_space(mt, prompt, target):
        ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"]
        for token in mt.tokenizer(target)["input_ids"]:
            nxt = mt.model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt != token:
                return False
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
        return True
    expect(lambda fn: checks.greedy_exact_match(fn, mt=tinyworld), no_space, "leading space")
