"""Causal tracing (Meng et al. 2022): where along the computation does a fact come back?

1. Run the prompt clean: p(answer) = `high_score`.
2. Corrupt the subject: add Gaussian noise (3 σ of subject embeddings) to the subject tokens'
   input embeddings, in `samples` noisy copies: p(answer) drops to `low_score`.
3. Restore one clean hidden state (token t, layer l) inside the corrupted runs. If p(answer)
   comes back, that state carries the fact: `scores[t, l]`.

kind=None restores a block's output (the residual stream); kind="mlp" / "attn" restores the MLP
or attention outputs of a *window* of layers centred on l, as in the paper.

`trace_loop` is the reference: one forward per (token, layer) site, like the official code.
`trace` gives the same numbers faster: it runs the clean and corrupted prompts once, caches
every layer's states and keys/values, and for each site recomputes only what a restoration can
change: the layers from the restored one upwards and the positions from the restored token onwards
(attention is causal). All sites of one token share a batch that grows layer by layer as sites
join at their first changed layer, and sites whose restorations agree so far (overlapping mlp/attn
windows) share one computation until they differ. Sites before the subject are skipped: there the
clean and corrupted runs are identical, so restoring them changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engramlib.hooks import TraceDict
from engramlib.models import ModelAndTokenizer, first_token_id

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


def find_subject_range(tokenizer, prompt: str, subject: str, occurrence: int | None = None) -> tuple:
    """Token range (start, end) of `subject` inside `prompt`, with GPT-2's leading-space BPE.

    The match is exact (case-sensitive). A subject that appears more than once is ambiguous:
    pass `occurrence` (0 = first) to choose one. Absent or ambiguous -> ValueError.
    """
    if not subject or not subject.strip():
        raise ValueError("empty subject")
    starts = [i for i in range(len(prompt)) if prompt.startswith(subject, i)]
    if not starts:
        lower = prompt.lower().find(subject.lower())
        hint = (f"; it appears with different casing as {prompt[lower:lower + len(subject)]!r}"
                if lower >= 0 else "; check the spelling")
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}{hint}")
    if len(starts) > 1 and occurrence is None:
        raise ValueError(f"subject {subject!r} appears {len(starts)} times in {prompt!r}; "
                         "pass occurrence=0 for the first, 1 for the second, ...")
    c0 = starts[occurrence or 0]
    c1 = c0 + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < c1 and b > c0]
    return inside[0], inside[-1] + 1


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


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be None, 'mlp' or 'attn', got {kind!r}")


def _prepare(mt: ModelAndTokenizer, prompt: str, subject: str, samples: int, noise, answer, seed):
    """Shared set-up of a trace: inputs (clean row + `samples` rows), subject range, noise, answer."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    noise = noise_level(mt, [subject]) if noise is None else float(noise)
    gen = torch.Generator().manual_seed(seed)
    d = mt.model.config.n_embd
    noise_draws = (torch.randn(samples, end - start, d, generator=gen) * noise).to(mt.device)
    with torch.no_grad():
        clean_probs = torch.softmax(mt.model(input_ids=ids).logits[0, -1].float(), -1)
    answer_id = int(clean_probs.argmax()) if answer is None else first_token_id(mt, answer)
    return dict(ids=ids, start=start, end=end, noise=noise, noise_draws=noise_draws,
                answer_id=answer_id, high=clean_probs[answer_id].item())


def _corrupt_hook(mt, setup):
    """edit_output for the embedding: add the noise draws to the subject tokens of rows 1.."""
    start, end, draws = setup["start"], setup["end"], setup["noise_draws"]

    def corrupt(h, name):
        h = h.clone()
        h[1:, start:end] += draws.to(h.dtype)
        return h
    return corrupt


@torch.no_grad()
def _corrupted_run(mt, setup, restore: dict) -> float:
    """p(answer) averaged over the noisy rows, restoring {module name: [token, ...]} from row 0."""
    batch = setup["ids"].expand(setup["noise_draws"].shape[0] + 1, -1)

    def restore_fn(h, name):
        if name == mt.spec.embedding:
            return _corrupt_hook(mt, setup)(h, name)
        h = h.clone()
        tokens = restore[name]
        h[1:, tokens] = h[0, tokens]
        return h

    with TraceDict(mt.model, [mt.spec.embedding] + list(restore), retain_output=False,
                   edit_output=restore_fn):
        logits = mt.model(input_ids=batch).logits[1:, -1].float()
    return torch.softmax(logits, -1)[:, setup["answer_id"]].mean().item()


