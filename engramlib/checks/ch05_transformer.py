"""Checks for chapter 05: inside the transformer."""
from __future__ import annotations

import torch

from engramlib.checks._common import _call, _fail, _ok, choice_between


def _as_tensor(got, what: str, ndim: int) -> torch.Tensor:
    """The student's result as a float CPU tensor; a leading batch dimension of 1 is dropped."""
    if not torch.is_tensor(got):
        _fail(f"expected a tensor ({what}), got {type(got).__name__}: did you forget to return?")
    got = got.detach().float().cpu()
    return got[0] if got.dim() == ndim + 1 and got.shape[0] == 1 else got


def _tinyworld(mt):
    from engramlib.models import load_model
    return mt or load_model("tinyworld", device="cpu")


def residual_sum(fn, mt=None):
    """Exercise 5.1: fn(mt, prompt) -> embeddings + Σ_l (attn_l + mlp_l), the residual stream after
    the last block and before ln_f, at every token: [T, d]."""
    from engramlib.lens import residual_components
    mt = _tinyworld(mt)
    prompt = "The Space Needle is located in the city of"
    c = {k: v.float().cpu() for k, v in residual_components(mt, prompt).items()}
    (T, d), L = c["final"].shape, mt.n_layers
    got = _as_tensor(_call(fn, mt, prompt, shape_hint="every piece is [T, d] once you drop the batch "
                           "dimension ([0]); stack the layers' outputs and sum over dim 0"), "[T, d]", 2)
    if got.shape == (L, T, d):
        _fail(f"got one state per layer {tuple(got.shape)}: sum over the layers (dim 0) and add the embeddings")
    if got.shape == (d,):
        _fail(f"got a single vector ({d},): return the stream at EVERY token, shape [T, d] = ({T}, {d})")
    if got.shape != (T, d):
        _fail(f"expected shape [tokens, d_model] = ({T}, {d}), got {tuple(got.shape)}: "
              "sum over the layers, not over the tokens")
    with torch.no_grad():
        after_ln_f = mt.module(mt.spec.final_norm)(c["final"].to(mt.device)).float().cpu()
    writes = c["attn"] + c["mlp"]                                       # [L, T, d]
    blocks = c["embed"] + writes.cumsum(0)                              # each block's output
    close = lambda ref: torch.allclose(got, ref, atol=1e-3, rtol=1e-4)
    if close(c["final"]):
        print(f"  max |your sum − last block's output| = {(got - c['final']).abs().max():.1e}")
        return _ok("residual_sum")
    if close(after_ln_f):
        _fail("that is ln_f(h_L): the final layer norm is applied (as in output_hidden_states[-1]); "
              "the residual stream is the plain sum BEFORE ln_f")
    if close(writes.sum(0)):
        _fail("the embeddings are missing: the stream starts from token + position embeddings "
              "(the input of block 0, Trace(..., retain_input=True))")
    if close(c["embed"] + c["mlp"].sum(0)):
        _fail("the attention outputs are missing: every block writes attn_l AND mlp_l into the stream")
    if close(c["embed"] + c["attn"].sum(0)):
        _fail("the MLP outputs are missing: every block writes attn_l AND mlp_l into the stream")
    if close(blocks.sum(0)) or close(c["embed"] + blocks.sum(0)):
        _fail("you added up the blocks' OUTPUTS, but each block's output is already the whole stream "
              "so far; add what each block WRITES: its attention and MLP outputs")
    if close(c["embed"] + writes[-1]):
        _fail("only the last layer's writes are there: sum attn_l + mlp_l over ALL layers")
    _fail("values differ from embeddings + Σ_l (attn_l + mlp_l) = the last block's output")


def _block_outputs(mt, prompt: str) -> tuple:
    """Every block's output for one prompt, [L, T, d], and the model's output_hidden_states
    (L + 1 tensors [T, d]; the last one after ln_f)."""
    from engramlib.hooks import TraceDict
    names = [mt.spec.layer.format(l) for l in range(mt.n_layers)]
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    with torch.no_grad(), TraceDict(mt.model, names) as td:
        out = mt.model(input_ids=ids, output_hidden_states=True)
    return torch.stack([td[n].output[0] for n in names]), [h[0] for h in out.hidden_states]


