"""Plans: the memory and time each chapter needs on a model and a device, and the model it picks.

`plan(chapter, model_name, device)` counts the work the chapter does (`engramlib.costs`: FLOPs,
passes, what each step holds and keeps) at the sizes it uses, and returns a `Plan`: the model, GPU
and host memory, minutes of compute, and the sizes, shrunk on a GPU until the chapter fits its
time. `python -m engramlib.budget --device t4` prints every chapter's plan on Colab's T4.

The grafting and unlearning chapters hold whole copies of the block weights, so their memory is
counted in copies (`STEPS`, measured: tests/test_budget.py); `model_for_chapter` walks down the
GPT-2 family until a chapter's memory fits the device. Example (Colab's T4): chapter 03's mask
optimisation needs about 22 copies of the block weights, ≈ 128 GiB on gpt2-xl, so it runs on gpt2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engramlib import costs

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
    # graft.optimize_mask during chapter 03's sweep. Kept: θ_pre, θ_ft, the fine-tune's gradients,
    # two earlier masks, the base mask, S, 1 − 2γ_base, θ_ft − θ_pre, the best and the current binary
    # mask (11); per step: S − b, σ, γ, γ ⊙ Δ, the grafted weights, ∂L/∂S and the autograd buffers
    # (about 8); sorting the scores for the top-k (about 2). Measured on a stand-in: 21.3 copies
    # (tests/test_budget.py, peak RSS).
    "03": Step("optimise a graft mask (chapter 03's sweep)", blocks=22),
    # chapter 03's step plus θ_ft of task B and A's mask as frozen booleans
    "04": Step("learn two skills in disjoint regions", blocks=24),
    # unlearning by gradient steps on every block weight with Adam: the gradients, Adam's two
    # moments and the undo copy of the trained weights (4), and the 2 copies a kept run holds (6);
    # the forget and retain batches' activations
    "11": Step("unlearning: gradient steps with Adam on the blocks", blocks=6, allowance=2 * GiB),
}


def gpt2_param_counts(n_layer: int, n_embd: int, vocab: int = 50257, n_positions: int = 1024) -> tuple:
    """(all parameters, transformer-block parameters) of a GPT-2 shape. A block has
    12 d² + 13 d parameters (attention 4d² + 4d, MLP 8d² + 5d, two layer norms 4d)."""
    s = costs.Shape(n_layer, n_embd, vocab, n_positions)
    return s.params, n_layer * s.block_params


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
    """Estimated peak memory of `chapter` at its full sizes for a GPT-2 shape, in bytes: on the GPU
    (the model, what the chapter keeps, its largest step, the CUDA context)."""
    if chapter in STEPS:
        step = STEPS[chapter]
        total, blocks = gpt2_param_counts(n_layer, n_embd, vocab, n_positions)
        d_mlp = 4 * n_embd
        return (step.model * total + step.blocks * blocks) * dtype_bytes + step.square * d_mlp ** 2 * 4 + step.allowance
    if chapter not in costs.FULL_SIZES:
        raise ValueError(f"unknown chapter {chapter!r}: one of {', '.join(costs.FULL_SIZES)}")
    shape = costs.Shape(n_layer, n_embd, vocab, n_positions)
    return int(_evaluate(chapter, None, UNLIMITED_GPU, costs.FULL_SIZES[chapter], shape).gpu_gib * GiB)


def device_bytes(device: str | None = None) -> int:
    """Memory of the device the course computes on: the CUDA GPU's total memory, else the
    machine's RAM (psutil, on Linux, macOS and Windows alike; Apple's GPUs share the RAM)."""
    import psutil
    from engramlib.settings import pick_device
    device = device or pick_device()
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().total


# --- devices and plans ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """What a plan needs to know of a device. flops / flops64: peak float32 / float64 operations per
    second; efficiency: the fraction of that peak a GPT-2 pass sustains; pass_latency and
    block_latency: seconds a pass spends, and spends per transformer block, however small its
    batch (kernel launches); memory: bytes of the compute device (0: it computes in host memory);
    host: bytes of host memory."""
    name: str
    flops: float
    flops64: float
    efficiency: float
    pass_latency: float
    block_latency: float
    memory: int
    host: int
    source: str


# Calibration (benchmarks/plan_vs_measured.py, random GPT-2 XL and GPT-2 shapes, 2026-12-04): on an
# H200 the course's steps ran at 0.65-1.08 of a 1,024² float32 matmul's speed measured in the same
# run (0.8 typical), a pass cost 6 ms plus 0.42 ms per block however small its batch (eager
# PyTorch launching kernels from the host); on this project's CPU (one thread, quiet) at 0.53-0.83 (0.6: within ±30 % of both runs).
GPU_EFFICIENCY, CPU_EFFICIENCY = 0.8, 0.6
T4 = Device("t4", flops=8.1e12, flops64=0.25e12, efficiency=0.5, pass_latency=9e-3, block_latency=6e-4,
            memory=int(14.7 * GiB), host=int(12.7e9),
            source="NVIDIA T4 datasheet: 8.1 TFLOPS float32 peak (65 float16), float64 at 1/32 of it "
                   "(Turing); 16 GB, of which PyTorch sees 14.7 GiB; Colab's free host: 12.7 GB of RAM. "
                   "Sustained: 0.5 of peak (its 70 W cap holds the clock near 1.2 of its 1.59 GHz, and "
                   "GPT-2's steps reach 0.8 of a matmul's speed on the H200 here); latency 9 ms per pass "
                   "+ 0.6 ms per block (1.5 × the H200 machine's, for Colab's two slower vCPUs)")


def matmul_flops(device: str = "cpu", dtype=torch.float32, n: int = 1024, seconds: float = 0.2) -> float:
    """Measured matrix-multiply throughput of `device` (FLOP/s), over about `seconds`."""
    import time
    a = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a @ a
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    sync()
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def measured_device(device: str | None = None) -> Device:
    """This machine's CPU, or its GPU, with its throughput measured now (a fraction of a second)."""
    import psutil
    from engramlib.settings import pick_device
    device = device or pick_device()
    gpu = str(device).startswith("cuda")
    return Device(f"{device} (measured)", matmul_flops(device), matmul_flops(device, torch.float64, 512),
                  GPU_EFFICIENCY if gpu else CPU_EFFICIENCY, 6e-3 if gpu else 5e-4, 4.2e-4 if gpu else 2e-5,
                  device_bytes(device) if gpu else 0,
                  psutil.virtual_memory().total, "measured: a matrix multiply timed just now")


