"""Load GPT-2 (Hub) or TinyWorld (bundled, offline), and ask them questions.

`load_model(name)` returns a `ModelAndTokenizer` ("mt", as in ROME's code) with `.model`,
`.tokenizer`, `.spec` (where things live inside the model), `.name`, `.n_layers`, `.device`.

Names: "tinyworld" (ships with engramlib, works offline), "gpt2", "gpt2-medium", "gpt2-large",
"gpt2-xl" (downloaded from the Hugging Face Hub), or a local folder saved with `save_pretrained`.
With no name: $ENGRAM_MODEL, else gpt2-xl on a CUDA GPU with >= 12 GB, else tinyworld.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MODEL_NAMES = ("tinyworld",) + HUB_MODELS


class ModelLoadError(RuntimeError):
    """A model could not be loaded (offline, a misspelt Hub name, ...): the message says what to do."""


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

    @property
    def random_weights(self) -> bool:
        """True for a model saved untrained on purpose (config `engram_random_weights`, set by the
        test stand-in tools/standin.py): it runs every code path but cannot meet claims about
        knowledge, so the chapters skip those asserts for it."""
        return bool(getattr(self.model.config, "engram_random_weights", False))

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"ModelAndTokenizer(name={self.name!r}, layers={self.n_layers}, "
                f"d_model={self.model.config.n_embd}, params={n_params / 1e6:.1f}M, device={self.device})")

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
                                    "reinstall engramlib, or train them: python -m engramlib.tinyworld.train --out DIR --overwrite-shipped")
        return str(WEIGHTS_DIR)
    if name in HUB_MODELS:
        return f"openai-community/{name}"
    if Path(name).is_dir():
        return name
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} "
                     "or a local folder saved with save_pretrained()")


def hub_cache_dir() -> str | None:
    """Where Hub models are kept: $ENGRAM_CACHE/huggingface when ENGRAM_CACHE is set (one variable
    puts every download of the course, models included, in one place, e.g. on Google Drive:
    `engramlib.cache_on_drive()`), else None: the Hugging Face default (~/.cache/huggingface)."""
    root = os.environ.get("ENGRAM_CACHE")
    return str(Path(root) / "huggingface") if root else None


def prepare_tokenizer(tokenizer):
    """Pad on the right with the end-of-text token (GPT-2 has no pad token): every function here
    reads a prompt's last real token at attention_mask.sum() - 1. Returns the tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


HUB_RETRIES, HUB_BACKOFF = 3, 5.0      # tries of a Hub download, seconds before the 2nd (then doubled)


def _from_pretrained(name: str, source: str) -> tuple:
    """(tokenizer, model) from `source`. A Hub download is tried HUB_RETRIES times with backoff
    (the Hub's client writes each file atomically, resumes it and shows its progress); offline
    (HF_HUB_OFFLINE=1) or a local folder: one try. Raises ModelLoadError saying what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hub = name in HUB_MODELS
    cache = hub_cache_dir() if hub else None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")   # read now, not at import
    tries = HUB_RETRIES if hub and not offline else 1
    for attempt in range(tries):
        try:
            return (AutoTokenizer.from_pretrained(source, cache_dir=cache, local_files_only=offline),
                    AutoModelForCausalLM.from_pretrained(source, cache_dir=cache, local_files_only=offline))
        except OSError as err:
            if attempt + 1 == tries:
                raise ModelLoadError(
                    f"could not load {name!r} from the Hugging Face Hub ({type(err).__name__}, "
                    f"{tries} tries). Offline? Use the bundled model: ENGRAM_MODEL=tinyworld, or "
                    "load_model('tinyworld').") from err
            wait = HUB_BACKOFF * 2 ** attempt
            print(f"loading {name!r} failed ({type(err).__name__}); trying again in {wait:.0f} s")
            time.sleep(wait)


@contextlib.contextmanager
def no_progress_bars(quiet: bool = True):
    """Hugging Face's loading progress bars off inside the block (when `quiet`), as they were after."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_model(name: str | None = None, device: str | None = None) -> ModelAndTokenizer:
    """Load a GPT-2-family causal LM and its tokenizer, in eval mode, on `device`.

    name: see the module docstring; None picks `default_model_name()` and says so.
    device: "cuda", "mps", "cpu"; None picks the best available.
    """
    from engramlib.settings import pick_device

    if name is None:
        name = default_model_name()
        print(f"Using model {name!r} (set ENGRAM_MODEL or pass a name to change it; "
              f"choices: {', '.join(MODEL_NAMES)})")
    source = _source(name)
    with no_progress_bars(name not in HUB_MODELS):   # a local file needs no progress bar
        tokenizer, model = _from_pretrained(name, source)
    if model.config.model_type != "gpt2":
        raise ValueError(f"{name!r} is a {model.config.model_type!r} model; engramlib's module "
                         "names (ModelSpec) are written for the GPT-2 architecture")
    prepare_tokenizer(tokenizer)
    model.eval().requires_grad_(False)
    model.to(device or pick_device())
    return ModelAndTokenizer(model=model, tokenizer=tokenizer, name=name)


# --- tokens ------------------------------------------------------------------------------------

