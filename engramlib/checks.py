"""Instant checks for the exercises: `checks.<exercise>(your_function)`.

A check runs your function on small cases, compares it with the reference, and explains the most
likely mistake when it differs. On success it prints one line starting with ✓.

Predictions: `checks.predict(key, question, choices, answer)` records a prediction before an
experiment; `checks.reveal(key, measured, explanation)` after it shows what was measured next to
the prediction. The predictions live in `PREDICTIONS` (one dict per session; `PREDICTIONS.clear()`).
"""
from __future__ import annotations

import torch


def _fail(message: str):
    raise AssertionError(message)


def _ok(name: str):
    print(f"✓ {name} passed")


def _call(fn, *args, shape_hint: str = "", **kwargs):
    """Run the student's function; turn its exceptions into a one-line diagnosis (NotImplementedError,
    the unsolved exercise, passes through)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as err:        # a shape error, ZeroDivisionError, IndexError, TypeError, ...
        problem = err
    text = str(problem)
    if isinstance(problem, RuntimeError) and any(s in text for s in ("size of tensor", "shape", "mat1 and mat2")):
        _fail(f"your function raised a shape error ({text}). {shape_hint}")
    _fail(f"your function raised {type(problem).__name__}: {text}")


# --- predictions -------------------------------------------------------------------------------

PREDICTIONS: dict = {}


def predict(key: str, question: str, choices: dict | None = None, answer=None) -> None:
    """Record a prediction before an experiment runs. choices: {"a": "text", ...} for a multiple
    choice (answer one of its keys), None for a number. answer None prints how to answer."""
    print(f"Predict {key}: {question}")
    for letter, text in (choices or {}).items():
        print(f"  ({letter}) {text}")
    if answer is None:
        print("→ write your prediction as answer=... in this cell and run it again before the experiment")
        return
    if choices and str(answer).strip().lower() not in choices:
        raise ValueError(f"answer with one of {', '.join(choices)}, got {answer!r}")
    PREDICTIONS[key] = str(answer).strip().lower() if choices else answer
    print(f"→ recorded: {PREDICTIONS[key]!r}. Now run the experiment.")


def reveal(key: str, measured, explanation: str, correct=None) -> None:
    """After the experiment: print the prediction (if any), what was measured, and the explanation.
    correct: the right choice (multiple choice) or None when only the number matters."""
    guess = PREDICTIONS.get(key)
    said = "no prediction recorded" if guess is None else f"you predicted {guess!r}"
    verdict = "" if correct is None or guess is None else (" ✓" if guess == correct else f" (answer: {correct!r})")
    print(f"Predict {key}: {said}{verdict}; measured: {measured}")
    print(explanation)


# --- chapter 00 ---------------------------------------------------------------------------------

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


# --- chapter 01: Hebbian memory ---------------------------------------------------------------

def _close(a, b, tol=1e-6) -> bool:
    return torch.is_tensor(a) and a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol)


def _update_rule(fn, name: str, sign: float):
    """Shared diagnosis for W ± lr · v kᵀ exercises (Hebbian: sign=+1, anti-Hebbian: sign=-1)."""
    W = torch.tensor([[1., 0.], [0., 1.], [2., 3.]], dtype=torch.float64)
    W_copy = W.clone()
    k = torch.tensor([1., 2.], dtype=torch.float64)
    v = torch.tensor([0., 2., -1.], dtype=torch.float64)
    got = _call(fn, W, k, v, lr=0.5, shape_hint="v kᵀ must have W's shape (d_v, d_k): use torch.outer(v, k), not torch.outer(k, v) (you computed k vᵀ)")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}: did you forget to return?")
    if not torch.equal(W, W_copy):
        _fail("your function changed W in place; return a new tensor (W + ..., not W += ...)")
    if got.shape == (2, 3):
        _fail("expected shape (3, 2) = (d_v, d_k), got (2, 3): you computed k vᵀ; use torch.outer(v, k)")
    if got.shape != (3, 2):
        _fail(f"expected shape (3, 2) = (d_v, d_k), got {tuple(got.shape)}")
    ref = W + sign * 0.5 * torch.outer(v, k)
    if _close(got, ref):
        return
    if _close(got, W + sign * torch.outer(v, k)):
        _fail("the learning rate is missing: multiply the outer product by lr")
    if _close(got, W - sign * 0.5 * torch.outer(v, k)):
        _fail("wrong sign: " + ("Hebbian learning adds lr · v kᵀ" if sign > 0 else
                                "anti-Hebbian forgetting subtracts lr · v kᵀ"))
    if _close(got, sign * 0.5 * torch.outer(v, k)):
        _fail("you returned only the change; add it to W")
    _fail(f"{name}: values differ from W {'+' if sign > 0 else '−'} lr · v kᵀ")


def hebbian_update(fn):
    """Exercise 1.1: fn(W, k, v, lr) -> W + lr · v kᵀ."""
    _update_rule(fn, "hebbian_update", +1.0)
    _ok("hebbian_update")


def cleanup_recall(fn):
    """Exercise 1.2: fn(v_hat, V) -> index of the row of V most similar (cosine) to v_hat."""
    V = torch.tensor([[10., 0.], [0.6, 0.8], [-1., 0.]], dtype=torch.float64)
    v_hat = torch.tensor([0.5, 0.9], dtype=torch.float64)       # closest in angle to row 1
    got = _call(fn, v_hat, V, shape_hint="v_hat is (d_v,), V is (m, d_v)")
    if torch.is_tensor(got) and got.numel() > 1:
        _fail("return the index of the best row (an int), not a vector")
    got = int(got)
    if got == 0:
        _fail("you picked row 0, the longest vector: compare cosine similarity (normalise both "
              "sides), not the raw dot product")
    if got == 2:
        _fail("you picked the least similar row: use argmax of the similarity, not argmin")
    if got != 1:
        _fail(f"expected index 1, got {got}")
    _ok("cleanup_recall")


def crosstalk(fn):
    """Exercise 1.3: fn(K, V, i) -> Σ_{j≠i} (k_j · k_i) v_j, shape (d_v,)."""
    from engramlib import memory
    K, V = memory.random_keys(5, 8, seed=3), memory.random_keys(5, 4, seed=4)
    got = _call(fn, K, V, 2, shape_hint="K is (n, d_k), V is (n, d_v); the overlaps K @ K[i] are (n,)")
    ref = memory.crosstalk(K, V, 2)
    if torch.is_tensor(got) and got.numel() == 1:
        _fail("return the crosstalk vector (d_v,), not its norm")
    if not torch.is_tensor(got) or got.shape != (4,):
        _fail(f"expected a tensor of shape (d_v,) = (4,), got {getattr(got, 'shape', type(got))}")
    if _close(got, ref + V[2] * (K[2] @ K[2])):
        _fail("you included memory i itself: crosstalk is what the OTHER memories add (j ≠ i)")
    if _close(got, memory.recall(memory.hebbian_store(K, V), K[2])):
        _fail("that is the whole recall W k_i; subtract memory i's own contribution")
    if not _close(got, ref):
        _fail("values differ from Σ_{j≠i} (k_j · k_i) v_j")
    _ok("crosstalk")


# --- chapter 02: anti-Hebbian editing ---------------------------------------------------------

def anti_hebbian_forget(fn):
    """Exercise 2.1: fn(W, k, v, lr) -> W − lr · v kᵀ."""
    _update_rule(fn, "anti_hebbian_forget", -1.0)
    _ok("anti_hebbian_forget")


def least_squares_memory(fn):
    """Exercise 2.2: fn(K, V) -> W (d_v, d_k) minimising Σ ‖W k_i − v_i‖²."""
    from engramlib import memory
    K = memory.correlated_keys(6, 10, rho=0.5, seed=1)
    V = memory.random_keys(6, 4, seed=2)
    got = _call(fn, K, V, shape_hint="K is (n, d_k) and V is (n, d_v); W must be (d_v, d_k)")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}")
    if got.shape == (10, 4):
        _fail("expected shape (d_v, d_k) = (4, 10), got (10, 4): transpose your result")
    if got.shape != (4, 10):
        _fail(f"expected shape (d_v, d_k) = (4, 10), got {tuple(got.shape)}")
    if _close(got, memory.hebbian_store(K, V)):
        _fail("that is the Hebbian memory Vᵀ K: exact only for orthonormal keys; these keys are "
              "correlated. Use the pseudo-inverse: Vᵀ (Kᵀ)⁺")
    if not _close(memory.recall(got, K), V, tol=1e-6):
        _fail("recall W k_i should return v_i exactly for these 6 independent keys")
    _ok("least_squares_memory")


def covariance_edit(fn):
    """Exercise 2.3: fn(W, k_star, v_star, C) -> Ŵ = W + (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)."""
    from engramlib import memory
    K = memory.correlated_keys(6, 8, rho=0.6, seed=5)
    V = memory.random_keys(6, 5, seed=6)
    W = memory.least_squares_memory(K, V)
    C = memory.key_covariance(K) + 1e-3 * torch.eye(8, dtype=K.dtype)
    k_star, v_star = K[0], memory.random_keys(1, 5, seed=7)[0]
    W_copy = W.clone()
    got = _call(fn, W, k_star, v_star, C, shape_hint="the update must have W's shape (d_out, d_in): torch.outer(residual, u), residual first")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}")
    if not torch.equal(W, W_copy):
        _fail("your function changed W in place; return a new matrix")
    if got.shape != W.shape:
        _fail(f"expected shape {tuple(W.shape)} (d_out, d_in), got {tuple(got.shape)}: "
              "the update is torch.outer(residual, u), residual first")
    C_inv = torch.linalg.inv(C)
    if _close(got, memory.rank_one_edit(W, k_star, v_star, C)):
        _fail("you used C where C⁻¹ belongs: u = C⁻¹ k* (torch.linalg.inv(C) @ k_star)")
    if _close(got, memory.naive_edit(W, k_star, v_star)):
        _fail("that is the naive edit (C = I): use u = C⁻¹ k* so the other keys are spared")
    if not _close(got @ k_star, v_star, tol=1e-6):
        _fail("the constraint Ŵ k* = v* does not hold: divide the update by uᵀ k* "
              "(u = C⁻¹ k*), and use the residual v* − W k*")
    if not _close(got, memory.rank_one_edit(W, k_star, v_star, C_inv)):
        _fail("Ŵ k* = v* holds, but Ŵ differs from W + (v* − W k*) uᵀ / (uᵀ k*), u = C⁻¹ k*")
    _ok("covariance_edit")


# --- chapter 06: causal tracing -----------------------------------------------------------------

def subject_token_range(fn, mt=None):
    """Exercise 6.1: fn(tokenizer, prompt, subject) -> (start, end), subject tokens start..end-1."""
    from engramlib.models import load_model
    from engramlib.models import find_subject_range
    mt = mt or load_model("tinyworld", device="cpu")
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
    torch.manual_seed(0)
    embeds = torch.randn(4, 6, 3)
    noise = torch.randn(3, 2, 3)
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


def indirect_effect(fn):
    """Exercise 6.4: fn(result, token, layer) -> scores[token, layer] - low_score."""
    from engramlib.tracing import TraceResult
    r = TraceResult(scores=torch.tensor([[0.1, 0.2], [0.5, 0.9]]), low_score=0.1, high_score=0.95,
                    tokens=["A", "B"], subject_range=(0, 1), answer=" X", kind=None, window=1,
                    noise=1.0)
    got = float(_call(fn, r, 1, 0))
    if abs(got - 0.5) < 1e-6:
        _fail("that is the raw score p(answer) with the state restored; subtract the corrupted "
              "score (low_score): the indirect effect is what the restoration brings BACK")
    if abs(got - 0.45) < 1e-6:
        _fail("you measured high_score - score (what is still missing); use score - low_score")
    if abs(got - 0.4) > 1e-6:
        _fail(f"expected 0.4 for token 1, layer 0, got {got}")
    _ok("indirect_effect")


def restore_one_state(fn, mt=None):
    """Exercise 6.3: fn(mt, prompt, subject, token, layer, noise, samples) -> p(answer) averaged over
    the corrupted copies with block `layer`'s output at `token` restored from the clean run."""
    from engramlib.models import load_model
    from engramlib.tracing import trace_loop
    mt = mt or load_model("tinyworld", device="cpu")
    prompt, subject = "The Space Needle is located in the city of", "Space Needle"
    ref = trace_loop(mt, prompt, subject, samples=4, noise=0.5)
    s, e = ref.subject_range
    for token, layer in [(e - 1, 1), (len(ref.tokens) - 1, mt.n_layers - 2), (s, 0)]:
        got = float(_call(fn, mt, prompt, subject, token, layer, 0.5, 4))
        if abs(got - ref.low_score) < 1e-6 and abs(ref.scores[token, layer] - ref.low_score) > 1e-3:
            _fail(f"(token {token}, layer {layer}): you got the corrupted score {got:.4f}; the "
                  "restoration did not happen (copy row 0's hidden state into rows 1..)")
        if abs(got - ref.scores[token, layer].item()) > 1e-4:
            _fail(f"(token {token}, layer {layer}): got {got:.4f}, expected "
                  f"{ref.scores[token, layer]:.4f}. Use engramlib.tracing's noise draws: "
                  "torch.randn(samples, n_subject_tokens, d, generator=torch.Generator()"
                  ".manual_seed(1)) * noise, added to rows 1.. of the embedding output")
    _ok("restore_one_state")


