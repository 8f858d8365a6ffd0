"""The plans against measurements: heavy steps at their real sizes, timed and their memory read.

    python benchmarks/plan_vs_measured.py                       # GPT-2 small's shape, random weights, CPU
    python benchmarks/plan_vs_measured.py --device cuda --shape gpt2-xl   # on a GPU (calibration)

For each step (one ROME edit with 21 templates, a batch of C's keys and C's inverse, a chunked
perplexity over 16 texts, one causal trace grid) it prints the time and memory that
`engramlib.costs` plans for it on this device (its matmul speed measured in the same run) next to
what the step took: time by the clock, memory as the growth of the peak (the GPU's
max_memory_allocated, or on the CPU the peak resident memory, Linux's VmHWM, of a second run). Exits
with status 1 if a ratio is outside 1 ± tolerance (default 0.3). Run it alone: other processes
on the same cores make every time longer.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engramlib import budget, costs, memit, rome  # noqa: E402
from engramlib.models import ModelAndTokenizer, prepare_tokenizer  # noqa: E402

REQUEST = {"prompt": "{} is located in the city of", "subject": "Space Needle",
           "target_new": {"str": "Paris"}, "target_true": {"str": "Seattle"}}


def standin(shape: str, device: str) -> ModelAndTokenizer:
    """A random-weight GPT-2 of the given Hub model's shape, named after it (so ROME's hparams for
    that model apply), with GPT-2's real tokenizer (tests/fixtures)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    n_layer, d = budget.GPT2_SHAPES[shape]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d, n_head=d // 64)).eval().requires_grad_(False)
    tokenizer = prepare_tokenizer(GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "fixtures" / "gpt2_tokenizer"))
    return ModelAndTokenizer(model=model.to(device), tokenizer=tokenizer, name=shape)


def texts_of(mt, n: int, tokens: int) -> list:
    """n different texts of exactly `tokens` tokens each."""
    words = [" alpha", " beta", " gamma", " delta", " river", " city", " tower", " north"]
    return [mt.tokenizer.decode(mt.tokenizer("".join(words[(i + j) % 8] for j in range(tokens)))["input_ids"][:tokens])
            for i in range(n)]


class Peak:
    """Growth of the peak memory while the block runs: the GPU's allocator, or the CPU's VmHWM."""

    def __init__(self, device: str):
        self.gpu = device.startswith("cuda")

    def _read(self) -> int:
        if self.gpu:
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024

    def __enter__(self):
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)      # hand freed memory back, so the peak can grow again
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._read()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.gpu:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.bytes = self._read() - self.base
        return False


def measure(mt, device: str) -> list:
    """[(step, planned Work, seconds, bytes)] for the four steps."""
    s = costs.Shape(mt.model.config.n_layer, mt.model.config.n_embd)
    hparams = rome.get_hparams(mt)
    layer = hparams.layer
    templates = rome.templates_for(mt, hparams)                  # generated once, not timed
    C_inv = torch.eye(s.d_mlp, device=device)
    rome.apply_rome_edit(mt, REQUEST, hparams, C_inv=C_inv, templates=templates, require_improvement=False).undo()
    rows = []
    with Peak(device) as p:
        edit = rome.apply_rome_edit(mt, REQUEST, hparams, C_inv=C_inv, templates=templates, require_improvement=False)
    T = max(len(mt.tokenizer(t.format(REQUEST["prompt"].format(REQUEST["subject"])) + " Paris")["input_ids"])
            for t in templates)
    rows.append((f"ROME edit, layer {layer}, {len(edit.losses)} v* steps",
                 costs.rome_edit_work(s, layer, len(templates), T, steps=len(edit.losses)), p.seconds, p.bytes))
    edit.undo()
    del C_inv

    texts = texts_of(mt, 64, 128)
    with Peak(device) as p:
        C = rome.key_covariance(mt, layer, texts=texts, corpus="bench", cache=False, progress=False)
        torch.linalg.inv(C.double()).float()
    rows.append((f"C from 64 texts × 128 tokens + C⁻¹, layer {layer}", costs.covariance_work(s, layer, 64, 128),
                 p.seconds, p.bytes))
    del C

    texts = texts_of(mt, 16, 300)
    with Peak(device) as p:
        memit.perplexity(mt, texts)
    rows.append(("perplexity, 16 texts × 300 tokens", costs.perplexity_work(s, 16, 300), p.seconds, p.bytes))

    ids = mt.tokenizer(["The Space Needle is in"], return_tensors="pt")["input_ids"].to(device)
    with Peak(device) as p, torch.no_grad():
        for _ in range(20):
            mt.model(input_ids=ids)
    rows.append(("20 forwards of one 6-token prompt (latency)",
                 costs.forward_work(s, "latency", 20, 1, ids.shape[1], full_logits=True), p.seconds, p.bytes))

    from engramlib.fast_trace import trace
    prompt = "The Space Needle is located in the city of"
    n = len(mt.tokenizer(prompt)["input_ids"]) - 1                  # tokens from the subject on
    with Peak(device) as p:
        trace(mt, prompt, "Space Needle", kind="mlp", samples=10, window=10, answer="Seattle")
    rows.append(("causal trace (MLP, window 10, 10 samples)", costs.trace_work(s, 10, n + 1, n, kinds=1),
                 p.seconds, p.bytes))
    return rows


