"""Checks for chapter 07: ROME."""
from __future__ import annotations


import torch

from engramlib.checks._common import _letter, _call, _close, _fail, _ok, choice_between


def _tinyworld_cpu(mt):
    """TinyWorld, the model the ROME checks run on (another model is replaced by TinyWorld on the CPU)."""
    from engramlib.models import load_model
    return mt if mt is not None and mt.name == "tinyworld" else load_model("tinyworld", device="cpu")


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


def _loss_case(kl: str, weight_decay: str):
    """Inputs of ROME's loss with known answers: (args, hparams)."""
    from dataclasses import replace
    from engramlib.rome import ROMEHyperParams
    gen = torch.Generator().manual_seed(0)
    target_logp = torch.log_softmax(torch.randn(6, 9, generator=gen, dtype=torch.float64), -1)[:, 0]
    kl_now = torch.log_softmax(torch.randn(2, 9, generator=gen, dtype=torch.float64), -1)
    kl_init = torch.log_softmax(torch.randn(2, 9, generator=gen, dtype=torch.float64), -1)
    delta = torch.randn(5, generator=gen, dtype=torch.float64) * 3
    v_init = torch.randn(5, generator=gen, dtype=torch.float64) * 2
    hparams = replace(ROMEHyperParams(layer=0), kl=kl, weight_decay=weight_decay, v_weight_decay=0.7)
    return (target_logp, kl_now, kl_init, delta, v_init, hparams)


def v_star_loss(fn):
    """Exercise 7.2: fn(target_logp [n], kl_logp_now [m, V], kl_logp_init [m, V], delta, v_init,
    hparams) -> {"nll", "kl", "weight_decay", "loss"}: ROME's loss as `rome.v_star_loss` computes
    it, following hparams.kl and hparams.weight_decay. Checked term by term, in that order."""
    from engramlib import rome
    for kl, decay in (("new||init", "norm"), ("init||new", "squared")):
        args = _loss_case(kl, decay)
        target_logp, now, init, delta, v_init, hp = args
        ref = {k: v.item() for k, v in rome.v_star_loss(*args).items()}
        got = _call(fn, *args)
        if not isinstance(got, dict) or not {"nll", "kl", "weight_decay", "loss"} <= set(got):
            _fail('return a dict with the keys "nll", "kl", "weight_decay" and "loss"'
                  + (f", got the keys {sorted(got)}" if isinstance(got, dict) else f", got {type(got).__name__}"))
        val = {k: float(got[k]) for k in ("nll", "kl", "weight_decay", "loss")}
        near = lambda a, b: abs(a - b) <= 1e-6 * max(1.0, abs(b))
        where = f"with hparams kl={kl!r}, weight_decay={decay!r}"
        # 1. the NLL of the target tokens
        if not near(val["nll"], ref["nll"]):
            if near(val["nll"], -ref["nll"]):
                _fail("nll has the wrong sign: target_logp are LOG-probabilities (≤ 0); the NLL is −mean")
            if near(val["nll"], -target_logp.sum().item()):
                _fail("nll is a sum; the reference takes the MEAN over the target tokens (so the loss does "
                      "not grow with the number of templates)")
            _fail(f"nll: got {val['nll']:.6f}, expected −mean(target_logp) = {ref['nll']:.6f}")
        # 2. the KL term
        if not near(val["kl"], ref["kl"]):
            p_now, p_init = now.exp(), init.exp()
            forward = (p_now * (now - init)).sum(-1)         # KL(new ‖ init) per row
            backward = (p_init * (init - now)).sum(-1)       # KL(init ‖ new) per row
            other = backward if kl == "new||init" else forward
            if near(val["kl"], other.mean().item()):
                _fail(f"kl {where}: that is the other direction. {kl!r} means "
                      + ("KL(P_new ‖ P_init) = Σ p_new (log p_new − log p_init)" if kl == "new||init" else
                         "KL(P_init ‖ P_new) = Σ p_init (log p_init − log p_new)"))
            mine = forward if kl == "new||init" else backward
            if near(val["kl"], mine.sum().item()):
                _fail(f"kl {where}: a sum over the prompts; average over them (batchmean)")
            if near(val["kl"], mine.sum().item() / now.numel()):
                _fail(f"kl {where}: divided by every entry (reduction='mean'); divide by the number of "
                      "prompts only (reduction='batchmean')")
            _fail(f"kl {where}: got {val['kl']:.6f}, expected {ref['kl']:.6f}. Both inputs are "
                  "log-probabilities (log_target=True in torch.nn.functional.kl_div)")
        # 3. the weight decay
        if not near(val["weight_decay"], ref["weight_decay"]):
            n, n0 = delta.norm().item(), v_init.norm().item()
            size = n if decay == "norm" else n ** 2
            options = {"squared": hp.v_weight_decay * n ** 2 / n0 ** 2, "norm": hp.v_weight_decay * n / n0 ** 2}
            if near(val["weight_decay"], options["squared" if decay == "norm" else "norm"]):
                _fail(f"weight_decay {where}: follow hparams.weight_decay: " +
                      ("'norm' uses ‖δ‖, not ‖δ‖² (the reference's choice)" if decay == "norm"
                       else "'squared' uses ‖δ‖²"))
            if near(val["weight_decay"], hp.v_weight_decay * size / n0):
                _fail(f"weight_decay {where}: divide by ‖v₀‖², the SQUARED norm of v_init")
            if near(val["weight_decay"], size / n0 ** 2):
                _fail(f"weight_decay {where}: multiply by hparams.v_weight_decay")
            _fail(f"weight_decay {where}: got {val['weight_decay']:.6f}, expected {ref['weight_decay']:.6f}")
        # 4. the total
        if not near(val["loss"], ref["loss"]):
            if near(val["loss"], ref["nll"] + ref["kl"] + ref["weight_decay"]):
                _fail("loss: the KL term is weighted by hparams.kl_factor (0.0625 in the reference)")
            _fail(f"loss: got {val['loss']:.6f}, expected nll + kl_factor · kl + weight_decay = {ref['loss']:.6f}")
        if torch.is_tensor(got["loss"]) and not got["loss"].dim() == 0:
            _fail(f"loss must be a scalar tensor (the optimiser calls loss.backward()), got shape {tuple(got['loss'].shape)}")
    _ok("v_star_loss")


