"""Unlearning on TinyWorld: every method × (forget recall, paraphrases, generated answers, the same
subjects' other facts, held-out retain recall, perplexity, relearning on B with its controls, a
linear probe, the direction attack), for both kinds of forget set.

    python benchmarks/unlearning.py                        # full size: 20 subjects per kind
    python benchmarks/unlearning.py --subjects 6 --relearn 0,10 --methods npo,rmu   # quicker
    python benchmarks/unlearning.py --kinds entities --methods "" --retain-model DIR  # another retain model only

Chapter 11 quotes the full-size table. Each run is undone before the next (`UnlearnRun.undo`).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from engramlib import unlearn as U
from engramlib.memit import heldout_texts
from engramlib.models import load_model

COLUMNS = ("forget", "paraphrase", "generated", "same_subjects", "heldout", "perplexity")


def run_kind(mt, kind: str, args) -> list:
    fs = U.make_forget_set(kind, args.subjects, n_retain=args.retain, n_heldout=args.heldout,
                           seed=args.seed, mt=mt)
    texts = heldout_texts(mt, args.texts, avoid=fs.subjects)
    forget = U.requests_from_facts(fs.forget)      # each method adds its hparams.forget_phrasings
    retain = U.requests_from_facts(fs.retain)
    A, B = U.split_halves(fs.forget, seed=args.seed)
    control = fs.retain[:len(A)]
    probe_train = fs.retain + fs.heldout
    steps = tuple(int(s) for s in args.relearn.split(","))
    rows = [{"kind": kind, "method": "none", **U.report(mt, fs, texts),
             "probe": U.probe_accuracy(mt, probe_train, fs.forget, args.probe_layer)}]
    print(f"{kind}: {len(fs.forget)} facts of {len(fs.subjects)} subjects to forget, "
          f"{len(fs.same_subjects)} same-subject facts, {len(fs.retain)} retain, {len(fs.heldout)} held out",
          flush=True)
    if kind == "entities" and args.seed == 0 and not args.no_retain_model:
        rows.append(retain_model_row(fs, texts, A, B, control, probe_train, steps, args))
    for method in [m for m in args.methods.split(",") if m]:
        start = time.perf_counter()
        run = U.unlearn(mt, forget, retain, method=method, progress=False, seed=args.seed)
        row = {"kind": kind, "method": method, "seconds": time.perf_counter() - start, **U.report(mt, fs, texts)}
        row["probe"] = U.probe_accuracy(mt, probe_train, fs.forget, args.probe_layer)
        row["attack"] = U.direction_attack(run, A, B, args.attack_layer, seed=args.seed)
        row["relearn"] = U.relearning_curve(mt, A, B, steps, control=control, lr=args.relearn_lr)
        run.undo()
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
    return rows


def retain_model_row(fs, texts, A, B, control, probe_train, steps, args) -> dict:
    """The gold standard: the TinyWorld trained without these subjects, measured like the others."""
    U.check_never_read(fs)
    gold = U.load_retain_model(device="cpu", folder=args.retain_model)
    row = {"kind": fs.kind, "method": "never knew (retain model)", **U.report(gold, fs, texts),
           "probe": U.probe_accuracy(gold, probe_train, fs.forget, args.probe_layer),
           "relearn": U.relearning_curve(gold, A, B, steps, control=control, lr=args.relearn_lr)}
    print(json.dumps(row, default=float), flush=True)
    return row


def pct(x):
    return "  -  " if x != x else f"{100 * x:5.1f}"


def table(rows, steps) -> str:
    head = ("| kind | method | forget | paraphr. | generated | same subj. | held-out | ppl | "
            + " | ".join(f"B@{s} (ctrl, never)" for s in steps) + " | probe | attack (rand) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["kind"], r["method"], pct(r["forget"]), pct(r["paraphrase"]), pct(r["generated"]),
                 pct(r["same_subjects"]), pct(r["heldout"]), f"{r['perplexity']:.2f}"]
        rl = r.get("relearn")
        for i in range(len(steps)):
            cells.append(f"{pct(rl['B'][i])} ({pct(rl['B_control'][i])}, {pct(rl['B_never_known'][i])})"
                         if rl else "")
        cells.append(pct(r["probe"]))
        a = r.get("attack")
        cells.append(f"{pct(a['B_attacked'])} ({pct(a['B_random'])})" if a else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tinyworld")
    p.add_argument("--kinds", default="facts,entities")
    p.add_argument("--methods", default=",".join(U.METHODS))
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--retain", type=int, default=200)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--texts", type=int, default=200)
    p.add_argument("--relearn", default="0,10,50,200")
    p.add_argument("--relearn-lr", type=float, default=1e-4)
    p.add_argument("--probe-layer", type=int, default=2)
    p.add_argument("--attack-layer", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--no-retain-model", action="store_true",
                   help="skip the row of the TinyWorld trained without the forget subjects (entities, seed 0)")
    p.add_argument("--retain-model", metavar="DIR",
                   help="another retain model (e.g. trained with --seed 1) in place of the shipped one")
    p.add_argument("--table-from", nargs="+", metavar="JSON",
                   help="print the table of rows saved with --json (e.g. one run per kind, in parallel) and stop")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.relearn.split(",")]
    if args.table_from:
        rows = [row for path in args.table_from for row in json.load(open(path))]
        print(table(rows, rows[0]["relearn"]["steps"] if "relearn" in rows[0] else steps))
        return
    torch.set_num_threads(args.threads)
    mt = load_model(args.model, device="cpu")
    rows = []
    for kind in args.kinds.split(","):
        rows += run_kind(mt, kind, args)
    print(f"\n{mt.name}, {args.subjects} subjects per kind, seed {args.seed} (recall in %, top-1 first token; "
          "B@k: recall of half B after k fine-tuning steps on half A; ctrl: on unrelated facts; never: B's "
          "counterfactual objects)\n")
    print(table(rows, steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, default=float, indent=1)


if __name__ == "__main__":
    main()
