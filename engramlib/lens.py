"""Chapter 05's instruments: the residual stream, the logit lens, the MLP as a key-value memory,
and knowledge neurons. Later chapters reuse them.

Residual stream (GPT-2 is pre-LayerNorm; Elhage et al. 2021): every block adds to one stream,
    h_l = h_{l-1} + attn_l(ln_1(h_{l-1})) + mlp_l(ln_2(h_{l-1} + attn_l)),
so the last block's output is  h_L = embed + Σ_l (attn_l + mlp_l).
Logit lens (nostalgebraist 2020): decode the stream after block l as if it were the last,
    P_l(x) = softmax(lm_head(ln_f(h_l)))[x].
MLP as a key-value memory (Geva et al. 2021): with a_i = gelu(k_i · x + b_K,i),
    mlp(x) = Σ_i a_i v_i + b_V,
chapter 01's W = Σ_i v_i k_iᵀ read through one-hot keys e_i: c_proj IS a Hebbian matrix.
Knowledge neurons (Dai et al. 2022): the attribution of neuron i to the answer o is
    a_i · ∂ log P(o | prompt) / ∂ a_i   (steps=1),  or integrated gradients over α a, α ∈ (0, 1].

Shapes: T tokens, d = d_model, m = d_mlp (4 d in GPT-2), L layers, V vocabulary.
GPT-2's Conv1D computes y = x W + b and stores W as (d_in, d_out), the transpose of nn.Linear:
c_fc.weight is (d, m), so key k_i is COLUMN i of it; c_proj.weight is (m, d), so value v_i is ROW i.
A neuron's activation a_i is the input of c_proj (the output of the MLP's `act` module).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from engramlib.hooks import Trace, TraceDict
from engramlib.models import ModelAndTokenizer, first_token_id


# --- inputs -------------------------------------------------------------------------------------

def _input_ids(mt: ModelAndTokenizer, prompt_or_ids) -> torch.Tensor:
    """One prompt as token ids [1, T] on the model's device (a string, or ids of shape [T] / [1, T])."""
    if isinstance(prompt_or_ids, str):
        if not prompt_or_ids:
            raise ValueError("empty prompt")
        ids = mt.tokenizer(prompt_or_ids, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(prompt_or_ids)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"pass ONE prompt: a string, or token ids of shape [T] or [1, T]; "
                             f"got shape {tuple(ids.shape)}")
    return ids.to(mt.device)


def _position(n_tokens: int, position: int) -> int:
    """`position` as an index in 0..T-1 (negative counts from the end, like Python)."""
    if not -n_tokens <= position < n_tokens:
        raise ValueError(f"position {position} out of range for a prompt of {n_tokens} tokens")
    return position % n_tokens


def activation_name(mt: ModelAndTokenizer, layer: int) -> str:
    """Name of the module whose output is the MLP activations a of block `layer` [.., m] (the input
    of c_proj). Raises ValueError for a layer out of range."""
    mt.module(mt.spec.mlp, layer)
    return mt.spec.mlp.format(layer) + ".act"


# --- the residual stream -------------------------------------------------------------------------

@torch.no_grad()
def residual_components(mt: ModelAndTokenizer, prompt_or_ids) -> dict:
    """What each part of the model writes into the residual stream of one prompt.

    Returns {"embed": [T, d]   token + position embeddings (the input of block 0),
             "attn":  [L, T, d] each block's attention output,
             "mlp":   [L, T, d] each block's MLP output,
             "final": [T, d]   the last block's output, before ln_f}.
    embed + attn.sum(0) + mlp.sum(0) equals final up to float rounding."""
    ids = _input_ids(mt, prompt_or_ids)
    L = mt.n_layers
    attn = [mt.spec.attn.format(l) for l in range(L)]
    mlp = [mt.spec.mlp.format(l) for l in range(L)]
    with Trace(mt.model, mt.spec.layer.format(0), retain_input=True, retain_output=False) as first, \
            Trace(mt.model, mt.spec.layer.format(L - 1)) as last, TraceDict(mt.model, attn + mlp) as td:
        mt.model(input_ids=ids)
    return {"embed": first.input[0], "attn": torch.stack([td[n].output[0] for n in attn]),
            "mlp": torch.stack([td[n].output[0] for n in mlp]), "final": last.output[0]}


# --- the logit lens ------------------------------------------------------------------------------

def lens_probs(mt: ModelAndTokenizer, hidden: torch.Tensor) -> torch.Tensor:
    """Decode residual-stream states as the model decodes its last one: softmax(lm_head(ln_f(h))).

    hidden: [..., d] -> [..., V] probabilities (float32)."""
    logits = mt.module(mt.spec.lm_head)(mt.module(mt.spec.final_norm)(hidden))
    return torch.softmax(logits.float(), dim=-1)