def logit_lens(fn, mt=None):
    """Exercise 5.2: fn(mt, prompt) -> [L, V]: row l is softmax(lm_head(ln_f(h_l))) at the prompt's
    last token, h_l the output of block l."""
    from engramlib.lens import lens_probs
    mt = _tinyworld(mt)
    L, d = mt.n_layers, mt.model.config.n_embd
    for prompt in ("The Space Needle is located in the city of", "The mother tongue of Danielle Darrieux is"):
        h, hf = _block_outputs(mt, prompt)                              # [L, T, d]; L + 1 x [T, d]
        with torch.no_grad():
            ref = lens_probs(mt, h[:, -1]).cpu()
            V = ref.shape[-1]
            variants = {
                "no ln_f": torch.softmax(mt.module(mt.spec.lm_head)(h[:, -1]).float(), -1).cpu(),
                "first": lens_probs(mt, h[:, 0]).cpu(),
                "hf shifted": lens_probs(mt, torch.stack(hf[:-1])[:, -1]).cpu(),
            }
        got = _as_tensor(_call(fn, mt, prompt, shape_hint="record each block's output [1, T, d], keep "
                               "position -1, stack to [L, d], then ln_f and lm_head"), "[L, V]", 2)
        last_only = f"keep only the LAST position (the token that predicts the answer): [L, V] = ({L}, {V})"
        if got.shape == (L + 1, V):
            _fail(f"got {L + 1} rows: one row per BLOCK output ({L}). output_hidden_states has L + 1 "
                  "entries: [0] is the embeddings and [-1] already went through ln_f"
                  + (f" (or, if your rows are the prompt's tokens: {last_only})" if h.shape[1] == L + 1 else ""))
        if got.dim() == 3 or got.shape == (h.shape[1], V):
            _fail(f"got {tuple(got.shape)}: {last_only}")
        if got.shape == (V, L):
            _fail(f"got ({V}, {L}): transpose, one row per layer: [L, V]")
        if got.shape == (L, d):
            _fail(f"got hidden states ({L}, {d}): decode them through ln_f, then lm_head, then softmax")
        if got.shape != (L, V):
            _fail(f"expected shape [layers, vocab] = ({L}, {V}), got {tuple(got.shape)}")
        if not torch.allclose(got.sum(-1), torch.ones(L), atol=1e-3) or (got < 0).any():
            if torch.allclose(got.exp().sum(-1), torch.ones(L), atol=1e-3):
                _fail("these are log-probabilities: use torch.softmax, not log_softmax")
            if torch.allclose(got.sum(0), torch.ones(V), atol=1e-3):
                _fail("softmax over the wrong dimension: normalise over the vocabulary (dim=-1)")
            _fail("the rows do not sum to 1: these look like logits; turn them into probabilities "
                  "with torch.softmax(logits, dim=-1)")
        close = lambda ref_: torch.allclose(got, ref_, atol=1e-4)
        if close(ref):
            continue
        if close(variants["no ln_f"]):
            _fail("ln_f is missing: the model decodes its last state as lm_head(ln_f(h)); decode every "
                  "layer the same way (mt.module(mt.spec.final_norm))")
        if close(variants["first"]):
            _fail("that is the lens at the FIRST token; the answer is predicted at the LAST one ([:, -1])")
        if close(variants["hf shifted"]):
            _fail("off by one layer: row l must decode the OUTPUT of block l; output_hidden_states[0] "
                  "is the embeddings (block 0's input)")
        if torch.allclose(got[:-1], ref[:-1], atol=1e-4):
            _fail("the last row differs from the model's own output: output_hidden_states[-1] has ln_f "
                  "applied already, so ln_f ran twice; record the blocks' outputs with hooks instead")
        _fail(f"for {prompt!r} your rows differ from softmax(lm_head(ln_f(h_l))) at the last token")
    _ok("logit_lens")


