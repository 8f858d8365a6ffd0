"""ROME: requests are validated, an edit raises p(target) and leaves neighbours, undo is exact."""
from dataclasses import replace
from pathlib import Path

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


def test_v_star_loss_falls_and_delta_respects_the_clamp(tinyworld, tw_templates):
    hp = replace(rome.get_hparams(tinyworld), early_stop_loss=0.0, v_num_grad_steps=8)
    out = rome.compute_v_star(tinyworld, rome.check_request(tinyworld, REQUEST), hp.layer, hp, tw_templates)
    assert out["losses"][-1] < 0.2 * out["losses"][0]
    tight = replace(hp, clamp_norm_factor=0.05)
    out = rome.compute_v_star(tinyworld, rome.check_request(tinyworld, REQUEST), hp.layer, tight, tw_templates)
    assert out["delta"].norm() <= 0.05 * out["v_init_norm"] * (1 + 1e-5)


def test_v_star_erase_objective_starts_at_minus_log_one_minus_p_true_and_lowers_it(tinyworld, tw_templates):
    """objective="erase" (chapter 11): at δ = 0 the loss is −mean log(1 − p(o)) over the templates,
    p(o) the true object's first token after each filled template (KL and decay are 0 there)."""
    from engramlib.models import first_token_id, next_token_probs
    mt = tinyworld
    hp = replace(rome.get_hparams(mt), early_stop_loss=0.0, v_num_grad_steps=8)
    request = rome.check_request(mt, REQUEST)
    prompts = [t.format(REQUEST["prompt"]).format(REQUEST["subject"]) for t in tw_templates]
    p_true = next_token_probs(mt, prompts)[:, first_token_id(mt, "Seattle")].double()
    out = rome.compute_v_star(mt, request, hp.layer, hp, tw_templates, objective="erase")
    assert out["losses"][0] == pytest.approx(-torch.log1p(-p_true).mean().item(), rel=1e-4)
    assert out["losses"][-1] < 0.5 * out["losses"][0]
    with pytest.raises(ValueError, match="objective"):
        rome.compute_v_star(mt, request, hp.layer, hp, tw_templates, objective="forget")


def test_v_star_loss_terms_match_the_reference_formulas():
    """NLL = mean −log p; KL(P_new ‖ P_init) = Σ p_new (log p_new − log p_init) (ROME's compute_v.py
    calls kl_div(init, new)); decay = w ‖δ‖ / ‖v₀‖² (the norm, not its square)."""
    g = torch.Generator().manual_seed(0)
    target_logp = torch.log(torch.rand(7, generator=g))
    now, init = (torch.log_softmax(torch.randn(2, 11, generator=g), -1) for _ in range(2))
    delta, v0 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    hp = rome.ROMEHyperParams(layer=0)
    t = rome.v_star_loss(target_logp, now, init, delta, v0, hp)
    kl_new_init = (now.exp() * (now - init)).sum(-1).mean()
    assert t["nll"].item() == pytest.approx(-target_logp.mean().item())
    assert t["kl"].item() == pytest.approx(kl_new_init.item(), rel=1e-5)
    assert t["weight_decay"].item() == pytest.approx(0.5 * delta.norm().item() / v0.norm().item() ** 2)
    assert t["loss"].item() == pytest.approx((t["nll"] + 0.0625 * t["kl"] + t["weight_decay"]).item())
    old = rome.v_star_loss(target_logp, now, init, delta, v0, replace(hp, kl="init||new", weight_decay="squared"))
    assert old["kl"].item() == pytest.approx((init.exp() * (init - now)).sum(-1).mean().item(), rel=1e-5)
    assert old["weight_decay"].item() == pytest.approx(0.5 * delta.norm().item() ** 2 / v0.norm().item() ** 2)
    with pytest.raises(ValueError, match="update_at"):
        replace(hp, update_at="average")


