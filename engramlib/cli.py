"""The `engram` command.

    engram --version
    engram info                                         versions, device, offline models
    engram trace "PROMPT" --subject S [--model M] [--out trace.png] [--samples N]
"""
from __future__ import annotations

import argparse
import sys


def offline_models() -> dict:
    """{model name: True/False}: can it be loaded without internet right now?"""
    from engramlib.models import HUB_MODELS
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
                hit = hit or try_to_load_from_cache(f"openai-community/{name}", filename)
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
    return 0


def cmd_trace(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from engramlib.models import load_model
    from engramlib.plots import plot_trace_kinds
    from engramlib.tracing import trace

    mt = load_model(args.model)
    results = [trace(mt, args.prompt, args.subject, kind=kind, samples=args.samples,
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
    print(f"figure saved to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import engramlib
    parser = argparse.ArgumentParser(prog="engram", description="In Search of the Engram: tools.")
    parser.add_argument("--version", action="version", version=f"engramlib {engramlib.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, device, models available offline").set_defaults(func=cmd_info)
    tr = sub.add_parser("trace", help="causal trace of one prompt (Meng et al. 2022)")
    tr.add_argument("prompt", help='the prompt, e.g. "The Space Needle is located in the city of"')
    tr.add_argument("--subject", required=True, help="the subject inside the prompt")
    tr.add_argument("--model", default=None, help="tinyworld, gpt2, ..., gpt2-xl (default: auto)")
    tr.add_argument("--answer", default=None, help="score this answer (default: the top prediction)")
    tr.add_argument("--samples", type=int, default=10, help="noisy copies of the subject")
    tr.add_argument("--out", default="trace.png", help="where to save the figure")
    tr.set_defaults(func=cmd_trace)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
