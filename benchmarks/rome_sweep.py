"""ROME's settings on TinyWorld: CounterFact metrics (engramlib.evaluate) on a fixed, evenly spaced
set of records spread over all relations, one row per setting.

    python benchmarks/rome_sweep.py [--records 100] [--settings reference tinyworld ...] [--layers 0 1]
                                    [--threads 1]

Settings (each on top of the registered TinyWorld hparams' layer):
  reference   the reference code's algorithm (kmeng01/rome): write at the bare prompt's key,
              decay ‖δ‖/‖v₀‖², KL(new ‖ init), uniform k*, templates sampled from end-of-text
  tinyworld   whatever `rome.HPARAMS["tinyworld"]` registers now
  k_star      reference, but write v₀ + δ at the averaged key k* (update_at="k_star")
  squared     reference, but decay ‖δ‖²/‖v₀‖² (weight_decay="squared")
  init_new    reference, but KL(init ‖ new) (kl="init||new")
  bare_w      reference, but the bare prompt gets half of k*'s weight (bare_prompt_weight=0.5)
  memit_starts reference, but templates start from MEMIT's five words
  before      this project's choices before they were made explicit: k_star, squared decay,
              KL(init ‖ new), bare_prompt_weight 0.5, MEMIT's starts
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import rome  # noqa: E402
from engramlib.evaluate import evaluate_edits  # noqa: E402
from engramlib.facts import counterfact_records  # noqa: E402
from engramlib.models import load_model  # noqa: E402

MEMIT_STARTS = ("The", "Therefore", "Because", "I", "You")


def settings(layer: int) -> dict:
    ref = rome.ROMEHyperParams(layer=layer)
    return {"reference": ref,
            "tinyworld": replace(rome.HPARAMS["tinyworld"], layer=layer),
            "k_star": replace(ref, update_at="k_star"),
            "squared": replace(ref, weight_decay="squared"),
            "init_new": replace(ref, kl="init||new"),
            "bare_w": replace(ref, bare_prompt_weight=0.5),
            "memit_starts": replace(ref, template_starts=MEMIT_STARTS),
            "before": replace(ref, update_at="k_star", weight_decay="squared", kl="init||new",
                              bare_prompt_weight=0.5, template_starts=MEMIT_STARTS)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--settings", nargs="+", default=["reference", "tinyworld"])
    parser.add_argument("--layers", type=int, nargs="+", default=[rome.HPARAMS["tinyworld"].layer])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mt = load_model("tinyworld", device="cpu")
    everything = counterfact_records()
    records = everything[::len(everything) // args.records][:args.records]
    relations = {r["requested_rewrite"]["relation_id"] for r in records}
    print(f"{len(records)} records over {len(relations)} relations")
    print(f"{'setting':<14}{'layer':>6}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}{'failed':>8}{'steps':>7}{'s/edit':>8}")
    for layer in args.layers:
        C_inv = rome.inverse_key_covariance(mt, layer, progress=False)
        for name in args.settings:
            hp = settings(layer)[name]
            templates = rome.templates_for(mt, hp)
            steps = []

            def editor(m, req):
                edit = rome.apply_rome_edit(m, req, hp, C_inv=C_inv, templates=templates)
                steps.append(len(edit.losses))
                return edit
            start = time.perf_counter()
            result = evaluate_edits(mt, records, editor, generations=False, progress=False)
            seconds = (time.perf_counter() - start) / len(records)
            out = result["post"]
            print(f"{name:<14}{layer:>6}{out['ES']:>7.1f}{out['PS']:>7.1f}{out['NS']:>7.1f}{out['S']:>7.1f}"
                  f"{len(result['failed']):>8}{sum(steps) / max(1, len(steps)):>7.1f}{seconds:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
