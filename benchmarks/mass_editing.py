"""Mass and sequential editing on TinyWorld: MEMIT in one batch against ROME one edit after another,
and what happens to the model as edits pile up (ROME, MEMIT, AlphaEdit).

    python benchmarks/mass_editing.py batch [--n 100]             # one MEMIT batch vs N ROME edits
    python benchmarks/mass_editing.py sequential [--n 100] [--rome-n 40] [--every 10] [--plot FILE]
    python benchmarks/mass_editing.py sweep [--n 100]             # MEMIT layers x clamp x λ (TinyWorld's)
    python benchmarks/mass_editing.py alphaedit-sweep [--n 100]   # AlphaEdit threshold x α, in sequence

The records are N CounterFact-style records spread evenly over the whole table (all 11 relations),
the same in every part. `batch`: the editing time (z / v* optimisation included, evaluation not)
of `memit.apply_memit` on all N requests at once against N `rome.apply_rome_edit` calls applied one
after another (the same N facts in the model at the end), then ES/PS/NS (`engramlib.evaluate`) of
every record with all N edits in place. `sequential`: `memit.collapse_dashboard` for each method
(ROME one at a time, MEMIT and AlphaEdit in batches of 10), a row every --every edits, with the
same unedited facts and held-out sentences for every method. One thread (--threads), CPU.

Measured 2026-11-29 (2 shared CPU cores, one thread; registered TinyWorld hparams):
  batch --n 100                       ES     PS     NS      S   seconds (CPU)
    MEMIT, one batch of 100          99.0   92.0   94.1   94.9     89 (87)
    ROME, 100 in sequence            93.0   85.5   80.7   86.1    598 (510)    6.7x wall, 5.8x CPU
  sequential --n 100 --rome-n 40: at 40 / 100 edits, edits recalled / unedited facts / their
  paraphrases (top-1 %), perplexity (2.72 before)
    ROME                 90 / 76 / 30.5, 2.96 at 40
    MEMIT, batches of 10 95 / 97 / 84.5, 2.74 at 40;   95 / 90 / 58.5, 2.83 at 100
    AlphaEdit, batches   97.5 / 99 / 88, 2.75 at 40;   98 / 90 / 68, 2.88 at 100
  No step raised the perplexity 1.5-fold (no disabling edit).
  sequential --n 500 --every 50 (all three methods on all 500; 6,005 s for ROME, 1,173 s MEMIT,
  866 s AlphaEdit): at 100 / 500 edits, recalled / NS / unedited / paraphrases / perplexity
    ROME                 78.0 / 74.7 / 66 / 20.5 / 4.57;    40.6 / 57.0 /  9 / 0.0 / 11.97
    MEMIT, batches of 10 84.0 / 85.7 / 97 / 74.0 / 3.93;    49.4 / 75.6 / 31 / 6.0 /  5.52
    AlphaEdit, batches   89.0 / 92.3 / 97 / 70.0 / 3.96;    61.6 / 75.3 / 25 / 4.0 /  6.70
  No disabling edit in any of the three runs.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import memit, rome  # noqa: E402
from engramlib.evaluate import record_metrics, summarize  # noqa: E402
from engramlib.facts import counterfact_records  # noqa: E402
from engramlib.models import load_model  # noqa: E402


def spread_records(n: int) -> list:
    """n records evenly spaced over the whole table (so every relation is represented)."""
    everything = counterfact_records()
    return everything[::max(1, len(everything) // n)][:n]


def scores(mt, records) -> dict:
    """ES/PS/NS/S (percent) of every record on the model as it is now."""
    return summarize([record_metrics(mt, r) for r in records])


def row(name, out, seconds=None, extra=""):
    s = f"{seconds:>9.1f}" if seconds is not None else f"{'':>9}"
    return f"{name:<34}{out['ES']:>7.1f}{out['PS']:>7.1f}{out['NS']:>7.1f}{out['S']:>7.1f}{s}  {extra}"


HEADER = f"{'':<34}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}{'seconds':>9}"


def batch(mt, records, args):
    requests = [r["requested_rewrite"] for r in records]
    hp = memit.get_hparams(mt)
    covariances = memit.layer_covariances(mt, hp.layers, hp.mom2_n_samples, progress=False)  # on disk
    rome_hp = rome.get_hparams(mt)
    rome.inverse_key_covariance(mt, rome_hp.layer, progress=False)       # C⁻¹ and the templates: kept
    rome.templates_for(mt, rome_hp), rome.templates_for(mt, hp.z_hparams())  # in memory, not timed
    print(f"{len(records)} records over {len({r['requested_rewrite']['relation_id'] for r in records})} "
          f"relations; MEMIT {hp}")
    print(HEADER)
    print(row("unedited", scores(mt, records)), flush=True)

    wall, cpu = time.perf_counter(), time.process_time()
    edit = memit.apply_memit(mt, requests, hp, covariances=covariances, progress=True)
    t_memit, c_memit = time.perf_counter() - wall, time.process_time() - cpu
    print(row(f"MEMIT, one batch of {len(records)}", scores(mt, records), t_memit,
              f"CPU {c_memit:.0f} s; p(target) rose for {edit.success_rate:.0%}"), flush=True)
    edit.undo()

    wall, cpu = time.perf_counter(), time.process_time()
    run = memit.edit_sequentially(mt, requests, "rome", 1, rome_hp, progress=True)
    t_rome, c_rome = time.perf_counter() - wall, time.process_time() - cpu
    print(row(f"ROME, {len(records)} in sequence", scores(mt, records), t_rome,
              f"CPU {c_rome:.0f} s; {t_rome / len(records):.1f} s per edit"), flush=True)
    run.undo()
    print(f"ROME in sequence / MEMIT in one batch: {t_rome / t_memit:.1f}x wall-clock, "
          f"{c_rome / c_memit:.1f}x CPU time")


def sequential(mt, records, args):
    boards = {}
    requests = [r["requested_rewrite"] for r in records]
    facts = memit.probe_facts(mt, requests, args.n_facts)       # the same probes for every method
    texts = memit.heldout_texts(mt, args.n_texts, avoid=[r["subject"] for r in requests])
    for method in args.methods:
        bs = 1 if method == "rome" else args.batch_size
        start = time.perf_counter()
        these = records[:args.rome_n] if method == "rome" and args.rome_n else records
        boards[method] = board = memit.collapse_dashboard(
            mt, these, method, batch_size=bs, every=args.every, facts=facts, texts=texts,
            progress=False)
        print(f"\n{method}, batches of {bs}: {time.perf_counter() - start:.0f} s in all "
              f"(editing {board['seconds'][-1]:.0f} s)")
        layers = sorted(board["delta_norm"])
        print(f"{'edits':>6}{'recalled':>10}{'NS':>7}{'unedited':>10}{'paraphr.':>10}{'ppl':>8}"
              + "".join(f"{'‖ΔW' + str(layer) + '‖':>9}" for layer in layers))
        for i, n in enumerate(board["n_edits"]):
            pct = {k: 100 * board[k][i] for k in ("edits_recalled", "neighborhood_score",
                                                  "unedited_accuracy", "paraphrase_accuracy")}
            print(f"{n:>6}{pct['edits_recalled']:>10.1f}{pct['neighborhood_score']:>7.1f}"
                  f"{pct['unedited_accuracy']:>10.1f}{pct['paraphrase_accuracy']:>10.1f}"
                  f"{board['perplexity'][i]:>8.2f}"
                  + "".join(f"{board['delta_norm'][layer][i]:>9.2f}" for layer in layers), flush=True)
        for d in board["disabling"]:
            print(f"  disabling step at {d['n_edits']} edits: perplexity {d['perplexity_before']:.2f} -> "
                  f"{d['perplexity_after']:.2f} ({', '.join(d['subjects'][:5])})")
    if args.save:
        import json
        Path(args.save).write_text(json.dumps(boards, default=str))
        print(f"boards: {args.save}")
    if args.plot:
        from engramlib.plots import plot_collapse
        plot_collapse(list(boards.values())).savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"figure: {args.plot}")


def sweep(mt, records, args):
    """MEMIT on TinyWorld in one batch: layer sets x clamp x λ. z depends only on the last layer and
    the clamp: computed once for each pair."""
    requests = [r["requested_rewrite"] for r in records]
    base = memit.get_hparams(mt)
    print(f"{len(records)} records; other settings: {replace(base, layers=(0,), source='')}")
    print(f"{'layers':<12}{'clamp':>6}{'λ':>8}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}  ‖ΔW‖ per layer, z at the clamp")
    zs = {}
    for clamp in args.clamps:
        for layers in args.layer_sets:
            layers = tuple(int(x) for x in layers.split(","))
            hp = replace(base, layers=layers, clamp_norm_factor=clamp)
            if (layers[-1], clamp) not in zs:
                templates = rome.templates_for(mt, hp.z_hparams())
                outs = [memit.compute_z(mt, r, hp, templates)
                        for r in tqdm(requests, desc=f"z at layer {layers[-1]}, clamp {clamp}")]
                at_clamp = sum(o["delta"].norm() >= 0.999 * clamp * o["v_init_norm"] for o in outs)
                zs[layers[-1], clamp] = torch.stack([o["z"] for o in outs]), at_clamp
            z, at_clamp = zs[layers[-1], clamp]
            for lam in args.lambdas:
                hp = replace(hp, mom2_update_weight=lam)
                with memit.apply_memit(mt, requests, hp, zs=z) as edit:
                    out = scores(mt, records)
                norms = " ".join(f"{d.norm():.2f}" for d in edit.deltas.values())
                print(f"{list(layers)!s:<12}{clamp:>6g}{lam:>8g}{out['ES']:>7.1f}{out['PS']:>7.1f}"
                      f"{out['NS']:>7.1f}{out['S']:>7.1f}  {norms}, {at_clamp}", flush=True)


def alphaedit_sweep(mt, records, args):
    """AlphaEdit on TinyWorld, in sequence (batches of --batch-size): threshold x α."""
    base = memit.get_hparams(mt)
    requests = [r["requested_rewrite"] for r in records]
    C = memit.layer_covariances(mt, base.layers, progress=False)
    for layer, c in C.items():
        s = torch.linalg.eigvalsh(c.double())
        print(f"layer {layer}: " + ", ".join(f"{(s < t).sum().item()} of {len(s)} eigenvalues < {t:g}"
                                           for t in args.thresholds))
    print(f"{'threshold':>10}{'α':>8}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}{'seconds':>9}")
    for threshold in args.thresholds:
        for l2 in args.l2s:
            hp = replace(base, nullspace_threshold=threshold, alphaedit_l2=l2)
            run = memit.edit_sequentially(mt, requests, "alphaedit", args.batch_size, hp, progress=False)
            out = scores(mt, records)
            run.undo()
            print(f"{threshold:>10g}{l2:>8g}{out['ES']:>7.1f}{out['PS']:>7.1f}{out['NS']:>7.1f}"
                  f"{out['S']:>7.1f}{sum(run.seconds):>9.1f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["batch", "sequential", "sweep", "alphaedit-sweep"])
    parser.add_argument("--n", type=int, default=100, help="number of records")
    parser.add_argument("--batch-size", type=int, default=10, help="MEMIT/AlphaEdit batch in sequence")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rome-n", type=int, default=None, help="sequential: fewer records for ROME")
    parser.add_argument("--methods", nargs="+", default=["rome", "memit", "alphaedit"])
    parser.add_argument("--n-facts", type=int, default=100, help="unedited facts probed")
    parser.add_argument("--n-texts", type=int, default=300, help="held-out sentences for perplexity")
    parser.add_argument("--layer-sets", nargs="+", default=["0", "0,1", "0,1,2", "1", "1,2"])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1, 10, 100, 1000, 20000])
    parser.add_argument("--clamps", type=float, nargs="+", default=[0.75, 1.0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2e-3, 2e-2])
    parser.add_argument("--l2s", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--plot", default=None, help="sequential: save the dashboard figure here")
    parser.add_argument("--save", default=None, help="sequential: save the dashboards (JSON) here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (the quoted numbers) or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mt = load_model("tinyworld", device=args.device)
    records = spread_records(args.n)
    {"batch": batch, "sequential": sequential, "sweep": sweep, "alphaedit-sweep": alphaedit_sweep}[args.part](
        mt, records, args)


if __name__ == "__main__":
    main()
