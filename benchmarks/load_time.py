"""How long `load_model("tinyworld")` takes, against reading the same weights file in the same run.

    python benchmarks/load_time.py [--repeats 5] [--threads 1]

The reference is `safetensors.torch.load_file` of TinyWorld's `model.safetensors`: the least any
loader must do. `load_model` also reads the config and the tokenizer, builds a `GPT2LMHeadModel`
and ties its weights. Libraries and the model classes (which transformers imports lazily, in
seconds) are imported before timing: importing is not loading a model.
Prints the first call of each and the median over `--repeats` more, and the ratios.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel  # noqa: E402,F401
from safetensors.torch import load_file  # noqa: E402

from engramlib.models import load_model  # noqa: E402
from engramlib.tinyworld import WEIGHTS_DIR  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = WEIGHTS_DIR / "model.safetensors"
    reference = lambda: load_file(weights)                              # noqa: E731
    full = lambda: load_model("tinyworld", device="cpu")               # noqa: E731
    first_ref, first_full = median_seconds(reference, 1), median_seconds(full, 1)
    ref, model = median_seconds(reference, args.repeats), median_seconds(full, args.repeats)
    print(f"TinyWorld ({weights.stat().st_size / 1e6:.1f} MB of weights), torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'':<36}{'first call':>12}{'median of ' + str(args.repeats):>14}")
    print(f"{'safetensors load_file (reference)':<36}{first_ref:>10.3f} s{ref:>12.3f} s")
    print(f"{'load_model(tinyworld)':<36}{first_full:>10.3f} s{model:>12.3f} s")
    print(f"{'ratio':<36}{first_full / first_ref:>11.0f}x{model / ref:>13.0f}x")

if __name__ == "__main__":
    main()
