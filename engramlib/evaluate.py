"""CounterFact metrics (Meng et al. 2022, section 4): did an edit work, generalise, and stay local?

For a record with subject s, true object o and new object o*, each prompt is scored by comparing
P(o*) with P(o), where P(x) = exp(−mean token NLL of " x" after the prompt), as the official code.

- Efficacy Score (ES): % of rewrite prompts with P(o*) > P(o).  Magnitude EM: mean P(o*) − P(o).
- Paraphrase Score (PS): the same on paraphrase prompts.        PM likewise.
- Neighborhood Score (NS): % of *other subjects'* prompts with P(o) > P(o*) (they must keep o).
  NM: mean P(o) − P(o*).
- Score (S): harmonic mean of ES, PS, NS.
- Fluency: n-gram entropy of generations (weighted 2- and 3-gram entropy, as the official code).
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from engramlib.models import ModelAndTokenizer, generate, target_nll


def compare_targets(mt, prompts: list, new: str, true: str) -> dict:
    """P(new) and P(true) (exp of −mean token NLL) for each prompt: {"p_new": [n], "p_true": [n]}."""
    if not prompts:
        return {"p_new": torch.zeros(0), "p_true": torch.zeros(0)}
    both = target_nll(mt, prompts + prompts, [new] * len(prompts) + [true] * len(prompts))
    n = len(prompts)
    return {"p_new": torch.exp(-both[:n]), "p_true": torch.exp(-both[n:])}


def record_metrics(mt: ModelAndTokenizer, record: dict) -> dict:
    """Per-record success rates and magnitudes on rewrite / paraphrase / neighborhood prompts."""
    rw = record["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    groups = {"rewrite": [rw["prompt"].format(rw["subject"])],
              "paraphrase": list(record["paraphrase_prompts"]),
              "neighborhood": list(record["neighborhood_prompts"])}
    out = {}
    for name, prompts in groups.items():
        c = compare_targets(mt, prompts, new, true)
        if name == "neighborhood":
            ok, mag = c["p_true"] > c["p_new"], c["p_true"] - c["p_new"]
        else:
            ok, mag = c["p_new"] > c["p_true"], c["p_new"] - c["p_true"]
        out[name] = ok.float().mean().item() if len(ok) else float("nan")
        out[name + "_magnitude"] = mag.mean().item() if len(mag) else float("nan")
    return out


def ngram_entropy(texts: list, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """Weighted n-gram entropy (bits) of each text's words, averaged over texts. Repetitive,
    degenerate text scores low; the official ROME code uses these n and weights."""
    scores = []
    for text in texts:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        total = 0.0
        for n, w in zip(ns, weights):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            count = sum(grams.values())
            ent = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
            total += w * ent
        scores.append(total / sum(weights))
    return sum(scores) / max(1, len(scores))


def _harmonic(values) -> float:
    values = [v for v in values]
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def summarize(rows: list) -> dict:
    """Aggregate per-record metrics (fractions) into ES/PS/NS, EM/PM/NM (percent) and the score."""
    def mean(key):
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        return 100 * sum(vals) / max(1, len(vals))
    out = {"ES": mean("rewrite"), "PS": mean("paraphrase"), "NS": mean("neighborhood"),
           "EM": mean("rewrite_magnitude"), "PM": mean("paraphrase_magnitude"),
           "NM": mean("neighborhood_magnitude"), "n": len(rows)}
    out["S"] = _harmonic([out["ES"], out["PS"], out["NS"]])
    if rows and "fluency" in rows[0]:
        out["fluency"] = sum(r["fluency"] for r in rows) / len(rows)
    return out


def evaluate_edits(mt: ModelAndTokenizer, records: list, editor, generations: bool = True,
                   max_new_tokens: int = 30, progress: bool = True, pre_rows: list | None = None) -> dict:
    """Apply, measure and undo an edit for every record.

    editor(mt, requested_rewrite) -> an object with `.undo()` (e.g. `rome.apply_rome_edit`).
    pre_rows: the unedited model's rows for the same records (an earlier result's "pre_rows"):
    comparing several editors, the unedited metrics and text are then computed once, not per editor.
    Returns {"pre": summary before editing, "post": summary after, "rows": per-record dicts after,
    "pre_rows": per-record dicts before, "failed": [(case_id, error message)]} (an editor that
    raises counts as a failed edit)."""
    if pre_rows is not None and len(pre_rows) != len(records):
        raise ValueError(f"pre_rows has {len(pre_rows)} rows for {len(records)} records: pass the "
                         "'pre_rows' of an earlier evaluate_edits on the same records")
    before, post_rows, failed = [], [], []
    for i, record in enumerate(tqdm(records, desc="evaluating edits", disable=not progress)):
        prompts = record.get("generation_prompts", [])[:2] if generations else []
        pre = dict(pre_rows[i]) if pre_rows is not None else record_metrics(mt, record)
        if prompts and "fluency" not in pre:
            pre["fluency"] = ngram_entropy([generate(mt, p, max_new_tokens, do_sample=True) for p in prompts])
        try:
            edit = editor(mt, record["requested_rewrite"])
        except (RuntimeError, ValueError) as err:
            failed.append((record["case_id"], str(err)))
            post = {k: (0.0 if k in ("rewrite", "paraphrase") else v) for k, v in pre.items()}
            post_rows.append({**post, "case_id": record["case_id"]})
            before.append(pre)
            continue
        try:
            post = record_metrics(mt, record)
            if prompts:
                post["fluency"] = ngram_entropy([generate(mt, p, max_new_tokens, do_sample=True) for p in prompts])
        finally:
            edit.undo()
        before.append(pre)
        post_rows.append({**post, "case_id": record["case_id"]})
    return {"pre": summarize(before), "post": summarize(post_rows), "rows": post_rows,
            "pre_rows": before, "failed": failed}
