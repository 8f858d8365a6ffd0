"""The `engram` command.

    engram --version
    engram info                                         versions, device, offline models, cached C
    engram trace "PROMPT" --subject S [--model M] [--out trace.png] [--samples N] [--window W]
    engram edit "{} PROMPT" --subject S --target T [--model M] [--save DIR]

A mistake in what was asked (a subject not in the prompt, an unknown model, an unwritable file)
prints one line `engram: error: ...` and exits with status 2; tracebacks are kept for real bugs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def offline_models() -> dict:
    """{model name: True/False}: can it be loaded without internet right now?"""
    from engramlib.models import HUB_MODELS, hub_cache_dir
    from engramlib.tinyworld import WEIGHTS_DIR
    available = {"tinyworld": (WEIGHTS_DIR / "model.safetensors").exists()}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    for name in HUB_MODELS:
        hit = None
        if try_to_load_from_cache is not None:
            for filename in ("model.safetensors", "pytorch_model.bin"):
                hit = hit or try_to_load_from_cache(f"openai-community/{name}", filename, cache_dir=hub_cache_dir())
        available[name] = isinstance(hit, str)
    return available


def cmd_info(args) -> int:
    import torch
    import transformers
    import engramlib
    from engramlib.settings import pick_device
    from engramlib.models import default_model_name
    print(f"engramlib     {engramlib.__version__}")
    print(f"python        {sys.version.split()[0]}")
    print(f"torch         {torch.__version__}")
    print(f"transformers  {transformers.__version__}")
    print(f"device        {pick_device()}")
    print(f"default model {default_model_name()}  (set ENGRAM_MODEL to change)")
    for name, ok in offline_models().items():
        print(f"  {name:<12} {'available offline' if ok else 'needs a download'}")
    print_statistics()
    return 0


def print_statistics() -> None:
    """Which key covariances C are at hand (`rome.cached_statistics`): the reference's published
    statistics (downloaded on first use), C computed here, TinyWorld's shipped ones."""
    from engramlib.download import cache_dir
    from engramlib.rome import cached_statistics
    print(f"statistics C (cache: {cache_dir() / 'stats'})")
    for row in cached_statistics():
        where = f"layer {row['layer']:<3}"
        if row["kind"] == "published":
            state = (f"the reference's, cached ({row['path'].stat().st_size / 2**20:.0f} MiB)"
                     if row["cached"] else "the reference's, downloaded on first use")
        else:
            state = f"{row['kind']}: {row['path'].name}"
        print(f"  {row['model']:<12} {where} {state}")


def _check_writable(path: str) -> None:
    folder = Path(path).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} does not exist or is not writable")


def trace_window(mt) -> int:
    """The MLP/attention window `engram trace` uses: 3 on TinyWorld (8 layers, as the tracing
    chapter), else the paper's 10 (Meng et al. 2022, GPT-2 XL's 48 layers)."""
    return 3 if mt.name == "tinyworld" else min(10, mt.n_layers)


def cmd_trace(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from engramlib.models import find_subject_range, load_model
    from engramlib.plots import plot_trace_kinds
    from engramlib.tracing import trace

    _check_writable(args.out)
    mt = load_model(args.model)
    find_subject_range(mt.tokenizer, args.prompt, args.subject)     # a bad subject fails before any work
    window = args.window or trace_window(mt)
    results = [trace(mt, args.prompt, args.subject, kind=kind, samples=args.samples, window=window,
                     answer=args.answer, progress=True) for kind in (None, "mlp", "attn")]
    r = results[0]
    print(f"{mt.name}: {args.prompt!r} -> {r.answer!r}  clean p = {r.high_score:.3f}, "
          f"subject corrupted p = {r.low_score:.3f}")
    for res in results:
        t, l = divmod(int(res.scores.argmax()), res.scores.shape[1])
        print(f"  strongest {res.kind or 'hidden'} restoration: token {res.tokens[t]!r} "
              f"(#{t}), layer {l}: p = {res.scores[t, l]:.3f}")
    fig = plot_trace_kinds(results, suptitle=f"{mt.name}: {args.prompt} -> {r.answer.strip()}")
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"figure saved to {args.out} (mlp/attn window {window})")
    return 0


def _neighbour_prompts(prompt: str, subject: str, n: int = 5) -> list:
    """Prompts of other subjects with the same wording, from the fact table (empty if none)."""
    from engramlib.facts import load_facts
    return [f.prompt for f in load_facts() if f.relation.prompt == prompt and f.subject != subject][:n]