def _square_mt():
    """A random 2-layer GPT-2 with d_mlp = d_model = 8 and random biases: transposed Conv1D
    weights give wrong numbers here instead of a shape error."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from engramlib.models import ModelAndTokenizer
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_inner=8, n_head=2, vocab_size=16,
                                           n_positions=16, bos_token_id=0, eos_token_id=0)).eval().requires_grad_(False)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return ModelAndTokenizer(model=model, tokenizer=None, name="square test model (d = d_mlp = 8)")


def mlp_key_value(fn, mt=None):
    """Exercise 5.3: fn(mt, layer, x) -> Σ_i a_i v_i + b_V with a_i = act(k_i · x + b_K,i), from the
    MLP's weights; x [T, d] is the MLP's input -> [T, d]."""
    from engramlib.hooks import Trace
    hint = ("GPT-2's Conv1D stores its weight as (d_in, d_out) and computes x @ W + b: key k_i is "
            "COLUMN i of c_fc.weight (x @ c_fc.weight), value v_i is ROW i of c_proj.weight "
            "(a @ c_proj.weight), no .T")
    sq = _square_mt()
    mlp = sq.module(sq.spec.mlp, 1)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    W_fc, b_fc, W_proj, b_proj = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias
    got = _as_tensor(_call(fn, sq, 1, x, shape_hint=hint), "[T, d]", 2)
    transposed = [mlp.act(x @ W_fc.T + b_fc) @ W_proj + b_proj, mlp.act(x @ W_fc + b_fc) @ W_proj.T + b_proj,
                  mlp.act(x @ W_fc.T + b_fc) @ W_proj.T + b_proj]
    if got.shape == (5, 8) and any(torch.allclose(got, t, atol=1e-5) for t in transposed):
        _fail(f"transposed Conv1D weight (caught on a square test model, where it raises no shape "
              f"error): {hint}")
    square_ok = got.shape == (5, 8) and torch.allclose(got, mlp(x), atol=1e-5)

    mt = _tinyworld(mt)
    layer = min(1, mt.n_layers - 1)
    ids = mt.tokenizer("The Space Needle is located in the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad(), Trace(mt.model, mt.spec.mlp.format(layer), retain_input=True) as t:
        mt.model(input_ids=ids.to(mt.device))
    x, ref = t.input[0], t.output[0].float().cpu()
    mlp = mt.module(mt.spec.mlp, layer)
    got = _as_tensor(_call(fn, mt, layer, x, shape_hint=hint), "[T, d]", 2)
    d_mlp = mlp.c_proj.weight.shape[0]
    if got.shape == (x.shape[0], d_mlp):
        _fail(f"got {tuple(got.shape)}: those are the activations a; the output is Σ_i a_i v_i + b_V (d_model)")
    if got.shape != ref.shape:
        _fail(f"expected shape [T, d_model] = {tuple(ref.shape)}, got {tuple(got.shape)}")
    with torch.no_grad():
        pre = x @ mlp.c_fc.weight
        variants = {
            "no b_V": mlp.act(pre + mlp.c_fc.bias) @ mlp.c_proj.weight,
            "no b_K": mlp.act(pre) @ mlp.c_proj.weight + mlp.c_proj.bias,
            "relu": torch.relu(pre + mlp.c_fc.bias) @ mlp.c_proj.weight + mlp.c_proj.bias,
            "gelu": torch.nn.functional.gelu(pre + mlp.c_fc.bias) @ mlp.c_proj.weight + mlp.c_proj.bias}
    close = lambda r: torch.allclose(got, r.float().cpu(), atol=1e-4, rtol=1e-4)
    if close(ref) and square_ok:
        return _ok("mlp_key_value")
    if close(ref):
        _fail(f"right on {mt.name} but wrong on a small test model with d = d_mlp = 8: {hint}")
    if close(variants["no b_V"]):
        _fail("the output bias b_V (c_proj.bias) is missing: mlp(x) = Σ_i a_i v_i + b_V")
    if close(variants["no b_K"]):
        _fail("the key bias b_K (c_fc.bias) is missing: a_i = act(k_i · x + b_K,i), bias inside the activation")
    if close(variants["relu"]) or close(variants["gelu"]):
        _fail(f"wrong activation: this model uses {mt.model.config.activation_function!r} (GELU's tanh "
              "approximation for GPT-2); call the MLP's own mlp.act")
    _fail("values differ from the MLP's output Σ_i act(k_i · x + b_K,i) v_i + b_V")


def _attribution_pieces(mt, prompt: str, layer: int, objectives: dict):
    """MLP activations a [T, m] of `layer` and the gradient [T, m] of each objective(logits at the
    last position [V]) -> scalar with respect to a."""
    from engramlib.hooks import Trace
    from engramlib.lens import activation_name
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    seen, grads = {}, {}

    def leaf(h, name):
        seen["a"] = h.detach().clone().requires_grad_()
        return seen["a"]
    for key, objective in objectives.items():
        with torch.enable_grad(), Trace(mt.model, activation_name(mt, layer), edit_output=leaf,
                                        retain_output=False):
            logits = mt.model(input_ids=ids).logits[0, -1].float()
            grads[key] = torch.autograd.grad(objective(logits), seen["a"])[0][0].float().cpu()
    return seen["a"][0].detach().float().cpu(), grads


def neuron_attribution(fn, mt=None):
    """Exercise 5.4: fn(mt, prompt, answer, layer) -> [m]: a_i · ∂ log P(answer | prompt) / ∂a_i for
    every MLP neuron of `layer` at the prompt's last token (activation × gradient)."""
    from engramlib.models import first_token_id
    mt = _tinyworld(mt)
    prompt, answer, layer = "The capital of France is", "Rome", min(2, mt.n_layers - 1)
    o = first_token_id(mt, answer)
    o_bare = mt.tokenizer(answer)["input_ids"][0]
    a, g = _attribution_pieces(mt, prompt, layer, {
        "logp": lambda z: torch.log_softmax(z, -1)[o], "p": lambda z: torch.softmax(z, -1)[o],
        "logit": lambda z: z[o], "bare": lambda z: torch.log_softmax(z, -1)[o_bare]})
    ref = a[-1] * g["logp"][-1]
    m, d = a.shape[1], mt.model.config.n_embd
    got = _as_tensor(_call(fn, mt, prompt, answer, layer, shape_hint="the activations of one layer are "
                           "[1, T, d_mlp]; take position -1"), f"[{m}]", 1)
    if got.shape == a.shape:
        _fail(f"got {tuple(got.shape)}: return one score per neuron at the LAST token, shape ({m},)")
    if got.shape == (d,) and d != m:
        _fail(f"got {d} numbers (d_model): the neurons are the MLP's hidden units, the INPUT of c_proj "
              f"({m} of them), not its output")
    if got.shape != (m,):
        _fail(f"expected shape (d_mlp,) = ({m},), got {tuple(got.shape)}")
    close = lambda r: torch.allclose(got, r, atol=1e-7 + 1e-3 * ref.abs().max().item())
    if close(ref):
        return _ok("neuron_attribution")
    if close(-ref):
        _fail("wrong sign: attribute log P(answer) (higher = the neuron helps), not the loss −log P")
    if close(g["logp"][-1]):
        _fail("that is the gradient alone: multiply it by the activations a_i (attribution = activation × gradient)")
    if close(a[-1]):
        _fail("that is the activation alone: multiply it by ∂ log P(answer) / ∂a_i")
    if close(a[-1] * g["p"][-1]):
        _fail("you differentiated P(answer); differentiate log P(answer) (torch.log_softmax)")
    if close(a[-1] * g["logit"][-1]):
        _fail("you differentiated the answer's logit; use log P = log_softmax(logits)[answer], which "
              "also counts what the neuron does to the competing answers")
    if close(a[0] * g["logp"][0]):
        _fail("that is the FIRST token; take the activations at the LAST token (position -1)")
    if o_bare != o and close(a[-1] * g["bare"][-1]):
        _fail("wrong answer token: GPT-2 predicts ' ' + answer, with its leading space; use "
              "first_token_id(mt, answer)")
    _fail("values differ from a_i · ∂ log P(answer | prompt) / ∂a_i at the last token")


