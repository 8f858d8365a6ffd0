"""Causal tracing speed, and how well attribution patching reproduces the trace.

    python benchmarks/trace_speed.py [--samples 10 50] [--models tinyworld gpt2-xl-shapes]
                                     [--loop-models tinyworld] [--facts 60] [--threads N]

1. Speed. For each model and sample count it computes the three window-1 grids (hidden state, MLP,
   attention) of one prompt three ways: the one-forward-per-site `trace_loop` (only for
   --loop-models: its cost grows with depth squared), the batched `trace` (one call per kind), and
   attribution patching (`attribution_trace_kinds`: one forward and one backward pass for all
   three). It prints seconds (the fastest of --repeats runs; on a CPU the process's CPU time, which
   other programs on a shared machine do not inflate), the speed-ups, and checks that the
   loop and the fast trace agree. Models: "tinyworld", "gpt2-standin" (GPT-2 small's shapes) and
   "gpt2-xl-shapes" (GPT-2 XL's shapes: 48 layers, width 1,600, 25 heads; random weights, 6 GB).
2. Agreement (--facts N > 0, on TinyWorld): over N facts TinyWorld knows (subject of >= 2 tokens,
   seed 0), the fast trace and attribution patching at window 1, the same noise draws. Per kind:
   Spearman's rank correlation of the indirect effects (sites from the subject on), how often both
   put the largest effect on the same site, and where the first-order estimate misses most.

Runs on a GPU too (the device is picked by engramlib.settings.pick_device).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tqdm.auto import tqdm  # noqa: E402

from engramlib.facts import load_facts  # noqa: E402
from engramlib.models import ModelAndTokenizer, known_facts, load_model, multi_token_known_facts  # noqa: E402
from engramlib.settings import pick_device  # noqa: E402
from engramlib.tracing import (BUCKETS, KINDS, agreement, attribution_trace_kinds,  # noqa: E402
                               bucket_effects, noise_level, trace, trace_loop)

PROMPT, SUBJECT, ANSWER = "The Space Needle is located in the city of", "Space Needle", "Seattle"
SHORT = "The Space Needle is in"          # GPT-2 XL's shapes on a CPU: a short prompt
NAMES = {None: "hidden", "mlp": "mlp", "attn": "attn"}


def random_gpt2(device, name: str, **config) -> ModelAndTokenizer:
    """A GPT2LMHeadModel with random weights and the given shapes, with GPT-2's real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval().requires_grad_(False).to(device)
    tok = GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "fixtures" / "gpt2_tokenizer")
    return ModelAndTokenizer(model=model, tokenizer=tok, name=name)


def get_model(name: str, device) -> ModelAndTokenizer:
    if name == "gpt2-standin":
        return random_gpt2(device, "gpt2-standin (random, GPT-2 small shapes)")
    if name == "gpt2-xl-shapes":
        return random_gpt2(device, "gpt2-xl-shapes (random)", n_layer=48, n_embd=1600, n_head=25)
    return load_model(name, device=device)


def timed(mt, fn, repeats: int):
    """(result of fn(), the fastest of `repeats` runs in seconds). On a CPU the seconds are this
    process's CPU time (all its threads), which other programs on a shared machine do not inflate;
    on a GPU, wall-clock time."""
    clock = time.perf_counter if mt.device.type == "cuda" else time.process_time
    best, result = float("inf"), None
    for _ in range(repeats):
        start = clock()
        result = fn()
        if mt.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return result, best


def speed(mt, prompt: str, samples: int, loop: bool, repeats: int) -> dict:
    """Seconds for the three window-1 grids: per-site loop (if loop), fast trace, attribution."""
    kw = dict(samples=samples, answer=None)
    three = lambda fn: [fn(mt, prompt, SUBJECT, kind=kind, window=1, **kw) for kind in KINDS]
    fast, fast_s = timed(mt, lambda: three(trace), repeats)
    _, attr_s = timed(mt, lambda: attribution_trace_kinds(mt, prompt, SUBJECT, **kw), max(3, repeats))
    out = {"fast": fast_s, "attribution": attr_s, "loop": float("nan"), "diff": float("nan")}
    if loop:
        ref, out["loop"] = timed(mt, lambda: three(trace_loop), 1)
        out["diff"] = max((a.scores - b.scores).abs().max().item() for a, b in zip(ref, fast))
    return out