def find_subject_range(tokenizer, prompt: str, subject: str, occurrence: int | None = None) -> tuple:
    """Token range (start, end) of `subject` inside `prompt`, with GPT-2's leading-space BPE.

    The match is exact (case-sensitive) and whole words ("Space Needl" does not match "Space
    Needle"). A subject that appears more than once is ambiguous:
    pass `occurrence` (0 = first) to choose one. Absent or ambiguous -> ValueError.
    """
    if not subject or not subject.strip():
        raise ValueError("empty subject")
    starts = [i for i in range(len(prompt)) if prompt.startswith(subject, i)]
    inside_word = lambda i: (i > 0 and prompt[i - 1].isalnum() and subject[0].isalnum()) or \
        (i + len(subject) < len(prompt) and prompt[i + len(subject)].isalnum() and subject[-1].isalnum())
    if starts and all(inside_word(i) for i in starts):
        raise ValueError(f"subject {subject!r} matches only part of a word in prompt {prompt!r}; "
                         "check the spelling")
    starts = [i for i in starts if not inside_word(i)]
    if not starts:
        lower = prompt.lower().find(subject.lower())
        hint = (f"; it appears with different casing as {prompt[lower:lower + len(subject)]!r}"
                if lower >= 0 else "; check the spelling")
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}{hint}")
    if len(starts) > 1 and occurrence is None:
        raise ValueError(f"subject {subject!r} appears {len(starts)} times in {prompt!r}; "
                         "pass occurrence=0 for the first, 1 for the second, ...")
    c0 = starts[occurrence or 0]
    c1 = c0 + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < c1 and b > c0]
    return inside[0], inside[-1] + 1


def answer_ids(mt: ModelAndTokenizer, answer: str) -> list:
    """Token ids of ' ' + answer: GPT-2 predicts a word together with its leading space."""
    if not answer or not answer.strip():
        raise ValueError("empty answer/target string: say what the model should answer")
    return mt.tokenizer(" " + answer.strip())["input_ids"]


def first_token_id(mt: ModelAndTokenizer, answer: str) -> int:
    """Id of the first token of ' ' + answer (see `answer_ids`)."""
    return answer_ids(mt, answer)[0]


def encode_with_targets(mt: ModelAndTokenizer, prompts: list, targets: list) -> tuple:
    """Tokenize prompt + ' ' + target for each pair (right padding) and mark the target tokens.

    Returns (input_ids [n, T], attention_mask [n, T], labels [n, T]): labels[i, p] is the token
    that position p should predict (the next token of the text) where that token belongs to the
    target, and -100 everywhere else. A target None or "" leaves the row without labels."""
    rows, labels = [], []
    for prompt, target in zip(prompts, targets):
        p_ids = mt.tokenizer(prompt)["input_ids"]
        t_ids = answer_ids(mt, target) if target else []
        rows.append(p_ids + t_ids)
        labels.append([-100] * (len(p_ids) - 1) + t_ids + [-100])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), mt.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, (row, row_labels) in enumerate(zip(rows, labels)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        lab[i, :len(row)] = torch.tensor(row_labels)
    return ids.to(mt.device), mask.to(mt.device), lab.to(mt.device)


def target_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of the labelled tokens of each row: [n] (differentiable).

    logits: [n, T, vocab]   labels: [n, T] from `encode_with_targets` (-100 = not a target)."""
    logp = torch.log_softmax(logits.float(), -1)
    keep = labels != -100
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return -lp.sum(1) / keep.sum(1).clamp(min=1)


@torch.no_grad()
def target_nll(mt: ModelAndTokenizer, prompts: list, targets: list, batch_size: int = 32) -> torch.Tensor:
    """Mean per-token NLL of ' ' + target after each prompt: [n]. prompts[i] pairs with targets[i].
    exp(-nll) is CounterFact's P(target) (Meng et al. 2022)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask, labels = encode_with_targets(mt, prompts[i:i + batch_size], targets[i:i + batch_size])
        out.append(target_nll_from_logits(mt.model(input_ids=ids, attention_mask=mask).logits, labels))
    return torch.cat(out).cpu() if out else torch.zeros(0)


# --- asking the model -------------------------------------------------------------------------

def encode(mt: ModelAndTokenizer, prompts: list) -> dict:
    """Tokenize prompts with right padding. Returns input_ids, attention_mask [batch, tokens] and
    `last` [batch]: the index of each prompt's last real token."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
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
    (like ROME's known_1000 filter). facts: iterable of `engramlib.facts.Fact`.

    A model with random weights (`mt.random_weights`: the test stand-in) knows nothing; it gets
    the facts back with its own top-1 word as the object, so that the chapters' code runs on it."""
    from dataclasses import replace
    facts = list(facts)
    known = []
    for i in range(0, len(facts), batch_size):
        chunk = facts[i:i + batch_size]
        top1 = next_token_probs(mt, [f.prompt for f in chunk]).argmax(-1).tolist()
        if mt.random_weights:
            words = [mt.tokenizer.decode([t]).strip() for t in top1]
            known += [replace(f, object=w) for f, w, t in zip(chunk, words, top1)
                      if w and first_token_id(mt, w) == t]
            continue
        known += [f for f, t in zip(chunk, top1) if t == first_token_id(mt, f.object)]
    return known


def multi_token_known_facts(mt: ModelAndTokenizer, n: int, seed: int = 0, facts=None) -> list:
    """`n` facts (seeded sample) that the model gets right and whose subject has >= 2 tokens (the
    facts causal tracing averages over). facts: default the whole fact table."""
    import random
    from engramlib.facts import load_facts
    candidates = []
    for f in known_facts(mt, load_facts() if facts is None else facts):
        start, end = find_subject_range(mt.tokenizer, f.prompt, f.subject)
        if end - start >= 2:
            candidates.append(f)
    return random.Random(seed).sample(candidates, min(n, len(candidates)))


def accuracy(mt: ModelAndTokenizer, prompts: list, answers: list, batch_size: int = 64) -> float:
    """Fraction of prompts whose top-1 next token is the first token of the matching answer."""
    hits = 0
    for i in range(0, len(prompts), batch_size):
        top1 = next_token_probs(mt, prompts[i:i + batch_size]).argmax(-1).tolist()
        hits += sum(t == first_token_id(mt, a) for t, a in zip(top1, answers[i:i + batch_size]))
    return hits / max(1, len(prompts))
