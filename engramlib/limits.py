"""The limits of localization and of editing (chapter 10): four experiments that qualify the story
of chapters 06-09, each a small function over what the library already has.

1. Localization vs editing (Hase et al. 2023): the causal trace's MLP effect at each layer
   (`trace_effects`) against ROME's rewrite score at each layer (`edit_scores_by_layer`), and how
   much of the edit's success the trace explains beyond the layer alone (`localization_vs_editing`).
2. Ripples (Cohen et al. 2024): from the fact table, the questions an edit (s, r, o → o*) should
   change (`implied` two-hop facts: the edited city's country, the edited country's continent;
   RippleEdits' "Compositionality I") and those it must leave alone (`unchanged`: the subject's other
   relations; RippleEdits' "Relation Specificity") (`ripple_checks`).
3. Honest metrics ("The Mirage of Model Editing", Yang et al. 2025): CounterFact's probability
   comparison and the teacher-forced token accuracy (`teacher_forced_accuracy`) against the answer
   the model generates on its own, to a stop (`generate_answer`), on the rewrite prompt, after a
   distracting prefix and under negation (`honest_metrics`), with the unedited model's own rate of
   ignoring the negation as the baseline (`negation_gap`; Kassner & Schütze 2020).
4. Knowledge neurons revisited (Niu et al. 2024): do the attributed neurons flip the answer when
   silenced or boosted, and what else moves (`neuron_intervention`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import torch

from engramlib import lens, rome
from engramlib.facts import Fact, load_facts
from engramlib.models import ModelAndTokenizer, accuracy, answer_ids, encode_with_targets, target_nll

# --- 1. localization vs editing ---------------------------------------------------------------------

def rewrite_score(p_before: float, p_after: float) -> float:
    """Hase et al. (2023)'s edit success: (p_after − p_before) / (1 − p_before), the share of the
    possible rise in p(target_new) that the edit achieved (1: certain; 0: no change; < 0: fell)."""
    if not 0 <= p_before < 1:
        raise ValueError(f"p_before must be in [0, 1), got {p_before}")
    return (p_after - p_before) / (1 - p_before)


def trace_effects(mt: ModelAndTokenizer, facts, kind: str = "mlp", window: int = 1,
                  samples: int = 10, noise: float | None = None) -> torch.Tensor:
    """The causal trace's indirect effect at the last subject token, per layer: [n_facts, L]
    (restored p(answer) − corrupted p(answer), chapter 06; `fast_trace.trace`)."""
    from engramlib.fast_trace import trace
    from engramlib.tracing import noise_level
    facts = list(facts)
    noise = noise if noise is not None else noise_level(mt, [f.subject for f in facts])
    rows = []
    for f in facts:
        r = trace(mt, f.prompt, f.subject, kind=kind, samples=samples, noise=noise, window=window,
                  answer=f.object)
        rows.append(r.indirect_effects[r.subject_range[1] - 1])
    return torch.stack(rows)


def edit_scores_by_layer(mt: ModelAndTokenizer, requests: list, layers, hparams=None,
                         progress: bool = False) -> torch.Tensor:
    """ROME's rewrite score for every request edited at every layer (edit, measure, undo): [n, len(layers)].
    hparams: the model's ROME settings (default `rome.get_hparams`), with `layer` replaced."""
    from tqdm.auto import tqdm
    hparams = hparams or rome.get_hparams(mt)
    out = torch.zeros(len(requests), len(layers))
    for j, layer in enumerate(layers):
        hp = replace(hparams, layer=layer)
        C_inv = rome.inverse_key_covariance(mt, layer, hp.mom2_n_samples, progress=progress)
        templates = rome.templates_for(mt, hp)
        for i, request in enumerate(tqdm(requests, desc=f"ROME at layer {layer}", disable=not progress)):
            with rome.apply_rome_edit(mt, request, hp, C_inv=C_inv, templates=templates,
                                      require_improvement=False) as edit:
                out[i, j] = rewrite_score(edit.prob_before, edit.prob_after)
    return out


