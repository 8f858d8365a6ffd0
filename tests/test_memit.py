"""MEMIT and sequential editing: the updates solve their equations, a batch edits TinyWorld and
spares the neighbours, AlphaEdit spares the preserved keys, and every undo is bit for bit."""
import math
from dataclasses import replace

import pytest
import torch

from engramlib import memit, rome
from engramlib.evaluate import record_metrics, summarize
from engramlib.facts import counterfact_records
from engramlib.memory import least_squares_memory

REQUEST = {"prompt": "{} is located in the city of", "subject": "Space Needle",
           "target_new": {"str": "Paris"}, "target_true": {"str": "Seattle"}}
N_SAMPLES = 3000        # keys behind each test C: small, so a fresh cache costs a second


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """The covariances of these tests go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(tmp_path_factory.mktemp("engram_cache")))
        yield


@pytest.fixture(scope="module")
def tw_hp():
    """TinyWorld's registered MEMIT settings with one context template, at most 8 steps for z and a
    small C: fast."""
    return replace(memit.HPARAMS["tinyworld"], context_lengths=((10, 1),), v_num_grad_steps=8,
                   mom2_n_samples=N_SAMPLES)


@pytest.fixture(scope="module")
def tw_C(tinyworld, tw_hp):
    return memit.layer_covariances(tinyworld, tw_hp.layers, N_SAMPLES, progress=False)


@pytest.fixture(scope="module")
def records():
    everything = counterfact_records()
    return everything[::len(everything) // 10][:10]          # 10 records over the relations


def state_of(mt):
    return {k: v.clone() for k, v in mt.model.state_dict().items()}


def assert_same_state(mt, state):
    for k, v in mt.model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- the updates, on small random matrices (float64) ----------------------------------------------

def random_problem(n=4, d_in=12, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, d_in, generator=g, dtype=torch.float64)
    return (X.T @ X / 200, torch.randn(n, d_in, generator=g, dtype=torch.float64),
            torch.randn(n, d_out, generator=g, dtype=torch.float64))


def test_memit_update_solves_the_normal_equations():
    C, K, R = random_problem()
    lam = 3.0
    dW = memit.memit_weight_update(K, R, C, lam).double()
    torch.testing.assert_close(dW @ (lam * C + K.T @ K), R.T @ K, atol=1e-4, rtol=1e-4)
    k, r = K[0], R[0]                       # one key: ROME's direction C⁻¹k, shrunk by λ
    u = torch.linalg.solve(C, k)
    torch.testing.assert_close(memit.memit_weight_update(k[None], r[None], C, lam).double(),
                               torch.outer(r, u) / (lam + k @ u), atol=1e-5, rtol=1e-4)
    # λ → 0 and C = I: chapter 02's least-squares memory, every key maps to its residual
    dW0 = memit.memit_weight_update(K, R, torch.eye(12), 1e-9).double()
    torch.testing.assert_close(dW0, least_squares_memory(K, R), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dW0 @ K.T, R.T, atol=1e-4, rtol=1e-4)


def test_alphaedit_update_is_projected_on_the_null_space():
    g = torch.Generator().manual_seed(1)
    K0 = torch.randn(25, 40, generator=g, dtype=torch.float64)      # preserved keys: rank 25 of 40
    C0 = K0.T @ K0 / 25
    P = memit.nullspace_projection(C0, 1e-8).double()
    assert torch.linalg.matrix_rank(P, rtol=1e-4).item() == 15
    assert (P @ K0.T).norm() < 1e-5 * K0.norm()
    K, R = torch.randn(3, 40, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    dW = memit.alphaedit_weight_update(K, R, P, torch.zeros(40, 40), l2=1.0).double()
    torch.testing.assert_close(dW @ P, dW, atol=1e-5, rtol=1e-4)    # ΔW = ΔW P
    spill = lambda d: ((d @ K0.T).norm() / (d.norm() * K0.norm())).item()
    assert spill(dW) < 1e-6                                        # preserved outputs unchanged
    memit_dW = memit.memit_weight_update(K, R, C0 + 1e-3 * torch.eye(40), 1.0).double()
    assert spill(memit_dW) > 100 * spill(dW)                       # MEMIT only makes it small
    # earlier edits' keys in the preserved sum: the new update disturbs them less
    Kp = torch.randn(5, 40, generator=g, dtype=torch.float64)
    with_prev = memit.alphaedit_weight_update(K, R, P, Kp.T @ Kp, l2=1.0).double()
    assert (with_prev @ Kp.T).norm() < (dW @ Kp.T).norm()


# --- rome.compute_v_star at the block output (MEMIT's z) ------------------------------------------

def test_v_star_at_the_block_output_is_memits_z(tinyworld):
    mt, layer = tinyworld, 1
    req = rome.check_request(mt, REQUEST)
    templates = ["{}", "The weather was nice. {}"]
    hp = rome.ROMEHyperParams(layer=layer, v_num_grad_steps=4, v_weight_decay=0.0,
                              clamp_norm_factor=100.0, early_stop_loss=0.0)
    mlp = rome.compute_v_star(mt, req, layer, hp, templates)
    block = rome.compute_v_star(mt, req, layer, hp, templates, v_init_at="block")
    torch.testing.assert_close(block["delta"], mlp["delta"])    # no decay, no clamp: the same δ
    text = REQUEST["prompt"].format(REQUEST["subject"])
    idx = rome._last_subject_index(mt, text, REQUEST["subject"])
    with torch.no_grad():
        hidden = mt.model(**mt.tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
    torch.testing.assert_close(block["v_init"], hidden[layer + 1][0, idx])   # v₀: the residual stream
    assert block["v_init_norm"] > 2 * mlp["v_init_norm"]
    tight = rome.compute_v_star(mt, req, layer, replace(hp, clamp_norm_factor=0.05), templates,
                                v_init_at="block")
    assert tight["delta"].norm() <= 0.05 * block["v_init_norm"] * (1 + 1e-5)
    with pytest.raises(ValueError, match="v_init_at"):
        rome.compute_v_star(mt, req, layer, hp, templates, v_init_at="residual")


# --- MEMIT on the models -------------------------------------------------------------------------

def test_one_request_is_rank_one_per_layer_and_solves_the_normal_equations(gpt2_standin):
    """Random GPT-2 weights: p(target) means nothing, but the Conv1D code path runs, each layer's
    change is rank one, ΔW (λC + k kᵀ) = r kᵀ with the recorded k and r, and undo is exact."""
    mt, lam = gpt2_standin, 50.0
    hp = memit.MEMITHyperParams(layers=(10, 11), mom2_update_weight=lam, v_num_grad_steps=3,
                                v_lr=0.05, context_lengths=((3, 1),), mom2_n_samples=N_SAMPLES)
    texts = ["The Eiffel Tower is in Paris.", "Rome is the capital of Italy, a country in Europe."] * 4
    C = {layer: rome.key_covariance(mt, layer, texts=texts, corpus="t", cache=False, progress=False)
         + 1e-2 * torch.eye(3072) for layer in hp.layers}
    req = {**REQUEST, "prompt": "The {} is located in the city of"}
    state = {name: p.clone() for name, p in mt.model.named_parameters() if ".mlp.c_proj." in name}
    h_top = memit.block_outputs(mt, [req], 11)
    edit = memit.apply_memit(mt, [req], hp, covariances=C)
    # the lower layer is asked for half of what z needs, the top layer for what is left after it
    torch.testing.assert_close(edit.residuals[10], (edit.zs - h_top) / 2)
    probes = torch.randn(3072, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for layer in hp.layers:
        module = mt.module(mt.spec.mlp_out, layer)
        assert module.weight.shape == (3072, 768)                           # Conv1D: (d_in, d_out)
        change = (module.weight - edit.original_weights[layer]).T.double()   # (d_out, d_in)
        torch.testing.assert_close(change, edit.deltas[layer].double(), atol=1e-6, rtol=1e-5)
        S = torch.linalg.svdvals(change @ probes)          # rank of ΔW, seen through 8 random probes
        assert S[1] < 1e-4 * S[0]                                            # rank one
        k, r = edit.keys[layer].double(), edit.residuals[layer].double()     # (1, d_in), (1, d_out)
        lhs = change @ (lam * C[layer].double() @ probes + k.T @ (k @ probes))   # ΔW (λC + kᵀk) x
        torch.testing.assert_close(lhs, r.T @ (k @ probes), atol=1e-3, rtol=1e-3)
    edit.undo()
    assert all(torch.equal(p, state[name]) for name, p in mt.model.named_parameters() if name in state)
    assert "MassEdit(memit, 1 request," in repr(edit) and "undone" in repr(edit)


@pytest.fixture(scope="module")
def tw_batch(tinyworld, tw_hp, tw_C, records):
    """One MEMIT batch of the 10 records on TinyWorld: metrics before and with it, then undone."""
    mt = tinyworld
    state = state_of(mt)
    before = summarize([record_metrics(mt, r) for r in records])
    with memit.apply_memit(mt, [r["requested_rewrite"] for r in records], tw_hp, covariances=tw_C) as edit:
        after = summarize([record_metrics(mt, r) for r in records])
    return {"edit": edit, "before": before, "after": after, "state": state}


def test_a_batch_edits_tinyworld_spares_neighbours_and_undoes(tinyworld, tw_hp, tw_C, tw_batch):
    mt, edit, before, after = tinyworld, tw_batch["edit"], tw_batch["before"], tw_batch["after"]
    assert edit.success_rate >= 0.8                          # p(target) rose for most
    assert after["ES"] >= 80 and after["PS"] >= 50
    assert after["NS"] >= before["NS"] - 25                  # the neighbours keep their objects
    for layer in tw_hp.layers:                               # the writes are MEMIT's equations
        k, r = edit.keys[layer].double(), edit.residuals[layer].double()
        C = tw_C[layer].double()
        torch.testing.assert_close(edit.deltas[layer].double() @ (tw_hp.mom2_update_weight * C + k.T @ k),
                                   r.T @ k, atol=2e-3, rtol=1e-3)
    assert_same_state(mt, tw_batch["state"])                 # undone bit for bit


def test_alphaedit_leaves_the_preserved_keys_alone(tinyworld, tw_hp, tw_C, records, tw_batch):
    """E‖ΔW k₀‖² over the keys C was estimated from is tr(ΔW C ΔWᵀ) ≤ threshold · ‖ΔW‖²: AlphaEdit's
    update hardly moves them, where MEMIT's (same requests, same z) moves them far more."""
    mt, plain = tinyworld, tw_batch["edit"]
    state = state_of(mt)
    P = memit.alphaedit_projections(mt, tw_hp, tw_C)
    with memit.apply_alphaedit(mt, [r["requested_rewrite"] for r in records], tw_hp, P, zs=plain.zs) as alpha:
        assert alpha.success_rate >= 0.5
    assert_same_state(mt, state)
    for layer in tw_hp.layers:
        C = tw_C[layer].double()
        a, m = alpha.deltas[layer].double(), plain.deltas[layer].double()
        assert torch.trace(a @ C @ a.T) <= tw_hp.nullspace_threshold * a.norm() ** 2 * (1 + 1e-3)
        kept = torch.eye(len(C), dtype=torch.float64) - P[layer].double()   # the preserved directions
        spill_a, spill_m = ((d @ kept).norm().item() / d.norm().item() for d in (a, m))
        assert spill_a < 1e-4 and spill_m > 100 * spill_a             # exactly spared vs merely weighed