def speed_table(args, device):
    print(f"device {device}, torch threads {torch.get_num_threads()}; the three window-1 grids "
          f"(hidden, MLP, attention) of one prompt; seconds = fastest of {args.repeats} runs "
          f"({'wall-clock' if device == 'cuda' else 'CPU time of this process'})")
    print(f"{'model':<24}{'tokens':>7}{'samples':>8}{'loop s':>9}{'fast s':>9}{'attrib. s':>10}"
          f"{'loop/fast':>10}{'fast/attrib.':>13}{'max |loop-fast|':>16}")
    for name in args.models:
        mt = get_model(name, device)
        prompt = SHORT if name == "gpt2-xl-shapes" and device == "cpu" else PROMPT
        trace(mt, prompt, SUBJECT, samples=2)                     # warm-up
        attribution_trace_kinds(mt, prompt, SUBJECT, samples=2)
        for samples in args.samples:
            r = speed(mt, prompt, samples, name in args.loop_models, args.repeats)
            T = len(mt.tokenizer(prompt)["input_ids"])
            print(f"{name:<24}{T:>7}{samples:>8}{r['loop']:>9.2f}{r['fast']:>9.2f}{r['attribution']:>10.3f}"
                  f"{r['loop'] / r['fast']:>9.1f}x{r['fast'] / r['attribution']:>12.1f}x{r['diff']:>16.1e}")
        del mt


def agreement_table(args, device):
    """Trace vs attribution over --facts facts TinyWorld knows, per kind."""
    mt = load_model("tinyworld", device=device)
    facts = multi_token_known_facts(mt, args.facts, seed=0)
    noise = noise_level(mt, [f.subject for f in known_facts(mt, load_facts())])   # as chapter 06
    samples = args.agreement_samples
    rows = {kind: {"rho": [], "top": [], "gap": [], "over": 0} for kind in KINDS}
    mlp0 = {"trace": [], "attribution": [], "total": []}
    for f in tqdm(facts, desc="agreement"):
        kw = dict(samples=samples, noise=noise, answer=f.object)
        est = attribution_trace_kinds(mt, f.prompt, f.subject, **kw)
        for kind, a in zip(KINDS, est):
            ref = trace(mt, f.prompt, f.subject, kind=kind, window=1, **kw)
            agree = agreement(ref, a)
            row = rows[kind]
            row["rho"].append(agree["rank_correlation"])
            row["top"].append(agree["same_top_site"])
            row["gap"].append((bucket_effects(a) - bucket_effects(ref)).abs())   # [6, L]
            row["over"] += int(a.scores.max() > 1)
            if kind == "mlp":
                last = ref.subject_range[1] - 1
                mlp0["trace"].append(ref.indirect_effects[last, 0].item())
                mlp0["attribution"].append(a.indirect_effects[last, 0].item())
                mlp0["total"].append(ref.total_effect)
    n = len(facts)
    print(f"\nagreement on {mt.name}: {n} facts it knows (subject >= 2 tokens, seed 0), {samples} noise "
          f"samples, noise {noise:.3f} (3 sigma of all known subjects, as chapter 06), window 1; "
          f"sites from the subject's first token on")
    print(f"{'kind':<8}{'rank corr. median':>18}{'mean':>7}{'min':>7}{'same top site':>15}{'estimate > 1':>14}")
    for kind in KINDS:
        row = rows[kind]
        print(f"{NAMES[kind]:<8}{statistics.median(row['rho']):>18.2f}{statistics.mean(row['rho']):>7.2f}"
              f"{min(row['rho']):>7.2f}{sum(row['top']) / n:>14.0%}{row['over'] / n:>14.0%}")
    print("mean |estimate - trace| of p(answer), per layer:")
    for kind in KINDS:
        gap = torch.stack(rows[kind]["gap"]).nanmean(0)                   # [6, L]
        for bucket in ("last subject token", "last token"):
            values = " ".join(f"{x:5.2f}" for x in gap[BUCKETS.index(bucket)].tolist())
            print(f"  {NAMES[kind]:<7}{bucket:<20}{values}")
    t, a, total = mlp0["trace"], mlp0["attribution"], mlp0["total"]
    print(f"MLP 0 at the last subject token: mean indirect effect, trace {statistics.mean(t):.2f}, "
          f"attribution {statistics.mean(a):.2f} (mean total effect {statistics.mean(total):.2f}); "
          f"mean |difference| {statistics.mean(abs(x - y) for x, y in zip(a, t)):.2f}; attribution above "
          f"the trace in {sum(x > y for x, y in zip(a, t))} of {n} facts, above the total effect "
          f"(an estimated p above the clean one) in {sum(x > y for x, y in zip(a, total))}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--models", nargs="*", default=["tinyworld", "gpt2-xl-shapes"])
    parser.add_argument("--loop-models", nargs="*", default=["tinyworld"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--facts", type=int, default=60, help="0: no agreement table")
    parser.add_argument("--agreement-samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    if args.models:
        speed_table(args, device)
    if args.facts:
        agreement_table(args, device)


if __name__ == "__main__":
    main()