def device_named(device) -> Device:
    """"t4" (a Colab T4, from its datasheet), "cpu" (this CPU, measured), "current" (this
    machine's GPU if it has one, else its CPU, measured), or a `Device`."""
    if isinstance(device, Device):
        return device
    if device == "t4":
        return T4
    if device == "cpu":
        return measured_device("cpu")
    if device == "current":
        return measured_device(None)
    raise ValueError(f"unknown device {device!r}: use 't4', 'cpu' or 'current'")


@dataclass
class Plan:
    """A chapter's plan on one model and device, at the sizes it will run (`sizes`)."""
    chapter: str
    model: str
    device: str
    sizes: dict
    gpu_gib: float          # peak on the GPU (0 on a CPU)
    host_gib: float         # peak host memory
    minutes: float          # compute, at full size (the model's first download aside)
    steps: list             # [(what, minutes)]
    fits: bool
    note: str = ""          # why another model than the one asked for

    def __str__(self) -> str:
        full = costs.FULL_SIZES[self.chapter]
        sizes = ", ".join(f"{k} {v}" + (f" (full {full[k]})" if v != full[k] else "") for k, v in self.sizes.items())
        where = f"GPU {self.gpu_gib:.1f} GiB, host {self.host_gib:.1f} GiB" if self.gpu_gib else f"memory {self.host_gib:.1f} GiB"
        return (f"Plan for chapter {self.chapter} on {self.model} ({self.device}): about {self.minutes:.0f} min of "
                f"compute, {where}" + (f"; sizes: {sizes}" if sizes else "") + ("" if self.fits else "; DOES NOT FIT")
                + (f"\n({self.note})" if self.note else ""))


UNLIMITED_GPU = Device("any GPU", 1e12, 1e11, 1.0, 0.0, 0.0, 2 ** 62, 2 ** 62, "memory counts only")


def seconds_of(work: costs.Work, dev: Device) -> float:
    """How long `work` takes on `dev`: its FLOPs at the sustained speed, plus launch latency."""
    return (work.flops / (dev.flops * dev.efficiency) + work.flops64 / (dev.flops64 * dev.efficiency)
            + work.passes * dev.pass_latency + work.blocks * dev.block_latency)
HOST_BASE = 2 * GiB       # Python, torch, transformers and (on a GPU) the CUDA libraries
CUDA_CONTEXT = GiB // 2   # the CUDA context and the allocator's slack


def _shape(name: str) -> costs.Shape:
    return costs.Shape(*shape_of(name))


def _evaluate(chapter: str, name: str | None, dev: Device, sizes: dict, s: costs.Shape | None = None) -> Plan:
    s = s or _shape(name)
    works = costs.chapter_work(chapter, name, s, sizes)
    seconds = [seconds_of(w, dev) for w in works]
    held, peak = 0, 0
    for w in works:
        peak = max(peak, held + w.device)
        held += w.keep_device
    kept_host = sum(w.keep_host for w in works)
    if chapter in STEPS:                                    # grafting and unlearning: counted in copies
        peak = peak_bytes(chapter, s.n_layer, s.d, s.vocab, s.n_positions) - s.model_bytes - CUDA_CONTEXT
    if dev.memory:
        gpu = s.model_bytes + peak + CUDA_CONTEXT
        host = HOST_BASE + max(s.model_bytes, kept_host)
        fits = gpu <= dev.memory and host <= dev.host
    else:
        gpu, host = 0, HOST_BASE + s.model_bytes + peak + kept_host
        fits = host <= dev.host
    return Plan(chapter, name, dev.name, dict(sizes), gpu / GiB, host / GiB, sum(seconds) / 60,
                [(w.what, t / 60) for w, t in zip(works, seconds)], fits)


