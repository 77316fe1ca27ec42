"""Write the example datasets next to this file. Deterministic: the same files on every run.

    python -m promptopt_dagster.examples.make_data

Each task has short expected outputs, so a vague prompt (the model chats) scores near 0 on exact
match and a precise one scores high: the optimizer has something visible to do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent


def arithmetic_rows(n: int = 90, seed: int = 11) -> list[dict[str, str]]:
    """Small sums, differences and products; the reference is the bare number."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        op = ("+", "-", "*")[len(rows) % 3]
        if op == "+":
            a, b = rng.randint(2, 30), rng.randint(2, 20)
            answer = a + b
        elif op == "-":
            a = rng.randint(10, 30)
            b = rng.randint(2, a - 1)
            answer = a - b
        else:
            a, b = rng.randint(2, 10), rng.randint(2, 10)
            answer = a * b
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        rows.append({"id": f"arith-{len(rows) + 1:03d}", "question": question, "answer": str(answer)})
    return rows


PRODUCTS = [
    "headset", "blender", "phone case", "desk lamp", "backpack", "coffee maker", "keyboard",
    "pair of running shoes", "water bottle", "phone charger", "rain jacket", "frying pan",
]
POSITIVE = [
    "I love this {p}, it works perfectly.",
    "The {p} arrived early and does exactly what I wanted.",
    "Great {p} for the price, I use it every day.",
    "Really happy with this {p}, the quality is excellent.",
    "This {p} exceeded my expectations. Highly recommend.",
    "Best {p} I have owned, sturdy and well made.",
    "The {p} is comfortable, reliable and looks great.",
    "Five stars: the {p} is simple to use and feels solid.",
]
NEGATIVE = [
    "The {p} stopped working after two days.",
    "Terrible {p}, it broke the first time I used it.",
    "I want a refund, this {p} is cheap and flimsy.",
    "Disappointed with the {p}, it feels nothing like the photos.",
    "The {p} arrived damaged and support never answered.",
    "Waste of money: the {p} is noisy and falls apart.",
    "Do not buy this {p}, it is poorly made.",
    "One star. The {p} was uncomfortable and returned within a week.",
]


def sentiment_rows(n: int = 80, seed: int = 23) -> list[dict[str, str]]:
    """Short product reviews labelled exactly `positive` or `negative`, half each."""
    rng = random.Random(seed)
    rows = []
    for label, templates in (("positive", POSITIVE), ("negative", NEGATIVE)):
        combos = [(t, p) for t in templates for p in PRODUCTS]
        for template, product in rng.sample(combos, n // 2):
            rows.append({"review": template.format(p=product), "label": label})
    rng.shuffle(rows)
    return rows


CITIES = ["Lisbon", "Nairobi", "Osaka", "Denver", "Oslo", "Lima", "Cairo", "Perth"]
COMPANIES = ["Nortek", "Bluefin Labs", "Quantiva", "Helio Systems", "Pixelcore", "Arcwave"]
TOPICS: dict[str, list[str]] = {
    "SPORT": [
        "The {city} football team won the cup final 2-1 after extra time.",
        "A record number of athletes finished the {city} marathon on Sunday.",
        "The tennis champion withdrew from the {city} tournament with a wrist injury.",
        "The {city} basketball team hired a new coach after a losing season.",
        "Swimmers set two world records at the championships in {city}.",
        "The {city} cricket team clinched the series with a win in the final match.",
    ],
    "TECH": [
        "{company} unveiled a smartphone chip that doubles battery life.",
        "{company} released a software update that fixes a browser security flaw.",
        "{company} engineers built a faster solid-state drive for laptops.",
        "{company} opened a data center in {city} to speed up its cloud computing service.",
        "A software start-up in {city} launched an open-source database app.",
        "{company} announced a cheaper virtual reality headset and a new operating system.",
    ],
    "POLITICS": [
        "The parliament in {city} passed the government budget after a late-night vote.",
        "The mayor of {city} announced she will run for re-election next year.",
        "Opposition parties in {city} called for an early general election.",
        "The foreign minister met the prime minister in {city} to negotiate a treaty.",
        "Voters in {city} approved a referendum on a new tax law.",
        "A senator from {city} proposed a law to limit campaign donations to political parties.",
    ],
    "HEALTH": [
        "Doctors say daily walking lowers blood pressure and the risk of heart disease.",
        "Hospitals in {city} report fewer patients with flu than last winter.",
        "Doctors in {city} tested a vaccine that cut infections by half.",
        "A medical study found that poor sleep raises the risk of heart disease.",
        "A clinic in {city} began offering patients free screenings for diabetes.",
        "Health officials in {city} urged parents to get their children vaccinated against measles.",
    ],
}


def topic_rows(per_code: int = 24, seed: int = 37) -> list[dict[str, str]]:
    """News-like sentences labelled with one of four codes the seed prompt never mentions."""
    rng = random.Random(seed)
    rows = []
    for code, templates in TOPICS.items():
        texts: set[str] = set()
        out = []
        while len(out) < per_code:
            text = rng.choice(templates).format(city=rng.choice(CITIES), company=rng.choice(COMPANIES))
            if text not in texts:
                texts.add(text)
                out.append({"text": text, "code": code})
        rows.extend(out)
    rng.shuffle(rows)
    return rows


def tiny_sentiment_rows() -> list[dict[str, str]]:
    """30 rows for fast end-to-end tests: the first 15 of each label of the sentiment data."""
    rows = sentiment_rows()
    pos = [r for r in rows if r["label"] == "positive"][:15]
    neg = [r for r in rows if r["label"] == "negative"][:15]
    return [row for pair in zip(pos, neg, strict=True) for row in pair]


def write_all(folder: Path = HERE) -> dict[str, Path]:
    """Write every example data file into `folder`; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "arithmetic": folder / "arithmetic.csv",
        "sentiment": folder / "sentiment.jsonl",
        "topic_codes": folder / "topic_codes.parquet",
        "tiny_sentiment": folder / "tiny_sentiment.csv",
    }
    pd.DataFrame(arithmetic_rows()).to_csv(paths["arithmetic"], index=False, lineterminator="\n")
    with paths["sentiment"].open("w", encoding="utf-8", newline="\n") as handle:
        for row in sentiment_rows():
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    pd.DataFrame(topic_rows()).to_parquet(paths["topic_codes"], index=False)
    pd.DataFrame(tiny_sentiment_rows()).to_csv(paths["tiny_sentiment"], index=False, lineterminator="\n")
    return paths


if __name__ == "__main__":
    for name, path in write_all().items():
        print(f"{name}: {path}")
