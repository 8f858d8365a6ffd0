"""The library on a CUDA GPU, as on Colab: edits, their undo (backups on the host), C⁻¹ moved to
the device, perplexity, tracing and a collapse dashboard, all on TinyWorld loaded on the GPU.
Skipped without CUDA (this project's CI has none; run it where a GPU is lent:
`python -m pytest tests/gpu -q`)."""
from dataclasses import replace

import pytest
import torch

from engramlib import memit, rome
from engramlib.facts import counterfact_records
from engramlib.models import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REQUEST = {"prompt": "{} is located in the city of", "subject": "Space Needle",
           "target_new": {"str": "Paris"}, "target_true": {"str": "Seattle"}}


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_model("tinyworld", device="cuda")


def cpu_state(mt) -> dict:
    return {k: v.detach().cpu().clone() for k, v in mt.model.state_dict().items()}


def same(mt, state) -> bool:
    return all(torch.equal(v.cpu(), state[k]) for k, v in mt.model.state_dict().items())


def test_rome_edit_and_undo_on_the_gpu(mt):
    state = cpu_state(mt)
    C_inv = rome.inverse_key_covariance(mt, 0, progress=False)
    assert C_inv.device.type == "cuda" and rome._C_INV_CACHE and \
        all(v.device.type == "cpu" for v in rome._C_INV_CACHE.values())
    edit = rome.apply_rome_edit(mt, REQUEST, C_inv=C_inv)
    assert edit.prob_after > edit.prob_before and edit.original_weight.device.type == "cpu"
    edit.undo()
    assert same(mt, state)


def test_memit_sequential_and_dashboard_on_the_gpu(mt):
    state = cpu_state(mt)
    records = counterfact_records()[::300][:4]
    hp = replace(memit.HPARAMS["tinyworld"], context_lengths=((10, 1),), v_num_grad_steps=8)
    with memit.apply_memit(mt, [r["requested_rewrite"] for r in records], hp) as batch:
        assert all(w.device.type == "cpu" for w in batch.original_weights.values())
    assert same(mt, state)
    board = memit.collapse_dashboard(mt, records, "alphaedit", batch_size=2, every=2, hparams=hp,
                                     n_facts=10, n_texts=16, progress=False)
    assert len(board["perplexity"]) == 3 and all(v > 0 for v in board["delta_norm"][0][1:])
    assert same(mt, state)


def test_perplexity_and_trace_on_the_gpu(mt):
    from engramlib.fast_trace import trace
    texts = ["The Space Needle is located in the city of Seattle.", "Rome is a city in Italy."]
    on_gpu = memit.perplexity(mt, texts)
    mt.model.cpu()
    try:
        assert memit.perplexity(mt, texts) == pytest.approx(on_gpu, rel=1e-4)
    finally:
        mt.model.cuda()
    r = trace(mt, "The Space Needle is located in the city of", "Space Needle", kind="mlp", samples=4, window=3)
    assert r.high_score > r.low_score
