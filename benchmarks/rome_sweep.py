"""Sweep ROME's layer, learning rate, clamp and k* weighting on TinyWorld, reporting CounterFact
metrics (engramlib.evaluate) on a fixed, evenly spaced set of records.

    python benchmarks/rome_sweep.py [--records 30] [--layers 0 1] [--lrs 0.5 2] [--clamps 4 10]
                                    [--bare-weights -1 0.2 0.5] [--threads 2]
"""
import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import rome  # noqa: E402
from engramlib.evaluate import evaluate_edits  # noqa: E402
from engramlib.facts import counterfact_records  # noqa: E402
from engramlib.models import load_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=30)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5])
    parser.add_argument("--clamps", type=float, nargs="+", default=[4.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bare-weights", type=float, nargs="+", default=[0.5],
                        help="weight of the bare prompt in k* (-1: uniform, the official code)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mt = load_model("tinyworld", device="cpu")
    records = counterfact_records()[::len(counterfact_records()) // args.records][:args.records]
    base = rome.get_hparams(mt)
    templates = rome.context_templates(mt, base.context_lengths)
    print(f"{'layer':>5}{'lr':>6}{'clamp':>7}{'k* bare w':>10}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}{'failed':>8}")
    print(f"{len(records)} records, {len(templates)} context templates")
    for layer, lr, clamp, bw in itertools.product(args.layers, args.lrs, args.clamps, args.bare_weights):
        hp = replace(base, layer=layer, v_lr=lr, clamp_norm_factor=clamp, v_num_grad_steps=args.steps,
                     bare_prompt_weight=None if bw < 0 else bw)
        C_inv = torch.linalg.inv(rome.key_covariance(mt, layer, progress=False).double()).float()
        editor = lambda m, req: rome.apply_rome_edit(m, req, hp, C_inv=C_inv, templates=templates)
        result = evaluate_edits(mt, records, editor, generations=False, progress=False)
        out = result["post"]
        print(f"{layer:>5}{lr:>6}{clamp:>7}{'uniform' if bw < 0 else bw:>10}{out['ES']:>7.1f}{out['PS']:>7.1f}{out['NS']:>7.1f}"
              f"{out['S']:>7.1f}{len(result['failed']):>8}", flush=True)


if __name__ == "__main__":
    main()
