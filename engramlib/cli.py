"""The `engram` command.

    engram --version
    engram info          versions, device, and which models load without internet
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


def build_parser() -> argparse.ArgumentParser:
    import engramlib
    parser = argparse.ArgumentParser(prog="engram", description="In Search of the Engram: tools.")
    parser.add_argument("--version", action="version", version=f"engramlib {engramlib.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, device, models available offline").set_defaults(func=cmd_info)
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