def r_squared(X: torch.Tensor, y: torch.Tensor) -> float:
    """R² of the least-squares fit y ≈ X b + c (an intercept is added). X: [n, p], y: [n]."""
    X = torch.cat([X.double(), torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    y = y.double()
    b = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    residual = ((y - X @ b) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - residual / total) if total > 0 else 0.0


def localization_vs_editing(effects: torch.Tensor, scores: torch.Tensor) -> dict:
    """Hase et al. (2023)'s analysis of one (fact × layer) table. effects, scores: [n_facts, n_layers]
    (the trace effect and the rewrite score at the same layers). Returns
    r2_layer: R² of the rewrite score from the layer alone (one-hot layer);
    r2_trace: from the trace effect alone; r2_both: layer and trace effect together;
    trace_adds: r2_both − r2_layer, what knowing the trace adds to knowing the layer;
    correlation: Pearson r of effect and score over all (fact, layer) pairs;
    best_layer_agrees: share of facts whose best edit layer is their peak trace layer."""
    n, L = scores.shape
    y = scores.flatten()
    layer_onehot = torch.eye(L).repeat(n, 1)[:, 1:]                 # [n·L, L−1] (intercept = layer 0)
    e = effects.flatten()[:, None]
    r2_layer, r2_trace = r_squared(layer_onehot, y), r_squared(e, y)
    r2_both = r_squared(torch.cat([layer_onehot, e], dim=1), y)
    corr = torch.corrcoef(torch.stack([e[:, 0], y]))[0, 1].item() if y.std() > 0 and e.std() > 0 else 0.0
    agrees = (effects.argmax(1) == scores.argmax(1)).float().mean().item()
    return {"r2_layer": r2_layer, "r2_trace": r2_trace, "r2_both": r2_both, "trace_adds": r2_both - r2_layer,
            "correlation": corr, "best_layer_agrees": agrees}


# --- 2. ripples from the fact table -----------------------------------------------------------------

# (edited relation, relation of the object) -> the relation that the subject inherits: if s is in
# city o, s is in o's country. Each rule is true of the real world for every fact it applies to.
TWO_HOP = {("P131", "P17"): "P17",     # a landmark's city -> the landmark's country
           ("P159", "P17"): "P17",     # a company's headquarters city -> the company's country
           ("P17", "P30"): "P30",      # a city's country -> the city's continent
           ("P17", "P37"): "P37"}      # a city's country -> the official language of the city


@dataclass(frozen=True)
class RippleCheck:
    """One question an edit should change (kind "implied") or leave alone ("unchanged")."""
    kind: str
    prompt: str
    before: str          # the right answer before the edit
    after: str           # the right answer after it (equal to `before` for "unchanged")
    relation_id: str     # the relation the question asks


def fact_index(facts=None) -> dict:
    """{subject: {relation_id: object}} of a fact table (default `load_facts()`)."""
    index = {}
    for f in (load_facts() if facts is None else facts):
        index.setdefault(f.subject, {})[f.relation_id] = f.object
    return index


def ripple_checks(request: dict, facts=None) -> list:
    """The `RippleCheck`s an edit request (a CounterFact `requested_rewrite`) implies, from a fact
    table (default the course's): "implied" two-hop facts (`TWO_HOP`) whose answer differs between
    the old and the new object (RippleEdits' "Compositionality I", Cohen et al. 2024), and
    "unchanged" facts: the subject's other relations (their "Relation Specificity")."""
    index = fact_index(facts)
    s, r = request["subject"], request["relation_id"]
    old, new = request["target_true"]["str"], request["target_new"]["str"]
    checks = []
    for (edited, hop), inherited in TWO_HOP.items():
        if edited != r:
            continue
        a, b = index.get(old, {}).get(hop), index.get(new, {}).get(hop)
        if a and b and a != b and inherited not in index.get(s, {}):
            prompt = Fact(s, inherited, a).prompt
            checks.append(RippleCheck("implied", prompt, a, b, inherited))
    for relation, obj in index.get(s, {}).items():
        if relation != r:
            checks.append(RippleCheck("unchanged", Fact(s, relation, obj).prompt, obj, obj, relation))
    return checks


def choose_edits(candidates: list, n: int) -> list:
    """n of the (record, checks the model passes before editing) candidates to edit: half of them those
    with the most "implied" checks (rare on a small model), the rest spread evenly over all candidates."""
    implied_first = sorted(candidates, key=lambda rc: -sum(c.kind == "implied" for c in rc[1]))
    return implied_first[:max(1, n // 2)] + candidates[::max(1, len(candidates) // n)][:n - n // 2]


@torch.no_grad()
def check_answers(mt: ModelAndTokenizer, checks: list, after: bool) -> list:
    """For each check, does the model's top-1 next token start the right answer (`after` or
    `before`, depending on whether the edit is in place)? A list of bools."""
    from engramlib.models import next_token_probs, first_token_id
    if not checks:
        return []
    top1 = next_token_probs(mt, [c.prompt for c in checks]).argmax(-1).tolist()
    return [t == first_token_id(mt, c.after if after else c.before) for t, c in zip(top1, checks)]


# --- 3. honest metrics --------------------------------------------------------------------------------

@torch.no_grad()
def greedy_exact_match(mt: ModelAndTokenizer, prompt: str, target: str) -> bool:
    """Does greedy decoding after `prompt`, for exactly as many tokens as ' ' + target has, produce
    the target's tokens? This is the same test as "the target's every token is the argmax under
    teacher forcing" (`teacher_forced_accuracy` == 1): a mismatch stops it, and until one the fed-back
    tokens are the target's. It still leaks the target's length (it stops where the target ends)."""
    want = answer_ids(mt, target)
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    for token in want:
        nxt = mt.model(input_ids=ids).logits[0, -1].argmax().item()
        if nxt != token:
            return False
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return True


@torch.no_grad()
def teacher_forced_accuracy(mt: ModelAndTokenizer, prompt: str, target: str) -> float:
    """The share of the tokens of ' ' + target that are the model's argmax when the target's earlier
    tokens are fed in (teacher forcing): the token-level accuracy that editing papers report and
    that Yang et al. (2025) criticise, since it leaks both the content and the length of the answer."""
    ids, mask, labels = encode_with_targets(mt, [prompt], [target])
    predicted = mt.model(input_ids=ids, attention_mask=mask).logits[0].argmax(-1)
    keep = labels[0] != -100
    return (predicted[keep] == labels[0][keep]).float().mean().item()


STOP = (".", ",", ";", "\n")                 # a generated answer ends at the first of these


@torch.no_grad()
def generate_answer(mt: ModelAndTokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The model's own answer after `prompt`: greedy decoding, each token fed back, until a token
    that holds a `STOP` character, the end-of-text token or `max_new_tokens`; the decoded text before
    the stop, stripped. The target is never seen, so neither its content nor its length can leak
    (the point of Yang et al. 2025's evaluation "in the wild")."""
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"].to(mt.device)
    new = []
    for _ in range(max_new_tokens):
        nxt = mt.model(input_ids=ids).logits[0, -1].argmax().item()
        if nxt == mt.tokenizer.eos_token_id:
            break
        new.append(nxt)
        if any(c in mt.tokenizer.decode([nxt]) for c in STOP):
            break
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    text = mt.tokenizer.decode(new)
    for c in STOP:
        text = text.split(c)[0]
    return text.strip()


def answer_matches(answer: str, target: str) -> bool:
    """Exact match of a generated answer and a target, ignoring case and a leading 'the'."""
    norm = lambda s: re.sub(r"^the\s+", "", s.strip().lower())
    return norm(answer) == norm(target)


NEGATION = "It is not true that {}"          # wraps a whole prompt (first letter kept as is)


def distracting_prefix(record: dict) -> str | None:
    """A neighbourhood prompt completed with the TRUE object, to put before the rewrite prompt, or
    None without neighbours. The course's own probe: does the edit survive a context that states the
    old object (in the spirit of Kassner & Schütze 2020's misprimed probes)? It is the reverse of
    Hoelscher-Obermaier et al. (2023)'s CounterFact+, which puts the edit statement before the
    *neighbourhood* prompts to catch the edit leaking into them."""
    if not record.get("neighborhood_prompts"):
        return None
    return f"{record['neighborhood_prompts'][0]} {record['requested_rewrite']['target_true']['str']}."


def honest_metrics(mt: ModelAndTokenizer, record: dict) -> dict:
    """One record on the model as it is now, on three kinds of prompt: "plain" (the rewrite prompt),
    "context" (after `distracting_prefix`) and "negated" (`NEGATION`). For each kind:
    "prob": p(new) > p(true) (CounterFact's comparison, teacher-forced);
    "tf_acc": `teacher_forced_accuracy` of the new object (Yang et al. 2025's criticised metric);
    "answer": `generate_answer`; "gen" / "gen_true": that answer is the new / the true object.
    Under negation, "gen" after an edit and "gen_true" before it both count answers that ignore the
    negation: compare the two, not "gen" alone. Returns {kind: {...}}."""
    rw = record["requested_rewrite"]
    plain = rw["prompt"].format(rw["subject"])
    prefix = distracting_prefix(record)
    prompts = {"plain": plain, "negated": NEGATION.format(plain)}
    if prefix:
        prompts["context"] = f"{prefix} {plain}"
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    out = {}
    for kind, p in prompts.items():
        nll = target_nll(mt, [p, p], [new, true])
        answer = generate_answer(mt, p)
        out[kind] = {"prob": bool(nll[0] < nll[1]), "tf_acc": teacher_forced_accuracy(mt, p, new),
                     "answer": answer, "gen": answer_matches(answer, new), "gen_true": answer_matches(answer, true)}
    return out


def negation_gap(before: list, after: list) -> dict:
    """Does an edit ignore negation more than the model's own facts do? before, after: `honest_metrics`
    of the same records before and after their edits. Among the records whose plain prompt answers the
    true object before the edit, the share that still answer it under negation ("baseline"); among those
    whose plain prompt answers the new object after the edit, the share that still answer it under
    negation ("edited"); and "difference" = edited − baseline, the only part an edit is responsible
    for. Each with its count n."""
    base = [b["negated"]["gen_true"] for b in before if b["plain"]["gen_true"]]
    edit = [a["negated"]["gen"] for a in after if a["plain"]["gen"]]
    share = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {"baseline": share(base), "n_baseline": len(base), "edited": share(edit), "n_edited": len(edit),
            "difference": share(edit) - share(base)}


# --- 4. knowledge neurons revisited -----------------------------------------------------------------

@torch.no_grad()
def _p_and_top1(mt, prompt, answer):
    from engramlib.models import next_token_probs, first_token_id
    probs = next_token_probs(mt, [prompt])[0]
    t = first_token_id(mt, answer)
    return probs[t].item(), probs.argmax().item() == t


def neuron_intervention(mt: ModelAndTokenizer, fact: Fact, k: int = 10, factor: float = 2.0,
                        others: list | None = None, seed: int = 0) -> dict:
    """Silence (×0) or boost (× factor) the k neurons with the largest attribution to the fact's
    answer (`lens.knowledge_neurons`, at the last token) and, as a control, k random neurons of the
    same layers. Returns, for "baseline", "silenced", "boosted", "random_silenced": {"p": p(answer),
    "top1": answer still top-1, "others": top-1 accuracy on `others` (facts about other subjects,
    their prompts' last token) under the same intervention}."""
    sites, _ = lens.knowledge_neurons(mt, fact.prompt, fact.object, k=k)
    m = mt.module(mt.spec.mlp_out, 0).weight.shape[0]
    rng = random.Random(seed)
    random_sites = [(layer, rng.randrange(m)) for layer, _ in sites]
    others = list(others or [])

    def measure():
        p, top1 = _p_and_top1(mt, fact.prompt, fact.object)
        # one prompt at a time: position -1 is then every prompt's last token (no padding)
        acc = accuracy(mt, [f.prompt for f in others], [f.object for f in others], batch_size=1) \
            if others else float("nan")
        return {"p": p, "top1": top1, "others": acc}

    out = {"baseline": measure(), "sites": sites}
    for name, chosen, scale in (("silenced", sites, 0.0), ("boosted", sites, factor),
                                ("random_silenced", random_sites, 0.0)):
        with lens.scale_sites(mt, chosen, scale, position=-1):
            out[name] = measure()
    return out

