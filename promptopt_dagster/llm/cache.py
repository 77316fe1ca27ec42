"""A persistent response cache in front of any LLMClient, on a local SQLite file or a shared
PostgreSQL database.

Re-running an iteration, a backfill or a test must not pay for the same call twice, whichever
worker runs it. Replies are kept in one table keyed by `ChatRequest.cache_key(backend, model)`: in
a SQLite file (a path, by default ``<PROMPTOPT_HOME>/cache/llm_responses.sqlite``, or
``sqlite:///...``) or in a PostgreSQL database (``postgresql://...``, ``LLM_CACHE_URL``). Each
successful reply is stored as soon as it arrives. A cache that cannot be opened raises
`StorageError`; once open, an outage of it logs a warning and the calls go on without it.

Details: docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.schema import CreateTable

from promptopt_dagster.errors import StorageError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse, LLMClient
from promptopt_dagster.redaction import Redactor

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_S = 60.0
_CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout: an unreachable host fails in seconds, not minutes
_SELECT_CHUNK = 500  # stay well under SQLite's bound-parameter limit
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the stack ships psycopg2 (dagster-postgres).
_POSTGRES_DRIVER = "postgresql+psycopg2"
# Any 64-bit number shared by every worker: serializes the table's creation (below).
_CREATE_LOCK_ID = 0x70726F6D70746F70

_metadata = sa.MetaData()
# The same columns as the SQLite files written before SQLAlchemy, so existing caches stay valid.
responses = sa.Table(
    "responses",
    _metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("backend", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
_INSERTS: dict[str, Callable[..., Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    unavailable: int = 0  # lookups and stores that failed (the call went on without the cache)


Row = tuple[str, str, str, str, int, int, float]  # the columns of `responses`, in order


class ResponseStore(Protocol):
    """Where CachedLLM keeps replies; `ResponseTable` is the product's, the benchmark adds one."""

    def lookup(self, keys: Sequence[str]) -> dict[str, ChatResponse]: ...

    def put(self, rows: Sequence[Row]) -> None: ...


def database_url(location: str | os.PathLike[str]) -> URL:
    """The SQLAlchemy URL for a cache location: a path becomes ``sqlite:///<absolute path>``,
    ``postgresql://`` / ``postgres://`` get the psycopg2 driver; anything else is refused."""
    text = str(location)
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    for bare in ("postgresql://", "postgres://"):
        if text.startswith(bare):
            text = f"{_POSTGRES_DRIVER}://{text[len(bare):]}"
    try:
        url = make_url(text)
    except ArgumentError:
        url = None
    if url is None or url.get_backend_name() not in _INSERTS or (
        url.get_backend_name() == "sqlite" and not url.database
    ):
        shown = Redactor()(text)
        raise StorageError(
            f"the LLM response cache must be a local file or a postgresql:// URL, got {shown!r}. "
            f"Fix: unset LLM_CACHE_URL to use a file under PROMPTOPT_HOME, or set it to "
            f"postgresql://USER:PASSWORD@HOST:PORT/DATABASE."
        )
    return url


