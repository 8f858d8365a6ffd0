"""engramlib.lens on TinyWorld and on GPT-2 small's shapes (random weights): the residual stream adds
up, the logit lens ends at the model's own output, the MLP is a key-value memory, and knowledge-
neuron silencing and attribution do what they say and undo themselves."""
import pytest
import torch

from engramlib import lens, memory
from engramlib.hooks import Trace
from engramlib.models import first_token_id, next_token_probs

PROMPT = "The Space Needle is located in the city of"


def ids_of(mt, prompt=PROMPT):
    return mt.tokenizer(prompt, return_tensors="pt")["input_ids"]


def test_residual_components_add_up_to_the_last_blocks_output(any_model):
    mt = any_model
    c = lens.residual_components(mt, PROMPT)
    T, d, L = ids_of(mt).shape[1], mt.model.config.n_embd, mt.n_layers
    assert c["embed"].shape == (T, d) and c["attn"].shape == (L, T, d) and c["mlp"].shape == (L, T, d)
    total = c["embed"] + c["attn"].sum(0) + c["mlp"].sum(0)
    assert (total - c["final"]).abs().max() < 1e-4
    # "final" is the stream BEFORE ln_f: the model's last hidden state is ln_f of it
    with torch.no_grad():
        out = mt.model(input_ids=ids_of(mt), output_hidden_states=True)
        assert torch.allclose(mt.module(mt.spec.final_norm)(c["final"]), out.hidden_states[-1][0], atol=1e-5)
        pos = torch.arange(T)
        assert torch.allclose(c["embed"], mt.model.transformer.wte(ids_of(mt)[0]) + mt.model.transformer.wpe(pos))
    # each piece matters: without the embeddings the sum is wrong
    assert (c["attn"].sum(0) + c["mlp"].sum(0) - c["final"]).abs().max() > 1e-2


def test_logit_lens_last_row_is_the_models_own_distribution(any_model):
    mt = any_model
    probs = lens.logit_lens(mt, PROMPT)
    V = mt.model.config.vocab_size
    assert probs.shape == (mt.n_layers, V)
    assert torch.allclose(probs.sum(-1), torch.ones(mt.n_layers), atol=1e-4)
    assert torch.allclose(probs[-1], next_token_probs(mt, [PROMPT])[0], atol=1e-5)
    # position 0 decodes the first token: its last row is the model's prediction after one token
    with torch.no_grad():
        first = torch.softmax(mt.model(input_ids=ids_of(mt)).logits[0, 0].float(), -1)
    assert torch.allclose(lens.logit_lens(mt, PROMPT, position=0)[-1], first, atol=1e-5)
    # the earlier layers are not the last one (the lens shows something the output does not)
    assert not torch.allclose(probs[0].log(), probs[-1].log(), atol=1e-2)


def test_logit_lens_rows_decode_each_blocks_output(tinyworld):
    mt = tinyworld
    layer = 3
    with torch.no_grad(), Trace(mt.model, mt.spec.layer.format(layer)) as t:
        mt.model(input_ids=ids_of(mt))
    expected = lens.lens_probs(mt, t.output[0, -1])
    assert torch.allclose(lens.logit_lens(mt, PROMPT)[layer], expected, atol=1e-6)


def test_logit_lens_takes_ids_and_rejects_bad_input(tinyworld):
    mt = tinyworld
    ref = lens.logit_lens(mt, PROMPT)
    assert torch.allclose(lens.logit_lens(mt, ids_of(mt)), ref)
    assert torch.allclose(lens.logit_lens(mt, ids_of(mt)[0]), ref)
    with pytest.raises(ValueError, match="ONE prompt"):
        lens.logit_lens(mt, ids_of(mt).expand(2, -1))
    with pytest.raises(ValueError, match="position 99 out of range"):
        lens.logit_lens(mt, PROMPT, position=99)
    with pytest.raises(ValueError, match="empty prompt"):
        lens.logit_lens(mt, "")


def test_token_rank():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert lens.token_rank(probs, 2).tolist() == [1, 1]
    assert lens.token_rank(probs, 1).tolist() == [0, 2]


def test_the_mlp_is_a_key_value_memory(any_model):
    """mlp(x) = Σ_i act(k_i · x + b_K,i) v_i + b_V, and c_proj is chapter 01's Hebbian store of the
    values under one-hot keys."""
    mt = any_model
    layer = mt.n_layers - 1
    kv = lens.mlp_keys_values(mt, layer)
    m, d = kv.V.shape
    assert kv.K.shape == (m, d) and kv.b_K.shape == (m,) and kv.b_V.shape == (d,)
    assert m == mt.model.transformer.h[layer].mlp.c_fc.weight.shape[1]          # Conv1D: (d, m)
    with torch.no_grad(), Trace(mt.model, mt.spec.mlp.format(layer), retain_input=True) as t:
        mt.model(input_ids=ids_of(mt))
    a = lens.mlp_activations(mt, PROMPT, layer)
    mlp = mt.module(mt.spec.mlp, layer)
    assert torch.allclose(a, mlp.act(t.input[0] @ kv.K.T + kv.b_K), atol=1e-5)
    assert torch.allclose(a @ kv.V + kv.b_V, t.output[0], atol=1e-4)
    W = memory.hebbian_store(torch.eye(m, dtype=memory.DTYPE), kv.V.double())   # Σ_i v_i e_iᵀ: (d, m)
    assert torch.equal(W, mt.module(mt.spec.mlp_out, layer).weight.T.double())


