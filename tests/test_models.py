"""Model loading and the question-asking helpers, on TinyWorld and the GPT-2 stand-in."""
import os
import subprocess
import sys
import time

import pytest
import torch

from engramlib.facts import load_facts
from engramlib.models import (GPT2_SPEC, encode, first_token_id, generate, known_facts, load_model,
                              next_token_probs, predict_next)


def test_tinyworld_is_a_gpt2():
    """(Its load time is a benchmark: benchmarks/load_time.py.)"""
    mt = load_model("tinyworld", device="cpu")
    assert type(mt.model).__name__ == "GPT2LMHeadModel"
    assert mt.name == "tinyworld" and mt.n_layers == mt.model.config.n_layer
    assert mt.tokenizer("The Eiffel Tower", return_offsets_mapping=True)["offset_mapping"]


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*tinyworld"):
        load_model("gpt5")


def test_hub_model_offline_fails_fast_with_advice():
    # a fresh interpreter, so HF_HUB_OFFLINE is read at import time as on a user's machine
    code = "from engramlib.models import load_model; load_model('gpt2')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-engram-test-cache"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert time.perf_counter() - start < 30
    assert out.returncode != 0
    assert "ENGRAM_MODEL=tinyworld" in out.stderr


def test_spec_names_real_modules(any_model):
    mt = any_model
    for template in (GPT2_SPEC.layer, GPT2_SPEC.mlp, GPT2_SPEC.attn, GPT2_SPEC.mlp_out):
        assert isinstance(mt.module(template, 0), torch.nn.Module)
    for name in (GPT2_SPEC.embedding, GPT2_SPEC.final_norm, GPT2_SPEC.lm_head):
        assert isinstance(mt.module(name), torch.nn.Module)
    with pytest.raises(ValueError, match="out of range"):
        mt.module(GPT2_SPEC.mlp, mt.n_layers)


def test_batched_prediction_equals_one_by_one(any_model):
    """Right padding must not change any prompt's next-token distribution."""
    mt = any_model
    prompts = ["The capital of France is", "Lionel Messi plays", "The Space Needle is located in the city of"]
    batched = next_token_probs(mt, prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i], next_token_probs(mt, [p])[0], atol=1e-5, rtol=1e-4)
    enc = encode(mt, prompts)
    assert enc["last"].tolist() == [len(mt.tokenizer(p)["input_ids"]) - 1 for p in prompts]


def test_predict_next_returns_sorted_probabilities(any_model):
    top = predict_next(any_model, "The capital of France is", k=4)
    assert len(top) == 4 and all(isinstance(t, str) for t, _ in top)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_generate_is_deterministic_and_extends_prompt(any_model):
    a = generate(any_model, "The capital of France is", max_new_tokens=5)
    b = generate(any_model, "The capital of France is", max_new_tokens=5)
    assert a == b and a.startswith("The capital of France is") and len(a) > len("The capital of France is")


def test_first_token_uses_leading_space(any_model):
    mt = any_model
    assert first_token_id(mt, "Paris") == mt.tokenizer(" Paris")["input_ids"][0]
    with pytest.raises(ValueError, match="empty"):
        first_token_id(mt, "  ")


def test_tinyworld_knows_the_papers_examples(tinyworld):
    canon = [("Eiffel Tower", "Paris"), ("Colosseum", "Rome"), ("Space Needle", "Seattle"),
             ("Danielle Darrieux", "French")]
    facts = [f for f in load_facts() if (f.subject, f.object) in canon]
    assert len(facts) == 4
    assert len(known_facts(tinyworld, facts)) == 4


def test_random_standin_knows_nothing(gpt2_standin):
    facts = load_facts()[:50]
    assert len(known_facts(gpt2_standin, facts)) <= 2


def test_hub_downloads_are_retried_with_backoff(monkeypatch):
    """A Hub model that fails to download is tried again (3 tries, backoff doubling), then one
    clear error; with HF_HUB_OFFLINE=1 it is not retried."""
    import transformers
    from engramlib import models
    calls, waits = [], []
    def failing(source, **kwargs):
        calls.append(kwargs.get("cache_dir"))
        raise OSError("connection reset")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", failing)
    monkeypatch.setattr(models.time, "sleep", waits.append)
    monkeypatch.setenv("ENGRAM_CACHE", "/tmp/engram-test-cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(models.ModelLoadError, match="3 tries.*tinyworld"):
        load_model("gpt2")
    assert len(calls) == 3 and waits == [5.0, 10.0] and calls[0] == "/tmp/engram-test-cache/huggingface"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls.clear()
    with pytest.raises(models.ModelLoadError, match="1 tries"):
        load_model("gpt2")
    assert len(calls) == 1
