"""MEMIT: many facts at once, over several layers (Meng et al. 2023), and sequential editing.

ROME (chapter 07) writes one fact into one MLP. MEMIT writes n facts at once and spreads them over
the critical layers l₁ < ... < l_m (GPT-2 XL: 13-17), as the reference code (kmeng01/memit,
memit_main.py) computes it:

1. z_i = `compute_z`: for each request, the residual stream after the *last* critical layer at the
   last subject token that makes target_new likely. It is ROME's v* optimisation
   (`rome.compute_v_star(..., v_init_at="block")`): z_i = h_i + δ_i, with h_i the block output.
2. For each layer l, lowest first: the requests' keys K_l (n, d_mlp) (`rome.compute_k_star`, the
   bare prompt weighing ½ as the reference's compute_ks), the state H (n, d_model) after the last
   critical layer *with the lower layers already edited*, the residual R = (Z − H) / (layers left),
   and ΔW_l = Rᵀ K_l (λ C_l + K_lᵀ K_l)⁻¹ (`memit_weight_update`). This is chapter 02's least-squares
   memory: the normal equations of  min λ·tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖²,  where λC stands for
   the keys the layer already stores (C = E[k kᵀ], `rome.key_covariance`, cached on disk).
3. `apply_memit` returns a `MassEdit` that remembers every touched layer's weight: `undo()` / `with`.

Sequential editing (Gupta et al. 2024; Fang et al. 2025): `edit_sequentially` edits requests in
batches, one batch after another on the model the earlier batches left: ROME (one at a time),
MEMIT, or AlphaEdit, which projects every update onto the null space P of the preserved keys
(`nullspace_projection`: the eigenvectors of C whose eigenvalue is below a threshold) and also
weighs the keys of earlier batches (`alphaedit_weight_update`, as jianghoucheng/AlphaEdit computes
it). `collapse_dashboard` measures, every k edits, what the model still knows and how well it still
writes (perplexity), and flags a "disabling edit" (Gupta et al. 2024): one step that makes the
perplexity jump.

As in `rome.py`, defaults reproduce the reference code; `HPARAMS` says where each number comes from.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engramlib import rome
from engramlib.hooks import Trace
from engramlib.models import (
    ModelAndTokenizer,
    accuracy,
    find_subject_range,
    first_token_id,
    known_facts,
    next_token_probs,
    target_nll,
)

METHODS = ("rome", "memit", "alphaedit")
MEMIT_TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class MEMITHyperParams:
    """MEMIT's settings (and AlphaEdit's two extra ones). Defaults: the reference code's values for
    GPT-2 XL (kmeng01/memit hparams/MEMIT/gpt2-xl.json; AlphaEdit hparams/AlphaEdit/gpt2-xl.json)."""
    layers: tuple                                   # the critical layers, lowest first
    mom2_update_weight: float = 20000.0             # λ: how much the keys already stored (λC) weigh
    clamp_norm_factor: float = 0.75                 # ‖δ‖ ≤ clamp · ‖h‖ (h: the residual stream)
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    context_lengths: tuple = ((10, 5),)             # 5 templates of 10 tokens (memit_main.py)
    template_starts: tuple = MEMIT_TEMPLATE_STARTS  # sampling starts from these words, in turn
    bare_prompt_weight: float = 0.5                 # compute_ks: mean over ["{}"] and the templates
    mom2_n_samples: int = 100000                    # texts C is estimated from (keys for TinyWorld: rome.KEY_COUNTED_CORPORA)
    weight_decay: str = "norm"                      # as ROMEHyperParams: ‖δ‖ (reference) or ‖δ‖²
    kl: str = "new||init"                           # as ROMEHyperParams
    nullspace_threshold: float = 2e-2               # AlphaEdit: eigenvalues of C below it span P
    alphaedit_l2: float = 10.0                      # AlphaEdit's "L2": the ridge α in its update
    source: str = ""                                # where these numbers come from

    def __post_init__(self):
        layers = tuple(int(layer) for layer in self.layers)
        if not layers:
            raise ValueError("MEMIT needs at least one layer, e.g. layers=(13, 14, 15, 16, 17)")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be distinct and increasing (lowest first), got {layers}")
        object.__setattr__(self, "layers", layers)
        self.z_hparams()                            # validates weight_decay and kl

    def z_hparams(self) -> rome.ROMEHyperParams:
        """The ROME settings that compute z: ROME's v* at the last layer with MEMIT's numbers."""
        return rome.ROMEHyperParams(
            layer=self.layers[-1], v_num_grad_steps=self.v_num_grad_steps, v_lr=self.v_lr,
            v_weight_decay=self.v_weight_decay, kl_factor=self.kl_factor,
            clamp_norm_factor=self.clamp_norm_factor, context_lengths=self.context_lengths,
            template_starts=self.template_starts, mom2_n_samples=self.mom2_n_samples,
            early_stop_loss=self.early_stop_loss, weight_decay=self.weight_decay, kl=self.kl,
            bare_prompt_weight=self.bare_prompt_weight, source=f"MEMIT's z: {self.source}")


HPARAMS = {
    "gpt2-xl": MEMITHyperParams(
        layers=(13, 14, 15, 16, 17), mom2_update_weight=20000, clamp_norm_factor=0.75,
        source="kmeng01/memit hparams/MEMIT/gpt2-xl.json; AlphaEdit's two from "
               "jianghoucheng/AlphaEdit hparams/AlphaEdit/gpt2-xl.json"),
    # GPT-J is not a GPT-2 model (load_model refuses it): the numbers are here for reference.
    "EleutherAI/gpt-j-6B": MEMITHyperParams(
        layers=(3, 4, 5, 6, 7, 8), mom2_update_weight=15000, clamp_norm_factor=0.75,
        v_num_grad_steps=25,
        source="kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json; AlphaEdit's two from "
               "jianghoucheng/AlphaEdit hparams/AlphaEdit/EleutherAI_gpt-j-6B.json"),
    "tinyworld": None,      # below, with the measurements behind it
}
# TinyWorld. Layers from its causal trace (chapter 06; 40 facts, MLP effect at the last subject
# token): with window 3, 0.53 at layers 0 and 1 and 0.13 at layer 2 (window 1: 0.53, 0.06, 0.04).
# Rule: the layers whose window-3 effect is at least half its peak, 0 and 1, as GPT-2 XL's 13-17 are
# the window that ends at ROME's layer. Two deviations from the reference, measured with one batch of
# 100 records over all 11 relations (`python benchmarks/mass_editing.py sweep`, 2026-11-29):
#   layers   λ      clamp    ES     PS     NS     S
#   0,1      20000  0.75     0.0    1.0  100.0    0.0    the reference's λ and clamp
#   0,1      1000   0.75    71.0   55.0   99.5   70.9
#   0,1      10     0.75    95.0   81.5   96.2   90.4    (λ 1 and 10 alike, 100: S 89.1)
#   0,1      10     1.0     99.0   92.0   94.1   94.9    registered
#   0,1      10     1.5    100.0   91.5   84.9   91.7
#   0        10     0.75    94.0   88.5   97.8   93.3
#   0        10     1.0    100.0   90.5   96.1   95.4    one layer: as good, within a record or two
#   0,1,2    10     0.75    91.0   74.5   97.7   86.6
#   1 / 1,2  10     0.75    90.0 / 88.0   57.0 / 53.5   92.6 / 96.6
# λ: TinyWorld's subject keys have kᵀC⁻¹k ≈ 1,300-3,400, so λ = 20000 lets a layer write about a
# tenth of its residual (a single key gets kᵀC⁻¹k / (λ + kᵀC⁻¹k) of it: `memit_weight_update`).
# clamp: at 0.75 ‖h‖, 80 of the 100 z end at the clamp (65 at 1.0); 1.0 meets the ES ≥ 95
# and PS ≥ 85; 1.5 costs 9 points of NS. The bare prompt's weight in k stays the reference's ½
# (¾: ES +1, PS −15).
# AlphaEdit keeps the reference's threshold 2e-2 (P spans 725 of 1,024 directions at layer 0, 853
# at layer 1) but not its α = 10: one key writes ‖Pk‖² / (‖Pk‖² + α) of its residual, and TinyWorld's
# ‖Pk‖² is only about 11 (layer 0) and 5 (layer 1). Measured (`mass_editing.py alphaedit-sweep`):
#   one batch of 100, z as above     α 10: ES 39.0 PS 27.0 NS 99.5    α 1: ES 99.0 PS 83.5 NS 91.6
#   50 in sequence, batches of 10    α 0.1: ES 98 PS 91 NS 94 (S 94.2)    α 1: ES 98 PS 86 NS 98 (S 93.6)
HPARAMS["tinyworld"] = MEMITHyperParams(
    layers=(0, 1), mom2_update_weight=10.0, clamp_norm_factor=1.0, alphaedit_l2=1.0,
    source="TinyWorld: layers 0-1 from its causal trace; λ, clamp and AlphaEdit's α measured (memit.py)")


def set_hparams(name: str, hparams: MEMITHyperParams) -> None:
    """Register MEMIT hyper-parameters for a model name."""
    HPARAMS[name] = hparams


def get_hparams(mt: ModelAndTokenizer) -> MEMITHyperParams:
    """The hyper-parameters registered for `mt.name`; else the five layers that end at ROME's
    layer (as GPT-2 XL's 13-17 end at ROME's 17), with the reference's other values."""
    if HPARAMS.get(mt.name) is not None:
        return HPARAMS[mt.name]
    top = rome.get_hparams(mt).layer
    return MEMITHyperParams(layers=tuple(range(max(0, top - 4), top + 1)),
                            source=f"default: the five layers ending at ROME's layer {top}")


