"""Causal tracing (Meng et al. 2022): where along the computation does a fact come back?

1. Run the prompt clean: p(answer) = `high_score`.
2. Corrupt the subject: add Gaussian noise (3 σ of subject embeddings) to the subject tokens'
   input embeddings, in `samples` noisy copies: p(answer) drops to `low_score`.
3. Restore one clean hidden state (token t, layer l) inside the corrupted runs. If p(answer)
   comes back, that state carries the fact: `scores[t, l]`.

kind=None restores a block's output (the residual stream); kind="mlp" / "attn" restores the MLP
or attention outputs of a *window* of layers centred on l, as in the paper.

`trace_loop` is the reference: one forward pass per (token, layer) site, like the official code.
`trace` (in `engramlib.fast_trace`, importable from here) gives the same numbers faster.
`average_indirect_effect` averages many traces within the paper's six token buckets (Fig. 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engramlib.hooks import TraceDict
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


def _site_modules(mt: ModelAndTokenizer, kind: str | None, layer: int, window: int) -> list:
    """Module names restored for one site: one block, or a window of mlp/attn modules around layer."""
    if kind is None:
        return [mt.spec.layer.format(layer)]
    template = {"mlp": mt.spec.mlp, "attn": mt.spec.attn}[kind]
    return [template.format(l) for l in _window(kind, layer, window, mt.n_layers)]


def _check_args(kind, samples: int, window: int):
    if kind not in KINDS:
        raise ValueError(f"kind must be None, 'mlp' or 'attn', got {kind!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (noisy copies of the prompt), got {samples}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (layers restored together; 1 = only the site's own "
                         f"layer, the paper uses 10), got {window}")


@dataclass
class TraceInputs:
    """What a trace needs before restoring anything (shared by `trace_loop` and the fast `trace`)."""
    ids: torch.Tensor           # [1, T]: the prompt's token ids
    start: int                  # subject tokens are start..end-1
    end: int
    noise: float                # std of the added Gaussian noise
    noise_draws: torch.Tensor   # [samples, end - start, d]: the noise added to each noisy copy
    answer_id: int              # the token whose probability is measured
    high_score: float           # p(answer) on the clean prompt


def _prepare(mt: ModelAndTokenizer, prompt: str, subject: str, samples: int, noise, answer,
             seed: int) -> TraceInputs:
    """Tokenize, find the subject, draw the noise (seeded), run the clean prompt once."""
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    noise = noise_level(mt, [subject]) if noise is None else float(noise)
    gen = torch.Generator().manual_seed(seed)
    d = mt.model.config.n_embd
    noise_draws = (torch.randn(samples, end - start, d, generator=gen) * noise).to(mt.device)
    with torch.no_grad():
        clean_probs = torch.softmax(mt.model(input_ids=ids).logits[0, -1].float(), -1)
    answer_id = int(clean_probs.argmax()) if answer is None else first_token_id(mt, answer)
    return TraceInputs(ids=ids, start=start, end=end, noise=noise, noise_draws=noise_draws,
                       answer_id=answer_id, high_score=clean_probs[answer_id].item())


def _corrupt(embeddings: torch.Tensor, inputs: TraceInputs) -> torch.Tensor:
    """Add the noise draws to the subject tokens of rows 1.. (row 0 stays clean).

    embeddings: [samples + 1, T, d]. Returns a new tensor."""
    h = embeddings.clone()
    h[1:, inputs.start:inputs.end] += inputs.noise_draws.to(h.dtype)
    return h


@torch.no_grad()
def _corrupted_run(mt, inputs: TraceInputs, restore: dict) -> float:
    """p(answer) averaged over the noisy rows, restoring {module name: [token, ...]} from row 0."""
    batch = inputs.ids.expand(inputs.noise_draws.shape[0] + 1, -1)

    def restore_fn(h, name):
        if name == mt.spec.embedding:
            return _corrupt(h, inputs)
        h = h.clone()
        tokens = restore[name]
        h[1:, tokens] = h[0, tokens]
        return h

    with TraceDict(mt.model, [mt.spec.embedding] + list(restore), retain_output=False,
                   edit_output=restore_fn):
        logits = mt.model(input_ids=batch).logits[1:, -1].float()
    return torch.softmax(logits, -1)[:, inputs.answer_id].mean().item()


def _result(mt, inputs: TraceInputs, scores, low: float, kind, window: int, prompt: str) -> TraceResult:
    return TraceResult(scores=scores, low_score=low, high_score=inputs.high_score,
                       tokens=[mt.tokenizer.decode([i]) for i in inputs.ids[0].tolist()],
                       subject_range=(inputs.start, inputs.end),
                       answer=mt.tokenizer.decode([inputs.answer_id]), kind=kind,
                       window=window, noise=inputs.noise, prompt=prompt)


def trace_loop(mt: ModelAndTokenizer, prompt: str, subject: str, kind: str | None = None,
               samples: int = 10, noise: float | None = None, window: int = 10,
               answer: str | None = None, seed: int = 1, progress: bool = False) -> TraceResult:
    """Reference causal trace: one forward pass (batch samples+1) per (token, layer) site.

    prompt is used exactly as given. answer: the string whose first token is scored; None = the
    model's own top prediction on the clean prompt. Returns a `TraceResult`.
    """
    _check_args(kind, samples, window)
    inputs = _prepare(mt, prompt, subject, samples, noise, answer, seed)
    n_tokens = inputs.ids.shape[1]
    low = _corrupted_run(mt, inputs, {})
    scores = torch.zeros(n_tokens, mt.n_layers)
    sites = [(t, l) for t in range(n_tokens) for l in range(mt.n_layers)]
    for t, l in tqdm(sites, desc="tracing (loop)", disable=not progress):
        scores[t, l] = _corrupted_run(mt, inputs, {m: [t] for m in _site_modules(mt, kind, l, window)})
    return _result(mt, inputs, scores, low, kind, window, prompt)


# --- averages over many facts (Fig. 2 of the paper) --------------------------------------------

BUCKETS = ("first subject token", "middle subject tokens", "last subject token",
           "first subsequent token", "further tokens", "last token")


def bucket_effects(result: TraceResult) -> torch.Tensor:
    """[6, layers]: the indirect effects averaged within the paper's six token buckets
    (NaN for an empty bucket, e.g. 'middle' when the subject has two tokens)."""
    ie = result.indirect_effects
    s, e = result.subject_range
    n = ie.shape[0]
    groups = [[s], list(range(s + 1, e - 1)), [e - 1], [e] if e < n - 1 else [],
              list(range(e + 1, n - 1)), [n - 1]]
    nan = torch.full((ie.shape[1],), float("nan"))
    return torch.stack([ie[g].mean(0) if g else nan for g in groups])


@dataclass
class AIEResult:
    effects: torch.Tensor       # [6, layers]: average indirect effect per bucket and layer
    ci: torch.Tensor            # [6, layers]: half-width of the 95 % confidence interval
    total_effect: float         # average of high_score - low_score
    high_score: float           # average clean p(answer)
    low_score: float            # average corrupted p(answer)
    kind: str | None
    n: int                      # number of facts averaged


def average_indirect_effect(mt: ModelAndTokenizer, facts, kind: str | None = None,
                            samples: int = 10, noise: float | None = None, window: int = 10,
                            tracer=None, progress: bool = True) -> AIEResult:
    """Trace every fact (its rewrite prompt, its object as the answer) and average per bucket.

    facts: `engramlib.facts.Fact`s the model knows (see `models.known_facts`); noise defaults to
    3 σ over all their subjects. tracer: the trace function (default `trace`).
    """
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to average over")
    if tracer is None:
        from engramlib.fast_trace import trace as tracer    # fast_trace imports this module
    noise = noise_level(mt, [f.subject for f in facts]) if noise is None else noise
    per_fact, highs, lows = [], [], []
    for f in tqdm(facts, desc=f"AIE ({kind or 'hidden'})", disable=not progress):
        r = tracer(mt, f.prompt, f.subject, kind=kind, samples=samples, noise=noise,
                   window=window, answer=f.object)
        per_fact.append(bucket_effects(r))
        highs.append(r.high_score)
        lows.append(r.low_score)
    stack = torch.stack(per_fact)                       # [facts, 6, layers]
    count = (~stack.isnan()).sum(0).clamp(min=1)
    mean = stack.nanmean(0)
    var = ((stack - mean).nan_to_num() ** 2).sum(0) / (count - 1).clamp(min=1)
    ci = 1.96 * var.sqrt() / count.sqrt()
    return AIEResult(effects=mean, ci=ci, total_effect=sum(highs) / len(highs) - sum(lows) / len(lows),
                     high_score=sum(highs) / len(highs), low_score=sum(lows) / len(lows),
                     kind=kind, n=len(facts))


def __getattr__(name):
    """`from engramlib.tracing import trace` works, though `trace` lives in `engramlib.fast_trace`
    (which imports this module, so importing it here at the top would be a cycle)."""
    if name == "trace":
        from engramlib.fast_trace import trace
        return trace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