def test_value_top_tokens_projects_the_value_vector(any_model):
    mt = any_model
    v = mt.module(mt.spec.mlp_out, 0).weight[7]
    scores = mt.model.lm_head.weight @ v
    got = lens.value_top_tokens(mt, 0, 7, k=5)
    assert [s for _, s in got] == pytest.approx(scores.topk(5).values.tolist(), rel=1e-5)
    assert got[0][0] == mt.tokenizer.decode([int(scores.argmax())])
    with pytest.raises(ValueError, match="neuron .* out of range"):
        lens.value_top_tokens(mt, 0, 10 ** 6)
    with pytest.raises(ValueError, match="layer .* out of range"):
        lens.value_top_tokens(mt, mt.n_layers, 0)


def test_silence_neurons_zeroes_them_and_restores_exactly(any_model):
    mt = any_model
    layer, neurons = 1, [3, 5, 11]
    ids = ids_of(mt)
    with torch.no_grad():
        before = mt.model(input_ids=ids).logits
    a_before = lens.mlp_activations(mt, ids, layer)
    with lens.silence_neurons(mt, layer, neurons, position=-1):
        a = lens.mlp_activations(mt, ids, layer)
        with torch.no_grad():
            inside = mt.model(input_ids=ids).logits
    assert (a[-1, neurons] == 0).all() and torch.equal(a[:-1], a_before[:-1])
    others = [i for i in range(a.shape[1]) if i not in neurons]
    assert torch.equal(a[-1, others], a_before[-1, others])
    assert not torch.equal(inside[0, -1], before[0, -1])
    assert torch.equal(inside[0, :-1], before[0, :-1])               # causal: earlier tokens untouched
    with pytest.raises(RuntimeError, match="boom"), lens.silence_neurons(mt, layer, neurons):
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(mt.model(input_ids=ids).logits, before)   # removed, even after an error
    with lens.silence_neurons(mt, layer, torch.tensor(neurons)):     # position None: every token
        assert (lens.mlp_activations(mt, ids, layer)[:, neurons] == 0).all()


def test_silence_rejects_bad_neurons_and_layers(tinyworld):
    mt = tinyworld
    with pytest.raises(ValueError, match="neurons must lie in"):
        with lens.silence_neurons(mt, 0, [10 ** 6]):
            pass
    with pytest.raises(ValueError, match="layer .* out of range"):
        with lens.silence_neurons(mt, mt.n_layers, [0]):
            pass
    with pytest.raises(ValueError, match="layer -1 out of range"):
        lens.mlp_activations(mt, PROMPT, -1)


def test_silence_sites_spans_layers_and_restores(tinyworld):
    mt = tinyworld
    sites = [(0, 1), (2, 4), (2, 9)]
    before = next_token_probs(mt, [PROMPT])
    with lens.silence_sites(mt, sites):
        assert lens.mlp_activations(mt, PROMPT, 0)[:, 1].abs().max() == 0
        assert lens.mlp_activations(mt, PROMPT, 2)[:, [4, 9]].abs().max() == 0
        assert lens.mlp_activations(mt, PROMPT, 1).abs().max() > 0
    assert torch.equal(next_token_probs(mt, [PROMPT]), before)


def test_attribution_is_activation_times_a_finite_difference_gradient(any_model):
    mt = any_model
    layer, answer = 1, "Seattle"
    attr = lens.neuron_attribution(mt, PROMPT, answer, layer)
    a = lens.mlp_activations(mt, PROMPT, layer)[-1]
    assert attr.shape == a.shape
    o, eps = first_token_id(mt, answer), 1e-2
    i = int(attr.abs().argmax())

    def log_p(shift):
        def nudge(h, name):
            h = h.clone()
            h[:, -1, i] += shift
            return h
        with torch.no_grad(), Trace(mt.model, lens.activation_name(mt, layer), edit_output=nudge):
            return torch.log_softmax(mt.model(input_ids=ids_of(mt)).logits[0, -1].double(), -1)[o]
    grad = (log_p(eps) - log_p(-eps)) / (2 * eps)
    assert attr[i].item() == pytest.approx((a[i] * grad).item(), rel=0.05)


