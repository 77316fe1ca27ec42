"""Write the optimizer benchmark suite: one dataset, one study YAML and one precise prompt per task.

    .venv/bin/python benchmarks/suite/make_suite.py

Deterministic (fixed seeds, no clock): running it again rewrites the same files. The tasks are
the table in tasks.yaml (names, columns, prompts, metrics); their rows are made here. Every task has

- a dataset (CSV or JSONL) with an `id` column, generated here from templates and fixed tables;
- a study YAML in the format of promptopt_dagster/examples/*.yaml, whose seed prompt is VAGUE
  (what a user would type first; one of them actively misleads);
- a PRECISE prompt in precise_prompts.yaml: what an expert would write in a few lines, with no
  demonstrations. It is the hand-written reference the optimizers are measured against.

Output prompts follow the product's brace rule: {column} is filled from the row, literal braces
are doubled ({{ and }}), as in Python's str.format.

The study's split `seed` is the first seed whose hash split (the product's own `split_dataset`)
gives every split a fair share of rows; it is chosen on split sizes only, never on scores.
The stop rules let the LLM-call budget bind (`target_threshold: 1.0`, many iterations); the
benchmark sets `budget_calls` itself.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
Row = dict[str, str]


@dataclass
class Task:
    name: str
    kind: str
    description: str
    rows: Callable[[], list[Row]]
    input_columns: list[str]
    reference_column: str
    seed_prompt: tuple[str, str]  # (system_prompt, output_prompt)
    precise_prompt: tuple[str, str]
    fmt: str = "csv"
    target_metric: str = "exact_match"
    metrics: list[str] = field(default_factory=lambda: ["f1"])
    metric_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"exact_match": {"ignore_whitespace": True, "strip_quotes": True}}
    )
    max_tokens: int = 32
    comment: str = ""


def _unique(rng: random.Random, n: int, make: Callable[[random.Random], Row], key: str) -> list[Row]:
    rows: list[Row] = []
    seen: set[str] = set()
    guard = 0
    while len(rows) < n:
        guard += 1
        if guard > 100 * n:
            raise RuntimeError(f"cannot make {n} distinct rows")
        row = make(rng)
        if row[key] in seen:
            continue
        seen.add(row[key])
        rows.append(row)
    return rows


def _with_ids(prefix: str, rows: list[Row]) -> list[Row]:
    return [{"id": f"{prefix}-{i + 1:03d}", **row} for i, row in enumerate(rows)]


# --- 1. two label codes -------------------------------------------------------------------------

BILLING = [
    "You charged my card twice for order {n}, please refund one payment.",
    "Can I get an invoice with our VAT number for the {thing} subscription?",
    "Why did the price of my {thing} plan go up this month?",
    "I want to change the credit card you use for my monthly payment.",
    "My discount code was not applied and I paid the full {n} euros.",
    "Please cancel my {thing} subscription and refund the unused months.",
    "I paid by bank transfer {when} but my account still says unpaid.",
    "Do you offer a cheaper yearly plan for the {thing}?",
    "The receipt for order {n} shows the wrong amount.",
    "How do I download all my invoices from {when}?",
]
TECHNICAL = [
    "The {thing} crashes every time I open the settings page.",
    "I never receive the password reset email, so I cannot log in to the {thing}.",
    "The {thing} has been very slow to load since {when}.",
    "My {device} will not connect to the wifi after the update.",
    "I get error 500 when I upload a file to the {thing}.",
    "Notifications from the {thing} stopped showing on my phone {when}.",
    "The export to PDF button in the {thing} does nothing.",
    "The {device} keeps disconnecting from Bluetooth.",
    "Since {when} the {thing} shows a blank white screen.",
    "Two-factor codes from the {thing} arrive too late and are rejected.",
]
THINGS = ["billing portal", "web shop", "mobile app", "dashboard", "booking system", "customer portal"]
DEVICES = ["printer", "smart speaker", "tablet", "router", "smart watch", "camera"]
WHEN_T = ["yesterday", "last week", "Monday", "this morning", "the last update"]


def ticket_rows(n: int = 60, seed: int = 101) -> list[Row]:
    def make(rng: random.Random) -> Row:
        label = "billing" if rng.random() < 0.5 else "technical"
        template = rng.choice(BILLING if label == "billing" else TECHNICAL)
        text = template.format(thing=rng.choice(THINGS), device=rng.choice(DEVICES), when=rng.choice(WHEN_T),
                               n=rng.randint(1000, 9999))
        return {"message": text, "queue": label}

    return _with_ids("ticket", _unique(random.Random(seed), n, make, "message"))


# --- 2. twenty-two label codes ------------------------------------------------------------------

INTENTS: dict[str, tuple[str, list[str]]] = {
    "card_lost": ("card lost or stolen", [
        "I can't find my {card} anywhere, I think I lost it {when}.",
        "My wallet with my {card} was stolen {when}.",
    ]),
    "card_declined": ("card refused at a payment", [
        "My {card} was declined at the supermarket {when}.",
        "Why does the shop keep refusing my {card}?",
    ]),
    "activate_card": ("turn on a new card", [
        "My new {card} arrived {when}, how do I start using it?",
        "How can I activate the {card} you sent me?",
    ]),
    "change_pin": ("change the PIN", [
        "I want to set a new PIN for my {card}.",
        "How do I change the PIN code of my {card}?",
    ]),
    "check_balance": ("how much money is in an account", [
        "How much money is left in my {account}?",
        "Can you tell me the balance of my {account}?",
    ]),
    "transfer_money": ("send money to another account", [
        "I need to send {amount} from my {account} to my brother.",
        "How do I move {amount} to someone else's account?",
    ]),
    "open_account": ("open a new account", [
        "I would like to open a {account} with you.",
        "What do I need to open a new {account}?",
    ]),
    "close_account": ("close an account", [
        "Please close my {account}, I no longer need it.",
        "How do I shut down my {account} for good?",
    ]),
    "loan_info": ("personal loan questions", [
        "Can I borrow {amount} for a new car?",
        "What are the conditions for a personal loan of {amount}?",
    ]),
    "mortgage_rate": ("mortgage interest rates", [
        "What is your current interest rate for a home mortgage?",
        "How high is the mortgage rate for a house bought {when}?",
    ]),
    "exchange_rate": ("currency exchange rates", [
        "How many dollars do I get for {amount} today?",
        "What is the exchange rate from euros to yen?",
    ]),
    "atm_location": ("where to find a cash machine", [
        "Where is the nearest cash machine to the train station?",
        "Is there an ATM near the city centre where I can withdraw {amount}?",
    ]),
    "branch_hours": ("when a branch is open", [
        "What time does your branch on Main Street open {when}?",
        "Is the local branch open on Saturday afternoons?",
    ]),
    "update_address": ("change the postal address", [
        "I moved house {when}, please update my address.",
        "How do I change the home address on my {account}?",
    ]),
    "report_fraud": ("unknown payments, fraud", [
        "There are payments on my {account} that I never made.",
        "Someone used my {card} to buy things online {when}, it was not me.",
    ]),
    "dispute_charge": ("contest a charge from a shop", [
        "The hotel charged me {amount} for a room I cancelled, I want my money back.",
        "A shop billed me {amount} twice for one purchase, can you reverse it?",
    ]),
    "order_checkbook": ("order cheques", [
        "Please send me a new book of cheques for my {account}.",
        "I ran out of cheques, how do I order more?",
    ]),
    "increase_limit": ("raise a spending limit", [
        "Can you raise the spending limit on my {card} to {amount}?",
        "I need a higher daily limit on my {card} for a trip.",
    ]),
    "pay_bill": ("pay a bill", [
        "How do I pay my electricity bill of {amount} from my {account}?",
        "I want to pay my phone bill through the app {when}.",
    ]),
    "direct_deposit": ("salary paid into the account", [
        "How do I get my salary paid straight into my {account}?",
        "My employer needs the details to deposit my wages directly.",
    ]),
    "statement_request": ("a copy of a statement", [
        "Please send me the statement of my {account} for last month.",
        "Where can I download my account statements from {when}?",
    ]),
    "travel_notice": ("tell the bank about a trip abroad", [
        "I am going to Japan {when}, please note it so my {card} works there.",
        "I will travel abroad next month and want to use my {card} there.",
    ]),
}
CARDS = ["debit card", "credit card", "bank card"]
ACCOUNTS = ["savings account", "current account", "joint account", "business account"]
AMOUNTS = ["200 euros", "1,500 euros", "50 dollars", "3,000 pounds", "800 euros"]
WHEN = ["yesterday", "last week", "this morning", "on Friday", "two days ago"]


def intent_rows(n: int = 80, seed: int = 202) -> list[Row]:
    codes = list(INTENTS)

    def make(rng: random.Random) -> Row:
        code = rng.choice(codes)
        text = rng.choice(INTENTS[code][1]).format(card=rng.choice(CARDS), account=rng.choice(ACCOUNTS),
                                                   amount=rng.choice(AMOUNTS), when=rng.choice(WHEN))
        return {"text": text, "intent": code}

    rng = random.Random(seed)
    # Every code at least twice, then random ones.
    rows: list[Row] = []
    seen: set[str] = set()
    for code in codes * 2:
        while True:
            text = rng.choice(INTENTS[code][1]).format(card=rng.choice(CARDS), account=rng.choice(ACCOUNTS),
                                                       amount=rng.choice(AMOUNTS), when=rng.choice(WHEN))
            if text not in seen:
                break
        seen.add(text)
        rows.append({"text": text, "intent": code})
    while len(rows) < n:
        row = make(rng)
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    rng.shuffle(rows)
    return _with_ids("intent", rows)


def intent_code_list() -> str:
    return "\n".join(f"{code}: {gloss}" for code, (gloss, _) in INTENTS.items())


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

    return _with_ids("order", _unique(random.Random(seed), n, make, "email"))


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

    rows = _unique(random.Random(seed), n, make, "pair")
    return _with_ids("cmp", [{k: v for k, v in r.items() if k != "pair"} for r in rows])


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

    return _with_ids("date", _unique(random.Random(seed), n, make, "date"))


# --- 6. unit conversion -------------------------------------------------------------------------

UNITS = [("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("hours", "minutes", 60),
         ("litres", "millilitres", 1000), ("minutes", "seconds", 60)]


def unit_rows(n: int = 60, seed: int = 606) -> list[Row]:
    def make(rng: random.Random) -> Row:
        src, dst, factor = rng.choice(UNITS)
        value = rng.randint(2, 15)
        return {"quantity": f"{value} {src}", "target_unit": dst, "value": str(value * factor)}

    return _with_ids("unit", _unique(random.Random(seed), n, make, "quantity"))


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
    return _with_ids("capital", [{"country": c, "capital": cap} for c, cap in items])


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

    return _with_ids("person", _unique(random.Random(seed), n, make, "text"))


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

    rows = _unique(random.Random(seed), n, make, "key")
    return _with_ids("qa", [{k: v for k, v in r.items() if k != "key"} for r in rows])


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
    return _with_ids("animal", rows[:52])


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
    return _with_ids("verb", rows)


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

    return _with_ids("email", _unique(random.Random(seed), n, make, "text"))


# --- the tasks ----------------------------------------------------------------------------------

TASKS_FILE = HERE / "tasks.yaml"
INTENT_CODES = "{intent_codes}"  # in a prompt of tasks.yaml: stands for intent_code_list()
ROW_FUNCTIONS: dict[str, Callable[[], list[Row]]] = {
    f.__name__: f
    for f in (ticket_rows, intent_rows, order_rows, larger_rows, date_rows, unit_rows, capital_rows,
              person_rows, qa_rows, animal_rows, past_rows, email_rows)
}


def _prompt(entry: dict[str, str]) -> tuple[str, str]:
    """(system_prompt, output_prompt) of a prompt in tasks.yaml, with the intent codes filled in."""
    codes = intent_code_list()
    return (entry["system_prompt"].replace(INTENT_CODES, codes),
            entry["output_prompt"].replace(INTENT_CODES, codes))


def load_tasks(path: Path = TASKS_FILE) -> list[Task]:
    """The tasks of the table in `path`; its `rows` names a function of ROW_FUNCTIONS."""
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Task(**{
            **entry,
            "rows": ROW_FUNCTIONS[entry["rows"]],
            "seed_prompt": _prompt(entry["seed_prompt"]),
            "precise_prompt": _prompt(entry["precise_prompt"]),
        })
        for entry in entries
    ]


SPLITS = {"train": 0.4, "val": 0.3, "test": 0.3}


def balanced_seed(rows: list[Row], input_columns: list[str], reference_column: str, path: Path) -> int:
    """The first split seed whose hash split gives each split at least 85% of its share of rows.
    Chosen on sizes alone (no model runs), with the product's own split function."""
    from promptopt_dagster.core.dataset import load_dataset, split_dataset

    df = load_dataset(str(path), input_columns, reference_column, "id")
    n = len(df)
    for seed in range(200):
        splits = split_dataset(df, SPLITS["train"], SPLITS["val"], seed)
        if all(len(splits[name]) >= 0.85 * share * n for name, share in SPLITS.items()):
            return seed
    return 0


