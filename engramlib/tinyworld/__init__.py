"""TinyWorld: a small GPT-2 (same `GPT2LMHeadModel` class) trained by this project on real facts.

- `corpus.py`: the deterministic training text, generated from `engramlib.facts`.
- `train.py`: `python -m engramlib.tinyworld.train` reproduces the shipped weights.
- `weights/`: the shipped model and tokenizer (safetensors), loaded by `load_model("tinyworld")`.
"""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

# ROME hyper-parameters for TinyWorld (read by engramlib.rome.get_hparams). The layer is where the
# causal trace of these weights puts the MLP effect at the last subject token (window 3, 40 facts:
# 0.531 at layers 0 and 1, 0.13 at layer 2, 0.07 at the first subject token). Editing layer 1 gave
# ES 50 / PS 28 on 20 records, layer 0 ES 85-100 (benchmarks/rome_sweep.py); the bare prompt gets
# half the weight of k* because a prompt that starts with its subject tokenizes it differently.
ROME_HPARAMS = dict(layer=0, v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=4.0,
                    bare_prompt_weight=0.5,
                    source="TinyWorld: layer from the causal trace, k* weighting from a sweep")
