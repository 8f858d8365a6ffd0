"""engramlib.unlearn: each loss against an independently written formula, undo bit for bit, bad input
refused with the model untouched, and the probes' bookkeeping (TinyWorld and GPT-2 shapes)."""
import math

import pytest
import torch

from engramlib import unlearn as U
from engramlib.facts import load_facts


def snapshot(mt):
    return {n: p.detach().clone() for n, p in mt.model.named_parameters()}


def same_weights(mt, snap):
    return all(torch.equal(p, snap[n]) for n, p in mt.model.named_parameters())


def toy_logits(seed=0, n=3, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, T, V, generator=g, dtype=torch.float64)
    labels = torch.full((n, T), -100)
    labels[0, 2:4] = torch.tensor([1, 5])
    labels[1, 1] = 3
    labels[2, 0:4] = torch.tensor([0, 6, 2, 2])
    return logits, labels


# --- losses ------------------------------------------------------------------------------------------

def test_sequence_logp_and_token_nll_match_a_loop():
    logits, labels = toy_logits()
    want = []
    for i in range(labels.shape[0]):
        total = 0.0
        for t in range(labels.shape[1]):
            if labels[i, t] != -100:
                row = logits[i, t].tolist()
                total += row[labels[i, t]] - math.log(sum(math.exp(x) for x in row))
        want.append(total)
    got = U.sequence_logp(logits, labels)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
    n_tokens = int((labels != -100).sum())
    assert U.token_nll(logits, labels).item() == pytest.approx(-sum(want) / n_tokens, abs=1e-5)


def test_npo_loss_is_zhang_et_al_formula_and_becomes_gradient_ascent_at_the_start():
    logp = torch.tensor([-1.0, -3.0, -0.2], dtype=torch.float64)
    ref = torch.tensor([-0.5, -1.0, -0.2], dtype=torch.float64)
    for beta in (0.1, 1.0, 4.0):
        want = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - b))))
                   for a, b in zip(logp.tolist(), ref.tolist())) / 3
        assert U.npo_loss(logp, ref, beta).item() == pytest.approx(want, rel=1e-9)
    # at π_θ = π_ref the gradient of NPO wrt log π is that of mean(log π): gradient ascent's
    x = ref.clone().requires_grad_(True)
    U.npo_loss(x, ref, 0.1).backward()
    assert torch.allclose(x.grad, torch.full((3,), 1 / 3, dtype=torch.float64))
    # and it is bounded below (ascent is not): far below the reference the loss flattens
    far = U.npo_loss(ref - 100, ref, 0.1).item()
    assert 0 < far < 1e-3


