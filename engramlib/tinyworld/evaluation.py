"""What does TinyWorld know, and where does it keep it?

    python -m engramlib.tinyworld.evaluation [MODEL_DIR]      # prints both reports

`relation_accuracy`: top-1 accuracy per relation on the rewrite prompts (trained) and on the
held-out paraphrase prompts (wordings never trained with that subject).
`localization_report`: causal tracing averaged over known facts with multi-token subjects: the
hidden-state and MLP effects at the last vs the first subject token, the numbers that say whether
TinyWorld recalls facts at the subject's last token as GPT-2 XL does (Meng et al. 2022, Fig. 2).
"""
from __future__ import annotations

import argparse
import json

from engramlib.facts import RELATIONS, load_facts, paraphrase_prompts
from engramlib.models import ModelAndTokenizer, accuracy, load_model, multi_token_known_facts


def relation_accuracy(mt: ModelAndTokenizer, facts=None) -> dict:
    """{relation id: {"name", "n", "rewrite", "paraphrase"}} with accuracies in [0, 1]."""
    facts = list(load_facts() if facts is None else facts)
    table = {}
    for rid, rel in RELATIONS.items():
        group = [f for f in facts if f.relation_id == rid]
        if not group:
            continue
        para = [(p, f.object) for f in group for p in paraphrase_prompts(f)]
        table[rid] = {"name": rel.name, "n": len(group),
                      "rewrite": accuracy(mt, [f.prompt for f in group], [f.object for f in group]),
                      "paraphrase": accuracy(mt, [p for p, _ in para], [o for _, o in para])}
    return table


def localization_report(mt: ModelAndTokenizer, n_facts: int = 40, samples: int = 10,
                        window: int = 3, progress: bool = True) -> dict:
    """Average causal-tracing effects over `n_facts` known multi-token-subject facts.

    Returns total_effect; hidden_last_subject (best layer in the first half) and its share of the
    total effect; mlp_last_subject / mlp_first_subject (max over layers, window `window`); and the
    layer where the MLP effect at the last subject token peaks."""
    from engramlib.tracing import BUCKETS, average_indirect_effect
    facts = multi_token_known_facts(mt, n_facts)
    first, last = BUCKETS.index("first subject token"), BUCKETS.index("last subject token")
    hidden = average_indirect_effect(mt, facts, kind=None, samples=samples, progress=progress)
    mlp = average_indirect_effect(mt, facts, kind="mlp", samples=samples, window=window,
                                  progress=progress)
    half = max(1, mt.n_layers // 2)
    best_hidden = hidden.effects[last, :half].max().item()
    return {"n_facts": len(facts), "total_effect": hidden.total_effect,
            "high_score": hidden.high_score, "low_score": hidden.low_score,
            "hidden_last_subject": best_hidden,
            "hidden_last_subject_share": best_hidden / hidden.total_effect,
            "hidden_first_subject": hidden.effects[first, :half].max().item(),
            "mlp_last_subject": mlp.effects[last].max().item(),
            "mlp_first_subject": mlp.effects[first].max().item(),
            "mlp_last_subject_peak_layer": int(mlp.effects[last].argmax()),
            "n_layers": mt.n_layers,
            "hidden_effects": hidden.effects.tolist(), "mlp_effects": mlp.effects.tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="tinyworld")
    parser.add_argument("--n-facts", type=int, default=40)
    parser.add_argument("--no-trace", action="store_true")
    args = parser.parse_args(argv)
    mt = load_model(args.model, device="cpu")
    table = relation_accuracy(mt)
    print(f"{'relation':<22}{'n':>5}{'rewrite':>9}{'paraphrase':>12}")
    for rid, row in table.items():
        print(f"{rid + ' ' + row['name']:<22}{row['n']:>5}{row['rewrite']:>9.1%}{row['paraphrase']:>12.1%}")
    if not args.no_trace:
        report = localization_report(mt, n_facts=args.n_facts)
        print(json.dumps({k: v for k, v in report.items() if not k.endswith("effects")}, indent=1))


if __name__ == "__main__":
    main()
