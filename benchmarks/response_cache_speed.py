"""Speed of the SQLite response cache: the SQLAlchemy table (llm/cache.py) against the plain
sqlite3 code it replaced, both behind the same `CachedLLM` and the scripted fake LLM (no latency),
so the difference is the store alone.

For each store, on a fresh file: `--requests` distinct requests in batches of `--batch` (one
lookup per batch and one store per reply, as each arrives: every request misses), then the same
batches again (one lookup per batch: every request hits). Figures are requests per second, the
best of `--repeats` runs.
Optionally `--postgres URL` adds the PostgreSQL table (a real server over TCP).

    python benchmarks/response_cache_speed.py [--requests 2000] [--batch 20] [--repeats 3]
        [--postgres postgresql://user:password@host:port/database]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import sqlalchemy as sa

from promptopt_dagster.llm.base import ChatRequest, ChatResponse
from promptopt_dagster.llm.cache import CachedLLM, ResponseStore, ResponseTable, Row, responses
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.redaction import redact


class Sqlite3Store:
    """The store before SQLAlchemy: a new sqlite3 connection per operation (WAL, NORMAL sync,
    60 s busy timeout), `IN (...)` lookups in chunks of 500, INSERT OR REPLACE."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with closing(self._connect()) as conn, conn:
            conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, backend TEXT NOT NULL, "
                         "model TEXT NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
                         "completion_tokens INTEGER NOT NULL, created_at REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def lookup(self, keys: Sequence[str]) -> dict[str, ChatResponse]:
        found: dict[str, ChatResponse] = {}
        unique = list(dict.fromkeys(keys))
        with closing(self._connect()) as conn:
            for i in range(0, len(unique), 500):
                chunk = unique[i : i + 500]
                query = ("SELECT key, text, prompt_tokens, completion_tokens FROM responses "
                         f"WHERE key IN ({','.join('?' * len(chunk))})")
                for key, text, prompt_tokens, completion_tokens in conn.execute(query, chunk):
                    found[key] = ChatResponse(text=text, prompt_tokens=prompt_tokens,
                                              completion_tokens=completion_tokens, seconds=0.0, cached=True)
        return found

    def put(self, rows: Sequence[Row]) -> None:
        with closing(self._connect()) as conn, conn:
            conn.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def one_run(store: ResponseStore, requests: int, batch: int) -> tuple[float, float]:
    """(misses per second, hits per second) through CachedLLM."""
    inner = ScriptedLLM(lambda r: "reply " + r.messages[-1].content)
    llm = CachedLLM(inner, "unused", store=store)
    batches = [[ChatRequest.of([{"role": "user", "content": f"question {i}"}])
                for i in range(start, min(start + batch, requests))] for start in range(0, requests, batch)]
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for b in batches:
            llm.generate(b)
        rates.append(requests / (time.perf_counter() - start))
    assert inner.calls == requests and llm.stats.hits == requests, "the second pass must be all hits"
    return rates[0], rates[1]


def best(make: Callable[[int], ResponseStore], args: argparse.Namespace) -> tuple[float, float]:
    runs = [one_run(make(i), args.requests, args.batch) for i in range(args.repeats)]
    return max(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", help="a postgresql:// URL to measure as well (its table is emptied)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cache-speed-") as tmp:
        folder = Path(tmp)

        def sqlalchemy_table(i: int) -> ResponseStore:
            table = ResponseTable(folder / f"sqlalchemy-{i}.sqlite")
            table.create()
            return table

        stores: dict[str, Callable[[int], ResponseStore]] = {
            "sqlite3 (before)": lambda i: Sqlite3Store(folder / f"sqlite3-{i}.sqlite"),
            "SQLAlchemy, SQLite (now)": sqlalchemy_table,
        }
        if args.postgres:

            def postgres_table(i: int) -> ResponseStore:
                table = ResponseTable(args.postgres)
                table.create()
                with table.engine.begin() as conn:
                    conn.execute(sa.delete(responses))
                return table

            stores[f"SQLAlchemy, {redact(args.postgres)}"] = postgres_table
        print(f"{args.requests} requests in batches of {args.batch}, best of {args.repeats}; requests/s")
        width = max(map(len, stores)) + 2
        print(f"{'store':<{width}} {'miss+store':>12} {'hit':>12}")
        for name, make in stores.items():
            misses, hits = best(make, args)
            print(f"{name:<{width}} {misses:>12,.0f} {hits:>12,.0f}")


if __name__ == "__main__":
    main()
