"""Grafting on TinyWorld in one run: the sparsity sweep, lesions, location vs amount, continual learning.

    python benchmarks/graft_table.py [--fast] [--parts sweep lesions location continual]
                                     [--continual 40:0.001 120:0.001 40:0.01] [--threads 1]

Chapters 03-04's experiments at the chapter's sizes (full by default, --fast: the test run's), with
every number printed:
- sweep: graft accuracy at 0.0005 % ... 1 % of the block weights for the top-movement, magnitude and
  random regions, and the optimised region after each step of one mask optimisation, on the tone
  and the topic task;
- lesions: the fine-tuned tone model without the optimised region, without the 1 % that moved most,
  and without random regions of the same sizes;
- location: contiguous lesions (each block's MLP and attention, the early and late half) against
  the same number of scattered weights, on fact recall (zeroed) and on the tone skill (reset to
  pretrained);
- continual: tone (A) then topic (B) at the same learning rate, sequential vs forget-free, for each
  STEPS_B:SPARSITY_B (steps of B's fine-tuning and the base size of B's region).
Ratios are against the simple references measured in the same run (pretrained, fine-tuned, random).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import graft as G  # noqa: E402
from engramlib.facts import load_facts  # noqa: E402
from engramlib.models import accuracy, load_model  # noqa: E402
from engramlib.tinyworld.tasks import make_task  # noqa: E402

def sizes_for(fast):
    """The chapters' settings (chapter 03, then chapter 04's cl_*): full or the fast test run's."""
    if fast:
        return dict(n=64, steps=40, lr=0.1, batch=16, fractions=(5e-6, 1e-4, 1e-3, 3e-3, 1e-2),
                    mask_steps=12, every=2, facts_every=24,
                    cl_n_train=128, cl_n_test=64, steps_a=20, cl_mask_steps=10)
    return dict(n=512, steps=300, lr=0.05, batch=32, fractions=(5e-6, 2e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
                mask_steps=20, every=1, facts_every=4,
                cl_n_train=512, cl_n_test=512, steps_a=40, cl_mask_steps=30)


def sweep_table(mt, pre, tasks, fine_tuned, s):
    total = G.n_params(pre)
    sweeps = {}
    for name, task in tasks.items():
        sw = G.sparsity_sweep(mt, pre, fine_tuned[name]["state"], task, s["fractions"],
                              mask_steps=s["mask_steps"], every=s["every"], batch_size=s["batch"])
        sweeps[name] = sw
        acc_pre, acc_ft = fine_tuned[name]["pre"], fine_tuned[name]["ft"]
        print(f"\n## sweep: {name} (pretrained {acc_pre:.1%}, fine-tuned {acc_ft:.1%})")
        print("| % of weights | " + " | ".join(f"{100 * f:.4f}" for f in s["fractions"]) + " |")
        print("|---" * (len(s["fractions"]) + 1) + "|")
        for kind in ("top-movement", "magnitude", "random"):
            print(f"| {kind} | " + " | ".join(f"{a:.1%}" for a in sw[kind]) + " |")
        print(f"optimised, read off every {s['every']} step(s) (size % → accuracy; top-movement of that size):")
        print("  " + ", ".join(f"{100 * k / total:.4f} → {a:.1%} ({top:.1%})" for k, a, top in sw["optimised"]))
        lead, k = max((a - top, k) for k, a, top in sw["optimised"])
        reach = [k for k, a, _ in sw["optimised"] if a >= acc_ft - 0.05]
        print(f"largest lead over top-movement: {lead:+.1%} at {100 * k / total:.4f} %; "
              f"optimised reaches fine-tuned - 5 points at "
              + (f"{100 * reach[0] / total:.4f} % ({reach[0]:,} weights)" if reach else "no size reached"))
        where = G.region_by_module(mt, sw["mask"])
        size = G.mask_size(sw["mask"])
        top3 = sorted(where.items(), key=lambda kv: -kv[1])[:3]
        print(f"the kept mask: {size:,} weights; " + ", ".join(f"{m} {c / size:.0%}" for m, c in top3))
    return sweeps


def lesion_table(mt, pre, task, ft, acc_pre, acc_ft, small):
    total = G.n_params(pre)

    def acc(state):
        return G.task_accuracy(mt, task, params=state)
    print(f"\n## lesions of the fine-tuned tone model ({acc_ft:.1%}; pretrained {acc_pre:.1%})")
    print("| removed (reset to pretrained) | weights | accuracy | same number at random |")
    print("|---|---|---|---|")
    for label, region in (("optimised region", small),
                          ("top-movement 1 %", G.top_movement_mask(pre, ft, int(0.01 * total)))):
        k = G.mask_size(region)
        print(f"| {label} | {k:,} | {acc(G.lesion(ft, region, to='pre', pre=pre)):.1%} | "
              f"{acc(G.lesion(ft, G.random_mask(pre, k, seed=1), to='pre', pre=pre)):.1%} |")


def location_table(mt, pre, task, ft, s):
    probe = load_facts()[::s["facts_every"]]

    def recall(state):
        G.load_state(mt, state)
        try:
            return accuracy(mt, [x.prompt for x in probe], [x.object for x in probe])
        finally:
            G.load_state(mt, pre)

    def skill(state):
        return G.task_accuracy(mt, task, params=state)
    regions = G.contiguous_regions(mt)
    facts = G.location_vs_amount(mt, pre, regions, recall, to="zero")
    tone = G.location_vs_amount(mt, ft, regions, skill, to="pre", pre=pre)
    print(f"\n## location vs amount ({len(probe)} facts, zeroed; tone skill, reset to pretrained; "
          f"unlesioned: facts {recall(pre):.1%}, tone {skill(ft):.1%})")
    print("| region | weights | facts: contiguous | facts: scattered | tone: contiguous | tone: scattered |")
    print("|---|---|---|---|---|---|")
    for name in regions:
        f, t = facts[name], tone[name]
        print(f"| {name} | {f['size']:,} | {f['contiguous']:.1%} | {f['scattered']:.1%} | "
              f"{t['contiguous']:.1%} | {t['scattered']:.1%} |")


def continual_table(mt, s, settings):
    a = make_task("polarity", n_train=s["cl_n_train"], n_test=s["cl_n_test"])
    b = make_task("topic", n_train=s["cl_n_train"], n_test=s["cl_n_test"])
    print(f"\n## continual learning: tone (A, {s['steps_a']} steps) then topic (B), both at lr 0.1, "
          f"batches of {s['batch']}; A's region 1 %")
    print("| B steps | B region base | after A | sequential | A's region only | + B outside A's region "
          "| forget-free (A's + B's region) | B's region |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in settings:
        steps_b, sparsity_b = setting.split(":")
        out = G.continual_learning(mt, a, b, sparsity=0.01, sparsity_b=float(sparsity_b),
                                   ft_steps=s["steps_a"], ft_steps_b=int(steps_b), lr=0.1,
                                   batch_size=s["batch"], mask_steps=s["cl_mask_steps"], progress=False)
        cells = " | ".join(f"{out[k]['A']:.1%} / {out[k]['B']:.1%}"
                           for k in ("after_A", "sequential", "grafted_A", "B_outside_A", "forget_free"))
        print(f"| {steps_b} | {float(sparsity_b):.1%} | {cells} | {out['mask_B_size']:,} |", flush=True)
    print("(each cell: A (tone) / B (topic) test accuracy)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the test run's sizes (ENGRAM_FAST)")
    parser.add_argument("--parts", nargs="*", default=["sweep", "lesions", "location", "continual"])
    parser.add_argument("--continual", nargs="*", default=["40:0.001", "120:0.001", "40:0.01"],
                        help="continual-learning runs as STEPS_B:SPARSITY_B")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    s = sizes_for(args.fast)
    mt = load_model("tinyworld", device="cpu")
    pre = G.get_state(mt)
    tasks = {"tone": make_task("polarity", n_train=s["n"], n_test=s["n"]),
             "topic": make_task("topic", n_train=s["n"], n_test=s["n"])}
    fine_tuned = {}
    if {"sweep", "lesions", "location"} & set(args.parts):
        for name, task in tasks.items():
            acc_pre = G.task_accuracy(mt, task)
            state = G.finetune(mt, task, steps=s["steps"], lr=s["lr"], batch_size=s["batch"], progress=False)
            fine_tuned[name] = {"state": state, "pre": acc_pre, "ft": G.task_accuracy(mt, task)}
            G.load_state(mt, pre)
        print(f"fine-tuning: {s['steps']} SGD steps, lr {s['lr']}, batches of {s['batch']}; "
              f"{G.n_params(pre):,} graftable weights ({time.time() - start:.0f} s)")
    tone = fine_tuned.get("tone")
    if "sweep" in args.parts or "lesions" in args.parts:
        sweeps = sweep_table(mt, pre, tasks if "sweep" in args.parts else {"tone": tasks["tone"]},
                             fine_tuned, s)
    if "lesions" in args.parts:
        lesion_table(mt, pre, tasks["tone"], tone["state"], tone["pre"], tone["ft"], sweeps["tone"]["mask"])
    if "location" in args.parts:
        location_table(mt, pre, tasks["tone"], tone["state"], s)
    if "continual" in args.parts:
        continual_table(mt, s, args.continual)
    print(f"\ntotal time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
