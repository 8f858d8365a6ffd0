"""The fast causal trace: `tracing.trace_loop`'s numbers for a fraction of the compute.

The loop runs the whole model once per (token, layer) site. Restoring a state at token t and
layer l cannot change what comes before it: not the earlier layers and, since attention is
causal, not the earlier tokens. So `trace`

1. runs the clean row and the `samples` corrupted rows once through every block, caching each
   layer's input, output, attention and MLP outputs, keys and values (`_full_run`);
2. for each token t, runs all sites (t, 0..L-1) as one batch that recomputes only positions
   t..T-1 (the cached keys/values of positions < t are the past every site shares), each site
   from the first layer its restoration changes, and at the top layer only the last position,
   the one that gives p(answer) (`_restore_token`). Sites whose clipped mlp/attn windows
   coincide are one restoration, run once (`_restorations`);
3. skips the tokens before the subject: there the clean and corrupted runs are identical, so
   restoring them changes nothing and their score is `low_score`.

Each site runs on its own from where it joins. Sites with overlapping windows could share their
common layers, but with GPT-2 XL's shapes (48 layers, window 10) that saves under 2 % of the
block computations.

Step 2 needs a GPT-2 block that takes a past of cached keys/values: `_attention` and `_block`
re-implement Hugging Face's `GPT2Block` for that (no dropout; eval mode). `tests/test_tracing.py`
compares `trace` with `trace_loop` on TinyWorld and on a random model with GPT-2's real shapes.

`attribution_states` is the forward pass of attribution patching (`tracing.attribution_trace_kinds`)
on the same blocks; the tests compare it with the hooks on the Hugging Face model.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from engramlib.models import ModelAndTokenizer
from engramlib.trace_inputs import (TraceInputs, TraceResult, _check_args, _corrupt, _prepare, _result,
                                    _window, _with_answer)


def _attention(attn, x, past_k, past_v, layer: int, last_only: bool = False):
    """GPT-2 self-attention of new positions x [B, P, d] over shared past keys/values
    [R, H, p0, dh] (B = n·R: every group of R rows sees the same past, which is broadcast, not
    copied) plus their own. last_only: compute the output of the last position only (Q = 1,
    else Q = P). Returns (output [B, Q, d], keys, values [B, H, P, dh])."""
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
    B, P, _ = x.shape
    R, p0 = past_k.shape[0], past_k.shape[2]
    heads = lambda t: t.view(B, P, -1, attn.head_dim).transpose(1, 2)      # [B, H, P, dh]
    q, k, v = heads(q), heads(k), heads(v)
    q = q[:, :, -1:] if last_only else q                                   # [B, H, Q, dh]
    Q = q.shape[2]
    scale = attn.head_dim ** -0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
    if getattr(attn.config, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    groups = lambda t: t.view(B // R, R, *t.shape[1:])                     # [n, R, H, ., dh]
    w_past = groups(q) @ past_k.transpose(-1, -2) * scale                  # [n, R, H, Q, p0]
    w_new = groups(q) @ groups(k).transpose(-1, -2) * scale                # [n, R, H, Q, P]
    causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()[P - Q:]
    w_new = w_new.masked_fill(~causal, float("-inf"))
    w = torch.softmax(torch.cat([w_past, w_new], dim=-1), dim=-1)
    out = w[..., :p0] @ past_v + w[..., p0:] @ groups(v)                   # [n, R, H, Q, dh]
    out = out.view(B, -1, Q, attn.head_dim).transpose(1, 2).reshape(B, Q, -1)
    return attn.c_proj(out), k, v


def _mlp(mlp, x):
    """GPT-2's MLP, c_proj(gelu(c_fc(x))), with torch's fused tanh-GELU: the same function as
    Hugging Face's "gelu_new" written out op by op, 2-3x faster on a CPU."""
    return mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(x), approximate="tanh"))


def _block(block, x, past_k, past_v, layer: int, kind=None, rows=None, clean=None,
           last_only: bool = False):
    """One GPT-2 block on new positions x [B, P, d] (past keys/values as in `_attention`).

    kind "attn" / "mlp": in the rows `rows` (bool [B]), the attention / MLP output at the first
    computed position is replaced by `clean` [d] (a restoration). last_only: compute the last
    position's output only (Q = 1, else Q = P). Returns (block output [B, Q, d], attention
    output, MLP output, new keys, new values)."""
    attn_out, k, v = _attention(block.attn, block.ln_1(x), past_k, past_v, layer, last_only)
    if kind == "attn":
        attn_out[rows, 0] = clean
    h = x[:, -attn_out.shape[1]:] + attn_out
    mlp_out = _mlp(block.mlp, block.ln_2(h))
    if kind == "mlp":
        mlp_out[rows, 0] = clean
    return h + mlp_out, attn_out, mlp_out, k, v


