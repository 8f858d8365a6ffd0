"""Causal tracing: the fast trace equals the loop reference; subject ranges; invariants."""
import pytest
import torch

from engramlib.facts import load_facts
from engramlib.tracing import (BUCKETS, average_indirect_effect, bucket_effects, find_subject_range,
                               noise_level, trace, trace_loop)

PROMPT, SUBJECT = "The Space Needle is located in the city of", "Space Needle"


@pytest.mark.parametrize("kind", [None, "mlp", "attn"])
def test_fast_trace_equals_loop(any_model, kind):
    prompt = "The Space Needle is in the city of"                       # short: the loop is slow
    kwargs = dict(kind=kind, samples=2, window=4, answer="Seattle")
    ref = trace_loop(any_model, prompt, SUBJECT, **kwargs)
    fast = trace(any_model, prompt, SUBJECT, max_rows=20, **kwargs)   # small chunks on purpose
    scale = max(ref.scores.max().item() - ref.low_score, 1e-12)
    assert (fast.scores - ref.scores).abs().max() < 1e-5
    assert (fast.scores - ref.scores).abs().max() / scale < 1e-3
    assert fast.low_score == pytest.approx(ref.low_score, abs=1e-6)
    assert fast.high_score == pytest.approx(ref.high_score, abs=1e-6)
    assert fast.tokens == ref.tokens and fast.subject_range == ref.subject_range


@pytest.mark.parametrize("kind,window", [("mlp", 1), ("mlp", 3), ("attn", 10), ("mlp", 11)])
def test_fast_trace_equals_loop_for_any_window(tinyworld, kind, window):
    """Window 1: no sharing; 10 and 11 on 8 layers: clipped windows make several sites identical
    and branches split at many layers. The fast trace must still give the loop's numbers."""
    prompt = "The Space Needle is in the city of"
    kwargs = dict(kind=kind, samples=2, window=window, answer="Seattle")
    ref = trace_loop(tinyworld, prompt, SUBJECT, **kwargs)
    fast = trace(tinyworld, prompt, SUBJECT, **kwargs)
    assert (fast.scores - ref.scores).abs().max() < 1e-5


def test_trace_invariants(tinyworld):
    r = trace(tinyworld, PROMPT, SUBJECT, samples=5)
    s, e = r.subject_range
    assert r.tokens[s:e] == [" Space", " Needle"] and r.answer == " Seattle"
    assert torch.allclose(r.scores[:s], torch.tensor(r.low_score))     # before the subject: nothing
    assert r.scores[-1, -1].item() == pytest.approx(r.high_score, abs=1e-5)   # last state = clean
    assert r.high_score > 0.5 > r.low_score
    assert r.noise == pytest.approx(noise_level(tinyworld, [SUBJECT]))


def test_subject_range_with_gpt2_bpe(gpt2_standin):
    tok = gpt2_standin.tokenizer
    ids = tok("The Eiffel Tower is in Paris")["input_ids"]
    s, e = find_subject_range(tok, "The Eiffel Tower is in Paris", "Eiffel Tower")
    assert tok.decode(ids[s:e]) == " Eiffel Tower"
    assert find_subject_range(tok, "Eiffel Tower is in Paris", "Eiffel Tower")[0] == 0      # at start
    s, e = find_subject_range(tok, "Paris is home to the Eiffel Tower", "Eiffel Tower")  # at end
    assert e == len(tok("Paris is home to the Eiffel Tower")["input_ids"])


def test_subject_range_errors(gpt2_standin):
    tok = gpt2_standin.tokenizer
    with pytest.raises(ValueError, match="not found.*check the spelling"):
        find_subject_range(tok, "The Eiffel Tower is in Paris", "Eifel Tower")
    with pytest.raises(ValueError, match="different casing"):
        find_subject_range(tok, "The Eiffel Tower is in Paris", "eiffel tower")
    with pytest.raises(ValueError, match="appears 2 times"):
        find_subject_range(tok, "Paris and Paris", "Paris")
    assert find_subject_range(tok, "Paris and Paris", "Paris", occurrence=1) == (2, 3)
    with pytest.raises(ValueError, match="empty subject"):
        find_subject_range(tok, "Paris", " ")


def test_bad_kind_is_rejected(tinyworld):
    with pytest.raises(ValueError, match="kind"):
        trace(tinyworld, PROMPT, SUBJECT, kind="mlpp")


def test_average_indirect_effect_buckets(tinyworld):
    facts = [f for f in load_facts() if f.subject in ("Space Needle", "Eiffel Tower") and f.relation_id == "P131"]
    aie = average_indirect_effect(tinyworld, facts, kind="mlp", samples=3, window=3, progress=False)
    assert aie.effects.shape == (len(BUCKETS), tinyworld.n_layers) and aie.n == 2
    assert aie.total_effect > 0
    single = bucket_effects(trace(tinyworld, facts[0].prompt, facts[0].subject, kind="mlp",
                                  samples=3, window=3, answer=facts[0].object,
                                  noise=noise_level(tinyworld, [f.subject for f in facts])))
    start, end = find_subject_range(tinyworld.tokenizer, facts[0].prompt, facts[0].subject)
    assert torch.isnan(single[1]).all() == (end - start <= 2)     # middle tokens exist iff > 2