# --- sequential runs and the dashboard ------------------------------------------------------------

def test_sequential_runs_stop_on_request_and_undo_bit_for_bit(tinyworld, tw_hp, records):
    mt = tinyworld
    state = state_of(mt)
    requests = [r["requested_rewrite"] for r in records[:4]]
    rome_hp = replace(rome.HPARAMS["tinyworld"], context_lengths=((5, 1),), v_num_grad_steps=5,
                      mom2_n_samples=N_SAMPLES)
    seen = []

    def on_batch(run, batch):
        seen.append((run.n_edits, batch[0]["subject"]))
        return run.n_edits < 2                              # stop after the second edit
    with memit.edit_sequentially(mt, requests, "rome", hparams=rome_hp, on_batch=on_batch,
                                 progress=False) as run:
        assert seen == [(1, requests[0]["subject"]), (2, requests[1]["subject"])]
        assert run.n_edits == 2 and sorted(run.original_weights) == [0] and len(run.edits) == 2
        assert run.delta_norms()[0] > 0 and "SequentialRun(rome, 2 of 4" in repr(run)
    assert_same_state(mt, state)                             # the whole run, bit for bit
    assert "undone" in repr(run)
    run = memit.edit_sequentially(mt, requests[:2], "memit", batch_size=1, hparams=tw_hp, progress=False)
    assert [type(e).__name__ for e in run.edits] == ["MassEdit", "MassEdit"]
    assert sorted(run.delta_norms()) == [0, 1] and run.edits[1].success_rate == 1.0
    run.undo()
    assert_same_state(mt, state)


