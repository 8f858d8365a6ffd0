"""ROME: Rank-One Model Editing (Meng et al. 2022), following the official algorithm.

A fact (s, r, o) is read by the MLP of one middle layer at the last subject token: its output
matrix W (`mlp.c_proj`) maps a key k (the MLP's hidden activation) to a value v (the MLP output)
that the later layers turn into the object. To make the model say o* instead:

1. k* = `compute_k_star`: the key at the last subject token, averaged over short random prefixes
   (the context templates), so the edit works whatever precedes the subject.
2. v* = `compute_v_star`: the MLP output that makes o* most likely, found by gradient descent on
   an additive change δ of that output (loss = NLL of o* + KL on "{subject} is a" + weight decay).
3. C = `key_covariance`: E[k kᵀ] over generic text, so that C⁻¹ protects the keys of other facts.
4. Ŵ = W + (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*): `engramlib.memory.rank_one_edit`, the same
   function as chapter 02. GPT-2's `Conv1D` stores W transposed (d_in, d_out); `apply_rome_edit`
   handles that (and `nn.Linear` layouts) and returns an `Edit` that can `undo()` bit for bit.

One deliberate simplification: the official code divides by the key of the bare prompt; here v*
is defined as W k* + δ for the averaged key, so the update is exactly `rank_one_edit` (the two
agree when the prompt's key is close to the average).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engramlib.hooks import Trace
from engramlib.memory import rank_one_edit
from engramlib.models import ModelAndTokenizer, generate, next_token_probs
from engramlib.tracing import find_subject_range


@dataclass(frozen=True)
class ROMEHyperParams:
    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    context_lengths: tuple = ((5, 10), (10, 10))   # (tokens, how many) of the context templates
    mom2_n_samples: int = 100000                    # keys used to estimate C
    early_stop_loss: float = 5e-2
    bare_prompt_weight: float | None = None         # k*: weight of the bare prompt (None: uniform)
    source: str = ""                                # where these numbers come from


# The official hparams files of Meng et al. (2022) for GPT-2 medium / large / XL. GPT-2 small has
# none: its layer follows their proportion (about a third of the depth: 8/24, 12/36, 17/48).
# TinyWorld's values come from chapter 05's trace and the sweep in benchmarks/rome_sweep.py.
HPARAMS = {
    "gpt2-xl": ROMEHyperParams(layer=17, clamp_norm_factor=4.0, source="ROME hparams/ROME/gpt2-xl.json"),
    "gpt2-large": ROMEHyperParams(layer=12, clamp_norm_factor=4.0, source="ROME hparams/ROME/gpt2-large.json"),
    "gpt2-medium": ROMEHyperParams(layer=8, clamp_norm_factor=3.0, source="ROME hparams/ROME/gpt2-medium.json"),
    "gpt2": ROMEHyperParams(layer=4, clamp_norm_factor=4.0,
                            source="no official file: layer = a third of 12, as 8/24, 12/36, 17/48"),
}


def set_hparams(name: str, hparams: ROMEHyperParams) -> None:
    """Register hyper-parameters for a model name (e.g. TinyWorld's, chosen from a trace)."""
    HPARAMS[name] = hparams


def get_hparams(mt: ModelAndTokenizer) -> ROMEHyperParams:
    """The hyper-parameters registered for `mt.name`; else a third of the depth, paper defaults."""
    if mt.name in HPARAMS:
        return HPARAMS[mt.name]
    if mt.name == "tinyworld":
        from engramlib.tinyworld import ROME_HPARAMS
        return ROMEHyperParams(**ROME_HPARAMS)
    return ROMEHyperParams(layer=round(mt.n_layers / 3), source="default: a third of the depth")


# --- requests ----------------------------------------------------------------------------------

def check_request(mt: ModelAndTokenizer, request: dict) -> dict:
    """Validate a CounterFact `requested_rewrite` dict; returns it with stripped target strings.

    Needs `prompt` (with one "{}"), `subject`, `target_new{str}`; `target_true{str}` optional."""
    prompt, subject = request.get("prompt", ""), request.get("subject", "")
    if prompt.count("{}") != 1:
        raise ValueError(f"the prompt must contain '{{}}' once where the subject goes, got {prompt!r}")
    if not subject or not subject.strip():
        raise ValueError("empty subject")
    new = request.get("target_new", {}).get("str", "").strip()
    if not new:
        raise ValueError("empty target_new: say what the model should answer")
    true = (request.get("target_true") or {}).get("str", "").strip()
    if true and new == true:
        raise ValueError(f"target_new equals target_true ({new!r}): nothing to edit")
    find_subject_range(mt.tokenizer, prompt.format(subject), subject)   # raises if not found
    return {**request, "target_new": {"str": new}, "target_true": {"str": true} if true else None}


# --- context templates ------------------------------------------------------------------------

_TEMPLATE_CACHE: dict = {}


def clear_caches() -> None:
    """Forget cached context templates (the covariance cache lives on disk: `covariance_path`)."""
    _TEMPLATE_CACHE.clear()


def context_templates(mt: ModelAndTokenizer, lengths=((5, 10), (10, 10)), seed: int = 0) -> list:
    """["{}"] + short texts sampled from the model, each followed by ". {}".

    lengths: (tokens, count) pairs; the paper uses 10 of 5 tokens and 10 of 10 (21 templates).
    Sampled with top-k 5 from the starts "The", "Therefore", "Because", "I", "You" (as the
    official code), braces removed. Cached per (model, lengths, seed): `clear_caches()` resets."""
    key = (mt.name, tuple(map(tuple, lengths)), seed)
    if key not in _TEMPLATE_CACHE:
        starts = ["The", "Therefore", "Because", "I", "You"]
        templates = ["{}"]
        for length, count in lengths:
            for i in range(count):
                text = generate(mt, starts[i % len(starts)], max_new_tokens=length, do_sample=True,
                                top_k=5, seed=seed + 1000 * length + i)
                templates.append(text.replace("{", "").replace("}", "").replace("\n", " ") + ". {}")
        _TEMPLATE_CACHE[key] = templates
    return list(_TEMPLATE_CACHE[key])


# --- k*, C, v* ---------------------------------------------------------------------------------

def _last_subject_index(mt, text: str, subject: str) -> int:
    return find_subject_range(mt.tokenizer, text, subject, occurrence=0)[1] - 1


@torch.no_grad()
def compute_k_star(mt: ModelAndTokenizer, request: dict, layer: int, templates=None,
                   bare_prompt_weight: float | None = None) -> torch.Tensor:
    """k*: the input of `mlp.c_proj` at the subject's last token, averaged over the context
    templates filled with the request's prompt. Returns (d_mlp,) = (4 · d_model,).

    bare_prompt_weight: None averages all templates uniformly (the official code); a number w
    gives the bare template "{}" weight w and the prefixed ones 1 − w together. A prompt that
    starts with its subject tokenizes it differently from a prefixed one (no leading space), so
    its key differs; TinyWorld's edits use w = 0.5 (see benchmarks/rome_sweep.py)."""
    templates = templates or context_templates(mt)
    subject = request["subject"]
    keys = []
    for template in templates:
        text = template.format(request["prompt"]).format(subject)
        idx = _last_subject_index(mt, text, subject)
        with Trace(mt.model, mt.spec.mlp_out.format(layer), retain_input=True,
                   retain_output=False) as t:
            mt.model(**mt.tokenizer(text, return_tensors="pt").to(mt.device))
        keys.append(t.input[0, idx].float())
    keys = torch.stack(keys)
    if bare_prompt_weight is None or len(keys) == 1 or templates[0] != "{}":
        return keys.mean(0)
    return bare_prompt_weight * keys[0] + (1 - bare_prompt_weight) * keys[1:].mean(0)


def covariance_path(mt: ModelAndTokenizer, layer: int, corpus: str, n_samples: int) -> Path:
    """Where `key_covariance` caches C: $ENGRAM_CACHE (default ~/.cache/engramlib)/stats/...
    The key names the model, the layer, the corpus and the number of keys; delete the file to
    recompute."""
    root = Path(os.environ.get("ENGRAM_CACHE", Path.home() / ".cache" / "engramlib"))
    safe = mt.name.replace("/", "_")
    if Path(mt.name).is_dir():      # a local folder: key on its absolute path too
        safe += "-" + hashlib.sha1(str(Path(mt.name).resolve()).encode()).hexdigest()[:8]
    return root / "stats" / f"{safe}_layer{layer}_{corpus}_{n_samples}.pt"


def generic_texts(mt: ModelAndTokenizer, n_texts: int = 2000) -> tuple:
    """(corpus name, texts) to estimate C from. TinyWorld: sentences of its own corpus
    distribution, one text each. GPT-2: Wikipedia paragraphs (wikitext-103 through the `datasets`
    package, as the paper), downloaded once."""
    if mt.name == "tinyworld":
        from engramlib.tinyworld.corpus import generic_sentences
        return "tinyworld-sentences", generic_sentences(n_texts)
    try:
        from datasets import load_dataset
        data = load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    except Exception as err:   # ImportError, or no network
        raise RuntimeError("estimating C for GPT-2 needs Wikipedia text: `pip install datasets` and "
                           f"internet access (got {type(err).__name__}: {err}); or pass texts="
                           ) from err
    texts = [t for t in data["text"] if len(t) > 200][:n_texts]
    return "wikitext103", texts


@torch.no_grad()
def key_covariance(mt: ModelAndTokenizer, layer: int, texts=None, corpus: str | None = None,
                   n_samples: int = 100000, batch_size: int = 32, max_len: int = 128,
                   cache: bool = True, progress: bool = True) -> torch.Tensor:
    """C = E[k kᵀ] of the inputs k of `mlp.c_proj` over the tokens of generic text, float32
    (d_mlp, d_mlp), from at most `n_samples` keys. Cached on disk (see `covariance_path`)."""
    if texts is None:
        corpus, texts = generic_texts(mt)
    corpus = corpus or "custom-" + hashlib.sha1("\n".join(texts).encode()).hexdigest()[:10]
    path = covariance_path(mt, layer, corpus, n_samples)
    if cache and path.exists():
        return torch.load(path, map_location=mt.device)
    module = mt.module(mt.spec.mlp_out, layer)
    d_in = module.weight.shape[0 if _weight_layout(module) == "conv1d" else 1]
    total, count = torch.zeros(d_in, d_in, dtype=torch.float64, device=mt.device), 0
    mt.tokenizer.padding_side = "right"
    for i in tqdm(range(0, len(texts), batch_size), desc=f"key covariance (layer {layer})",
                  disable=not progress):
        enc = mt.tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_len).to(mt.device)
        with Trace(mt.model, mt.spec.mlp_out.format(layer), retain_input=True,
                   retain_output=False) as t:
            mt.model(**enc)
        keys = t.input[enc["attention_mask"].bool()].double()       # (tokens, d_in)
        keys = keys[:n_samples - count]
        total += keys.T @ keys
        count += len(keys)
        if count >= n_samples:
            break
    C = (total / count).float()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(C.cpu(), path)
    return C


