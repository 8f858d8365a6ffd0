"""The fact table, the CounterFact-style records, and the TinyWorld corpus built from them."""
import json
from pathlib import Path

import pytest

from engramlib import download, facts as F
from engramlib.tinyworld.corpus import generate_corpus


def test_table_is_large_real_and_has_the_papers_examples():
    table = F.load_facts()
    assert len(table) >= 1000
    assert len({f.relation_id for f in table}) >= 8
    pairs = {(f.subject, f.object) for f in table}
    for pair in [("Eiffel Tower", "Paris"), ("Colosseum", "Rome"), ("Space Needle", "Seattle"),
                 ("Danielle Darrieux", "French"), ("Lionel Messi", "soccer")]:
        assert pair in pairs
    keys = [(f.subject, f.relation_id) for f in table]
    assert len(keys) == len(set(keys)), "a (subject, relation) pair appears twice"
    assert sum(" " in f.subject for f in table) > 500, "multi-word subjects should be the norm"


def test_every_relation_has_enough_templates_with_one_subject_slot():
    for rel in F.RELATIONS.values():
        assert len(rel.templates) >= 6
        for t in (rel.prompt,) + rel.templates + rel.appositions:
            assert t.count("{}") == 1, t


def test_heldout_phrasings_are_disjoint_from_training_and_deterministic():
    for fact in F.load_facts()[::37]:
        held, train = F.heldout_templates(fact), F.training_templates(fact)
        assert len(held) == F.N_PARAPHRASES and not set(held) & set(train)
        assert train[0] == fact.relation.prompt
        assert F.heldout_templates(fact) == held


def test_records_have_counterfact_fields_and_consistent_content():
    records = F.counterfact_records()
    assert len(records) > 1000
    by_prompt = {f.prompt: f for f in F.load_facts()}
    for r in records[::50]:
        rw = r["requested_rewrite"]
        assert set(r) >= {"case_id", "requested_rewrite", "paraphrase_prompts",
                          "neighborhood_prompts", "generation_prompts"}
        assert "{}" in rw["prompt"] and rw["subject"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert by_prompt[rw["prompt"].format(rw["subject"])].object == rw["target_true"]["str"]
        assert all(rw["subject"] in p for p in r["paraphrase_prompts"])
        for p in r["neighborhood_prompts"]:      # same relation, same true object, other subject
            assert by_prompt[p].object == rw["target_true"]["str"]
            assert by_prompt[p].subject != rw["subject"]
    assert [r["case_id"] for r in records] == list(range(len(records)))


def test_corpus_is_deterministic_and_never_shows_heldout_prompts():
    rows = generate_corpus(3000, seed=0)
    assert rows == generate_corpus(3000, seed=0)
    assert rows != generate_corpus(3000, seed=1)
    text = "\n".join(rows)
    assert not any(prefix in text for prefix in F.PARAPHRASE_PREFIXES)
    leaked = [p for f in F.load_facts() for p in F.paraphrase_prompts(f)
              if p.split(". ", 1)[1] + " " + f.object in text]
    assert not leaked, leaked[:3]
    assert "Eiffel Tower" in text


def test_load_counterfact_reads_a_local_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(F.counterfact_records()[:3]))
    assert F.load_counterfact(str(path))[2]["case_id"] == 2


def test_load_counterfact_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(download.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(download, "BACKOFF", 0.0)
    with pytest.raises(RuntimeError, match="Offline"):
        F.load_known_facts()


def test_an_interrupted_download_leaves_no_file_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))

    def half_download(url, filename, *args):
        Path(filename).write_text('[{"case_id": 0, "truncat')
        raise OSError("connection reset")
    monkeypatch.setattr(download, "_fetch_once", half_download)
    monkeypatch.setattr(download, "BACKOFF", 0.0)
    with pytest.raises(RuntimeError, match="Offline"):
        F.load_known_facts()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []     # nothing to reuse next time


def test_no_phrasing_contains_another_of_its_relation():
    """Otherwise a held-out paraphrase would hide inside a trained phrasing."""
    for rel in F.RELATIONS.values():
        texts = [t.format("SUBJ") for t in (rel.prompt,) + rel.templates]
        for a in texts:
            assert not [b for b in texts if a != b and a in b], (rel.id, a)