class ResponseTable:
    """The `responses` table in one database, through a small pool of open connections.

    Reusing connections is what keeps the cache cheap (benchmarks/response_cache_speed.py):
    closing the last connection to a SQLite WAL file checkpoints it, and a PostgreSQL connection
    costs a TCP and password handshake, each several milliseconds per lookup or store. Pooled
    PostgreSQL connections are pinged when taken from the pool, so a restarted server costs one
    reconnect, not an error. A forked process builds its own engine: a database connection must
    not be used on both sides of a fork."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.url = database_url(location)
        self.dialect = self.url.get_backend_name()
        self.shown = self.url.render_as_string(hide_password=True)
        self._redact = Redactor()
        self._redact.add(self.url.password if isinstance(self.url.password, str) else None)
        self._insert = _INSERTS[self.dialect]
        self._engine: Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                if self._engine is not None:
                    self._engine.dispose(close=False)  # the parent's connections stay the parent's
                self._engine, self._pid = self._create_engine(), os.getpid()
            return self._engine

    def _create_engine(self) -> Engine:
        if self.dialect == "sqlite":
            engine = sa.create_engine(self.url, connect_args={"timeout": _BUSY_TIMEOUT_S})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(self.url, pool_pre_ping=True,
                                connect_args={"connect_timeout": _CONNECT_TIMEOUT_S})

    def dispose(self) -> None:
        """Close pooled connections (they also close when the table object is collected)."""
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None

    def describe(self, exc: BaseException) -> str:
        """The driver's message, without the SQL, parameters or password."""
        detail = getattr(exc, "orig", None) or exc
        return self._redact(" ".join(str(detail).split()))

    def error(self, action: str, exc: BaseException) -> StorageError:
        if self.dialect == "sqlite":
            fix = ("make its folder writable and the disk not full, or disable the cache "
                   "(LLM_CACHE_ENABLED=false)")
        else:
            fix = ("check that the PostgreSQL server in LLM_CACHE_URL is running and reachable from this "
                   "machine and that the user, password and database are right; or unset LLM_CACHE_URL "
                   "to cache in a local file, or disable the cache (LLM_CACHE_ENABLED=false)")
        return StorageError(f"cannot {action} the LLM response cache {self.shown} ({self.describe(exc)}). "
                            f"Fix: {fix}.")

    def create(self) -> None:
        """Create the table unless it exists. On PostgreSQL two workers running CREATE TABLE IF NOT
        EXISTS at once can both try to create it (a unique violation in the catalog), so creation
        holds a transaction-level advisory lock."""
        try:
            if self.dialect == "sqlite":
                Path(self.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _CREATE_LOCK_ID})
                conn.execute(CreateTable(responses, if_not_exists=True))
        except (OSError, ImportError, SQLAlchemyError) as exc:  # ImportError: a driver not installed
            raise self.error("open", exc) from None

    def lookup(self, keys: Sequence[str]) -> dict[str, ChatResponse]:
        found: dict[str, ChatResponse] = {}
        unique = list(dict.fromkeys(keys))
        c = responses.c
        columns = (c.key, c.text, c.prompt_tokens, c.completion_tokens)
        try:
            with self.engine.connect() as conn:
                for i in range(0, len(unique), _SELECT_CHUNK):
                    query = sa.select(*columns).where(responses.c.key.in_(unique[i : i + _SELECT_CHUNK]))
                    for key, text, prompt_tokens, completion_tokens in conn.execute(query):
                        found[key] = ChatResponse(text=text, prompt_tokens=prompt_tokens, seconds=0.0,
                                                  completion_tokens=completion_tokens, cached=True)
        except SQLAlchemyError as exc:
            raise self.error("read", exc) from None
        return found

    def put(self, rows: Sequence[Row]) -> None:
        """Insert-or-ignore: a key another worker stored meanwhile keeps its row."""
        if not rows:
            return
        names = [c.name for c in responses.columns]
        statement = self._insert(responses).on_conflict_do_nothing(index_elements=["key"])
        try:
            with self.engine.begin() as conn:
                conn.execute(statement, [dict(zip(names, row, strict=True)) for row in rows])
        except SQLAlchemyError as exc:
            raise self.error("write to", exc) from None


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    """WAL lets readers and one writer work at once across processes; NORMAL sync is durable
    against a crashed process (a power loss may drop the latest replies, which are re-asked)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class CachedLLM:
    """An LLMClient that answers from the cache when it can and sends only the misses, in one
    batch and in order, to `inner`, storing each reply as it arrives (module docstring). Hits come
    back with `cached=True` and `seconds=0`.

    `location` is a file path or a database URL (see the module docstring); `store` replaces the
    table (the benchmark compares stores through the same code)."""

    def __init__(self, inner: LLMClient, location: str | os.PathLike[str], enabled: bool = True,
                 store: ResponseStore | None = None) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.model = inner.model
        self.enabled = enabled
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._reachable = True
        if store is None:
            table = ResponseTable(location)
            if enabled:
                table.create()
            store = table
        self.store: ResponseStore = store
        self._reports_replies = _takes_on_reply(inner)

    def _unavailable(self, exc: StorageError) -> None:
        with self._stats_lock:
            self.stats.unavailable += 1
            first, self._reachable = self._reachable, False
        if first:
            logger.warning("%s The call goes on without the cache (replies are not reused or kept) "
                           "until it is reachable again.", exc)

    def _available(self) -> None:
        with self._stats_lock:
            back, self._reachable = not self._reachable, True
        if back:
            logger.warning("the LLM response cache is reachable again")

    def _lookup(self, keys: Sequence[str]) -> dict[str, ChatResponse]:
        try:
            found = self.store.lookup(keys)
        except StorageError as exc:
            self._unavailable(exc)
            return {}
        self._available()
        return found

    def _store(self, items: Sequence[tuple[str, ChatResponse]]) -> None:
        now = time.time()
        rows = [(k, self.backend, self.model, r.text, r.prompt_tokens, r.completion_tokens, now)
                for k, r in items if r.ok]
        if not rows:
            return
        try:
            self.store.put(rows)
        except StorageError as exc:
            self._unavailable(exc)
            return
        self._available()

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        if not self.enabled:
            with self._stats_lock:
                self.stats.misses += len(requests)
            return self.inner.generate(requests)
        keys = [r.cache_key(self.backend, self.model) for r in requests]
        hits = self._lookup(keys)
        out: list[ChatResponse | None] = [hits.get(k) for k in keys]
        # Each distinct missing key is sent once; a repeat within the batch reuses that reply.
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if out[i] is None and key not in first_index:
                first_index[key] = i
        if first_index:
            sent = list(first_index)  # the keys, in the order they are sent
            stored: set[int] = set()

            def on_reply(index: int, reply: ChatResponse) -> None:
                # While the cache is unreachable, one store at the end of the batch tries again:
                # a store per reply could cost a connect timeout per reply.
                if self._reachable:
                    self._store([(sent[index], reply)])
                    stored.add(index)

            batch = [requests[i] for i in first_index.values()]
            if self._reports_replies:
                fresh = self.inner.generate(batch, on_reply=on_reply)  # type: ignore[call-arg]
            else:
                fresh = self.inner.generate(batch)
            if len(fresh) != len(first_index):
                raise RuntimeError(f"{type(self.inner).__name__}.generate returned {len(fresh)} replies "
                                   f"for {len(first_index)} requests")
            by_key = dict(zip(sent, fresh, strict=True))
            self._store([(key, fresh[i]) for i, key in enumerate(sent) if i not in stored])
            for i, key in enumerate(keys):
                if out[i] is None:
                    reply = by_key[key]
                    out[i] = reply if first_index[key] == i else reply.model_copy(
                        update={"cached": reply.ok, "seconds": 0.0})
        misses = len(first_index)
        with self._stats_lock:
            self.stats.misses += misses
            self.stats.hits += len(requests) - misses
        return [r for r in out if r is not None]


def _takes_on_reply(client: LLMClient) -> bool:
    """Whether `client.generate` accepts the `on_reply` keyword (see base.LLMClient)."""
    try:
        return "on_reply" in inspect.signature(client.generate).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature
        return False
