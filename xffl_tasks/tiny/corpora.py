"""Two small corpora, Italian and Czech, made deterministically from Faker's locale word lists.

Each document is a few sentences drawn from fixed templates per language, their slots filled
with Faker's names, cities, streets, companies, post codes and lorem words, and with the
day and month names in order ("today is Monday, tomorrow will be Tuesday"). The frames and
the orderings are learnable, so a minute of CPU training visibly lowers the loss; the slot
values keep the text varied. No network: Faker ships the word lists.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LANGUAGES = {"italian": "it_IT", "czech": "cs_CZ"}


@dataclass(frozen=True)
class _Words:
    faker: object
    days: list[str]
    months: list[str]
    words: list[str]
    cities: list[str]

    def city(self) -> str:
        # Faker's it_IT city list is built from a set (its order changes with the hash seed):
        # draw from the sorted list with Faker's seeded generator instead.
        return self.faker.random_element(self.cities)


def _italian(w: _Words, rng: random.Random) -> list[Callable[[], str]]:
    f = w.faker
    day = rng.randrange(7)
    month = rng.randrange(12)
    return [
        lambda: f"{f.name()} abita in {f.street_address()} a {w.city()}.",
        lambda: f"{f.first_name()} lavora presso {f.company()}.",
        lambda: f"Oggi è {w.days[day]}, domani sarà {w.days[(day + 1) % 7]}.",
        lambda: (
            f"Questo mese è {w.months[month]}, il prossimo mese sarà {w.months[(month + 1) % 12]}."
        ),
        lambda: f"Il codice postale di {w.city()} è {f.postcode()}.",
        lambda: f"{f.first_name()} ha {rng.randint(18, 90)} anni.",
        lambda: f"A {f.first_name()} piace la parola «{rng.choice(w.words)}».",
        lambda: (
            f"{f.first_name()} e {f.first_name()} si sono conosciuti a {w.city()} in {w.months[rng.randrange(12)]}."
        ),
        lambda: f"Di {w.days[rng.randrange(7)]} {f.first_name()} va a {w.city()} in treno.",
    ]


def _czech(w: _Words, rng: random.Random) -> list[Callable[[], str]]:
    f = w.faker
    day = rng.randrange(7)
    month = rng.randrange(12)
    return [
        lambda: f"{f.name()} bydlí na adrese {f.street_address()}, {w.city()}.",
        lambda: f"{f.first_name()} pracuje ve firmě {f.company()}.",
        lambda: f"Dnes je {w.days[day]}, zítra bude {w.days[(day + 1) % 7]}.",
        lambda: (
            f"Tento měsíc je {w.months[month]}, příští měsíc bude {w.months[(month + 1) % 12]}."
        ),
        lambda: f"PSČ obce {w.city()} je {f.postcode()}.",
        lambda: f"{f.first_name()} má {rng.randint(18, 90)} let.",
        lambda: f"{f.first_name()} má rád slovo „{rng.choice(w.words)}“.",
        lambda: f"{f.first_name()} a {f.first_name()} se potkali ve městě {w.city()}.",
        lambda: f"Každý den {f.first_name()} jezdí vlakem do města {w.city()}.",
    ]


TEMPLATES = {"italian": _italian, "czech": _czech}


def make_corpus(
    language: str, *, seed: int, train_documents: int, validation_documents: int
) -> tuple[list[str], list[str]]:
    """(training, validation) documents of ``language`` (``italian`` or ``czech``)."""
    from faker import Faker

    if language not in LANGUAGES:
        raise ValueError(f"language: {language!r} is not one of {', '.join(LANGUAGES)}")
    locale = LANGUAGES[language]
    faker = Faker(locale)
    offset = sorted(LANGUAGES).index(language)
    faker.seed_instance(seed * 1000 + offset)
    rng = random.Random(seed * 1000 + offset)
    date_time = faker.factories[0]  # the locale's generator holds its providers' word lists
    days_by_number = _provider(date_time, "DAY_NAMES").DAY_NAMES
    months_by_number = _provider(date_time, "MONTH_NAMES").MONTH_NAMES
    # Monday first, as both languages count the week.
    days = [days_by_number[str(i % 7)] for i in range(1, 8)]
    months = [months_by_number[f"{i:02d}"] for i in range(1, 13)]
    words = sorted(
        {w for w in _provider(date_time, "word_list").word_list if w.isalpha() and len(w) > 3}
    )
    cities = sorted(set(_provider(date_time, "cities").cities))
    vocabulary = _Words(faker, days, months, words, cities)
    documents = []
    for _ in range(train_documents + validation_documents):
        sentences = rng.randint(3, 5)
        templates = TEMPLATES[language](vocabulary, rng)
        documents.append(" ".join(rng.choice(templates)() for _ in range(sentences)))
    return documents[:train_documents], documents[train_documents:]


def _provider(generator: object, attribute: str) -> object:
    for provider in generator.providers:  # type: ignore[attr-defined]
        if hasattr(provider, attribute):
            return provider
    raise LookupError(f"the Faker locale has no provider with {attribute}")
