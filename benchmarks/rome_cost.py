"""What one ROME edit costs, against simple references measured in the same run.

    python benchmarks/rome_cost.py [--edits 10] [--threads 1]          # TinyWorld
    python benchmarks/rome_cost.py --xl [--steps 3] [--threads 2]     # GPT-2 XL shapes, layer 17

TinyWorld: one edit in forward+backward passes of the model on a batch of 22 prompts (21 context
templates + the KL prompt). GPT-2 XL shapes (random weights, 48 layers, d 1600; about 7 GB of
memory): seconds per v* step of `rome.compute_v_star` (only the blocks above layer 17 run, logits
only where the loss reads them) against the plain step (the whole model, logits everywhere, δ added
by a hook), and C's forward passes with and without stopping at layer 17.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import rome  # noqa: E402
from engramlib.facts import counterfact_records  # noqa: E402
from engramlib.hooks import Trace  # noqa: E402
from engramlib.models import (ModelAndTokenizer, encode_with_targets, load_model,  # noqa: E402
                              prepare_tokenizer)

REQUEST = {"prompt": "{} is located in the city of", "subject": "Space Needle",
           "target_new": {"str": "Paris"}, "target_true": {"str": "Seattle"}}


def forward_backward_seconds(mt, prompts, repeats=10):
    """One forward + backward through the whole (frozen) model, the gradient taken with respect
    to an additive change of the token embeddings, as ROME's v* step takes it w.r.t. δ."""
    enc = mt.tokenizer(prompts, return_tensors="pt", padding=True)
    delta = torch.zeros(mt.model.config.n_embd, requires_grad=True)
    start = time.perf_counter()
    for _ in range(repeats):
        with Trace(mt.model, mt.spec.embedding, retain_output=False, edit_output=lambda h, n: h + delta):
            logits = mt.model(**enc).logits
        torch.log_softmax(logits.float(), -1)[..., 0].mean().backward()
    return (time.perf_counter() - start) / repeats


def plain_v_star_seconds_per_step(mt, request, layer, templates, steps):
    """The simple reference: every step runs the whole model with δ added to the MLP output by a
    hook and computes the logits of every position (the loss as in `rome.v_star_loss`)."""
    subject = request["subject"]
    prompts = [t.format(request["prompt"]).format(subject) for t in templates] + [f"{subject} is a"]
    ids, mask, labels = encode_with_targets(mt, prompts, [request["target_new"]["str"]] * len(templates) + [None])
    lookup = [rome._last_subject_index(mt, p, subject) for p in prompts]
    delta = torch.zeros(mt.model.config.n_embd, requires_grad=True)

    def add(h, name):
        h = h.clone()
        for i, idx in enumerate(lookup):
            h[i, idx] = h[i, idx] + delta
        return h
    rows, pos = (labels != -100).nonzero(as_tuple=True)
    with torch.no_grad():
        kl_init = torch.log_softmax(mt.model(input_ids=ids, attention_mask=mask).logits[-1:, lookup[-1]], -1)
    hp, v_init = rome.ROMEHyperParams(layer=layer), torch.ones(mt.model.config.n_embd)
    opt = torch.optim.Adam([delta], lr=0.5)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        with Trace(mt.model, mt.spec.mlp.format(layer), retain_output=False, edit_output=add):
            logp = torch.log_softmax(mt.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        terms = rome.v_star_loss(logp[rows, pos, labels[rows, pos]], logp[-1:, lookup[-1]], kl_init,
                                 delta, v_init, hp)
        terms["loss"].backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def tinyworld(args):
    mt = load_model("tinyworld", device="cpu")
    hp = rome.get_hparams(mt)
    templates = rome.templates_for(mt, hp)
    C_inv = rome.inverse_key_covariance(mt, hp.layer, progress=False)
    records = counterfact_records()[::97][:args.edits]
    prompts = [t.format(r["requested_rewrite"]["prompt"]).format(r["requested_rewrite"]["subject"])
               for r in records[:1] for t in templates] + ["Space Needle is a"]
    unit = forward_backward_seconds(mt, prompts)
    times, steps = [], []
    for r in records:
        start = time.perf_counter()
        try:
            edit = rome.apply_rome_edit(mt, r["requested_rewrite"], hp, C_inv=C_inv, templates=templates)
            steps.append(len(edit.losses))
            edit.undo()
        except RuntimeError as err:
            print("edit failed:", err)
        times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    print(f"batch of {len(prompts)} prompts: one forward+backward = {1000 * unit:.1f} ms")
    print(f"one ROME edit (layer {hp.layer}, {len(templates)} templates, mean over {len(times)} edits) "
          f"= {1000 * mean:.1f} ms, {sum(steps) / max(1, len(steps)):.1f} optimisation steps on average")
    print(f"ratio: one edit = {mean / unit:.1f} forward+backward passes (target <= 22)")


def gpt2_xl_shapes(args):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25)).eval().requires_grad_(False)
    tok = prepare_tokenizer(GPT2TokenizerFast.from_pretrained(
        Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpt2_tokenizer"))
    mt = ModelAndTokenizer(model=model, tokenizer=tok, name="gpt2-xl-shapes")
    layer = 17
    templates = ["{}"] + [f"Some text number {i} of a few words. {{}}" for i in range(20)]
    hp = replace(rome.HPARAMS["gpt2-xl"], v_num_grad_steps=args.steps + 1, early_stop_loss=-1.0)
    plain = plain_v_star_seconds_per_step(mt, REQUEST, layer, templates, args.steps)
    start = time.perf_counter()
    out = rome.compute_v_star(mt, REQUEST, layer, hp, templates)
    ours = (time.perf_counter() - start) / out["forward_passes"]
    print(f"GPT-2 XL shapes, layer {layer}, {len(templates) + 1} prompts: one v* step "
          f"plain {plain:.2f} s, engramlib {ours:.2f} s (incl. the one-off pass below layer {layer}): "
          f"{plain / ours:.2f}x")
    texts = [f"The history of a place number {i} is long and full of events and people. " * 4
             for i in range(16)]
    enc = tok(texts, return_tensors="pt", padding=True)
    timings = {}
    for stop in (False, True):
        start = time.perf_counter()
        with torch.no_grad(), Trace(model, mt.spec.mlp_out.format(layer), retain_input=True,
                                    retain_output=False, stop=stop):
            model(**enc)
        timings[stop] = time.perf_counter() - start
    print(f"C's forward pass ({len(texts)} texts of {enc['input_ids'].shape[1]} tokens): whole model "
          f"{timings[False]:.2f} s, stopping after layer {layer} {timings[True]:.2f} s: "
          f"{timings[False] / timings[True]:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--xl", action="store_true", help="GPT-2 XL shapes instead of TinyWorld")
    parser.add_argument("--steps", type=int, default=3, help="v* steps timed on GPT-2 XL shapes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpt2_xl_shapes(args) if args.xl else tinyworld(args)


if __name__ == "__main__":
    main()
