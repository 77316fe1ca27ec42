"""The offline outbox: MLflow writes made while the server is down, replayed in order later.

Each queued call is a JSONL line with its operation name, its arguments (original timestamps
included) and, for run creation, a ``pending-...`` placeholder id the caller keeps using. A replay
maps placeholders to the real run ids and persists that map next to the outbox, so another
process sharing the outbox can resolve them. A replayed entry that fails for a reason other than
an outage goes to ``<outbox>.failed.jsonl`` so it cannot block the queue forever. A file lock
lets several processes share one outbox.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from promptopt_dagster.redaction import redact

logger = logging.getLogger(__name__)

PENDING_PREFIX = "pending-"
_RUN_ID_FIELDS = ("run_id", "parent_run_id")


def default_outbox(tracking_uri: str) -> Path:
    """Next to a SQLite store; for a server, one file per URI in the user's cache."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlflow-outbox.jsonl"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptopt"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:10]
    return cache / f"mlflow-outbox-{digest}.jsonl"


class Outbox:
    """The queued calls of one tracking store and the placeholder ids handed out for them.

    Args:
        path: the JSONL file of queued calls.
        store_label: the tracking URI without credentials, for messages.
    """

    def __init__(self, path: Path, store_label: str) -> None:
        self.path = path
        self.store_label = store_label
        self._id_map: dict[str, str] = {}

    @property
    def ids_path(self) -> Path:
        return self.path.with_name(self.path.name + ".ids.json")

    @property
    def failed_path(self) -> Path:
        return self.path.with_name(self.path.name + ".failed.jsonl")

    def blob_path(self, suffix: str) -> Path:
        """A new file beside the outbox for an argument JSON cannot hold (a fitted model)."""
        blobs = self.path.with_name(self.path.name + ".blobs")
        blobs.mkdir(parents=True, exist_ok=True)
        return blobs / f"{uuid.uuid4().hex}{suffix}"

    def _file_lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=120)

    # --- the queue -----------------------------------------------------------------------------

    def pending(self) -> list[dict[str, Any]]:
        """The queued calls, oldest first."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def has_pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def _write_pending(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        os.replace(tmp, self.path)

    def enqueue(self, op: str, args: dict[str, Any], create_key: list[Any] | None, reason: str) -> str | None:
        """Queue `op`; returns the placeholder run id for a run creation (the same one for the
        same `create_key` while it is queued), else None."""
        with self._file_lock():
            entries = self.pending()
            placeholder = None
            if create_key is not None:
                for entry in entries:  # idempotent creation during an outage too
                    if entry["op"] == op and entry.get("key") == create_key:
                        return entry["placeholder"]
                placeholder = PENDING_PREFIX + uuid.uuid4().hex
            entry = {
                "op": op,
                "args": args,
                "key": create_key,
                "placeholder": placeholder,
                "queued_at": time.time(),
            }
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        logger.warning(
            "MLflow at %s is not available (%s); queued %s in %s (%d pending). It is replayed on the "
            "next successful call or MlflowTracker.flush().",
            self.store_label,
            reason,
            op,
            self.path,
            len(entries) + 1,
        )
        return placeholder

    def replay(
        self,
        execute: Callable[[str, dict[str, Any]], Any],
        is_outage: Callable[[BaseException], bool],
        reachable: Callable[[], bool],
    ) -> int:
        """Run queued calls in order through `execute`; returns how many succeeded. Stops quietly
        (keeping the rest) when the store is not `reachable` or goes away again."""
        with self._file_lock():
            entries = self.pending()
            if not entries or not reachable():
                return 0
            done = 0
            while entries:
                entry = entries[0]
                try:
                    result = execute(entry["op"], self.resolve_args(entry["args"]))
                except Exception as exc:
                    if is_outage(exc):
                        logger.warning(
                            "MLflow went away again while replaying; %d call(s) still queued", len(entries)
                        )
                        break
                    self._set_aside(entry, exc)
                else:
                    if entry.get("placeholder") and isinstance(result, str):
                        self._id_map[entry["placeholder"]] = result
                        self._save_ids()
                    done += 1
                entries.pop(0)
                self._write_pending(entries)
            if done:
                logger.info("replayed %d queued MLflow call(s) to %s", done, self.store_label)
            return done

    def _set_aside(self, entry: dict[str, Any], exc: Exception) -> None:
        logger.error(
            "dropping queued MLflow call %s that fails for a reason other than an outage "
            "(%s: %s); kept in %s",
            entry["op"],
            type(exc).__name__,
            redact(str(exc))[:300],
            self.failed_path,
        )
        with self.failed_path.open("a", encoding="utf-8") as fh:
            fh.write(
                json.dumps({**entry, "error": f"{type(exc).__name__}: {redact(str(exc))}"[:2000]}) + "\n"
            )

    # --- placeholder ids -----------------------------------------------------------------------

    def _load_ids(self) -> None:
        if self.ids_path.exists():
            self._id_map.update(json.loads(self.ids_path.read_text(encoding="utf-8")))

    def _save_ids(self) -> None:
        self.ids_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ids_path.with_name(self.ids_path.name + ".tmp")
        tmp.write_text(json.dumps(self._id_map, indent=1), encoding="utf-8")
        os.replace(tmp, self.ids_path)

    def resolve(self, run_id: str) -> str:
        """The real run id for a ``pending-...`` placeholder once replayed; other ids unchanged."""
        if not run_id.startswith(PENDING_PREFIX):
            return run_id
        if run_id not in self._id_map:
            self._load_ids()
        return self._id_map.get(run_id, run_id)

    def resolve_args(self, args: dict[str, Any]) -> dict[str, Any]:
        out = dict(args)
        for field in _RUN_ID_FIELDS:
            if isinstance(out.get(field), str):
                out[field] = self.resolve(out[field])
        return out

    @staticmethod
    def unresolved(args: dict[str, Any]) -> bool:
        """Whether `args` still name a run that exists only as a placeholder."""
        return any(
            isinstance(args.get(f), str) and args[f].startswith(PENDING_PREFIX) for f in _RUN_ID_FIELDS
        )
