"""TinyWorld: a small GPT-2 (same `GPT2LMHeadModel` class) trained by this project on real facts.

- `corpus.py`: the deterministic training text, generated from `engramlib.facts`.
- `train.py`: `python -m engramlib.tinyworld.train --out DIR` reproduces the shipped weights.
- `weights/`: the shipped model and tokenizer (safetensors), loaded by `load_model("tinyworld")`.
- `retain/`: the same recipe and tokenizer without the facts of the subjects in
  `retain/forget_subjects.txt` (float16): chapter 11's model that never knew them
  (`engramlib.unlearn.load_retain_model`).
"""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
RETAIN_DIR = Path(__file__).parent / "retain"