# --- requests and layers -------------------------------------------------------------------------

def check_requests(mt: ModelAndTokenizer, requests, batch: bool = True) -> list:
    """Validate a list of CounterFact `requested_rewrite` dicts (`rome.check_request` each).
    batch=True (one MEMIT batch): the same prompt and subject may not ask for two targets."""
    if isinstance(requests, dict):
        raise TypeError("pass a list of requests (one dict per fact), e.g. [request]")
    requests = [rome.check_request(mt, r) for r in requests]
    if not requests:
        raise ValueError("no requests: pass a non-empty list of CounterFact requested_rewrite dicts")
    if batch:
        seen = {}
        for r in requests:
            key = r["prompt"].format(r["subject"])
            if seen.setdefault(key, r["target_new"]["str"]) != r["target_new"]["str"]:
                raise ValueError(f"conflicting requests for {key!r}: {seen[key]!r} and "
                                 f"{r['target_new']['str']!r}; edit them in different batches")
    return requests


def check_layers(mt: ModelAndTokenizer, layers) -> tuple:
    """The layers, checked against the model's depth (ValueError names the valid range)."""
    for layer in layers:
        mt.module(mt.spec.mlp_out, layer)
    return tuple(layers)


def layer_covariances(mt: ModelAndTokenizer, layers, n_samples: int = 100000,
                      progress: bool = True) -> dict:
    """{layer: C = E[k kᵀ]} of each layer's keys (`rome.key_covariance`: the reference's published
    statistics where they exist, e.g. GPT-2 XL's layers 13-17, else the model's generic text, cached
    on disk: `rome.covariance_path`). Each C: (d_mlp, d_mlp) float32. Fetch them all before
    editing: the cache is keyed by the weights, and an edit changes them."""
    return {layer: rome.key_covariance(mt, layer, n_samples=n_samples, progress=progress)
            for layer in check_layers(mt, layers)}


