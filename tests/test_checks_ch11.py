"""Checks of chapter 11 (unlearning): each accepts the reference and diagnoses the mistakes it is
written for."""
import pytest
import torch

from engramlib import checks
from engramlib.unlearn import activation_mse, npo_loss, sequence_logp, token_nll


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def _logp(logits, labels):
    logp = torch.log_softmax(logits, -1)
    return (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(1)


def reference_objective(logits, labels, ref, beta, r_logits, r_labels, alpha):
    return npo_loss(sequence_logp(logits, labels), ref, beta) + alpha * token_nll(r_logits, r_labels)


def with_retain(forget_loss):
    """An objective whose forget term is `forget_loss(logits, labels, ref, beta)`, retain term right."""
    return lambda lo, la, ref, b, rlo, rla, a: forget_loss(lo, la, ref, b) + a * token_nll(rlo, rla)


def test_npo_objective(capsys):
    checks.npo_objective(reference_objective)
    assert "✓" in capsys.readouterr().out
    F = torch.nn.functional

    def per_token_mean(logits, labels, ref, beta):
        return npo_loss(_logp(logits, labels) / (labels != -100).sum(1), ref, beta)

    def unmasked(logits, labels, ref, beta):
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(1)
        return npo_loss(lp, ref, beta)

    npo = checks.npo_objective
    expect(npo, with_retain(per_token_mean), "SUM")
    expect(npo, with_retain(unmasked), "-100")
    expect(npo, with_retain(lambda lo, la, ref, b: -(2 / b) * F.logsigmoid(b * (_logp(lo, la) - ref)).mean()),
           "wrong sign inside")
    expect(npo, with_retain(lambda lo, la, ref, b: -F.logsigmoid(-b * (_logp(lo, la) - ref)).mean()), "2/β")
    expect(npo, with_retain(lambda lo, la, ref, b: npo_loss(_logp(lo, la), torch.zeros_like(ref), b)), "reference")
    expect(npo, lambda lo, la, ref, b, *_: -(2 / b) * F.logsigmoid(-b * (_logp(lo, la) - ref)), "one loss per row")
    expect(npo, with_retain(lambda lo, la, ref, b: -(2 / b) * F.logsigmoid(-b * (_logp(lo, la) - ref)).sum()),
           "summed")
    expect(npo, lambda *args: None, "expected a tensor")
    forget = lambda lo, la, ref, b: npo_loss(_logp(lo, la), ref, b)                       # noqa: E731
    expect(npo, lambda lo, la, ref, b, rlo, rla, a: forget(lo, la, ref, b), "retain term is missing")
    expect(npo, lambda lo, la, ref, b, rlo, rla, a: forget(lo, la, ref, b) - a * token_nll(rlo, rla), "sign")
    expect(npo, lambda lo, la, ref, b, rlo, rla, a: a * forget(lo, la, ref, b) + token_nll(rlo, rla),
           "not the forget term")
    expect(npo, lambda lo, la, ref, b, rlo, rla, a: forget(lo, la, ref, b)
           + a * (-_logp(rlo, rla) / (rla != -100).sum(1)).mean(), "ALL labelled")
    expect(npo, lambda lo, la, ref, b, rlo, rla, a: forget(lo, la, ref, b) - a * _logp(rlo, rla).mean(), "MEAN")


def test_activation_mse(capsys):
    checks.activation_mse(activation_mse)
    assert "✓" in capsys.readouterr().out

    def pooled(h, target, mask):
        return (((h - target) ** 2).mean(-1) * mask).sum() / mask.sum()

    def in_place(h, target, mask):
        h -= target
        return activation_mse(h + target, target, mask)

    expect(checks.activation_mse, lambda h, t, m: ((h - t) ** 2).mean(), "mask is ignored")
    expect(checks.activation_mse, lambda h, t, m: activation_mse(h, t, m) * h.shape[-1], "summed over the d")
    expect(checks.activation_mse, pooled, "OWN tokens")
    expect(checks.activation_mse, lambda h, t, m: ((((h - t) ** 2).mean(-1) * m).sum(1) / h.shape[1]).mean(),
           "padded length")
    expect(checks.activation_mse, in_place, "in place")


def test_project_out(capsys):
    def reference(h, r):
        r = r / r.norm()
        return h - (h @ r).unsqueeze(-1) * r
    checks.project_out(reference)
    assert "✓" in capsys.readouterr().out

    def in_place(h, r):
        r = r / r.norm()
        h -= (h @ r).unsqueeze(-1) * r
        return h

    expect(checks.project_out, lambda h, r: h - (h @ r).unsqueeze(-1) * r, "normalise")
    expect(checks.project_out, lambda h, r: (h @ (r / r.norm())).unsqueeze(-1) * (r / r.norm()), "ALONG")
    expect(checks.project_out, lambda h, r: h - (h @ (r / r.norm())).unsqueeze(-1) * r, "unit vector")
    expect(checks.project_out, in_place, "in place")
    expect(checks.project_out, lambda h, r: h - h @ r, "shape")
