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


# slow suites, each run by its own make target, which sets the variable: tests/browser (JupyterLab in
# Chromium, `make test-browser`), tests/book (builds the book, `make test-book`), tests/grading
# (grades with nbgrader, `make test-grading`)
SLOW_SUITES = {"browser": "ENGRAM_BROWSER_TESTS", "book": "ENGRAM_BOOK_TESTS", "grading": "ENGRAM_GRADING_TESTS"}


def pytest_ignore_collect(collection_path, config):
    """The slow suites are collected only when their variable is set: they need a browser, build
    the book or execute notebooks under nbgrader, and take minutes."""
    if collection_path.name in SLOW_SUITES and collection_path.parent.name == "tests":
        return not os.environ.get(SLOW_SUITES[collection_path.name])
    return None
