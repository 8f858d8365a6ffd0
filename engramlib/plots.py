"""Figures in one consistent style: causal-trace heatmaps as in Meng et al. (2022), AIE curves."""
from __future__ import annotations

import matplotlib.pyplot as plt

CMAPS = {None: "Purples", "mlp": "Greens", "attn": "Reds"}
LABELS = {None: "hidden state", "mlp": "MLP output", "attn": "attention output"}


def plot_trace(result, ax=None, title: str | None = None):
    """Heatmap of p(answer) with one state restored: rows = tokens (subject tokens starred),
    columns = layers. The colour floor is the corrupted score, as in the paper's Fig. 1.
    result: a `tracing.TraceResult`. Returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 0.35 * len(result.tokens) + 1.4))
    s, e = result.subject_range
    labels = [f"{tok.strip() or repr(tok)}*" if s <= i < e else (tok.strip() or repr(tok))
              for i, tok in enumerate(result.tokens)]
    im = ax.pcolormesh(result.scores.numpy(), cmap=CMAPS[result.kind], vmin=result.low_score)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(labels))], labels)
    n_layers = result.scores.shape[1]
    step = max(1, n_layers // 8)
    ax.set_xticks([i + 0.5 for i in range(0, n_layers, step)], list(range(0, n_layers, step)))
    if result.kind:
        ax.set_xlabel(f"centre of the {result.window} restored layers")
    else:
        ax.set_xlabel("restored layer")
    ax.set_title(title or f"Impact of restoring the {LABELS[result.kind]}", fontsize=11)
    ax.grid(False)
    bar = plt.colorbar(im, ax=ax)
    bar.set_label(f"p({result.answer.strip()})")
    return ax


def plot_trace_kinds(results, suptitle: str | None = None):
    """The paper's three panels side by side (hidden state, MLP, attention). results: list of TraceResult."""
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 0.35 * len(results[0].tokens) + 1.6))
    for ax, r in zip(axes, results):
        plot_trace(r, ax=ax)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_aie(aie, ax=None, buckets=None, title: str | None = None):
    """Average indirect effect per layer for each token bucket, with 95 % confidence bands.
    aie: a `tracing.AIEResult`. Returns the axes."""
    from engramlib.tracing import BUCKETS
    if ax is None:
        _, ax = plt.subplots()
    buckets = buckets or BUCKETS
    layers = list(range(aie.effects.shape[1]))
    for name in buckets:
        i = BUCKETS.index(name)
        mean, ci = aie.effects[i].numpy(), aie.ci[i].numpy()
        ax.plot(layers, mean, "o-", ms=3, label=name)
        ax.fill_between(layers, mean - ci, mean + ci, alpha=0.15)
    ax.set_xlabel("restored layer" if aie.kind is None else "centre of the restored layers")
    ax.set_ylabel("average indirect effect on p(answer)")
    ax.set_title(title or f"Restoring the {LABELS[aie.kind]}: AIE over {aie.n} facts "
                 f"(total effect {aie.total_effect:.2f})", fontsize=10)
    ax.legend(fontsize=8)
    return ax
