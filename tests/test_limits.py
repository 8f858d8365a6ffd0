"""engramlib.limits: the chapter 10 experiments, each checked on inputs whose answer is known."""
from dataclasses import replace

import pytest
import torch

from engramlib import lens, limits, rome
from engramlib.facts import Fact, counterfact_records, load_facts
from engramlib.models import known_facts


def test_rewrite_score_is_the_share_of_the_possible_rise():
    assert limits.rewrite_score(0.2, 0.6) == pytest.approx(0.5)
    assert limits.rewrite_score(0.5, 0.25) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="p_before"):
        limits.rewrite_score(1.0, 1.0)


def test_r_squared_of_exact_and_of_unrelated_data():
    x = torch.linspace(0, 1, 50)[:, None]
    assert limits.r_squared(x, 2 * x[:, 0] + 1) == pytest.approx(1.0)
    noise = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    assert limits.r_squared(torch.randn(2000, 1, generator=torch.Generator().manual_seed(1)), noise) < 0.01


def test_localization_vs_editing_separates_layer_from_trace():
    g = torch.Generator().manual_seed(0)
    effects = torch.rand(30, 4, generator=g)
    by_layer = torch.tensor([0.9, 0.5, 0.1, 0.0]).repeat(30, 1)          # success set by the layer alone
    out = limits.localization_vs_editing(effects, by_layer)
    assert out["r2_layer"] == pytest.approx(1.0) and abs(out["trace_adds"]) < 1e-9
    out = limits.localization_vs_editing(effects, 3 * effects)            # success = the trace
    assert out["r2_trace"] == pytest.approx(1.0) and out["best_layer_agrees"] == 1.0
    assert out["trace_adds"] > 0.5


TABLE = [Fact("Atomium", "P131", "Brussels"), Fact("Brussels", "P17", "Belgium"),
         Fact("Paris", "P17", "France"), Fact("Belgium", "P30", "Europe"), Fact("Belgium", "P37", "Dutch"),
         Fact("France", "P30", "Europe"), Fact("France", "P37", "French"), Fact("France", "P36", "Paris"),
         Fact("Japan", "P30", "Asia"), Fact("Japan", "P37", "Japanese"), Fact("Osaka", "P17", "Japan")]


def request(subject, relation, old, new):
    return {"subject": subject, "relation_id": relation, "prompt": "{}",
            "target_true": {"str": old}, "target_new": {"str": new}}


def test_ripple_checks_from_a_hand_made_table():
    checks = limits.ripple_checks(request("Atomium", "P131", "Brussels", "Paris"), TABLE)
    assert [(c.kind, c.relation_id, c.before, c.after) for c in checks] == [("implied", "P17", "Belgium", "France")]
    assert checks[0].prompt == "Atomium is located in the country of"
    checks = limits.ripple_checks(request("Osaka", "P17", "Japan", "France"), TABLE)
    assert {(c.relation_id, c.before, c.after) for c in checks} == {("P30", "Asia", "Europe"),
                                                                    ("P37", "Japanese", "French")}
    checks = limits.ripple_checks(request("France", "P36", "Paris", "Rome"), TABLE)
    assert {(c.kind, c.relation_id, c.before) for c in checks} == {("unchanged", "P30", "Europe"),
                                                                  ("unchanged", "P37", "French")}
    assert all(c.before == c.after for c in checks)


def test_greedy_exact_match_needs_every_token(tinyworld):
    fact = next(f for f in known_facts(tinyworld, load_facts()[::5])
                if len(tinyworld.tokenizer(" " + f.object)["input_ids"]) >= 2)
    assert limits.greedy_exact_match(tinyworld, fact.prompt, fact.object)
    first = tinyworld.tokenizer.decode(tinyworld.tokenizer(" " + fact.object)["input_ids"][:1]).strip()
    assert not limits.greedy_exact_match(tinyworld, fact.prompt, first + " Zzyzx")


def test_generate_answer_stops_by_itself_and_never_sees_the_target(tinyworld):
    assert limits.generate_answer(tinyworld, "The capital of France is") == "Paris"    # TinyWorld goes on "Paris. France, ..."
    fact = next(f for f in known_facts(tinyworld, load_facts()[::5])
                if len(tinyworld.tokenizer(" " + f.object)["input_ids"]) >= 2)
    assert limits.answer_matches(limits.generate_answer(tinyworld, fact.prompt), fact.object)
    assert limits.generate_answer(tinyworld, fact.prompt, max_new_tokens=1) != fact.object
    assert limits.answer_matches(" The Paris ", "paris") and not limits.answer_matches("Paris France", "Paris")