def layer_covariance(mt: ModelAndTokenizer, layer: int, n_samples: int = 100000,
                     progress: bool = True) -> torch.Tensor:
    """C for one layer (see `layer_covariances`)."""
    return layer_covariances(mt, [layer], n_samples, progress)[layer]


def _subject_last(mt, text: str, subject: str) -> int:
    return find_subject_range(mt.tokenizer, text, subject, occurrence=0)[1] - 1


def target_probs(mt: ModelAndTokenizer, requests: list) -> list:
    """p(first token of target_new) after each request's rewrite prompt, in one batch."""
    probs = next_token_probs(mt, [r["prompt"].format(r["subject"]) for r in requests])
    ids = [first_token_id(mt, r["target_new"]["str"]) for r in requests]
    return probs[torch.arange(len(ids)), ids].tolist()


# --- z, keys, and the state after the last layer ---------------------------------------------------

def compute_z(mt: ModelAndTokenizer, request: dict, hparams: MEMITHyperParams, templates=None,
              progress: bool = False) -> dict:
    """MEMIT's z: the residual stream after layer hparams.layers[-1] at the last subject token that
    makes target_new likely. ROME's v* optimisation there, with v₀ = the block output h (so the
    clamp is clamp_norm_factor · ‖h‖). Returns rome.compute_v_star's dict plus "z" = h + δ (d_model,)."""
    hp = hparams.z_hparams()
    templates = templates or rome.templates_for(mt, hp)
    out = rome.compute_v_star(mt, request, hp.layer, hp, templates, progress=progress, v_init_at="block")
    return {**out, "z": out["v_init"] + out["delta"]}


def compute_keys(mt: ModelAndTokenizer, requests: list, layer: int, templates: list,
                 bare_prompt_weight: float | None = 0.5) -> torch.Tensor:
    """The requests' keys at `layer` (`rome.compute_k_star`, one per request): (n, d_mlp)."""
    return torch.stack([rome.compute_k_star(mt, r, layer, templates, bare_prompt_weight)
                        for r in requests])


@torch.no_grad()
def block_outputs(mt: ModelAndTokenizer, requests: list, layer: int) -> torch.Tensor:
    """The residual stream after block `layer` at each rewrite prompt's last subject token:
    (n, d_model), one batched forward pass that stops at that block."""
    texts = [r["prompt"].format(r["subject"]) for r in requests]
    idx = torch.tensor([_subject_last(mt, x, r["subject"]) for x, r in zip(texts, requests)])
    enc = mt.tokenizer(texts, return_tensors="pt", padding=True).to(mt.device)
    with Trace(mt.model, mt.spec.layer.format(layer), stop=True) as t:
        mt.model(**enc)
    return t.output[torch.arange(len(texts)), idx].float()


