"""Checks for chapters 03-04: grafting."""
from __future__ import annotations

import random

import torch

from engramlib.checks._common import _letter, _call, _close, _fail, _ok, choice_between


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
    """Exercise 3.4: fn(state, mask, pre) -> state with the masked entries reset to pre."""
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
    """Exercise 4.3: fn(mask_a, mask_b) -> |A ∩ B| / min(|A|, |B|) over all tensors together."""
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


# --- exercise 3.3: one step of mask optimisation, on the real model --------------------------------

def _check_batch(mt, task, size=8, seed=0):
    from engramlib import graft as G
    examples = random.Random(seed).sample(task["train"], size)
    enc = mt.tokenizer([p for p, _ in examples], return_tensors="pt", padding=True).to(mt.device)
    labels = torch.tensor([y for _, y in examples], device=mt.device)
    return enc, labels, G.label_token_ids(mt, task["label_words"])


def _mask_loss(mt, pre, ft, gamma, enc, labels, label_ids, reduction="mean"):
    from engramlib import graft as G
    logits = G.label_logits(mt, enc, label_ids, G.graft(pre, ft, gamma))
    return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)


def _relative_gap(a: dict, b: dict, scale: dict) -> float:
    num = sum(float((a[n].detach().double() - b[n].detach().double()).norm() ** 2) for n in b) ** 0.5
    den = sum(float(scale[n].detach().double().norm() ** 2) for n in b) ** 0.5
    return num / max(den, 1e-30)


def mask_step(fn, mt, pre, ft, task):
    """Exercise 3.3: fn(mt, pre, ft, S, enc, labels, label_ids, lr) -> (new S, loss before the step):
    γ = σ(S), graft γ ⊙ θ_ft + (1 − γ) ⊙ θ_pre, cross-entropy of the label logits, S ← S − lr ∂loss/∂S.
    Checked against engramlib.graft on two tensors of the model (mt, pre, ft, task: the chapter's)."""
    movement = {n: float((ft[n] - pre[n]).abs().sum()) for n in pre if n.endswith(".weight") and pre[n].dim() == 2}
    names = sorted(movement, key=movement.get)[-2:]          # the two matrices that moved most
    pre_s, ft_s = {n: pre[n] for n in names}, {n: ft[n] for n in names}
    enc, labels, label_ids = _check_batch(mt, task)
    gen = torch.Generator().manual_seed(0)
    S0 = {n: (6 * torch.rand(pre[n].shape, generator=gen) - 3).to(pre[n].device) for n in names}   # γ in (0.05, 0.95)
    with torch.enable_grad():
        S = {n: s.clone().requires_grad_(True) for n, s in S0.items()}
        loss = _mask_loss(mt, pre_s, ft_s, {n: torch.sigmoid(s) for n, s in S.items()}, enc, labels, label_ids)
        grads = dict(zip(names, torch.autograd.grad(loss, list(S.values()))))
    lr = 1.0 / max(float(g.abs().max()) for g in grads.values())       # the largest step moves S by 1
    ref = {n: S0[n] - lr * grads[n] for n in names}
    step = {n: lr * grads[n] for n in names}
    S_in = {n: s.clone().requires_grad_(True) for n, s in S0.items()}
    try:
        out = _call(fn, mt, pre_s, ft_s, S_in, enc, labels, label_ids, lr,
                    shape_hint="S, pre and ft have the same names and shapes; γ = σ(S) too")
    except AssertionError as err:
        if "does not require grad" in str(err) or "does not have a grad_fn" in str(err):
            _fail("the loss does not depend on S: keep γ = σ(S) differentiable (no rounding to 0/1, no "
                  ".detach(), no torch.no_grad() around the forward pass) and differentiate with respect "
                  "to the tensors of S")
        raise
    if not (isinstance(out, tuple) and len(out) == 2):
        _fail("return a pair (new_S, loss): the updated scores and the loss before the step")
    new_S, got_loss = out
    if not isinstance(new_S, dict) or set(new_S) != set(names):
        _fail("new_S must be a dict with the same names as S")
    if torch.is_tensor(got_loss):
        got_loss = got_loss.item()
    if not isinstance(got_loss, (int, float)):
        _fail(f"the loss should be a number (loss.item()), got {type(got_loss).__name__}")
    # step 1: the loss of the soft graft
    if abs(got_loss - loss.item()) > 2e-5 * max(1.0, abs(loss.item())):
        with torch.no_grad():
            variants = {
                "S itself as the mask": {n: s for n, s in S0.items()},
                "a rounded mask": {n: (torch.sigmoid(s) > 0.5).float() for n, s in S0.items()},
            }
            if abs(got_loss - _mask_loss(mt, ft_s, pre_s, {n: torch.sigmoid(s) for n, s in S0.items()},
                                         enc, labels, label_ids).item()) < 2e-5:
                _fail("pre and ft are swapped in your graft: where γ is 1, take the FINE-TUNED value")
            if abs(got_loss - _mask_loss(mt, pre_s, ft_s, {n: torch.sigmoid(s) for n, s in S0.items()},
                                         enc, labels, label_ids, reduction="sum").item()) < 1e-3:
                _fail("that is the SUM of the batch's losses: use the mean (F.cross_entropy's default), "
                      "so that lr does not depend on the batch size")
            for what, gamma in variants.items():
                if abs(got_loss - _mask_loss(mt, pre_s, ft_s, gamma, enc, labels, label_ids).item()) < 2e-5:
                    _fail(f"your loss is the one of {what}: the mask is γ = σ(S), continuous, so that the "
                          "loss has a gradient with respect to S")
        _fail(f"the loss before the step should be {loss.item():.5f} (cross-entropy of the label logits of "
              f"the model grafted with γ = σ(S)), got {got_loss:.5f}")
    # step 2: the update
    for n, t in new_S.items():
        if not torch.is_tensor(t) or t.shape != S0[n].shape:
            _fail(f"new_S[{n!r}] should be a tensor of S's shape {tuple(S0[n].shape)}")
    same = lambda target: all(torch.allclose(new_S[n].detach(), target[n], rtol=1e-6, atol=1e-7) for n in names)
    if _relative_gap(new_S, ref, step) < 1e-3:
        pass
    elif all(torch.equal(new_S[n].detach(), S0[n]) for n in names):
        _fail("S did not move: subtract lr times the gradient of the loss with respect to S")
    elif _relative_gap(new_S, {n: S0[n] + lr * grads[n] for n in names}, step) < 1e-3:
        _fail("wrong direction: you climbed the loss. A gradient DEScent step subtracts lr · ∂loss/∂S")
    elif same({n: S0[n] - grads[n] for n in names}):
        _fail("the learning rate is missing: S ← S − lr · ∂loss/∂S")
    else:
        _fail("new_S differs from S − lr · ∂loss/∂S (computed with engramlib.graft.graft and label_logits)")
    # step 3: the new scores must be ready for the next step
    if not all(t.is_leaf and t.requires_grad for t in new_S.values()):
        _fail("the new scores must be leaf tensors that require grad, or the next step cannot "
              "differentiate with respect to them: detach them, then requires_grad_()")
    second = _call(fn, mt, pre_s, ft_s, new_S, enc, labels, label_ids, lr)
    if not second[1] < got_loss:
        _fail(f"a second step from your new S did not lower the loss ({got_loss:.4f} → {second[1]:.4f})")
    _ok("mask_step")


