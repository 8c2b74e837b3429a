"""Generate ``dolly_sample.jsonl``: the instruction dataset that ships with qlw.

The rows follow the databricks-dolly-15k shape (``instruction``, ``context``, ``response``,
``category``) so that the embedded default exercises the same code path as real dolly-style
data. They come from hand-written knowledge tables (countries, planets, elements, animals,
units, programming concepts), several phrasing templates per category and a few dozen
hand-written rows, in English with Korean and Japanese rows mixed in. Answers are computed from
the tables, so they are correct by construction; the fixed seed makes the file reproducible:

    python -m backend.samples.make_sample          # rewrites backend/samples/dolly_sample.jsonl
    python -m backend.samples.make_sample --check  # fails if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from backend.samples.sample_facts import (  # noqa: F401  (the tables, also for tests)
    CATEGORIES, COUNTRIES, PLANETS, ORDINALS, KO_ORDINALS, ELEMENTS, KO_AMBIGUOUS, CLASSES,
    ANIMALS, ANIMAL_NOTES, UNITS, UNITS_CJK, PROGRAMMING, NAMES, FRUITS, VEGETABLES, LANGUAGES,
    BROWSERS, REVIEWS,
)

SEED = 20261123
OUT = Path(__file__).with_name("dolly_sample.jsonl")


def row(instruction: str, response: str, category: str, context: str = "") -> dict[str, str]:
    assert category in CATEGORIES, category
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def join_en(items: list[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def _batchim(word: str) -> bool:
    """Whether a Korean word ends in a final consonant (selects the particle form)."""
    ch = word[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - 0xAC00) % 28 != 0
    return ch in "013678"  # 영 일 삼 육 칠 팔


def ko(word: str, pair: str) -> str:
    """``word`` with the right Korean particle from ``pair``, e.g. ko("서울", "은/는") -> 서울은."""
    with_final, without = pair.split("/")
    return word + (with_final if _batchim(word) else without)


# Generators ---------------------------------------------------------------------------------


def english_countries(rng: random.Random) -> list[dict]:
    rows = []
    capital_q = ["What is the capital of {c}?", "Which city is the capital of {c}?",
                 "Name the capital city of {c}.", "What city serves as the capital of {c}?"]
    capital_a = ["The capital of {c} is {cap}.", "{cap} is the capital city of {c}.",
                 "The capital city of {c} is {cap}."]
    for c, capital, cont, cur, *_ in COUNTRIES:
        q = rng.choice(capital_q).format(c=c)
        rows.append(row(q, cap(rng.choice(capital_a).format(c=c, cap=capital)), "open_qa"))
    for c, capital, cont, cur, *_ in rng.sample(COUNTRIES, 14):
        q = rng.choice(["On which continent is {c}?", "Which continent is {c} part of?",
                        "Where in the world is {c} located?"]).format(c=c)
        a = f"{cap(c)} is located in {cont}, and its capital is {capital}."
        rows.append(row(q, a, "open_qa"))
    for c, capital, cont, cur, *_ in rng.sample(COUNTRIES, 12):
        q = rng.choice(["What currency is used in {c}?", "What is the official currency of {c}?"]).format(c=c)
        rows.append(row(q, f"The currency used in {c} is the {cur}.", "open_qa"))
    for c, capital, cont, cur, *_ in rng.sample(COUNTRIES, 6):
        q = f"{capital} is the capital of which country?"
        rows.append(row(q, f"{capital} is the capital of {c}, a country in {cont}.", "open_qa"))

    # Passages: closed questions, extraction and summaries over the same facts.
    def passage(c: str, capital: str, cont: str, cur: str) -> str:
        variants = [
            f"{cap(c)} is a country in {cont}. Its capital and seat of government is {capital}. "
            f"People there pay with the {cur}.",
            f"Located in {cont}, {c} has {capital} as its capital city. The national currency is the {cur}.",
            f"The capital of {c} is {capital}. The country lies in {cont}, and its money is the {cur}.",
        ]
        return rng.choice(variants)

    for c, capital, cont, cur, *_ in rng.sample(COUNTRIES, 12):
        ctx = passage(c, capital, cont, cur)
        kind = rng.randrange(3)
        if kind == 0:
            rows.append(row(f"According to the passage, what currency does {c} use?",
                            f"According to the passage, {c} uses the {cur}.", "closed_qa", ctx))
        elif kind == 1:
            rows.append(row(f"Based on the text, what is the capital of {c}?",
                            f"Based on the text, the capital of {c} is {capital}.", "closed_qa", ctx))
        else:
            other = rng.choice([x for x in ("Europe", "Asia", "Africa", "North America", "South America", "Oceania") if x != cont])
            rows.append(row(f"Is {c} in {other}, according to this passage?",
                            f"No. The passage says that {c} is in {cont}, not in {other}.", "closed_qa", ctx))
    for c, capital, cont, cur, *_ in rng.sample(COUNTRIES, 10):
        ctx = passage(c, capital, cont, cur)
        q = rng.choice(["Extract the capital and the currency of {c} from the text.",
                        "From the passage, list the capital, continent and currency of {c}."]).format(c=c)
        if "continent" in q:
            a = f"The capital of {c} is {capital}, it is in {cont}, and its currency is the {cur}."
        else:
            a = f"The capital of {c} is {capital}, and its currency is the {cur}."
        rows.append(row(q, a, "information_extraction", ctx))
    for c, capital, cont, cur, *_ in rng.sample(COUNTRIES, 5):
        ctx = passage(c, capital, cont, cur)
        rows.append(row("Summarize this passage in one sentence.",
                        f"{cap(c)} is a country in {cont} whose capital is {capital} and whose currency is the {cur}.",
                        "summarization", ctx))
    # Lists of countries per continent.
    by_cont: dict[str, list[str]] = {}
    for c, _, cont, *_ in COUNTRIES:
        by_cont.setdefault(cont, []).append(c)
    for cont, names in by_cont.items():
        if len(names) < 3:
            continue
        k = 3 if len(names) < 5 else rng.choice([3, 4, 5])
        pick = rng.sample(names, k)
        rows.append(row(f"Name {k} countries in {cont}.",
                        f"Here are {k} countries in {cont}: {join_en(pick)}.", "brainstorming"))
    return rows


def english_planets(rng: random.Random) -> list[dict]:
    rows = []
    for i, (name, kind, facts, summary, *_) in enumerate(PLANETS):
        rows.append(row(rng.choice(["Which planet is the {o} planet from the Sun?", "What is the {o} planet from the Sun?"]).format(o=ORDINALS[i]),
                        f"{name} is the {ORDINALS[i]} planet from the Sun. {facts[0]}", "open_qa"))
        rows.append(row(f"Tell me something interesting about {name}.",
                        f"{name} is {article(kind)} and the {ORDINALS[i]} planet from the Sun. {rng.choice(facts[1:])}",
                        "general_qa"))
        shuffled = facts[:]
        rng.shuffle(shuffled)
        ctx = f"{name} is the {ORDINALS[i]} planet from the Sun and {article(kind)}. " + " ".join(shuffled)
        rows.append(row(rng.choice(["Summarize this paragraph about {p} in one sentence.",
                                    "Give a one-sentence summary of the text about {p}.",
                                    "What is the main point of this passage about {p}?"]).format(p=name),
                        summary, "summarization", ctx))
        rows.append(row(f"According to the passage, what kind of planet is {name}?",
                        f"According to the passage, {name} is {article(kind)}, the {ORDINALS[i]} planet from the Sun.",
                        "closed_qa", ctx))
    for _ in range(5):
        pick = rng.sample(PLANETS, 4)
        rocky = [p[0] for p in pick if p[1] == "rocky planet"]
        giant = [p[0] for p in pick if p[1] != "rocky planet"]
        names = ", ".join(p[0] for p in pick)
        parts = []
        if rocky:
            parts.append(f"{join_en(rocky)} {'is a rocky planet' if len(rocky) == 1 else 'are rocky planets'}")
        if giant:
            parts.append(f"{join_en(giant)} {'is a giant planet' if len(giant) == 1 else 'are giant planets'}")
        rows.append(row(f"Sort these planets into rocky planets and giant planets: {names}.",
                        cap(", while ".join(parts)) + ".", "classification"))
    rows.append(row("List the eight planets of the Solar System in order from the Sun.",
                    "In order from the Sun, the planets are " + join_en([p[0] for p in PLANETS]) + ".", "brainstorming"))
    rows.append(row("Which planets in the Solar System are gas giants and which are ice giants?",
                    "Jupiter and Saturn are the gas giants, while Uranus and Neptune are the ice giants.", "open_qa"))
    return rows


def english_elements(rng: random.Random) -> list[dict]:
    rows = []
    for name, sym, num, kind, state, *_ in rng.sample(ELEMENTS, 18):
        rows.append(row(rng.choice(["What is the chemical symbol for {e}?", "Which symbol stands for {e} in the periodic table?"]).format(e=name),
                        f"The chemical symbol for {name} is {sym}.", "open_qa"))
    for name, sym, num, kind, state, *_ in rng.sample(ELEMENTS, 12):
        protons = "one proton" if num == 1 else f"{num} protons"
        rows.append(row(f"What is the atomic number of {name}?",
                        f"The atomic number of {name} is {num}, which means each of its atoms has {protons} in its nucleus.", "open_qa"))
    for name, sym, num, kind, state, *_ in rng.sample(ELEMENTS, 6):
        rows.append(row(f"Which element has the symbol {sym}?",
                        f"The symbol {sym} stands for {name}, the element with atomic number {num}.", "open_qa"))

    def passage(name, sym, num, kind, state):
        return (f"{cap(name)} is a chemical element with the symbol {sym} and atomic number {num}. "
                f"It is classified as {article(kind)}, and at room temperature it is a {state}.")

    for el in rng.sample(ELEMENTS, 10):
        name, sym, num, kind, state, *_ = el
        ctx = passage(name, sym, num, kind, state)
        if rng.random() < 0.5:
            answer = "Yes" if state == "gas" else "No"
            rows.append(row(f"Is {name} a gas at room temperature, according to the text?",
                            f"{answer}. According to the text, {name} is a {state} at room temperature.", "closed_qa", ctx))
        else:
            rows.append(row(f"Based on the passage, how would you classify {name}?",
                            f"Based on the passage, {name} is {article(kind)}.", "closed_qa", ctx))
    for el in rng.sample(ELEMENTS, 8):
        name, sym, num, kind, state, *_ = el
        rows.append(row("Extract the symbol and the atomic number of the element described.",
                        f"The element is {name}: its symbol is {sym} and its atomic number is {num}.",
                        "information_extraction", passage(name, sym, num, kind, state)))
    for _ in range(6):
        pick = rng.sample(ELEMENTS, 4)
        rows.append(row("Classify each element as a metal, nonmetal, metalloid or noble gas: " + ", ".join(p[0] for p in pick) + ".",
                        cap(join_en([f"{p[0]} is {article(p[3])}" for p in pick])) + ".", "classification"))
    for _ in range(5):
        pick = rng.sample(ELEMENTS, 5)
        gases = [p[0] for p in pick if p[4] == "gas"]
        states: dict[str, list[str]] = {}
        for p in pick:
            if p[4] != "gas":
                states.setdefault(p[4], []).append(p[0])
        others = [f"{join_en(names)} {'is a ' + state if len(names) == 1 else 'are ' + state + 's'}"
                  for state, names in states.items()]
        if gases:
            a = f"Of these, {join_en(gases)} {'is a gas' if len(gases) == 1 else 'are gases'} at room temperature"
            a += (", while " + join_en(others) + ".") if others else "."
        else:
            a = "None of them is a gas at room temperature: " + join_en(others) + "."
        rows.append(row("Which of these elements are gases at room temperature: " + ", ".join(p[0] for p in pick) + "?",
                        a, "classification"))
    noble = [e[0] for e in ELEMENTS if e[3] == "noble gas"]
    rows.append(row("Name some noble gases.",
                    f"Some noble gases are {join_en(noble)}; they are very unreactive because their outer electron shells are full.",
                    "brainstorming"))
    return rows


def english_animals(rng: random.Random) -> list[dict]:
    rows = []
    for name, cls, *_ in rng.sample(ANIMALS, 14):
        note = ANIMAL_NOTES.get(name, (None,))[0]
        a = f"{cap(article(name))} is {article(cls)}." + (f" {note}" if note else "")
        rows.append(row(rng.choice(["What kind of animal is {a}?", "Is {a} a mammal, a bird, a reptile, an amphibian, a fish or an insect?",
                                    "To which class of animals does {a} belong?"]).format(a=article(name)), a, "open_qa"))
    for name in ANIMAL_NOTES:
        cls = next(a[1] for a in ANIMALS if a[0] == name)
        wrong = {"mammal": "fish", "bird": "mammal"}[cls]
        rows.append(row(f"Is {article(name)} {article(wrong)}?",
                        f"No, {article(name)} is not {article(wrong)}; it is {article(cls)}. {ANIMAL_NOTES[name][0]}",
                        "classification"))
    for _ in range(8):
        pick = rng.sample(ANIMALS, 5)
        rows.append(row("Classify each animal as a mammal, bird, reptile, amphibian, fish or insect: " + ", ".join(p[0] for p in pick) + ".",
                        cap(join_en([f"{article(p[0])} is {article(p[1])}" for p in pick])) + ".", "classification"))
    for cls, (plural, *_) in CLASSES.items():
        members = [a[0] for a in ANIMALS if a[1] == cls]
        k = 3
        rows.append(row(f"List {k} animals that are {plural}.",
                        f"Three examples of {plural} are " + join_en([article(m) for m in rng.sample(members, k)]) + ".",
                        "brainstorming"))
    return rows


def english_numbers(rng: random.Random) -> list[dict]:
    rows = []
    # Unit conversions.
    for big, single, small, factor in UNITS:
        for x in rng.sample(range(2, 10), 2):
            rows.append(row(f"How many {small} are in {x} {big}?",
                            f"There are {x * factor:,} {small} in {x} {big}, because one {single} equals {factor:,} {small}.",
                            "general_qa"))
    for c in rng.sample(range(-20, 105, 5), 8):
        f = c * 9 // 5 + 32
        rows.append(row(f"What is {c} degrees Celsius in Fahrenheit?",
                        f"{c} degrees Celsius is {f} degrees Fahrenheit, using the formula F = C × 9/5 + 32.", "general_qa"))

    # Arithmetic word problems: each template computes its own answer.
    def baker():
        a, d = rng.randint(12, 60), rng.randint(3, 9)
        return (f"A baker makes {a} loaves of bread every day. How many loaves does the baker make in {d} days?",
                f"The baker makes {a} × {d} = {a * d} loaves of bread in {d} days.")

    def apples():
        n = rng.choice(NAMES)
        a = rng.randint(10, 40)
        b = rng.randint(2, a - 1)
        return (f"{n} has {a} apples and gives {b} of them to a friend. How many apples does {n} have left?",
                f"{n} has {a} − {b} = {a - b} apples left.")

    def train():
        s, h = rng.choice([60, 80, 90, 120, 150]), rng.randint(2, 6)
        return (f"A train travels at {s} kilometers per hour for {h} hours. How far does it go?",
                f"The train goes {s} × {h} = {s * h} kilometers.")

    def pencils():
        n, k = rng.randint(3, 9), rng.randint(2, 8)
        return (f"{n} students share {n * k} pencils equally. How many pencils does each student get?",
                f"Each student gets {n * k} ÷ {n} = {k} pencils.")

    def shop():
        p, q, x, y = rng.randint(2, 9), rng.randint(1, 4), rng.randint(2, 5), rng.randint(2, 6)
        return (f"A notebook costs {p} dollars and a pen costs {q} dollars. How much do {x} notebooks and {y} pens cost together?",
                f"{x} notebooks cost {x * p} dollars and {y} pens cost {y * q} dollars, so together they cost {x * p + y * q} dollars.")

    def area():
        w, l = rng.randint(3, 15), rng.randint(4, 20)
        return (f"A rectangular garden is {w} meters wide and {l} meters long. What is its area?",
                f"The area of the garden is {w} × {l} = {w * l} square meters.")

    def perimeter():
        w, l = rng.randint(3, 15), rng.randint(4, 20)
        return (f"What is the perimeter of a rectangle that is {w} centimeters wide and {l} centimeters long?",
                f"The perimeter is 2 × ({w} + {l}) = {2 * (w + l)} centimeters.")

    def pages():
        n = rng.choice(NAMES)
        p, d = rng.choice([10, 12, 15, 20, 25]), rng.randint(4, 12)
        return (f"{n} reads {p} pages a day. How many days does it take to finish a book with {p * d} pages?",
                f"It takes {p * d} ÷ {p} = {d} days to finish the book.")

    def savings():
        n = rng.choice(NAMES)
        s, w = rng.randint(5, 25), rng.randint(3, 10)
        return (f"{n} saves {s} dollars every week. How much money will {n} have saved after {w} weeks?",
                f"After {w} weeks, {n} will have saved {s} × {w} = {s * w} dollars.")

    templates = [baker, apples, train, pencils, shop, area, perimeter, pages, savings]
    for i in range(36):
        q, a = templates[i % len(templates)]()
        rows.append(row(q, a, "general_qa"))

    # Numbers: parity and primality.
    def is_prime(n: int) -> bool:
        return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))

    for _ in range(4):
        nums = rng.sample(range(2, 100), 6)
        rows.append(row("Classify each number as even or odd: " + ", ".join(map(str, nums)) + ".",
                        cap(join_en([f"{n} is {'even' if n % 2 == 0 else 'odd'}" for n in nums])) + ".", "classification"))
    for _ in range(4):
        nums = rng.sample(range(2, 60), 6)
        primes = [str(n) for n in nums if is_prime(n)]
        comp = [str(n) for n in nums if not is_prime(n)]
        if primes and comp:
            a = f"{join_en(primes)} {'is' if len(primes) == 1 else 'are'} prime, while {join_en(comp)} {'is' if len(comp) == 1 else 'are'} not prime."
        elif primes:
            a = f"All of them are prime: {join_en(primes)}."
        else:
            a = f"None of them is prime: {join_en(comp)} all have divisors other than 1 and themselves."
        rows.append(row("Which of these numbers are prime: " + ", ".join(map(str, nums)) + "?", cap(a), "classification"))
    return rows


def english_misc(rng: random.Random) -> list[dict]:
    rows = []
    for concept, definition in PROGRAMMING:
        q = rng.choice(["What is {c} in programming?", "Explain what {c} is.", "In computer science, what is {c}?"]).format(c=concept)
        rows.append(row(q, definition, "open_qa"))
    for _ in range(4):
        f = rng.sample(FRUITS, 3)
        v = rng.sample(VEGETABLES, 3)
        items = f + v
        rng.shuffle(items)
        rows.append(row("Classify each of these as a fruit or a vegetable: " + ", ".join(items) + ".",
                        f"The fruits are {join_en(f)}, and the vegetables are {join_en(v)}.", "classification"))
    for _ in range(3):
        langs = rng.sample(LANGUAGES, 3)
        browsers = rng.sample(BROWSERS, 2)
        items = langs + browsers
        rng.shuffle(items)
        rows.append(row("Which of these are programming languages and which are web browsers: " + ", ".join(items) + "?",
                        f"{join_en(langs)} are programming languages, while {join_en(browsers)} are web browsers.", "classification"))
    for text, label, reason in REVIEWS:
        q = rng.choice(["Classify the sentiment of this review as positive or negative: \"{r}\"",
                        "Is the following review positive or negative? \"{r}\""]).format(r=text)
        rows.append(row(q, f"The review is {label}: the writer {reason}.", "classification"))

    # Meeting notes, flights and product sheets: extraction answers built from the same values.
    topics = ["the new website", "the spring budget", "the product launch", "hiring plans", "customer feedback", "the office move"]
    actions = ["draft the project plan", "book the venue", "send the summary to the team", "review the budget",
               "call the supplier", "update the schedule", "prepare the slides"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
    for _ in range(8):
        a, b, c = rng.sample(NAMES, 3)
        act1, act2 = rng.sample(actions, 2)
        day, room, topic = rng.choice(days), rng.randint(101, 420), rng.choice(topics)
        ctx = (f"On {day}, {a}, {b} and {c} met in room {room} to discuss {topic}. "
               f"{a} agreed to {act1}, and {b} will {act2} before the next meeting.")
        kind = rng.randrange(3)
        if kind == 0:
            rows.append(row("List the people who attended the meeting.",
                            f"The people who attended the meeting were {a}, {b} and {c}.", "information_extraction", ctx))
        elif kind == 1:
            rows.append(row(f"What did {a} and {b} agree to do?",
                            f"{a} agreed to {act1}, and {b} will {act2}.", "information_extraction", ctx))
        else:
            rows.append(row("When and where did the meeting take place, and what was it about?",
                            f"The meeting took place on {day} in room {room}, and it was about {topic}.", "information_extraction", ctx))
    cities = ["Lisbon", "Oslo", "Seoul", "Tokyo", "Nairobi", "Lima", "Toronto", "Vienna", "Sydney", "Cairo"]
    for _ in range(6):
        c1, c2 = rng.sample(cities, 2)
        code = f"{rng.choice(['QL', 'AX', 'NR', 'TP'])}{rng.randint(100, 999)}"
        hour, minute, gate = rng.randint(6, 22), rng.choice(["00", "15", "30", "45"]), f"{rng.choice('ABCD')}{rng.randint(1, 30)}"
        day = rng.randint(1, 28)
        month = rng.choice(["March", "June", "September", "November"])
        ctx = (f"Dear passenger, your flight {code} from {c1} to {c2} departs on {month} {day} at {hour:02d}:{minute} "
               f"from gate {gate}. Boarding closes 20 minutes before departure.")
        rows.append(row("Extract the flight number, the departure time and the gate from this message.",
                        f"The flight number is {code}, it departs on {month} {day} at {hour:02d}:{minute}, and the gate is {gate}.",
                        "information_extraction", ctx))
    products = [("backpack", "navy, gray and olive"), ("desk lamp", "white and black"), ("water bottle", "red, blue and green"),
                ("keyboard", "black and silver"), ("rain jacket", "yellow and dark blue")]
    for product, colors in products:
        w, p = rng.randint(3, 30) * 50, rng.randint(12, 90)
        ctx = f"This {product} weighs {w:,} grams, costs {p} dollars and comes in {colors}. It has a two-year warranty."
        rows.append(row("Extract the price, the weight and the available colors of the product.",
                        f"The {product} costs {p} dollars, weighs {w:,} grams and comes in {colors}.", "information_extraction", ctx))

    # Short stories from a few ingredients.
    goals = [("see the sea", "saw the waves for the first time"), ("learn to sing", "sang a song the whole forest remembered"),
             ("find a lost key", "found the key under a pile of autumn leaves"), ("climb the tallest hill", "watched the sunrise from the top"),
             ("make a new friend", "shared its lunch with a shy neighbor"), ("build a home", "finished a cozy home before the first snow")]
    heroes = ["little fox", "curious owl", "young turtle", "brave mouse", "sleepy bear", "clever crow"]
    for _ in range(8):
        hero = rng.choice(heroes)
        goal, ending = rng.choice(goals)
        rows.append(row(f"Write a three-sentence story about a {hero} who wants to {goal}.",
                        f"Once upon a time, a {hero} dreamed of a day when it could {goal}. "
                        f"Every morning it practiced, asked for advice and tried again, even when things went wrong. "
                        f"At last, one bright day, the {hero} {ending}, and it felt prouder than ever before.",
                        "creative_writing"))
    return rows


def english_handwritten() -> list[dict]:
    R = row
    return [
        # open_qa
        R("Who wrote the play Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet, probably in the mid-1590s.", "open_qa"),
        R("What is the boiling point of water at sea level?", "At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.", "open_qa"),
        R("How many sides does a hexagon have?", "A hexagon has six sides and six angles.", "open_qa"),
        R("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth; it covers about a third of the planet's surface.", "open_qa"),
        R("What is the tallest mountain above sea level?", "Mount Everest is the tallest mountain above sea level, at about 8,849 meters.", "open_qa"),
        R("Who painted the Mona Lisa?", "The Mona Lisa was painted by the Italian artist Leonardo da Vinci.", "open_qa"),
        R("Which gas do plants take in from the air to make food?", "Plants take in carbon dioxide from the air and use it, with water and sunlight, to make sugar during photosynthesis.", "open_qa"),
        R("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon, on July 20, 1969, during the Apollo 11 mission.", "open_qa"),
        R("How many bones are in the adult human body?", "An adult human body usually has 206 bones.", "open_qa"),
        R("What is the hardest natural material?", "Diamond is the hardest natural material; it is a form of pure carbon.", "open_qa"),
        R("Who proposed the theory of general relativity?", "Albert Einstein proposed the theory of general relativity in 1915.", "open_qa"),
        R("How fast does light travel in a vacuum?", "Light travels at about 299,792 kilometers per second in a vacuum.", "open_qa"),
        R("What does DNA stand for?", "DNA stands for deoxyribonucleic acid, the molecule that carries genetic instructions in living things.", "open_qa"),
        R("How many minutes are in a day?", "There are 1,440 minutes in a day, because 24 hours times 60 minutes equals 1,440.", "open_qa"),
        R("What is LoRA in machine learning?", "LoRA, or low-rank adaptation, is a way to fine-tune a large model by training small low-rank matrices added to some of its layers while the original weights stay frozen.", "open_qa"),
        # general_qa
        R("Why is the sky blue?", "The sky looks blue because air molecules scatter short blue wavelengths of sunlight much more than long red ones, an effect called Rayleigh scattering.", "general_qa"),
        R("Why do we have seasons on Earth?", "We have seasons because Earth's axis is tilted by about 23.5 degrees, so each hemisphere gets more direct sunlight for part of the year and less for the rest.", "general_qa"),
        R("How does a vaccine protect you?", "A vaccine shows the immune system a harmless piece or version of a germ, so the body learns to recognize it and can fight the real germ quickly later.", "general_qa"),
        R("What is the difference between weather and climate?", "Weather is the state of the atmosphere over hours or days, while climate is the average pattern of weather in a place over many years.", "general_qa"),
        R("What is the difference between a compiler and an interpreter?", "A compiler translates a whole program into machine code before it runs, while an interpreter reads and executes the program step by step as it runs.", "general_qa"),
        R("How can I make my Python code easier to read?", "Use clear names, keep functions short and focused, follow the PEP 8 style guide, add docstrings that explain why, and let a formatter such as Black keep the layout consistent.", "general_qa"),
        R("Why do leaves change color in autumn?", "In autumn, trees stop making green chlorophyll, so the yellow and orange pigments that were hidden become visible, and some trees also make new red pigments.", "general_qa"),
        R("How do I boil an egg?", "Place the egg in boiling water and cook it for about 7 minutes for a firm yolk, then cool it in cold water before peeling.", "general_qa"),
        R("What should I do if my code works on my laptop but fails on the server?", "Compare the two environments: check the language and library versions, environment variables, file paths and permissions, and read the server's full error message and logs.", "general_qa"),
        R("Why is it important to drink water?", "Water keeps the body at the right temperature, carries nutrients to cells, removes waste and keeps joints and organs working, so losing too much makes you tired and unwell.", "general_qa"),
        R("What does fine-tuning a language model mean?", "Fine-tuning means continuing to train an already trained language model on a smaller, task-specific dataset so that it adapts its behavior, for example to follow instructions.", "general_qa"),
        R("Is it better to study in one long session or in several short ones?", "Several short sessions spread over days usually work better, because spaced repetition helps memory more than one long session of cramming.", "general_qa"),
        # brainstorming
        R("Give me some ideas for a rainy weekend at home.", "You could bake bread, start a puzzle, watch a film series, write letters to friends, learn a few phrases of a new language, or reorganize a bookshelf.", "brainstorming"),
        R("What are some ways to reduce plastic waste?", "Carry a reusable bag and bottle, buy food in bulk, choose products with less packaging, repair things instead of replacing them, and recycle what you cannot avoid.", "brainstorming"),
        R("Suggest some names for a small coffee shop.", "Some ideas are The Daily Grind, Bean There, Morning Ritual, The Cozy Cup, Second Pour, and Corner Roast.", "brainstorming"),
        R("What are some good habits for better sleep?", "Go to bed at the same time every night, keep the bedroom dark and cool, avoid screens and caffeine in the evening, and get some daylight and exercise during the day.", "brainstorming"),
        R("Give me ideas for a birthday gift for someone who loves cooking.", "You could give a good chef's knife, a cookbook from a cuisine they have not tried, a cooking class, a set of spices, or a cast-iron pan.", "brainstorming"),
        R("List some activities to do with children at a park.", "You can play tag, fly a kite, have a picnic, look for insects and leaves, race paper boats on a pond, or play catch with a ball.", "brainstorming"),
        R("What are some ways to practice a new language every day?", "Label objects at home, listen to podcasts, keep a short daily diary, change your phone's language, and talk with a language exchange partner.", "brainstorming"),
        R("Suggest some topics for a school science project.", "You could test which materials insulate best, grow plants under different light colors, measure how salt affects the freezing of water, or build a simple water filter.", "brainstorming"),
        R("What could I do to make my morning routine less stressful?", "Prepare clothes and bags the night before, wake up a little earlier, keep breakfast simple, avoid checking email at once, and leave a few minutes of buffer before you go.", "brainstorming"),
        R("Give me ideas for a small team-building activity at work.", "Try a shared lunch, a short escape-room puzzle, a quiz about the team, a walking meeting, or a session where each person teaches a small skill.", "brainstorming"),
        R("What are some ways to test a machine learning model before releasing it?", "Evaluate it on held-out data, check it on edge cases and adversarial inputs, compare it to a simple baseline, measure its speed and memory, and review sample outputs by hand.", "brainstorming"),
        # creative_writing
        R("Write a haiku about the ocean.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide breathes and leaves.", "creative_writing"),
        R("Write a short poem about a city at night.", "The city hums when daylight ends,\nits windows glow like quiet friends,\nthe last train sings along the track,\nand morning waits to bring us back.", "creative_writing"),
        R("Write the opening line of a mystery novel.", "The clock in the hallway had stopped at 3:17, the same minute the lighthouse went dark.", "creative_writing"),
        R("Write a short thank-you note to a neighbor who watered my plants.", "Dear neighbor, thank you so much for watering my plants while I was away. They are green and happy, and so am I. Please come over for coffee this week.", "creative_writing"),
        R("Write a four-line poem about learning to code.", "A blinking cursor, a blank page,\na bug that fills me up with rage,\nthen one small fix, the tests turn green,\nthe finest sight I've ever seen.", "creative_writing"),
        R("Describe a sunrise in two sentences.", "The sky slowly turned from deep blue to pale gold as the first light touched the rooftops. Within minutes the sun rose over the hills and filled the valley with warm light.", "creative_writing"),
        R("Write a limerick about a cat.", "A cat with a taste for the cream\nwould plot and would patiently scheme;\nshe'd wait by the door\nthen pounce on the floor,\nand purr like a small, happy steam.", "creative_writing"),
        R("Write a haiku about autumn leaves.", "Red leaves drift and spin,\nthe old path is soft with gold,\nwind hums a last song.", "creative_writing"),
        R("Write a short motivational message for someone starting a new job.", "Congratulations on your new job! Everyone feels a little lost in the first weeks, so ask questions, take notes and be patient with yourself. You were chosen for a reason, and you will grow into this role faster than you think.", "creative_writing"),
        R("Write a two-sentence horror story set in a library.", "The librarian whispered that the last visitor had never returned the book. I looked down and saw my own name written on the overdue card, dated tomorrow.", "creative_writing"),
        R("Write a short dialogue between a robot and a child who meet for the first time.", "Child: \"Are you a real robot?\"\nRobot: \"I am. My name is Bolt, and I like counting stars.\"\nChild: \"I like stars too! How many have you counted?\"\nRobot: \"Four thousand and twelve, but I would be happy to start again with you.\"", "creative_writing"),
        R("Write a short poem about a train journey.", "The fields run past in green and gold,\nthe towns go by, both new and old,\nI lean my head against the pane\nand let the rhythm of the train\nrock every worry into rain.", "creative_writing"),
        R("Write a short product description for a handmade wooden spoon.", "This handmade spoon is carved from a single piece of cherry wood and finished with food-safe oil. It is smooth, light and strong, and it gets more beautiful with every meal you cook.", "creative_writing"),
    ]


def english_passages() -> list[dict]:
    """Hand-written passages with a summary, a closed question or an extraction each."""
    S, Q, E = "summarization", "closed_qa", "information_extraction"
    return [
        row("Summarize the following text in one sentence.",
            "The water cycle moves water around the Earth: the Sun's heat evaporates it from oceans and lakes, the vapor cools into clouds, and it falls back as rain or snow that flows to rivers and seas.",
            S, "Heat from the Sun evaporates water from oceans, lakes and rivers. The water vapor rises into the air, where it cools and condenses into tiny droplets that form clouds. When the droplets grow heavy, they fall as rain, snow or hail. The water then runs into rivers, soaks into the ground or returns to the sea, and the cycle starts again."),
        row("Give a short summary of this passage.",
            "Johannes Gutenberg's printing press, built around 1440, made books far cheaper and faster to produce, which spread literacy and ideas across Europe.",
            S, "Around 1440, Johannes Gutenberg developed a printing press that used movable metal type. Before his invention, books were usually copied by hand, which was slow and expensive. Printed books could be made quickly and in large numbers, so their price dropped. Within a few decades, printing shops had opened in many European cities, and ideas spread faster than ever before."),
        row("Summarize what this text says about honeybees.",
            "Honeybees live in organized colonies led by a queen, communicate food locations with a waggle dance, and pollinate many of the crops people eat.",
            S, "Honeybees live in colonies that can contain tens of thousands of workers and a single queen, who lays the eggs. Worker bees collect nectar and pollen and turn nectar into honey. When a bee finds a good source of food, it performs a waggle dance that tells the others the direction and distance. While they collect food, bees pollinate flowers, and many fruits and vegetables depend on them."),
        row("Summarize this paragraph in one sentence.",
            "Volcanoes form where molten rock from inside the Earth reaches the surface, usually at the edges of tectonic plates or over hot spots, and their eruptions can both destroy land and create new land.",
            S, "A volcano is an opening in the Earth's crust through which molten rock, called magma, escapes to the surface. Most volcanoes are found along the boundaries of tectonic plates, such as the Pacific Ring of Fire, but some, like those of Hawaii, form over hot spots in the middle of a plate. Eruptions can destroy towns and forests, yet the lava also builds new land and the ash makes soil very fertile."),
        row("What is the main idea of this text?",
            "The main idea is that regular sleep is essential for health, because the body and brain use it to repair themselves and to store memories.",
            S, "Sleep is not wasted time. While we sleep, the body repairs muscles and tissues, and the brain sorts the events of the day and turns some of them into long-term memories. People who regularly sleep too little are more likely to catch colds, feel low and make mistakes. Most adults need seven to nine hours of sleep each night."),
        row("Summarize the passage for a busy reader.",
            "LoRA fine-tunes a big model cheaply by freezing its weights and training small low-rank matrices, and QLoRA saves even more memory by keeping the frozen weights in 4-bit precision.",
            S, "Fine-tuning every weight of a large language model needs a lot of GPU memory. Low-rank adaptation, or LoRA, freezes the original weights and trains only small pairs of low-rank matrices that are added to selected layers, so the number of trainable parameters drops sharply. QLoRA goes further: it stores the frozen base model in 4-bit precision and trains the LoRA matrices on top, which lets people fine-tune large models on a single GPU."),
        row("Summarize this passage in two sentences.",
            "Recycling turns used materials such as paper, glass and metal into new products, which saves energy and raw materials. It works best when people sort their waste correctly and when there is demand for recycled goods.",
            S, "Recycling is the process of collecting used materials and turning them into new products. Paper can be pulped and made into new paper, glass can be melted and reshaped, and aluminum cans can be recycled again and again without losing quality. Recycling usually uses less energy than making products from raw materials. However, it only works well if people sort their waste properly and if companies buy the recycled materials."),
        row("When did the first modern Olympic Games take place, according to the text?",
            "According to the text, the first modern Olympic Games took place in Athens in 1896.",
            Q, "The ancient Olympic Games were held in Olympia, Greece, from the 8th century BC until the 4th century AD. Inspired by them, Pierre de Coubertin founded the International Olympic Committee in 1894, and the first modern Olympic Games took place in Athens in 1896. The Winter Olympics were added in 1924."),
        row("Who founded the International Olympic Committee, based on the passage?",
            "Based on the passage, Pierre de Coubertin founded the International Olympic Committee, in 1894.",
            Q, "The ancient Olympic Games were held in Olympia, Greece, from the 8th century BC until the 4th century AD. Inspired by them, Pierre de Coubertin founded the International Olympic Committee in 1894, and the first modern Olympic Games took place in Athens in 1896. The Winter Olympics were added in 1924."),
        row("According to the text, what do plants release during photosynthesis?",
            "According to the text, plants release oxygen during photosynthesis.",
            Q, "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water into glucose, a sugar that stores energy. It takes place mainly in the chloroplasts of leaf cells, which contain the green pigment chlorophyll. Oxygen is released as a by-product, and it is this oxygen that most living things breathe."),
        row("Where does photosynthesis mainly take place, according to this passage?",
            "According to the passage, photosynthesis takes place mainly in the chloroplasts of leaf cells.",
            Q, "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water into glucose, a sugar that stores energy. It takes place mainly in the chloroplasts of leaf cells, which contain the green pigment chlorophyll. Oxygen is released as a by-product, and it is this oxygen that most living things breathe."),
        row("How long is the Great Wall of China, according to the text?",
            "According to the text, all the sections of the Great Wall of China together measure more than 21,000 kilometers.",
            Q, "The Great Wall of China is a series of fortifications built over many centuries to protect Chinese states from invasions from the north. Most of the wall that visitors see today was built during the Ming dynasty. A survey published in 2012 found that all of its sections together measure more than 21,000 kilometers."),
        row("Does the passage say that the Great Wall was built in a single century?",
            "No. The passage says that the Great Wall was built over many centuries, and most of the part visitors see today dates from the Ming dynasty.",
            Q, "The Great Wall of China is a series of fortifications built over many centuries to protect Chinese states from invasions from the north. Most of the wall that visitors see today was built during the Ming dynasty. A survey published in 2012 found that all of its sections together measure more than 21,000 kilometers."),
        row("List the years mentioned in this text and what happened in each.",
            "The text mentions 1867, when Marie Curie was born in Warsaw; 1903, when she shared the Nobel Prize in Physics; and 1911, when she received the Nobel Prize in Chemistry.",
            E, "Marie Curie was born in Warsaw in 1867 and later moved to Paris to study physics and mathematics. In 1903 she shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel for their work on radioactivity. In 1911 she received the Nobel Prize in Chemistry for discovering the elements polonium and radium."),
        row("Which elements did Marie Curie discover, according to the passage?",
            "According to the passage, Marie Curie discovered the elements polonium and radium.",
            Q, "Marie Curie was born in Warsaw in 1867 and later moved to Paris to study physics and mathematics. In 1903 she shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel for their work on radioactivity. In 1911 she received the Nobel Prize in Chemistry for discovering the elements polonium and radium."),
        row("Extract the names of the people mentioned in the text.",
            "The people mentioned are Ada Lovelace, her father Lord Byron, and Charles Babbage.",
            E, "Ada Lovelace was born in London in 1815, the daughter of the poet Lord Byron. She worked with the mathematician Charles Babbage on his design for a mechanical computer called the Analytical Engine. In notes published in 1843, she described a method for the machine to calculate Bernoulli numbers, which is often called the first computer program."),
        row("According to the passage, what did Ada Lovelace publish in 1843?",
            "According to the passage, in 1843 Ada Lovelace published notes describing a method for the Analytical Engine to calculate Bernoulli numbers, often called the first computer program.",
            Q, "Ada Lovelace was born in London in 1815, the daughter of the poet Lord Byron. She worked with the mathematician Charles Babbage on his design for a mechanical computer called the Analytical Engine. In notes published in 1843, she described a method for the machine to calculate Bernoulli numbers, which is often called the first computer program."),
        row("Extract the key facts about Alan Turing from the text as a short list of sentences.",
            "Alan Turing was born in London in 1912. In 1936 he described the Turing machine, an abstract model of computation. During the Second World War he helped break the Enigma code at Bletchley Park.",
            E, "Alan Turing, born in London in 1912, was a mathematician and one of the founders of computer science. In a 1936 paper he described an abstract device, now called the Turing machine, that can carry out any computation that can be written as a step-by-step procedure. During the Second World War he worked at Bletchley Park, where he helped break the German Enigma code."),
        row("Extract the ingredients from this recipe.",
            "The ingredients are 200 grams of flour, 2 eggs, 300 milliliters of milk, a pinch of salt and a little butter for the pan.",
            E, "To make simple pancakes, whisk 200 grams of flour with 2 eggs and 300 milliliters of milk until smooth, then add a pinch of salt. Heat a little butter in a pan and pour in a ladle of batter. Cook each pancake for about a minute on each side until golden."),
        row("From this recipe, how long should each side of a pancake cook?",
            "According to the recipe, each side of a pancake should cook for about a minute, until golden.",
            Q, "To make simple pancakes, whisk 200 grams of flour with 2 eggs and 300 milliliters of milk until smooth, then add a pinch of salt. Heat a little butter in a pan and pour in a ladle of batter. Cook each pancake for about a minute on each side until golden."),
        row("Extract the settings used for the training run described below.",
            "The run used a learning rate of 0.0002, a LoRA rank of 16 with lora_alpha 32, a batch size of 4, and 3 epochs.",
            E, "For the final training run we kept the base model frozen and trained a LoRA adapter with rank 16 and lora_alpha 32 on all linear layers. We used a learning rate of 0.0002 with a cosine schedule, a batch size of 4 and trained for 3 epochs. The evaluation loss stopped improving after the second epoch."),
        row("According to the notes, when did the evaluation loss stop improving?",
            "According to the notes, the evaluation loss stopped improving after the second epoch.",
            Q, "For the final training run we kept the base model frozen and trained a LoRA adapter with rank 16 and lora_alpha 32 on all linear layers. We used a learning rate of 0.0002 with a cosine schedule, a batch size of 4 and trained for 3 epochs. The evaluation loss stopped improving after the second epoch."),
    ]


def korean(rng: random.Random) -> list[dict]:
    rows = []
    for c in rng.sample(COUNTRIES, 12):
        name, capital, cont = c[4], c[5], c[6]
        if rng.random() < 0.6:
            rows.append(row(f"{name}의 수도는 어디인가요?", f"{name}의 수도는 {capital}입니다.", "open_qa"))
        else:
            rows.append(row(f"{ko(capital, '은/는')} 어느 나라의 수도인가요?",
                            f"{ko(capital, '은/는')} {cont}에 있는 {name}의 수도입니다.", "open_qa"))
    for c in rng.sample(COUNTRIES, 5):
        name, capital, cont = c[4], c[5], c[6]
        rows.append(row(f"{ko(name, '은/는')} 어느 대륙에 있나요?", f"{ko(name, '은/는')} {cont}에 있으며, 수도는 {capital}입니다.", "open_qa"))
    for c in rng.sample(COUNTRIES, 4):
        name, capital, cont = c[4], c[5], c[6]
        ctx = f"{ko(name, '은/는')} {cont}에 있는 나라입니다. 이 나라의 수도는 {capital}이며, 정치와 경제의 중심지입니다."
        rows.append(row(f"이 글에 따르면 {name}의 수도는 어디인가요?", f"글에 따르면 {name}의 수도는 {capital}입니다.", "closed_qa", ctx))
    elements = [e for e in ELEMENTS if e[5] not in KO_AMBIGUOUS]
    for e in rng.sample(elements, 7):
        rows.append(row(f"{e[5]}의 원소 기호는 무엇인가요?", f"{e[5]}의 원소 기호는 {e[1]}입니다.", "open_qa"))
    for e in rng.sample(elements, 4):
        rows.append(row(f"{e[5]}의 원자 번호는 몇 번인가요?",
                        f"{e[5]}의 원자 번호는 {e[2]}번입니다. 원자핵에 양성자가 {e[2]}개 있다는 뜻입니다.", "open_qa"))
    for i in rng.sample(range(8), 4):
        p = PLANETS[i]
        rows.append(row(f"태양에서 {KO_ORDINALS[i]} 번째로 가까운 행성은 무엇인가요?",
                        f"태양에서 {KO_ORDINALS[i]} 번째로 가까운 행성은 {p[4]}입니다.", "open_qa"))
    for a in rng.sample([x for x in ANIMALS if x[0] in ANIMAL_NOTES] + rng.sample(ANIMALS, 3), 6):
        cls = CLASSES[a[1]][1]
        note = ANIMAL_NOTES.get(a[0], (None, None))[1]
        rows.append(row(f"{ko(a[2], '은/는')} 어떤 동물 분류에 속하나요?",
                        f"{ko(a[2], '은/는')} {cls}에 속합니다." + (f" {note}" if note else ""), "open_qa"))
    for _ in range(3):
        pick = rng.sample(ANIMALS, 4)
        rows.append(row("다음 동물을 포유류, 조류, 파충류, 양서류, 어류, 곤충으로 분류해 주세요: " + ", ".join(p[2] for p in pick) + ".",
                        ", ".join(f"{ko(p[2], '은/는')} {CLASSES[p[1]][1]}" for p in pick) + "입니다.", "classification"))
    for big, small, _, _, factor in rng.sample(UNITS_CJK, 3):
        x = rng.randint(2, 9)
        rows.append(row(f"{x}{ko(big, '은/는')} 몇 {small}인가요?",
                        f"1{ko(big, '이/가')} {factor:,}{small}이므로 {x}{ko(big, '은/는')} {x * factor:,}{small}입니다.",
                        "general_qa"))
    for _ in range(3):
        n, k = rng.randint(3, 8), rng.randint(2, 9)
        rows.append(row(f"사과 {n * k}개를 {n}명이 똑같이 나누어 가지면 한 사람이 몇 개씩 받나요?",
                        f"{n * k} ÷ {n} = {k}이므로 한 사람이 {k}개씩 받습니다.", "general_qa"))
    rows += [
        row("하늘은 왜 파란색으로 보이나요?",
            "햇빛이 대기를 지날 때 파장이 짧은 파란빛이 공기 분자에 더 많이 산란되기 때문입니다. 이 현상을 레일리 산란이라고 하며, 그래서 낮에는 하늘이 파랗게 보입니다.", "general_qa"),
        row("광합성이란 무엇인가요?",
            "광합성은 식물이 빛 에너지를 이용해 이산화탄소와 물로 포도당을 만들고 산소를 내보내는 과정입니다. 주로 잎의 엽록체에서 일어납니다.", "general_qa"),
        row("파이썬에서 리스트와 튜플의 차이는 무엇인가요?",
            "리스트는 만든 뒤에도 요소를 추가하거나 바꿀 수 있는 변경 가능한 자료형이고, 튜플은 한 번 만들면 바꿀 수 없는 자료형입니다. 리스트는 대괄호로, 튜플은 소괄호로 씁니다.", "general_qa"),
        row("물은 몇 도에서 끓나요?",
            "1기압에서 물은 섭씨 100도에서 끓습니다. 높은 산처럼 기압이 낮은 곳에서는 더 낮은 온도에서 끓습니다.", "general_qa"),
        row("운동을 꾸준히 하면 어떤 점이 좋나요?",
            "꾸준한 운동은 심장과 폐를 튼튼하게 하고 근력을 키워 줍니다. 또한 스트레스를 줄이고 잠을 더 잘 자게 도와주며, 기분을 좋게 만드는 효과도 있습니다.", "general_qa"),
        row("세계에서 가장 큰 바다는 무엇인가요?", "세계에서 가장 큰 바다는 태평양이며, 지구 표면의 약 3분의 1을 차지합니다.", "open_qa"),
        row("비 오는 주말에 집에서 할 수 있는 일을 추천해 주세요.",
            "미뤄 둔 책을 읽거나, 새로운 요리에 도전하거나, 가족과 보드게임을 할 수 있습니다. 방을 정리하거나 좋아하는 영화를 몰아서 보는 것도 좋은 방법입니다.", "brainstorming"),
        row("영어 단어를 효과적으로 외우는 방법을 알려 주세요.",
            "단어를 문장 속에서 익히고, 시간 간격을 두고 반복해서 복습하며, 단어 카드를 만들어 보세요. 새로 배운 단어로 짧은 글을 직접 써 보면 더 오래 기억할 수 있습니다.", "brainstorming"),
        row("회사 동료와 함께할 수 있는 점심시간 활동을 추천해 주세요.",
            "함께 산책하기, 새로운 식당 가 보기, 짧은 독서 모임 열기, 간단한 보드게임 하기 같은 활동을 해 볼 수 있습니다.", "brainstorming"),
        row("가을에 관한 짧은 시를 써 주세요.",
            "붉은 잎이 바람에 실려\n조용히 길 위에 내려앉는다.\n따뜻한 차 한 잔을 손에 쥐고\n나는 천천히 가을을 걷는다.", "creative_writing"),
        row("바다를 처음 본 아이에 대한 짧은 이야기를 써 주세요.",
            "민준이는 기차에서 내리자마자 바다 쪽으로 달려갔습니다. 끝없이 펼쳐진 파란 물결을 보고 한참 동안 아무 말도 하지 못했습니다. 파도가 발끝을 적시자 민준이는 \"바다가 나한테 인사했어!\"라고 외치며 웃었습니다.", "creative_writing"),
        row("다음 글을 한 문장으로 요약해 주세요.",
            "한글은 세종대왕이 1443년에 만들고 1446년에 반포한 배우기 쉬운 문자이며, 한국은 매년 10월 9일 한글날에 이를 기념합니다.", "summarization",
            "한글은 1443년 조선의 세종대왕이 만들고 1446년에 '훈민정음'이라는 이름으로 반포한 문자입니다. 자음과 모음을 조합해 음절을 만드는 과학적인 구조를 가지고 있어 배우기 쉽습니다. 한국에서는 매년 10월 9일을 한글날로 정해 한글 창제를 기념합니다."),
        row("이 글의 내용을 간단히 요약해 주세요.",
            "김치는 채소를 절이고 양념해 발효시킨 한국의 전통 음식으로 종류가 매우 다양하며, 김장 문화는 2013년에 유네스코 인류무형문화유산으로 등재되었습니다.", "summarization",
            "김치는 배추나 무 같은 채소를 소금에 절인 뒤 고춧가루, 마늘, 젓갈 등으로 양념해 발효시킨 한국의 전통 음식입니다. 발효 과정에서 유산균이 생겨 독특한 신맛이 나며, 지역과 재료에 따라 종류가 수백 가지에 이릅니다. 2013년에는 김장 문화가 유네스코 인류무형문화유산으로 등재되었습니다."),
        row("회의의 날짜, 시간, 장소를 추출해 주세요.",
            "회의 날짜는 3월 14일, 시간은 오후 2시, 장소는 본사 5층 회의실입니다.", "information_extraction",
            "다음 회의는 3월 14일 오후 2시에 본사 5층 회의실에서 열립니다. 참석자는 김지은, 박서준, 이하나이며, 안건은 신제품 출시 일정입니다."),
        row("이 제품의 용량과 가격을 알려 주세요.",
            "이 텀블러의 용량은 500밀리리터이고 가격은 25,000원입니다.", "information_extraction",
            "이 텀블러는 용량이 500밀리리터이고 무게는 320그램입니다. 가격은 25,000원이며 검은색, 흰색, 하늘색 세 가지 색상으로 판매됩니다."),
        row("달은 지구 주위를 한 번 도는 데 얼마나 걸리나요?",
            "글에 따르면 달은 약 27.3일에 한 번 지구 주위를 공전합니다.", "closed_qa",
            "달은 지구의 유일한 자연 위성으로, 지구에서 평균 약 38만 4천 킬로미터 떨어져 있습니다. 달은 약 27.3일에 한 번 지구 주위를 공전하며, 같은 면만 지구를 향하고 있습니다."),
        row("다음 음식을 과일과 채소로 분류해 주세요: 사과, 당근, 포도, 시금치, 바나나, 양파.",
            "사과, 포도, 바나나는 과일이고 당근, 시금치, 양파는 채소입니다.", "classification"),
    ]
    return rows


def japanese(rng: random.Random) -> list[dict]:
    rows = []
    for c in rng.sample(COUNTRIES, 12):
        name, capital, cont = c[7], c[8], c[9]
        if rng.random() < 0.6:
            rows.append(row(f"{name}の首都はどこですか？", f"{name}の首都は{capital}です。", "open_qa"))
        else:
            rows.append(row(f"{capital}はどの国の首都ですか？", f"{capital}は{cont}にある{name}の首都です。", "open_qa"))
    for c in rng.sample(COUNTRIES, 5):
        name, capital, cont = c[7], c[8], c[9]
        rows.append(row(f"{name}はどの大陸にありますか？", f"{name}は{cont}にあり、首都は{capital}です。", "open_qa"))
    for c in rng.sample(COUNTRIES, 4):
        name, capital, cont = c[7], c[8], c[9]
        ctx = f"{name}は{cont}にある国です。首都は{capital}で、政治と経済の中心地となっています。"
        rows.append(row(f"この文章によると、{name}の首都はどこですか？", f"文章によると、{name}の首都は{capital}です。", "closed_qa", ctx))
    for e in rng.sample(ELEMENTS, 7):
        rows.append(row(f"{e[6]}の元素記号は何ですか？", f"{e[6]}の元素記号は{e[1]}です。", "open_qa"))
    for e in rng.sample(ELEMENTS, 4):
        rows.append(row(f"{e[6]}の原子番号はいくつですか？",
                        f"{e[6]}の原子番号は{e[2]}です。これは、原子核に陽子が{e[2]}個あることを意味します。", "open_qa"))
    for i in rng.sample(range(8), 4):
        p = PLANETS[i]
        rows.append(row(f"太陽から{i + 1}番目に近い惑星は何ですか？", f"太陽から{i + 1}番目に近い惑星は{p[5]}です。", "open_qa"))
    for a in rng.sample([x for x in ANIMALS if x[0] in ANIMAL_NOTES] + rng.sample(ANIMALS, 3), 6):
        cls = CLASSES[a[1]][2]
        note = ANIMAL_NOTES.get(a[0], (None, None, None))[2]
        if note:
            rows.append(row(f"{a[3]}は何類に分類されますか？", f"{a[3]}は{cls}に分類されます。{note}", "open_qa"))
        else:
            rows.append(row(f"{a[3]}は何類に分類されますか？", f"{a[3]}は{cls}に分類されます。", "open_qa"))
    for _ in range(3):
        pick = rng.sample(ANIMALS, 4)
        rows.append(row("次の動物を哺乳類、鳥類、爬虫類、両生類、魚類、昆虫に分類してください：" + "、".join(p[3] for p in pick) + "。",
                        "、".join(f"{p[3]}は{CLASSES[p[1]][2]}" for p in pick) + "です。", "classification"))
    for _, _, big, small, factor in rng.sample(UNITS_CJK, 3):
        x = rng.randint(2, 9)
        rows.append(row(f"{x}{big}は何{small}ですか？",
                        f"1{big}は{factor:,}{small}なので、{x}{big}は{x * factor:,}{small}です。", "general_qa"))
    for _ in range(3):
        n, k = rng.randint(3, 8), rng.randint(2, 9)
        rows.append(row(f"りんごが{n * k}個あります。{n}人で同じ数ずつ分けると、1人何個になりますか？",
                        f"{n * k} ÷ {n} = {k}なので、1人{k}個になります。", "general_qa"))
    rows += [
        row("空はなぜ青いのですか？",
            "太陽の光が大気を通るとき、波長の短い青い光が空気の分子によって強く散乱されるからです。この現象はレイリー散乱と呼ばれ、そのため昼間の空は青く見えます。", "general_qa"),
        row("光合成とは何ですか？",
            "光合成とは、植物が光のエネルギーを使って二酸化炭素と水からブドウ糖などの養分を作り、酸素を放出するしくみです。主に葉の葉緑体で行われます。", "general_qa"),
        row("Pythonのリストとタプルの違いを教えてください。",
            "リストは作成後に要素を追加したり変更したりできるデータ型で、タプルは一度作ると変更できないデータ型です。リストは角括弧、タプルは丸括弧で書きます。", "general_qa"),
        row("地震が起きたら、まず何をすればいいですか？",
            "まずは机の下にもぐるなどして頭を守り、揺れが収まるまで落ち着いて待ちましょう。揺れが収まったら火の元を確認し、出口を確保してから、正しい情報を確かめて行動してください。", "general_qa"),
        row("運動を続けるとどんな良いことがありますか？",
            "運動を続けると心臓や肺が強くなり、筋力もつきます。さらに、ストレスが減ってよく眠れるようになり、気分が明るくなる効果もあります。", "general_qa"),
        row("世界で一番大きい海は何ですか？", "世界で一番大きい海は太平洋で、地球の表面の約3分の1を占めています。", "open_qa"),
        row("雨の日に家でできることを提案してください。",
            "読みかけの本を読んだり、新しい料理に挑戦したり、部屋の片付けをしたりするのがおすすめです。ボードゲームや映画鑑賞、オンライン講座での勉強も楽しい過ごし方です。", "brainstorming"),
        row("漢字を覚えるコツをいくつか教えてください。",
            "部首ごとにまとめて覚えると効率的です。また、単語や例文の中で覚え、手で何度も書いて練習し、間隔をあけて復習すると記憶に残りやすくなります。", "brainstorming"),
        row("小さな庭で育てやすい野菜を教えてください。",
            "小さな庭なら、ミニトマト、ラディッシュ、シソ、ネギ、リーフレタスなどが育てやすいです。どれも場所をあまりとらず、初心者でも収穫まで育てやすい野菜です。", "brainstorming"),
        row("桜についての俳句を作ってください。",
            "春風に\nひらりと舞いし\n桜かな\n\n春の風に桜の花びらが舞う様子を詠んだ一句です。", "creative_writing"),
        row("猫が主人公の短い物語を書いてください。",
            "小さな黒猫のクロは、毎朝窓辺から町を眺めていました。ある日、窓が少しだけ開いているのに気づき、クロは初めて外の世界へ飛び出しました。公園で新しい友だちに出会ったクロは、夕方には満足そうな顔で家に帰ってきました。", "creative_writing"),
        row("次の文章を一文で要約してください。",
            "富士山は標高3,776メートルの日本一高い火山で、1707年を最後に噴火しておらず、2013年に世界文化遺産に登録されました。", "summarization",
            "富士山は静岡県と山梨県にまたがる、標高3,776メートルの日本で最も高い山です。美しい円すい形の成層火山で、最後の噴火は1707年の宝永噴火です。2013年には「富士山－信仰の対象と芸術の源泉」として世界文化遺産に登録されました。"),
        row("この文章を簡単にまとめてください。",
            "新幹線は1964年に開業した日本の高速鉄道で、今では全国に路線が広がり、速さと安全性、正確な運行で知られています。", "summarization",
            "新幹線は日本の高速鉄道で、1964年10月に東京と新大阪の間で東海道新幹線が開業しました。現在では北海道から九州まで路線が広がり、最高時速が300キロメートルを超える区間もあります。高い安全性と正確な運行で世界的に知られています。"),
        row("この文章から会議の日時と場所を抜き出してください。",
            "会議の日時は4月10日の午前10時からで、場所は本社3階の会議室Aです。", "information_extraction",
            "次回の会議は4月10日の午前10時から、本社3階の会議室Aで行われます。出席者は田中さん、鈴木さん、佐藤さんで、議題は来期の予算です。"),
        row("この商品の価格と色の種類を教えてください。",
            "このリュックサックの価格は税込8,800円で、色は紺、グレー、オリーブの3色です。", "information_extraction",
            "このリュックサックの容量は20リットルで、重さは650グラムです。価格は8,800円（税込）で、色は紺、グレー、オリーブの3色があります。"),
        row("月は地球からどのくらい離れていますか？",
            "文章によると、月は地球から平均で約38万4千キロメートル離れています。", "closed_qa",
            "月は地球の唯一の自然衛星で、地球からの平均距離は約38万4千キロメートルです。月は約27.3日で地球の周りを一周し、いつも同じ面を地球に向けています。"),
        row("次の食べ物を果物と野菜に分けてください：りんご、にんじん、ぶどう、ほうれん草、バナナ、玉ねぎ。",
            "りんご、ぶどう、バナナは果物で、にんじん、ほうれん草、玉ねぎは野菜です。", "classification"),
    ]
    return rows


def build_rows(seed: int = SEED) -> list[dict[str, str]]:
    """All rows, deduplicated and shuffled with ``seed``."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for make in (english_countries, english_planets, english_elements, english_animals, english_numbers,
                 english_misc, korean, japanese):
        rows += make(rng)
    rows += english_handwritten()
    rows += english_passages()
    seen, unique = set(), []
    for r in rows:
        key = (r["instruction"], r["context"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    rng.shuffle(unique)
    return unique


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args(argv)
    text = render(build_rows())
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python -m backend.samples.make_sample", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} rows to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
