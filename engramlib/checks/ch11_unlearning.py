"""Checks for chapter 11: forgetting on purpose (NPO, RMU) and the direction attack."""
from __future__ import annotations

import torch

from engramlib.checks._common import _call, _close, _fail, _ok, _tensor


def _toy_batch(seed=0):
    """Logits [3, 5, 7] (float64) and labels [3, 5] with -100 where a position predicts no target."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.full((3, 5), -100)
    labels[0, 2:4] = torch.tensor([1, 5])
    labels[1, 1] = 3
    labels[2, 0:4] = torch.tensor([0, 6, 2, 2])
    return logits, labels


def _retain_batch(seed=1):
    """Retain logits [2, 4, 7] (float64) and labels [2, 4]: rows with 3 and 1 labelled tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.full((2, 4), -100)
    labels[0, 1:4] = torch.tensor([2, 4, 6])
    labels[1, 0] = 1
    return logits, labels


def _npo_forget_part(got, logits, labels, logp, ref_logp, beta):
    """Diagnose the forget term (the student's objective at α = 0) against NPO's formula."""
    from engramlib.unlearn import npo_loss as reference
    want = reference(logp, ref_logp, beta)
    if _close(got, want, 1e-6):
        return
    keep = labels != -100
    if _close(got, reference(logp / keep.sum(1), ref_logp, beta), 1e-6):
        _fail("you averaged the log-probabilities over each row's tokens: NPO uses the sequence "
              "log-probability, their SUM")
    logp_all = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(1)
    if _close(got, reference(logp_all, ref_logp, beta), 1e-6):
        _fail("positions with label -100 were counted: mask them out (they predict no target token)")
    if _close(got, -(2 / beta) * torch.nn.functional.logsigmoid(beta * (logp - ref_logp)).mean(), 1e-6):
        _fail("wrong sign inside σ: NPO rewards a LOWER log π_θ than the reference, σ(−β (log π_θ − log π_ref))")
    if _close(got, want * beta / 2, 1e-6) or _close(got, want / 2, 1e-6):
        _fail("the factor in front is 2/β (it makes the gradient equal gradient ascent's at the start)")
    if _close(got, reference(logp, torch.zeros_like(ref_logp), beta), 1e-6):
        _fail("the reference is missing: subtract ref_logp, the log-probability before unlearning")
    if _close(got, -(2 / beta) * torch.log(torch.sigmoid(-beta * (logp - ref_logp))).sum(), 1e-6):
        _fail("you summed over the rows: take the mean")
    _fail(f"with alpha = 0 (the forget term alone) expected {want.item():.5f}, got {got.item():.5f}: "
          "check the formula −(2/β)·mean log σ(−β Δ)")


def npo_objective(fn):
    """Exercise 11.1: fn(logits, labels, ref_logp, beta, retain_logits, retain_labels, alpha) -> NPO's
    objective, a scalar: −(2/β) mean_i log σ(−β (log π_θ(y_i|x_i) − ref_logp_i)) + α · NLL_retain,
    log π the SUM of row i's labelled tokens' log-probabilities (Zhang et al. 2024) and NLL_retain the
    mean negative log-probability over ALL labelled retain tokens (open-unlearning's retain loss).
    The forget term is checked alone (α = 0), then the retain term from the difference."""
    from engramlib.unlearn import sequence_logp, token_nll
    logits, labels = _toy_batch()
    r_logits, r_labels = _retain_batch()
    logp = sequence_logp(logits, labels).double()
    ref_logp = logp.detach() + torch.tensor([0.7, -0.4, 1.5], dtype=torch.float64)
    beta, alpha = 0.5, 2.0

    def objective(a):
        got = _call(fn, logits.clone(), labels.clone(), ref_logp.clone(), beta, r_logits.clone(),
                    r_labels.clone(), a,
                    shape_hint="logits are [n, T, vocab], labels [n, T]: gather the label's log-probability "
                               "along the last dimension")
        if torch.is_tensor(got) and got.numel() == 3:
            _fail("you returned one loss per row: NPO's loss is their mean (a scalar)")
        return _tensor(got, "the loss", ()).double()

    nll = token_nll(r_logits, r_labels).double()
    forget = objective(0.0)
    if _close(forget, nll, 1e-6):
        _fail("with alpha = 0 your objective is the retain NLL: alpha weights the retain term, not the forget term")
    _npo_forget_part(forget, logits, labels, logp, ref_logp, beta)
    full = objective(alpha)
    if _close(full, forget + alpha * nll, 1e-6):
        _ok("npo_objective")
        return
    if _close(full, forget, 1e-6):
        _fail("the retain term is missing: add alpha times the retain NLL")
    if _close(full, forget - alpha * nll, 1e-6):
        _fail("wrong sign of the retain term: its NLL is to be MINIMISED, add it")
    if _close(full, alpha * forget + nll, 1e-6):
        _fail("alpha weights the retain term, not the forget term")
    r_keep = r_labels != -100
    per_row = (-sequence_logp(r_logits, r_labels).double() / r_keep.sum(1)).mean()
    if _close(full, forget + alpha * per_row, 1e-6):
        _fail("you averaged each retain row over its tokens, then the rows: the retain NLL is the mean "
              "over ALL labelled retain tokens of the batch (what Hugging Face's outputs.loss returns)")
    if _close(full, forget - alpha * sequence_logp(r_logits, r_labels).double().sum(), 1e-6) or \
            _close(full, forget - alpha * sequence_logp(r_logits, r_labels).double().mean(), 1e-6):
        _fail("the retain NLL is a MEAN over the labelled tokens (sequence log-probabilities are for the "
              "forget term only)")
    _fail(f"with alpha = {alpha} expected {(forget + alpha * nll).item():.5f}, got {full.item():.5f}: "
          "check the retain term, the mean NLL of the labelled retain tokens")