# --- exercise 4.2: fine-tuning outside a frozen region ----------------------------------------------

def train_outside(fn, mt, task):
    """Exercise 4.2: fn(mt, task, frozen, steps, lr, batch_size, seed) -> the graftable state after
    plain SGD with the entries where frozen[name] is True kept fixed; the model is changed in place.
    Checked against engramlib.graft.finetune(frozen=...) with the same batches."""
    from engramlib import graft as G
    pre = G.get_state(mt)
    gen = torch.Generator().manual_seed(0)
    frozen = {n: (torch.rand(t.shape, generator=gen) < 0.5).to(t.device) for n, t in pre.items()}
    kwargs = dict(steps=2, lr=0.1, batch_size=8, seed=0)
    try:
        try:
            got = _call(fn, mt, task, frozen, **kwargs)
        except AssertionError as err:
            if "does not require grad" in str(err) or "does not have a grad_fn" in str(err):
                _fail("nothing to differentiate: load_model freezes the model (requires_grad=False). Switch "
                      "requires_grad on for the graftable parameters while you train, and off again after")
            raise
        after = G.get_state(mt)
        still_trainable = [n for n, p in mt.model.named_parameters() if p.requires_grad]
        G.load_state(mt, pre)
        ref = G.finetune(mt, task, frozen=frozen, progress=False, **kwargs)
    finally:
        G.load_state(mt, pre)
        mt.model.requires_grad_(False)
        mt.model.eval()
    moved_in = sum(int((after[n] != pre[n])[frozen[n]].sum()) for n in pre)
    moved_out = sum(int((after[n] != pre[n])[~frozen[n]].sum()) for n in pre)
    if moved_out == 0 and moved_in == 0:
        _fail("the model did not change: update its parameters in place (under torch.no_grad()), or "
              "call the optimiser's step()")
    if moved_out == 0:
        _fail("you froze the complement: frozen[name] is True where the weights must NOT move, and every "
              "other entry trains")
    if moved_in:
        _fail(f"{moved_in:,} frozen entries changed. Zero their gradient after backward() and before the "
              "step, and use plain SGD: momentum or weight decay move a weight even when its gradient is 0")
    if still_trainable:
        _fail("training worked, but the model's parameters still require grad afterwards: switch "
              "requires_grad off again (the rest of the chapter, like load_model, expects a frozen model)")
    if not isinstance(got, dict) or set(got) != set(pre):
        _fail("return the graftable state after training: {name: tensor} for every name in "
              "graft.graftable_names(mt) (graft.get_state(mt) does it)")
    gap = _relative_gap(after, ref, {n: ref[n] - pre[n] for n in pre})
    if gap > 1e-3:
        _fail(f"the region stayed fixed, but the result differs from graft.finetune(frozen=...) (relative "
              f"gap {gap:.2g}): plain SGD with learning rate lr, one step per batch, `steps` batches drawn "
              "in order with rng = random.Random(seed), rng.sample(task['train'], batch_size), and the "
              "cross-entropy of graft.label_logits")
    if _relative_gap(got, ref, {n: ref[n] - pre[n] for n in pre}) > 1e-3:
        _fail("the model is right, but the state you returned is not the model's state after training")
    _ok("train_outside")