def test_rmu_loss_matches_a_loop_over_tokens():
    g = torch.Generator().manual_seed(1)
    h_f, h_r, h_r0 = (torch.randn(2, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    mask_f = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask_r = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    control = U.rmu_control_vector(3, 6.5).double()
    assert control.norm().item() == pytest.approx(6.5) and (control >= 0).all()

    def mse(h, target, mask):
        rows = []
        for i in range(h.shape[0]):
            per_token = [((h[i, t] - (target if target.dim() == 1 else target[i, t])) ** 2).mean().item()
                         for t in range(h.shape[1]) if mask[i, t]]
            rows.append(sum(per_token) / len(per_token))
        return sum(rows) / len(rows)

    terms = U.rmu_loss(h_f, control, mask_f, h_r, h_r0, mask_r, alpha=100.0)
    assert terms["forget"].item() == pytest.approx(mse(h_f, control, mask_f), rel=1e-6)
    assert terms["retain"].item() == pytest.approx(mse(h_r, h_r0, mask_r), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["forget"].item() + 100 * terms["retain"].item(), rel=1e-6)


# --- unlearn on TinyWorld ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_set():
    return U.make_forget_set("entities", 2, n_retain=16, n_heldout=8, seed=3)


def test_forget_sets_of_both_kinds_keep_their_parts_apart():
    for kind in ("facts", "entities"):
        fs = U.make_forget_set(kind, 5, n_retain=30, n_heldout=30, seed=0)
        subjects = set(fs.subjects)
        assert len(subjects) == 5
        assert not subjects & {f.subject for f in fs.retain + fs.heldout}
        assert not set(fs.retain) & set(fs.heldout)
        if kind == "facts":
            assert len(fs.forget) == 5 and fs.same_subjects
            assert {f.subject for f in fs.same_subjects} == subjects
        else:
            assert not fs.same_subjects
            assert len(fs.forget) == sum(1 for f in load_facts() if f.subject in subjects)


@pytest.mark.parametrize("method", ["npo", "rmu", "rome_erase"])
def test_unlearn_forgets_and_undo_is_exact(tinyworld, small_set, method):
    mt = tinyworld
    snap = snapshot(mt)
    forget = U.requests_from_facts(small_set.forget)
    retain = U.requests_from_facts(small_set.retain)
    hp = U.get_hparams(mt, method)
    from dataclasses import replace
    hp = replace(hp, steps=12, lr=1e-3 if method == "npo" else hp.lr, erase_steps=8)
    p_before = U.recall(mt, small_set.forget)
    with U.unlearn(mt, forget, retain, method=method, hparams=hp, progress=False) as run:
        assert not same_weights(mt, snap), "the run changed no weight"
        assert U.recall(mt, small_set.forget) < p_before, f"{method} forgot nothing"
        assert run.losses
    assert not run.applied and same_weights(mt, snap), "undo() must restore every weight bit for bit"


@pytest.mark.parametrize("case, match", [
    (dict(forget=[]), "empty"),
    (dict(method="forget_everything"), "unknown unlearning method"),
    (dict(forget=[{"prompt": "The capital of France is", "subject": "Frannce", "target_true": {"str": "Paris"}}]),
     "not found"),
    (dict(forget=[{"prompt": "The capital of France is", "subject": "France", "target_true": {"str": "Paris"}}]),
     "in its place"),
    (dict(forget=[{"prompt": "The capital of Fr{} is", "subject": "ance", "target_true": {"str": "Paris"}}]),
     "part of a word"),
    (dict(retain="overlap"), "also in the forget set"),
    (dict(forget=[{"prompt": "The capital of {} is", "subject": "France", "target_true": {"str": ""}}]),
     "empty target_true"),
])
def test_bad_input_is_one_clear_error_and_the_model_is_untouched(tinyworld, small_set, case, match):
    snap = snapshot(tinyworld)
    forget = U.requests_from_facts(small_set.forget)
    kwargs = dict(forget=forget, retain=U.requests_from_facts(small_set.retain), method="npo")
    kwargs.update(case)
    if kwargs["retain"] == "overlap":
        kwargs["retain"] = U.requests_from_facts(small_set.retain) + forget[:1]
    with pytest.raises(ValueError, match=match):
        U.unlearn(tinyworld, progress=False, **kwargs)
    assert same_weights(tinyworld, snap)


def test_original_weights_and_redo_swap_bit_for_bit(tinyworld, small_set):
    mt = tinyworld
    snap = snapshot(mt)
    hp = U.UnlearnHyperParams(steps=2, lr=1e-3, layers=(0,))
    with U.unlearn(mt, U.requests_from_facts(small_set.forget), None, "gradient_ascent", hp, progress=False) as run:
        changed = snapshot(mt)
        with run.original_weights():
            assert same_weights(mt, snap)
        assert same_weights(mt, changed)
        run.undo(keep=True)
        assert same_weights(mt, snap)
        run.redo()
        assert run.applied and same_weights(mt, changed)
    assert same_weights(mt, snap)


# --- probes --------------------------------------------------------------------------------------------

def test_split_halves_never_shares_a_subject():
    fs = U.make_forget_set("entities", 7, n_retain=5, n_heldout=5, seed=1)
    A, B = U.split_halves(fs.forget)
    assert A and B and len(A) + len(B) == len(fs.forget)
    assert not {f.subject for f in A} & {f.subject for f in B}


def test_projected_out_removes_the_direction(tinyworld):
    mt = tinyworld
    r = torch.randn(mt.model.config.n_embd)
    batch = U._encode(mt, U.requests_from_facts(load_facts()[:3]))
    with U.projected_out(mt, 1, r):
        h = U.block_output(mt, 1, batch)
    assert (h @ (r / r.norm())).abs().max() < 1e-4
    assert (U.block_output(mt, 1, batch) @ (r / r.norm())).abs().max() > 1e-2   # the hook is gone


def test_relearning_curve_measures_every_step_and_undoes(tinyworld, small_set):
    mt = tinyworld
    snap = snapshot(mt)
    A, B = U.split_halves(small_set.forget)
    curve = U.relearning_curve(mt, A, B, steps=(0, 1, 2), control=small_set.retain[:len(A)], lr=1e-4)
    assert curve["steps"] == [0, 1, 2]
    assert all(len(curve[k]) == 3 for k in ("B", "B_control", "B_never_known", "A"))
    assert curve["B"][0] == curve["B_control"][0] == 1.0          # TinyWorld knows every fact
    assert same_weights(mt, snap)


def test_linear_probe_reads_continents_from_the_subject(tinyworld):
    facts = [f for f in load_facts() if f.relation_id == "P30"]
    acc = U.probe_accuracy(tinyworld, facts[:80], facts[80:110], layer=2)
    assert acc > 0.5, "TinyWorld's layer 2 should encode a country's continent linearly"


def test_gpt2_shapes_npo_step_and_undo(gpt2_shapes_4_layers):
    mt = gpt2_shapes_4_layers
    snap = snapshot(mt)
    forget = [{"prompt": "The capital of {} is", "subject": "France", "target_true": {"str": "Paris"}}]
    retain = [{"prompt": "{} is located in", "subject": "Tokyo", "target_true": {"str": "Japan"}}]
    hp = U.UnlearnHyperParams(steps=1, lr=1e-3, layers=(3,))
    run = U.unlearn(mt, forget, retain, "npo", hp, progress=False)
    assert not same_weights(mt, snap)
    run.undo()
    assert same_weights(mt, snap)


# --- the retain model (the gold standard) -------------------------------------------------------------

def test_the_retain_model_never_read_the_forget_subjects_and_knows_the_rest(tinyworld):
    gold = U.load_retain_model("cpu")
    assert gold.tokenizer("The capital of Austria is")["input_ids"] == \
        tinyworld.tokenizer("The capital of Austria is")["input_ids"]          # the shipped tokenizer
    fs = U.make_forget_set("entities", 20, n_retain=20, n_heldout=100, seed=0, mt=tinyworld)
    U.check_never_read(fs)
    assert set(fs.subjects) == set(U.retain_model_subjects())
    assert U.recall(tinyworld, fs.forget) == 1.0
    assert U.recall(gold, fs.forget) <= 0.5, "the retain model recalls facts it never read"
    assert U.recall(gold, fs.heldout) >= 0.9, "the retain model lost facts it did read"
    other = U.make_forget_set("entities", 3, n_retain=4, n_heldout=4, seed=5)
    with pytest.raises(ValueError, match="did read"):
        U.check_never_read(other)


def test_another_retain_model_loads_from_its_folder_and_a_missing_one_says_how_to_train_it(tmp_path):
    import shutil
    from engramlib.tinyworld import RETAIN_DIR
    with pytest.raises(FileNotFoundError, match=f"missing from {tmp_path}.*--exclude-subjects"):
        U.load_retain_model("cpu", folder=tmp_path)
    for f in RETAIN_DIR.iterdir():
        shutil.copy(f, tmp_path)
    gold = U.load_retain_model("cpu", folder=tmp_path)
    assert gold.name == U.RETAIN_MODEL_NAME and next(gold.model.parameters()).dtype == torch.float32


def test_with_phrasings_adds_training_phrasings_never_a_heldout_paraphrase():
    from engramlib.facts import heldout_templates
    facts = [f for f in load_facts() if f.subject in ("France", "Space Needle")]
    base = U.requests_from_facts(facts)
    assert U.with_phrasings(base, 1) == base
    more = U.with_phrasings(base, 3)
    assert len(more) == 3 * len(base)
    for f in facts:
        prompts = [r["prompt"] for r in more if r["subject"] == f.subject and r["relation_id"] == f.relation_id]
        assert prompts[0] == f.relation.prompt and len(set(prompts)) == 3
        assert not set(prompts) & set(heldout_templates(f))
    alone = {"prompt": "{} wrote", "subject": "Shakespeare", "target_true": {"str": "Hamlet"}}
    assert U.with_phrasings([alone], 3) == [alone]


def test_rmu_position_masks(tinyworld):
    requests = U.requests_from_facts([f for f in load_facts() if f.subject == "Space Needle"][:1])
    batch = U._encode(tinyworld, requests)
    text = U._filled(requests[0])
    n = len(tinyworld.tokenizer(text)["input_ids"])
    start, end = U.find_subject_range(tinyworld.tokenizer, text, "Space Needle")
    masks = {w: U._prompt_mask(tinyworld, requests, batch, w)[0].nonzero().flatten().tolist()
             for w in ("after_subject", "from_subject", "prompt", "last")}
    assert masks["last"] == [n - 1]
    assert masks["after_subject"] == list(range(end - 1, n))
    assert masks["from_subject"] == list(range(start, n))
    assert masks["prompt"] == list(range(n))


@pytest.mark.parametrize("method", ["npo", "rmu"])
def test_each_method_trains_the_phrasings_its_hparams_ask_for(tinyworld, small_set, monkeypatch, method):
    from dataclasses import replace
    seen = {}

    def record(mt, forget, retain, *args):
        seen["forget"], seen["retain"] = forget, retain
    monkeypatch.setattr(U, "_rmu" if method == "rmu" else "_gradient_method", record)
    forget = U.requests_from_facts(small_set.forget)
    retain = U.requests_from_facts(small_set.retain)
    hp = replace(U.get_hparams(tinyworld, method), forget_phrasings=2, retain_phrasings=3)
    U.unlearn(tinyworld, forget, retain, method=method, hparams=hp, progress=False)
    assert seen["forget"] == U.with_phrasings(forget, 2)
    assert seen["retain"] == U.with_phrasings(retain, 3), "the retain set in its training phrasings"