@pytest.mark.parametrize("layer", [0, 3])
def test_replaying_the_lower_blocks_gives_the_full_forward(tinyworld, layer):
    mt = tinyworld
    enc = mt.tokenizer(["The Space Needle is located in the city of", "Paris is"], return_tensors="pt",
                       padding=True)
    raw = {}
    hook = mt.module(mt.spec.layer, layer).register_forward_hook(lambda m, i, o: raw.update(out=o))
    with torch.no_grad():
        full = mt.model(**enc).logits
    hook.remove()
    from engramlib.hooks import hidden_of
    cached = hidden_of(raw["out"])
    ran = []
    above = mt.module(mt.spec.layer, layer + 1).register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad(), rome.lower_blocks_replayed(mt, layer, lambda: cached, raw["out"]):
        replayed = mt.model(**enc).logits
    above.remove()
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(replayed[real], full[real], atol=1e-5, rtol=1e-5)
    assert ran and type(mt.module(mt.spec.layer, 0)).__name__ == "GPT2Block"    # blocks restored


def test_template_keys_batched_equal_one_forward_each(tinyworld, tw_templates):
    from engramlib.hooks import Trace
    mt, layer = tinyworld, 2
    keys = rome.template_keys(mt, REQUEST, layer, tw_templates)
    for i, template in enumerate(tw_templates):
        text = template.format(REQUEST["prompt"]).format(REQUEST["subject"])
        idx = rome._last_subject_index(mt, text, REQUEST["subject"])
        with torch.no_grad(), Trace(mt.model, mt.spec.mlp_out.format(layer), retain_input=True) as t:
            mt.model(**mt.tokenizer(text, return_tensors="pt"))
        torch.testing.assert_close(keys[i], t.input[0, idx], atol=1e-5, rtol=1e-5)


def test_covariance_excludes_padding_and_is_cached_per_weights(tinyworld, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    mt = tinyworld
    texts = ["The capital of France is Paris.", "Lionel Messi plays soccer for a club in Miami today.",
             "Rome"]
    batched = rome.key_covariance(mt, 1, texts=texts, corpus="a", batch_size=3, progress=False)
    one_by_one = rome.key_covariance(mt, 1, texts=texts, corpus="b", batch_size=1, progress=False)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)     # pads never counted
    path = rome.covariance_path(mt, 1, "a", 100000)
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    assert torch.equal(rome.key_covariance(mt, 1, texts=["other"], corpus="a"), batched)   # cache hit
    assert rome.covariance_path(mt, 5, "a", 100000) != rome.covariance_path(mt, 1, "a", 100000)
    weight = mt.module(mt.spec.mlp_out, 0).weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] += 1.0                                   # "retrained": another fingerprint
        try:
            assert rome.covariance_path(mt, 1, "a", 100000) != path
        finally:
            weight[0, 0] = saved
    assert rome.covariance_path(mt, 1, "a", 100000) == path


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "C.pt"

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a tensor")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        rome.atomic_save(torch.eye(2), target)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def standin_C_inv(gpt2_standin):
    texts = ["The Eiffel Tower is in Paris.", "Lionel Messi plays soccer for a club in Miami.",
             "Rome is the capital of Italy, a country in Europe."] * 6
    C = rome.key_covariance(gpt2_standin, 4, texts=texts, corpus="t", n_samples=5000, cache=False,
                            progress=False)
    return torch.linalg.inv(C.double() + 1e-3 * torch.eye(3072, dtype=torch.float64)).float()


@pytest.mark.parametrize("update_at", ["bare_prompt", "k_star"])
def test_edit_on_gpt2_standin_writes_where_the_reference_writes(gpt2_standin, standin_C_inv, update_at):
    """Random weights: p(target) means nothing, but GPT-2's code path (Conv1D, BPE) runs and the
    update does what the reference does: after the edit the MLP output at the bare prompt's last
    subject token is v₀ + δ ("bare_prompt"; at the averaged key k* for "k_star"), the change is rank
    one along C⁻¹k*, and undo is exact."""
    from engramlib.hooks import Trace
    from engramlib.memory import rank_one_edit
    mt = gpt2_standin
    hp = rome.ROMEHyperParams(layer=4, v_num_grad_steps=5, v_lr=0.05, update_at=update_at)
    req = {**REQUEST, "prompt": "The {} is located in the city of"}
    module = mt.module(mt.spec.mlp_out, 4)
    original = module.weight.detach().clone()
    text = req["prompt"].format(req["subject"])
    idx = rome._last_subject_index(mt, text, req["subject"])

    def mlp_out_at_subject():
        with torch.no_grad(), Trace(mt.model, mt.spec.mlp.format(4)) as t:
            mt.model(**mt.tokenizer(text, return_tensors="pt"))
        return t.output[0, idx]
    v0 = mlp_out_at_subject()
    edit = rome.apply_rome_edit(mt, req, hparams=hp, C_inv=standin_C_inv, templates=["{}", "Hello. {}"],
                                require_improvement=False)
    assert module.weight.shape == (3072, 768)                           # Conv1D: (d_in, d_out)
    change = (module.weight - original).T.double()                        # (d_out, d_in)
    U, S, Vh = torch.linalg.svd(change)
    assert S[1] < 1e-4 * S[0]                                             # rank one
    direction = (standin_C_inv @ edit.k_star).double()
    assert abs(torch.nn.functional.cosine_similarity(Vh[0], direction, dim=0)) > 0.9999
    if update_at == "bare_prompt":
        torch.testing.assert_close(mlp_out_at_subject(), v0 + edit.v, atol=1e-4, rtol=1e-4)
    else:
        W = original.float().T
        expected = rank_one_edit(W, edit.k_star, W @ edit.k_star + edit.v, standin_C_inv)
        torch.testing.assert_close(module.weight.T, expected, atol=1e-5, rtol=1e-4)
    edit.undo()
    assert torch.equal(module.weight, original)
    assert "Edit(" in repr(edit) and "undone" in repr(edit) and len(repr(mt)) < 200