def _scaled(chapter: str, f: float) -> dict:
    full = costs.FULL_SIZES[chapter]
    return {k: (max(costs.MIN_SIZES[k], round(v * f)) if k in costs.SCALABLE.get(chapter, ()) and v else v)
            for k, v in full.items()}


def plan(chapter: str, model_name: str | None = None, device="current", minutes: float = 15,
         fallback: bool = True) -> Plan:
    """The plan of `chapter` on `model_name` and `device` ("t4", "cpu", "current" or a `Device`).

    model_name None: the model the chapter loads by default there (gpt2-xl on a GPU with ≥ 12 GB,
    else TinyWorld; $ENGRAM_MODEL for "current"). With `fallback`, a model whose plan does not fit
    (memory, or `minutes` at the smallest sizes) gives way to the largest smaller GPT-2 that does,
    and the plan says why. On a GPU, sizes shrink (never below `costs.MIN_SIZES`) until the compute
    fits `minutes`; on a CPU a chapter runs its full sizes, however long it takes."""
    if chapter not in costs.FULL_SIZES:
        raise ValueError(f"unknown chapter {chapter!r}: one of {', '.join(costs.FULL_SIZES)}")
    dev = device_named(device)
    if model_name is None:
        from engramlib.models import default_model_name
        model_name = default_model_name() if device == "current" else \
            ("gpt2-xl" if dev.memory >= 12e9 else "tinyworld")
    first = _sized_plan(chapter, model_name, dev, minutes)
    if first.fits or not fallback or model_name not in FALLBACK_ORDER:
        return first
    for name in FALLBACK_ORDER[FALLBACK_ORDER.index(model_name) + 1:]:
        p = _sized_plan(chapter, name, dev, minutes)
        if p.fits or name == "tinyworld":
            p.note = (f"{model_name} would need {first.gpu_gib:.1f} GiB and {first.minutes:.0f} min here "
                      f"(at the smallest sizes), more than this device allows, so the chapter uses {name}")
            return p
    return first


def _sized_plan(chapter: str, model_name: str, dev: Device, minutes: float) -> Plan:
    """The plan of one model, its sizes shrunk on a GPU until the compute fits `minutes`."""
    full = _evaluate(chapter, model_name, dev, costs.FULL_SIZES[chapter])
    if not dev.memory or model_name == "tinyworld" or full.minutes <= minutes:
        return full
    lo, hi = 0.0, 1.0                                   # the largest common scale that fits the time
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _evaluate(chapter, model_name, dev, _scaled(chapter, mid)).minutes <= minutes else (lo, mid)
    p = _evaluate(chapter, model_name, dev, _scaled(chapter, lo))
    p.fits = p.fits and p.minutes <= minutes
    return p


def fits(chapter: str, name: str, memory: int) -> bool:
    """Does `chapter`'s memory at full size on model `name` fit in `memory` bytes? (TinyWorld always fits.)"""
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
            print(f"Chapter {chapter} needs about {need:.0f} GiB on {preferred}; "
                  f"this device has {memory / GiB:.0f} GiB, so the chapter uses {name}.")
            return name
    return "tinyworld"


def plan_table(device="t4", models=None) -> str:
    """A printable table: for each chapter, the model its plan picks on `device` (or each of
    `models`), its peak memory, time and the sizes it shrank."""
    dev = device_named(device)
    lines = [f"Plans on {dev.name}: {dev.source}", "",
             f"{'chapter':<8}{'model':<13}{'GPU GiB':>8}{'host GiB':>9}{'minutes':>8}  sizes (shrunk from full)"]
    for chapter in costs.FULL_SIZES:
        for name in (models or [None]):
            p = plan(chapter, name, dev)
            shrunk = ", ".join(f"{k} {v}/{costs.FULL_SIZES[chapter][k]}" for k, v in p.sizes.items()
                               if v != costs.FULL_SIZES[chapter][k])
            lines.append(f"{chapter:<8}{p.model:<13}{p.gpu_gib:>8.1f}{p.host_gib:>9.1f}{p.minutes:>8.1f}  "
                         f"{shrunk or '-'}{'' if p.fits else '   DOES NOT FIT'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m engramlib.budget [--device t4|cpu|current] [--model NAME ...]: the plans' table."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m engramlib.budget", description=main.__doc__)
    parser.add_argument("--device", default="t4", choices=("t4", "cpu", "current"))
    parser.add_argument("--model", nargs="*", default=None, help="models to plan (default: what each chapter picks)")
    args = parser.parse_args(argv)
    print(plan_table(args.device, args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
