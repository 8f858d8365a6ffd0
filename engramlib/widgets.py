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


def edit_explorer(mt, prompt: str = "{} is located in the city of", subject: str = "Eiffel Tower",
                  target: str = "Rome", generation_prompts=None):
    """Text boxes for a ROME request and buttons to apply / undo it; shows p(target) before and
    after and a few generations. Returns a `VBox` with `.apply(prompt, subject, target)` and
    `.undo()` methods (what the buttons call), usable headless."""
    import ipywidgets as w

    from engramlib.models import generate
    from engramlib.rome import apply_rome_edit

    boxes = {"prompt": w.Text(value=prompt, description="prompt"),
             "subject": w.Text(value=subject, description="subject"),
             "target": w.Text(value=target, description="new object")}
    apply_button, undo_button = w.Button(description="Edit"), w.Button(description="Undo")
    out = w.Output()
    state = {"edit": None}

    def show(lines):
        out.clear_output(wait=True)
        with out:
            print("\n".join(lines))

    def undo():
        if state["edit"] is not None:
            state["edit"].undo()
            state["edit"] = None
            show(["undone: the original weights are back"])

    def apply(prompt, subject, target):
        undo()
        request = {"prompt": prompt, "subject": subject, "target_new": {"str": target}}
        try:
            edit = apply_rome_edit(mt, request)
        except (ValueError, RuntimeError) as err:
            show([f"cannot edit: {err}"])
            return None
        state["edit"] = edit
        prompts = generation_prompts or [prompt.format(subject), f"{subject} is"]
        lines = [f"p({target}) on {prompt.format(subject)!r}: {edit.prob_before:.3f} -> {edit.prob_after:.3f}"]
        lines += [f"  {generate(mt, p, max_new_tokens=15)!r}" for p in prompts]
        show(lines)
        return edit

    apply_button.on_click(lambda _: apply(boxes["prompt"].value, boxes["subject"].value,
                                          boxes["target"].value))
    undo_button.on_click(lambda _: undo())
    widget = w.VBox(list(boxes.values()) + [w.HBox([apply_button, undo_button]), out])
    widget.apply, widget.undo = apply, undo
    return widget
