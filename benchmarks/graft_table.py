"""Grafting on TinyWorld: graft accuracy per mask size, lesions and continual learning, in one run.

    python benchmarks/graft_table.py [--steps 300] [--mask-steps 100] [--threads 1] [--continual 0.1:0.001 ...]

Prints: pretrained and fine-tuned accuracy on the polarity task; grafted accuracy at 0.01 %, 0.1 %
and 1 % of the graftable parameters for the optimised, top-movement and random masks; the lesion
test (remove the optimised region vs a random region of the same size from the fine-tuned model);
and continual learning (polarity then topic, sequential vs forget-free) for several learning rates
of B and sizes of B's region.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import graft as G  # noqa: E402
from engramlib.models import load_model  # noqa: E402
from engramlib.tinyworld.tasks import make_task  # noqa: E402


def graft_and_lesion_table(mt, task, args):
    """Fine-tune on the task; grafted accuracy per mask size and kind; lesions; lottery ticket."""
    pre = G.get_state(mt)
    acc_pre = G.task_accuracy(mt, task)
    ft = G.finetune(mt, task, steps=args.steps, progress=False)
    acc_ft = G.task_accuracy(mt, task)
    G.load_state(mt, pre)
    total = G.n_params(pre)
    print(f"polarity task: pretrained {acc_pre:.1%}, fine-tuned {acc_ft:.1%} "
          f"({args.steps} SGD steps); graftable parameters {total:,}")

    def acc(state):
        return G.task_accuracy(mt, task, params=G._full_params(mt, state))

    gain = acc_ft - acc_pre
    print(f"{'base':>9}{'params':>9}{'optimised':>11}{'top-move':>10}{'random':>9}   (test accuracy; "
          f"share of the fine-tuning gain for 'optimised')")
    masks = {}
    for sparsity in (1e-4, 1e-3, 1e-2):
        opt = G.optimize_mask(mt, pre, ft, task, sparsity, steps=args.mask_steps, lr=args.mask_lr,
                              progress=False)["mask"]
        masks[sparsity] = opt
        k = G.mask_size(opt)             # the optimised mask may grow: compare at its real size
        a_opt = acc(G.graft(pre, ft, opt))
        a_top = acc(G.graft(pre, ft, G.top_movement_mask(pre, ft, k)))
        a_rand = acc(G.graft(pre, ft, G.random_mask(pre, k)))
        print(f"{100 * sparsity:>8.2f}%{k:>9}{a_opt:>11.1%}{a_top:>10.1%}{a_rand:>9.1%}"
              f"   ({(a_opt - acc_pre) / gain:.0%} of the gain)")
    opt = masks[1e-2]
    k = G.mask_size(opt)
    lesioned = acc(G.lesion(ft, opt, to="pre", pre=pre))
    random_lesion = acc(G.lesion(ft, G.random_mask(pre, k, seed=1), to="pre", pre=pre))
    print(f"lesion of the fine-tuned model ({k} params reset to pretrained): optimised region -> "
          f"{lesioned:.1%} (cost {acc_ft - lesioned:.1%}), random region -> {random_lesion:.1%} "
          f"(cost {acc_ft - random_lesion:.1%}); ratio "
          + (f"{(acc_ft - lesioned) / (acc_ft - random_lesion):.1f}x" if acc_ft > random_lesion else "inf (a random lesion costs nothing)"))
    print(f"lottery ticket (θ_ft on the region, 0 elsewhere): {acc(G.lottery_ticket(ft, opt)):.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mask-steps", type=int, default=100)
    parser.add_argument("--mask-lr", type=float, default=1e8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--continual", nargs="*", default=["0.05:0.001", "0.1:0.001", "0.2:0.001", "0.2:0.01"],
                        help="continual-learning runs as B_LR:B_SPARSITY (none: skip)")
    parser.add_argument("--no-table", action="store_true", help="only the continual-learning runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    mt = load_model("tinyworld", device="cpu")
    task = make_task("polarity")
    if not args.no_table:
        graft_and_lesion_table(mt, task, args)
    for setting in args.continual:
        lr_b, sparsity_b = (float(x) for x in setting.split(":"))
        out = G.continual_learning(mt, task, make_task("topic"), sparsity=1e-2, sparsity_b=sparsity_b,
                                   ft_steps=args.steps, mask_steps=args.mask_steps,
                                   mask_lr=args.mask_lr, lr_b=lr_b, progress=False)
        for key in ("after_A", "sequential", "grafted_A", "B_outside_A", "forget_free"):
            print(f"continual (B lr {lr_b}, B region {sparsity_b:.1%}) {key:<12} "
                  f"polarity {out[key]['A']:.1%}  topic {out[key]['B']:.1%}")
        print(f"regions: A {out['mask_A_size']} params (untouched by B: {out['region_A_untouched']}), "
              f"B {out['mask_B_size']}; polarity kept within 5 points: "
              f"{out['forget_free']['A'] >= out['after_A']['A'] - 0.05}")
    print(f"total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