def _is_gpt2(mt) -> bool:
    """Whether `_block` computes this model's blocks (GPT-2 with gelu_new MLPs)."""
    cfg = mt.model.config
    return (cfg.model_type == "gpt2" and not getattr(cfg, "reorder_and_upcast_attn", False)
            and cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh"))


def _check_gpt2(mt):
    if not _is_gpt2(mt):
        raise ValueError("the fast trace implements GPT-2 blocks (gelu_new MLPs); use trace_loop "
                         "for other models")


@torch.no_grad()
def _full_run(mt, inputs: TraceInputs) -> dict:
    """Clean row 0 + corrupted rows 1..S through every block. Returns per-layer lists of
    {"input", "output", "attn", "mlp"}: [S + 1, T, d] and {"k", "v"}: [S + 1, H, T, dh]."""
    tr = mt.model.transformer
    ids = inputs.ids
    S, T = inputs.noise_draws.shape[0], ids.shape[1]
    x = _corrupt(tr.wte(ids).expand(S + 1, -1, -1), inputs)
    x = x + tr.wpe(torch.arange(T, device=ids.device))
    empty = x.new_zeros(S + 1, tr.h[0].attn.num_heads, 0, tr.h[0].attn.head_dim)
    cache = {"input": [], "output": [], "attn": [], "mlp": [], "k": [], "v": []}
    for layer, block in enumerate(tr.h):
        cache["input"].append(x)
        x, attn_out, mlp_out, k, v = _block(block, x, empty, empty, layer)
        for name, value in zip(("output", "attn", "mlp", "k", "v"), (x, attn_out, mlp_out, k, v)):
            cache[name].append(value)
    return cache


def _answer_prob(mt, h_last, answer_id: int) -> torch.Tensor:
    """p(answer) [B] from last-position hidden states [B, d]."""
    tr = mt.model.transformer
    logits = mt.model.lm_head(tr.ln_f(h_last)).float()
    return torch.softmax(logits, -1)[:, answer_id]


@torch.no_grad()
def _first_changed_state(mt, cache, kind, t: int, layer: int) -> torch.Tensor:
    """The corrupted rows' state [S, T - t, d] after `layer`, the first layer a site changes, with
    its restoration at token t applied; the site runs on from layer + 1.

    kind None: `layer` is the restored block; its output differs from the corrupted run only at
    token t. mlp/attn: `layer` is the window's first layer, where only token t changes too (the
    later tokens still attend to corrupted inputs of that layer), so it costs one position (attn)
    or nothing (mlp)."""
    x = cache["output"][layer][1:, t:].clone()
    if kind is None:
        x[:, 0] = cache["output"][layer][0, t]
    elif kind == "mlp":
        h = cache["input"][layer][1:, t] + cache["attn"][layer][1:, t]
        x[:, 0] = h + cache["mlp"][layer][0, t]
    else:
        block = mt.model.transformer.h[layer]
        h = cache["input"][layer][1:, t] + cache["attn"][layer][0, t]
        x[:, 0] = h + _mlp(block.mlp, block.ln_2(h))
    return x


def _restorations(kind, L: int, window: int) -> dict:
    """{(first changed layer, restored layers): [l, ...]}: what restoring site (t, l) does, per l.

    kind None: block l's output, first changing layer l (nothing restored after it). mlp/attn: the
    window's outputs, first changing the window's first layer. Windows clipped at the ends of the
    model can coincide (window 10 on 8 layers: l = 3, 4, 5 all restore layers 0-7): such sites
    are the same restoration and are run once."""
    out = {}
    for l in range(L):
        w = _window(kind, l, window, L)
        out.setdefault((w.start if kind else l, w), []).append(l)
    return out


@torch.no_grad()
def _restore_token(mt, cache, kind, t: int, restorations: list, answer_id: int,
                   S: int) -> torch.Tensor:
    """p(answer) [len(restorations)] at token t, averaged over the S samples.

    restorations: [(first changed layer, restored layers), ...] (see `_restorations`). Only
    positions t..T-1 are recomputed. A restoration joins the batch after the first layer it
    changes and runs from there to the top; at each of its restored layers its mlp/attn output at
    token t is set to the clean one. The batch holds S rows per restoration, one after another."""
    L, blocks = mt.n_layers, mt.model.transformer.h
    x, order = None, []                  # x: [S · len(order), T - t, d]; order: restoration indices
    for layer in range(L):
        if x is not None:
            # at the top layer only the last position reaches the answer: compute it alone, and
            # restore token t there only if t is that last position
            top = layer == L - 1
            restore = kind if not top or x.shape[1] == 1 else None
            rows = torch.tensor([layer in restorations[i][1] for i in order], device=x.device)
            clean = cache[kind][layer][0, t] if kind else None
            past_k, past_v = cache["k"][layer][1:, :, :t], cache["v"][layer][1:, :, :t]
            x = _block(blocks[layer], x, past_k, past_v, layer, restore, rows.repeat_interleave(S),
                       clean, last_only=top)[0]
        joining = [i for i, (first, _) in enumerate(restorations) if first == layer]
        if joining:
            state = _first_changed_state(mt, cache, kind, t, layer).repeat(len(joining), 1, 1)
            if x is not None:            # after the top layer, x holds the last position only
                state = torch.cat([x, state[:, -x.shape[1]:]])
            x = state
            order += joining
    probs = _answer_prob(mt, x[:, -1], answer_id).view(len(order), S).mean(1).cpu()
    scores = torch.empty(len(restorations))
    scores[order] = probs
    return scores


def trace(mt: ModelAndTokenizer, prompt: str, subject: str, kind: str | None = None,
          samples: int = 10, noise: float | None = None, window: int = 10,
          answer: str | None = None, seed: int = 1, max_rows: int = 1024,
          progress: bool = False) -> TraceResult:
    """Causal trace of one prompt: the same result as `trace_loop` (same noise draws), faster.

    prompt is used exactly as given; answer None = the model's top clean prediction. max_rows caps
    the rows (restorations × samples) of one batch (memory). Returns a `TraceResult`."""
    _check_args(kind, samples, window)
    _check_gpt2(mt)
    inputs = _prepare(mt, prompt, subject, samples, noise, answer, seed)
    S, T, L = samples, inputs.ids.shape[1], mt.n_layers
    cache = _full_run(mt, inputs)
    low = _answer_prob(mt, cache["output"][-1][1:, -1], inputs.answer_id).mean().item()
    scores = torch.full((T, L), low)
    restorations = _restorations(kind, L, window)          # {restoration: layers}
    keys = list(restorations)
    per_chunk = max(1, max_rows // S)
    for t in tqdm(range(inputs.start, T), desc="tracing", disable=not progress):
        for i in range(0, len(keys), per_chunk):
            chunk = keys[i:i + per_chunk]
            probs = _restore_token(mt, cache, kind, t, chunk, inputs.answer_id, S)
            for key, p in zip(chunk, probs):
                scores[t, restorations[key]] = p
    return _result(mt, inputs, scores, low, kind, window, prompt)


# --- attribution patching's forward pass --------------------------------------------------------

def attribution_states(mt, inputs: TraceInputs, answer) -> tuple:
    """The forward pass of attribution patching (`tracing.attribution_trace_kinds`) for GPT-2,
    with the work a gradient cannot use left out:

    - the clean row runs alone, without autograd (nothing is differentiated on it), and gives the
      answer (None: its top token) and every clean state;
    - the positions before the subject are the same in every row: the corrupted rows take the
      clean row's keys/values there as a shared past and compute positions start..T-1 only;
    - the top layer computes the last position only (the others cannot reach p(answer)).

    Returns (inputs with the answer, p(answer) of the corrupted rows [S] (in the autograd graph),
    states): states[kind][l] = (clean [T_l, d], corrupted [S, T_l, d] in the graph, first position
    t0) for kind None (block output), "mlp", "attn": positions t0..t0 + T_l - 1 of layer l."""
    tr, L = mt.model.transformer, mt.n_layers
    ids, start = inputs.ids, inputs.start
    T = ids.shape[1]
    x = tr.wte(ids) + tr.wpe(torch.arange(T, device=ids.device))
    empty = x.new_zeros(1, tr.h[0].attn.num_heads, 0, tr.h[0].attn.head_dim)
    clean = {"output": [], "attn": [], "mlp": [], "k": [], "v": []}
    with torch.no_grad():
        h = x
        for layer, block in enumerate(tr.h):
            h, attn_out, mlp_out, k, v = _block(block, h, empty, empty, layer)
            for name, value in zip(clean, (h, attn_out, mlp_out, k, v)):
                clean[name].append(value)
        inputs = _with_answer(mt, inputs, mt.model.lm_head(tr.ln_f(h[0, -1])), answer)
    S = inputs.noise_draws.shape[0]
    with torch.enable_grad():
        h = _corrupt(tr.wte(ids).expand(S + 1, -1, -1), inputs)[1:, start:]
        h = (h + tr.wpe(torch.arange(start, T, device=ids.device))).requires_grad_()
        states = {None: [], "mlp": [], "attn": []}
        for layer, block in enumerate(tr.h):
            top = layer == L - 1
            past_k, past_v = clean["k"][layer][:, :, :start], clean["v"][layer][:, :, :start]
            h, attn_out, mlp_out, _, _ = _block(block, h, past_k, past_v, layer, last_only=top)
            t0 = T - 1 if top else start
            for kind, name, value in ((None, "output", h), ("mlp", "mlp", mlp_out), ("attn", "attn", attn_out)):
                states[kind].append((clean[name][layer][0, t0:], value, t0))
        logits = mt.model.lm_head(tr.ln_f(h[:, -1]))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(logits, -1)[:, inputs.answer_id]
    return inputs, probs, states