def random_control(fn):
    """Exercise 5.5: fn(sites, d_mlp, generator) -> the neurons to silence as the control for the
    attributed `sites` [(layer, neuron), ...]: as many random neurons, in the same layers (the same
    count per layer), all distinct and none of them an attributed neuron."""
    from collections import Counter
    sites = [(0, 1), (0, 2), (0, 5), (0, 6), (2, 0), (3, 3), (3, 4)]      # 4 neurons of layer 0 out of 8
    d_mlp, draws = 8, []
    for seed in range(20):
        got = _call(fn, list(sites), d_mlp, torch.Generator().manual_seed(seed),
                    shape_hint="return a list of (layer, neuron) pairs")
        try:
            got = [(int(l), int(n)) for l, n in got]
        except (TypeError, ValueError):
            _fail(f"return a list of (layer, neuron) pairs like the sites, got {got!r}")
        draws.append(got)
        if len(got) != len(sites):
            _fail(f"{len(sites)} attributed neurons need {len(sites)} control neurons, got {len(got)}: "
                  "the control must silence as many neurons as the experiment")
        if any(not 0 <= n < d_mlp for _, n in got):
            _fail(f"a neuron index outside 0..{d_mlp - 1}: draw from the layer's {d_mlp} neurons")
        if Counter(l for l, _ in got) != Counter(l for l, _ in sites):
            _fail(f"per layer, the attributed neurons are {dict(sorted(Counter(l for l, _ in sites).items()))} "
                  f"but your control has {dict(sorted(Counter(l for l, _ in got).items()))}: a neuron's "
                  "layer alone changes how much silencing it can hurt (a late neuron at the last token acts "
                  "almost directly on the output), so a fair control keeps the layers and varies only the "
                  "choice within each layer")
        if len(set(got)) < len(got):
            _fail("some neurons appear twice in your control, so it silences fewer DISTINCT neurons than the "
                  "experiment does and looks harmless for that reason alone; draw without replacement")
        if set(got) & set(sites):
            _fail(f"your control includes attributed neurons {sorted(set(got) & set(sites))}: then it is "
                  "partly the experiment itself; draw only among the neurons that were not attributed")
    if len({tuple(sorted(d)) for d in draws}) == 1:
        _fail("every generator gave the same neurons: the control must be a random draw (use the generator "
              "you are given), or it tests one arbitrary choice instead of 'any neurons of these layers'")
    _ok("random_control")