# --- chapter 07: ROME ----------------------------------------------------------------------------

def key_at_subject(fn, mt=None):
    """Exercise 7.1: fn(mt, text, subject, layer) -> the input of mlp.c_proj at the subject's last
    token, shape (d_mlp,)."""
    from engramlib.hooks import Trace
    from engramlib.models import load_model
    from engramlib.models import find_subject_range
    mt = mt or load_model("tinyworld", device="cpu")
    text, subject, layer = "The Eiffel Tower is located in the city of", "Eiffel Tower", 1
    s, e = find_subject_range(mt.tokenizer, text, subject)
    with torch.no_grad(), Trace(mt.model, mt.spec.mlp_out.format(layer), retain_input=True) as t:
        mt.model(**mt.tokenizer(text, return_tensors="pt").to(mt.device))
    got = _call(fn, mt, text, subject, layer)
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}")
    got = got.detach().float().flatten().to(t.input.device)
    if got.shape[0] == mt.model.config.n_embd:
        _fail(f"got {got.shape[0]} numbers: that is the d_model-sized OUTPUT; the key is the INPUT of "
              f"mlp.c_proj ({t.input.shape[-1]} numbers): Trace(..., retain_input=True) and t.input")
    if got.shape[0] != t.input.shape[-1]:
        _fail(f"expected shape ({t.input.shape[-1]},), got {tuple(got.shape)}")
    if torch.allclose(got, t.input[0, s].float(), atol=1e-5) and s != e - 1:
        _fail("that is the key at the FIRST subject token; ROME reads the LAST one (end - 1)")
    if torch.allclose(got, t.input[0, -1].float(), atol=1e-5):
        _fail("that is the key at the last token of the prompt; ROME reads the last SUBJECT token")
    if not torch.allclose(got, t.input[0, e - 1].float(), atol=1e-5):
        _fail("values differ from the input of mlp.c_proj at the last subject token")
    _ok("key_at_subject")


