"""Causal tracing: the fast trace equals the loop reference; subject ranges; the noise; the AIE."""
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from engramlib.facts import load_facts
from engramlib.models import ModelAndTokenizer, find_subject_range
from engramlib.tracing import (BUCKETS, TraceResult, average_indirect_effect, bucket_effects,
                               noise_level, trace, trace_loop)

PROMPT, SUBJECT = "The Space Needle is located in the city of", "Space Needle"
SHORT = "The Space Needle is in the city of"           # short: the loop is slow
AT_START = "Space Needle is in the city of"             # subject at token 0, as the AIE prompts


@pytest.mark.parametrize("model", ["tinyworld", "gpt2_shapes_4_layers"])
@pytest.mark.parametrize("kind", [None, "mlp", "attn"])
def test_fast_trace_equals_loop(request, model, kind):
    """On TinyWorld and on GPT-2 small's shapes (width 768, 12 heads, 50,257 tokens; 4 layers keep
    the loop's cost down: it grows with depth squared)."""
    any_model = request.getfixturevalue(model)
    kwargs = dict(kind=kind, samples=2, window=4, answer="Seattle")
    ref = trace_loop(any_model, SHORT, SUBJECT, **kwargs)
    fast = trace(any_model, SHORT, SUBJECT, max_rows=20, **kwargs)   # small chunks on purpose
    scale = max(ref.scores.max().item() - ref.low_score, 1e-12)
    assert (fast.scores - ref.scores).abs().max() < 1e-5
    assert (fast.scores - ref.scores).abs().max() / scale < 1e-3
    assert fast.low_score == pytest.approx(ref.low_score, abs=1e-6)
    assert fast.high_score == pytest.approx(ref.high_score, abs=1e-6)
    assert fast.tokens == ref.tokens and fast.subject_range == ref.subject_range


@pytest.mark.parametrize("prompt,kind,window", [
    (SHORT, "mlp", 1), (SHORT, "attn", 1), (SHORT, "mlp", 3), (SHORT, "attn", 10),
    (SHORT, "mlp", 11), (AT_START, None, 10), (AT_START, "mlp", 10), (AT_START, "attn", 1)])
def test_fast_trace_equals_loop_for_any_window_and_subject_position(tinyworld, prompt, kind, window):
    """Window 1: each site restores its own layer only; 10 and 11 on 8 layers: clipped windows
    coincide. Subject at token 0: every token is traced, none is skipped."""
    kwargs = dict(kind=kind, samples=2, window=window, answer="Seattle")
    ref = trace_loop(tinyworld, prompt, SUBJECT, **kwargs)
    fast = trace(tinyworld, prompt, SUBJECT, max_rows=6, **kwargs)
    assert ref.subject_range[0] == (0 if prompt == AT_START else 1)
    assert (fast.scores - ref.scores).abs().max() < 1e-5


def test_loop_scores_before_the_subject_equal_the_corrupted_score(tinyworld):
    """Before the subject, the clean and corrupted runs are the same, so restoring changes nothing
    (the fast trace relies on this and skips those tokens)."""
    r = trace_loop(tinyworld, SHORT, SUBJECT, samples=2)
    s, e = r.subject_range
    assert s == 1
    assert torch.allclose(r.scores[:s], torch.tensor(r.low_score), atol=1e-6)
    assert (r.scores[s:e] - r.low_score).abs().max() > 0.01          # the subject tokens do matter


def test_trace_invariants(tinyworld):
    r = trace(tinyworld, PROMPT, SUBJECT, samples=5)
    s, e = r.subject_range
    assert r.tokens[s:e] == [" Space", " Needle"] and r.answer == " Seattle"
    assert r.scores[-1, -1].item() == pytest.approx(r.high_score, abs=1e-5)   # last state = clean
    assert r.high_score > 0.5 > r.low_score


@pytest.mark.parametrize("fn", [trace, trace_loop], ids=["trace", "trace_loop"])
def test_bad_arguments_are_rejected(tinyworld, fn):
    with pytest.raises(ValueError, match="kind"):
        fn(tinyworld, PROMPT, SUBJECT, kind="mlpp")
    with pytest.raises(ValueError, match="window must be >= 1"):
        fn(tinyworld, PROMPT, SUBJECT, kind="mlp", window=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        fn(tinyworld, PROMPT, SUBJECT, samples=0)


def test_noise_level_scales_with_factor_and_reads_only_the_subjects_rows(tinyworld):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                       vocab_size=tinyworld.model.config.vocab_size))
    mt = ModelAndTokenizer(model=model, tokenizer=tinyworld.tokenizer, name="tiny")
    sigma = noise_level(mt, [SUBJECT], factor=1.0)
    assert noise_level(mt, [SUBJECT], factor=3.0) == pytest.approx(3 * sigma)
    ids = tinyworld.tokenizer(" " + SUBJECT)["input_ids"]
    emb = model.transformer.wte.weight
    with torch.no_grad():
        others = torch.ones(emb.shape[0], dtype=torch.bool)
        others[ids] = False
        emb[others] *= 10                              # every other row: no effect
        assert noise_level(mt, [SUBJECT], factor=1.0) == pytest.approx(sigma)
        emb[ids] *= 2                                  # the subject's rows: twice the spread
        assert noise_level(mt, [SUBJECT], factor=1.0) == pytest.approx(2 * sigma)
    with pytest.raises(ValueError, match="no subjects"):
        noise_level(mt, [])


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


