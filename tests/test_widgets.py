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
