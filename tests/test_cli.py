"""The `engram` command: `engram edit` on TinyWorld, and one-line errors (status 2) for bad input."""
import pytest

from engramlib.cli import main

EDIT = ["edit", "{} is located in the city of", "--subject", "Space Needle", "--model", "tinyworld"]


def test_engram_edit_changes_the_answer_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(EDIT + ["--target", "Paris", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    p_before, p_after = (float(x) for x in out.split("p('Paris') ")[1].split()[0:3:2])
    assert p_before < 0.1 < 0.5 < p_after
    assert "was answering 'Seattle'" in out and "Louvre" in out          # a neighbour is shown
    assert list(tmp_path.iterdir()) == []                                 # nothing saved


@pytest.mark.parametrize("argv, message", [
    (["edit", "is located in the city of", "--subject", "Space Needle", "--target", "Paris",
      "--model", "tinyworld"], "must contain '{}'"),
    (EDIT + ["--target", " "], "empty target_new"),
    (EDIT + ["--target", "Seattle"], "equals target_true"),
    (EDIT + ["--target", "Paris", "--layer", "99"], "layer 99 out of range"),
    (["trace", "The Space Needle is in", "--subject", "Space Needl", "--model", "tinyworld"],
     "matches only part of a word"),
    (["trace", "The Space Needle is in", "--subject", "Eiffel Tower", "--model", "tinyworld"], "not found"),
    (["trace", "The Space Needle is in", "--subject", "Space Needle", "--model", "gpt3"], "unknown model"),
    (["trace", "The Space Needle is in", "--subject", "Space Needle", "--model", "tinyworld",
      "--out", "/nonexistent/folder/trace.png"], "cannot write"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("engram: error:")]) == 1
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_unreachable_hub_model_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["trace", "The Space Needle is in", "--subject", "Space Needle", "--model", "gpt2"]) == 2
    assert "could not load 'gpt2'" in capsys.readouterr().err