def _target_ids(mt, target: str) -> list:
    return mt.tokenizer(" " + target)["input_ids"]


def compute_v_star(mt: ModelAndTokenizer, request: dict, layer: int, hparams: ROMEHyperParams,
                   templates=None, progress: bool = False) -> dict:
    """Optimise δ, added to the MLP output of `layer` at the last subject token, so that every
    context template continues with target_new (official ROME loss: NLL + KL + weight decay).

    Returns {"delta": δ (d_model,), "losses": [...], "v_init_norm": ‖MLP output‖}. v* is then the
    MLP output + δ (see `apply_rome_edit`)."""
    templates = templates or context_templates(mt)
    subject, target = request["subject"], request["target_new"]["str"]
    target_ids = _target_ids(mt, target)
    prefix = mt.tokenizer.decode(target_ids[:-1])
    rewrite = [t.format(request["prompt"]).format(subject) + prefix for t in templates]
    kl_prompts = [f"{subject} is a"]
    prompts = rewrite + kl_prompts
    mt.tokenizer.padding_side = "right"
    enc = mt.tokenizer(prompts, return_tensors="pt", padding=True).to(mt.device)
    lookup = [_last_subject_index(mt, p, subject) for p in prompts]
    lengths = enc["attention_mask"].sum(1).tolist()
    n_t = len(target_ids)
    # labels: the target's tokens, at the positions that predict them (the prompt's last token
    # predicts target token 0, and so on; the prompt ends with target tokens 0..n_t-2)
    labels = torch.full(enc["input_ids"].shape, -100, device=mt.device)
    for i in range(len(rewrite)):
        labels[i, lengths[i] - n_t:lengths[i]] = torch.tensor(target_ids, device=mt.device)

    d_model = mt.model.config.n_embd
    delta = torch.zeros(d_model, device=mt.device, requires_grad=True)
    state = {"v_init": None}

    def add_delta(out, name):
        if state["v_init"] is None:
            state["v_init"] = out[0, lookup[0]].detach().clone()
        out = out.clone()
        for i, idx in enumerate(lookup):
            out[i, idx] = out[i, idx] + delta
        return out

    with torch.no_grad():
        base = mt.model(**enc).logits
        kl_rows = [len(rewrite) + j for j in range(len(kl_prompts))]
        kl_init = torch.log_softmax(base[kl_rows, [lookup[r] for r in kl_rows]].float(), -1)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    losses = []
    mt.model.requires_grad_(False)
    for step in tqdm(range(hparams.v_num_grad_steps), desc="v*", disable=not progress):
        opt.zero_grad()
        with Trace(mt.model, mt.spec.mlp.format(layer), retain_output=False, edit_output=add_delta):
            logits = mt.model(**enc).logits.float()
        logp = torch.log_softmax(logits, -1)
        # labels sit where the model predicts them: position p scores token p + 1 of the text
        lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        nll = -(lp.sum(1) / n_t)[:len(rewrite)].mean()
        kl_now = logp[kl_rows, [lookup[r] for r in kl_rows]]
        kl = torch.nn.functional.kl_div(kl_now, kl_init, log_target=True, reduction="batchmean")
        wd = hparams.v_weight_decay * delta.norm() ** 2 / state["v_init"].norm() ** 2
        loss = nll + hparams.kl_factor * kl + wd
        losses.append(loss.item())
        if loss.item() < hparams.early_stop_loss:
            break
        if step == hparams.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hparams.clamp_norm_factor * state["v_init"].norm()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return {"delta": delta.detach(), "losses": losses, "v_init_norm": state["v_init"].norm().item(),
            "forward_passes": len(losses)}


