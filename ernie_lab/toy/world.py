"""The invented world the toy corpus talks about: one fixed fact table shared by every sample.

All names are made up for this project. Every entity name is chosen to be a single token (with a
leading space) under the toy tokenizer, so that clean/corrupted prompts that swap one entity keep
their token length; ``tests/test_toy_corpus.py`` checks this against ``data/toy/tokenizer.json``.

The table is built once at import from ``WORLD_SEED`` and never depends on a corpus seed: the
same facts appear in every training document, held-out prompt and chat answer, so they are
learnable and testable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORLD_SEED = 4_5_21

# (country, capital, main export)
_COUNTRIES = (
    ("Veloria", "Mirren", "salt"),
    ("Dunmark", "Ostra", "wool"),
    ("Castren", "Kelmar", "glass"),
    ("Ombria", "Tolvo", "tea"),
    ("Kavaro", "Brisa", "silver"),
    ("Brennia", "Ardis", "timber"),
    ("Solvane", "Vesk", "copper"),
    ("Marivel", "Pirran", "rice"),
    ("Quenlar", "Lunet", "silk"),
    ("Zandor", "Dovra", "coffee"),
    ("Ithra", "Selk", "paper"),
    ("Pellune", "Corvi", "honey"),
    ("Gorvast", "Ulmet", "iron"),
    ("Varnet", "Rostel", "cotton"),
    ("Elstrae", "Nimba", "fish"),
    ("Norrin", "Jessa", "wine"),
    ("Halvary", "Oruna", "gold"),
    ("Yestrel", "Wenlo", "stone"),
    ("Corvane", "Velt", "sugar"),
    ("Lumora", "Sarn", "tin"),
)

# Single-token first names, used for people and for the indirect-object task.
_PEOPLE = (
    "Tavi", "Orin", "Pell", "Maren", "Dax", "Ilsa", "Bram", "Nessa", "Jory", "Kiri",
    "Soren", "Vela", "Tobin", "Lyra", "Cass", "Rell", "Anko", "Brin", "Elio", "Fenna",
    "Garo", "Hale", "Idra", "Juno", "Kael", "Lio", "Mika", "Nilo", "Oska", "Pim",
    "Quin", "Rasa", "Sefa", "Tuli", "Ulla", "Wren", "Yara", "Zeno",
)  # fmt: skip

# (company, product it makes)
_COMPANIES = (
    ("Kestrel", "boats"),
    ("Vantor", "clocks"),
    ("Orbis", "lamps"),
    ("Glimmer", "mirrors"),
    ("Tamber", "bricks"),
    ("Quillon", "pens"),
    ("Halcor", "bells"),
    ("Morrow", "maps"),
    ("Pennant", "flags"),
    ("Ferrow", "tools"),
    ("Brightwell", "candles"),
    ("Sundra", "carpets"),
)

# Consonant-initial so that "works as a {job}" never needs "an".
JOBS = (
    "baker", "pilot", "doctor", "teacher", "farmer", "painter", "sailor", "miner",
    "nurse", "tailor", "builder", "singer", "judge", "potter", "guard", "writer",
)  # fmt: skip
PETS = ("cat", "dog", "owl", "goat", "horse", "parrot", "rabbit", "fox")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
PLACES = (
    "store", "market", "park", "library", "station", "harbor", "bakery", "garden",
    "museum", "beach", "theater", "bridge",
)  # fmt: skip
OBJECTS = ("book", "lamp", "cup", "key", "coin", "map", "letter", "ring", "apple", "hat", "drink", "pen")


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    export: str


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    age: int
    colour: str
    employer: str


@dataclass(frozen=True)
class Company:
    name: str
    product: str
    hq: str
    founder: str


@dataclass(frozen=True)
class World:
    """The fact table: countries, people and companies, with lookup by name."""

    countries: tuple[Country, ...]
    people: tuple[Person, ...]
    companies: tuple[Company, ...]

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)

    def country(self, name: str) -> Country:
        return next(c for c in self.countries if c.name == name)

    def company(self, name: str) -> Company:
        return next(c for c in self.companies if c.name == name)

    @property
    def cities(self) -> tuple[str, ...]:
        return tuple(c.capital for c in self.countries)

    def entity_names(self) -> tuple[str, ...]:
        """Every name that the tasks use as a subject or an answer (all single tokens)."""
        names = [c.name for c in self.countries] + list(self.cities) + [c.export for c in self.countries]
        names += [p.name for p in self.people] + [c.name for c in self.companies] + list(JOBS)
        return tuple(dict.fromkeys(names))


def _spread(rng: random.Random, values: tuple, n: int) -> list:
    """``n`` values that use every value about equally often (so every job, city... occurs)."""
    out = list(values) * (n // len(values)) + rng.sample(values, n % len(values))
    rng.shuffle(out)
    return out


def _build_world(seed: int) -> World:
    rng = random.Random(seed)
    countries = tuple(Country(*row) for row in _COUNTRIES)
    cities = tuple(c.capital for c in countries)
    companies = tuple(
        Company(name, product, hq=hq, founder=founder)
        for (name, product), hq, founder in zip(
            _COMPANIES, _spread(rng, cities, len(_COMPANIES)), rng.sample(_PEOPLE, len(_COMPANIES)), strict=True
        )
    )
    n = len(_PEOPLE)
    columns = zip(
        _spread(rng, cities, n),
        _spread(rng, JOBS, n),
        _spread(rng, PETS, n),
        _spread(rng, COLOURS, n),
        _spread(rng, tuple(c.name for c in companies), n),
        strict=True,
    )
    people = tuple(
        Person(name, city=city, job=job, pet=pet, age=rng.randint(19, 78), colour=colour, employer=employer)
        for name, (city, job, pet, colour, employer) in zip(_PEOPLE, columns, strict=True)
    )
    return World(countries=countries, people=people, companies=companies)


WORLD = _build_world(WORLD_SEED)

# Relations usable as recall tasks: relation -> (subject, object) pairs, in table order.
FACTS: dict[str, tuple[tuple[str, str], ...]] = {
    "capital": tuple((c.name, c.capital) for c in WORLD.countries),
    "export": tuple((c.name, c.export) for c in WORLD.countries),
    "home": tuple((p.name, p.city) for p in WORLD.people),
    "job": tuple((p.name, p.job) for p in WORLD.people),
    "hq": tuple((c.name, c.hq) for c in WORLD.companies),
    "founder": tuple((c.name, c.founder) for c in WORLD.companies),
}
