"""TinyWorld: a small GPT-2 (same `GPT2LMHeadModel` class) trained by this project on real facts.

- `corpus.py`: the deterministic training text, generated from `engramlib.facts`.
- `train.py`: `python -m engramlib.tinyworld.train` reproduces the shipped weights.
- `weights/`: the shipped model and tokenizer (safetensors), loaded by `load_model("tinyworld")`.
"""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

# ROME hyper-parameters for TinyWorld (read by engramlib.rome.get_hparams). The layer is where
# chapter 05's causal trace puts the MLP effect at the last subject token; lr and clamp come from
# benchmarks/rome_sweep.py (a small model's hidden states need their own values).
ROME_HPARAMS = dict(layer=1, v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=4.0,
                    source="placeholder until the trace of the shipped weights")
