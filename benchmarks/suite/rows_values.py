"""Rows of the suite's tasks whose answers are values (make_suite.py): extraction, comparison,
format and unit conversion, look-ups, a JSON record, free text."""

from __future__ import annotations

import json
import random

from rows_common import Row, unique, with_ids

# --- 3. extraction ------------------------------------------------------------------------------

FIRST = ["Anna", "Marco", "Chen", "Fatima", "Lars", "Priya", "Tom", "Yuki", "Omar", "Sofia", "Ivan", "Lea"]
LAST = ["Berg", "Rossi", "Wang", "Haddad", "Nilsen", "Shah", "Baker", "Tanaka", "Farouk", "Costa",
        "Petrov", "Moreau"]
ORDER_TEMPLATES = [
    "Hello, I ordered a {item} on {date} (order {order}) and it has not arrived. You can call me on "
    "{phone}. Regards, {name}",
    "Hi, my {item} arrived broken. The order number is {order}, I paid {price} euros. {name}",
    "Dear team, please cancel order {order}. I placed it on {date} by mistake. Thanks, {name}, tel {phone}",
    "Good morning. Parcel {parcel} contained the wrong {item}; it belongs to my order {order}. {name}",
    "{name} here. I was charged {price} euros twice for order {order}, placed on {date}.",
    "Could you send an invoice for {order}? It was the {item} for {price} euros. Best, {name}",
]
ITEMS = ["lamp", "kettle", "backpack", "keyboard", "rain jacket", "blender", "desk chair", "phone case"]


def order_rows(n: int = 60, seed: int = 303) -> list[Row]:
    def make(rng: random.Random) -> Row:
        letters = "ABCDEFGHJKLMNPRSTUVWXZ"
        order = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(10000, 99999)}"
        text = rng.choice(ORDER_TEMPLATES).format(
            item=rng.choice(ITEMS), order=order, name=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            date=f"{rng.randint(1, 28)} {rng.choice(['March', 'April', 'May', 'June'])}",
            phone=f"+{rng.randint(30, 49)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
            price=f"{rng.randint(12, 240)}.{rng.randint(0, 99):02d}",
            parcel=str(rng.randint(10**9, 10**10 - 1)),
        )
        return {"email": text, "order_id": order}

    return with_ids("order", unique(random.Random(seed), n, make, "email"))


# --- 4. comparison of two numbers ---------------------------------------------------------------


def _fmt(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}" if decimals else str(int(x))


def larger_rows(n: int = 60, seed: int = 404) -> list[Row]:
    def make(rng: random.Random) -> Row:
        style = rng.choice(["decimal_trap", "close", "negative", "plain"])
        if style == "decimal_trap":  # 9.11 vs 9.9: more digits is not more
            whole = rng.randint(1, 30)
            short = rng.randint(2, 9)
            long_ = rng.randint(10, short * 10 - 1)
            a, b = f"{whole}.{short}", f"{whole}.{long_}"
        elif style == "close":
            x = rng.randint(100, 999)
            y = x + rng.choice([-3, -2, -1, 1, 2, 3])
            a, b = str(x), str(y)
        elif style == "negative":
            x, y = -rng.randint(1, 50), -rng.randint(1, 50)
            if x == y:
                y -= 1
            a, b = str(x), str(y)
        else:
            d = rng.choice([0, 1, 2])
            x, y = rng.uniform(0, 100), rng.uniform(0, 100)
            a, b = _fmt(x, d), _fmt(y, d)
            if a == b:
                b = _fmt(y + 1, d)
        if rng.random() < 0.5:
            a, b = b, a
        larger = a if float(a) > float(b) else b
        return {"a": a, "b": b, "larger": larger, "pair": f"{a}|{b}"}

    rows = unique(random.Random(seed), n, make, "pair")
    return with_ids("cmp", [{k: v for k, v in r.items() if k != "pair"} for r in rows])


# --- 5. date format conversion ------------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def date_rows(n: int = 60, seed: int = 505) -> list[Row]:
    def make(rng: random.Random) -> Row:
        y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        month = MONTHS[m - 1]
        text = rng.choice([
            f"{month} {d}, {y}", f"{d} {month} {y}", f"{month[:3]} {d} {y}",
            f"the {_ordinal(d)} of {month}, {y}", f"{d}. {month} {y}", f"{y}, {month} {_ordinal(d)}",
        ])
        return {"date": text, "iso": f"{y:04d}-{m:02d}-{d:02d}"}

    return with_ids("date", unique(random.Random(seed), n, make, "date"))