V_STAR_TEMPLATES = ["{}", "I love it. {}", "Because of this. {}"]
V_STAR_REQUEST = {"prompt": "{} is located in the city of", "subject": "Eiffel Tower",
                  "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}


def v_star_delta(fn, mt=None):
    """Exercise 7.3: fn(mt, request, layer, hparams, templates) -> (δ (d_model,), losses: one float
    per forward pass): ROME's v* optimisation as `rome.compute_v_star` runs it. Checked step by
    step against compute_v_star on the same request (3 templates, 8 steps): the first loss (δ = 0:
    only the NLL), the later losses (the update, the KL and decay terms, the clamp), then δ."""
    from dataclasses import replace
    from engramlib import rome
    mt = _tinyworld_cpu(mt)
    layer = rome.get_hparams(mt).layer
    base = replace(rome.get_hparams(mt), v_num_grad_steps=8)
    runs = [("clamp", replace(base, clamp_norm_factor=0.5)),         # the clamp binds from step 1 on
            ("early stop", replace(base, early_stop_loss=1.5))]      # stops after a few steps
    for name, hp in runs:
        got = _call(fn, mt, V_STAR_REQUEST, layer, hp, V_STAR_TEMPLATES,
                    shape_hint="δ is (d_model,), added to the MLP output at each prompt's last subject token")
        ref = rome.compute_v_star(mt, V_STAR_REQUEST, layer, hp, V_STAR_TEMPLATES)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            _fail(f"return a pair (delta, losses), got {type(got).__name__}")
        delta, losses = got
        d = mt.model.config.n_embd
        if not torch.is_tensor(delta) or delta.numel() != d:
            _fail(f"δ must have d_model = {d} numbers, got {getattr(delta, 'shape', type(delta).__name__)}")
        delta = delta.detach().float().flatten().cpu()
        losses = [float(x) for x in losses]
        want = ref["losses"]
        if not losses:
            _fail("losses is empty: append loss.item() after every forward pass")
        if abs(losses[0] - want[0]) > 1e-3 * max(1, abs(want[0])):
            _fail(f"step 0 (δ = 0, so KL = 0 and decay = 0: the loss is the NLL alone): got {losses[0]:.4f}, "
                  f"expected {want[0]:.4f}. Score every target token after each rewrite prompt "
                  "(the positions where labels != -100, log_softmax, then the label's entry), not the "
                  "\"{subject} is a\" row, and v_init / the KL log-probs from a pass without δ")
        close = lambda a, b: len(a) == len(b) and all(abs(x - y) <= 1e-3 * max(1, abs(y)) for x, y in zip(a, b))
        if not close(losses, want):
            if len(losses) > len(want) and close(losses[:len(want)], want):
                _fail(f"[{name}] you went on after the loss fell below hparams.early_stop_loss "
                      f"({hp.early_stop_loss}): stop there, as the reference does")
            without = lambda **change: rome.compute_v_star(mt, V_STAR_REQUEST, layer, replace(hp, **change),
                                                           V_STAR_TEMPLATES)["losses"]
            if close(losses, without(kl_factor=0.0)):
                _fail(f"[{name}] your losses are those without the KL term: add δ in the \"{{subject}} is "
                      "a\" row too, keep that row's original log-probs from the pass WITHOUT δ, and "
                      "weigh the KL by hparams.kl_factor")
            if close(losses, without(v_weight_decay=0.0)):
                _fail(f"[{name}] your losses are those without the weight decay (hparams.v_weight_decay)")
            if close(losses, without(clamp_norm_factor=1e9)):
                _fail(f"[{name}] δ was never clamped: after every Adam step, scale δ back to norm "
                      "hparams.clamp_norm_factor · ‖v₀‖ if it is longer")
            if abs(len(losses) - len(want)) == 1:
                _fail(f"[{name}] {len(losses)} losses, expected {len(want)}: one per forward pass, "
                      f"hparams.v_num_grad_steps ({hp.v_num_grad_steps}) at most")
            step = next((i for i, (x, y) in enumerate(zip(losses, want)) if abs(x - y) > 1e-3 * max(1, abs(y))),
                        min(len(losses), len(want)))
            _fail(f"[{name}] the losses agree up to step {step - 1} and then differ "
                  f"({[round(x, 4) for x in losses[step:step + 3]]} against {[round(x, 4) for x in want[step:step + 3]]}): "
                  "check the Adam step (lr = hparams.v_lr, gradients zeroed every step), that δ is added "
                  "at each prompt's LAST subject token, and the clamp")
        err = (delta - ref["delta"].float().cpu()).norm() / ref["delta"].norm().clamp(min=1e-12)
        if err > 1e-3:
            _fail(f"[{name}] every loss matches but δ differs (relative error {err:.2e}): after the last "
                  "loss the reference stops without another step, and it clamps δ after every step")
    print("  δ and every loss equal rome.compute_v_star's (a run where the clamp binds, one that stops early)")
    _ok("v_star_delta")


def conv1d_rank_one_edit(fn):
    """Exercise 7.4: fn(W_conv (d_in, d_out), k_star (d_in,), v_star (d_out,), C_inv) -> new W_conv
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


# --- exercise 7.5: find the bug in a ROME update -------------------------------------------------

def colleague_update(W, k_star, k_write, delta, C_inv):
    """A colleague's ROME update, W: (d_out, d_in), with ONE bug (exercise 7.5). It should return
    Ŵ with Ŵ k_write = W k_write + δ, changing W only along C⁻¹k*."""
    u = C_inv @ k_star
    return W + torch.outer(delta, u) / (u @ k_star)


UPDATE_BUG_CHOICES = {
    "a": "the direction: u must be C⁻¹ times k_write, the key that is written, not C⁻¹k*",
    "b": "the side of C⁻¹: it belongs on δ, the change of the value, not on the key",
    "c": "the normaliser: the division is taken at the wrong key",
    "d": "δ: it must be recomputed as the residual at k*, v* − W k*",
}


def _update_case():
    """A small memory where k_write ≠ k*: (W (4, 6), k_star, k_write, delta, C, C_inv), float64."""
    gen = torch.Generator().manual_seed(7)
    K = torch.randn(40, 6, generator=gen, dtype=torch.float64) + 0.5
    C = K.T @ K / len(K)
    k_star = K[:5].mean(0)                                       # averaged over 5 "contexts"
    k_write = K[0]                                               # one of them: the bare prompt's key
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    delta = torch.randn(4, generator=gen, dtype=torch.float64)
    return W, k_star, k_write, delta, C, torch.linalg.inv(C)


def find_update_bug(bug, fixed):
    """Exercise 7.5: bug -> the letter of UPDATE_BUG_CHOICES that explains the colleague's results;
    fixed(W, k_star, k_write, delta, C_inv) -> their update with that one thing corrected, checked on
    a small memory where k_write ≠ k* against `rome.rome_weight_update`."""
    from engramlib.rome import rome_weight_update
    bug = _letter(bug, UPDATE_BUG_CHOICES)
    if bug == "a":
        _fail("the direction is right: u = C⁻¹k* comes from the key averaged over the contexts the edit must "
              "hold in, as in the reference (compute_u). And the colleague's update is exact when k_write = k*, "
              "so the fault lies in a line where the two keys play different roles, and changing u alone "
              "would not make k_write recall v*: try it")
    if bug == "b":
        _fail("C⁻¹ describes the KEYS (d_in numbers: the input of c_proj) and turns the change away from other "
              "subjects' keys; δ is a change of the value (d_out numbers), in another space, where C⁻¹ does "
              "not even fit. The direction in key space is where C⁻¹ belongs")
    if bug == "d":
        _fail("δ is already the residual at the key that is written: v* = v₀ + δ, with v₀ the MLP's output on "
              "the bare prompt, so Ŵ k_write must be W k_write + δ. A residual at k* would ask the averaged "
              "key, not the written one, to recall v*")
    W, k_star, k_write, delta, C, C_inv = _update_case()
    copy = W.clone()
    got = _call(fixed, W, k_star, k_write, delta, C_inv,
                shape_hint="W is (d_out, d_in) = (4, 6), the keys have 6 numbers, δ has 4")
    if not torch.equal(W, copy):
        _fail("your function changed W in place; return a new matrix")
    if not torch.is_tensor(got) or got.shape != W.shape:
        _fail(f"expected a matrix of W's shape {tuple(W.shape)} (d_out, d_in), got {getattr(got, 'shape', type(got).__name__)}")
    got = got.double()
    ref = rome_weight_update(W, k_star, k_write, delta, C_inv)
    if _close(got, ref, 1e-9):
        recall = (colleague_update(W, k_star, k_write, delta, C_inv) @ k_write - W @ k_write - delta).norm() / delta.norm()
        print(f"  k_write now recalls W k_write + δ exactly (the colleague's missed it by {recall:.0%} of ‖δ‖), "
              "and W changes only along C⁻¹k*")
        _ok("find_update_bug")
        return
    if _close(got, colleague_update(W, k_star, k_write, delta, C_inv)):
        _fail("that is the colleague's update unchanged: k_write does not recall W k_write + δ")
    if _close(got, ref - W):
        _fail("you returned only the change ΔW; add it to W")
    recalls = _close(got @ k_write, W @ k_write + delta, 1e-9)
    u_write = C_inv @ k_write
    if _close(got, W + torch.outer(delta, u_write) / (u_write @ k_write)):
        _fail("k_write recalls v* now, but the direction changed to C⁻¹k_write: keep u = C⁻¹k* (the key "
              "averaged over contexts) and fix only the normaliser")
    if _close(got, W + torch.outer(delta, k_star) / (k_star @ k_write)):
        _fail("C⁻¹ is gone: the change runs along k* itself, chapter 02's naive edit, which moves other keys")
    if _close(got, W + torch.outer(delta, C @ k_star) / ((C @ k_star) @ k_write)):
        _fail("you used C where C⁻¹ belongs")
    if not recalls:
        _fail("k_write does not recall W k_write + δ with your update: apply your Ŵ to k_write on paper; the "
              "factor in front of δ must be exactly 1")
    _fail("k_write recalls v*, but your change is not along C⁻¹k* (rome.rome_weight_update's)")


# --- the predictions' answers (ties count for every tied choice) -------------------------------

def answer_7_1(ratio: float) -> set:
    """Predict 7.1's right choice(s) from how many times smaller the median overlap is with C⁻¹k*:
    below 2, 2 to 10, above 10; a ratio of exactly 2 or 10 counts for both neighbouring choices."""
    return choice_between(ratio, (2.0, 10.0), "abc")


def answer_7_2(paraphrase: str, neighbour: str) -> set:
    """Predict 7.2's right choice from the edited model's next word after the paraphrase and after the
    neighbour prompt (c: the paraphrase keeps Paris; a: Rome and Paris; b: Rome for both; d: else)."""
    paraphrase, neighbour = paraphrase.strip(), neighbour.strip()
    if paraphrase == "Paris":
        return {"c"}
    if paraphrase != "Rome":
        return {"d"}
    return {"a"} if neighbour == "Paris" else {"b"} if neighbour == "Rome" else {"d"}
