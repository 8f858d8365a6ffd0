"""Memory plans: how much memory each chapter's heaviest step needs, and which model fits a device.

A chapter's peak is counted in copies of what it holds at once (`STEPS`): the whole model, extra
full-size copies of the transformer blocks' weights (grafting keeps θ_pre, θ_ft, masks, scores and
their gradients), and d_mlp × d_mlp matrices (ROME's C and C⁻¹, MEMIT's C and AlphaEdit's P per
layer), plus a fixed allowance for activations and the CUDA context. `peak_bytes` turns that into
bytes for a GPT-2 shape; `model_for_chapter` walks down the GPT-2 family until the plan fits.

Example (Colab's T4, 16 GB): gpt2-xl fits chapters 07-10, chapter 03's mask optimisation needs
about 22 copies of the block weights, ≈ 130 GB for gpt2-xl, so chapter 03 runs on gpt2 there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GiB = 2 ** 30
# (n_layer, n_embd) of the Hub models; all have GPT-2's vocabulary (50,257) and 1,024 positions
GPT2_SHAPES = {"gpt2-xl": (48, 1600), "gpt2-large": (36, 1280), "gpt2-medium": (24, 1024), "gpt2": (12, 768)}
FALLBACK_ORDER = ("gpt2-xl", "gpt2-large", "gpt2-medium", "gpt2", "tinyworld")   # largest first


@dataclass(frozen=True)
class Step:
    """A chapter's heaviest step, in copies: `model` whole models, `blocks` extra copies of the block
    weights, `square` extra d_mlp × d_mlp float32 matrices; `allowance` bytes for activations etc."""
    what: str
    model: int = 1
    blocks: int = 0
    square: int = 0
    allowance: int = 1 * GiB


STEPS = {
    "00": Step("load the model and generate"),
    "01": Step("toy memories (no language model)", model=0, allowance=GiB // 4),
    "02": Step("toy memories (no language model)", model=0, allowance=GiB // 4),
    # graft.optimize_mask during chapter 03's sweep. Kept: θ_pre, θ_ft, the fine-tune's gradients,
    # two earlier masks, the base mask, S, 1 − 2γ_base, θ_ft − θ_pre, the best and the current binary
    # mask (11); per step: S − b, σ, γ, γ ⊙ Δ, the grafted weights, ∂L/∂S and the autograd buffers
    # (about 8); sorting the scores for the top-k (about 2). Measured on a stand-in: 21.3 copies
    # (tests/test_budget.py, peak RSS).
    "03": Step("optimise a graft mask (chapter 03's sweep)", blocks=22),
    # chapter 03's step plus θ_ft of task B and A's mask as frozen booleans
    "04": Step("learn two skills in disjoint regions", blocks=24),
    "05": Step("logit lens, attribution over all layers", allowance=2 * GiB),
    "06": Step("batched causal trace", allowance=3 * GiB),
    "07": Step("ROME: C, C⁻¹ and the search for v*", square=2, allowance=2 * GiB),
    "08": Step("ROME, naive and fine-tuned edits", square=2, blocks=0, allowance=2 * GiB),
    # MEMIT / AlphaEdit over 5 layers: C and P per layer, plus the preserved keys' Σkkᵀ per layer
    "09": Step("MEMIT and AlphaEdit over the critical layers", square=15, allowance=2 * GiB),
    "10": Step("ROME at every layer (one C⁻¹ at a time)", square=2, allowance=2 * GiB),
    # unlearning by gradient steps on every block weight with Adam: the gradients, Adam's two
    # moments and the undo copy of the trained weights (4); the forget and retain batches' activations
    "11": Step("unlearning: gradient steps with Adam on the blocks", blocks=4, allowance=2 * GiB),
}


def gpt2_param_counts(n_layer: int, n_embd: int, vocab: int = 50257, n_positions: int = 1024) -> tuple:
    """(all parameters, transformer-block parameters) of a GPT-2 shape. A block has
    12 d² + 13 d parameters (attention 4d² + 4d, MLP 8d² + 5d, two layer norms 4d)."""
    block = 12 * n_embd ** 2 + 13 * n_embd
    total = n_layer * block + (vocab + n_positions) * n_embd + 2 * n_embd
    return total, n_layer * block


def shape_of(name: str) -> tuple:
    """(n_layer, n_embd, vocab, n_positions) of a model name, without downloading it."""
    if not name:
        raise ValueError("no model name: pass one of " + ", ".join(FALLBACK_ORDER) + " or a local folder "
                         "(model_for_chapter(chapter, None) picks the default model first)")
    if name in GPT2_SHAPES:
        return (*GPT2_SHAPES[name], 50257, 1024)
    from transformers import AutoConfig
    from engramlib.models import _source
    config = AutoConfig.from_pretrained(_source(name))
    return config.n_layer, config.n_embd, config.vocab_size, config.n_positions


def peak_bytes(chapter: str, n_layer: int, n_embd: int, vocab: int = 50257, n_positions: int = 1024,
               dtype_bytes: int = 4) -> int:
    """Estimated peak memory of `chapter`'s heaviest step for a GPT-2 shape, in bytes."""
    if chapter not in STEPS:
        raise ValueError(f"unknown chapter {chapter!r}: one of {', '.join(STEPS)}")
    step = STEPS[chapter]
    total, blocks = gpt2_param_counts(n_layer, n_embd, vocab, n_positions)
    d_mlp = 4 * n_embd
    return (step.model * total + step.blocks * blocks) * dtype_bytes + step.square * d_mlp ** 2 * 4 + step.allowance


