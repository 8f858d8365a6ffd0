"""Load GPT-2 (Hub) or TinyWorld (bundled, offline), and ask them questions.

`load_model(name)` returns a `ModelAndTokenizer` ("mt", as in ROME's code) with `.model`,
`.tokenizer`, `.spec` (where things live inside the model), `.name`, `.n_layers`, `.device`.

Names: "tinyworld" (ships with engramlib, works offline), "gpt2", "gpt2-medium", "gpt2-large",
"gpt2-xl" (downloaded from the Hugging Face Hub), or a local folder saved with `save_pretrained`.
With no name: $ENGRAM_MODEL, else gpt2-xl on a CUDA GPU with >= 12 GB, else tinyworld.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MODEL_NAMES = ("tinyworld",) + HUB_MODELS


@dataclass(frozen=True)
class ModelSpec:
    """Module names inside a GPT-2-style model ("{}" = layer index), as in ROME's hparams."""
    layer: str = "transformer.h.{}"
    mlp: str = "transformer.h.{}.mlp"
    attn: str = "transformer.h.{}.attn"
    mlp_out: str = "transformer.h.{}.mlp.c_proj"   # the MLP's output matrix: ROME edits this
    embedding: str = "transformer.wte"
    final_norm: str = "transformer.ln_f"
    lm_head: str = "lm_head"


GPT2_SPEC = ModelSpec()


@dataclass
class ModelAndTokenizer:
    model: torch.nn.Module
    tokenizer: object
    name: str
    spec: ModelSpec = GPT2_SPEC

    @property
    def n_layers(self) -> int:
        return self.model.config.n_layer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def module(self, template: str, layer: int | None = None) -> torch.nn.Module:
        """The module named by a spec template, e.g. mt.module(mt.spec.mlp_out, 8)."""
        if layer is not None and not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return self.model.get_submodule(template.format(layer))


def default_model_name() -> str:
    """$ENGRAM_MODEL, else gpt2-xl on a CUDA GPU with >= 12 GB of memory, else tinyworld."""
    if os.environ.get("ENGRAM_MODEL"):
        return os.environ["ENGRAM_MODEL"]
    if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 12e9:
        return "gpt2-xl"
    return "tinyworld"


def _source(name: str) -> str:
    """Where from_pretrained should read `name` from (a folder or a Hub id)."""
    if name == "tinyworld":
        from engramlib.tinyworld import WEIGHTS_DIR
        if not (WEIGHTS_DIR / "model.safetensors").exists():
            raise FileNotFoundError(f"TinyWorld's weights are missing from {WEIGHTS_DIR}; "
                                    "reinstall engramlib or run python -m engramlib.tinyworld.train")
        return str(WEIGHTS_DIR)
    if name in HUB_MODELS:
        return f"openai-community/{name}"
    if Path(name).is_dir():
        return name
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} "
                     "or a local folder saved with save_pretrained()")


def load_model(name: str | None = None, device: str | None = None) -> ModelAndTokenizer:
    """Load a GPT-2-family causal LM and its tokenizer, in eval mode, on `device`.

    name: see the module docstring; None picks `default_model_name()` and says so.
    device: "cuda", "mps", "cpu"; None picks the best available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engramlib.settings import pick_device

    if name is None:
        name = default_model_name()
        print(f"Using model {name!r} (set ENGRAM_MODEL or pass a name to change it; "
              f"choices: {', '.join(MODEL_NAMES)})")
    source = _source(name)
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if name == "tinyworld":
        hf_logging.disable_progress_bar()       # a 30 MB local file needs no progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except OSError as err:
        raise RuntimeError(
            f"could not load {name!r} from the Hugging Face Hub ({type(err).__name__}). "
            "Offline? Use the bundled model: ENGRAM_MODEL=tinyworld, or load_model('tinyworld').") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if model.config.model_type != "gpt2":
        raise ValueError(f"{name!r} is a {model.config.model_type!r} model; engramlib's module "
                         "names (ModelSpec) are written for the GPT-2 architecture")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    model.to(device or pick_device())
    return ModelAndTokenizer(model=model, tokenizer=tokenizer, name=name)


# --- asking the model -------------------------------------------------------------------------

def encode(mt: ModelAndTokenizer, prompts: list) -> dict:
    """Tokenize prompts with right padding. Returns input_ids, attention_mask [batch, tokens] and
    `last` [batch]: the index of each prompt's last real token."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    mt.tokenizer.padding_side = "right"
    enc = mt.tokenizer(list(prompts), return_tensors="pt", padding=True)
    enc = {k: v.to(mt.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    enc["last"] = enc["attention_mask"].sum(1) - 1
    return enc


@torch.no_grad()
def next_token_probs(mt: ModelAndTokenizer, prompts: list) -> torch.Tensor:
    """Probabilities of the next token after each prompt: [batch, vocab]."""
    enc = encode(mt, prompts)
    logits = mt.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return torch.softmax(logits[torch.arange(len(enc["last"])), enc["last"]].float(), dim=-1)


def predict_next(mt: ModelAndTokenizer, prompts, k: int = 5) -> list:
    """Top-k next tokens for each prompt: a list (per prompt) of [(token_text, probability), ...]."""
    single = isinstance(prompts, str)
    probs = next_token_probs(mt, [prompts] if single else prompts)
    top = probs.topk(k, dim=-1)
    out = [[(mt.tokenizer.decode([i]), p) for i, p in zip(ids.tolist(), ps.tolist())]
           for ids, ps in zip(top.indices, top.values)]
    return out[0] if single else out


def first_token_id(mt: ModelAndTokenizer, answer: str) -> int:
    """Id of the first token of ' ' + answer (GPT-2 predicts the word with its leading space)."""
    if not answer or not answer.strip():
        raise ValueError("empty answer/target string")
    return mt.tokenizer(" " + answer.strip())["input_ids"][0]


@torch.no_grad()
def generate(mt: ModelAndTokenizer, prompt: str, max_new_tokens: int = 20,
             do_sample: bool = False, top_k: int = 5, seed: int = 0) -> str:
    """Continue `prompt` (greedy, or top-k sampling with a fixed seed); returns prompt + continuation."""
    enc = encode(mt, [prompt])
    if do_sample:
        torch.manual_seed(seed)
    out = mt.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            max_new_tokens=max_new_tokens, do_sample=do_sample,
                            top_k=top_k if do_sample else None,
                            pad_token_id=mt.tokenizer.pad_token_id)
    return mt.tokenizer.decode(out[0], skip_special_tokens=True)


def known_facts(mt: ModelAndTokenizer, facts, batch_size: int = 64) -> list:
    """The facts whose object's first token is the model's top-1 prediction after `fact.prompt`
    (like ROME's known_1000 filter). facts: iterable of `engramlib.facts.Fact`."""
    facts = list(facts)
    known = []
    for i in range(0, len(facts), batch_size):
        chunk = facts[i:i + batch_size]
        top1 = next_token_probs(mt, [f.prompt for f in chunk]).argmax(-1).tolist()
        known += [f for f, t in zip(chunk, top1) if t == first_token_id(mt, f.object)]
    return known


def accuracy(mt: ModelAndTokenizer, prompts: list, answers: list, batch_size: int = 64) -> float:
    """Fraction of prompts whose top-1 next token is the first token of the matching answer."""
    hits = 0
    for i in range(0, len(prompts), batch_size):
        top1 = next_token_probs(mt, prompts[i:i + batch_size]).argmax(-1).tolist()
        hits += sum(t == first_token_id(mt, a) for t, a in zip(top1, answers[i:i + batch_size]))
    return hits / max(1, len(prompts))