# --- averages over facts, on hand-made traces (one layer) ---------------------------------------

def _result(scores, low, high, subject_range):
    scores = torch.tensor(scores).view(-1, 1)
    return TraceResult(scores=scores, low_score=low, high_score=high, tokens=["t"] * len(scores),
                       subject_range=subject_range, answer=" X", kind="mlp", window=3, noise=1.0)


# indirect effects (score - low) per token, and the buckets they fall into:
#   A: subject = tokens 1-4, 8 tokens: first .2 | middle (.4 + .6) / 2 | last .8 | next .3 | further .1 | last .5
#   B: subject = tokens 0-1, 4 tokens: first .4 | middle -  | last 0 | next .3 | further -  | last .1
#   C: subject = token 1, 6 tokens:    first .6 | middle -  | last .6 | next .2 | further (.3 + .5) / 2 | last .3
HAND_MADE = {
    "A": _result([0.1, 0.3, 0.5, 0.7, 0.9, 0.4, 0.2, 0.6], low=0.1, high=0.95, subject_range=(1, 5)),
    "B": _result([0.6, 0.2, 0.5, 0.3], low=0.2, high=0.8, subject_range=(0, 2)),
    "C": _result([0.0, 0.6, 0.2, 0.3, 0.5, 0.3], low=0.0, high=0.5, subject_range=(1, 2)),
}


def test_bucket_effects_assign_tokens_to_the_papers_buckets():
    nan = float("nan")
    expected = {"A": [0.2, 0.5, 0.8, 0.3, 0.1, 0.5], "B": [0.4, nan, 0.0, 0.3, nan, 0.1],
                "C": [0.6, nan, 0.6, 0.2, 0.4, 0.3]}
    for name, values in expected.items():
        got = bucket_effects(HAND_MADE[name])
        assert got.shape == (len(BUCKETS), 1)
        torch.testing.assert_close(got[:, 0], torch.tensor(values), equal_nan=True)


def test_average_indirect_effect_means_and_confidence_intervals():
    calls = []

    def tracer(mt, prompt, subject, **kwargs):
        calls.append((prompt, subject, kwargs))
        return HAND_MADE[subject]
    facts = [SimpleNamespace(prompt=f"{s} is in", subject=s, object="X") for s in "ABC"]
    aie = average_indirect_effect(None, facts, kind="mlp", samples=4, noise=0.5, window=3,
                                  tracer=tracer, progress=False)
    assert [c[2] for c in calls] == [dict(kind="mlp", samples=4, noise=0.5, window=3, answer="X")] * 3
    # means over the facts that have the bucket; CI half-width 1.96 s / sqrt(n), s with n - 1
    means = [0.4, 0.5, 1.4 / 3, 0.8 / 3, 0.25, 0.3]
    s_first = 0.2                                        # .2 .4 .6
    s_last = (((0.8 - 1.4 / 3) ** 2 + (1.4 / 3) ** 2 + (0.6 - 1.4 / 3) ** 2) / 2) ** 0.5
    s_next = ((2 * (0.3 - 0.8 / 3) ** 2 + (0.2 - 0.8 / 3) ** 2) / 2) ** 0.5
    s_further = ((0.1 - 0.25) ** 2 + (0.4 - 0.25) ** 2) ** 0.5
    s_final = 0.2                                        # .5 .1 .3
    half = lambda s, n: 1.96 * s / n ** 0.5
    torch.testing.assert_close(aie.effects[:, 0], torch.tensor(means))
    ci = aie.ci[:, 0]
    torch.testing.assert_close(ci[[0, 2, 3, 4, 5]], torch.tensor(
        [half(s_first, 3), half(s_last, 3), half(s_next, 3), half(s_further, 2), half(s_final, 3)]))
    assert aie.n == 3 and aie.kind == "mlp"
    assert aie.high_score == pytest.approx((0.95 + 0.8 + 0.5) / 3)
    assert aie.low_score == pytest.approx(0.1)
    assert aie.total_effect == pytest.approx(0.75 - 0.1)
    with pytest.raises(ValueError, match="no facts"):
        average_indirect_effect(None, [], tracer=tracer)


def test_average_indirect_effect_on_tinyworld(tinyworld):
    facts = [f for f in load_facts() if f.subject in ("Space Needle", "Eiffel Tower") and f.relation_id == "P131"]
    aie = average_indirect_effect(tinyworld, facts, kind="mlp", samples=3, window=3, progress=False)
    assert aie.effects.shape == (len(BUCKETS), tinyworld.n_layers) and aie.n == 2
    assert aie.total_effect > 0