def test_integrated_gradients_add_up_to_the_change_in_log_p(tinyworld):
    """Completeness (Sundararajan et al. 2017): Σ_i IG_i = log P(a) − log P(layer silenced at the token)."""
    mt, layer, answer = tinyworld, 2, "Seattle"
    ig = lens.neuron_attribution(mt, PROMPT, answer, layer, steps=64)
    o = first_token_id(mt, answer)
    full = torch.log(next_token_probs(mt, [PROMPT])[0, o])
    m = lens.mlp_keys_values(mt, layer).V.shape[0]
    with lens.silence_neurons(mt, layer, range(m), position=-1):
        empty = torch.log(next_token_probs(mt, [PROMPT])[0, o])
    assert ig.sum().item() == pytest.approx((full - empty).item(), rel=0.05, abs=1e-3)
    assert not torch.allclose(ig, lens.neuron_attribution(mt, PROMPT, answer, layer))   # steps matter
    with pytest.raises(ValueError, match="steps"):
        lens.neuron_attribution(mt, PROMPT, answer, layer, steps=0)


def test_a_silenced_neuron_has_zero_attribution(any_model):
    mt = any_model
    layer = 0
    attr = lens.neuron_attribution(mt, PROMPT, "Seattle", layer)
    top = attr.abs().topk(3).indices.tolist()
    assert (attr[top] != 0).all()
    with lens.silence_neurons(mt, layer, top, position=-1):
        silenced = lens.neuron_attribution(mt, PROMPT, "Seattle", layer)
    assert (silenced[top] == 0).all() and silenced.abs().sum() > 0


def test_knowledge_neurons_are_the_top_attributions(tinyworld):
    mt = tinyworld
    sites, scores = lens.knowledge_neurons(mt, PROMPT, "Seattle", k=5)
    assert scores.shape == (mt.n_layers, lens.mlp_keys_values(mt, 0).V.shape[0]) and len(sites) == 5
    values = [scores[l, n].item() for l, n in sites]
    assert values == sorted(values, reverse=True) and values[0] == scores.max().item()
    assert torch.allclose(scores[3], lens.neuron_attribution(mt, PROMPT, "Seattle", 3))


def test_silencing_knowledge_neurons_hurts_the_fact_more_than_random_neurons(tinyworld):
    mt = tinyworld
    o = first_token_id(mt, "Seattle")
    sites, _ = lens.knowledge_neurons(mt, PROMPT, "Seattle", k=100)
    gen = torch.Generator().manual_seed(0)
    m = lens.mlp_keys_values(mt, 0).V.shape[0]
    random_sites = [(l, int(torch.randint(m, (1,), generator=gen))) for l, _ in sites]
    p = lambda: next_token_probs(mt, [PROMPT])[0, o].item()
    before = p()
    with lens.silence_sites(mt, sites, position=-1):
        kn = p()
    with lens.silence_sites(mt, random_sites, position=-1):
        rnd = p()
    assert before - kn > 5 * abs(before - rnd) and kn < before - 0.01


def test_silence_at_each_rows_last_token_matches_one_prompt_at_a_time(tinyworld):
    from engramlib.models import encode
    mt = tinyworld
    prompts = [PROMPT, "The capital of France is", "Lionel Messi professionally plays the sport of"]
    sites = [(0, i) for i in range(0, 1000, 5)] + [(3, i) for i in range(100)]
    with lens.silence_sites(mt, sites, position=-1):
        alone = torch.cat([next_token_probs(mt, [p]) for p in prompts])
    with lens.silence_sites(mt, sites, position=encode(mt, prompts)["last"]):
        batched = next_token_probs(mt, prompts)
    assert torch.allclose(alone.log(), batched.log(), atol=1e-3)
    changed = (batched.log() - next_token_probs(mt, prompts).log()).abs().max(-1).values
    assert changed.min() > 0.1                                         # every row's last token was hit
    with pytest.raises(ValueError, match="one index per row"):
        with lens.silence_neurons(mt, 0, [1], position=torch.tensor([1, 2])):
            next_token_probs(mt, prompts)


def test_kl_divergence():
    p, q = torch.tensor([0.7, 0.2, 0.1, 0.0]), torch.tensor([0.4, 0.4, 0.1, 0.1])
    expected = 0.7 * torch.log(torch.tensor(0.7 / 0.4)) + 0.2 * torch.log(torch.tensor(0.5))
    assert lens.kl_divergence(p, q).item() == pytest.approx(expected.item(), rel=1e-6)
    assert lens.kl_divergence(p, p).item() == 0
    assert lens.kl_divergence(q, p).item() == float("inf")          # q puts mass where p has none
    assert lens.kl_divergence(torch.stack([p, q]), torch.stack([q, q])).shape == (2,)


def test_random_sites_like_matches_the_layers_and_avoids_the_sites():
    sites = [(0, 1), (0, 2), (0, 5), (2, 0), (3, 3), (3, 4)]
    seen = set()
    for seed in range(10):
        got = lens.random_sites_like(sites, 6, torch.Generator().manual_seed(seed))
        assert sorted(l for l, _ in got) == sorted(l for l, _ in sites)       # the same count per layer
        assert len(set(got)) == len(got) and not set(got) & set(sites)       # distinct, none attributed
        assert all(0 <= n < 6 for _, n in got)
        seen.add(tuple(got))
    assert len(seen) > 1                                                      # a random draw
    with pytest.raises(ValueError, match="neurons outside the sites"):
        lens.random_sites_like([(0, n) for n in range(4)], 6)