# --- exercise 3.5: read a lesion with its control -----------------------------------------------------

MLP0_CHOICES = {"a": "block 0's MLP is where the facts are kept: zeroing it removes them",
                "b": "block 0's MLP is needed for any text: this lesion cannot say where facts are kept",
                "c": "facts are kept everywhere: zeroing any one module removes them",
                "d": "block 0's MLP is not needed for facts: zeroing it costs little"}
HALF_CHOICES = {"a": "the late half keeps no facts",
                "b": "scattered zeros damage every computation, plain text as well as facts: the comparison "
                     "says how damage spreads, not where facts are kept",
                "c": "the facts are kept in the early half"}


def _lesion_reading(facts, text, text_intact):
    """What the location tables (facts recalled, next tokens right in plain text) support."""
    mlp0_general = text["MLP 0"]["contiguous"] < 0.5 * text_intact
    mlp0_costs = facts["MLP 0"]["contiguous"] < 0.5 * facts["MLP 0"]["scattered"]
    mlp0 = "b" if mlp0_general else "a" if mlp0_costs else "d"
    modules = [n for n in facts if n.startswith(("MLP ", "attention ")) and n != "MLP 0"]
    cheap = [n for n in modules if facts[n]["contiguous"] >= 0.8 * facts[n]["scattered"]]
    return mlp0, cheap


def read_lesions(mlp0, late_half, facts, text, text_intact):
    """Exercise 3.5: mlp0 -> a letter of MLP0_CHOICES, late_half -> a letter of HALF_CHOICES, judged
    against the measured tables {region: {"contiguous", "scattered"}} of facts and of the plain-text control."""
    mlp0, late_half = str(mlp0).strip().lower(), str(late_half).strip().lower()
    if mlp0 not in MLP0_CHOICES or late_half not in HALF_CHOICES:
        _fail(f"answer mlp0 with one of {', '.join(MLP0_CHOICES)} and late_half with one of "
              f"{', '.join(HALF_CHOICES)}; got {mlp0!r}, {late_half!r}")
    if text_intact < 0.05:      # e.g. the random-weight test stand-in: the control has nothing to lose
        print(f"✓ read_lesions: this model predicts {text_intact:.0%} of plain text right, so the control "
              "cannot decide here (on a trained model it does)")
        return
    right, cheap = _lesion_reading(facts, text, text_intact)
    f0, t0 = facts["MLP 0"]["contiguous"], text["MLP 0"]["contiguous"]
    if mlp0 != right:
        if mlp0 == "a" and right == "b":
            _fail(f"look at the control: with block 0's MLP zeroed the model also predicts only {t0:.0%} of the "
                  f"next tokens of plain sentences right (intact: {text_intact:.0%}). A lesion that breaks every "
                  "input removes every fact too, wherever the facts are kept")
        if mlp0 == "c" and cheap:
            _fail(f"zeroing {cheap[0]} leaves {facts[cheap[0]]['contiguous']:.0%} of the facts (the same number "
                  "of scattered weights: "
                  f"{facts[cheap[0]]['scattered']:.0%}): most single modules cost little")
        if mlp0 == "d":
            _fail(f"zeroing block 0's MLP leaves {f0:.0%} of the facts, against {facts['MLP 0']['scattered']:.0%} "
                  "for the same number of scattered weights: it is needed")
        _fail(f"the tables support ({right}) {MLP0_CHOICES[right]!r}: compare the lesion's effect on facts "
              f"({f0:.0%}) with its effect on plain text ({t0:.0%} of {text_intact:.0%})")
    late, early = "late half", "early half"
    if late_half == "a":
        _fail(f"zeroing the late half leaves {facts[late]['contiguous']:.0%} of the facts: it did cost some, and "
              "a lesion that costs less than a scattered one does not show that a region holds nothing")
    if late_half == "c" and text[early]["contiguous"] < 0.5 * text_intact:
        _fail(f"zeroing the early half also leaves only {text[early]['contiguous']:.0%} of plain text right: it "
              "breaks the model for every input, so it cannot show where facts are kept")
    if late_half == "b" and text[late]["scattered"] >= 0.8 * text_intact:
        _fail(f"here the scattered lesion left plain text almost intact ({text[late]['scattered']:.0%} of "
              f"{text_intact:.0%}): read the tables again")
    print(f"✓ read_lesions passed: block 0's MLP zeroed leaves {f0:.0%} of the facts and {t0:.0%} of plain text "
          f"(intact {text_intact:.0%})")