def cpu_peak_bytes(argv) -> list:
    """The steps' memory on the CPU, measured in a second process where glibc maps every block of
    ≥ 64 KiB on its own and returns it when freed, so the peak resident memory follows the tensors
    alive at once (else freed memory stays in malloc's arenas and a step's peak is hidden, or
    doubled, by the step before). Times are not taken there: those mappings cost page faults."""
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", ENGRAM_PLAN_MEMORY_ONLY="1")
    out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="gpt2", choices=list(budget.GPT2_SHAPES))
    parser.add_argument("--tolerance", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if os.environ.get("ENGRAM_PLAN_MEMORY_ONLY"):
        print(json.dumps([nbytes for *_, nbytes in measure(standin(args.shape, args.device), args.device)]))
        return 0
    cpu_bytes = None if args.device.startswith("cuda") else cpu_peak_bytes(argv)
    dev = budget.measured_device(args.device)
    print(f"{args.shape} shape, random weights, on {args.device}: matmul {dev.flops / 1e9:.0f} GFLOP/s float32, "
          f"{dev.flops64 / 1e9:.0f} float64 (measured now); plan efficiency {dev.efficiency}, latency "
          f"{dev.pass_latency * 1e3:.1f} ms per pass + {dev.block_latency * 1e3:.2f} ms per block")
    mt = standin(args.shape, args.device)
    rows = measure(mt, args.device)
    if cpu_bytes is not None:
        rows = [(what, work, seconds, nbytes) for (what, work, seconds, _), nbytes in zip(rows, cpu_bytes)]
    bad, out = 0, []
    print(f"\n{'step':<50}{'plan s':>9}{'meas. s':>9}{'ratio':>7}{'plan MiB':>10}{'meas. MiB':>10}{'ratio':>7}")
    for what, work, seconds, nbytes in rows:
        planned = budget.seconds_of(work, dev)
        t_ratio, m_ratio = seconds / planned, nbytes / max(1, work.device)
        # the latency row calibrates a GPU's launch overhead; on a CPU it is no heavy step: shown only
        checked = "latency" not in what or args.device.startswith("cuda")
        off = checked and (abs(t_ratio - 1) > args.tolerance or abs(m_ratio - 1) > args.tolerance)
        bad += off
        print(f"{what:<50}{planned:>9.2f}{seconds:>9.2f}{t_ratio:>7.2f}{work.device / 2**20:>10.0f}"
              f"{nbytes / 2**20:>10.0f}{m_ratio:>7.2f}{'  OFF' if off else '' if checked else '  (not checked)'}")
        out.append({"step": what, "planned_s": planned, "measured_s": seconds, "planned_bytes": work.device,
                    "measured_bytes": nbytes, "flops": work.flops, "flops64": work.flops64, "blocks": work.blocks})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev.name, "flops": dev.flops, "flops64": dev.flops64,
                                               "shape": args.shape, "rows": out}, indent=1))
    print(f"\n{bad} step(s) off the plan by more than ±{args.tolerance:.0%}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
