"""Checks of chapter 11 (unlearning): each accepts the reference and diagnoses the mistakes it is
written for."""
import pytest
import torch

from engramlib import checks
from engramlib.unlearn import activation_mse, npo_loss, sequence_logp


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def _logp(logits, labels):
    logp = torch.log_softmax(logits, -1)
    return (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(1)


def test_npo_loss(capsys):
    checks.npo_loss(lambda logits, labels, ref, beta: npo_loss(sequence_logp(logits, labels), ref, beta))
    assert "✓" in capsys.readouterr().out
    F = torch.nn.functional

    def per_token_mean(logits, labels, ref, beta):
        return npo_loss(_logp(logits, labels) / (labels != -100).sum(1), ref, beta)

    def unmasked(logits, labels, ref, beta):
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(1)
        return npo_loss(lp, ref, beta)

    expect(checks.npo_loss, per_token_mean, "SUM")
    expect(checks.npo_loss, unmasked, "-100")
    expect(checks.npo_loss, lambda lo, la, ref, b: -(2 / b) * F.logsigmoid(b * (_logp(lo, la) - ref)).mean(),
           "wrong sign")
    expect(checks.npo_loss, lambda lo, la, ref, b: -F.logsigmoid(-b * (_logp(lo, la) - ref)).mean(), "2/β")
    expect(checks.npo_loss, lambda lo, la, ref, b: npo_loss(_logp(lo, la), torch.zeros_like(ref), b), "reference")
    expect(checks.npo_loss, lambda lo, la, ref, b: -(2 / b) * F.logsigmoid(-b * (_logp(lo, la) - ref)), "one loss per row")
    expect(checks.npo_loss, lambda lo, la, ref, b: -(2 / b) * F.logsigmoid(-b * (_logp(lo, la) - ref)).sum(), "summed")
    expect(checks.npo_loss, lambda lo, la, ref, b: None, "expected a tensor")


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