def trace_loop(mt: ModelAndTokenizer, prompt: str, subject: str, kind: str | None = None,
               samples: int = 10, noise: float | None = None, window: int = 10,
               answer: str | None = None, seed: int = 1, progress: bool = False) -> TraceResult:
    """Reference causal trace: one forward pass (batch samples+1) per (token, layer) site.

    prompt is used exactly as given. answer: the string whose first token is scored; None = the
    model's own top prediction on the clean prompt. Returns a `TraceResult`.
    """
    _check_kind(kind)
    setup = _prepare(mt, prompt, subject, samples, noise, answer, seed)
    n_tokens = setup["ids"].shape[1]
    low = _corrupted_run(mt, setup, {})
    scores = torch.zeros(n_tokens, mt.n_layers)
    sites = [(t, l) for t in range(n_tokens) for l in range(mt.n_layers)]
    for t, l in tqdm(sites, desc="tracing (loop)", disable=not progress):
        scores[t, l] = _corrupted_run(mt, setup, {m: [t] for m in _site_modules(mt, kind, l, window)})
    return TraceResult(scores=scores, low_score=low, high_score=setup["high"],
                       tokens=[mt.tokenizer.decode([i]) for i in setup["ids"][0].tolist()],
                       subject_range=(setup["start"], setup["end"]),
                       answer=mt.tokenizer.decode([setup["answer_id"]]), kind=kind,
                       window=window, noise=setup["noise"], prompt=prompt)


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
    tracer = tracer or trace
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


# --- the fast trace ----------------------------------------------------------------------------

