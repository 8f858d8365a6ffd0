"""What every kind of trace shares: its inputs, the corruption, and the result grid.

Causal tracing (`tracing.trace_loop`, the fast `fast_trace.trace`) and attribution patching
(`tracing.attribution_trace`) all

1. tokenize the prompt, find the subject, draw the noise and run the clean prompt once
   (`_prepare` → `TraceInputs`);
2. add the noise to the subject tokens' embeddings of rows 1.. of a batch whose row 0 stays
   clean (`_corrupt`);
3. return a `TraceResult`: p(answer) per (token, layer) site (`_result`).

This module owns those steps; `tracing` and `fast_trace` import them (and not each other's
internals), so there is no import circle.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engramlib.models import ModelAndTokenizer, find_subject_range, first_token_id

KINDS = (None, "mlp", "attn")


@dataclass
class TraceResult:
    scores: torch.Tensor        # [tokens, layers]: p(answer) with that site restored (mean over samples)
    low_score: float            # p(answer) with the subject corrupted, nothing restored
    high_score: float           # p(answer) on the clean prompt
    tokens: list                # the prompt's tokens, as text
    subject_range: tuple        # (start, end): subject tokens are start..end-1
    answer: str                 # the answer token, as text
    kind: str | None            # None (block output), "mlp" or "attn"
    window: int                 # layers restored together for mlp / attn
    noise: float                # the noise level (std of the added Gaussian noise)
    prompt: str = ""

    @property
    def indirect_effects(self) -> torch.Tensor:
        """[tokens, layers]: scores - low_score (how much each restoration brings back)."""
        return self.scores - self.low_score

    @property
    def total_effect(self) -> float:
        return self.high_score - self.low_score


@dataclass
class TraceInputs:
    """What a trace needs before restoring anything (shared by every trace function)."""
    ids: torch.Tensor           # [1, T]: the prompt's token ids
    start: int                  # subject tokens are start..end-1
    end: int
    noise: float                # std of the added Gaussian noise
    noise_draws: torch.Tensor   # [samples, end - start, d]: the noise added to each noisy copy
    answer_id: int              # the token whose probability is measured
    high_score: float           # p(answer) on the clean prompt


def noise_level(mt: ModelAndTokenizer, subjects, factor: float = 3.0) -> float:
    """`factor` × the standard deviation of the subjects' token embeddings (the paper: 3 σ).

    Reads the embedding matrix directly (no forward passes). subjects: list of strings."""
    ids = sorted({i for s in subjects for i in mt.tokenizer(" " + s.strip())["input_ids"]})
    if not ids:
        raise ValueError("no subjects given")
    emb = mt.module(mt.spec.embedding).weight[ids].float()
    return factor * emb.std().item()


def _window(kind, layer: int, window: int, L: int) -> range:
    """Layers whose attn/mlp outputs a site at `layer` restores (empty for kind None)."""
    if kind is None:
        return range(0)
    return range(max(0, layer - window // 2), min(L, layer - (-window // 2)))


def _check_args(kind, samples: int, window: int):
    if kind not in KINDS:
        raise ValueError(f"kind must be None, 'mlp' or 'attn', got {kind!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (noisy copies of the prompt), got {samples}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (layers restored together; 1 = only the site's own "
                         f"layer, the paper uses 10), got {window}")


def _prepare(mt: ModelAndTokenizer, prompt: str, subject: str, samples: int, noise, answer,
             seed: int) -> TraceInputs:
    """Tokenize, find the subject, draw the noise (seeded), run the clean prompt once."""
    inputs = _draw_noise(mt, prompt, subject, samples, noise, seed)
    with torch.no_grad():
        clean_logits = mt.model(input_ids=inputs.ids).logits[0, -1]
    return _with_answer(mt, inputs, clean_logits, answer)


def _draw_noise(mt: ModelAndTokenizer, prompt: str, subject: str, samples: int, noise,
                seed: int) -> TraceInputs:
    """`_prepare` without the clean run: the answer is still unknown (answer_id -1, high_score NaN);
    `_with_answer` fills it in from the clean logits (for a trace whose batch has the clean row)."""
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    noise = noise_level(mt, [subject]) if noise is None else float(noise)
    gen = torch.Generator().manual_seed(seed)
    d = mt.model.config.n_embd
    noise_draws = (torch.randn(samples, end - start, d, generator=gen) * noise).to(mt.device)
    return TraceInputs(ids=ids, start=start, end=end, noise=noise, noise_draws=noise_draws,
                       answer_id=-1, high_score=float("nan"))


def _with_answer(mt: ModelAndTokenizer, inputs: TraceInputs, clean_logits: torch.Tensor,
                 answer) -> TraceInputs:
    """inputs with the answer (None: the clean run's top token) and its clean p(answer).
    clean_logits: [vocab], the clean prompt's last position."""
    clean_probs = torch.softmax(clean_logits.detach().float(), -1)
    answer_id = int(clean_probs.argmax()) if answer is None else first_token_id(mt, answer)
    return replace(inputs, answer_id=answer_id, high_score=clean_probs[answer_id].item())


def _corrupt(embeddings: torch.Tensor, inputs: TraceInputs) -> torch.Tensor:
    """Add the noise draws to the subject tokens of rows 1.. (row 0 stays clean).

    embeddings: [samples + 1, T, d]. Returns a new tensor."""
    h = embeddings.clone()
    h[1:, inputs.start:inputs.end] += inputs.noise_draws.to(h.dtype)
    return h


def _result(mt, inputs: TraceInputs, scores, low: float, kind, window: int, prompt: str) -> TraceResult:
    return TraceResult(scores=scores, low_score=low, high_score=inputs.high_score,
                       tokens=[mt.tokenizer.decode([i]) for i in inputs.ids[0].tolist()],
                       subject_range=(inputs.start, inputs.end),
                       answer=mt.tokenizer.decode([inputs.answer_id]), kind=kind,
                       window=window, noise=inputs.noise, prompt=prompt)
