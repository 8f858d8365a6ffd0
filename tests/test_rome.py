"""ROME: requests are validated, an edit raises p(target) and leaves neighbours, undo is exact."""
import pytest
import torch

from engramlib import rome
from engramlib.evaluate import evaluate_edits, ngram_entropy, record_metrics, summarize
from engramlib.facts import counterfact_records

REQUEST = {"prompt": "{} is located in the city of", "subject": "Space Needle",
           "target_new": {"str": "Paris"}, "target_true": {"str": "Seattle"}}


@pytest.fixture(scope="module")
def tw_templates(tinyworld):
    return rome.context_templates(tinyworld, ((5, 3), (10, 2)))


@pytest.mark.parametrize("bad, message", [
    ({**REQUEST, "prompt": "is located in the city of"}, "must contain"),
    ({**REQUEST, "target_new": {"str": " "}}, "empty target_new"),
    ({**REQUEST, "target_new": {"str": "Seattle"}}, "equals target_true"),
    ({**REQUEST, "subject": ""}, "empty subject"),
])
def test_bad_requests_raise_clear_errors(tinyworld, bad, message):
    with pytest.raises(ValueError, match=message):
        rome.apply_rome_edit(tinyworld, bad)


def test_context_templates_are_cached_and_wellformed(tinyworld):
    a = rome.context_templates(tinyworld, ((5, 2),))
    assert a == rome.context_templates(tinyworld, ((5, 2),)) and len(a) == 3
    assert a[0] == "{}" and all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])


def test_edit_raises_target_keeps_neighbours_and_undoes_bit_for_bit(tinyworld, tw_templates):
    mt = tinyworld
    weight = mt.module(mt.spec.mlp_out, rome.get_hparams(mt).layer).weight
    original = weight.detach().clone()
    state = {k: v.clone() for k, v in mt.model.state_dict().items()}
    record = next(r for r in counterfact_records() if r["requested_rewrite"]["subject"] == "Space Needle")
    before = record_metrics(mt, {**record, "requested_rewrite": REQUEST})
    with rome.apply_rome_edit(mt, REQUEST, templates=tw_templates) as edit:
        assert edit.prob_after > 0.5 > edit.prob_before
        after = record_metrics(mt, {**record, "requested_rewrite": REQUEST})
        assert after["rewrite"] == 1.0
        assert after["neighborhood"] >= before["neighborhood"] - 0.2      # Seattle stays Seattle
        assert not torch.equal(weight, original)
        delta = (weight - original).float()
        assert torch.linalg.matrix_rank(delta, rtol=1e-4).item() == 1      # rank one
    assert torch.equal(weight, original)
    for k, v in mt.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_v_star_runs_at_most_the_configured_steps(tinyworld, tw_templates):
    hp = rome.get_hparams(tinyworld)
    out = rome.compute_v_star(tinyworld, rome.check_request(tinyworld, REQUEST), hp.layer, hp, tw_templates)
    assert 1 <= out["forward_passes"] <= hp.v_num_grad_steps
    assert out["delta"].norm() <= hp.clamp_norm_factor * out["v_init_norm"] + 1e-4


def test_covariance_is_cached_on_disk(tinyworld, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    texts = ["The capital of France is Paris.", "Lionel Messi plays soccer."] * 4
    C = rome.key_covariance(tinyworld, 1, texts=texts, corpus="tiny", n_samples=50, progress=False)
    path = rome.covariance_path(tinyworld, 1, "tiny", 50)
    assert path.exists() and C.shape == (4 * tinyworld.model.config.n_embd,) * 2
    assert torch.allclose(C, C.T, atol=1e-6)
    assert torch.equal(rome.key_covariance(tinyworld, 1, texts=["other"], corpus="tiny", n_samples=50), C)


def test_edit_on_gpt2_standin_runs(gpt2_standin, tmp_path, monkeypatch):
    """Random weights: p(target) means nothing, but GPT-2's real code path (Conv1D, BPE) runs and
    the update does what it should: the edited c_proj maps k* to v*, and undo is exact."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    mt = gpt2_standin
    hp = rome.ROMEHyperParams(layer=4, v_num_grad_steps=5, v_lr=0.05)
    texts = ["The Eiffel Tower is in Paris.", "Lionel Messi plays soccer for a club in Miami.",
             "Rome is the capital of Italy, a country in Europe."] * 6
    C = rome.key_covariance(mt, 4, texts=texts, corpus="t", n_samples=5000, progress=False)
    C_inv = torch.linalg.inv(C.double() + 1e-3 * torch.eye(3072, dtype=torch.float64)).float()
    req = {**REQUEST, "prompt": "The {} is located in the city of"}
    module = mt.module(mt.spec.mlp_out, 4)
    original = module.weight.detach().clone()
    edit = rome.apply_rome_edit(mt, req, hparams=hp, C_inv=C_inv, templates=["{}", "Hello. {}"],
                                require_improvement=False)
    assert module.weight.shape == (3072, 768)                           # Conv1D: (d_in, d_out)
    torch.testing.assert_close(edit.k_star @ module.weight, edit.v_star, atol=1e-3, rtol=1e-4)
    edit.undo()
    assert torch.equal(module.weight, original)


def test_evaluate_edits_loop_and_metrics(tinyworld, tw_templates):
    records = [r for r in counterfact_records() if r["requested_rewrite"]["relation_id"] == "P131"][:3]
    editor = lambda mt, req: rome.apply_rome_edit(mt, req, templates=tw_templates)
    out = evaluate_edits(tinyworld, records, editor, generations=False, progress=False)
    assert out["pre"]["ES"] < 50 and out["post"]["ES"] == 100
    assert set(out["post"]) >= {"ES", "PS", "NS", "EM", "PM", "NM", "S"}


def test_ngram_entropy_prefers_varied_text():
    assert ngram_entropy(["the cat sat on the mat and looked at the dog"]) > \
        ngram_entropy(["the the the the the the the the the the the"])
    assert summarize([{"rewrite": 1, "paraphrase": 0.5, "neighborhood": 1, "rewrite_magnitude": 0.5,
                       "paraphrase_magnitude": 0.1, "neighborhood_magnitude": 0.2}])["S"] == pytest.approx(75.0)