@torch.no_grad()
def logit_lens(mt: ModelAndTokenizer, prompt_or_ids, position: int = -1) -> torch.Tensor:
    """The logit lens (nostalgebraist 2020): what the model would predict at `position` if it stopped
    after each block. Row l is softmax(lm_head(ln_f(h_l))), h_l the output of block l: [L, V].

    The last row is the model's own next-token distribution."""
    ids = _input_ids(mt, prompt_or_ids)
    pos = _position(ids.shape[1], position)
    names = [mt.spec.layer.format(l) for l in range(mt.n_layers)]
    with TraceDict(mt.model, names) as td:
        mt.model(input_ids=ids)
    return lens_probs(mt, torch.stack([td[n].output[0, pos] for n in names]))


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D_KL(p‖q) = Σ_x p(x) log(p(x) / q(x)) in nats, over the last dimension: [..., V] -> [...].
    Terms with p(x) = 0 count 0."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def token_rank(probs: torch.Tensor, token: int) -> torch.Tensor:
    """Rank of `token` in each row of probs [..., V] (0 = top-1): [...]."""
    return (probs > probs[..., token:token + 1]).sum(-1)


# --- the MLP as a key-value memory --------------------------------------------------------------

class KeyValueMemory(NamedTuple):
    """One MLP in Geva et al.'s (2021) notation: mlp(x) = Σ_i gelu(K[i] · x + b_K[i]) V[i] + b_V."""
    K: torch.Tensor      # [m, d]  keys k_i as rows (c_fc.weight transposed)
    b_K: torch.Tensor    # [m]     key biases (c_fc.bias)
    V: torch.Tensor      # [m, d]  values v_i as rows (c_proj.weight as stored)
    b_V: torch.Tensor    # [d]     output bias (c_proj.bias)


def mlp_keys_values(mt: ModelAndTokenizer, layer: int) -> KeyValueMemory:
    """Block `layer`'s MLP as keys and values (views of the weights, not copies)."""
    c_fc = mt.module(mt.spec.mlp, layer).c_fc
    c_proj = mt.module(mt.spec.mlp_out, layer)
    return KeyValueMemory(c_fc.weight.T, c_fc.bias, c_proj.weight, c_proj.bias)


@torch.no_grad()
def mlp_activations(mt: ModelAndTokenizer, prompt_or_ids, layer: int) -> torch.Tensor:
    """The activations a = gelu(x Kᵀ + b_K) of block `layer`'s MLP neurons (the input of c_proj)
    at every token of one prompt: [T, m]."""
    ids = _input_ids(mt, prompt_or_ids)
    with Trace(mt.model, activation_name(mt, layer), stop=True) as t:
        mt.model(input_ids=ids)
    return t.output[0]


def value_top_tokens(mt: ModelAndTokenizer, layer: int, neuron: int, k: int = 10) -> list:
    """The k tokens that value vector v_i promotes most when projected onto the vocabulary with the
    output embedding, E v_i (Geva et al. 2021, sec. 4): [(token text, score), ...], best first."""
    V = mlp_keys_values(mt, layer).V
    if not 0 <= neuron < V.shape[0]:
        raise ValueError(f"neuron {neuron} out of range: layer {layer}'s MLP has neurons 0..{V.shape[0] - 1}")
    with torch.no_grad():
        scores = mt.module(mt.spec.lm_head).weight @ V[neuron]      # [V]
    top = scores.float().topk(k)
    return [(mt.tokenizer.decode([i]), s) for i, s in zip(top.indices.tolist(), top.values.tolist())]


# --- knowledge neurons ----------------------------------------------------------------------------

