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


def plot_collapse(boards, title: str | None = None):
    """The collapse dashboard of sequential editing (`memit.collapse_dashboard`): one panel per
    measure against the number of edits, one line per run, each run with its own marker and line
    style (and smaller markers for later runs), so that runs with equal values stay visible on top of
    each other. The perplexity panel shows the change from the unedited model in per cent, on an axis
    that spans at least -5 % to +50 % (one 1.5-fold jump), so that a change of a fraction of a per cent
    stays flat (the per-cent panels span at least 10 points, for the same reason); disabling steps are
    marked with a red line. boards: one dashboard dict or a list of
    them. Returns the figure."""
    boards = [boards] if isinstance(boards, dict) else list(boards)
    panels = (("edits_recalled", "edits recalled, top-1 (%)"),
              ("neighborhood_score", "neighbourhood score NS (%)"),
              ("unedited_accuracy", "unedited facts, top-1 (%)"),
              ("paraphrase_accuracy", "their paraphrases, top-1 (%)"),
              ("perplexity", "held-out perplexity, change from unedited (%)"),
              ("delta_norm", "‖W − W₀‖ over the edited layers"))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.8))
    for ax, (key, label) in zip(axes.flat, panels):
        for i, board in enumerate(boards):
            if key == "delta_norm":
                per_layer = list(board["delta_norm"].values())
                y = [sum(v ** 2 for v in vals) ** 0.5 for vals in zip(*per_layer)] if per_layer \
                    else [0.0] * len(board["n_edits"])
            elif key == "perplexity":
                y = [100 * (p / board["perplexity"][0] - 1) for p in board["perplexity"]]
            else:
                y = [100 * v for v in board[key]]
            marker, line = styles[i % len(styles)]
            ax.plot(board["n_edits"], y, marker=marker, ls=line, ms=max(3.0, 8.0 - 2 * i), mfc="none",
                    label=f"{board['method']} (batches of {board['batch_size']})")
            if key == "perplexity":
                for d in board["disabling"]:
                    ax.axvline(d["n_edits"], color="red", alpha=0.4, lw=1)
        low, high = ax.get_ylim()
        if key == "perplexity":
            ax.set_ylim(min(low, -5.0), max(high, 50.0))
        elif key != "delta_norm" and high - low < 10:         # a per-cent axis spans at least 10 points
            mid = min(max((low + high) / 2, 3.0), 97.0)
            ax.set_ylim(mid - 5.5, mid + 5.5)
        ax.set_xlabel("number of edits so far")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "Sequential editing: what the model still knows as edits pile up")
    fig.tight_layout()
    return fig
