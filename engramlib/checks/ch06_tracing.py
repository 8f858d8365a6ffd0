"""Checks for chapter 06: causal tracing."""
from __future__ import annotations

import time

import torch

from engramlib.checks._common import _call, _fail, _ok, choice_between



def _token_layer_grid(got, T: int, L: int, what: str) -> torch.Tensor:
    """The student's [tokens, layers] grid as a float CPU tensor, or a failure naming the mix-up."""
    if not torch.is_tensor(got):
        _fail(f"return a tensor of {what} [tokens, layers] = ({T}, {L}), got {type(got).__name__}")
    got = got.detach().float().cpu()
    if got.shape == (L, T) and L != T:
        _fail(f"got shape ({L}, {T}): one ROW per token and one COLUMN per layer, [T, L] = ({T}, {L})")
    if got.shape != (T, L):
        _fail(f"expected shape [tokens, layers] = ({T}, {L}), got {tuple(got.shape)}")
    return got

def _tinyworld(mt):
    from engramlib.models import load_model
    return mt or load_model("tinyworld", device="cpu")


def subject_token_range(fn, mt=None):
    """Exercise 6.1: fn(tokenizer, prompt, subject) -> (start, end), subject tokens start..end-1."""
    from engramlib.models import find_subject_range
    mt = _tinyworld(mt)
    for prompt, subject in [("The Space Needle is located in the city of", "Space Needle"),
                            ("Danielle Darrieux was born in", "Danielle Darrieux")]:
        ref = find_subject_range(mt.tokenizer, prompt, subject)
        got = _call(fn, mt.tokenizer, prompt, subject)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            _fail(f"return a pair (start, end), got {got!r}")
        got = (int(got[0]), int(got[1]))
        if got == (ref[0], ref[1] - 1):
            _fail(f"got {got}, expected {ref}: `end` is exclusive (one past the last subject token), "
                  "like Python slices")
        if got == (prompt.find(subject), prompt.find(subject) + len(subject)) and got != ref:
            _fail(f"got {got}: those look like character positions; return TOKEN indices "
                  "(use return_offsets_mapping=True)")
        if got != ref:
            _fail(f"for {prompt!r} / {subject!r} got {got}, expected {ref}. Remember GPT-2 tokens "
                  "carry their leading space: tokenizing the subject alone gives different tokens")
    _ok("subject_token_range")


def corrupt_subject(fn):
    """Exercise 6.2: fn(embeds [B, T, d], start, end, noise [B-1, end-start, d]) -> new embeds
    with the noise added to the subject tokens of rows 1.. (row 0 stays clean)."""
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(4, 6, 3, generator=gen)
    noise = torch.randn(3, 2, 3, generator=gen)
    copy = embeds.clone()
    got = _call(fn, embeds, 2, 4, noise, shape_hint="noise has one row per CORRUPTED copy (rows 1..)")
    if not torch.equal(embeds, copy):
        _fail("your function changed `embeds` in place: clone it first (embeds.clone())")
    if not torch.is_tensor(got) or got.shape != embeds.shape:
        _fail(f"return a tensor of the same shape {tuple(embeds.shape)}")
    if not torch.equal(got[0], embeds[0]):
        _fail("row 0 changed: it is the clean run and must stay uncorrupted")
    ref = embeds.clone()
    ref[1:, 2:4] += noise
    outside = torch.ones(6, dtype=torch.bool)
    outside[2:4] = False
    if not torch.allclose(got[:, outside], embeds[:, outside]):
        _fail("tokens outside start..end-1 changed (end is exclusive, like a Python slice)")
    if not torch.allclose(got, ref):
        _fail("expected embeds[1:, start:end] + noise on the subject tokens and nothing elsewhere")
    _ok("corrupt_subject")


# --- restoring states ------------------------------------------------------------------------------

def _trace_inputs(mt, prompt: str, subject: str, noise_draws: torch.Tensor):
    """What `tracing.trace_loop` prepares, but with the given noise draws (no random numbers)."""
    from engramlib.models import find_subject_range
    from engramlib.trace_inputs import TraceInputs
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    with torch.no_grad():
        clean = torch.softmax(mt.model(input_ids=ids).logits[0, -1].float(), -1)
    answer = int(clean.argmax())
    return TraceInputs(ids=ids, start=start, end=end, noise=float("nan"), noise_draws=noise_draws,
                       answer_id=answer, high_score=clean[answer].item())


