"""Chapter 10's four experiments at full size on TinyWorld, printed as tables.

    python benchmarks/limits.py [--facts 100] [--layers 0 1 2 3 4 5 6 7] [--edits 100] [--reference]

1. Localization vs editing (Hase et al. 2023): for --facts known facts, the causal trace (MLP, window 1,
   10 samples) at the last subject token and ROME's rewrite score at every layer in --layers; the R²
   of the score from the layer alone, from the trace alone, from both, and the per-layer means. ROME
   runs with 2 context templates and C from 20,000 keys (the chapter's sweep settings) unless
   --reference (the registered TinyWorld settings: 20 templates, 100,000 keys; about 7x slower).
2. Ripples: how many checks the table supports per relation and kind, how many the model passes before
   editing, and after one ROME edit each (--edits records with at least one known check, chosen as the
   chapter chooses them at full size: `limits.choose_edits`).
3. Honest metrics on the same edits (`limits.honest_metrics`): probability comparison, teacher-forced
   token accuracy, and the answer generated to a stop, on the rewrite prompt, after a distracting
   prefix, under negation, before and after; the negation baseline (`limits.negation_gap`).
4. Knowledge neurons: silencing / boosting the 10 most attributed neurons of 50 known facts.
One thread (--threads), CPU (--device cuda for a GPU).

Measured 2026-12-04, --parts ripples (2 shared CPU cores, one thread; 40 edits as the chapter chooses them):
  after one ROME edit each: implied consequences updated 1 / 21; other facts of the subject kept 17 / 32
  % of edits        p(new) > p(true) | teacher-forced token acc. of new | answer = new | answer = true
    plain   before     0.0 |   7.5 |   0.0 | 100.0   (n=40)
    plain   after     97.5 |  95.0 |  92.5 |   2.5
    context before     0.0 |  12.0 |   0.0 | 100.0   (n=25)
    context after    100.0 | 100.0 | 100.0 |   0.0
    negated before     2.5 |   6.2 |   0.0 |  62.5   (n=40)
    negated after     95.0 |  80.0 |  80.0 |   2.5
  negation ignored: unedited model, true object 62.5 % (n=40); edited model, new object 83.8 % (n=37): +21.3 points
"""
import argparse
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import limits, rome  # noqa: E402
from engramlib.facts import counterfact_records, load_facts  # noqa: E402
from engramlib.models import known_facts, load_model  # noqa: E402


def localization(mt, args):
    hp = rome.get_hparams(mt)
    if not args.reference:
        hp = replace(hp, context_lengths=((5, 2),), mom2_n_samples=20000)
    by_key = {(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]): r
              for r in counterfact_records()}
    facts = [f for f in known_facts(mt, load_facts()[::3]) if (f.subject, f.relation_id) in by_key][:args.facts]
    start = time.perf_counter()
    effects = limits.trace_effects(mt, facts, kind="mlp", window=1)[:, args.layers]
    scores = limits.edit_scores_by_layer(mt, [by_key[f.subject, f.relation_id]["requested_rewrite"] for f in facts],
                                         args.layers, hp, progress=True)
    stats = limits.localization_vs_editing(effects, scores)
    print(f"\n1. localization vs editing: {len(facts)} facts x layers {args.layers} "
          f"({'reference' if args.reference else 'sweep'} ROME settings), {time.perf_counter() - start:.0f} s")
    print("   layer        " + "".join(f"{layer:>7}" for layer in args.layers))
    print("   trace effect " + "".join(f"{v:>7.3f}" for v in effects.mean(0).tolist()))
    print("   rewrite score" + "".join(f"{v:>7.3f}" for v in scores.mean(0).tolist()))
    print("   " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))