def activation_mse(fn):
    """Exercise 11.2: fn(h, target, mask) -> RMU's distance: the squared error averaged over the d
    features, averaged over each row's masked tokens, then over rows. h [n, T, d]; target broadcastable
    to h; mask [n, T] bool."""
    from engramlib.unlearn import activation_mse as reference
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    target = torch.randn(3, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    h_copy = h.clone()
    got = _call(fn, h, target.clone(), mask.clone(),
                shape_hint="h is [n, T, d]; target (d,) broadcasts against it; the mask is [n, T]")
    if not torch.equal(h, h_copy):
        _fail("your function changed h in place: compute a new tensor")
    got = _tensor(got, "the distance (averaged over features, tokens and rows)", ()).double()
    want = reference(h, target, mask)
    if _close(got, want, 1e-9):
        _ok("activation_mse")
        return
    sq = (h - target) ** 2
    if _close(got, sq.mean(), 1e-9):
        _fail("the mask is ignored: padding and positions outside the mask must not count")
    if _close(got, (sq.sum(-1) * mask).sum() / mask.sum() / 1, 1e-9) or \
            _close(got, reference(h, target, mask) * h.shape[-1], 1e-9):
        _fail("you summed over the d features: average them (RMU's MSE is per feature)")
    if _close(got, (sq.mean(-1) * mask).sum() / mask.sum(), 1e-9):
        _fail("you pooled all masked tokens of the batch: average each row over its OWN tokens first, "
              "then average the rows (a long prompt must not weigh more)")
    if _close(got, ((sq.mean(-1) * mask).sum(1) / h.shape[1]).mean(), 1e-9):
        _fail("divide each row's sum by its number of masked tokens, not by the padded length T")
    _fail(f"expected {want.item():.5f}, got {got.item():.5f}")


def project_out(fn):
    """Exercise 11.3: fn(h, direction) -> h without its component along `direction`:
    h − (h · r̂) r̂ with r̂ = direction / ‖direction‖, at every position. h [..., d]; direction (d,)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    r = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)          # ‖r‖ = 5
    h_copy = h.clone()
    got = _call(fn, h, r.clone(), shape_hint="h is [n, T, d] and direction (d,): h @ r̂ is [n, T]; "
                                              "unsqueeze(-1) it before multiplying by r̂")
    if not torch.equal(h, h_copy):
        _fail("your function changed h in place: return a new tensor (the model's activations "
              "must not be overwritten behind autograd's back)")
    got = _tensor(got, "h without the direction, in h's shape", tuple(h.shape)).double()
    r_hat = r / r.norm()
    want = h - (h @ r_hat).unsqueeze(-1) * r_hat
    if _close(got, want, 1e-9):
        _ok("project_out")
        return
    if _close(got, h - (h @ r).unsqueeze(-1) * r, 1e-9):
        _fail("normalise the direction first: with r of norm 5 you removed 25 times its component")
    if _close(got, (h @ r_hat).unsqueeze(-1) * r_hat, 1e-9):
        _fail("you returned the component ALONG the direction; subtract it from h instead")
    if _close(got, h - (h @ r_hat).unsqueeze(-1) * r, 1e-9) or _close(got, h - (h @ r).unsqueeze(-1) * r_hat, 1e-9):
        _fail("use the unit vector r̂ in both places: (h · r̂) r̂")
    left = (got @ r_hat).abs().max().item()
    _fail(f"the result still has a component {left:.3f} along the direction (expected 0)")
