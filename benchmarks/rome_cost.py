"""Cost of one ROME edit on TinyWorld, in forward+backward passes of the model on a batch of 22
prompts (the paper's setting: 21 context templates + 1 KL prompt), measured in the same run.

    python benchmarks/rome_cost.py [--edits 10] [--threads 1]

C and the context templates are computed once first (they are cached in normal use).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engramlib import rome  # noqa: E402
from engramlib.facts import counterfact_records  # noqa: E402
from engramlib.models import load_model  # noqa: E402


def forward_backward_seconds(mt, prompts, repeats=10):
    """One forward + backward through the whole (frozen) model, the gradient taken with respect
    to an additive change of the token embeddings, as ROME's v* step takes it w.r.t. δ."""
    from engramlib.hooks import Trace
    mt.tokenizer.padding_side = "right"
    enc = mt.tokenizer(prompts, return_tensors="pt", padding=True)
    delta = torch.zeros(mt.model.config.n_embd, requires_grad=True)
    start = time.perf_counter()
    for _ in range(repeats):
        with Trace(mt.model, mt.spec.embedding, retain_output=False, edit_output=lambda h, n: h + delta):
            logits = mt.model(**enc).logits
        torch.log_softmax(logits.float(), -1)[..., 0].mean().backward()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mt = load_model("tinyworld", device="cpu")
    hp = rome.get_hparams(mt)
    templates = rome.context_templates(mt, hp.context_lengths)
    C_inv = torch.linalg.inv(rome.key_covariance(mt, hp.layer, progress=False).double()).float()
    records = [r for r in counterfact_records()][::97][:args.edits]
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
    print(f"ratio: one edit = {mean / unit:.1f} forward+backward passes (target <= 25)")


if __name__ == "__main__":
    main()