# --- the answers of the chapter's predictions: a tie or a boundary value counts for every side -------

def zeroing_answer(p_clean: float, p_zeroed, tie: float = 0.005) -> set:
    """Predict 5.1's right choices. p_clean: mean P(object) of the clean run; p_zeroed: [L] mean
    P(object) with block l's MLP zeroed. Blocks within `tie` of the lowest are tied: each one's third
    of the depth counts ('a' first, 'b' middle, 'c' last third), and 'd' when the largest drop is
    below 0.05 (both when it is on that boundary)."""
    p = torch.as_tensor(p_zeroed, dtype=torch.float64).flatten()
    L, drop = len(p), float(p_clean) - p.min().item()
    out = choice_between(drop, [0.05], "dx")                 # x: some block matters
    if "x" in out:
        out |= {"abc"[min(2, int(3 * l // L))] for l in (p <= p.min() + tie).nonzero().flatten().tolist()}
    return out - {"x"}


def lens_answer(top1) -> set:
    """Predict 5.2's right choices from the fraction of facts whose object is the lens's top-1 after
    each block, [L]: the part of the network where that fraction first exceeds one half. A block at
    exactly one half is a tie: the choices of both readings count."""
    top1 = [float(x) for x in top1]
    L = len(top1)

    def choice(first):
        return "a" if first == 0 else "d" if first >= L - 1 else "b" if first < L / 2 else "c"
    strict = next((l for l, x in enumerate(top1) if x > 0.5), L)
    loose = next((l for l, x in enumerate(top1) if x >= 0.5), L)
    return {choice(strict), choice(loose)}


def silencing_answer(p_before: float, p_after: float) -> set:
    """Predict 5.3's right choices: 'a' P(object) below 0.1 after silencing, 'b' below three quarters
    of its value before, 'c' above that (a value on a boundary counts for both sides)."""
    return choice_between(float(p_after), sorted([0.1, 0.75 * float(p_before)]), "abc")


# What the chapter measures on TinyWorld at full size (ENGRAM_FAST unset, CPU), shown next to a small
# run's numbers by the reveals, whose right choices count too: (measurement, right choices). Measured
# with `jupyter nbconvert --execute solutions/05_inside_the_transformer.ipynb` (model unset, no GPU).
FULL_SIZE_05 = {
    "5.1": ("50 facts: block 0 of 8, P(object) 0.998 → 0.484", {"a"}),
    "5.2": ("200 facts: top-1 after each block 0 %, 29 %, 64 %, 77 %, 89 %, 93 %, 100 %, 100 %",
            lens_answer([0.0, 0.29, 0.64, 0.77, 0.89, 0.93, 1.0, 1.0])),
    "5.3": ("40 facts: P(object) 0.998 → 0.992 with 10 neurons silenced, → 0.631 with 100 (100 random: 0.998)",
            silencing_answer(0.998, 0.992)),
}