# --- the updates (pure functions) -------------------------------------------------------------------

def memit_weight_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW = Rᵀ K (λC + KᵀK)⁻¹: the ΔW that minimises λ·tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖², whose
    normal equations are ΔW (λC + KᵀK) = Rᵀ K (Meng et al. 2023, section 4.3). Computed in float64.

    K: (n, d_in) the new keys   R: (n, d_out) what each key should add   C: (d_in, d_in)
    Returns (d_out, d_in), float32. With one key, ΔW = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k): ROME's direction;
    with λ → 0 and C = I, chapter 02's least-squares memory Rᵀ (Kᵀ)⁺."""
    K, R, C = K.double(), R.double(), C.double().to(K.device)
    A = lam * C + K.T @ K
    return (R.T @ torch.linalg.solve(A, K.T).T).float()


def nullspace_projection(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀ U₀ᵀ over the eigenvectors of C whose eigenvalue is below `threshold` (AlphaEdit,
    Fang et al. 2025; the reference's get_project takes the SVD of C, which for a symmetric
    C ⪰ 0 is its eigendecomposition). P k ≈ 0 for the keys C was estimated from: an update ΔW P
    leaves their outputs alone. C: (d, d) -> P: (d, d) float32."""
    eigenvalues, U = torch.linalg.eigh(C.double())
    U0 = U[:, eigenvalues < threshold]
    return (U0 @ U0.T).float()


def alphaedit_weight_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor,
                            K_prev_cov: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's update, as the reference computes it (AlphaEdit_main.py, in (d_in, d_out) layout):
        ΔWᵀ = (P (KᵀK + K_pᵀK_p) + α I)⁻¹ P Kᵀ R,
    i.e. ΔW = Rᵀ K (P M + α I)⁻¹ P with M = KᵀK + K_pᵀK_p: ΔW = ΔW P, so ΔW k₀ = 0 wherever P k₀ = 0.

    K: (n, d_in)   R: (n, d_out)   P: (d_in, d_in) from `nullspace_projection`
    K_prev_cov: (d_in, d_in) Σ k kᵀ over the keys of earlier edits (zeros at first)   l2: α
    Returns (d_out, d_in), float32 (computed in float64)."""
    K, R = K.double(), R.double()
    P, Kp = P.double().to(K.device), K_prev_cov.double().to(K.device)
    A = P @ (K.T @ K + Kp) + l2 * torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
    return torch.linalg.solve(A, P @ K.T @ R).T.float()


# --- the edit ------------------------------------------------------------------------------------

@dataclass(repr=False)
class MassEdit(rome.Undoable):
    """Many facts written into several MLPs at once (MEMIT or AlphaEdit); undo() restores every
    touched weight bit for bit. Per layer: the keys K (n, d_in), the residuals R (n, d_out) that
    layer was asked to add, and ΔW (d_out, d_in)."""
    mt: ModelAndTokenizer
    requests: list
    layers: tuple
    method: str
    original_weights: dict          # {layer: weight before the edit, as stored (Conv1D: (d_in, d_out))}
    deltas: dict = field(default_factory=dict)      # {layer: ΔW (d_out, d_in)}
    keys: dict = field(default_factory=dict)        # {layer: K (n, d_in)}
    residuals: dict = field(default_factory=dict)   # {layer: R (n, d_out)}
    zs: torch.Tensor = None         # (n, d_model): the targets after the last layer
    prob_before: list = field(default_factory=list)   # p(first token of target_new), per request
    prob_after: list = field(default_factory=list)
    seconds: float = 0.0
    applied: bool = True

    def undo(self) -> None:
        """Restore the original weights of every layer this edit touched, bit for bit."""
        if self.applied:
            rome.restore_weights(self.mt, self.original_weights)
            self.applied = False

    @property
    def success_rate(self) -> float:
        """Fraction of requests whose p(target_new) rose."""
        return sum(a > b for a, b in zip(self.prob_after, self.prob_before)) / max(1, len(self.requests))

    def __repr__(self) -> str:
        mean = lambda xs: sum(xs) / max(1, len(xs))
        norms = ", ".join(f"{layer}: {d.norm():.2f}" for layer, d in self.deltas.items())
        n = len(self.requests)
        return (f"MassEdit({self.method}, {n} request{'s' * (n != 1)}, layers {list(self.layers)}, "
                f"mean p {mean(self.prob_before):.3f} -> {mean(self.prob_after):.3f}, "
                f"‖ΔW‖ {{{norms}}}, {'applied' if self.applied else 'undone'})")


def _write_layers(mt, requests, hparams, method, update, zs=None, progress=False) -> MassEdit:
    """The loop MEMIT and AlphaEdit share: z once, then per layer (lowest first) K, R, ΔW = update(
    i, layer, K, R), written before the next layer's residual is measured."""
    start = time.perf_counter()
    layers = hparams.layers
    templates = rome.templates_for(mt, hparams.z_hparams())
    before = target_probs(mt, requests)
    if zs is not None and tuple(zs.shape) != (len(requests), mt.model.config.n_embd):
        raise ValueError(f"zs must be (n requests, d_model) = ({len(requests)}, "
                         f"{mt.model.config.n_embd}), got {tuple(zs.shape)}")
    if zs is None:
        zs = torch.stack([compute_z(mt, r, hparams, templates)["z"]
                          for r in tqdm(requests, desc=f"{method}: z", disable=not progress)])
    edit = MassEdit(mt=mt, requests=requests, layers=layers, method=method, original_weights={},
                    zs=zs, prob_before=before)
    try:
        for i, layer in enumerate(layers):
            module = mt.module(mt.spec.mlp_out, layer)
            original = module.weight.detach().clone()
            edit.original_weights[layer] = original.to("cpu", copy=True)     # the backup waits on the CPU
            K = compute_keys(mt, requests, layer, templates, hparams.bare_prompt_weight)
            R = (zs - block_outputs(mt, requests, layers[-1])) / (len(layers) - i)
            delta = update(i, layer, K, R)
            W = rome._out_in(module, original.float())                       # (d_out, d_in)
            with torch.no_grad():
                module.weight.copy_(rome._out_in(module, W + delta.to(W.device)).to(original.dtype))
            edit.keys[layer], edit.residuals[layer], edit.deltas[layer] = K, R, delta
    except BaseException:
        edit.undo()
        raise
    edit.prob_after = target_probs(mt, requests)
    edit.seconds = time.perf_counter() - start
    return edit


def _with_covariances(mt, hparams, covariances, progress) -> dict:
    """`covariances` completed with `layer_covariances` for every layer of hparams it lacks."""
    covariances = dict(covariances or {})
    missing = [layer for layer in check_layers(mt, hparams.layers) if layer not in covariances]
    if missing:
        covariances.update(layer_covariances(mt, missing, hparams.mom2_n_samples, progress))
    return covariances


def apply_memit(mt: ModelAndTokenizer, requests: list, hparams: MEMITHyperParams | None = None,
                progress: bool = False, covariances: dict | None = None, zs=None) -> MassEdit:
    """Write all `requests` (CounterFact `requested_rewrite` dicts) into the model at once, over
    hparams.layers (MEMIT). Returns a `MassEdit` (undo() / `with`).

    covariances: {layer: C} to use instead of `layer_covariances` (e.g. the unedited model's, in a
    sequential run: every C is fetched before any weight changes). zs: (n, d_model) precomputed z
    (e.g. an earlier MassEdit's .zs with the same last layer and clamp) to skip the optimisation."""
    hparams = hparams or get_hparams(mt)
    requests = check_requests(mt, requests)
    covariances = _with_covariances(mt, hparams, covariances, progress)
    update = lambda i, layer, K, R: memit_weight_update(K, R, covariances[layer], hparams.mom2_update_weight)
    return _write_layers(mt, requests, hparams, "memit", update, zs, progress)


def alphaedit_projections(mt: ModelAndTokenizer, hparams: MEMITHyperParams, covariances: dict | None = None,
                          progress: bool = False) -> dict:
    """{layer: P} from each layer's C and hparams.nullspace_threshold (the unedited model's C)."""
    covariances = _with_covariances(mt, hparams, covariances, progress)
    return {layer: nullspace_projection(covariances[layer], hparams.nullspace_threshold)
            for layer in hparams.layers}


def apply_alphaedit(mt: ModelAndTokenizer, requests: list, hparams: MEMITHyperParams | None = None,
                    projections: dict | None = None, preserved: dict | None = None,
                    progress: bool = False, zs=None) -> MassEdit:
    """MEMIT's loop with AlphaEdit's update (`alphaedit_weight_update`): every ΔW_l is projected on
    the null space of the preserved keys. projections: {layer: P} (default: `alphaedit_projections`);
    preserved: {layer: Σ k kᵀ over the keys of earlier edits} (default zeros; `edit_sequentially`
    accumulates it). Returns a `MassEdit`."""
    hparams = hparams or get_hparams(mt)
    requests = check_requests(mt, requests)
    check_layers(mt, hparams.layers)
    projections = projections or alphaedit_projections(mt, hparams, progress=progress)
    preserved = preserved or {}

    def update(i, layer, K, R):
        prev = preserved.get(layer)
        prev = torch.zeros(K.shape[1], K.shape[1]) if prev is None else prev
        return alphaedit_weight_update(K, R, projections[layer], prev, hparams.alphaedit_l2)
    return _write_layers(mt, requests, hparams, "alphaedit", update, zs, progress)


# --- sequential editing ----------------------------------------------------------------------------

@dataclass(repr=False)
class SequentialRun(rome.Undoable):
    """Batches of edits applied one after another. `edits`: one `rome.Edit` or `MassEdit` per batch;
    `original_weights`: every touched layer's weight before the first batch, so undo() restores the
    whole run bit for bit (undo the run, not one edit in its middle: each edit only remembers the
    weights it found, which hold the edits before it)."""
    mt: ModelAndTokenizer
    method: str
    batch_size: int
    requests: list                  # all requests, in order
    hparams: object
    edits: list = field(default_factory=list)
    original_weights: dict = field(default_factory=dict)
    seconds: list = field(default_factory=list)      # editing time per batch
    applied: bool = True

    @property
    def n_edits(self) -> int:
        """How many requests have been edited so far."""
        return sum(len(e.requests) if isinstance(e, MassEdit) else 1 for e in self.edits)

    @property
    def edited_requests(self) -> list:
        """The requests edited so far, in order."""
        return self.requests[:self.n_edits]

    def delta_norms(self) -> dict:
        """{layer: ‖W_now − W_before the run‖ (Frobenius)} for every layer the run touched."""
        return {layer: (self.mt.module(self.mt.spec.mlp_out, layer).weight.float().cpu() - w.float()).norm().item()
                for layer, w in sorted(self.original_weights.items())}

    def undo(self) -> None:
        """Restore every weight the run changed, bit for bit."""
        if self.applied:
            rome.restore_weights(self.mt, self.original_weights)
            for edit in self.edits:
                edit.applied = False
            self.applied = False

    def __repr__(self) -> str:
        return (f"SequentialRun({self.method}, {self.n_edits} of {len(self.requests)} requests in "
                f"batches of {self.batch_size}, layers {sorted(self.original_weights)}, "
                f"{sum(self.seconds):.1f} s, {'applied' if self.applied else 'undone'})")


def _batch_editor(mt, method, hparams, progress):
    """(layers the method writes, a function batch -> Edit or MassEdit) with everything that must
    come from the *unedited* model (C⁻¹, C, P) computed now, as the reference codes do."""
    if method == "rome":
        C_inv = rome.inverse_key_covariance(mt, hparams.layer, hparams.mom2_n_samples, progress=progress)
        templates = rome.templates_for(mt, hparams)
        return (hparams.layer,), lambda batch: rome.apply_rome_edit(
            mt, batch[0], hparams, C_inv=C_inv, templates=templates, require_improvement=False)
    covariances = layer_covariances(mt, hparams.layers, hparams.mom2_n_samples, progress)
    if method == "memit":
        return hparams.layers, lambda batch: apply_memit(mt, batch, hparams, covariances=covariances)
    projections = alphaedit_projections(mt, hparams, covariances)
    preserved = {layer: torch.zeros_like(C, dtype=torch.float64) for layer, C in covariances.items()}

    def alphaedit(batch):
        edit = apply_alphaedit(mt, batch, hparams, projections, preserved)
        for layer, K in edit.keys.items():           # keys of the edited model (reference: compute_ks after)
            preserved[layer] += K.double().T @ K.double()
        return edit
    return hparams.layers, alphaedit


def edit_sequentially(mt: ModelAndTokenizer, requests: list, method: str = "memit",
                      batch_size: int = 1, hparams=None, on_batch=None,
                      progress: bool = True) -> SequentialRun:
    """Edit `requests` in batches of `batch_size`, one batch after another, each on the model the
    earlier batches left (ROME: batch_size 1). Returns a `SequentialRun` (undo() restores all).

    method: "rome" (hparams: ROMEHyperParams), "memit" or "alphaedit" (MEMITHyperParams); None
    takes the registered ones. on_batch(run, batch) is called after every batch; returning False
    stops the run early. C, C⁻¹ and AlphaEdit's P come from the unedited model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if method == "rome" and batch_size != 1:
        raise ValueError("ROME edits one fact at a time: use batch_size=1 (or method='memit')")
    hparams = hparams or (rome.get_hparams(mt) if method == "rome" else get_hparams(mt))
    if (method == "rome") != isinstance(hparams, rome.ROMEHyperParams):
        raise TypeError(f"method {method!r} needs {'ROME' if method == 'rome' else 'MEMIT'}HyperParams, "
                        f"got {type(hparams).__name__}")
    requests = check_requests(mt, requests, batch=False)
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    for batch in batches:
        check_requests(mt, batch)                        # no conflicting requests within a batch
    check_layers(mt, (hparams.layer,) if method == "rome" else hparams.layers)
    layers, edit_batch = _batch_editor(mt, method, hparams, progress)
    run = SequentialRun(mt=mt, method=method, batch_size=batch_size, requests=requests, hparams=hparams,
                        original_weights={layer: mt.module(mt.spec.mlp_out, layer).weight.detach().to("cpu", copy=True)
                                          for layer in layers})
    for batch in tqdm(batches, desc=f"{method}, batches of {batch_size}", disable=not progress):
        start = time.perf_counter()
        try:
            run.edits.append(edit_batch(batch))
        except BaseException:
            run.undo()
            raise
        run.seconds.append(time.perf_counter() - start)
        if on_batch is not None and on_batch(run, batch) is False:
            break
    return run


# --- the collapse dashboard ------------------------------------------------------------------------

@torch.no_grad()
@torch.no_grad()
def perplexity(mt: ModelAndTokenizer, texts: list, batch_size: int = 8, max_len: int | None = None,
               chunk_tokens: int = 1024) -> float:
    """exp(mean next-token NLL) over all real tokens of `texts` (right-padded batches of `batch_size`
    texts, each cut at `max_len` tokens; default the model's n_positions).

    The full logits of a batch would be batch × tokens × vocab floats (64 GPT-2 texts of 600 tokens:
    7.7 GB), so the unembedding runs on `chunk_tokens` real positions at a time: at most
    chunk_tokens × vocab floats exist at once (1,024 × 50,257: 206 MB)."""
    total, count = 0.0, 0
    max_len = max_len or mt.model.config.n_positions
    for i in range(0, len(texts), batch_size):
        enc = mt.tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_len).to(mt.device)
        hidden = mt.model.transformer(**enc, use_cache=False).last_hidden_state   # [B, T, d] after ln_f
        mask = enc["attention_mask"][:, 1:].bool()
        h, labels = hidden[:, :-1][mask], enc["input_ids"][:, 1:][mask]   # [N, d], [N]: real positions
        for j in range(0, len(labels), chunk_tokens):
            logits = mt.model.lm_head(h[j:j + chunk_tokens]).float()      # [≤ chunk_tokens, vocab]
            total += torch.nn.functional.cross_entropy(logits, labels[j:j + chunk_tokens], reduction="sum").item()
        count += len(labels)
    return math.exp(total / max(1, count))


def heldout_texts(mt: ModelAndTokenizer, n: int = 300, seed: int = 0, avoid=()) -> list:
    """`n` texts to measure perplexity on, none containing a string in `avoid` (e.g. the edited
    subjects: text that states an edited fact *should* get less likely). TinyWorld: sentences of
    freshly generated rows of its corpus distribution (corpus seed 1000 + seed: neither its training
    rows, seed 0, nor C's, seed 1). Other models: generic texts C is estimated from (`rome.generic_texts`)."""
    if mt.name == "tinyworld":
        from engramlib.tinyworld.corpus import generic_sentences
        texts = generic_sentences(max(1, n // 2), seed=1000 + seed)
    else:
        texts = rome.generic_texts(mt)[1]
    texts = [t for t in texts if not any(a in t for a in avoid)]
    return random.Random(seed).sample(texts, min(n, len(texts)))


def probe_facts(mt: ModelAndTokenizer, requests: list, n: int = 100, seed: int = 0) -> list:
    """`n` facts the model knows (top-1) about subjects no request edits: the unedited facts."""
    from engramlib.facts import load_facts
    edited = {r["subject"] for r in requests}
    candidates = [f for f in load_facts() if f.subject not in edited]
    random.Random(seed).shuffle(candidates)
    facts = []
    for i in range(0, len(candidates), 64):                  # test them in the shuffled order
        facts += known_facts(mt, candidates[i:i + 64])
        if len(facts) >= n:
            break
    return facts[:n]


def collapse_metrics(mt: ModelAndTokenizer, edited_records: list, facts: list, texts: list,
                     exclude_prompts=()) -> dict:
    """How the model is doing now, in one dict of numbers:
    edits_recalled: fraction of edited records whose rewrite prompt's top-1 is target_new;
    neighborhood_score: NS over their neighbourhood prompts (p(true) > p(new)), except prompts in
        `exclude_prompts` (a neighbour that is itself edited);
    unedited_accuracy / paraphrase_accuracy: top-1 accuracy of `facts` (unedited) on their rewrite
        prompts / on their held-out paraphrases (`facts.paraphrase_prompts`);
    perplexity: on `texts`."""
    from engramlib.facts import paraphrase_prompts
    rws = [r["requested_rewrite"] for r in edited_records]
    out = {"edits_recalled": accuracy(mt, [r["prompt"].format(r["subject"]) for r in rws],
                                      [r["target_new"]["str"] for r in rws]) if rws else float("nan")}
    prompts, news, trues = [], [], []
    for r, rw in zip(edited_records, rws):
        for p in r.get("neighborhood_prompts", []):
            if p not in exclude_prompts:
                prompts.append(p)
                news.append(rw["target_new"]["str"])
                trues.append(rw["target_true"]["str"])
    if prompts:
        nll = target_nll(mt, prompts + prompts, news + trues)
        out["neighborhood_score"] = (nll[len(prompts):] < nll[:len(prompts)]).float().mean().item()
    else:
        out["neighborhood_score"] = float("nan")
    para = [(p, f.object) for f in facts for p in paraphrase_prompts(f)]
    out["unedited_accuracy"] = accuracy(mt, [f.prompt for f in facts], [f.object for f in facts])
    out["paraphrase_accuracy"] = accuracy(mt, [p for p, _ in para], [o for _, o in para])
    out["perplexity"] = perplexity(mt, texts)
    return out


def collapse_dashboard(mt: ModelAndTokenizer, records: list, method: str = "memit",
                       batch_size: int = 1, every: int | None = None, hparams=None,
                       n_facts: int = 100, n_texts: int = 300, jump: float = 1.5, seed: int = 0,
                       facts: list | None = None, texts: list | None = None,
                       keep_edits: bool = False, flag_texts: int = 8, flag_len: int = 128,
                       progress: bool = True) -> dict:
    """Edit the records' `requested_rewrite`s in sequence (`edit_sequentially`) and measure after
    every `every` edits (default: every batch) what the model still knows (`collapse_metrics`) and
    ‖W − W₀‖ per layer. The unedited facts are `facts` (default `probe_facts`, n_facts of them);
    the perplexity is on `texts` (default `heldout_texts`, n_texts; either way without the edited
    subjects). Pass the same facts and texts to compare runs. A small fixed perplexity (the first
    `flag_texts` texts cut at `flag_len` tokens: cheap enough for every step) is also measured after
    *every* batch: a batch (with ROME, one edit) after which it is more than `jump` times what it
    was before is flagged as a disabling edit (Gupta et al. 2024). The edits are undone at the end
    unless keep_edits.

    Returns plain data: {"method", "batch_size", "n_edits": [0, k, 2k, ...], one list per measure
    ("edits_recalled", "neighborhood_score", "unedited_accuracy", "paraphrase_accuracy",
    "perplexity", "seconds": editing time so far), "delta_norm": {layer: [...]},
    "steps": {"n_edits": [0, b, 2b, ...], "perplexity": [...]} (the small one, after every batch),
    "disabling": [{"n_edits", "perplexity_before", "perplexity_after", "subjects"}]}; with keep_edits,
    also "run": the `SequentialRun`, still applied (evaluate it, then `run.undo()`)."""
    every = every or batch_size
    if every % batch_size:
        raise ValueError(f"every ({every}) must be a multiple of batch_size ({batch_size})")
    requests = [r["requested_rewrite"] for r in records]
    subjects = [r["subject"] for r in requests]
    facts = probe_facts(mt, requests, n_facts, seed) if facts is None else \
        [f for f in facts if f.subject not in subjects]
    texts = heldout_texts(mt, n_texts, seed, avoid=subjects) if texts is None else \
        [t for t in texts if not any(s in t for s in subjects)]
    edited_prompts = {r["prompt"].format(r["subject"]) for r in requests}
    names = ("edits_recalled", "neighborhood_score", "unedited_accuracy", "paraphrase_accuracy", "perplexity")
    board = {"method": method, "batch_size": batch_size, "n_edits": [], "seconds": [],
             "delta_norm": {}, "steps": {"n_edits": [], "perplexity": []}, "disabling": [],
             **{k: [] for k in names}}

    def measure(run):
        n = 0 if run is None else run.n_edits
        steps = board["steps"]
        if n % every == 0 or n == len(requests):
            row = collapse_metrics(mt, records[:n], facts, texts, edited_prompts)
            board["n_edits"].append(n)
            board["seconds"].append(0.0 if run is None else sum(run.seconds))
            for k in names:
                board[k].append(row[k])
            norms = {} if run is None else run.delta_norms()
            for layer, norm in norms.items():
                board["delta_norm"].setdefault(layer, [0.0]).append(norm)
        ppl = perplexity(mt, texts[:flag_texts], max_len=flag_len)
        if steps["perplexity"] and ppl > jump * steps["perplexity"][-1]:
            board["disabling"].append({"n_edits": n, "perplexity_before": steps["perplexity"][-1],
                                       "perplexity_after": ppl,
                                       "subjects": [r["subject"] for r in requests[steps["n_edits"][-1]:n]]})
        steps["n_edits"].append(n)
        steps["perplexity"].append(ppl)

    measure(None)
    run = edit_sequentially(mt, requests, method, batch_size, hparams,
                            on_batch=lambda run, batch: measure(run), progress=progress)
    if keep_edits:
        board["run"] = run
    else:
        run.undo()
    return board
