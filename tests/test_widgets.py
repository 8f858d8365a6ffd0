"""Widgets build headless and their update functions compute what they plot."""
import matplotlib

matplotlib.use("Agg")

from engramlib.widgets import capacity_explorer  # noqa: E402


def test_capacity_explorer_builds_and_updates():
    widget = capacity_explorer(d=32, n=32, noise=0.0)
    assert len(widget.children) == 4
    acc = widget.update(32, 32, 0.0)
    ns = sorted(acc)
    assert acc[ns[0]] == 1.0 and acc[ns[-1]] < acc[ns[0]]       # more memories, worse recall
    assert widget.update(32, 32, 1.5)[ns[-1]] <= acc[ns[-1]]      # noise never helps


def test_edit_explorer_applies_and_undoes(tinyworld):
    import torch
    from engramlib.widgets import edit_explorer
    before = {k: v.clone() for k, v in tinyworld.model.state_dict().items()}
    widget = edit_explorer(tinyworld)
    edit = widget.apply("{} is located in the city of", "Space Needle", "Paris")
    assert edit is not None and edit.prob_after > edit.prob_before
    widget.undo()
    assert all(torch.equal(v, before[k]) for k, v in tinyworld.model.state_dict().items())
    assert widget.apply("{} is located in", "Space Needle", " ") is None      # bad request: a message
