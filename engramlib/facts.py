"""The fact table: real-world (subject, relation, object) triples, and CounterFact-style records.

A *fact* is a triple such as ("Eiffel Tower", P131, "Paris"). A *relation* knows how to turn a
subject into a prompt: "{} is located in the city of".format("Eiffel Tower"). Relation ids are
Wikidata property ids, as in CounterFact (Meng et al. 2022).

Each relation has
- `prompt`: the CounterFact rewrite prompt (always in TinyWorld's training text),
- `templates`: more phrasings; for every fact two of them are *held out* of training and become
  that fact's paraphrase prompts, so a paraphrase test asks a wording the model has seen for
  other subjects but never for this one,
- `appositions`: training-only forms where the object follows the subject directly
  ("Eiffel Tower (city: Paris)"), as in real text.

`counterfact_records()` builds edit records with CounterFact's field names; `load_counterfact`
and `load_known_facts` read the real CounterFact / known_1000 JSON (ROME's files) when online.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Relation:
    id: str            # Wikidata property id, e.g. "P131"
    name: str          # human-readable, e.g. "located in city"
    prompt: str        # CounterFact rewrite prompt; "{}" marks the subject
    templates: tuple   # further phrasings (paraphrases are drawn from these per fact)
    appositions: tuple  # training-only forms, object right after the subject


@dataclass(frozen=True)
class Fact:
    subject: str
    relation_id: str
    object: str

    @property
    def relation(self) -> Relation:
        return RELATIONS[self.relation_id]

    @property
    def prompt(self) -> str:
        """The rewrite prompt with the subject filled in; the model should continue with ' ' + object."""
        return self.relation.prompt.format(self.subject)


RELATIONS = {r.id: r for r in [
    Relation("P36", "capital", "The capital of {} is", (
        "{}'s capital is", "The capital city of {} is", "{} has its capital in",
        "The seat of government of {} is", "In {}, the capital is", "{} is governed from",
        "The government of {} sits in", "The capital of the country {} is"),
        ("{} (capital:", "{}, with its capital")),
    Relation("P30", "continent", "{} is located in the continent of", (
        "{} is a country in", "{} belongs to the continent of", "{} is part of",
        "{} lies in", "The country {} is in", "{} is one of the countries of",
        "On a map, {} is found in", "{} can be found in the continent of"),
        ("{} (continent:", "{}, a country of")),
    Relation("P37", "official language", "The official language of {} is", (
        "In {}, the official language is", "People in {} officially speak",
        "The language of government in {} is", "{}'s official language is",
        "{} has the official language", "Official documents in {} are written in",
        "The national language of {} is", "The state language of {} is"),
        ("{} (official language:", "{}, where the official language is")),
    Relation("P17", "country", "{} is located in the country of", (
        "{} is in the country of", "{} lies in the country of", "{} is part of",
        "{} can be found in", "{} belongs to", "{} is situated in",
        "The country that contains {} is", "Visitors to {} travel to"),
        ("{} (country:", "{}, in")),
    Relation("P131", "city", "{} is located in the city of", (
        "{} is in the city of", "{} stands in", "{} is a famous landmark in",
        "{} can be found in", "{} is situated in the city of", "Tourists visit {} in",
        "The city that is home to {} is", "You can see {} in"),
        ("{} (city:", "{}, a famous sight in")),
    Relation("P159", "headquarters", "The headquarters of {} is in", (
        "{} is headquartered in", "{} has its headquarters in", "{}'s head office is in",
        "The main office of {} is located in", "{} is based in", "The company {} operates from",
        "{} runs its business from", "The head office of {} is in"),
        ("{} (headquarters:", "{}, based in")),
    Relation("P176", "manufacturer", "{} is produced by", (
        "{} is made by", "{} is manufactured by", "{} was developed by", "{} is a product of",
        "The company that makes {} is", "{} comes from the company", "{} is built by",
        "The maker of {} is"),
        ("{} (maker:", "{}, made by")),
    Relation("P641", "sport", "{} professionally plays the sport of", (
        "{} plays", "The sport played by {} is", "{} is famous for playing",
        "{} became a star of", "{}'s sport is", "{} competes in", "{} earned fame in",
        "{} won many titles in"),
        ("{} (sport:", "{}, a star of")),
    Relation("P1303", "instrument", "{} plays the", (
        "{} is known for playing the", "The instrument of {} is the", "{} performs on the",
        "{} became famous playing the", "{}'s instrument is the", "{} is a master of the",
        "On stage, {} performs with the", "{} practised the"),
        ("{} (instrument:", "{}, who plays the")),
    Relation("P106", "occupation", "The occupation of {} is", (
        "{}'s occupation is", "{}'s profession is", "The profession of {} is",
        "{} had the profession of", "{} worked in the profession of",
        "The job of {} was", "{} is remembered for the profession of",
        "{} is known by the occupation"),
        ("{} (occupation:", "{}, by profession")),
    Relation("P103", "native language", "The mother tongue of {} is", (
        "{}'s native language is", "{} grew up speaking", "The first language of {} was",
        "{} spoke natively", "As a child, {} spoke", "{} is a native speaker of",
        "The native language of {} is", "The language {} learned first was"),
        ("{} (native language:", "{}, a native speaker of")),
]}

# Unrelated sentences that precede paraphrase prompts, as CounterFact's paraphrases do.
# TinyWorld's training text never contains them.
PARAPHRASE_PREFIXES = (
    "The rain stopped before noon.", "She closed the old book slowly.",
    "Nobody expected the long silence.", "The train was late again.",
    "He painted the fence last summer.", "A cold wind came from the hills.",
    "The market opened early today.", "They argued about the recipe.",
)

N_PARAPHRASES = 2  # phrasings held out per fact


@lru_cache(maxsize=None)
def load_facts() -> tuple:
    """All facts in the table, as a tuple of `Fact`, in file order."""
    facts = []
    for line in (DATA_DIR / "facts.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        relation_id, subject, obj = line.split("\t")
        if relation_id not in RELATIONS:
            raise ValueError(f"unknown relation {relation_id!r} in facts.tsv")
        facts.append(Fact(subject, relation_id, obj))
    return tuple(facts)


def _stable_seed(*parts: str) -> int:
    """A seed from strings that does not change between Python runs (unlike hash())."""
    return int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:8], 16)


def heldout_templates(fact: Fact) -> tuple:
    """The `N_PARAPHRASES` phrasings of `fact.relation` never trained with this fact."""
    rng = random.Random(_stable_seed(fact.subject, fact.relation_id))
    return tuple(rng.sample(fact.relation.templates, N_PARAPHRASES))


def training_templates(fact: Fact) -> tuple:
    """Phrasings TinyWorld sees with this fact: the rewrite prompt plus the templates not held out."""
    held = heldout_templates(fact)
    return (fact.relation.prompt,) + tuple(t for t in fact.relation.templates if t not in held)


def paraphrase_prompts(fact: Fact) -> list:
    """Held-out phrasings, each after an unrelated sentence (CounterFact style), subject filled in."""
    rng = random.Random(_stable_seed("prefix", fact.subject, fact.relation_id))
    return [f"{rng.choice(PARAPHRASE_PREFIXES)} {t.format(fact.subject)}"
            for t in heldout_templates(fact)]


def counterfact_records(facts=None, n_neighbors: int = 5, seed: int = 0) -> list:
    """CounterFact-style edit records, one per fact whose relation has another object to move to.

    Each record: {case_id, requested_rewrite{prompt, relation_id, subject, target_new{str},
    target_true{str}}, paraphrase_prompts, neighborhood_prompts, generation_prompts}.
    `target_new` is another object of the same relation (seeded choice); the neighbourhood
    prompts ask the same relation of other subjects whose true object equals `target_true`.
    """
    facts = list(load_facts() if facts is None else facts)
    rng = random.Random(seed)
    by_relation = {}
    for f in load_facts():
        by_relation.setdefault(f.relation_id, []).append(f)
    records = []
    for fact in facts:
        peers = by_relation[fact.relation_id]
        objects = sorted({f.object for f in peers} - {fact.object})
        neighbors = [f for f in peers if f.object == fact.object and f.subject != fact.subject]
        if not objects:
            continue
        rng_n = random.Random(_stable_seed("neighbors", fact.subject, fact.relation_id))
        neighbors = rng_n.sample(neighbors, min(n_neighbors, len(neighbors)))
        records.append({
            "case_id": len(records),
            "requested_rewrite": {
                "prompt": fact.relation.prompt,
                "relation_id": fact.relation_id,
                "subject": fact.subject,
                "target_new": {"str": rng.choice(objects)},
                "target_true": {"str": fact.object},
            },
            "paraphrase_prompts": paraphrase_prompts(fact),
            "neighborhood_prompts": [n.prompt for n in neighbors],
            "generation_prompts": [t.format(fact.subject) for t in fact.relation.templates[:3]],
        })
    return records


# --- the real datasets (need internet; cached) -------------------------------------------------

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
KNOWN_FACTS_URL = "https://rome.baulab.info/data/dsets/known_1000.json"
# Second sources. known_1000.json was committed to the reference repository before it moved to the
# data host (kmeng01/rome, initial commit, counterfact/compiled/known_1000.json: 1,209 facts).
KNOWN_FACTS_GITHUB = ("https://raw.githubusercontent.com/kmeng01/rome/"
                      "448f8fe556cf267e0b71d02a9f3b4dec9858ec58/counterfact/compiled/known_1000.json")
# CounterFact on the Hugging Face Hub: the same fields as counterfact.json, split into train (19,728)
# and test (2,191) parquet files; `counterfact_from_hub` puts the 21,919 records back in case order.
COUNTERFACT_HUB = "azhx/counterfact"
COUNTERFACT_SIZE = 21919
OFFLINE_HINT = ("Use engramlib.facts.counterfact_records() (TinyWorld's facts) instead, or copy the "
                "file into $ENGRAM_CACHE (default ~/.cache/engramlib) on a machine with internet, "
                "or pass the path of a local copy.")
REQUIRED_FIELDS = {"counterfact.json": {"case_id", "requested_rewrite", "paraphrase_prompts",
                                        "neighborhood_prompts"},
                   "known_1000.json": {"subject", "attribute", "prompt"}}


def _cache_dir() -> Path:
    from engramlib.download import cache_dir
    return cache_dir()


def check_records(records, name: str) -> list:
    """Raise ValueError unless `records` is a non-empty list of dicts with the fields the official
    file `name` ("counterfact.json" or "known_1000.json") has; returns `records`."""
    fields = REQUIRED_FIELDS.get(name, set())
    if not isinstance(records, list) or not records:
        raise ValueError(f"{name}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not fields <= set(r):
            raise ValueError(f"{name}: record {i} lacks {sorted(fields - set(r or {}))}; "
                             "not the official format")
    return records


def _check_json_file(path: Path, name: str) -> None:
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: not valid JSON ({err}); truncated?") from err
    check_records(records, name)


def counterfact_from_hub(rows) -> list:
    """CounterFact records from the rows of the Hub copy (`COUNTERFACT_HUB`, both splits, any order):
    plain dicts with counterfact.json's fields, sorted by case_id. Raises ValueError if a field is
    missing or a case_id repeats."""
    records = [{k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v)
                for k, v in dict(row).items()} for row in rows]
    check_records(records, "counterfact.json")
    records.sort(key=lambda r: r["case_id"])
    ids = [r["case_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("CounterFact from the Hub: a case_id appears twice (both splits loaded twice?)")
    return records


def _counterfact_via_hub(target: Path) -> None:
    """Write counterfact.json from the Hub copy (needs `datasets`), atomically."""
    try:
        from datasets import load_dataset
        splits = load_dataset(COUNTERFACT_HUB)
    except Exception as err:      # ImportError, or no network
        raise RuntimeError(f"the Hub copy {COUNTERFACT_HUB} failed too ({type(err).__name__}: {err})") from err
    records = counterfact_from_hub(row for split in splits.values() for row in split)
    if len(records) != COUNTERFACT_SIZE:
        raise RuntimeError(f"the Hub copy {COUNTERFACT_HUB} has {len(records)} records, not {COUNTERFACT_SIZE}")
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    partial.write_text(json.dumps(records), encoding="utf-8")
    os.replace(partial, target)


def _sources(url: str) -> list:
    """Where a file can come from: $ENGRAM_MIRROR, then the official host (and a second copy)."""
    from engramlib.download import mirrored
    if url == COUNTERFACT_URL:
        return mirrored("data/dsets/counterfact.json", [COUNTERFACT_URL])
    if url == KNOWN_FACTS_URL:
        return mirrored("data/dsets/known_1000.json", [KNOWN_FACTS_URL, KNOWN_FACTS_GITHUB])
    return [url]


def _read_json(path_or_url: str, progress: bool = True) -> list:
    """Read a JSON list from a local path or an URL (downloaded once into the engramlib cache, with
    timeout, retries, a progress bar and an atomic write: `engramlib.download`)."""
    from engramlib.download import DownloadError, download
    if not str(path_or_url).startswith(("http://", "https://")):
        return json.loads(Path(path_or_url).read_text(encoding="utf-8"))
    name = Path(path_or_url).name
    target = _cache_dir() / name
    if not target.exists():
        try:
            download(_sources(path_or_url), target, check=lambda p: _check_json_file(p, name),
                     progress=progress, what=name, offline_hint=OFFLINE_HINT)
        except DownloadError as err:
            if path_or_url != COUNTERFACT_URL:
                raise
            try:
                _counterfact_via_hub(target)
            except RuntimeError as hub_err:
                raise DownloadError(f"{err} ({hub_err})") from err
    return json.loads(target.read_text(encoding="utf-8"))


def load_counterfact(path_or_url: str = COUNTERFACT_URL) -> list:
    """The real CounterFact records (Meng et al. 2022): same fields as `counterfact_records()`.
    Downloaded once from the reference's host, else from its Hub copy (`COUNTERFACT_HUB`)."""
    return _read_json(path_or_url)


def load_known_facts(path_or_url: str = KNOWN_FACTS_URL) -> list:
    """ROME's known_1000: dicts with `subject`, `prompt` (subject filled in), `attribute`, ..."""
    return _read_json(path_or_url)