@torch.no_grad()
def _row_probs(mt, inputs, restore: dict) -> torch.Tensor:
    """p(answer) in every row [1 + samples] of `tracing._corrupted_run`'s batch (row 0 clean, rows
    1.. corrupted), restoring {module name: [token, ...]} from row 0. Only the sites asked for run."""
    from engramlib.hooks import TraceDict
    from engramlib.trace_inputs import _corrupt
    batch = inputs.ids.expand(inputs.noise_draws.shape[0] + 1, -1)

    def edit(h, name):
        if name == mt.spec.embedding:
            return _corrupt(h, inputs)
        h = h.clone()
        h[1:, restore[name]] = h[0, restore[name]]
        return h
    with TraceDict(mt.model, [mt.spec.embedding] + list(restore), retain_output=False, edit_output=edit):
        probs = torch.softmax(mt.model(input_ids=batch).logits[:, -1].float(), -1)
    return probs[:, inputs.answer_id].cpu()


def _space_needle_case(mt) -> tuple:
    """The trace checks' case: (prompt, subject, (start, end) of the subject's tokens, noise draws
    [3, subject tokens, d] from `_draws`, the `TraceInputs` that `tracing.trace_loop` would prepare)."""
    from engramlib.models import find_subject_range
    prompt, subject = "The Space Needle is located in the city of", "Space Needle"
    start, end = find_subject_range(mt.tokenizer, prompt, subject)
    draws = _draws(mt, subject, end - start)
    return prompt, subject, (start, end), draws, _trace_inputs(mt, prompt, subject, draws)


def _draws(mt, subject: str, subject_tokens: int, samples: int = 3, seed: int = 0) -> torch.Tensor:
    """Noise draws [samples, subject tokens, d] at 3 σ of the subject's embeddings, from the check's
    own generator (nothing depends on the library's random numbers)."""
    from engramlib.trace_inputs import noise_level
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, subject_tokens, mt.model.config.n_embd, generator=gen)
    return (draws * noise_level(mt, [subject])).to(mt.device)


