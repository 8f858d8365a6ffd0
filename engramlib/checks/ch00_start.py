"""Checks for chapter 00."""
from __future__ import annotations

import torch

from engramlib.checks._common import _fail, _ok


def most_likely_next(fn, mt=None):
    """Exercise 0.1: fn(mt, prompt) -> the model's most likely next token, as text (e.g. ' Paris')."""
    from engramlib.models import load_model, next_token_probs
    mt = mt or load_model("tinyworld", device="cpu")
    for prompt in ("The capital of France is", "Lionel Messi professionally plays the sport of"):
        expected = mt.tokenizer.decode([int(next_token_probs(mt, [prompt])[0].argmax())])
        got = fn(mt, prompt)
        if isinstance(got, (int, torch.Tensor)):
            _fail(f"got a token id ({got!r}); turn it into text with mt.tokenizer.decode([token_id])")
        if isinstance(got, (list, tuple)):
            _fail("got a list: return one string, the single most likely token")
        if not isinstance(got, str):
            _fail(f"expected a string, got {type(got).__name__}")
        if got.strip() == expected.strip() and got != expected:
            _fail(f"got {got!r}, expected {expected!r}: keep the leading space, it is part of "
                  "GPT-2's token (no .strip())")
        if got != expected:
            _fail(f"for {prompt!r} got {got!r}, expected {expected!r}: take the argmax over the "
                  "vocabulary of the probabilities at the LAST position")
    _ok("most_likely_next")
