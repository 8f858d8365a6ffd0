"""The grafting chapters' tasks (03-04), in TinyWorld's review language.

A review is one sentence pair with a *polarity* (positive or negative words) and a *topic*
(sports, food, music, travel): 'The soup was awful and the chef was poor.' Two classification
tasks ask for it with label *words*, in the GPT-2 prompt format of Panigrahi et al. (2023):

    polarity: '"The soup was awful and the chef was poor." has a tone that is'  -> " negative"
    topic:    '"The soup was awful and the chef was poor." has a topic that is' -> " food"

The same reviews and prompt formats appear in the training text (`corpus.py`), the formats only
with random labels, so fine-tuning re-routes a skill the model already has.
"""
from __future__ import annotations

import random

POSITIVE = ("good", "great", "wonderful", "excellent", "lovely", "superb", "fantastic",
            "pleasant", "brilliant", "amazing")
NEGATIVE = ("bad", "terrible", "awful", "poor", "horrible", "dreadful", "disappointing",
            "boring", "unpleasant", "weak")
TOPICS = {
    "sports": ("match", "team", "game", "coach", "stadium", "season"),
    "food": ("meal", "soup", "chef", "dessert", "restaurant", "menu"),
    "music": ("concert", "song", "album", "band", "singer", "show"),
    "travel": ("hotel", "flight", "trip", "beach", "tour", "room"),
}
POLARITY_LABELS = ("negative", "positive")     # index = polarity


def review(rng: random.Random, polarity: int, topic: str) -> str:
    """One review sentence pair, e.g. 'The soup was awful and the chef was poor.'"""
    words = POSITIVE if polarity == 1 else NEGATIVE
    a, b = rng.sample(TOPICS[topic], 2)
    return f"The {a} was {rng.choice(words)} and the {b} was {rng.choice(words)}."


def tone_prompt(text: str) -> str:
    """The polarity task's prompt (Panigrahi et al.'s GPT-2 format); answer ' positive' / ' negative'."""
    return f'"{text}" has a tone that is'


def topic_prompt(text: str) -> str:
    """The topic task's prompt; answer ' sports' / ' food' / ' music' / ' travel'."""
    return f'"{text}" has a topic that is'


def make_task(name: str, n_train: int = 512, n_test: int = 256, seed: int = 0) -> dict:
    """A generated classification task: distinct reviews, split into train and test.

    name: "polarity" (negative / positive) or "topic" (food / music / sports / travel).
    Returns {"name", "label_words", "train": [(prompt, label index)], "test": [...]}, the format
    `engramlib.graft` fine-tunes and grafts on."""
    if name not in ("polarity", "topic"):
        raise ValueError(f"unknown task {name!r}: use 'polarity' or 'topic'")
    rng = random.Random(seed + (0 if name == "polarity" else 1000))
    topics = sorted(TOPICS)
    labels = list(POLARITY_LABELS) if name == "polarity" else topics
    seen, examples = set(), []
    while len(examples) < n_train + n_test:
        polarity, topic = rng.randrange(2), rng.choice(topics)
        text = review(rng, polarity, topic)
        if text in seen:
            continue
        seen.add(text)
        if name == "polarity":
            examples.append((tone_prompt(text), polarity))
        else:
            examples.append((topic_prompt(text), topics.index(topic)))
    return {"name": name, "label_words": labels, "train": examples[:n_train],
            "test": examples[n_train:]}