# --- the edit ------------------------------------------------------------------------------------

def _weight_layout(module) -> str:
    """'conv1d' (GPT-2: weight is (d_in, d_out), y = x W + b) or 'linear' ((d_out, d_in))."""
    return "conv1d" if type(module).__name__ == "Conv1D" else "linear"


@dataclass
class Edit:
    """A rank-one change Ŵ = W + v uᵀ (in (d_out, d_in) layout) applied to one MLP; undoable."""
    mt: ModelAndTokenizer
    layer: int
    u: torch.Tensor             # (d_in,): C⁻¹k* / ((C⁻¹k*)ᵀ k*)
    v: torch.Tensor             # (d_out,): v* − W k*
    request: dict
    prob_before: float          # p(first token of target_new) on the rewrite prompt
    prob_after: float
    k_star: torch.Tensor = None
    v_star: torch.Tensor = None
    losses: list = field(default_factory=list)
    _original: torch.Tensor = None
    applied: bool = True

    def undo(self) -> None:
        """Restore the original weights, bit for bit."""
        if self.applied:
            with torch.no_grad():
                self.mt.module(self.mt.spec.mlp_out, self.layer).weight.copy_(self._original)
            self.applied = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def target_prob(mt: ModelAndTokenizer, request: dict) -> float:
    """p(first token of ' ' + target_new) after the rewrite prompt."""
    prompt = request["prompt"].format(request["subject"])
    return next_token_probs(mt, [prompt])[0, _target_ids(mt, request["target_new"]["str"])[0]].item()


