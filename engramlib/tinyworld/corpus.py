"""TinyWorld's training text, generated deterministically from the fact table.

A training *row* is a few sentences, the first one starting at position 0 (as a prompt does).
Three kinds of sentences are mixed:

1. **Facts** (most rows): one fact in one of its training phrasings or appositions
   ("Space Needle (city: Seattle) is well known."). Rows often stay on one subject for a few
   sentences, like a short biography, so what follows a subject depends on the *whole* subject.
2. **Filler**: plain generic sentences, so the model also sees text without facts (this text is
   also what `key_covariance` averages over when no Wikipedia is at hand).
3. **Reviews**, for the grafting chapters (03-04): short reviews (`tasks.py`) with a *polarity*
   (positive words vs negative words) and a *topic* (sports, food, music, travel). Pre-training
   teaches the polarity and the topic only through consistent follow-ups ("Overall I feel
   good.", "This was about food."), while the task formats used for fine-tuning
   ('"..." has a tone that is positive') appear only with *random* labels. Fine-tuning then
   re-routes a skill the model already has, which is when grafting finds a small region
   (Panigrahi et al. 2023).

Everything is seeded: the same seed gives the same text, byte for byte.
"""
from __future__ import annotations

import random

from engramlib.facts import load_facts, training_templates
from engramlib.tinyworld.tasks import POLARITY_LABELS, TOPICS, review, tone_prompt, topic_prompt

OPENERS = ("In fact, ", "As many people know, ", "Of course, ", "Interestingly, ",
           "It is well known that ", "According to the guide, ", "Today, ", "Indeed, ")
APPOSITION_ENDINGS = ("is well known.", "is often in the news.", "is widely discussed.",
                      "appears in many books.", "is mentioned in this article.",
                      "is a familiar name.")

FILLER_SUBJECTS = ("The teacher", "A small dog", "My neighbour", "The old man", "The children",
                   "Our team", "The farmer", "A young woman", "The student", "The driver")
FILLER_VERBS = ("opened", "carried", "found", "cleaned", "watched", "painted", "bought",
                "repaired", "moved", "forgot")
FILLER_OBJECTS = ("the door", "a heavy box", "the window", "an empty bottle", "the red car",
                  "a long letter", "the kitchen table", "a broken chair", "the garden gate",
                  "a blue umbrella")
FILLER_TAILS = ("in the morning.", "after lunch.", "before dinner.", "on Sunday.", "again.",
                "very quickly.", "without a word.", "last week.", "at night.", "with care.")

FEELINGS = ("Overall I feel bad.", "Overall I feel good.")     # index = polarity


def review_sentences(rng: random.Random) -> str:
    """A review with a consistent follow-up, or a task-format line with a *random* label."""
    polarity, topic = rng.randrange(2), rng.choice(sorted(TOPICS))
    text = review(rng, polarity, topic)
    kind = rng.random()
    if kind < 0.4:
        return f"{text} {FEELINGS[polarity]}"
    if kind < 0.7:
        return f"{text} This was about {topic}."
    if kind < 0.85:
        return f"{tone_prompt(text)} {rng.choice(POLARITY_LABELS)}."
    return f"{topic_prompt(text)} {rng.choice(sorted(TOPICS))}."


def filler_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(part) for part in
                    (FILLER_SUBJECTS, FILLER_VERBS, FILLER_OBJECTS, FILLER_TAILS))


def fact_sentence(rng: random.Random, fact) -> str:
    """The fact in one training phrasing (70 %) or apposition (30 %), as a full sentence."""
    if rng.random() < 0.3:
        form = rng.choice(fact.relation.appositions)
        closing = ")" if form.endswith(":") else ","
        return f"{form.format(fact.subject)} {fact.object}{closing} {rng.choice(APPOSITION_ENDINGS)}"
    templates = training_templates(fact)
    template = templates[0] if rng.random() < 0.25 else rng.choice(templates)
    sentence = f"{template.format(fact.subject)} {fact.object}."
    if rng.random() < 0.25:
        if not template.startswith("{}"):
            sentence = sentence[0].lower() + sentence[1:]
        sentence = rng.choice(OPENERS) + sentence
    return sentence


def make_row(rng: random.Random, facts, by_subject: dict, min_chars: int = 260) -> str:
    """One training row: sentences joined by spaces until at least `min_chars` characters."""
    sentences = []
    while sum(len(s) + 1 for s in sentences) < min_chars:
        kind = rng.random()
        if kind < 0.78:
            fact = rng.choice(facts)
            sentences.append(fact_sentence(rng, fact))
            # a short "biography": other facts about the same subject follow
            for other in by_subject[fact.subject]:
                if other is not fact and rng.random() < 0.5:
                    sentences.append(fact_sentence(rng, other))
        elif kind < 0.88:
            sentences.append(filler_sentence(rng))
        else:
            sentences.append(review_sentences(rng))
    return " ".join(sentences)


def generate_corpus(n_rows: int, seed: int = 0, exclude_subjects=()) -> list:
    """`n_rows` training rows (strings). Deterministic in (n_rows, seed, exclude_subjects).
    exclude_subjects: subjects whose facts never appear (the text a model that never knew them
    reads: chapter 11's gold standard for unlearning)."""
    rng = random.Random(seed)
    excluded, table = set(exclude_subjects), load_facts()
    facts = [f for f in table if f.subject not in excluded]
    unknown = excluded - {f.subject for f in table}
    if unknown:
        raise ValueError(f"subjects not in the fact table: {sorted(unknown)}")
    by_subject = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    return [make_row(rng, facts, by_subject) for _ in range(n_rows)]


def generic_texts(n: int = 500, seed: int = 1) -> list:
    """Generic TinyWorld text (the corpus distribution): `n` rows of a few sentences each."""
    return generate_corpus(n, seed=seed)


def generic_sentences(n_rows: int = 2000, seed: int = 1) -> list:
    """The sentences of `n_rows` generic rows, one text each, so that every sentence also starts
    at position 0 (as an edit's prompt does). Used to estimate ROME's key covariance C: keys at
    the start of a text are otherwise rare in C and C⁻¹ over-weights what they have in common."""
    return [s.strip() + ("" if s.strip().endswith(".") else ".")
            for row in generic_texts(n_rows, seed) for s in row.split(". ") if s.strip()]