def test_evaluate_edits_loop_and_metrics(tinyworld, tw_templates):
    records = [r for r in counterfact_records() if r["requested_rewrite"]["relation_id"] == "P131"][:3]
    editor = lambda mt, req: rome.apply_rome_edit(mt, req, templates=tw_templates)
    out = evaluate_edits(tinyworld, records, editor, generations=False, progress=False)
    assert out["pre"]["ES"] < 50 and out["post"]["ES"] == 100
    assert set(out["post"]) >= {"ES", "PS", "NS", "EM", "PM", "NM", "S"}
    # a second editor reuses the unedited rows: the same "pre", and record_metrics only after edits
    import engramlib.evaluate as E
    calls = []
    real = E.record_metrics
    monkey = lambda mt, record: calls.append(record["case_id"]) or real(mt, record)
    E.record_metrics = monkey
    try:
        again = evaluate_edits(tinyworld, records, editor, generations=False, progress=False,
                               pre_rows=out["pre_rows"])
    finally:
        E.record_metrics = real
    assert again["pre"] == out["pre"] and len(calls) == len(records)
    with pytest.raises(ValueError, match="pre_rows has 1 rows for 3 records"):
        evaluate_edits(tinyworld, records, editor, pre_rows=out["pre_rows"][:1], progress=False)


def test_ngram_entropy_prefers_varied_text():
    assert ngram_entropy(["the cat sat on the mat and looked at the dog"]) > \
        ngram_entropy(["the the the the the the the the the the the"])
    assert summarize([{"rewrite": 1, "paraphrase": 0.5, "neighborhood": 1, "rewrite_magnitude": 0.5,
                       "paraphrase_magnitude": 0.1, "neighborhood_magnitude": 0.2}])["S"] == pytest.approx(75.0)


def test_tinyworld_ships_the_covariance_of_its_edited_layers(tinyworld):
    """The packaged C files carry today's weight fingerprints, so key_covariance finds them."""
    from pathlib import Path
    shipped = Path(rome.__file__).parent / "tinyworld" / "stats"
    for layer in (0, 1, 2):
        name = rome.covariance_path(tinyworld, layer, "tinyworld-sentences", 100000).name
        assert (shipped / name).exists(), f"layer {layer}: {name} is not shipped (retrained weights? recompute)"
    C = torch.load(shipped / rome.covariance_path(tinyworld, 0, "tinyworld-sentences", 100000).name)
    assert C.shape == (1024, 1024) and torch.allclose(C, C.T) and torch.linalg.eigvalsh(C.double()).min() > -1e-6


# --- C as the reference computes it: published statistics, texts of up to n_positions tokens ------

OFFICIAL_NPZ = (Path(__file__).parent / "fixtures" / "stats" / "gpt2-medium" / "wikipedia_stats"
                / "transformer.h.8.mlp.c_proj_float32_mom2_100000.npz")   # d_mlp 64, 700 keys
ROME_URL = ("https://rome.baulab.info/data/stats/gpt2-medium/wikipedia_stats/"
            "transformer.h.8.mlp.c_proj_float32_mom2_100000.npz")