def restore_one_state(fn, mt=None):
    """Exercise 6.3: fn(mt, prompt, subject, noise_draws, token=None, layer=None) -> p(answer)
    averaged over the corrupted copies (one per row of noise_draws [samples, subject tokens, d]),
    with block `layer`'s output at `token` copied from the clean run (token None: nothing restored).
    The answer is the clean run's top prediction. Checked step by step: the corrupted run first,
    then three restored sites, each against the same computation as `tracing.trace_loop`'s."""
    from engramlib.hooks import Trace
    from engramlib.trace_inputs import _corrupt
    mt = _tinyworld(mt)
    prompt, subject, (start, end), draws, inputs = _space_needle_case(mt)
    T, L = inputs.ids.shape[1], mt.n_layers
    block = mt.spec.layer.format
    tol = 1e-4
    hint = ("noise_draws has one row per CORRUPTED copy: the batch has len(noise_draws) + 1 rows, "
            "and the noise goes into rows 1.. at the subject's tokens start:end")

    # step 1: the corrupted run (nothing restored)
    got = _call(fn, mt, prompt, subject, draws, shape_hint=hint)
    low_rows = _row_probs(mt, inputs, {})
    low = low_rows[1:].mean().item()
    if not isinstance(got, (float, int)) and not (torch.is_tensor(got) and got.numel() == 1):
        _fail(f"return one number, p(answer) averaged over the corrupted copies; got {type(got).__name__}"
              + (f" of shape {tuple(got.shape)}" if torch.is_tensor(got) else ""))
    got = float(got)
    if abs(got - low) > tol:
        if abs(got - inputs.high_score) < tol:
            _fail(f"step 1 (nothing restored): you got the CLEAN probability {got:.4f}: no noise reached "
                  "the model. Add noise_draws to the OUTPUT of the embedding module (mt.spec.embedding) "
                  "in rows 1.., with Trace(..., edit_output=...) around the forward pass")
        if abs(got - low_rows.mean().item()) < tol:
            _fail(f"step 1 (nothing restored): {got:.4f} is the mean over ALL rows; row 0 is the clean "
                  f"run: average rows 1.. only (expected {low:.4f})")
        with torch.no_grad(), Trace(mt.model, mt.spec.embedding, edit_output=lambda h, n: _corrupt(h, inputs)):
            probs = torch.softmax(mt.model(input_ids=inputs.ids.expand(len(draws) + 1, -1)).logits[:, -1].float(), -1)
        wrong_answer = probs[1:].mean(0).argmax()         # the noisy rows' own favourite token
        if wrong_answer != inputs.answer_id and abs(got - probs[1:, wrong_answer].mean().item()) < tol:
            _fail("step 1 (nothing restored): you measured the corrupted runs' own favourite token; the "
                  "answer is the CLEAN run's top prediction (row 0's argmax at the last position)")
        _fail(f"step 1 (nothing restored): got {got:.4f}, expected the corrupted score {low:.4f}. Check "
              "the noise: rows 1.. only, tokens start:end of the embedding output, the draws as given "
              "(already scaled), and p(answer) at the LAST position")

    # step 2: three sites, each restored alone
    sites = [(end - 1, 1), (start, min(2, L - 1)), (T - 1, L // 2)]
    for token, layer in sites:
        ref_rows = _row_probs(mt, inputs, {block(layer): [token]})
        ref = ref_rows[1:].mean().item()
        got = float(_call(fn, mt, prompt, subject, draws, token=token, layer=layer, shape_hint=hint))
        if abs(got - ref) <= tol:
            continue
        where = f"step 2, site (token {token} {mt.tokenizer.decode(inputs.ids[0, token])!r}, layer {layer})"
        variants = {
            "nothing": low,
            "row 0": ref_rows.mean().item(),
            "input": _row_probs(mt, inputs, {block(layer - 1): [token]})[1:].mean().item(),
            "all tokens": _row_probs(mt, inputs, {block(layer): list(range(T))})[1:].mean().item(),
            "from token on": _row_probs(mt, inputs, {block(layer): list(range(token, T))})[1:].mean().item(),
            "mlp": _row_probs(mt, inputs, {mt.spec.mlp.format(layer): [token]})[1:].mean().item(),
        }
        same = lambda key: abs(got - variants[key]) < tol and abs(variants[key] - ref) > tol
        if same("nothing"):
            _fail(f"{where}: you got the corrupted score {got:.4f}; nothing was restored. Copy row 0's "
                  f"output of block `layer` ({block(layer)}) at `token` into rows 1..")
        if same("row 0"):
            _fail(f"{where}: {got:.4f} averages row 0 (the clean run) in; average rows 1.. only")
        if same("input"):
            _fail(f"{where}: you restored block {layer}'s INPUT (block {layer - 1}'s output); restore the "
                  f"OUTPUT of {block(layer)}")
        if same("all tokens") or same("from token on"):
            _fail(f"{where}: you restored more than one token; copy row 0's state at `token` only "
                  "(h[1:, token] = h[0, token])")
        if same("mlp"):
            _fail(f"{where}: that restores the MLP's output; the hidden state is the whole block's output, "
                  "the residual stream (mt.spec.layer)")
        _fail(f"{where}: got {got:.4f}, expected {ref:.4f}")
    _ok("restore_one_state")


def trace_by_loop(fn, mt=None):
    """Exercise 6.4: fn(mt, prompt, subject, noise_draws) -> scores [T, L]: p(answer) with block
    l's output at token t restored, one site at a time (the loop of `tracing.trace_loop`),
    compared with the library's batched `trace` on the same noise draws."""
    from engramlib.fast_trace import trace
    from engramlib.trace_inputs import _prepare, noise_level
    mt = _tinyworld(mt)
    prompt, subject = "The Space Needle is in", "Space Needle"         # short: T x L forward passes
    samples, seed, noise = 2, 3, noise_level(mt, ["Space Needle"])
    draws = _prepare(mt, prompt, subject, samples, noise, None, seed).noise_draws
    clock = time.perf_counter()
    got = _call(fn, mt, prompt, subject, draws, shape_hint="loop over every token t and layer l")
    t_loop, clock = time.perf_counter() - clock, time.perf_counter()
    ref = trace(mt, prompt, subject, samples=samples, noise=noise, seed=seed)   # the same draws, batched
    t_batched = time.perf_counter() - clock
    T, L = len(ref.tokens), mt.n_layers
    got = _token_layer_grid(got, T, L, "scores")
    s = ref.subject_range[0]
    if s > 0 and (got[:s] == 0).all():
        _fail(f"the tokens before the subject (0..{s - 1}) are 0; restoring them changes nothing, so "
              f"their score is the corrupted run's p(answer) ({ref.low_score:.4f}), not 0: run them too")
    wrong = (got - ref.scores).abs() > 1e-4
    if wrong.any():
        t, l = [int(i) for i in wrong.nonzero()[0]]
        _fail(f"(token {t}, layer {l}): got {got[t, l]:.4f}, the library's batched trace gives "
              f"{ref.scores[t, l]:.4f} with the same noise. Does restore_one_state pass its check, and "
              "does your loop pass (token, layer) in that order?")
    print(f"  your loop: {T * L} forward passes in {t_loop:.2f} s; the library's batched trace: "
          f"{t_batched:.2f} s; every score the same (max difference {(got - ref.scores).abs().max():.1e})")
    _ok("trace_by_loop")


def indirect_effect(fn):
    """Exercise 6.5: fn(result, token, layer) -> scores[token, layer] - low_score."""
    from engramlib.trace_inputs import TraceResult
    r = TraceResult(scores=torch.tensor([[0.1, 0.2], [0.5, 0.9]]), low_score=0.1, high_score=0.95,
                    tokens=["A", "B"], subject_range=(0, 1), answer=" X", kind=None, window=1,
                    noise=1.0)
    got = float(_call(fn, r, 1, 0))
    if abs(got - 0.5) < 1e-6:
        _fail("that is the raw score p(answer) with the state restored; subtract the corrupted "
              "score (low_score): the indirect effect is what the restoration brings BACK")
    if abs(got - 0.45) < 1e-6:
        _fail("you measured high_score - score (what is still missing); use score - low_score")
    if abs(got - 0.4 / 0.85) < 1e-6:
        _fail("that is the share of the total effect; the indirect effect is the plain difference "
              "score - low_score")
    if abs(got - 0.4) > 1e-6:
        _fail(f"expected 0.4 for token 1, layer 0, got {got}")
    _ok("indirect_effect")


# --- attribution patching ------------------------------------------------------------------------

def _states_and_grads(mt, inputs) -> tuple:
    """One forward and one backward pass of `tracing._corrupted_run`'s batch (row 0 clean, rows 1..
    corrupted). Returns p(answer) per row [1 + S], the block outputs H [1 + S, T, L, d] and
    G = ∂p_row/∂H [1 + S, T, L, d], row 0's gradient (of the clean run's own p) included."""
    from engramlib.hooks import TraceDict
    from engramlib.trace_inputs import _corrupt
    batch = inputs.ids.expand(inputs.noise_draws.shape[0] + 1, -1)
    names = [mt.spec.layer.format(l) for l in range(mt.n_layers)]

    def corrupt(h, name):
        if name != mt.spec.embedding:
            return h
        h = _corrupt(h, inputs)
        return h if h.requires_grad else h.requires_grad_()
    with torch.enable_grad(), TraceDict(mt.model, [mt.spec.embedding] + names, edit_output=corrupt,
                                        detach=False) as rec:
        probs = torch.softmax(mt.model(input_ids=batch).logits[:, -1].float(), -1)[:, inputs.answer_id]
        grads = torch.autograd.grad(probs.sum(), [rec[n].output for n in names])
    H = torch.stack([rec[n].output.detach() for n in names], dim=2).float().cpu()
    return probs.detach().cpu(), H, torch.stack(grads, dim=2).float().cpu()


def _exact_trace(mt, inputs) -> torch.Tensor:
    """[T, L]: p(answer) with each block output restored (the causal trace, one site at a time).
    Its last entry, the top layer's output at the last token restored, is the clean p(answer)."""
    T, L = inputs.ids.shape[1], mt.n_layers
    return torch.tensor([[_row_probs(mt, inputs, {mt.spec.layer.format(l): [t]})[1:].mean().item()
                          for l in range(L)] for t in range(T)])


def attribution_patching(fn, mt=None):
    """Exercise 6.6: fn(mt, prompt, subject, noise_draws) -> [T, L]: the first-order estimate of
    p(answer) with block l's output at token t restored, low_score + the mean over the corrupted
    copies of (h_clean − h_corrupt) · ∂p/∂h_corrupt, from one forward and one backward pass.
    The answer is the clean run's top prediction."""
    mt = _tinyworld(mt)
    prompt, subject, (start, end), draws, inputs = _space_needle_case(mt)
    T, L = inputs.ids.shape[1], mt.n_layers
    got = _call(fn, mt, prompt, subject, draws, shape_hint="noise_draws has one row per CORRUPTED copy: "
                "the batch has len(noise_draws) + 1 rows, row 0 clean")
    got = _token_layer_grid(got, T, L, "estimates")
    probs, H, G = _states_and_grads(mt, inputs)
    S, low = len(draws), probs[1:].mean().item()
    delta = H[:1] - H[1:]                                       # [S, T, L, d]: clean minus corrupted
    effect = (delta * G[1:]).sum(-1).mean(0)                    # [T, L]
    ref = low + effect
    tol = 1e-4
    close = lambda x: (got - x).abs().max().item() < tol
    if close(ref):
        print(f"  your estimate equals the library's at every site (max difference "
              f"{(got - ref).abs().max():.1e}); Predict 6.3 asks how close it comes to the trace")
        _ok("attribution_patching")
        return
    if close(torch.full_like(ref, low)) or close(low + G[1:].sum(-1).mean(0)):
        _fail(f"every estimate is (almost) the corrupted p(answer) ({low:.4f}): the first-order effects "
              "vanish. Did you sum the gradient over d alone? Multiply it by the step h_clean − h_corrupt "
              "first (a directional derivative, ∂p/∂h · Δh), then sum: the plain sum is ~0 because every "
              "block output reaches the answer through a LayerNorm, which ignores the mean over d")
    if close(effect):
        _fail(f"your numbers are the first-order EFFECTS; the estimate of p(answer) adds them to the "
              f"corrupted run's p(answer) (low_score = {low:.4f})")
    if close(low - effect):
        _fail("wrong sign: the restoration moves h from corrupted to clean, so the step is "
              "h_clean − h_corrupt (row 0 minus rows 1..), not h_corrupt − h_clean")
    if close(low + (H[:1] * G[1:]).sum(-1).mean(0)) or close(low + (H[1:] * G[1:]).sum(-1).mean(0)):
        _fail("the step must be the DIFFERENCE h_clean − h_corrupt, not one of the two states alone")
    if close(low + (delta * G[:1]).sum(-1).mean(0)):
        _fail("you took the gradient at the CLEAN run (row 0); the Taylor expansion is around the "
              "corrupted run, where the restoration starts: use the gradients of rows 1..")
    if close(probs.mean().item() + effect * S / (S + 1)) or close(low + effect * S / (S + 1)):
        _fail("you averaged row 0 (the clean run) in; average over the corrupted copies, rows 1.., only")
    if start > 0 and (got[:start] == 0).all():
        _fail(f"the tokens before the subject (0..{start - 1}) are 0; there h_clean = h_corrupt, so the "
              f"estimate is the corrupted p(answer) ({low:.4f}), not 0")
    if abs(got[-1, -1].item() - inputs.high_score) < tol and close(_exact_trace(mt, inputs)):
        _fail("that is the causal trace itself (each state restored exactly, one forward pass per site); "
              "the exercise asks for its first-order estimate from ONE backward pass")
    wrong = (got - ref).abs() > tol
    t, l = [int(i) for i in wrong.nonzero()[0]]
    _fail(f"(token {t}, layer {l}): got {got[t, l]:.4f}, expected {ref[t, l]:.4f}. Is ∂p/∂h the gradient "
          "of p(answer) summed over rows 1.. (each row's own gradient), with h the OUTPUT of block l "
          "(mt.spec.layer), and the answer row 0's top token?")


# --- exercise 6.7: choose the layer to edit ----------------------------------------------------

LAYER_CHOICE_ROWS = ("hidden @ last subject token", "mlp @ last subject token", "attn @ last subject token",
                     "hidden @ last token", "mlp @ last token", "attn @ last token")

# A made-up trace of one fact on a 12-layer model (not a measurement): p(answer) with one state
# restored, per layer; MLP and attention rows restore a window of 3 layers centred on the layer.
# Its shape follows Meng et al. (2022, Fig. 1, GPT-2 XL): early hidden states and the MLPs of the
# middle layers at the last subject token, late hidden states at the last token.
LAYER_CHOICE_TRACE = {
    "clean p": 0.62, "corrupted p": 0.05,
    "hidden @ last subject token": [0.50, 0.53, 0.52, 0.50, 0.47, 0.41, 0.30, 0.17, 0.09, 0.06, 0.05, 0.05],
    "mlp @ last subject token":    [0.09, 0.13, 0.19, 0.27, 0.31, 0.29, 0.20, 0.11, 0.07, 0.06, 0.05, 0.05],
    "attn @ last subject token":   [0.05, 0.06, 0.06, 0.07, 0.07, 0.06, 0.06, 0.05, 0.05, 0.05, 0.05, 0.05],
    "hidden @ last token":         [0.05, 0.05, 0.05, 0.06, 0.07, 0.09, 0.16, 0.30, 0.45, 0.55, 0.60, 0.62],
    "mlp @ last token":            [0.05, 0.05, 0.05, 0.05, 0.06, 0.07, 0.09, 0.13, 0.16, 0.14, 0.10, 0.08],
    "attn @ last token":           [0.05, 0.05, 0.05, 0.06, 0.08, 0.13, 0.21, 0.24, 0.19, 0.11, 0.07, 0.06],
}


def supported_layers(row, low: float, share: float = 0.8) -> set:
    """The layers a trace row supports as its peak: those whose indirect effect (score − low) is at
    least `share` of the row's largest effect (a plateau, not only the argmax)."""
    effects = [x - low for x in row]
    top = max(effects)
    return {layer for layer, x in enumerate(effects) if x >= share * top - 1e-12}


def choose_edit_layer(layer, evidence, table=None):
    """Exercise 6.7: layer -> the layer ROME should edit for the fact of `LAYER_CHOICE_TRACE`;
    evidence -> the row of the table that justifies it (one of LAYER_CHOICE_ROWS). Accepts every
    layer where that row's effect is within 80 % of its peak; explains the rows and layers that
    answer another question (the embedding, the hidden state, the last token, the answer itself)."""
    table = table or LAYER_CHOICE_TRACE
    low, high = table["corrupted p"], table["clean p"]
    evidence = str(evidence).strip().lower()
    if evidence not in LAYER_CHOICE_ROWS:
        _fail(f"evidence must name one row of the table: one of {', '.join(map(repr, LAYER_CHOICE_ROWS))}; "
              f"got {evidence!r}")
    try:
        layer = int(layer)
    except (TypeError, ValueError):
        _fail(f"layer must be a layer number, 0 to {len(table[evidence]) - 1}; got {layer!r}")
    n_layers = len(table[evidence])
    if not 0 <= layer < n_layers:
        _fail(f"the model has layers 0 to {n_layers - 1}; got {layer}")
    right = "mlp @ last subject token"
    peak = lambda row: max(range(n_layers), key=lambda l: table[row][l])
    if evidence.startswith("hidden") and evidence.endswith("subject token"):
        _fail("the hidden state is the whole residual stream: restoring it at the last subject token hands "
              "back the clean embeddings and everything every earlier module wrote there, so it is bright "
              "from layer 0 on. It shows where the subject's information IS, not which weights turn it into "
              "the fact. ROME rewrites the weights of one MLP: read the row of that kind of module")
    if evidence.endswith("@ last token"):
        _fail(f"the last token is where the answer is assembled and read out, after the subject's information "
              f"has been moved there; ROME writes under the subject's KEY, which the MLP computes at the last "
              f"subject token. Read a row of the last subject token"
              + (f" (restoring the last token's top hidden state gives back the clean p = {high:.2f}: that "
                 "is restoring the answer itself)" if evidence.startswith("hidden") else ""))
    if evidence.startswith("attn"):
        _fail("attention moves information between tokens; its effect at the last subject token is small "
              "here, and ROME does not edit attention weights: it treats an MLP's output matrix as a "
              "key → value memory. Read that module's row")
    good = supported_layers(table[right], low)
    if layer in good:
        span = f"{min(good)}-{max(good)}" if len(good) > 1 else str(min(good))
        print(f"  layer {layer}: restoring the MLPs there brings p(answer) from {low:.2f} to "
              f"{table[right][layer]:.2f}; the row supports layers {span} (within 80 % of its peak effect)")
        _ok("choose_edit_layer")
        return
    diagnosis = {0: "layer 0 is where the noise went in (the embeddings), not where the fact is looked up: "
                    f"the MLP row there is weak ({table[right][0]:.2f})",
                 n_layers - 1: "the last layer is too late: by then the subject's information has left the "
                               f"subject's token (the MLP row there is {table[right][-1]:.2f}, the corrupted "
                               "run's value)"}
    others = {peak("hidden @ last subject token"): "that is where the HIDDEN STATE at the last subject token "
                                                   "peaks, not the MLP row you named",
              peak("mlp @ last token"): "that is the peak of the MLPs at the LAST token, not at the last subject token",
              peak("attn @ last token"): "that is the peak of the attention at the last token"}
    if layer in diagnosis:
        _fail(f"layer {layer}: {diagnosis[layer]}. Where does the row you named peak?")
    if layer in others:
        _fail(f"layer {layer}: {others[layer]}. Read the peak off the MLP row of the last subject token")
    _fail(f"layer {layer}: the MLP row of the last subject token gives {table[right][layer]:.2f} there, "
          f"against {max(table[right]):.2f} at its peak; choose a layer where restoring those MLPs brings "
          "back (nearly) the most")


# --- the predictions' answers (ties count for every tied choice) -------------------------------

def answer_6_1(best, start: int, end: int, tol: float = 1e-9) -> set:
    """Predict 6.1's right choice(s): `best` [tokens] is the best MLP restoration at each token, the
    subject at tokens start..end-1. Every token within tol of the maximum counts (a tie)."""
    best = [float(x) for x in best]
    top = max(best)
    letter = lambda t: "a" if t == start else "b" if t == end - 1 else "d" if t == len(best) - 1 else "c"
    return {letter(t) for t, x in enumerate(best) if x >= top - tol}


def answer_6_2(mlp_last: float, mlp_first: float, margin: float = 0.05) -> set:
    """Predict 6.2's right choice(s): c when the best MLP effects at the first and last subject token
    differ by less than `margin`, else the larger; a difference of exactly `margin` counts for both."""
    return choice_between(mlp_last - mlp_first, (-margin, margin), "acb")


def answer_6_3(reference, estimate, start: int = 0, gap: float = 0.05, tol: float = 1e-6) -> set:
    """Predict 6.3's right choice(s) from two [tokens, layers] maps (the trace and its estimate),
    compared from the subject's first token on: a/b when the estimate's largest value sits on a site
    where the trace is largest (a: within `gap` of it, b: further; a gap of exactly `gap` counts for
    both), c when it sits elsewhere. Tied maxima count for every site they tie on; `tol` absorbs
    float32 rounding (the maps are probabilities)."""
    ref, est = torch.as_tensor(reference)[start:].double(), torch.as_tensor(estimate)[start:].double()
    top_ref = {tuple(map(int, s)) for s in (ref >= ref.max() - tol).nonzero()}
    top_est = {tuple(map(int, s)) for s in (est >= est.max() - tol).nonzero()}
    right = {"c"} if top_est - top_ref else set()
    for t, l in top_est & top_ref:
        right |= choice_between(abs(est[t, l] - ref[t, l]).item(), (gap,), "ab", tol=tol)
    return right