def v_star_delta(fn, mt=None):
    """Exercise 7.2: fn(mt, prompt, subject, target, layer, steps, lr) -> δ (d_model,) that, added to
    the MLP output of `layer` at the last subject token, makes ' ' + target the likely answer."""
    from engramlib.hooks import Trace
    from engramlib.models import load_model, next_token_probs
    from engramlib.models import find_subject_range
    mt = mt or load_model("tinyworld", device="cpu")
    prompt, subject, target, layer = "Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", 1
    target_id = mt.tokenizer(" " + target)["input_ids"][0]
    before = next_token_probs(mt, [prompt])[0, target_id].item()
    delta = _call(fn, mt, prompt, subject, target, layer, 25, 0.5)
    if not torch.is_tensor(delta) or delta.numel() != mt.model.config.n_embd:
        _fail(f"return δ with {mt.model.config.n_embd} numbers (d_model), got "
              f"{getattr(delta, 'shape', type(delta))}")
    delta = delta.detach().float().flatten().to(mt.device)
    if delta.abs().max() == 0:
        _fail("δ is all zeros: did the optimiser step (opt.zero_grad(); loss.backward(); opt.step())?")
    idx = find_subject_range(mt.tokenizer, prompt, subject)[1] - 1

    def add(h, name):
        h = h.clone()
        h[0, idx] += delta
        return h
    with torch.no_grad(), Trace(mt.model, mt.spec.mlp.format(layer), edit_output=add):
        after = next_token_probs(mt, [prompt])[0, target_id].item()
    if after <= before:
        _fail(f"p({target}) did not rise ({before:.3f} -> {after:.3f}): minimise the NEGATIVE log "
              "probability of the target, and add δ at the last SUBJECT token")
    if after < 0.5:
        _fail(f"p({target}) rose only to {after:.3f}: take more steps or check the loss")
    print(f"  p({target}) {before:.3f} -> {after:.3f} with ‖δ‖ = {delta.norm():.2f}")
    _ok("v_star_delta")