def ripples_and_honest(mt, args):
    hp = rome.get_hparams(mt)
    supported, known_before, candidates = Counter(), Counter(), []
    for record in counterfact_records():
        found = limits.ripple_checks(record["requested_rewrite"])
        if not found:
            continue
        ok = limits.check_answers(mt, found, after=False)
        for c, right in zip(found, ok):
            supported[record["requested_rewrite"]["relation_id"], c.kind] += 1
            known_before[record["requested_rewrite"]["relation_id"], c.kind] += right
        if any(ok):
            candidates.append((record, [c for c, right in zip(found, ok) if right]))
    print("\n2. ripple checks the table supports (relation, kind: checks / known before editing)")
    for key, n in sorted(supported.items()):
        print(f"   {key[0]:<6}{key[1]:<10}{n:>5} / {known_before[key]}")
    chosen = limits.choose_edits(candidates, args.edits)            # the chapter's choice at full size
    C_inv = rome.inverse_key_covariance(mt, hp.layer, hp.mom2_n_samples)
    templates = rome.templates_for(mt, hp)
    after_checks, before_h, after_h = Counter(), [], []
    for record, known in chosen:
        before_h.append(limits.honest_metrics(mt, record))
        with rome.apply_rome_edit(mt, record["requested_rewrite"], hp, C_inv=C_inv, templates=templates,
                                  require_improvement=False):
            for c, right in zip(known, limits.check_answers(mt, known, after=True)):
                after_checks[c.kind, "n"] += 1
                after_checks[c.kind, "right"] += right
            after_h.append(limits.honest_metrics(mt, record))
    print(f"   after one ROME edit each ({len(chosen)} records): implied consequences updated "
          f"{after_checks['implied', 'right']} / {after_checks['implied', 'n']}; other facts of the subject kept "
          f"{after_checks['unchanged', 'right']} / {after_checks['unchanged', 'n']}")
    print("\n3. honest metrics (% of edits): p(new) > p(true) | teacher-forced token accuracy of new | "
          "generated answer = new | generated answer = true")
    for kind in ("plain", "context", "negated"):
        for when, rows in (("before", before_h), ("after", after_h)):
            rows = [r[kind] for r in rows if kind in r]
            mean = lambda key: 100 * sum(r[key] for r in rows) / max(1, len(rows))
            print(f"   {kind:<8}{when:<7}{mean('prob'):>6.1f} | {mean('tf_acc'):>5.1f} | {mean('gen'):>5.1f} | "
                  f"{mean('gen_true'):>5.1f}   (n={len(rows)})")
    gap = limits.negation_gap(before_h, after_h)
    print(f"   negation ignored: unedited model, true object {100 * gap['baseline']:.1f} % (n={gap['n_baseline']}); "
          f"edited model, new object {100 * gap['edited']:.1f} % (n={gap['n_edited']}); "
          f"difference {100 * gap['difference']:+.1f} points")


def neurons(mt, args):
    probe = known_facts(mt, load_facts()[3::11])
    targets, others = probe[:50], probe[-30:]
    rows = [limits.neuron_intervention(mt, f, k=10, factor=2.0, others=others) for f in targets]
    print(f"\n4. knowledge neurons, {len(rows)} facts: mean p(answer) | still top-1 | other facts' accuracy")
    for cond in ("baseline", "silenced", "boosted", "random_silenced"):
        p = sum(r[cond]["p"] for r in rows) / len(rows)
        top1 = sum(r[cond]["top1"] for r in rows)
        acc = 100 * sum(r[cond]["others"] for r in rows) / len(rows)
        print(f"   {cond:<16}{p:>7.3f} | {top1:>3} / {len(rows)} | {acc:5.1f} %")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--reference", action="store_true", help="ROME's registered settings in the sweep")
    parser.add_argument("--parts", nargs="+", default=["localization", "ripples", "neurons"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (the quoted numbers) or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mt = load_model("tinyworld", device=args.device)
    for part in args.parts:
        {"localization": localization, "ripples": ripples_and_honest, "neurons": neurons}[part](mt, args)


if __name__ == "__main__":
    main()
