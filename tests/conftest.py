"""Shared fixtures: TinyWorld, and a GPT-2 small stand-in (random weights, GPT-2's real shapes and
real BPE tokenizer) for the code paths that GPT-2 takes on Colab."""
import os
from pathlib import Path

import pytest
import torch

from engramlib.models import ModelAndTokenizer, load_model, prepare_tokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tinyworld():
    return load_model("tinyworld", device="cpu")


@pytest.fixture(scope="session")
def gpt2_standin():
    """GPT-2 small's architecture (12 layers, d=768, 12 heads, 50,257 tokens) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
    tokenizer = prepare_tokenizer(GPT2TokenizerFast.from_pretrained(FIXTURES / "gpt2_tokenizer"))
    return ModelAndTokenizer(model=model, tokenizer=tokenizer, name="gpt2-standin")


@pytest.fixture(scope="session")
def gpt2_shapes_4_layers():
    """GPT-2 small's width, heads and vocabulary with 4 layers (random weights): GPT-2's shapes for
    the tests whose cost grows with depth squared (the loop trace)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4)).eval().requires_grad_(False)
    tokenizer = prepare_tokenizer(GPT2TokenizerFast.from_pretrained(FIXTURES / "gpt2_tokenizer"))
    return ModelAndTokenizer(model=model, tokenizer=tokenizer, name="gpt2-shapes-4-layers")


@pytest.fixture(params=["tinyworld", "gpt2_standin"])
def any_model(request):
    """Runs a test once on TinyWorld and once on the GPT-2 stand-in."""
    return request.getfixturevalue(request.param)


def pytest_ignore_collect(collection_path, config):
    """tests/browser (JupyterLab in Chromium) runs only with `make test-browser`, which sets
    ENGRAM_BROWSER_TESTS=1: it needs a browser and takes minutes."""
    if collection_path.name == "browser" and collection_path.parent.name == "tests":
        return not os.environ.get("ENGRAM_BROWSER_TESTS")
    return None
