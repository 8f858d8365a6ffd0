"""Train TinyWorld from scratch: `python -m engramlib.tinyworld.train --out DIR [--steps N]`.

Reproduces the shipped weights (same seed, same corpus) in about 30 minutes on 2 CPU cores.
The forward pass runs in bfloat16 autocast (weights and optimizer stay float32): 1.7x faster on CPU.
Steps: generate the corpus (`corpus.py`), train a byte-level BPE tokenizer on part of it
(GPT-2's convention: a leading space belongs to the word), train a `GPT2LMHeadModel` with AdamW,
and save model + tokenizer as safetensors into `--out`. Writing into the package's own `weights/`
(the model every chapter loads) needs `--overwrite-shipped`.

Chapter 11's gold standard ("a model that never knew"): `--tokenizer DIR` reuses a trained tokenizer
(the shipped one: the same token ids, so the two models can be compared prompt by prompt) and
`--exclude-subjects FILE` (one subject per line) leaves those subjects' facts out of the corpus;
`--half` saves the weights in float16 (half the size; load them with `.float()`). `--seed N` trains
the same recipe from another seed (corpus order and initial weights), for the seed-to-seed spread.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engramlib.tinyworld import WEIGHTS_DIR
from engramlib.tinyworld.corpus import generate_corpus

CONFIG = dict(n_layer=8, n_embd=256, n_head=4, n_positions=128, vocab_size=4096)
TRAIN = dict(steps=1800, batch_size=64, max_len=64, lr=1e-3, warmup=150, weight_decay=0.1,
             seed=0, tokenizer_rows=20000, bf16=True, checkpoint_every=300)


def train_tokenizer(texts, vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`; returns GPT2TokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out_dir))                  # vocab.json + merges.txt, as GPT-2 ships them
    tok = GPT2TokenizerFast.from_pretrained(out_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out_dir)
    return tok


def reuse_tokenizer(tokenizer_dir: Path, out_dir: Path):
    """The tokenizer saved in `tokenizer_dir` (e.g. the shipped TinyWorld's), copied into `out_dir`."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out_dir)
    return tok


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    progress = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def encode_rows(tok, rows, max_len: int) -> torch.Tensor:
    """Token ids [n_rows, max_len], padded with -1 (masked out of the loss)."""
    ids = torch.full((len(rows), max_len), -1, dtype=torch.long)
    for i, row in enumerate(tok(rows)["input_ids"]):
        row = row[:max_len]
        ids[i, :len(row)] = torch.tensor(row)
    return ids


def train(out_dir: Path, tokenizer_dir: Path | None = None, exclude_subjects=(), half: bool = False,
          **overrides) -> dict:
    """Train and save TinyWorld; returns a dict of training statistics.
    tokenizer_dir: reuse that tokenizer instead of training one. exclude_subjects: their facts are
    left out of the corpus. half: save the weights in float16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = {**TRAIN, **{k: v for k, v in overrides.items() if k in TRAIN}}
    model_cfg = {**CONFIG, **{k: v for k, v in overrides.items() if k in CONFIG}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    t0 = time.time()

    rows = generate_corpus(cfg["steps"] * cfg["batch_size"], seed=cfg["seed"], exclude_subjects=exclude_subjects)
    if tokenizer_dir is None:
        tok = train_tokenizer(rows[:cfg["tokenizer_rows"]], model_cfg["vocab_size"], out_dir)
    else:
        tok = reuse_tokenizer(tokenizer_dir, out_dir)
    data = encode_rows(tok, rows, cfg["max_len"])
    print(f"corpus: {len(rows)} rows, {int((data >= 0).sum())} tokens, "
          f"{time.time() - t0:.0f} s to build")

    config = GPT2Config(**model_cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    model.train()
    losses = []
    bar = tqdm(range(cfg["steps"]), desc="training TinyWorld")
    for step in bar:
        batch = data[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]]
        batch = batch[:, :int((batch >= 0).sum(1).max())]            # trim shared padding
        labels = batch.clone()
        inputs = batch.clamp(min=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
            logits = model(input_ids=inputs, attention_mask=(batch >= 0).long()).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if cfg["checkpoint_every"] and step and step % cfg["checkpoint_every"] == 0:
            model.save_pretrained(out_dir / f"checkpoint-{step}", safe_serialization=True)
    model.eval()
    n_parameters = sum(p.numel() for p in model.parameters())
    model.to(torch.float16 if half else torch.float32).save_pretrained(out_dir, safe_serialization=True)
    stats = {"final_loss": sum(losses[-100:]) / len(losses[-100:]),
             "train_seconds": round(time.time() - t0), "config": model_cfg, "train": cfg,
             "n_parameters": n_parameters, "tokenizer": "reused" if tokenizer_dir else "trained",
             "excluded_subjects": sorted(exclude_subjects), "saved_dtype": "float16" if half else "float32"}
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the model and tokenizer, e.g. /tmp/tinyworld")
    parser.add_argument("--overwrite-shipped", action="store_true",
                        help=f"allow --out to be the shipped weights ({WEIGHTS_DIR}), replacing them")
    parser.add_argument("--steps", type=int, default=TRAIN["steps"])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (2 cores: 2 if nothing else runs, else 1)")
    parser.add_argument("--n-layer", type=int, default=CONFIG["n_layer"])
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help=f"reuse the tokenizer in this folder (e.g. {WEIGHTS_DIR}) instead of training one")
    parser.add_argument("--exclude-subjects", type=Path, default=None,
                        help="a text file, one subject per line: their facts are left out of the corpus")
    parser.add_argument("--half", action="store_true", help="save the weights in float16")
    parser.add_argument("--seed", type=int, default=TRAIN["seed"],
                        help="seeds the corpus and the initial weights (0: the shipped models' seed)")
    args = parser.parse_args(argv)
    if args.out.resolve() == WEIGHTS_DIR.resolve() and not args.overwrite_shipped:
        parser.error(f"--out {args.out} is the package's shipped weights, which every chapter "
                     "loads: choose another folder, or pass --overwrite-shipped to replace them")
    torch.set_num_threads(args.threads)
    excluded = ([line.strip() for line in args.exclude_subjects.read_text(encoding="utf-8").splitlines()
                 if line.strip()] if args.exclude_subjects else [])
    stats = train(args.out, tokenizer_dir=args.tokenizer, exclude_subjects=excluded, half=args.half,
                  steps=args.steps, n_layer=args.n_layer, seed=args.seed)
    print(json.dumps({k: stats[k] for k in ("final_loss", "train_seconds", "n_parameters")}))


if __name__ == "__main__":
    main()