def device_bytes(device: str | None = None) -> int:
    """Memory of the device the course computes on: the CUDA GPU's total memory, else the
    machine's RAM (psutil, on Linux, macOS and Windows alike; Apple's GPUs share the RAM)."""
    import psutil
    from engramlib.settings import pick_device
    device = device or pick_device()
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().total


def fits(chapter: str, name: str, memory: int) -> bool:
    """Does `chapter`'s plan on model `name` fit in `memory` bytes? (TinyWorld always fits.)"""
    if name == "tinyworld":
        return True
    return peak_bytes(chapter, *shape_of(name)) <= memory


def model_for_chapter(chapter: str, preferred: str | None = None, memory: int | None = None) -> str:
    """`preferred` if the chapter's plan fits the device, else the largest smaller GPT-2 that
    does (printing why). preferred: a model name, or None (an unset ENGRAM_MODEL) for the model
    `load_model()` would choose (`models.default_model_name()`: TinyWorld without a large GPU).
    memory: bytes available (default `device_bytes()`)."""
    from engramlib.models import default_model_name
    preferred = preferred or default_model_name()
    memory = memory or device_bytes()
    if fits(chapter, preferred, memory):
        return preferred
    order = FALLBACK_ORDER[FALLBACK_ORDER.index(preferred) + 1:] if preferred in FALLBACK_ORDER else FALLBACK_ORDER
    for name in order:
        if fits(chapter, name, memory):
            need = peak_bytes(chapter, *shape_of(preferred)) / GiB
            print(f"Chapter {chapter} ({STEPS[chapter].what}) needs about {need:.0f} GiB on {preferred}; "
                  f"this device has {memory / GiB:.0f} GiB, so the chapter uses {name}.")
            return name
    return "tinyworld"


def plan_table(memory: int, models=FALLBACK_ORDER[:-1]) -> str:
    """A printable table: each chapter's estimated peak (GiB) per model, * where it does not fit."""
    lines = [f"{'chapter':<8}" + "".join(f"{m:>13}" for m in models)]
    for chapter in STEPS:
        cells = []
        for m in models:
            gib = peak_bytes(chapter, *shape_of(m)) / GiB
            cells.append(f"{gib:>12.1f}{'*' if gib * GiB > memory else ' '}")
        lines.append(f"{chapter:<8}" + "".join(cells))
    return "\n".join(lines)