# --- 6. unit conversion -------------------------------------------------------------------------

UNITS = [("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("hours", "minutes", 60),
         ("litres", "millilitres", 1000), ("minutes", "seconds", 60)]


def unit_rows(n: int = 60, seed: int = 606) -> list[Row]:
    def make(rng: random.Random) -> Row:
        src, dst, factor = rng.choice(UNITS)
        value = rng.randint(2, 15)
        return {"quantity": f"{value} {src}", "target_unit": dst, "value": str(value * factor)}

    return with_ids("unit", unique(random.Random(seed), n, make, "quantity"))


# --- 7. factual look-up -------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Czech Republic": "Prague", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "Morocco": "Rabat", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
    "New Zealand": "Wellington", "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Philippines": "Manila",
}


def capital_rows(seed: int = 707) -> list[Row]:
    items = sorted(CAPITALS.items())
    random.Random(seed).shuffle(items)
    return with_ids("capital", [{"country": c, "capital": cap} for c, cap in items])


# --- 8. multi-field JSON answer -----------------------------------------------------------------

CITIES = ["Porto", "Lyon", "Gdansk", "Osaka", "Leeds", "Graz", "Malmo", "Bilbao", "Turin", "Cork"]
JOBS = ["nurse", "baker", "pilot", "teacher", "plumber", "architect", "farmer", "chemist"]
PERSON_TEMPLATES = [
    "{name}, {age}, lives in {city} and works as {a_job}.",
    "Meet {name}: {age} years old, {job}, from {city}.",
    "The {job} {name} ({age}) moved to {city} last year.",
    "In {city}, {name} has worked as {a_job} since turning {age0}; {pron} is {age} now.",
    "{name} is {age} years old. {Pron} is {a_job} in {city}.",
]


def person_rows(n: int = 50, seed: int = 808) -> list[Row]:
    def make(rng: random.Random) -> Row:
        name, age, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.randint(19, 78), rng.choice(CITIES)
        pron = rng.choice(["she", "he"])
        job = rng.choice(JOBS)
        text = rng.choice(PERSON_TEMPLATES).format(
            name=name, age=age, age0=age - rng.randint(2, 9), city=city, job=job, pron=pron,
            Pron=pron.capitalize(), a_job=("an " if job[0] in "aeiou" else "a ") + job,
        )
        answer = json.dumps({"name": name, "age": age, "city": city})
        return {"text": text, "record": answer}

    return with_ids("person", unique(random.Random(seed), n, make, "text"))


# --- 9. free-text answer, token F1 --------------------------------------------------------------

QA_TEMPLATES: list[tuple[str, str, str]] = [
    ("The {place} museum opened a new wing in {year}, designed by the architect {name}. It holds "
     "{n} paintings.", "Who designed the new wing?", "{name}"),
    ("The {place} museum opened a new wing in {year}, designed by the architect {name}. It holds "
     "{n} paintings.", "How many paintings does the new wing hold?", "{n}"),
    ("In {year} a storm flooded the old harbour of {place}. The mayor, {name}, asked the army to "
     "help rebuild the {structure}.", "What did the mayor ask the army to rebuild?", "the {structure}"),
    ("In {year} a storm flooded the old harbour of {place}. The mayor, {name}, asked the army to "
     "help rebuild the {structure}.", "In which year did the storm flood the harbour?", "{year}"),
    ("{name} won the {place} chess open after beating the champion in {n} moves. The prize was a "
     "{thing}.", "What was the prize?", "a {thing}"),
    ("{name} won the {place} chess open after beating the champion in {n} moves. The prize was a "
     "{thing}.", "Which tournament did {name} win?", "the {place} chess open"),
    ("A bakery in {place} sells {n} loaves a day. Its owner, {name}, learned to bake in {city2} "
     "before opening the shop in {year}.", "Where did the owner learn to bake?", "{city2}"),
    ("A bakery in {place} sells {n} loaves a day. Its owner, {name}, learned to bake in {city2} "
     "before opening the shop in {year}.", "Who owns the bakery?", "{name}"),
]
QA_STRUCTURES = ["stone bridge", "fish market", "lighthouse", "sea wall", "ferry pier"]
QA_PRIZES = ["silver trophy", "bicycle", "gold medal", "painting", "weekend in Rome"]


