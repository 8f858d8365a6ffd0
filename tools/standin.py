"""The stand-in for the paths a Colab user takes: a small randomly initialised GPT-2 (GPT-2's real
tokenizer) in a local folder, and a pre-filled engramlib cache with the data that would come from
the internet, in the official formats (tests/fixtures/standin/).

    python tools/standin.py DIR            # writes DIR/model and DIR/cache; prints the env to use
    python tools/standin.py --fixtures     # (re)writes the fixture files from TinyWorld's fact table

`make test-standin` runs every notebook in solutions/ with ENGRAM_MODEL=DIR/model and
ENGRAM_CACHE=DIR/cache: the notebooks load CounterFact, known_1000 and the Wikipedia paragraphs for C
through their usual loaders, which find the files in the cache instead of downloading them.
"""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
STANDIN = FIXTURES / "standin"
SHAPE = dict(n_layer=4, n_embd=64, n_head=4)          # small and fast; GPT-2's vocabulary and positions


def write_fixtures(n_records: int = 60, n_known: int = 60, n_paragraphs: int = 300) -> None:
    """CounterFact, known_1000 and Wikipedia-like paragraphs in the official formats, from the
    course's real-world fact table (deterministic)."""
    sys.path.insert(0, str(ROOT))
    from engramlib.facts import counterfact_records, load_facts
    from engramlib.tinyworld.corpus import generic_sentences
    records = counterfact_records()[::max(1, 1221 // n_records)][:n_records]
    official = []
    for i, r in enumerate(records):
        rw = r["requested_rewrite"]
        official.append({
            "case_id": i, "pararel_idx": i,
            "requested_rewrite": {"prompt": rw["prompt"], "relation_id": rw["relation_id"],
                                  "target_new": {"str": rw["target_new"]["str"], "id": f"Q{1000 + i}"},
                                  "target_true": {"str": rw["target_true"]["str"], "id": f"Q{2000 + i}"},
                                  "subject": rw["subject"]},
            "paraphrase_prompts": r["paraphrase_prompts"], "neighborhood_prompts": r["neighborhood_prompts"],
            "attribute_prompts": [], "generation_prompts": r["generation_prompts"]})
    known = []
    for i, f in enumerate(load_facts()[::max(1, 1221 // n_known)][:n_known]):
        known.append({"known_id": i, "subject": f.subject, "attribute": f.object,
                      "template": f.relation.prompt, "prediction": " " + f.object,
                      "prompt": f.prompt, "relation_id": f.relation_id})
    sentences = generic_sentences(8 * n_paragraphs, seed=7)
    paragraphs = [" ".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8)][:n_paragraphs]
    STANDIN.mkdir(parents=True, exist_ok=True)
    (STANDIN / "counterfact.json").write_text(json.dumps(official, indent=1) + "\n")
    (STANDIN / "known_1000.json").write_text(json.dumps(known, indent=1) + "\n")
    (STANDIN / "wikitext-103-paragraphs.json").write_text(json.dumps(paragraphs, indent=1) + "\n")
    print(f"wrote {len(official)} CounterFact records, {len(known)} known facts, {len(paragraphs)} paragraphs")


def make(directory: Path) -> None:
    """DIR/model: a random GPT2LMHeadModel (seed 0) with GPT-2's tokenizer; DIR/cache: the fixtures."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    directory = Path(directory)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE, engram_random_weights=True))   # mt.random_weights
    model.save_pretrained(directory / "model")
    GPT2TokenizerFast.from_pretrained(FIXTURES / "gpt2_tokenizer").save_pretrained(directory / "model")
    cache = directory / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for f in STANDIN.glob("*.json"):
        shutil.copy(f, cache / f.name)
    print(f"ENGRAM_MODEL={directory / 'model'} ENGRAM_CACHE={cache}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--fixtures"]:
        write_fixtures()
    elif len(sys.argv) == 2:
        make(Path(sys.argv[1]))
    else:
        sys.exit(__doc__)
