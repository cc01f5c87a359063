"""English documents about the invented world: fact sheets, biographies, company profiles, stories.

Recall facts are phrased with ``TRAIN_FACT_TEMPLATES``; the held-out prompt sets use
``HELDOUT_FACT_TEMPLATES`` (new phrasings of the same facts) so a recall prompt is never a string
the model saw. The indirect-object sentences (``IOI_FRAMES``) use ``IOI_TRAIN_PLACES`` in training
and ``IOI_HELDOUT_PLACES`` in the prompt sets.
"""

from __future__ import annotations

import random

from ernie_lab.toy.world import COLOURS, FACTS, OBJECTS, PLACES, WORLD

# Each template ends in "{o}." where it can serve as a prompt: the prompt is the text before " {o}".
TRAIN_FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {s} is {o}.",
        "{o} is the capital of {s}.",
        "The capital city of {s} is {o}.",
        "{s} has its capital in {o}.",
    ),
    "export": (
        "The main export of {s} is {o}.",
        "{s} is famous for its {o}.",
        "Most of the {o} sold abroad comes from {s}.",
    ),
    "home": ("{s} lives in {o}.", "{s} has a house in {o}.", "{s} moved to {o} years ago."),
    "job": ("{s} works as a {o}.", "{s} is a {o}.", "By trade, {s} is a {o}."),
    "hq": ("{s} is based in {o}.", "The main office of {s} is in {o}.", "{s} has its offices in {o}."),
    "founder": ("{s} was founded by {o}.", "{o} founded {s}.", "The founder of {s} is {o}."),
}
HELDOUT_FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("Everyone agrees that the capital of {s} is {o}.", "If you travel to {s}, its capital is {o}."),
    "export": ("Traders say the main export of {s} is {o}.", "Ask a merchant and the export of {s} is {o}."),
    "home": ("These days {s} lives in {o}.", "According to the letter, {s} lives in {o}."),
    "job": ("In the village, {s} works as a {o}.", "Most days, {s} works as a {o}."),
    "hq": ("According to the report, {s} is based in {o}.", "For many years now, {s} is based in {o}."),
    "founder": ("Long ago, {s} was founded by {o}.", "The old books say {s} was founded by {o}."),
}

# Indirect-object sentences: the giver "{S}" is "{B}" again, so the answer "{A}" is the name said
# once. (The patching corruption puts a third name in "{S}".)
IOI_FRAMES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to {A}.",
    "After {A} and {B} arrived at the {place}, {S} handed a {obj} to {A}.",
    "{A} and {B} were at the {place}. {S} passed a {obj} to {A}.",
    "Then {A} and {B} walked to the {place}, and {S} brought a {obj} to {A}.",
)
IOI_TRAIN_PLACES = PLACES[:8]
IOI_HELDOUT_PLACES = PLACES[8:]

_TIMES = ("morning", "evening", "spring day", "winter night", "rainy afternoon", "quiet Sunday")
_NAMES = tuple(p.name for p in WORLD.people)


def fact_sentence(rng: random.Random, relation: str, subject: str) -> str:
    """One training-phrased sentence stating ``relation`` of ``subject``."""
    obj = dict(FACTS[relation])[subject]
    return rng.choice(TRAIN_FACT_TEMPLATES[relation]).format(s=subject, o=obj)


def ioi_sentence(rng: random.Random, a: str, b: str, places: tuple[str, ...] = IOI_TRAIN_PLACES) -> str:
    """An indirect-object sentence in which ``b`` gives something to ``a``."""
    frame = rng.choice(IOI_FRAMES)
    return frame.format(A=a, B=b, S=b, place=rng.choice(places), obj=rng.choice(OBJECTS))


def _lower_first(sentence: str) -> str:
    return "the" + sentence[3:] if sentence.startswith("The ") else sentence


def _country_sheet(rng: random.Random) -> list[str]:
    out = []
    for country in rng.sample(WORLD.countries, rng.randint(2, 4)):
        out.append(fact_sentence(rng, "capital", country.name))
        if rng.random() < 0.6:
            out.append(fact_sentence(rng, "export", country.name))
        if rng.random() < 0.3:
            out.append(f"{country.capital} is a {rng.choice(('busy', 'quiet', 'old', 'large'))} city.")
    return out


def _biography(rng: random.Random) -> list[str]:
    p = rng.choice(WORLD.people)
    pool = [
        fact_sentence(rng, "home", p.name),
        fact_sentence(rng, "job", p.name),
        f"{p.name} has a {p.pet}.",
        f"{p.name} is {p.age} years old.",
        f"The favourite colour of {p.name} is {p.colour}.",
        f"{p.name} works for {p.employer}.",
    ]
    return rng.sample(pool, rng.randint(3, len(pool)))


def _company_profile(rng: random.Random) -> list[str]:
    c = rng.choice(WORLD.companies)
    buyer = rng.choice(WORLD.cities)
    pool = [
        fact_sentence(rng, "hq", c.name),
        fact_sentence(rng, "founder", c.name),
        f"{c.name} makes {c.product}.",
        f"{c.name} sells {c.product} to shops in {buyer}.",
    ]
    staff = [p.name for p in WORLD.people if p.employer == c.name]
    if staff:
        pool.append(f"{rng.choice(staff)} works for {c.name}.")
    return rng.sample(pool, rng.randint(2, len(pool)))


def _story(rng: random.Random) -> list[str]:
    a, b = rng.sample(_NAMES, 2)
    pa, pb = WORLD.person(a), WORLD.person(b)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    pool = [
        f"One {rng.choice(_TIMES)}, {a} left {pa.city} to visit {b} in {pb.city}.",
        ioi_sentence(rng, a, b),
        f"The {obj} was {rng.choice(COLOURS)}.",
        f"Later, {a} and {b} sat in the {place} and talked about {rng.choice(WORLD.countries).name}.",
        f"{b} told {a} that {_lower_first(fact_sentence(rng, 'capital', rng.choice(WORLD.countries).name))}",
        f"{a} said thank you and went home.",
        ioi_sentence(rng, b, a),
    ]
    opening = [pool[0]] if rng.random() < 0.5 else []
    return opening + [pool[1]] + rng.sample(pool[2:], rng.randint(1, 3))


def _fact_list(rng: random.Random) -> list[str]:
    lines = ["Facts:"]
    for _ in range(rng.randint(3, 6)):
        relation = rng.choice(tuple(FACTS))
        subject = rng.choice(FACTS[relation])[0]
        lines.append("- " + fact_sentence(rng, relation, subject))
    return ["\n".join(lines)]


def english_document(rng: random.Random) -> str:
    """A short English document (one to three paragraphs) about the invented world."""
    kinds = (_country_sheet, _biography, _company_profile, _story, _story, _fact_list)
    paragraphs = [" ".join(rng.choice(kinds)(rng)) for _ in range(rng.randint(1, 3))]
    return "\n\n".join(paragraphs)
