"""`python -m engramlib.tinyworld.train`: where it may write (no training runs here)."""
import pytest

from engramlib.tinyworld import WEIGHTS_DIR
from engramlib.tinyworld import train as T


@pytest.fixture
def calls(monkeypatch):
    """Replace the training itself: record where it would have written."""
    seen = []

    def fake_train(out_dir, **overrides):
        seen.append((out_dir, overrides))
        return {"final_loss": 0.0, "train_seconds": 0, "n_parameters": 0}
    monkeypatch.setattr(T, "train", fake_train)
    return seen


def test_out_is_required(calls, capsys):
    with pytest.raises(SystemExit):
        T.main(["--steps", "1", "--threads", "1"])
    assert "--out" in capsys.readouterr().err and not calls


@pytest.mark.parametrize("out", [WEIGHTS_DIR, WEIGHTS_DIR / ".." / "weights"])
def test_the_shipped_weights_are_refused_without_overwrite_shipped(calls, capsys, out):
    with pytest.raises(SystemExit):
        T.main(["--out", str(out), "--steps", "1", "--threads", "1"])
    assert "--overwrite-shipped" in capsys.readouterr().err and not calls


def test_other_folders_and_overwrite_shipped_train(calls, tmp_path):
    T.main(["--out", str(tmp_path), "--steps", "3", "--threads", "1"])
    T.main(["--out", str(WEIGHTS_DIR), "--overwrite-shipped", "--steps", "3", "--threads", "1"])
    assert [c[0] for c in calls] == [tmp_path, WEIGHTS_DIR]
    assert calls[0][1]["steps"] == 3