def _attention(attn, x, past_k, past_v, layer: int):
    """GPT-2 self-attention of new positions x [B, P, d] over shared past keys/values
    [R, H, p0, dh] (B = n·R: every group of R rows sees the same past, which is broadcast, not
    copied) plus their own. Returns (output [B, P, d], keys, values [B, H, P, dh])."""
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
    B, P, _ = x.shape
    R, p0 = past_k.shape[0], past_k.shape[2]
    heads = lambda t: t.view(B, P, -1, attn.head_dim).transpose(1, 2)      # [B, H, P, dh]
    q, k, v = heads(q), heads(k), heads(v)
    scale = attn.head_dim ** -0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
    if getattr(attn.config, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    groups = lambda t: t.view(B // R, R, *t.shape[1:])                     # [n, R, H, P, dh]
    w_past = groups(q) @ past_k.transpose(-1, -2) * scale                  # [n, R, H, P, p0]
    w_new = groups(q) @ groups(k).transpose(-1, -2) * scale                # [n, R, H, P, P]
    causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()
    w_new = w_new.masked_fill(~causal, float("-inf"))
    w = torch.softmax(torch.cat([w_past, w_new], dim=-1), dim=-1)
    out = w[..., :p0] @ past_v + w[..., p0:] @ groups(v)                   # [n, R, H, P, dh]
    out = out.view(B, -1, P, attn.head_dim).transpose(1, 2).reshape(B, P, -1)
    return attn.c_proj(out), k, v


def _block(block, x, past_k, past_v, layer: int, edit_attn=None, edit_mlp=None):
    """One GPT-2 block on new positions x [B, P, d], optionally editing the attention / MLP output.
    Returns (block output, attention output, MLP output, new keys, new values)."""
    attn_out, k, v = _attention(block.attn, block.ln_1(x), past_k, past_v, layer)
    if edit_attn is not None:
        attn_out = edit_attn(attn_out)
    h = x + attn_out
    mlp_out = block.mlp(block.ln_2(h))
    if edit_mlp is not None:
        mlp_out = edit_mlp(mlp_out)
    return h + mlp_out, attn_out, mlp_out, k, v


def _check_gpt2(mt):
    cfg = mt.model.config
    if cfg.model_type != "gpt2" or getattr(cfg, "reorder_and_upcast_attn", False):
        raise ValueError("the fast trace implements GPT-2 blocks; use trace_loop for other models")


@torch.no_grad()
def _full_run(mt, setup):
    """Clean row 0 + corrupted rows 1..S through every block, caching per layer the block input,
    output, attention and MLP outputs, and keys/values."""
    tr = mt.model.transformer
    ids = setup["ids"]
    S, T = setup["noise_draws"].shape[0], ids.shape[1]
    emb = _corrupt_hook(mt, setup)(tr.wte(ids).expand(S + 1, -1, -1), mt.spec.embedding)
    x = emb + tr.wpe(torch.arange(T, device=ids.device))
    empty = x.new_zeros(S + 1, tr.h[0].attn.num_heads, 0, tr.h[0].attn.head_dim)
    cache = {"input": [], "output": [], "attn": [], "mlp": [], "k": [], "v": []}
    for layer, block in enumerate(tr.h):
        cache["input"].append(x)
        x, attn_out, mlp_out, k, v = _block(block, x, empty, empty, layer)
        for name, value in zip(("output", "attn", "mlp", "k", "v"), (x, attn_out, mlp_out, k, v)):
            cache[name].append(value)
    return cache


def _answer_prob(mt, h_last, answer_id):
    """p(answer) from last-position hidden states [B, d]."""
    tr = mt.model.transformer
    logits = mt.model.lm_head(tr.ln_f(h_last)).float()
    return torch.softmax(logits, -1)[:, answer_id]


@torch.no_grad()
def _first_changed_state(mt, cache, kind, t, layer):
    """State [S, T - t, d] after the first layer a site changes; the next layer to run is layer + 1.

    kind None: `layer` is the restored block; its output differs from the corrupted run only at
    token t. mlp/attn: `layer` is the window's first layer lo, where only position t changes too
    (the later positions still see the corrupted inputs of layer lo), so lo costs one position
    (attn) or nothing (mlp)."""
    x = cache["output"][layer][1:, t:].clone()
    if kind is None:
        x[:, 0] = cache["output"][layer][0, t]
    elif kind == "mlp":
        h = cache["input"][layer][1:, t] + cache["attn"][layer][1:, t]
        x[:, 0] = h + cache["mlp"][layer][0, t]
    else:
        block = mt.model.transformer.h[layer]
        h = cache["input"][layer][1:, t] + cache["attn"][layer][0, t]
        x[:, 0] = h + block.mlp(block.ln_2(h))
    return x


@torch.no_grad()
def _restore_token(mt, cache, kind, t, sites, window, answer_id, S):
    """Scores for sites [(t, l), ...] at one token t: {site index: p(answer)}.

    Only positions t..T-1 are recomputed (earlier ones cannot change), and a site enters at the
    first layer its restoration changes. Sites travel in *branches*: the sites of a branch have
    restored the same layers so far, so their states are equal and computed once. A branch splits
    at a layer that some of its sites restore and others do not. (Windows clipped at the ends of
    the model, e.g. window 10 on 8 layers, make several sites identical all the way.) Each layer
    runs all branches as one batch of S rows per branch."""
    tr, L = mt.model.transformer, mt.n_layers
    windows = [_window(kind, l, window, L) for _, l in sites]
    starts = {}                          # first changed layer -> sites (all in the same state)
    for i, (_, l) in enumerate(sites):
        starts.setdefault(windows[i].start if kind else l, []).append(i)
    entering = [(_first_changed_state(mt, cache, kind, t, layer), layer + 1, m)
                for layer, m in starts.items()]    # (state, first layer to run, site indices)
    branches = []                        # (state [S, T - t, d], site indices)
    for layer in range(L):
        branches += [(x, m) for x, first, m in entering if first == layer]
        if not branches:
            continue
        parts = []                       # (state, site indices, restores this layer?)
        for x, members in branches:
            hit = [i for i in members if layer in windows[i]]
            miss = [i for i in members if layer not in windows[i]]
            parts += [(x, group, flag) for group, flag in ((hit, True), (miss, False)) if group]
        restored = torch.tensor([flag for _, _, flag in parts], device=x.device).repeat_interleave(S)
        clean = cache[kind][layer][0, t] if kind else None

        def edit(out, restored=restored, clean=clean):
            out[restored, 0] = clean
            return out
        past_k, past_v = cache["k"][layer][1:, :, :t], cache["v"][layer][1:, :, :t]
        x, _, _, _, _ = _block(tr.h[layer], torch.cat([p[0] for p in parts]), past_k, past_v, layer,
                               edit_attn=edit if kind == "attn" else None,
                               edit_mlp=edit if kind == "mlp" else None)
        branches = [(x_part, members) for x_part, (_, members, _) in zip(x.split(S), parts)]
    branches += [(x, m) for x, first, m in entering if first == L]
    probs = _answer_prob(mt, torch.cat([x[:, -1] for x, _ in branches]), answer_id)
    probs = probs.view(len(branches), S).mean(1)
    return {i: probs[b].item() for b, (_, members) in enumerate(branches) for i in members}


def trace(mt: ModelAndTokenizer, prompt: str, subject: str, kind: str | None = None,
          samples: int = 10, noise: float | None = None, window: int = 10,
          answer: str | None = None, seed: int = 1, max_rows: int = 1024,
          progress: bool = False) -> TraceResult:
    """Causal trace of one prompt: the same result as `trace_loop` (same noise draws), faster.

    prompt is used exactly as given; answer None = the model's top clean prediction. max_rows caps
    the rows (sites × samples) of one forward pass (memory). Returns a `TraceResult`."""
    _check_kind(kind)
    _check_gpt2(mt)
    setup = _prepare(mt, prompt, subject, samples, noise, answer, seed)
    S, T, L = samples, setup["ids"].shape[1], mt.n_layers
    cache = _full_run(mt, setup)
    probs = _answer_prob(mt, cache["output"][-1][:, -1], setup["answer_id"])
    low = probs[1:].mean().item()
    scores = torch.full((T, L), low)
    per_chunk = max(1, max_rows // S)
    tokens = range(setup["start"], T)
    for t in tqdm(tokens, desc="tracing", disable=not progress):
        sites = [(t, l) for l in range(L)]
        for i in range(0, L, per_chunk):
            chunk = sites[i:i + per_chunk]
            for j, score in _restore_token(mt, cache, kind, t, chunk, window,
                                           setup["answer_id"], S).items():
                scores[chunk[j]] = score
    return TraceResult(scores=scores, low_score=low, high_score=setup["high"],
                       tokens=[mt.tokenizer.decode([i]) for i in setup["ids"][0].tolist()],
                       subject_range=(setup["start"], setup["end"]),
                       answer=mt.tokenizer.decode([setup["answer_id"]]), kind=kind,
                       window=window, noise=setup["noise"], prompt=prompt)