def qa_rows(n: int = 50, seed: int = 909) -> list[Row]:
    def make(rng: random.Random) -> Row:
        passage, question, answer = rng.choice(QA_TEMPLATES)
        slots = {"place": rng.choice(CITIES), "city2": rng.choice(["Vienna", "Naples", "Krakow", "Ghent"]),
                 "year": str(rng.randint(1890, 2020)), "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                 "n": str(rng.randint(12, 480)), "thing": rng.choice(QA_PRIZES),
                 "structure": rng.choice(QA_STRUCTURES)}
        return {"passage": passage.format(**slots), "question": question.format(**slots),
                "answer": answer.format(**slots), "key": passage.format(**slots) + question.format(**slots)}

    rows = unique(random.Random(seed), n, make, "key")
    return with_ids("qa", [{k: v for k, v in r.items() if k != "key"} for r in rows])


# --- 10. a misleading seed prompt ---------------------------------------------------------------

ANIMALS = {
    "mammal": ["dog", "horse", "whale", "bat", "elephant", "tiger", "rabbit", "dolphin", "cow", "fox",
               "bear", "goat"],
    "bird": ["eagle", "penguin", "sparrow", "owl", "parrot", "ostrich", "swan", "crow", "flamingo", "robin"],
    "fish": ["salmon", "shark", "tuna", "goldfish", "cod", "trout", "eel", "carp"],
    "reptile": ["crocodile", "snake", "turtle", "lizard", "iguana", "chameleon", "alligator", "gecko"],
    "amphibian": ["frog", "toad", "salamander", "newt", "axolotl"],
    "insect": ["bee", "ant", "butterfly", "beetle", "mosquito", "grasshopper", "ladybird", "wasp",
               "dragonfly"],
}


def animal_rows(seed: int = 1010) -> list[Row]:
    rows = [{"animal": a, "class": c} for c, names in ANIMALS.items() for a in names]
    rows = sorted(rows, key=lambda r: r["animal"])
    random.Random(seed).shuffle(rows)
    return with_ids("animal", rows[:52])


# --- 11. and 12.: two tasks of 30 rows -----------------------------------------------------------

PAST = {
    "go": "went", "see": "saw", "take": "took", "write": "wrote", "eat": "ate", "swim": "swam",
    "bring": "brought", "think": "thought", "catch": "caught", "teach": "taught", "fly": "flew",
    "drive": "drove", "sing": "sang", "begin": "began", "choose": "chose", "freeze": "froze",
    "walk": "walked", "play": "played", "cry": "cried", "stop": "stopped", "carry": "carried",
    "plan": "planned", "jump": "jumped", "study": "studied", "buy": "bought", "sell": "sold",
    "keep": "kept", "sleep": "slept", "fall": "fell", "ring": "rang",
}


def past_rows(seed: int = 1111) -> list[Row]:
    rows = [{"verb": v, "past": p} for v, p in sorted(PAST.items())]
    random.Random(seed).shuffle(rows)
    return with_ids("verb", rows)


DOMAINS = ["nordmail.com", "example.org", "postbox.net", "kettle-works.co.uk", "lumen.io", "farmhouse.de"]
EMAIL_TEMPLATES = [
    "Hi, this is {name}. You can reach me at {email} or call {phone} after 6 pm.",
    "Please send the quote for order {n} to {email}, not to my old address.",
    "{name} ({phone}) asked us to reply by email: {email}. The invoice number is {n}.",
    "New contact: {name}, phone {phone}, email {email}, office in room {n}.",
    "Forward the report to {email} and copy the team lead on {phone}.",
]


def email_rows(n: int = 30, seed: int = 1212) -> list[Row]:
    def make(rng: random.Random) -> Row:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        user = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{rng.randint(1, 99)}"]).lower()
        email = f"{user}@{rng.choice(DOMAINS)}"
        text = rng.choice(EMAIL_TEMPLATES).format(
            name=f"{first} {last}", email=email, phone=f"+{rng.randint(30, 49)} {rng.randint(100, 999)} "
            f"{rng.randint(1000, 9999)}", n=rng.randint(100, 9999))
        return {"text": text, "email": email}

    return with_ids("email", unique(random.Random(seed), n, make, "text"))
