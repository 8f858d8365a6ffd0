"""Optional ipywidgets front-ends. Each function returns a widget; all are constructible headless
(no browser needed), so the tests build them and call their update functions directly."""
from __future__ import annotations


def capacity_explorer(d: int = 64, n: int = 64, noise: float = 0.0):
    """Sliders for dimension d, number of memories n and cue noise; shows the Hebbian memory's
    recall (raw cosine and after cleanup) as n grows, with the chosen point marked.

    Returns an `ipywidgets.VBox`; its `.update(d, n, noise)` redraws and returns the accuracies."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from engramlib.memory import capacity_curve

    d_slider = w.IntSlider(value=d, min=8, max=256, step=8, description="dimension d")
    n_slider = w.IntSlider(value=n, min=1, max=512, step=1, description="memories n")
    noise_slider = w.FloatSlider(value=noise, min=0.0, max=2.0, step=0.1, description="cue noise")
    out = w.Output()

    def update(d, n, noise):
        ns = sorted({max(1, int(n * f)) for f in (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)})
        clean = capacity_curve(d, ns, trials=2, noise=noise, measure="cleanup")
        raw = capacity_curve(d, ns, trials=2, noise=noise, measure="cosine")
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(ns, clean, "o-", label="after cleanup (accuracy)")
            ax.plot(ns, raw, "s--", label="raw recall (cosine to v)")
            ax.axvline(n, color="gray", lw=1)
            ax.set_xlabel("number of stored memories n")
            ax.set_ylabel("recall quality")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"Hebbian memory, d = {d}, cue noise = {noise:.1f}")
            ax.legend()
            plt.show()
        return dict(zip(ns, clean))

    widget = w.VBox([d_slider, n_slider, noise_slider, out])
    w.interactive_output(update, {"d": d_slider, "n": n_slider, "noise": noise_slider})
    widget.update = update
    return widget