def cmd_edit(args) -> int:
    from engramlib import rome
    from engramlib.models import generate, load_model, predict_next

    if args.save:
        _check_writable(str(Path(args.save) / "config.json")) if Path(args.save).is_dir() \
            else _check_writable(args.save)
    mt = load_model(args.model)
    request = {"prompt": args.prompt, "subject": args.subject, "target_new": {"str": args.target}}
    rome.check_request(mt, request)                         # no "{}", subject not in prompt, empty target
    text = args.prompt.format(args.subject)
    true = args.true or predict_next(mt, text, k=1)[0][0].strip()
    request = rome.check_request(mt, {**request, "target_true": {"str": true}})   # target == true
    hparams = rome.get_hparams(mt)
    if args.layer is not None:
        mt.module(mt.spec.mlp_out, args.layer)                        # layer out of range -> error
        from dataclasses import replace
        hparams = replace(hparams, layer=args.layer)
    neighbours = _neighbour_prompts(args.prompt, args.subject)
    probe = f"{args.subject} is"
    gen_before = [generate(mt, p, max_new_tokens=args.tokens) for p in (text, probe)]
    near_before = [predict_next(mt, p, k=1)[0] for p in neighbours]
    edit = rome.apply_rome_edit(mt, request, hparams, progress=True)
    print(f"{mt.name}, layer {edit.layer}: {text!r}")
    print(f"  p({args.target!r}) {edit.prob_before:.3f} -> {edit.prob_after:.3f}"
          f"   (was answering {true!r})")
    for before, p in zip(gen_before, (text, probe)):
        print(f"  before: {before!r}")
        print(f"  after:  {generate(mt, p, max_new_tokens=args.tokens)!r}")
    if neighbours:
        print("  neighbours (top answer and its probability, before -> after):")
        for p, (tok, prob) in zip(neighbours, near_before):
            tok2, prob2 = predict_next(mt, p, k=1)[0]
            print(f"    {p!r}: {tok.strip()!r} {prob:.2f} -> {tok2.strip()!r} {prob2:.2f}")
    else:
        print("  (no neighbour prompts with this wording in the fact table)")
    if args.save:
        mt.model.save_pretrained(args.save)
        mt.tokenizer.save_pretrained(args.save)
        print(f"edited model saved to {args.save} (load it with --model {args.save})")
    else:
        edit.undo()
        print("nothing was written to disk (use --save DIR to keep the edited model)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import engramlib
    parser = argparse.ArgumentParser(prog="engram", description="In Search of the Engram: tools.")
    parser.add_argument("--version", action="version", version=f"engramlib {engramlib.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, device, models available offline, cached statistics C").set_defaults(func=cmd_info)
    tr = sub.add_parser("trace", help="causal trace of one prompt (Meng et al. 2022)")
    tr.add_argument("prompt", help='the prompt, e.g. "The Space Needle is located in the city of"')
    tr.add_argument("--subject", required=True, help="the subject inside the prompt")
    tr.add_argument("--model", default=None, help="tinyworld, gpt2, ..., gpt2-xl (default: auto)")
    tr.add_argument("--answer", default=None, help="score this answer (default: the top prediction)")
    tr.add_argument("--samples", type=int, default=10, help="noisy copies of the subject")
    tr.add_argument("--out", default="trace.png", help="where to save the figure")
    tr.add_argument("--window", type=int, default=None,
                    help="layers restored together for mlp/attn (default: 3 on TinyWorld, else 10)")
    tr.set_defaults(func=cmd_trace)
    ed = sub.add_parser("edit", help="rewrite one fact with ROME (Meng et al. 2022)")
    ed.add_argument("prompt", help='the prompt with {} for the subject, e.g. "{} is located in the city of"')
    ed.add_argument("--subject", required=True, help="the subject, e.g. \"Space Needle\"")
    ed.add_argument("--target", required=True, help="the new answer, e.g. Paris")
    ed.add_argument("--true", default=None, help="the current answer (default: the model's top token)")
    ed.add_argument("--model", default=None, help="tinyworld, gpt2, ..., gpt2-xl (default: auto)")
    ed.add_argument("--layer", type=int, default=None, help="the MLP layer to edit (default: per model)")
    ed.add_argument("--tokens", type=int, default=12, help="tokens generated before/after")
    ed.add_argument("--save", default=None, help="save the edited model to this folder")
    ed.set_defaults(func=cmd_edit)
    return parser


def user_errors() -> tuple:
    """Exceptions that mean "what was asked is wrong", reported in one line (not bugs)."""
    from engramlib.models import ModelLoadError
    from engramlib.rome import EditFailedError
    return (ValueError, OSError, ModelLoadError, EditFailedError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except user_errors() as err:
        print(f"engram: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