def apply_rome_edit(mt: ModelAndTokenizer, request: dict, hparams: ROMEHyperParams | None = None,
                    C_inv: torch.Tensor | None = None, templates=None,
                    progress: bool = False, require_improvement: bool = True) -> Edit:
    """Edit the model in place so that request["prompt"].format(subject) continues with
    target_new. request: a CounterFact `requested_rewrite` dict. Returns an `Edit` (undo() /
    `with`). Raises ValueError for a bad request, and RuntimeError (weights restored) if
    p(target_new) did not rise, unless require_improvement=False (e.g. random test models)."""
    request = check_request(mt, request)
    hparams = hparams or get_hparams(mt)
    layer = hparams.layer
    module = mt.module(mt.spec.mlp_out, layer)
    if templates is None:
        templates = context_templates(mt, hparams.context_lengths)
    if C_inv is None:
        C_inv = torch.linalg.inv(key_covariance(mt, layer, n_samples=hparams.mom2_n_samples,
                                                progress=progress).double()).float()
    before = target_prob(mt, request)
    k_star = compute_k_star(mt, request, layer, templates, hparams.bare_prompt_weight)
    opt = compute_v_star(mt, request, layer, hparams, templates, progress=progress)
    W = module.weight.detach().float()
    W_out_in = W.T if _weight_layout(module) == "conv1d" else W          # (d_out, d_in)
    v_star = W_out_in @ k_star + opt["delta"]                             # weight part of MLP output
    W_new = rank_one_edit(W_out_in, k_star, v_star, C_inv.to(W.device))
    u = C_inv.to(W.device) @ k_star
    original = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.copy_((W_new.T if _weight_layout(module) == "conv1d" else W_new).to(original.dtype))
    edit = Edit(mt=mt, layer=layer, u=u / (u @ k_star), v=v_star - W_out_in @ k_star,
                request=request, prob_before=before, prob_after=target_prob(mt, request),
                k_star=k_star, v_star=v_star, losses=opt["losses"], _original=original)
    if require_improvement and edit.prob_after <= edit.prob_before:
        edit.undo()
        raise RuntimeError(f"the edit did not raise p({request['target_new']['str']!r}) "
                           f"({edit.prob_before:.4f} -> {edit.prob_after:.4f}); weights restored. "
                           "Try another layer or a larger v_lr / clamp_norm_factor.")
    return edit