def test_collapse_dashboard_of_a_sequential_alphaedit_run(tinyworld, tw_hp, records):
    mt = tinyworld
    state = state_of(mt)
    board = memit.collapse_dashboard(mt, records[:2], "alphaedit", batch_size=1, every=2, hparams=tw_hp,
                                     n_facts=20, n_texts=40, jump=1e-9, progress=False)
    assert board["n_edits"] == [0, 2] and board["steps"]["n_edits"] == [0, 1, 2]
    for key in ("edits_recalled", "neighborhood_score", "unedited_accuracy", "paraphrase_accuracy",
                "perplexity", "seconds"):
        assert len(board[key]) == 2, key
    assert board["unedited_accuracy"][0] == 1.0             # probes are facts the model knows
    assert board["edits_recalled"][-1] >= 0.5
    assert set(board["delta_norm"]) == set(tw_hp.layers) and board["delta_norm"][0][0] == 0.0
    subjects = [r["requested_rewrite"]["subject"] for r in records[:2]]
    # jump ~ 0: every step counts as a perplexity jump, and names the edit(s) it contained
    assert [d["subjects"] for d in board["disabling"]] == [subjects[:1], subjects[1:]]
    assert_same_state(mt, state)                             # the run is undone at the end
    texts = memit.heldout_texts(mt, 40, avoid=subjects)
    assert not any(s in t for s in subjects for t in texts)
    assert board["perplexity"][0] == pytest.approx(memit.perplexity(mt, texts))
    from engramlib.plots import plot_collapse
    fig = plot_collapse([board, {**board, "method": "other"}])
    assert len(fig.axes) == 6


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors(tinyworld, gpt2_standin, tw_hp):
    mt = tinyworld
    with pytest.raises(ValueError, match="no requests"):
        memit.apply_memit(mt, [], tw_hp)
    with pytest.raises(TypeError, match="list of requests"):
        memit.apply_memit(mt, REQUEST, tw_hp)
    with pytest.raises(ValueError, match="out of range"):
        memit.apply_memit(mt, [REQUEST], replace(tw_hp, layers=(0, 9)))
    with pytest.raises(ValueError, match="increasing"):
        memit.MEMITHyperParams(layers=(2, 1))
    with pytest.raises(ValueError, match="at least one layer"):
        memit.MEMITHyperParams(layers=())
    with pytest.raises(ValueError, match="conflicting"):
        memit.apply_memit(mt, [REQUEST, {**REQUEST, "target_new": {"str": "Rome"}}], tw_hp)
    with pytest.raises(ValueError, match="empty target_new"):
        memit.apply_memit(mt, [{**REQUEST, "target_new": {"str": ""}}], tw_hp)
    with pytest.raises(ValueError, match="out of range"):
        memit.edit_sequentially(mt, [REQUEST], "rome", hparams=replace(rome.HPARAMS["tinyworld"], layer=8))
    with pytest.raises(ValueError, match="batch_size=1"):
        memit.edit_sequentially(mt, [REQUEST], "rome", batch_size=2)
    with pytest.raises(ValueError, match="method must be"):
        memit.edit_sequentially(mt, [REQUEST], "mend")
    with pytest.raises(TypeError, match="needs MEMITHyperParams"):
        memit.edit_sequentially(mt, [REQUEST], "memit", hparams=rome.HPARAMS["tinyworld"])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        memit.collapse_dashboard(mt, [], "memit", batch_size=2, every=3)
    assert memit.get_hparams(mt).layers == memit.HPARAMS["tinyworld"].layers
    assert memit.get_hparams(gpt2_standin).layers == (0, 1, 2, 3, 4)    # five ending at ROME's 4
    assert "memit" in memit.HPARAMS["gpt2-xl"].source and memit.HPARAMS["gpt2-xl"].layers == (13, 14, 15, 16, 17)


def test_chunked_perplexity_equals_the_full_logits_one(any_model):
    """perplexity() never builds a batch's full logits; it must give what they give."""
    mt = any_model
    texts = ["The Space Needle is located in the city of Seattle.", "Paris is the capital of France, a country.",
             "A short one.", "Rome is a city in Italy and the home of the Colosseum and of many old churches."]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:                               # one text at a time, full logits, no padding
            ids = mt.tokenizer(text, return_tensors="pt")["input_ids"]
            logits = mt.model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
        reference = math.exp(total / count)
        for batch_size, chunk in ((1, 1024), (4, 5), (3, 1)):
            assert memit.perplexity(mt, texts, batch_size=batch_size, chunk_tokens=chunk) == \
                pytest.approx(reference, rel=1e-4)
