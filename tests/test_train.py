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


def test_gold_standard_options_reach_train(calls, tmp_path):
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("Spain\n\nQatar\n", encoding="utf-8")
    T.main(["--out", str(tmp_path / "m"), "--steps", "3", "--threads", "1", "--tokenizer", str(WEIGHTS_DIR),
            "--exclude-subjects", str(subjects), "--half"])
    _, kwargs = calls[0]
    assert kwargs["tokenizer_dir"] == WEIGHTS_DIR and kwargs["half"]
    assert kwargs["exclude_subjects"] == ["Spain", "Qatar"]
    assert kwargs["seed"] == 0, "the shipped models' seed unless asked"
    T.main(["--out", str(tmp_path / "m1"), "--steps", "3", "--threads", "1", "--seed", "1"])
    assert calls[1][1]["seed"] == 1


def test_a_reused_tokenizer_gives_the_shipped_token_ids(tmp_path):
    from transformers import AutoTokenizer
    tok = T.reuse_tokenizer(WEIGHTS_DIR, tmp_path)
    shipped = AutoTokenizer.from_pretrained(WEIGHTS_DIR)
    text = "The Space Needle is located in the city of Seattle. Overall I feel good."
    assert tok(text)["input_ids"] == shipped(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == shipped(text)["input_ids"]


def test_excluded_subjects_never_appear_in_the_corpus():
    from engramlib.tinyworld.corpus import generate_corpus
    name = "William Shakespeare"                      # a subject that is no other fact's object
    assert name in " ".join(generate_corpus(3000, seed=0))
    assert name not in " ".join(generate_corpus(3000, seed=0, exclude_subjects=[name]))
    with pytest.raises(ValueError, match="not in the fact table"):
        generate_corpus(10, exclude_subjects=["Atlantis"])