def conv1d_rank_one_edit(fn):
    """Exercise 7.3: fn(W_conv (d_in, d_out), k_star (d_in,), v_star (d_out,), C_inv) -> new W_conv
    with k* W = v* (GPT-2's Conv1D computes y = x W + b, the transpose of chapter 02's layout)."""
    from engramlib import memory
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    K = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    C = K.T @ K / 20
    C_inv = torch.linalg.inv(C)
    k, v = K[0], torch.randn(4, generator=gen, dtype=torch.float64)
    copy = W.clone()
    got = _call(fn, W, k, v, C_inv, shape_hint="W_conv is (d_in, d_out): the update is "
                "torch.outer(u, residual), u = C⁻¹k* first")
    if not torch.equal(W, copy):
        _fail("your function changed W in place; return a new matrix")
    if not torch.is_tensor(got) or got.shape != W.shape:
        _fail(f"expected shape {tuple(W.shape)} (d_in, d_out), got {getattr(got, 'shape', None)}")
    if _close(got, memory.rank_one_edit(W.T, k, v, C).T):
        _fail("you used C where C⁻¹ belongs")
    if _close(got, memory.naive_edit(W.T, k, v).T):
        _fail("that is the naive edit (C = I): use u = C_inv @ k_star")
    if not _close(k @ got, v):
        _fail("k* W_new ≠ v*: in the row layout the current value is k_star @ W, the residual "
              "v* − k* W, and the update torch.outer(u, residual) / (u @ k_star)")
    if not _close(got, memory.rank_one_edit(W.T, k, v, C_inv).T):
        _fail("k* W_new = v* holds, but W_new is not chapter 02's edit transposed")
    _ok("conv1d_rank_one_edit")


