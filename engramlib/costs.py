"""What a chapter costs: the work it does, counted, so that it can be sized to fit a device.

`budget.plan(chapter, model_name, device)` adds up the chapter's heavy steps (`chapter_work`), each a
`Work`: floating-point operations in float32 and float64, how many passes it makes and through how
many transformer blocks (launch overhead: a batch of one prompt costs time even with few FLOPs),
the bytes it holds on the compute device while it runs, and the bytes it leaves behind (on the
device or on the host) for the rest of the chapter. Time = FLOPs / the device's sustained
throughput + passes × a per-pass latency + blocks × a per-block latency; memory = the model + what
earlier steps left + the largest step's own. `budget.py` turns this into plans, the choice of model and the table.

Counting rules (forward of `rows` sequences of T tokens through k blocks, d = width):
  k × (2 · rows · T · 12 d²  +  4 · rows · T² · d)  +  2 · d · vocab per unembedded position,
backward through the same blocks ≈ 1 × forward (gradients of activations only, ROME's v*) or 2 ×
(weights too: fine-tuning). Token counts of the course's prompts (GPT-2's BPE, measured on the fact
table): rewrite prompts 8, paraphrases 13, ROME's template rows 24 with the target.

Sizes: `FULL_SIZES` are the chapters' sizes on TinyWorld (the numbers the chapters quote); on a
GPU, `budget.plan` shrinks the scalable ones (never below `MIN_SIZES`) until the chapter fits its
time, and the chapter reads its sizes from the plan (`plan.sizes`).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30
MiB = 2 ** 20


@dataclass(frozen=True)
class Shape:
    """A GPT-2 shape: blocks, width, vocabulary, positions."""
    n_layer: int
    d: int
    vocab: int = 50257
    n_positions: int = 1024

    @property
    def d_mlp(self) -> int:
        return 4 * self.d

    @property
    def params(self) -> int:
        """All parameters (a block: 12 d² + 13 d; embeddings (vocab + positions) × d; final norm)."""
        return self.n_layer * self.block_params + (self.vocab + self.n_positions) * self.d + 2 * self.d

    @property
    def block_params(self) -> int:
        return 12 * self.d ** 2 + 13 * self.d

    @property
    def model_bytes(self) -> int:
        return 4 * self.params

    @property
    def c_proj_bytes(self) -> int:
        """One MLP output matrix (d_mlp × d) in float32: what an edit's undo copy holds."""
        return 4 * self.d_mlp * self.d

    @property
    def square_bytes(self) -> int:
        """One d_mlp × d_mlp float32 matrix (C, C⁻¹, AlphaEdit's P)."""
        return 4 * self.d_mlp ** 2

    def forward(self, rows: float, T: float, blocks: float | None = None, unembed: float = 0) -> float:
        """FLOPs of a forward pass: `rows` sequences of T tokens through `blocks` blocks (default
        all), and the unembedding at `unembed` positions."""
        blocks = self.n_layer if blocks is None else blocks
        per_block = 2 * rows * T * 12 * self.d ** 2 + 4 * rows * T * T * self.d
        return blocks * per_block + 2 * self.d * self.vocab * unembed

    def activations(self, rows: float, T: float, blocks: float) -> int:
        """Bytes autograd keeps for a backward pass through `blocks` blocks: 22 d floats per token
        and block (the two norms' inputs and outputs 4d, q, k, v 3d, the attention's output and
        its projection's input 2d, the MLP's 4d hidden about 3 times: HF's GELU saves its
        intermediate steps) plus the attention probabilities before and after the softmax
        (heads = d / 64). Checked on a GPU: benchmarks/plan_vs_measured.py."""
        per_token = 22 * self.d + 2 * (self.d // 64) * T
        return int(4 * rows * T * blocks * per_token)


@dataclass
class Work:
    """One heavy step of a chapter."""
    what: str
    flops: float = 0.0          # float32 operations
    flops64: float = 0.0        # float64 operations (C's accumulation, inverses, MEMIT's solves)
    passes: float = 0.0         # forward and backward passes, one after another (latency)
    blocks: float = 0.0         # transformer blocks those passes run through (latency)
    device: int = 0             # bytes the step holds on the compute device while it runs
    keep_device: int = 0        # bytes it leaves on the device for the rest of the chapter
    keep_host: int = 0          # bytes it leaves in host memory (undo copies, cached matrices)

    def __add__(self, other: "Work") -> "Work":
        """Two steps one after the other, as one: costs add, memory is the larger step's."""
        return Work(self.what, self.flops + other.flops, self.flops64 + other.flops64, self.passes + other.passes,
                    self.blocks + other.blocks, max(self.device, other.device),
                    self.keep_device + other.keep_device, self.keep_host + other.keep_host)

    def times(self, n: float, what: str | None = None) -> "Work":
        """The step repeated n times (what it leaves behind is left once per repetition)."""
        return Work(what or self.what, n * self.flops, n * self.flops64, n * self.passes, n * self.blocks, self.device,
                    int(n * self.keep_device), int(n * self.keep_host))


# --- building blocks --------------------------------------------------------------------------

def forward_work(s: Shape, what: str, passes: float, rows: float, T: float, blocks: float | None = None,
                 unembed_per_pass: float = 0, full_logits: bool = False) -> Work:
    """`passes` forward passes of `rows` × T tokens (no gradients). full_logits: the model's
    logits at every position are kept (HF's forward), and a float32 softmax copy."""
    blocks = s.n_layer if blocks is None else blocks
    unembed = rows * T if full_logits else unembed_per_pass
    logits = 2 * 4 * rows * T * s.vocab if full_logits else 4 * unembed * s.vocab
    hidden = 4 * rows * T * 6 * s.d                         # a block's transient activations
    return Work(what, passes * s.forward(rows, T, blocks, unembed), 0, passes, passes * blocks,
                device=logits + hidden)


def generate_work(s: Shape, what: str, prompts: float, new_tokens: float, T0: float = 8) -> Work:
    """Greedy or sampled generation with the key-value cache: one 1-row pass per new token."""
    flops = prompts * (s.forward(1, T0, unembed=1) + new_tokens * s.forward(1, 1, unembed=1)
                       + new_tokens * 4 * (T0 + new_tokens) * s.d * s.n_layer)
    passes = prompts * (1 + new_tokens)
    return Work(what, flops, 0, passes, passes * s.n_layer, device=4 * s.vocab * 4)


def rome_edit_work(s: Shape, layer: int, templates: int = 21, T: float = 24, steps: int = 20,
                   keep: bool = False) -> Work:
    """One ROME edit (rome.apply_rome_edit): k* over the templates (forward up to `layer`), v* by
    `steps` Adam steps through the blocks above `layer` (each a forward + a backward w.r.t. the
    activations) plus one full forward, p(target) twice, the rank-one update. keep: the Edit (and
    its undo copy on the host) is kept after the step."""
    above = s.n_layer - layer - 1
    rows = templates + 1                                    # + the KL prompt
    flops = (s.forward(templates, T, layer + 1)
             + s.forward(rows, T, unembed=rows)
             + steps * s.forward(rows, T, above, unembed=2 * rows)          # forward
             + (steps - 1) * s.forward(rows, T, above)                      # backward (activations)
             + 2 * s.forward(1, 8, unembed=1))
    blocks = layer + 1 + s.n_layer + (2 * steps - 1) * above + 2 * s.n_layer
    device = s.activations(rows, T, above) + 3 * s.c_proj_bytes         # + the weight clone, W, ΔW
    return Work("ROME edit", flops, 0, 2 * steps + 3, blocks, device, 0, s.c_proj_bytes if keep else 0)


def covariance_work(s: Shape, layer: int, n_texts: int, tokens: float = 128, published: bool = False,
                    keep_host: bool = True) -> Work:
    """C of one layer from `n_texts` texts of `tokens` tokens (forwards that stop at `layer`, the
    keys' outer products accumulated in float32: rome.ACCUMULATE_DTYPE), then C⁻¹ (float64
    inversion ≈ 2 d_mlp³). With published statistics (the reference's files, downloaded) or
    shipped ones (TinyWorld) only the inversion is left."""
    keys = n_texts * tokens
    flops = 0 if published else s.forward(n_texts, tokens, layer + 1) + 2 * keys * s.d_mlp ** 2
    flops64 = 2 * s.d_mlp ** 3
    blocks = 0 if published else (n_texts / 32) * (layer + 1)
    batch = 0 if published else 32 * tokens * s.d_mlp * (4 + 4)           # a batch's keys: recorded, selected
    device = 2 * s.square_bytes + 3 * 2 * s.square_bytes + batch            # Σkkᵀ and C fp32; C, C⁻¹, work fp64
    return Work(f"C and C⁻¹, layer {layer}", flops, flops64, 0 if published else n_texts / 32, blocks, device, 0,
                s.square_bytes if keep_host else 0)


def trace_work(s: Shape, samples: int, T: float, n: float, kinds: int = 3, window: int = 10) -> Work:
    """Fast causal traces (fast_trace.trace) of one prompt, `kinds` grids: for each of the n
    tokens from the subject on, L restorations × `samples` rows that run from the restored layer up
    over the positions from that token on (about L²/2 · n(n+1)/2 block-row-positions per sample;
    windows restore from lower layers: ×1.2), plus the clean and corrupted full runs."""
    grid = samples * (s.n_layer ** 2 / 2) * n * (n + 1) / 2
    grids = grid * (1 + 1.2 * (kinds - 1) * (window > 1) + (kinds - 1) * (window <= 1))
    flops = grids * 2 * 12 * s.d ** 2 + kinds * (n * s.n_layer * samples * 2 * s.d * s.vocab
                                                 + s.forward(samples + 1, T))
    cache = 6 * s.n_layer * (samples + 1) * T * s.d * 4
    batch = s.n_layer * samples * (T * 12 * s.d * 4 + s.vocab * 4)
    return Work("causal trace", flops, 0, kinds * (n + 2), kinds * (n + 1) * s.n_layer, cache + batch)


def perplexity_work(s: Shape, n_texts: int, tokens: float, batch: int = 8) -> Work:
    """memit.perplexity: batches of `batch` texts, the unembedding in chunks of 1,024 positions."""
    flops = s.forward(n_texts, tokens, unembed=n_texts * tokens)
    device = 4 * batch * tokens * 6 * s.d + 2 * 4 * 1024 * s.vocab         # logits and their log-softmax
    return Work("perplexity", flops, 0, n_texts / batch, (n_texts / batch) * s.n_layer, device)


def knowledge_neurons_work(s: Shape, facts: float, T: float = 10) -> Work:
    """lens.knowledge_neurons for `facts` facts: per layer, a forward up to it and a forward +
    backward from log P(object) down to its MLP (batch 1)."""
    per_fact = sum(s.forward(1, T, l + 1) + s.forward(1, T, unembed=1) + s.forward(1, T, s.n_layer - l)
                   for l in range(s.n_layer))
    blocks = sum((l + 1) + s.n_layer + (s.n_layer - l) for l in range(s.n_layer))
    return Work("knowledge neurons", facts * per_fact, 0, facts * 3 * s.n_layer, facts * blocks,
                s.activations(1, T, s.n_layer))


def finetune_work(s: Shape, what: str, steps: float, rows: float, T: float, blocks: float | None = None,
                  trained_params: float = 0) -> Work:
    """`steps` steps of gradient descent: forward with full logits + backward with weight
    gradients (2 × forward) through `blocks`; Adam keeps 2 moments of `trained_params`."""
    blocks = s.n_layer if blocks is None else blocks
    flops = steps * (s.forward(rows, T, unembed=rows * T) + 2 * s.forward(rows, T, blocks))
    device = s.activations(rows, T, blocks) + 2 * 4 * rows * T * s.vocab + 3 * 4 * int(trained_params)
    return Work(what, flops, 0, 2 * steps, steps * (s.n_layer + blocks), device)


# --- the chapters -------------------------------------------------------------------------------

PROMPT_T, PARAPHRASE_T, TEMPLATE_T = 8, 13, 24     # tokens: rewrite prompts, paraphrases, ROME's rows
TEXT_T = 300        # a held-out text's tokens in a padded batch (Wikipedia paragraphs; an assumption)
C_TEXT_T = 200      # tokens per Wikipedia paragraph C is estimated from (over 200 characters; an assumption)

# the chapters' full sizes (their TinyWorld runs); the first ones named in SCALABLE shrink on big models
FULL_SIZES = {
    "00": {},
    "03": {"examples": 512, "finetune_steps": 300, "mask_steps": 20},
    "04": {"examples": 512, "steps": 40},
    "05": {"zero_facts": 50, "lens_facts": 200, "kn_facts": 40},
    "06": {"facts": 60, "samples": 10},
    "07": {"other_facts": 200, "c_texts": 2000},
    "08": {"records": 100, "sequential": 40, "c_texts": 2000},
    "09": {"records": 100, "texts": 300, "every": 10, "c_texts": 2000},
    "10": {"sweep_facts": 100, "layers": 48, "edits": 40, "neuron_facts": 20, "c_texts": 2000},  # 48: every layer
    "11": {"forget_subjects": 20, "unlearn_steps": 500, "relearn_steps": 2000},   # 2 kinds × ~255 full-depth steps; curves
}
SCALABLE = {"05": ("kn_facts", "lens_facts"), "06": ("facts",), "08": ("records", "sequential"),
            "09": ("records", "texts"), "10": ("layers", "sweep_facts", "edits", "neuron_facts"),
            "11": ("forget_subjects",)}
MIN_SIZES = {"kn_facts": 8, "lens_facts": 40, "facts": 10, "records": 20, "sequential": 10, "texts": 32,
             "layers": 4, "sweep_facts": 10, "edits": 8, "neuron_facts": 5, "forget_subjects": 10}


def rome_layer(name: str, s: Shape) -> int:
    """The layer ROME edits (rome.HPARAMS; a third of the depth for other models)."""
    from engramlib.rome import HPARAMS
    return HPARAMS[name].layer if name in HPARAMS else round(s.n_layer / 3)


def memit_layers(name: str, s: Shape) -> tuple:
    """MEMIT's critical layers (memit.HPARAMS; else the 5 layers that end at ROME's layer)."""
    from engramlib.memit import HPARAMS
    if name in HPARAMS:
        return tuple(HPARAMS[name].layers)
    top = rome_layer(name, s)
    return tuple(range(max(0, top - 4), top + 1))


def has_stats(name: str, layer: int) -> bool:
    """Is C for this layer shipped (TinyWorld 0-2) or published by the reference (no compute)?"""
    from engramlib.rome import PUBLISHED_STATS
    return (name == "tinyworld" and layer <= 2) or (name, layer) in PUBLISHED_STATS


def _c(s, name, layer, n):
    """C⁻¹ of a layer: TinyWorld's from 100,000 keys of its sentences, GPT-2's from n paragraphs."""
    if name == "tinyworld":
        return covariance_work(s, layer, 100000 / 11, 11, published=has_stats(name, layer))
    return covariance_work(s, layer, n, C_TEXT_T, published=has_stats(name, layer))


def _record_metrics(s: Shape, records: float) -> Work:
    """evaluate.record_metrics per record: p(new) vs p(true) on 1 rewrite, 2 paraphrase and 10
    neighbourhood prompts (both targets): 3 forwards of 2, 4 and 20 rows with full logits."""
    return forward_work(s, "CounterFact metrics", 3 * records, 9, PARAPHRASE_T, full_logits=True)


def _collapse_metrics(s: Shape, records: int, texts: int) -> Work:
    """memit.collapse_metrics: the edits, their neighbours, 100 facts, 200 paraphrases, perplexity."""
    return (forward_work(s, "collapse metrics", 1 + records * 20 / 32 + 2 + 4, 32, PARAPHRASE_T, full_logits=True)
            + perplexity_work(s, texts, TEXT_T))


def chapter_work(chapter: str, name: str, s: Shape, z: dict) -> list:
    """The heavy steps of `chapter` on model `name` (shape s) at sizes z, in order: [Work]."""
    L = s.n_layer
    layer = rome_layer(name, s)
    if chapter == "00":
        return [forward_work(s, "what the model knows (1,221 facts)", 66, 64, 21, full_logits=True),
                generate_work(s, "generate", 3, 16)]
    if chapter in ("03", "04"):
        n, T, blocks = z["examples"], 16, L
        steps = 2 * z["finetune_steps"] if chapter == "03" else 5 * z["steps"]
        mask_steps = 2 * (z["mask_steps"] + 21 * 8) if chapter == "03" else 60 + 4 * 8
        evals = (2 * 7 * 3 * 4 + 2 * 26 * 5 + 40) if chapter == "03" else 14 * 4 * 2
        return [finetune_work(s, "fine-tune (SGD)", steps, 32, T, blocks),
                finetune_work(s, "optimise the graft masks", mask_steps, 32, T, blocks),
                forward_work(s, "accuracy of grafts and lesions", evals, 128, T, full_logits=True)]
    if chapter == "05":
        return [forward_work(s, "known facts", 17, 64, PROMPT_T, full_logits=True),
                forward_work(s, "one MLP removed per layer", L + 1, z["zero_facts"], 14, full_logits=True),
                forward_work(s, "logit lens", z["lens_facts"], 1, 10, unembed_per_pass=L),
                Work("MLP as a memory: Σ v_i e_iᵀ", keep_device=s.square_bytes + s.c_proj_bytes),
                knowledge_neurons_work(s, z["kn_facts"]),
                forward_work(s, "silencing neurons", 10 * z["kn_facts"], 6, 10, full_logits=True)]
    if chapter == "06":
        attribution = Work("attribution", 3 * s.forward(z["samples"] + 1, 9), passes=3, blocks=3 * L,
                           device=s.activations(z["samples"] + 1, 9, L))     # 2 forwards + 1 backward
        return [forward_work(s, "known facts", 20, 64, PROMPT_T, full_logits=True),
                trace_work(s, z["samples"], 10, 9, kinds=3, window=10),
                trace_work(s, z["samples"], 9, 7, kinds=3, window=10).times(z["facts"], "average indirect effect"),
                (trace_work(s, z["samples"], 9, 7, kinds=3, window=1) + attribution)
                .times(z["facts"], "attribution vs trace (window 1)")]
    if chapter == "07":
        return [generate_work(s, "context templates", 20, 7.5, T0=1), _c(s, name, layer, z["c_texts"]),
                forward_work(s, "keys of other facts", z["other_facts"], 1, 10, layer + 1),
                rome_edit_work(s, layer), generate_work(s, "generate", 2, 20)]
    if chapter == "08":
        generations = generate_work(s, "generations", 2, 30)
        ft = finetune_work(s, "fine-tuning edit", 25, 6, 12, L - layer, trained_params=s.d * s.d_mlp)
        per_record = {"ROME": rome_edit_work(s, layer, keep=True), "naive": Work("naive edit", passes=2, blocks=2 * L),
                      "FT": ft}
        steps = [generate_work(s, "context templates", 20, 7.5, T0=1), _c(s, name, layer, z["c_texts"]),
                 Work("identity matrix", keep_device=s.square_bytes),
                 (_record_metrics(s, 1) + generations).times(z["records"], "unedited metrics and text (once)")]
        for method, edit in per_record.items():
            steps.append((edit + _record_metrics(s, 1) + generations).times(z["records"], f"{method} edits"))
        steps.append((rome_edit_work(s, layer, keep=True) + forward_work(s, "probe", 4, 64, PROMPT_T, full_logits=True))
                     .times(z["sequential"], "sequential ROME edits"))
        return steps
    if chapter == "09":
        layers, n, every = memit_layers(name, s), z["records"], z["every"]
        top = layers[-1]
        z_search = rome_edit_work(s, top, templates=6, T=20)
        keys = forward_work(s, "keys", len(layers) * n, 6, 20, top + 1)
        solve = Work("MEMIT's solves", flops64=len(layers) * 2 * s.d_mlp ** 3)
        covs = [_c(s, name, l, z["c_texts"]) for l in layers]
        memit = (z_search.times(n, "MEMIT: z") + keys + solve)
        memit.keep_device = len(layers) * s.c_proj_bytes
        dash = (_collapse_metrics(s, n, z["texts"]).times(n / every + 1)
                + perplexity_work(s, 8, 128).times(n + 1))
        rome_run = rome_edit_work(s, layer, keep=True).times(n, "ROME in sequence") + dash
        batched = (z_search.times(n) + keys + solve.times(n / 10) + dash)
        batched.device = max(batched.device, len(layers) * s.square_bytes + len(layers) * s.c_proj_bytes * n // 10)
        alpha = batched + Work("AlphaEdit's projections", flops64=len(layers) * (10 + 4 * n / 10) * s.d_mlp ** 3,
                               device=len(layers) * (s.square_bytes + 2 * s.square_bytes) + 4 * 2 * s.square_bytes)
        sum_covs = covs[0]
        for c in covs[1:]:
            sum_covs = sum_covs + c
        sum_covs.what = f"C and C⁻¹, layers {layers[0]}-{layers[-1]}"
        sum_covs.keep_device = len(layers) * s.square_bytes          # the chapter keeps C per layer
        return [generate_work(s, "context templates", 25, 8, T0=1), sum_covs, _c(s, name, layer, z["c_texts"]),
                _record_metrics(s, n).times(3), memit, rome_run, replace_what(batched, "MEMIT in sequence"),
                replace_what(alpha, "AlphaEdit in sequence")]
    if chapter == "10":
        swept = sweep_layers(L, layer, z["layers"])
        steps = [trace_work(s, 10, 9, 7, kinds=1, window=1).times(z["sweep_facts"], "trace per fact (MLP)")]
        for l in swept:
            steps.append(_c(s, name, l, z["c_texts"]))
            steps[-1].keep_host = 0
            steps.append(rome_edit_work(s, l, templates=3, T=16).times(z["sweep_facts"], f"ROME at layer {l}"))
        steps += [forward_work(s, "ripple checks", 2000, 3, 10, full_logits=True),
                  (rome_edit_work(s, layer) + forward_work(s, "honest metrics", 20, 2, 12, full_logits=True))
                  .times(z["edits"], "edits with ripple and honest checks"),
                  (knowledge_neurons_work(s, 1) + forward_work(s, "interventions", 124, 1, 10, full_logits=True))
                  .times(z["neuron_facts"], "knowledge-neuron interventions"),
                  Work("weights kept for the final check", keep_host=L * s.c_proj_bytes)]
        return steps
    if chapter == "11":       # NPO (100 steps) and RMU (200 steps through 3 of 8 blocks) dominate; each forget
        # fact in 5 phrasings (2.7 facts a subject for entities, 1 for facts: 9 rows a subject on average) plus
        # 64-128 retain rows a step (5 a subject at 20 subjects): 14 rows a subject
        rows = 14 * z["forget_subjects"]
        return [finetune_work(s, "unlearning steps (Adam)", z["unlearn_steps"], rows, 12,
                              trained_params=s.n_layer * s.block_params),
                finetune_work(s, "relearning curves", z["relearn_steps"], 20, 12,
                              trained_params=s.n_layer * s.block_params),
                forward_work(s, "reports and probes", 20 * 10, 64, PARAPHRASE_T, full_logits=True)]
    raise ValueError(f"unknown chapter {chapter!r}: one of {', '.join(FULL_SIZES)}")


def replace_what(work: Work, what: str) -> Work:
    work.what = what
    return work


def sweep_layers(n_layer: int, rome_layer: int, n: int) -> list:
    """`n` layers spread evenly over the depth, always with ROME's own layer: the layers chapter 10
    sweeps (all of them when n ≥ n_layer)."""
    if n >= n_layer:
        return list(range(n_layer))
    spread = {round(i * (n_layer - 1) / (n - 1)) for i in range(n)} if n > 1 else {rome_layer}
    spread.add(rome_layer)
    return sorted(spread)
