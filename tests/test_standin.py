"""The stand-in for the Colab paths (tools/standin.py): a loadable local GPT-2 with random weights
that says so, and internet data served from the cache through the usual loaders."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engramlib import rome
from engramlib.facts import Fact, load_counterfact, load_known_facts
from engramlib.models import known_facts, load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("standin")
    subprocess.run([sys.executable, str(ROOT / "tools" / "standin.py"), str(directory)], check=True,
                   capture_output=True, timeout=300)
    return directory


def test_the_standin_loads_by_path_and_says_it_is_untrained(standin, tinyworld):
    mt = load_model(str(standin / "model"), device="cpu")
    assert mt.random_weights and not tinyworld.random_weights
    assert mt.n_layers == 4 and mt.model.config.vocab_size == 50257


def test_known_facts_of_an_untrained_model_are_its_own_predictions(standin):
    mt = load_model(str(standin / "model"), device="cpu")
    facts = [Fact("France", "P36", "Paris"), Fact("Space Needle", "P131", "Seattle")]
    got = known_facts(mt, facts)
    assert len(got) >= 1
    from engramlib.models import next_token_probs, first_token_id
    for f in got:      # the object is the model's own top-1 word
        assert next_token_probs(mt, [f.prompt]).argmax().item() == first_token_id(mt, f.object)


def test_internet_data_comes_from_the_cache(standin, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(standin / "cache"))
    records, known = load_counterfact(), load_known_facts()
    assert {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
            "generation_prompts"} <= set(records[0])
    assert {"known_id", "subject", "attribute", "prompt", "relation_id"} <= set(known[0])
    mt = load_model(str(standin / "model"), device="cpu")
    corpus, texts = rome.generic_texts(mt, n_texts=50)
    cached = json.loads((standin / "cache" / "wikitext-103-paragraphs.json").read_text())
    assert corpus == "wikitext103" and texts == cached[:50]