# --- chapter 08: evaluating edits -------------------------------------------------------------------

def edit_success(fn):
    """Exercise 8.1: fn(p_new, p_true, kind) -> fraction of prompts where the edit 'succeeds':
    kind "rewrite"/"paraphrase": P(new) > P(true); kind "neighborhood": P(true) > P(new)."""
    p_new, p_true = torch.tensor([0.9, 0.2, 0.6, 0.1]), torch.tensor([0.1, 0.5, 0.3, 0.05])
    for kind, expected in (("rewrite", 0.75), ("paraphrase", 0.75), ("neighborhood", 0.25)):
        got = float(_call(fn, p_new, p_true, kind))
        if kind == "neighborhood" and abs(got - 0.75) < 1e-6:
            _fail("for neighbourhood prompts success is the OPPOSITE: other subjects must keep their "
                  "true object, P(true) > P(new)")
        if abs(got - 3) < 1e-6 or abs(got - 1) < 1e-6 and expected != 1:
            _fail("return a fraction (mean of the successes), not a count")
        if abs(got - expected) > 1e-6:
            _fail(f"kind {kind!r}: expected {expected}, got {got}")
    _ok("edit_success")


def harmonic_score(fn):
    """Exercise 8.2: fn(ES, PS, NS) -> their harmonic mean (0 if any is 0)."""
    got = float(_call(fn, 100.0, 50.0, 100.0))
    if abs(got - 250 / 3) < 1e-6:
        _fail("that is the arithmetic mean; the score is the HARMONIC mean 3 / (1/ES + 1/PS + 1/NS), "
              "which punishes a method that fails on any one of the three")
    if abs(got - 75.0) > 1e-6:
        _fail(f"expected 75.0 for (100, 50, 100), got {got}")
    if float(_call(fn, 100.0, 0.0, 100.0)) != 0.0:
        _fail("a score of 0 on any metric should give S = 0 (avoid dividing by zero)")
    _ok("harmonic_score")


# --- chapters 03-04: grafting ------------------------------------------------------------------------

def _toy_states():
    gen = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    ft = {n: t + torch.randn(t.shape, generator=gen) for n, t in pre.items()}
    mask = {"a": (torch.rand(3, 4, generator=gen) > 0.5).float(), "b": torch.tensor([1., 0, 0, 1, 0])}
    return pre, ft, mask


def graft_formula(fn):
    """Exercise 3.1: fn(pre, ft, mask) -> {name: mask * ft + (1 - mask) * pre}."""
    pre, ft, mask = _toy_states()
    got = _call(fn, pre, ft, mask)
    if not isinstance(got, dict) or set(got) != set(pre):
        _fail("return a dict with the same parameter names as pre")
    ref = {n: mask[n] * ft[n] + (1 - mask[n]) * pre[n] for n in pre}
    swapped = {n: mask[n] * pre[n] + (1 - mask[n]) * ft[n] for n in pre}
    if all(_close(got[n], swapped[n]) for n in pre):
        _fail("pre and ft are swapped: where the mask is 1, take the FINE-TUNED value")
    if all(_close(got[n], mask[n] * ft[n]) for n in pre):
        _fail("outside the mask the parameters must keep their PRETRAINED value, not zero "
              "(that would be the lottery-ticket control)")
    if not all(_close(got[n], ref[n]) for n in pre):
        _fail("values differ from mask * ft + (1 - mask) * pre")
    _ok("graft_formula")