# --- the predictions' answers (ties and boundary values count for both neighbouring choices) -------

def answer_3_1(lead, top_movement_at_1pc, acc_ft):
    """Predict 3.1: a if the optimised region never leads by 10 points, else b if top-movement catches
    up (within 5 points of fine-tuned) by 1 %, else c; a lead or a gap exactly on its edge counts for both."""
    out = choice_between(lead, (0.1,), "ax") - {"x"}
    if lead >= 0.1 - 1e-9:
        out |= choice_between(top_movement_at_1pc, (acc_ft - 0.05,), "cb")
    return out


def _stays_or_falls(value, stays_from, falls_to, tol=1e-9):
    """a: at or above `stays_from`; c: at or below `falls_to`; b: in between (or on either edge: a tie)."""
    out = {"a"} if value >= stays_from - tol else set()
    out |= {"c"} if value <= falls_to + tol else set()
    if not out or abs(value - stays_from) <= tol or abs(value - falls_to) <= tol:
        out.add("b")
    return out


def answer_3_2(acc_without, acc_ft, acc_pre):
    """Predict 3.2: the fine-tuned model without the optimised region stays near fine-tuned (a, within 10
    points), falls part of the way (b) or to the pretrained level (c, within 10 points of it)."""
    return _stays_or_falls(acc_without, acc_ft - 0.1, acc_pre + 0.1)


def answer_3_3(contiguous, scattered):
    """Predict 3.3: about the same (a, within 10 points), block 0's MLP costs far more (b), or the
    scattered lesion (c)."""
    return choice_between(contiguous - scattered, (-0.1, 0.1), "bac")


def answer_4_1(before, after):
    """Predict 4.1: tone accuracy falls by at most 5 points (a), 5-30 (b) or more than 30 (c)."""
    return choice_between(before - after, (0.05, 0.3), "abc")


def answer_4_2(grafted, after_b, sequential):
    """Predict 4.2: A as before (a, within 5 points), partly lost (b), or as badly as sequential (c)."""
    return _stays_or_falls(after_b, grafted - 0.05, sequential + 0.05)


def answer_4_3(overlap):
    """Predict 4.3: the share of the first tone region that the second tone run's region holds."""
    return choice_between(overlap, (0.02, 0.4), "abc")


# --- exercise 4.4: design the control of the overlap -------------------------------------------------

CONTROL_CHOICES = {"a": "a random region of the same size",
                   "b": "the tone task once more, with a third order of the examples",
                   "c": "the tone prompts with random labels: the same inputs, format and training, no skill",
                   "d": "the topic task"}


def overlap_control(choice):
    """Exercise 4.4: choice -> the letter of CONTROL_CHOICES that tells a skill's own weights from the
    weights any fine-tuning on these prompts moves."""
    choice = _letter(choice, CONTROL_CHOICES)
    if choice == "a":
        _fail("a random region controls for chance only, and chance (about 1 %) is already far below every "
              "measured overlap: it cannot tell the skill's weights from weights that ANY fine-tuning on these "
              "prompts moves")
    if choice == "b":
        _fail("a third tone run repeats the measurement (it tells how reproducible the region is); it still "
              "learns the skill, so it cannot separate the skill from the training itself")
    if choice == "d":
        _fail("the topic task is a different SKILL, not the absence of one: its overlap mixes what the two "
              "skills share with what any training on these prompts moves, the thing to be separated")
    _ok("overlap_control")
