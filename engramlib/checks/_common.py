"""Shared helpers of the checks (failing, calling the student's function) and predictions.

Instant checks for the exercises: `checks.<exercise>(your_function)`.

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


def _letter(answer, choices) -> str:
    """A multiple-choice answer, normalised (" B" -> "b"): one of `choices`, or a clear failure."""
    answer = str(answer).strip().lower()
    if answer not in choices:
        _fail(f"answer with one of {', '.join(choices)}, got {answer!r}")
    return answer


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

def _tensor(got, what: str, shape: tuple | None = None, transpose_hint: str = ""):
    """The student's result `got` if it is a tensor (of `shape`, when given), else one clear failure.
    what: the name of what should have been returned ("the loss", "ΔW"); transpose_hint: added when
    `got` has the transpose of a 2-d `shape`. A shape of () accepts any single-element tensor."""
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}: did you forget to return {what}?")
    if shape == ():
        if got.numel() != 1:
            _fail(f"expected {what} as a scalar, got shape {tuple(got.shape)}")
        return got.reshape(())
    if shape is not None and tuple(got.shape) != tuple(shape):
        flipped = len(shape) == 2 and tuple(got.shape) == tuple(shape)[::-1]
        _fail(f"expected {what} of shape {tuple(shape)}, got " +
              (f"its transpose{transpose_hint}" if flipped else str(tuple(got.shape))))
    return got


def _close(a, b, tol=1e-6) -> bool:
    return torch.is_tensor(a) and a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol)


def _update_rule(fn, name: str, sign: float):
    """Shared diagnosis for W ± lr · v kᵀ exercises (Hebbian: sign=+1, anti-Hebbian: sign=-1)."""
    W = torch.tensor([[1., 0.], [0., 1.], [2., 3.]], dtype=torch.float64)
    W_copy = W.clone()
    k = torch.tensor([1., 2.], dtype=torch.float64)
    v = torch.tensor([0., 2., -1.], dtype=torch.float64)
    got = _call(fn, W, k, v, lr=0.5, shape_hint="v kᵀ must have W's shape (d_v, d_k), one row per entry of the value; k vᵀ has the transposed shape")
    if not torch.is_tensor(got):
        _fail(f"expected a tensor, got {type(got).__name__}: did you forget to return?")
    if not torch.equal(W, W_copy):
        _fail("your function changed W in place; return a new tensor (W + ..., not W += ...)")
    if got.shape == (2, 3):
        _fail("expected shape (3, 2) = (d_v, d_k), got (2, 3): you computed k vᵀ; the value indexes the rows")
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


def reveal(key: str, measured, explanation: str, correct=None, full_size: tuple | None = None) -> None:
    """After the experiment: print the prediction (if any), what was measured, and the explanation.
    correct: the right choice (multiple choice), a set of them (ties: each tied choice counts), or
    None when only the number matters.
    full_size: for a small (FAST) run, (what the full-size run measured, its right choices): printed
    next to this run's number, and its choices count too, so a small sample never marks wrong what
    the full-size result says."""
    guess = PREDICTIONS.get(key)
    said = "no prediction recorded" if guess is None else f"you predicted {guess!r}"
    as_set = lambda c: set(c) if isinstance(c, (set, frozenset, list, tuple)) else {c}
    right = as_set(correct) | (as_set(full_size[1]) if full_size and correct is not None else set())
    shown = " or ".join(repr(c) for c in sorted(right, key=str))
    verdict = "" if correct is None or guess is None else \
        " (the measurement cannot decide)" if not right else (" ✓" if guess in right else f" (answer: {shown})")
    print(f"Predict {key}: {said}{verdict}; measured: {measured}")
    if full_size:
        print(f"  (a small run; at full size: {full_size[0]})")
    print(explanation)


def band_choices(value: float, bands: dict) -> set:
    """The choices whose closed interval holds `value`: bands {"a": (low, high), ...}. A value on the
    edge shared by two bands counts for both (a tie)."""
    return {choice for choice, (low, high) in bands.items() if low <= value <= high}


def choice_between(value: float, edges, letters, tol: float = 1e-9) -> set:
    """The choices of a binned prediction that `value` falls in: letters[0] below edges[0],
    letters[i] between edges[i-1] and edges[i], letters[-1] above the last edge. A value on an edge
    (within tol) is a tie: both neighbouring choices count as right (`band_choices` with bands
    widened by tol)."""
    if len(letters) != len(edges) + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) + 1} letters, got {len(letters)}")
    bounds = [float("-inf"), *edges, float("inf")]
    return band_choices(value, {letter: (low - tol, high + tol)
                                for letter, low, high in zip(letters, bounds, bounds[1:])})


def decided_choices(value: float, n: int, bands: dict, full: float | None = None, min_n: int = 30) -> set:
    """The right choices of a banded prediction: from the measured `value` when its sample (`n` items)
    is large enough to decide, else from `full`, the full-size measurement the chapter quotes (when
    there is one; a reveal should then print it next to the small sample's value)."""
    return band_choices(value if n >= min_n or full is None else full, bands)