def topk_mask(fn):
    """Exercise 3.2: fn(scores: {name: tensor}, k) -> {name: 0/1 mask}, 1 on the k largest scores
    ranked over ALL tensors together."""
    scores = {"a": torch.tensor([[0.9, 0.1], [0.8, 0.7]]), "b": torch.tensor([0.95, 0.2, 0.3])}
    got = _call(fn, scores, 3)
    if not isinstance(got, dict) or set(got) != set(scores):
        _fail("return a dict with the same names as scores")
    total = sum(float(m.sum()) for m in got.values())
    if total == 6:
        _fail("you kept k entries in EACH tensor: rank all tensors together (torch.cat of the "
              "flattened scores) and keep k in total")
    if total != 3:
        _fail(f"the mask should contain k = 3 ones, it has {total:g}")
    if not (got["b"][0] == 1 and got["a"][0, 0] == 1 and got["a"][1, 0] == 1):
        _fail("the ones should sit on the LARGEST scores (0.95, 0.9, 0.8)")
    _ok("topk_mask")


def lesion_region(fn):
    """Exercise 3.3: fn(state, mask, pre) -> state with the masked entries reset to pre."""
    pre, ft, mask = _toy_states()
    got = _call(fn, ft, mask, pre)
    ref = {n: mask[n] * pre[n] + (1 - mask[n]) * ft[n] for n in pre}
    if all(_close(got[n], ft[n] * (1 - mask[n])) for n in pre):
        _fail("you zeroed the region; this lesion resets it to the PRETRAINED values")
    if all(_close(got[n], mask[n] * ft[n] + (1 - mask[n]) * pre[n]) for n in pre):
        _fail("that is the graft (keep the region, reset the rest); a lesion removes the region")
    if not all(_close(got[n], ref[n]) for n in pre):
        _fail("values differ from mask * pre + (1 - mask) * state")
    _ok("lesion_region")


def freeze_gradients(fn):
    """Exercise 4.1: fn(grads, region) -> grads with 0 wherever region is True (new dict)."""
    gen = torch.Generator().manual_seed(1)
    grads = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    region = {"a": torch.rand(3, 4, generator=gen) > 0.5, "b": torch.tensor([True, False, False, True, False])}
    copy = {n: g.clone() for n, g in grads.items()}
    got = _call(fn, grads, region)
    if all(torch.equal(got[n], copy[n] * region[n]) for n in grads):
        _fail("you kept the gradient INSIDE the region and zeroed it outside: it is the other way "
              "round, the region of skill A must not move")
    if not all(torch.equal(got[n], copy[n] * ~region[n]) for n in grads):
        _fail("expected the gradient with zeros inside the region and unchanged outside")
    _ok("freeze_gradients")


def region_overlap(fn):
    """Exercise 4.2: fn(mask_a, mask_b) -> |A ∩ B| / min(|A|, |B|) over all tensors together."""
    a = {"w": torch.tensor([[1., 1., 0., 0.], [1., 0., 0., 0.]]), "b": torch.tensor([1., 1., 0.])}
    b = {"w": torch.tensor([[1., 0., 1., 1.], [0., 0., 1., 1.]]), "b": torch.tensor([1., 0., 1.])}
    # |A| = 5, |B| = 7, |A ∩ B| = 2, |A ∪ B| = 10
    got = float(_call(fn, a, b))
    if abs(got - 2) < 1e-6:
        _fail("you returned the number of shared entries (2); divide by the smaller region's size")
    if abs(got - 0.2) < 1e-6:
        _fail("that is the Jaccard index |A ∩ B| / |A ∪ B|; this measure divides by min(|A|, |B|), "
              "so a region that lies inside a larger one has overlap 1")
    if abs(got - 2 / 7) < 1e-6:
        _fail("you divided by the LARGER region; divide by min(|A|, |B|)")
    if abs(got - 0.4) > 1e-6:
        _fail(f"expected 2 shared / 5 in the smaller region = 0.4, got {got:.4g}; count over all "
              "tensors together before dividing")
    if abs(float(fn(a, a)) - 1) > 1e-6:
        _fail("a region overlaps itself completely: fn(a, a) should be 1")
    _ok("region_overlap")
