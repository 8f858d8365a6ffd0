"""Causal tracing speed: the batched `trace` against the one-forward-per-site `trace_loop`.

    python benchmarks/trace_speed.py [--samples 10 50] [--models tinyworld gpt2-standin] [--threads N]

For each model and sample count it traces one prompt with all three kinds (hidden state, MLP,
attention), checks that both give the same scores, and prints forward passes, seconds and the
speed-up. Runs on a GPU too (the device is picked by engramlib.settings.pick_device).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engramlib.models import ModelAndTokenizer, load_model  # noqa: E402
from engramlib.settings import pick_device  # noqa: E402
from engramlib.tracing import trace, trace_loop  # noqa: E402

PROMPT, SUBJECT, ANSWER = "The Space Needle is located in the city of", "Space Needle", "Seattle"


def gpt2_standin(device):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().to(device)
    tok = GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "fixtures" / "gpt2_tokenizer")
    return ModelAndTokenizer(model=model, tokenizer=tok, name="gpt2-standin (random, GPT-2 small shapes)")


def count_forwards(mt, fn, **kwargs):
    calls = 0

    def hook(*_):
        nonlocal calls
        calls += 1
    # every forward, HF or engramlib's own, ends with the final layer norm
    handle = mt.model.transformer.ln_f.register_forward_hook(hook)
    try:
        start = time.perf_counter()
        result = fn(mt, PROMPT, SUBJECT, answer=ANSWER, **kwargs)
        if mt.device.type == "cuda":
            torch.cuda.synchronize()
        return result, calls, time.perf_counter() - start
    finally:
        handle.remove()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--models", nargs="+", default=["tinyworld", "gpt2-standin"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    print(f"device {device}, torch threads {torch.get_num_threads()}, prompt {PROMPT!r}")
    print(f"{'model':<14}{'samples':>8}{'loop fwd':>10}{'fast fwd':>10}{'loop s':>9}{'fast s':>9}{'speed-up':>10}{'max |diff|':>12}")
    for name in args.models:
        mt = gpt2_standin(device) if name == "gpt2-standin" else load_model(name, device=device)
        trace(mt, PROMPT, SUBJECT, samples=2, answer=ANSWER)            # warm-up
        for samples in args.samples:
            loop_s = fast_s = 0.0
            loop_f = fast_f = 0
            diff = 0.0
            for kind in (None, "mlp", "attn"):
                ref, f1, t1 = count_forwards(mt, trace_loop, kind=kind, samples=samples)
                new, f2, t2 = count_forwards(mt, trace, kind=kind, samples=samples)
                loop_s, fast_s, loop_f, fast_f = loop_s + t1, fast_s + t2, loop_f + f1, fast_f + f2
                diff = max(diff, (ref.scores - new.scores).abs().max().item())
            print(f"{name[:13]:<14}{samples:>8}{loop_f:>10}{fast_f:>10}{loop_s:>9.2f}{fast_s:>9.2f}"
                  f"{loop_s / fast_s:>9.1f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