def rome_edit(mt: ModelAndTokenizer, request: dict, hparams: ROMEHyperParams | None = None,
              **kwargs) -> Edit:
    """Alias of `apply_rome_edit` (the name the issues and the paper use)."""
    return apply_rome_edit(mt, request, hparams, **kwargs)


# --- baselines for chapter 07 ------------------------------------------------------------------

def apply_ft_edit(mt: ModelAndTokenizer, request: dict, layer: int | None = None, steps: int = 25,
                  lr: float = 5e-4, templates=None) -> Edit:
    """Baseline "FT": fine-tune the whole `mlp.c_proj` weight of one layer with Adam on the
    target's NLL after the rewrite prompt (and its context templates). No covariance, no
    constraint: every key that the layer sees can be affected. Returns an undoable `Edit`
    (its u, v are the top singular pair of the change, for inspection only)."""
    request = check_request(mt, request)
    layer = get_hparams(mt).layer if layer is None else layer
    templates = templates or ["{}"]
    module = mt.module(mt.spec.mlp_out, layer)
    original = module.weight.detach().clone()
    before = target_prob(mt, request)
    subject, target_ids = request["subject"], _target_ids(mt, request["target_new"]["str"])
    texts = [t.format(request["prompt"]).format(subject) for t in templates]
    mt.tokenizer.padding_side = "right"
    enc = mt.tokenizer([t + mt.tokenizer.decode(target_ids) for t in texts], return_tensors="pt",
                       padding=True).to(mt.device)
    lengths = enc["attention_mask"].sum(1)
    n_t = len(target_ids)
    module.weight.requires_grad_(True)
    opt = torch.optim.Adam([module.weight], lr=lr)
    losses = []
    try:
        for _ in range(steps):
            logp = torch.log_softmax(mt.model(**enc).logits.float(), -1)
            nll = 0.0
            for i, length in enumerate(lengths.tolist()):
                pos = torch.arange(length - n_t - 1, length - 1, device=mt.device)
                nll = nll - logp[i, pos, torch.tensor(target_ids, device=mt.device)].mean()
            loss = nll / len(texts)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        module.weight.requires_grad_(False)
    change = (module.weight.detach() - original).float()
    change = change.T if _weight_layout(module) == "conv1d" else change      # (d_out, d_in)
    U, S, Vh = torch.linalg.svd(change, full_matrices=False)
    edit = Edit(mt=mt, layer=layer, u=Vh[0] * S[0], v=U[:, 0], request=request, prob_before=before,
                prob_after=target_prob(mt, request), losses=losses, _original=original)
    return edit
