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
`attribution_trace` / `attribution_trace_kinds` estimate the same grid to first order from one
forward and one backward pass (attribution patching; Nanda 2023, Syed et al. 2023).
`average_indirect_effect` averages many traces within the paper's six token buckets (Fig. 2).

The shared preparation (inputs, corruption, the result grid) lives in `engramlib.trace_inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engramlib.fast_trace import _is_gpt2, attribution_states, trace  # noqa: F401  (trace: importable from here)
from engramlib.hooks import TraceDict
from engramlib.models import ModelAndTokenizer
from engramlib.trace_inputs import (KINDS, TraceInputs, TraceResult, _check_args, _corrupt,  # noqa: F401
                                    _draw_noise, _prepare, _result, _window, _with_answer, noise_level)


def _site_modules(mt: ModelAndTokenizer, kind: str | None, layer: int, window: int) -> list:
    """Module names restored for one site: one block, or a window of mlp/attn modules around layer."""
    if kind is None:
        return [mt.spec.layer.format(layer)]
    template = {"mlp": mt.spec.mlp, "attn": mt.spec.attn}[kind]
    return [template.format(l) for l in _window(kind, layer, window, mt.n_layers)]


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


# --- attribution patching: the whole grid to first order (Nanda 2023; Syed et al. 2023) ----------

def _upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is already (half-precision models measure in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _site_names(mt: ModelAndTokenizer, kind: str | None) -> list:
    """[L] module names whose outputs are the sites of `kind` at window 1 (layer 0..L-1)."""
    return [_site_modules(mt, kind, layer, 1)[0] for layer in range(mt.n_layers)]


def _attribution_run(mt, inputs: TraceInputs, names: list, answer) -> tuple:
    """One forward pass of row 0 (clean) and rows 1.. (corrupted) that keeps the autograd graph;
    the clean row 0 gives the answer (None: its top token) and high_score.

    Returns (inputs with the answer, p(answer) of rows 1.. [S], {name: that module's output
    [S + 1, T, d], in the graph})."""
    batch = inputs.ids.expand(inputs.noise_draws.shape[0] + 1, -1)

    def corrupt(h, name):
        if name != mt.spec.embedding:
            return h                                   # record only
        h = _corrupt(h, inputs)
        return h if h.requires_grad else h.requires_grad_()   # the graph starts here

    with torch.enable_grad(), TraceDict(mt.model, [mt.spec.embedding] + names, edit_output=corrupt,
                                        detach=False) as recorded:
        last = mt.model.base_model(input_ids=batch).last_hidden_state[:, -1]     # [S + 1, d]
        logits = _upcast(mt.model.get_output_embeddings()(last))                  # last position only
        inputs = _with_answer(mt, inputs, logits[0], answer)
        probs = torch.softmax(logits[1:], -1)[:, inputs.answer_id]
    return inputs, probs, {name: recorded[name].output for name in names}


def _first_order_effects(clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(h_clean − h_corrupt) · ∂p/∂h at every token, averaged over the corrupted rows.

    clean: [T, d]; corrupted: [S, T, d]; grad: [S, T, d], row s's ∂p_s/∂h_s (one backward pass of
    Σ_s p_s gives them all: the rows do not interact). Returns [T]."""
    delta = _upcast(clean - corrupted)                 # [S, T, d]: clean minus corrupted
    return (delta * _upcast(grad)).sum(-1).mean(0)


def attribution_trace_kinds(mt: ModelAndTokenizer, prompt: str, subject: str, samples: int = 10,
                            noise: float | None = None, answer: str | None = None,
                            seed: int = 1) -> list:
    """Attribution patching: all three trace grids (hidden state, MLP, attention) to first order.

    For each site h (a block, MLP or attention output at token t, layer l) the causal trace
    measures p(answer) in the corrupted run with h set to its clean value. Its first-order Taylor
    estimate around the corrupted run is

        score[t, l] = low_score + mean over noise draws of (h_clean − h_corrupt) · ∂p/∂h_corrupt

    (Nanda 2023; Syed et al. 2023). One forward pass of the clean prompt and of one corrupted copy
    per noise draw (the same draws as `trace` with the same seed) records every site's h; ONE
    backward pass of Σ_s p_s gives ∂p/∂h for all 3 L sites at every token at once. Before the
    subject h_clean = h_corrupt, so those scores are low_score, as in the trace. GPT-2 models run
    `fast_trace.attribution_states` (the same numbers, less work); others run hooks.

    Windows: these are window-1 grids (each site restores its own layer only). To first order, a
    restoration of several outputs at once (the trace's window of mlp/attn layers) is the sum of
    their first-order effects, each taken with the window's other restored outputs held fixed.
    The window-1 scores here let the later outputs respond, so summing them over a window also
    counts the path from a lower restored output through a higher one at the same token, which
    a window restoration cuts (it overwrites the higher one).

    Returns [TraceResult for kind None, "mlp", "attn"] (window 1), like `trace`'s.
    """
    _check_args(None, samples, 1)
    inputs = _draw_noise(mt, prompt, subject, samples, noise, seed)     # the same draws as `trace`
    inputs, low, grids = _attribution_grids(mt, inputs, answer)
    return [_result(mt, inputs, low + grids[kind], low, kind, 1, prompt) for kind in KINDS]


def _attribution_grids(mt, inputs: TraceInputs, answer) -> tuple:
    """The work of `attribution_trace_kinds` on prepared inputs (noise drawn, answer not yet known):
    GPT-2's own forward pass (`fast_trace.attribution_states`, which skips what no gradient uses)
    for GPT-2 models, hooks on the Hugging Face model (`_attribution_grids_hooks`) otherwise.

    Returns (inputs with the answer, low_score, {kind: first-order effects [T, L]})."""
    if not _is_gpt2(mt):
        return _attribution_grids_hooks(mt, inputs, answer)
    inputs, probs, states = attribution_states(mt, inputs, answer)
    flat = [(kind, layer, *state) for kind in KINDS for layer, state in enumerate(states[kind])]
    with torch.enable_grad():                          # also when called under torch.no_grad()
        grads = torch.autograd.grad(probs.sum(), [corrupted for *_, corrupted, _ in flat],  # one backward
                                    allow_unused=True)
    T = inputs.ids.shape[1]
    grids = {kind: torch.zeros(T, mt.n_layers, dtype=_upcast(probs).dtype) for kind in KINDS}
    for (kind, layer, clean, corrupted, t0), g in zip(flat, grads):
        if g is not None:                              # None: cannot reach p(answer), effect 0
            grids[kind][t0:, layer] = _first_order_effects(clean, corrupted.detach(), g).cpu()
    return inputs, probs.mean().item(), grids


def _attribution_grids_hooks(mt, inputs: TraceInputs, answer) -> tuple:
    """`_attribution_grids` for any model with hooks: one forward pass of the whole batch through
    the Hugging Face model, recording every site's output (the obvious twin of the GPT-2 path)."""
    names = [name for kind in KINDS for name in _site_names(mt, kind)]
    inputs, probs, outputs = _attribution_run(mt, inputs, names, answer)
    with torch.enable_grad():                          # also when called under torch.no_grad()
        grads = torch.autograd.grad(probs.sum(), [outputs[name] for name in names],  # one backward
                                    allow_unused=True)
    h = {name: outputs[name].detach() for name in names}                  # [S + 1, T, d], row 0 clean
    effects = {name: _first_order_effects(h[name][0], h[name][1:],
                                          torch.zeros_like(h[name][1:]) if g is None else g[1:])
               for name, g in zip(names, grads)}
    grids = {kind: torch.stack([effects[name] for name in _site_names(mt, kind)], dim=1).cpu()
             for kind in KINDS}
    return inputs, probs.mean().item(), grids


def attribution_trace(mt: ModelAndTokenizer, prompt: str, subject: str, kind: str | None = None,
                      samples: int = 10, noise: float | None = None, answer: str | None = None,
                      seed: int = 1) -> TraceResult:
    """One kind's attribution-patching grid (window 1): `attribution_trace_kinds`' entry for
    `kind`. It costs the same as all three (one forward and one backward pass): when you need
    several kinds, call `attribution_trace_kinds` once."""
    _check_args(kind, samples, 1)
    return attribution_trace_kinds(mt, prompt, subject, samples, noise, answer, seed)[KINDS.index(kind)]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties sharing their average rank."""
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    _, group, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return (torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, ranks) / counts)[group]


def agreement(reference: TraceResult, estimate: TraceResult) -> dict:
    """How well an estimate (e.g. `attribution_trace`) reproduces a trace's map, over the sites
    from the subject's first token on (before it both are low_score by construction).

    Returns {"rank_correlation": Spearman's ρ of the indirect effects, "same_top_site": whether
    both put their largest effect at the same (token, layer), "top_reference"/"top_estimate":
    those sites}."""
    start = reference.subject_range[0]
    a, b = reference.indirect_effects[start:], estimate.indirect_effects[start:]
    if a.shape != b.shape:
        raise ValueError(f"the maps differ in shape: {tuple(reference.scores.shape)} and "
                         f"{tuple(estimate.scores.shape)}; trace the same prompt with the same model")
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    rho = (ra @ rb / (ra.norm() * rb.norm()).clamp(min=1e-12)).item()
    site = lambda m: tuple(int(i) for i in divmod(int(m.argmax()), m.shape[1]))
    top_a, top_b = site(a), site(b)
    return {"rank_correlation": rho, "same_top_site": top_a == top_b,
            "top_reference": (top_a[0] + start, top_a[1]), "top_estimate": (top_b[0] + start, top_b[1])}


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
    tracer = trace if tracer is None else tracer
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
