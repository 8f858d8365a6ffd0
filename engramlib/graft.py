"""Skill grafting (Panigrahi et al. 2023): which few weights carry a fine-tuned skill?

Fine-tune a pretrained model θ_pre on a task to get θ_ft. A *graft* with a binary mask γ takes
the fine-tuned value where γ = 1 and the pretrained value elsewhere:
    θ(γ) = γ ⊙ θ_ft + (1 − γ) ⊙ θ_pre.
If a tiny γ recovers the fine-tuned accuracy, that region is where the skill lives.

A task is classification with label *words* (the paper's GPT-2 format), a dict
{"name", "label_words", "train": [(prompt, label index)], "test": [...]}; the course's tasks come
from `engramlib.tinyworld.tasks.make_task`:
    '"The soup was awful and the chef was poor." has a tone that is' -> " negative" / " positive"
The loss is the cross-entropy over the label words' first tokens at the last position.

Everything here works on a dict of parameter tensors ("state") for the graftable set: every
`transformer.h.*` tensor (embeddings, final layer norm and the tied head stay frozen, as in the
official code).
"""
from __future__ import annotations

import random

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from engramlib.models import ModelAndTokenizer

# --- task accuracy --------------------------------------------------------------------------------


def label_token_ids(mt: ModelAndTokenizer, label_words) -> torch.Tensor:
    """First token of ' ' + word for each label word: [n_labels]."""
    ids = [mt.tokenizer(" " + w)["input_ids"][0] for w in label_words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {label_words} share a first token")
    return torch.tensor(ids, device=mt.device)


def _batch(mt, examples):
    """Tokenized prompts (right-padded, as the tokenizer is set up at load) and their labels."""
    enc = mt.tokenizer([p for p, _ in examples], return_tensors="pt", padding=True).to(mt.device)
    labels = torch.tensor([y for _, y in examples], device=mt.device)
    return enc, labels


def label_logits(mt, enc, label_ids, params=None) -> torch.Tensor:
    """Logits of the label words at each prompt's last token: [batch, n_labels]. With `params`
    (name -> tensor, e.g. a state of the block weights), the model runs with those tensors in place
    of its own, and its own parameters everywhere else."""
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out = functional_call(mt.model, params, args=(), kwargs=inputs) if params else mt.model(**inputs)
    last = enc["attention_mask"].sum(1) - 1
    return out.logits[torch.arange(len(last)), last][:, label_ids].float()


@torch.no_grad()
def task_accuracy(mt: ModelAndTokenizer, task: dict, split: str = "test", params=None,
                  batch_size: int = 128) -> float:
    """Accuracy of the model (or of `params` over it) on a task split."""
    label_ids = label_token_ids(mt, task["label_words"])
    data, hits = task[split], 0
    for i in range(0, len(data), batch_size):
        enc, labels = _batch(mt, data[i:i + batch_size])
        hits += (label_logits(mt, enc, label_ids, params).argmax(-1) == labels).sum().item()
    return hits / len(data)


# --- states -------------------------------------------------------------------------------------


def graftable_names(mt: ModelAndTokenizer) -> list:
    """The parameters fine-tuning may change: every tensor of the transformer blocks."""
    prefix = mt.spec.layer.split("{}")[0]
    return [n for n, _ in mt.model.named_parameters() if n.startswith(prefix)]


def get_state(mt: ModelAndTokenizer) -> dict:
    """A copy of the graftable parameters {name: tensor}."""
    params = dict(mt.model.named_parameters())
    return {n: params[n].detach().clone() for n in graftable_names(mt)}


def load_state(mt: ModelAndTokenizer, state: dict) -> None:
    """Write a state into the model (in place)."""
    params = dict(mt.model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def n_params(state: dict) -> int:
    return sum(t.numel() for t in state.values())


# --- fine-tuning ----------------------------------------------------------------------------------


def finetune(mt: ModelAndTokenizer, task: dict, steps: int = 300, lr: float = 0.05,
             batch_size: int = 32, seed: int = 0, frozen: dict | None = None,
             progress: bool = True) -> dict:
    """Prompt-based fine-tuning with plain SGD on the graftable parameters (official setting:
    SGD localises, AdamW needs an ℓ1 penalty). Changes the model in place and returns its new
    state. frozen: {name: bool mask} of entries that must not move (continual learning)."""
    names = graftable_names(mt)
    params = dict(mt.model.named_parameters())
    for n, p in mt.model.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.SGD([params[n] for n in names], lr=lr)
    label_ids = label_token_ids(mt, task["label_words"])
    rng = random.Random(seed)
    mt.model.eval()             # no dropout (GPT-2 has 0.1): every run with one seed is the same
    try:
        for _ in tqdm(range(steps), desc=f"fine-tuning on {task['name']}", disable=not progress):
            enc, labels = _batch(mt, rng.sample(task["train"], batch_size))
            loss = torch.nn.functional.cross_entropy(label_logits(mt, enc, label_ids), labels)
            opt.zero_grad()
            loss.backward()
            if frozen:
                for n, keep in frozen.items():
                    params[n].grad[keep] = 0.0
            opt.step()
    finally:
        mt.model.eval()
        mt.model.requires_grad_(False)
    return get_state(mt)


# --- grafting and masks ---------------------------------------------------------------------------


def graft(pre: dict, ft: dict, mask: dict) -> dict:
    """θ = γ ⊙ θ_ft + (1 − γ) ⊙ θ_pre for every tensor (mask values in [0, 1])."""
    return {n: mask[n] * ft[n] + (1 - mask[n]) * pre[n] for n in pre}


def mask_size(mask: dict) -> int:
    """Number of grafted entries, ‖γ‖₀ (entries > 0.5)."""
    return int(sum((m > 0.5).sum().item() for m in mask.values()))


def top_movement_mask(pre: dict, ft: dict, k: int) -> dict:
    """γ = 1 on the k entries that moved most, |θ_ft − θ_pre|, ranked over all tensors together."""
    return sigmoid_topk_mask({n: (ft[n] - pre[n]).abs() for n in pre}, k)


def magnitude_mask(ft: dict, k: int) -> dict:
    """γ = 1 on the k entries of θ_ft with the largest |value| (large weights, whether they moved
    or not: the pruning literature's notion of important weights)."""
    return sigmoid_topk_mask({n: t.abs() for n, t in ft.items()}, k)


def random_mask(pre: dict, k: int, seed: int = 0) -> dict:
    """γ = 1 on k entries chosen uniformly at random (same size as a control)."""
    sizes = [t.numel() for t in pre.values()]
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(sum(sizes), generator=gen)[:k]
    flat = torch.zeros(sum(sizes))
    flat[chosen] = 1.0
    out, i = {}, 0
    for (n, t), size in zip(pre.items(), sizes):
        out[n] = flat[i:i + size].view_as(t).to(t.device)
        i += size
    return out


def optimize_mask(mt: ModelAndTokenizer, pre: dict, ft: dict, task: dict, sparsity: float,
                  steps: int = 100, lr: float = 1e7, b: float = 10.0, batch_size: int = 32,
                  seed: int = 0, every: int = 10, track_test: bool = False,
                  progress: bool = True) -> dict:
    """The official mask optimisation (Panigrahi et al., Skill-Localization-by-grafting).

    Base patch γ_base = top `sparsity` fraction of |θ_ft − θ_pre|. Trainable S ~ U[0, 1); the
    continuous mask γ = γ_base(1 − σ(S − b)) + (1 − γ_base)σ(S − b) starts at γ_base (b = 10); plain
    gradient steps on S (lr 1e7 in the paper; small models need more) lower the grafted model's
    task loss; every `every` steps the binary mask round(γ) is read off, and the one with the best
    train accuracy is kept. round(γ) grows during the optimisation, often far beyond the base size
    (the paper reports the final size): started from a tiny base, one run passes through masks of
    many sizes. Returns {"mask", "history": [(step, train accuracy, ‖γ‖₀)]}; with track_test=True
    each history row also has the test accuracy of that binary mask (a sparsity curve in one run)."""
    k = int(round(sparsity * n_params(pre)))
    base = top_movement_mask(pre, ft, k)
    gen = torch.Generator().manual_seed(seed)
    S = {n: torch.rand(t.shape, generator=gen).to(t.device).requires_grad_(True) for n, t in pre.items()}
    label_ids = label_token_ids(mt, task["label_words"])
    rng = random.Random(seed)

    # γ_base(1 − σ) + (1 − γ_base)σ = γ_base + (1 − 2γ_base)σ, and graft = θ_pre + γ ⊙ (θ_ft − θ_pre):
    # the same numbers with fewer full-size intermediates (memory: engramlib.budget, chapter 03)
    flip = {n: 1 - 2 * base[n] for n in pre}
    delta = {n: ft[n] - pre[n] for n in pre}

    def gamma():
        return {n: base[n] + flip[n] * torch.sigmoid(S[n] - b) for n in pre}

    def binary():
        with torch.no_grad():
            return {n: (g > 0.5).float() for n, g in gamma().items()}

    def check(step, m):
        params = graft(pre, ft, m)
        acc = task_accuracy(mt, task, "train", params)
        row = (step, acc, mask_size(m))
        history.append(row + (task_accuracy(mt, task, "test", params),) if track_test else row)
        return acc

    history = []
    best = binary()
    best_acc = check(0, best)
    for step in tqdm(range(1, steps + 1), desc="optimising the graft mask", disable=not progress):
        enc, labels = _batch(mt, rng.sample(task["train"], batch_size))
        grafted = {n: pre[n] + g * delta[n] for n, g in gamma().items()}     # graft(pre, ft, γ)
        loss = torch.nn.functional.cross_entropy(
            label_logits(mt, enc, label_ids, grafted), labels)
        grads = torch.autograd.grad(loss, list(S.values()))
        with torch.no_grad():
            for s, g in zip(S.values(), grads):
                s -= lr * g
        if step % every == 0 or step == steps:
            m = binary()
            acc = check(step, m)
            if acc > best_acc:
                best, best_acc = m, acc
    return {"mask": best, "history": history}


def sparsity_sweep(mt: ModelAndTokenizer, pre: dict, ft: dict, task: dict, fractions,
                   mask_steps: int = 15, mask_lr: float = 1e8, batch_size: int = 32,
                   start: float = 5e-6, every: int = 1, seed: int = 0) -> dict:
    """Graft accuracy against region size for four kinds of region (chapter 03's sweep).

    The controls are evaluated at `fractions` of the graftable weights: top-movement (largest
    |θ_ft − θ_pre|), magnitude (largest |θ_ft|) and random. The optimised mask is one run of
    `optimize_mask` from a base of `start` (0.0005 %), read off every `every` steps: its binary mask
    grows as it learns, so the run passes through many sizes. Returns {"sizes": [k per fraction],
    "top-movement" / "magnitude" / "random": [test accuracy per size], "optimised": [(k, test
    accuracy, test accuracy of the top-movement mask of size k) per read-off], "mask": the optimised
    mask with the best train accuracy}."""
    total = n_params(pre)
    sizes = [max(1, int(round(f * total))) for f in fractions]

    def acc(mask):
        return task_accuracy(mt, task, params=graft(pre, ft, mask))
    top = {}                                 # size -> accuracy: the grid and the run share sizes

    def top_acc(k):
        if k not in top:
            top[k] = acc(top_movement_mask(pre, ft, k))
        return top[k]
    out = {"sizes": sizes,
           "top-movement": [top_acc(k) for k in sizes],
           "magnitude": [acc(magnitude_mask(ft, k)) for k in sizes],
           "random": [acc(random_mask(pre, k, seed=seed)) for k in sizes]}
    run = optimize_mask(mt, pre, ft, task, start, steps=mask_steps, lr=mask_lr, batch_size=batch_size,
                        seed=seed, every=every, track_test=True, progress=False)
    out["optimised"] = [(k, test, top_acc(k)) for _, _, k, test in run["history"]]
    out["mask"] = run["mask"]
    return out


def sigmoid_topk_mask(scores: dict, k: int) -> dict:
    """He et al. (2024)'s simpler variant, binarised: γ = 1 on exactly the k largest scores, ranked
    over all tensors together (e.g. the S of γ = σ(S) after training with an ℓ1 term;
    straight-through: use σ(S) forward, top-k to read off). ‖γ‖₀ = k even when many scores tie
    with the k-th (e.g. zeros): `torch.topk` picks among the tied ones."""
    if k < 1:
        raise ValueError(f"a mask needs at least one parameter, got k = {k} (sparsity too small?)")
    flat = torch.cat([s.detach().flatten() for s in scores.values()])
    chosen = torch.zeros(flat.shape, device=flat.device)
    chosen[flat.topk(k).indices] = 1.0
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = chosen[i:i + s.numel()].view_as(s)
        i += s.numel()
    return out


# --- lesions and controls -------------------------------------------------------------------------


def lesion(state: dict, mask: dict, to: str = "pre", pre: dict | None = None) -> dict:
    """Remove a region: entries where mask = 1 are reset to the pretrained value (to="pre") or
    to zero (to="zero"); everything else keeps `state`'s value."""
    if to not in ("pre", "zero"):
        raise ValueError(f"to must be 'pre' or 'zero', got {to!r}")
    if to == "pre" and pre is None:
        raise ValueError("lesion(to='pre') needs the pretrained state: pass pre=")
    other = pre if to == "pre" else {n: torch.zeros_like(t) for n, t in state.items()}
    return {n: mask[n] * other[n] + (1 - mask[n]) * state[n] for n in state}


def block_region(mt: ModelAndTokenizer, state: dict, layers, part: str = "block") -> dict:
    """A *contiguous* region: γ = 1 on every tensor of `part` ("mlp", "attn" or the whole "block",
    layer norms included) of the given layers, 0 elsewhere. layers: an int or a list of ints."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    templates = {"mlp": mt.spec.mlp, "attn": mt.spec.attn, "block": mt.spec.layer}
    if part not in templates:
        raise ValueError(f"part must be 'mlp', 'attn' or 'block', got {part!r}")
    bad = [layer for layer in layers if not 0 <= layer < mt.n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has blocks 0-{mt.n_layers - 1}")
    prefixes = tuple(templates[part].format(layer) + "." for layer in layers)
    return {n: torch.full_like(t, float(n.startswith(prefixes))) for n, t in state.items()}


def contiguous_regions(mt: ModelAndTokenizer) -> dict:
    """Chapter 03's location experiment, as {name: (layers, part)} for `block_region`:
    "MLP 0" ... "MLP L−1", "attention 0" ..., "early half" (blocks 0 .. L/2 − 1), "late half"."""
    half = mt.n_layers // 2
    regions = {f"MLP {i}": ([i], "mlp") for i in range(mt.n_layers)}
    regions.update({f"attention {i}": ([i], "attn") for i in range(mt.n_layers)})
    regions["early half"] = (list(range(half)), "block")
    regions["late half"] = (list(range(half, mt.n_layers)), "block")
    return regions


def region_by_module(mt: ModelAndTokenizer, mask: dict) -> dict:
    """Where a region lies: {"MLP 0": number of its entries in block 0's MLP, "attention 0": ...,
    "layer norms": ...}."""
    counts = {f"{kind} {i}": 0 for kind in ("MLP", "attention") for i in range(mt.n_layers)}
    counts["layer norms"] = 0
    for n, m in mask.items():
        k = int((m > 0.5).sum())
        for i in range(mt.n_layers):
            if n.startswith(mt.spec.mlp.format(i) + "."):
                counts[f"MLP {i}"] += k
                break
            if n.startswith(mt.spec.attn.format(i) + "."):
                counts[f"attention {i}"] += k
                break
        else:
            counts["layer norms"] += k
    return counts


def location_vs_amount(mt: ModelAndTokenizer, state: dict, regions: dict, score, to: str = "zero",
                       pre: dict | None = None, seed: int = 0) -> dict:
    """Lesion each contiguous region of `state` ({name: (layers, part)}, see `contiguous_regions`),
    and a scattered random region of the same number of weights, and score both:
    {name: {"size", "contiguous", "scattered"}}. score(state) -> float (fact recall, task
    accuracy, ...), or {label: score function} to score every lesion with each (a measurement and
    its control on the same lesions): then {label: {name: {...}}}. Regions of equal size share one
    scattered control; masks are built one at a time (each is a full-size copy of the block weights)."""
    scores = score if isinstance(score, dict) else {None: score}
    scattered, out = {}, {label: {} for label in scores}
    for name, (layers, part) in regions.items():
        mask = block_region(mt, state, layers, part)
        k = mask_size(mask)
        lesioned = lesion(state, mask, to=to, pre=pre)
        del mask
        contiguous = {label: fn(lesioned) for label, fn in scores.items()}
        del lesioned
        if k not in scattered:
            control = lesion(state, random_mask(state, k, seed=seed), to=to, pre=pre)
            scattered[k] = {label: fn(control) for label, fn in scores.items()}
        for label in scores:
            out[label][name] = {"size": k, "contiguous": contiguous[label], "scattered": scattered[k][label]}
    return out if isinstance(score, dict) else out[None]


def lottery_ticket(ft: dict, mask: dict) -> dict:
    """θ_ft on the mask, zero elsewhere (the lottery-ticket control)."""
    return {n: mask[n] * ft[n] for n in ft}


def region_overlap(mask_a: dict, mask_b: dict) -> float:
    """|A ∩ B| / min(|A|, |B|): how much two skills' regions share."""
    inter = sum(((mask_a[n] > 0.5) & (mask_b[n] > 0.5)).sum().item() for n in mask_a)
    return inter / max(1, min(mask_size(mask_a), mask_size(mask_b)))


# --- continual learning (chapter 04) ---------------------------------------------------------------


def continual_learning(mt: ModelAndTokenizer, task_a: dict, task_b: dict, sparsity: float = 0.01,
                       sparsity_b: float = 0.001, ft_steps: int = 300, ft_steps_b: int | None = None,
                       mask_steps: int = 100, mask_lr: float = 1e8, lr: float = 0.05,
                       lr_b: float | None = None, batch_size: int = 32, progress: bool = True) -> dict:
    """Learn task A, then task B, two ways, and measure both tasks after each:

    - sequential: fine-tune on A, then fine-tune everything on B;
    - forget-free (after Panigrahi et al. 2023): fine-tune on A and find A's graft region
      (`sparsity`); keep only that region (grafted onto θ_pre); fine-tune on B with A's region
      frozen; find B's graft region in that run (`sparsity_b`, outside A's region by construction)
      and keep only it. Each skill then lives in its own sparse region and the rest of the model
      stays pretrained. The smaller B's region, the less it disturbs the weights A relies on.
    lr is the SGD learning rate for A, lr_b for B (default: lr); ft_steps the SGD steps for A,
    ft_steps_b for B (default: ft_steps; a bigger task B trains longer). The model is restored to its
    pretrained state at the end. Returns {"after_A", "sequential", "grafted_A", "B_outside_A",
    "forget_free": {"A": accuracy, "B": accuracy}, "ft_A" (A's fine-tuned state), "mask_A",
    "mask_B", their sizes, "region_A_untouched" (B's fine-tuning left A's region exactly as A's
    fine-tuning set it), ...}."""
    lr_b = lr if lr_b is None else lr_b
    ft_steps_b = ft_steps if ft_steps_b is None else ft_steps_b
    train = dict(batch_size=batch_size, progress=progress)
    masking = dict(steps=mask_steps, lr=mask_lr, batch_size=batch_size, progress=progress)
    pre = get_state(mt)

    def both():
        return {"A": task_accuracy(mt, task_a), "B": task_accuracy(mt, task_b)}
    try:
        ft_a = finetune(mt, task_a, steps=ft_steps, lr=lr, **train)
        after_a = both()
        mask_a = optimize_mask(mt, pre, ft_a, task_a, sparsity, **masking)["mask"]
        # sequential fine-tuning from the fine-tuned A model
        finetune(mt, task_b, steps=ft_steps_b, lr=lr_b, **train)
        sequential = both()
        # forget-free: A's region grafted, B learned outside it, then only B's own region kept
        with_a = graft(pre, ft_a, mask_a)
        load_state(mt, with_a)
        grafted_a = both()
        frozen = {n: m.bool() for n, m in mask_a.items()}
        ft_b = finetune(mt, task_b, steps=ft_steps_b, lr=lr_b, frozen=frozen, **train)
        untouched = all(torch.equal(ft_b[n][frozen[n]], ft_a[n][frozen[n]]) for n in pre)
        outside_b = both()
        mask_b = optimize_mask(mt, with_a, ft_b, task_b, sparsity_b, **masking)["mask"]
        # inside A's region ft_b equals with_a (frozen), so grafting there would change nothing:
        # leave those entries out of B's region
        mask_b = {n: m * (1 - mask_a[n]) for n, m in mask_b.items()}
        final = graft(with_a, ft_b, mask_b)
        load_state(mt, final)
        forget_free = both()
    finally:
        load_state(mt, pre)
    return {"after_A": after_a, "sequential": sequential, "grafted_A": grafted_a,
            "B_outside_A": outside_b, "forget_free": forget_free, "ft_A": ft_a,
            "mask_A": mask_a, "mask_B": mask_b,
            "mask_A_size": mask_size(mask_a), "mask_B_size": mask_size(mask_b),
            "region_A_untouched": untouched, "n_params": n_params(pre)}
