"""Does summing Σ k kᵀ in float32 give the same C as float64, to the precision ROME needs?

    python benchmarks/covariance_precision.py            # TinyWorld layer 0 and a random GPT-2 small

Prints, for each model, the relative error of C (Frobenius) and of ROME's direction u = C⁻¹k* (both
C inverted in float64, as `rome.inverse_key_covariance`), float32 accumulation against float64, and
the two accumulations' time. ROME needs u: an error far below the spread of C between two samples
of texts (also printed: C from the first half of the texts against C from all) does not matter.
"""
import json
import time
from pathlib import Path

import torch

from engramlib import rome
from engramlib.models import ModelAndTokenizer, load_model, prepare_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def gpt2_random():
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
    tok = prepare_tokenizer(GPT2TokenizerFast.from_pretrained(ROOT / "tests/fixtures/gpt2_tokenizer"))
    texts = json.loads((ROOT / "tests/fixtures/standin/wikitext-103-paragraphs.json").read_text())
    return ModelAndTokenizer(model=model, tokenizer=tok, name="gpt2-random"), 4, texts[:120]


def tinyworld():
    mt = load_model("tinyworld", device="cpu")
    return mt, 0, rome.generic_texts(mt)[1]


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compare(mt, layer, texts):
    runs = {}
    for dtype in (torch.float64, torch.float32):
        start = time.perf_counter()
        runs[dtype] = rome.second_moment(mt, layer, texts, n_samples=len(texts), dtype=dtype, progress=False)
        runs[dtype]["seconds"] = time.perf_counter() - start
    half = rome.second_moment(mt, layer, texts, n_samples=len(texts) // 2, dtype=torch.float64, progress=False)
    C64, C32 = runs[torch.float64]["C"], runs[torch.float32]["C"]
    probe = rome.second_moment(mt, layer, texts[-8:], n_samples=8, progress=False)   # some keys
    keys = torch.linalg.eigh(probe["C"].double())[1][:, -4:].T * probe["C"].diagonal().sum().sqrt()
    inv64, inv32, inv_half = (torch.linalg.inv(C.double()) for C in (C64, C32, half["C"]))
    u_err = max(relative(inv32 @ k, inv64 @ k) for k in keys)
    u_half = max(relative(inv_half @ k, inv64 @ k) for k in keys)
    print(f"{mt.name} layer {layer}: {runs[torch.float64]['n_keys']:,} keys of {len(texts):,} texts, "
          f"cond(C) = {torch.linalg.cond(C64.double()).item():.1e}")
    print(f"  float32 vs float64 sum:  C {relative(C32, C64):.1e}   u = C⁻¹k {u_err:.1e}   "
          f"time {runs[torch.float32]['seconds']:.1f} s vs {runs[torch.float64]['seconds']:.1f} s")
    print(f"  half the texts vs all:   C {relative(half['C'], C64):.1e}   u = C⁻¹k {u_half:.1e}")
    print(f"  ratio (float32 error / sampling spread) of u: {u_err / u_half:.1e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for make in (tinyworld, gpt2_random):
        compare(*make())