@pytest.fixture(scope="module")
def small_gpt2_medium():
    """Named gpt2-medium (so layer 8 has published statistics) but tiny: 9 layers, d_mlp 64,
    n_positions 32; GPT-2's tokenizer. Random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from engramlib.models import ModelAndTokenizer, prepare_tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=9, n_embd=16, n_head=2, n_positions=32)).eval()
    tok = prepare_tokenizer(GPT2TokenizerFast.from_pretrained(Path(__file__).parent / "fixtures" / "gpt2_tokenizer"))
    return ModelAndTokenizer(model=model.requires_grad_(False), tokenizer=tok, name="gpt2-medium")


@pytest.fixture
def served(monkeypatch, tmp_path):
    """A patched opener: {url: bytes} it serves (404 otherwise), and the list of URLs asked."""
    import urllib.error
    from engramlib import download
    files, asked = {}, []

    def fetch(url, tmp, timeout, progress, desc):
        asked.append(url)
        if url not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        Path(tmp).write_bytes(files[url])
    monkeypatch.setattr(download, "_fetch_once", fetch)
    monkeypatch.setattr(download, "BACKOFF", 0.0)
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    monkeypatch.delenv("ENGRAM_MIRROR", raising=False)
    rome.clear_caches()
    yield files, asked
    rome.clear_caches()


def official_C():
    import numpy as np
    with np.load(OFFICIAL_NPZ) as z:
        return torch.from_numpy(z["mom2.mom2"] / np.float32(z["mom2.count"]))


def no_computing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("C was computed, not read from the published statistics")
    monkeypatch.setattr(rome, "second_moment", fail)
    monkeypatch.setattr(rome, "generic_texts", fail)


def test_published_statistics_are_downloaded_once_and_used_not_recomputed(small_gpt2_medium, served,
                                                                          monkeypatch, capsys):
    files, asked = served
    files[ROME_URL] = OFFICIAL_NPZ.read_bytes()
    no_computing(monkeypatch)
    C = rome.key_covariance(small_gpt2_medium, 8)
    assert torch.equal(C, official_C()) and asked == [ROME_URL]           # C = mom2 / count
    assert rome.published_stats_path("gpt2-medium", 8).exists()
    C_inv = rome.inverse_key_covariance(small_gpt2_medium, 8)               # hparams' path: 100,000
    torch.testing.assert_close(C_inv @ C, torch.eye(64), atol=1e-4, rtol=0)
    assert asked == [ROME_URL]                                              # read from the cache
    assert "the reference's statistics (700 keys" in capsys.readouterr().out
    from engramlib.cli import print_statistics
    print_statistics()
    assert "gpt2-medium  layer 8   the reference's, cached" in capsys.readouterr().out


def test_a_truncated_cached_file_is_rejected_deleted_and_downloaded_again(small_gpt2_medium, served,
                                                                          monkeypatch, capsys):
    files, asked = served
    files[ROME_URL] = OFFICIAL_NPZ.read_bytes()
    path = rome.published_stats_path("gpt2-medium", 8)
    path.parent.mkdir(parents=True)
    path.write_bytes(OFFICIAL_NPZ.read_bytes()[:5000])                     # an interrupted copy
    no_computing(monkeypatch)
    C = rome.key_covariance(small_gpt2_medium, 8, progress=False)
    out = capsys.readouterr().out
    assert "rejected the cached statistics" in out and "truncated?" in out
    assert torch.equal(C, official_C()) and asked == [ROME_URL]


def test_wrong_shaped_statistics_are_refused_and_C_is_computed(small_gpt2_medium, served, monkeypatch,
                                                               capsys, tmp_path):
    import numpy as np
    files, asked = served
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"mom2.mom2": np.eye(32, dtype=np.float32), "mom2.count": 10, "sample_size": 100000})
    files[ROME_URL] = wrong.read_bytes()
    texts = ["The Eiffel Tower is in Paris.", "Rome is the capital of Italy, a country in Europe."]
    monkeypatch.setattr(rome, "generic_texts", lambda mt, progress=True: ("t", texts))
    C = rome.key_covariance(small_gpt2_medium, 8, progress=True)
    out = capsys.readouterr().out
    assert "(32, 32)" in out and "computing C locally" in out and "from 2 texts of t" in out
    assert C.shape == (64, 64) and not torch.allclose(C, official_C())
    assert not rome.published_stats_path("gpt2-medium", 8).exists() and len(asked) == 3   # 3 tries


def test_unpublished_layers_models_and_folders_never_download(small_gpt2_medium, tinyworld, served,
                                                              monkeypatch):
    files, asked = served
    monkeypatch.setattr(rome, "generic_texts", lambda mt, progress=True: ("t", ["Paris is in France."]))
    assert rome.key_covariance(small_gpt2_medium, 3, progress=False).shape == (64, 64)
    assert rome.key_covariance(tinyworld, 0, progress=False).shape == (1024, 1024)   # shipped
    assert asked == []
    assert rome.published_stats_urls("gpt2-xl", 17) == [
        "https://rome.baulab.info/data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz",
        "https://memit.baulab.info/data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz"]
    assert [u.split("/")[2] for u in rome.published_stats_urls("gpt2-xl", 13)] == ["memit.baulab.info"]
    assert rome.published_stats_urls("gpt2", 4) == []


@pytest.mark.parametrize("state, message", [
    ({"mom2.mom2": "eye"}, "no \\['mom2.count'\\]"),
    ({"mom2.mom2": "eye", "mom2.count": 0}, "positive integer"),
    ({"mom2.mom2": "nan", "mom2.count": 5}, "finite"),
    ({"mom2.mom2": "small", "mom2.count": 5}, "shape \\(2, 2\\)"),
])
def test_read_second_moment_says_what_is_wrong(tmp_path, state, message):
    import numpy as np
    arrays = {"eye": np.eye(4, dtype=np.float32), "nan": np.full((4, 4), np.nan, np.float32),
              "small": np.eye(2, dtype=np.float32)}
    np.savez(tmp_path / "s.npz", **{k: arrays.get(v, v) if isinstance(v, str) else v for k, v in state.items()})
    with pytest.raises(ValueError, match=message):
        rome.read_second_moment(tmp_path / "s.npz", 4)
    (tmp_path / "t.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        rome.read_second_moment(tmp_path / "t.npz", 4)


def test_C_counts_texts_of_up_to_n_positions_tokens(small_gpt2_medium):
    """As rome/layer_stats.py: n_samples texts, each cut at n_positions (32 here), all their keys;
    count="keys" stops after n_samples keys (TinyWorld's shipped C)."""
    from engramlib.hooks import Trace
    mt = small_gpt2_medium
    long = "Rome is the capital of Italy, " * 10                   # > 32 tokens
    texts = [long, "Paris is in France.", "Lionel Messi plays soccer."]
    out = rome.second_moment(mt, 2, texts, n_samples=2, batch_size=2, progress=False)
    keys = []
    for text in texts[:2]:
        ids = mt.tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad(), Trace(mt.model, mt.spec.mlp_out.format(2), retain_input=True, stop=True) as t:
            mt.model(**ids)
        keys.append(t.input[0])
    K = torch.cat(keys).double()
    assert out["n_texts"] == 2 and out["n_keys"] == len(K) == 32 + len(mt.tokenizer(texts[1])["input_ids"])
    torch.testing.assert_close(out["C"].double(), K.T @ K / len(K), rtol=1e-4, atol=1e-6)
    by_keys = rome.second_moment(mt, 2, texts, n_samples=40, count="keys", progress=False)
    assert by_keys["n_keys"] == 40 and by_keys["n_texts"] == 3           # 32 + 5 + the first 3
    f64 = rome.second_moment(mt, 2, texts, n_samples=3, dtype=torch.float64, progress=False)["C"]
    f32 = rome.second_moment(mt, 2, texts, n_samples=3, dtype=torch.float32, progress=False)["C"]
    assert ((f32 - f64).norm() / f64.norm()).item() < 1e-6


def test_text_counted_caches_never_reuse_the_key_counted_files(tinyworld):
    keys = rome.covariance_path(tinyworld, 0, "tinyworld-sentences", 100000).name
    assert keys.endswith("_tinyworld-sentences_100000.pt")                # the shipped names
    assert rome.covariance_path(tinyworld, 0, "wikitext103", 2000).name.endswith("_wikitext103_2000texts.pt")
    assert rome.covariance_path(tinyworld, 0, "w", 5, max_len=16).name.endswith("_w_5texts_t16.pt")
    with pytest.raises(ValueError, match="count"):
        rome.covariance_path(tinyworld, 0, "w", 5, count="tokens")