def neuron_attribution(mt: ModelAndTokenizer, prompt_or_ids, answer: str, layer: int,
                       steps: int = 1, position: int = -1) -> torch.Tensor:
    """Attribution of each MLP neuron of block `layer`, at token `position`, to log P(answer | prompt)
    (the first token of ' ' + answer, predicted at the last position) (Dai et al. 2022): [m].

    steps=1: activation × gradient, a_i ∂log P/∂a_i.
    steps=n: integrated gradients (Sundararajan et al. 2017), a_i · mean_k ∂log P/∂a_i at (k/n) a,
    k = 1..n, scaling the whole layer's activations at `position` together (Dai et al. use n = 20)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ids = _input_ids(mt, prompt_or_ids)
    pos = _position(ids.shape[1], position)
    target = first_token_id(mt, answer)
    a = mlp_activations(mt, ids, layer)[pos]                            # [m]
    alphas = torch.arange(1, steps + 1, device=a.device, dtype=a.dtype) / steps
    scaled = (alphas[:, None] * a).requires_grad_()                     # [steps, m]

    def put_scaled(h, name):
        h = h.clone()
        h[:, pos] = scaled.to(h.dtype)
        return h
    with torch.enable_grad(), Trace(mt.model, activation_name(mt, layer), edit_output=put_scaled,
                                    retain_output=False):
        logits = mt.model(input_ids=ids.expand(steps, -1)).logits[:, -1]
        log_p = torch.log_softmax(logits.float(), dim=-1)[:, target].sum()
        grad, = torch.autograd.grad(log_p, scaled)
    return (a * grad.mean(0)).detach()


def knowledge_neurons(mt: ModelAndTokenizer, prompt_or_ids, answer: str, k: int = 10,
                      steps: int = 1, position: int = -1) -> tuple:
    """The k neurons (over all layers) with the largest attribution to the answer.

    Returns (sites, scores): sites a list of (layer, neuron), best first; scores the attribution of
    every neuron, [L, m]. This is the simplest version: top-k at one prompt. Dai et al. (2022) keep,
    for each of a fact's prompts, the neurons above 0.2 × that prompt's largest attribution, then the
    neurons shared by at least 70 % of the prompts (the share tuned until a fact has 2-5 of them);
    github.com/Hunter-DDM/knowledge-neurons, src/2_get_kn.py."""
    scores = torch.stack([neuron_attribution(mt, prompt_or_ids, answer, l, steps, position)
                          for l in range(mt.n_layers)])
    m = scores.shape[1]
    top = scores.flatten().topk(k).indices.tolist()
    return [(i // m, i % m) for i in top], scores


def random_sites_like(sites, d_mlp: int, generator: torch.Generator | None = None) -> list:
    """The control for silencing `sites` [(layer, neuron), ...]: as many random neurons in each layer
    as `sites` has there, all distinct and none of them in `sites`, so that the two sets differ only in
    how their neurons were chosen. Returns [(layer, neuron), ...], layer by layer."""
    chosen = []
    for layer in sorted({l for l, _ in sites}):
        taken = {n for l, n in sites if l == layer}
        need = sum(1 for l, _ in sites if l == layer)
        free = torch.tensor([n for n in range(d_mlp) if n not in taken], dtype=torch.long)
        if len(free) < need:
            raise ValueError(f"layer {layer} has {len(free)} neurons outside the sites, {need} are needed")
        chosen += [(layer, int(n)) for n in free[torch.randperm(len(free), generator=generator)[:need]]]
    return chosen


@contextlib.contextmanager
def scale_neurons(mt: ModelAndTokenizer, layer: int, neurons, factor: float, position=None):
    """Inside the `with`, the listed MLP neurons of block `layer` have their activation a_i
    multiplied by `factor` at token `position` (0 silences them, as Dai et al. (2022) suppress
    knowledge neurons; 2 doubles them, as they amplify). The hook is removed on exit, so the model
    computes exactly what it did before.

    neurons: ints in 0..m-1 (a list or a tensor).
    position: None (every token), an int (the same token in every row; -1 = last), or a tensor
    [batch] with one position per row, e.g. `encode(mt, prompts)["last"]` for right-padded prompts."""
    m = mt.module(mt.spec.mlp_out, layer).weight.shape[0]
    idx = torch.as_tensor(neurons if torch.is_tensor(neurons) else list(map(int, neurons)), dtype=torch.long)
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < m):
        raise ValueError(f"neurons must lie in 0..{m - 1} (layer {layer}'s MLP has {m}); "
                         f"got {int(idx.min())}..{int(idx.max())}")

    def scale(h, name):                     # h: [batch, T, m]
        h, cols = h.clone(), idx.to(h.device)
        if position is None:
            h[..., cols] *= factor
        elif torch.is_tensor(position):
            if position.shape != (h.shape[0],):
                raise ValueError(f"position: one index per row ({h.shape[0]}), got shape {tuple(position.shape)}")
            rows = torch.arange(h.shape[0], device=h.device)
            h[rows[:, None], position.to(h.device)[:, None], cols[None, :]] *= factor
        else:
            h[:, _position(h.shape[1], position), cols] *= factor
        return h
    with Trace(mt.model, activation_name(mt, layer), edit_output=scale, retain_output=False):
        yield


def silence_neurons(mt: ModelAndTokenizer, layer: int, neurons, position=None):
    """`scale_neurons` with factor 0: the neurons are silent (a_i = 0) inside the `with`."""
    return scale_neurons(mt, layer, neurons, 0.0, position)


def scale_sites(mt: ModelAndTokenizer, sites, factor: float, position=None) -> contextlib.ExitStack:
    """`scale_neurons` for (layer, neuron) pairs spread over several layers, as one `with`."""
    stack = contextlib.ExitStack()
    sites = list(sites)
    try:
        for layer in sorted({l for l, _ in sites}):
            stack.enter_context(scale_neurons(mt, layer, [n for l, n in sites if l == layer], factor, position))
    except Exception:
        stack.close()
        raise
    return stack


def silence_sites(mt: ModelAndTokenizer, sites, position=None) -> contextlib.ExitStack:
    """`silence_neurons` for (layer, neuron) pairs spread over several layers, as one `with`."""
    return scale_sites(mt, sites, 0.0, position)