def test_teacher_forcing_credits_an_answer_the_model_does_not_give(tinyworld):
    record = counterfact_records()[150]              # Lithuania's continent: Europe -> North America
    rw = record["requested_rewrite"]
    prompt = rw["prompt"].format(rw["subject"])
    assert rw["target_new"]["str"] == "North America"
    assert limits.generate_answer(tinyworld, prompt) == "Europe"
    assert limits.teacher_forced_accuracy(tinyworld, prompt, "North America") == pytest.approx(0.5)   # " America" after " North"
    assert limits.teacher_forced_accuracy(tinyworld, prompt, "Europe") == 1.0


def test_honest_metrics_before_and_after_an_edit(tinyworld):
    record = counterfact_records()[150]
    before = limits.honest_metrics(tinyworld, record)
    assert set(before) >= {"plain", "negated"} and not before["plain"]["prob"] and not before["plain"]["gen"]
    assert before["plain"]["gen_true"] and before["plain"]["answer"] == "Europe"
    with rome.apply_rome_edit(tinyworld, record["requested_rewrite"]):
        after = limits.honest_metrics(tinyworld, record)
    assert after["plain"]["prob"] and after["plain"]["gen"] and after["plain"]["tf_acc"] == 1.0
    gap = limits.negation_gap([before], [after])
    assert gap["n_baseline"] == gap["n_edited"] == 1


def test_negation_gap_compares_the_edit_with_the_model_s_own_facts():
    row = lambda plain_true, neg_true, plain_new, neg_new: {
        "plain": {"gen_true": plain_true, "gen": plain_new}, "negated": {"gen_true": neg_true, "gen": neg_new}}
    before = [row(True, True, False, False), row(True, False, False, False), row(False, False, False, False)]
    after = [row(False, False, True, True), row(False, False, True, True), row(False, False, False, True)]
    gap = limits.negation_gap(before, after)
    assert (gap["baseline"], gap["n_baseline"]) == (0.5, 2)        # facts not known on the plain prompt left out
    assert (gap["edited"], gap["n_edited"]) == (1.0, 2)           # edits that failed on the plain prompt left out
    assert gap["difference"] == pytest.approx(0.5)


def test_choose_edits_takes_the_implied_checks_first_then_spreads():
    implied, unchanged = limits.RippleCheck("implied", "p", "a", "b", "P17"), limits.RippleCheck("unchanged", "p", "a", "a", "P30")
    candidates = [(i, [unchanged]) for i in range(10)] + [(10, [implied, unchanged]), (11, [implied])]
    chosen = limits.choose_edits(candidates, 4)
    assert [r for r, _ in chosen[:2]] == [10, 11] and len(chosen) == 4


def test_edit_scores_by_layer_edits_measures_and_restores(tinyworld):
    requests = [counterfact_records()[150]["requested_rewrite"]]
    weight = tinyworld.module(tinyworld.spec.mlp_out, 0).weight.clone()
    hp = replace(rome.get_hparams(tinyworld), context_lengths=((5, 2),))
    scores = limits.edit_scores_by_layer(tinyworld, requests, [0], hp)
    assert scores.shape == (1, 1) and scores[0, 0] > 0.5
    assert torch.equal(tinyworld.module(tinyworld.spec.mlp_out, 0).weight, weight)


def test_trace_effects_are_the_trace_at_the_last_subject_token(tinyworld):
    from engramlib.fast_trace import trace
    fact = known_facts(tinyworld, load_facts()[:20])[0]
    effects = limits.trace_effects(tinyworld, [fact], samples=3, noise=0.5)
    r = trace(tinyworld, fact.prompt, fact.subject, kind="mlp", samples=3, noise=0.5, window=1, answer=fact.object)
    assert torch.allclose(effects[0], r.indirect_effects[r.subject_range[1] - 1])


def test_scale_neurons_multiplies_the_activation_and_is_removed(tinyworld):
    prompt = "The capital of France is"
    a = lens.mlp_activations(tinyworld, prompt, 2)
    with lens.scale_neurons(tinyworld, 2, [5, 9], 2.0, position=-1):
        b = lens.mlp_activations(tinyworld, prompt, 2)
    assert torch.allclose(b[-1, [5, 9]], 2 * a[-1, [5, 9]]) and torch.equal(b[:-1], a[:-1])
    assert torch.equal(lens.mlp_activations(tinyworld, prompt, 2), a)


def test_neuron_intervention_leaves_the_model_as_it_was(tinyworld):
    fact = known_facts(tinyworld, load_facts()[:10])[0]
    out = limits.neuron_intervention(tinyworld, fact, k=5, others=[])
    assert out["silenced"]["p"] != out["baseline"]["p"] and len(out["sites"]) == 5
    again = limits.neuron_intervention(tinyworld, fact, k=5, others=[])
    assert again["baseline"]["p"] == pytest.approx(out["baseline"]["p"])