def study_yaml(task: Task, split_seed: int, dataset: str, n_rows: int) -> str:
    study = {
        "name": task.name,
        "description": task.description,
        "dataset": dataset,
        "input_columns": task.input_columns,
        "reference_column": task.reference_column,
        "id_column": "id",
        "seed_prompt": {"system_prompt": task.seed_prompt[0], "output_prompt": task.seed_prompt[1]},
        "primary_model": {"temperature": 0.0, "max_tokens": task.max_tokens},
        "optimizer_model": {"temperature": 0.7, "max_tokens": 384},
        "target_metric": task.target_metric,
        "metrics": task.metrics,
        "metric_options": task.metric_options,
        "target_threshold": 1.0,
        "patience": 3,
        "max_iterations": 40,
        "candidates_per_iteration": 4,
        "minibatch_size": 10,
        "splits": SPLITS,
        "seed": split_seed,
    }
    header = (f"# Optimizer benchmark suite, task {task.name} ({task.kind}, {n_rows} rows).\n"
              f"# Written by benchmarks/suite/make_suite.py; edit that script, not this file.\n")
    return header + yaml.safe_dump(study, sort_keys=False, allow_unicode=True, width=100)


def write_all(folder: Path = HERE) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    precise: dict[str, dict[str, str]] = {}
    out: dict[str, Path] = {}
    for task in load_tasks():
        rows = task.rows()
        data = folder / f"{task.name}.{task.fmt}"
        if task.fmt == "csv":
            pd.DataFrame(rows).to_csv(data, index=False, lineterminator="\n")
        else:
            with data.open("w", encoding="utf-8", newline="\n") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        seed = balanced_seed(rows, task.input_columns, task.reference_column, data)
        study = folder / f"{task.name}.yaml"
        study.write_text(study_yaml(task, seed, data.name, len(rows)), encoding="utf-8")
        precise[task.name] = {"kind": task.kind, "system_prompt": task.precise_prompt[0],
                              "output_prompt": task.precise_prompt[1]}
        out[task.name] = study
    header = ("# Hand-written precise prompts, one per task: the reference the optimizers are measured\n"
              "# against. Written by benchmarks/suite/make_suite.py.\n")
    (folder / "precise_prompts.yaml").write_text(
        header + yaml.safe_dump(precise, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8"
    )
    return out


if __name__ == "__main__":
    for name, path in write_all().items():
        print(f"{name}: {path}")
