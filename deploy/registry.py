"""The deployment registry: which route serves what, the artifacts behind it, and every event.

SQLite from the standard library, one file in the config's state folder. Every change is one
transaction, so a crash at any step leaves the last good deployment recorded.

Sharing one registry between several gateways: all SQL here is plain, parameterised DB-API with
`?` placeholders and no SQLite-only types, behind `Registry(connect)`. A PostgreSQL registry is
`Registry(lambda: psycopg.connect(url))` with the `?` placeholders rewritten to `%s`, the
`INTEGER PRIMARY KEY` ids made `GENERATED ALWAYS AS IDENTITY` and `BEGIN IMMEDIATE` made `BEGIN`; routes would then
be switched under `SELECT ... FOR UPDATE` so two gateways never promote one route at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import RegistryError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,              -- merged | merged-awq
    route TEXT NOT NULL,
    fingerprint TEXT NOT NULL,       -- what it was made from and how: reuse key
    sha256 TEXT NOT NULL,            -- of its shards, from switchyard.json
    provenance TEXT NOT NULL,        -- switchyard.json, verbatim
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    route TEXT PRIMARY KEY,
    mode TEXT NOT NULL,              -- base | adapter | merged
    artifact_id INTEGER REFERENCES artifacts(id),
    previous_mode TEXT,              -- the rollback target
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    route TEXT NOT NULL,
    kind TEXT NOT NULL,              -- promote | rollback | failure | restart
    actor TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_route ON events(route, at);
"""


@dataclass(frozen=True)
class Artifact:
    id: int
    path: Path
    kind: str
    route: str
    fingerprint: str
    sha256: str
    provenance: dict
    created_at: float


@dataclass(frozen=True)
class Deployment:
    route: str
    mode: str
    artifact: Artifact | None
    previous_mode: str | None
    updated_at: float


@dataclass(frozen=True)
class Event:
    id: int
    route: str
    kind: str
    actor: str
    at: float
    detail: dict


class Registry:
    """Thread-safe access to the registry. `clock` is injectable for tests."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], clock: Callable[[], float] = time.time):
        self._connect = connect
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._conn = connect()
            self._conn.executescript(SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                self._conn.commit()
            elif int(row[0]) != SCHEMA_VERSION:
                raise RegistryError(
                    f"registry schema {row[0]} is not the supported {SCHEMA_VERSION}",
                    "use a new state_dir, or the switchyard version that wrote it",
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry: {exc}", "check the state_dir in the config") from None

    @classmethod
    def open(cls, path: Path, clock: Callable[[], float] = time.time) -> "Registry":
        path.parent.mkdir(parents=True, exist_ok=True)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn

        return cls(connect, clock)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # --- artifacts ---------------------------------------------------------------------------
    def add_artifact(self, *, path: Path, kind: str, route: str, fingerprint: str, sha256: str,
                     provenance: dict) -> Artifact:
        now = self._clock()
        with self._tx() as db:
            db.execute("DELETE FROM artifacts WHERE path=? AND id NOT IN "
                       "(SELECT artifact_id FROM deployments WHERE artifact_id IS NOT NULL)", (str(path),))
            cur = db.execute(
                "INSERT INTO artifacts (path, kind, route, fingerprint, sha256, provenance, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(path), kind, route, fingerprint, sha256, json.dumps(provenance, sort_keys=True), now),
            )
            return self._artifact_by_id(db, cur.lastrowid)

    def find_artifact(self, fingerprint: str) -> Artifact | None:
        """The newest artifact made from exactly these inputs and options, if its folder still exists."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM artifacts WHERE fingerprint=? ORDER BY created_at DESC", (fingerprint,)
            ).fetchall()
        for row in rows:
            art = _artifact(row)
            if (art.path / "switchyard.json").is_file():
                return art
        return None

    def artifacts_in_use(self) -> set[Path]:
        """Artifacts a live route or a rollback target uses: never to be deleted."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT a.path FROM artifacts a JOIN deployments d ON d.artifact_id = a.id"
            ).fetchall()
        return {Path(r[0]) for r in rows}

    def _artifact_by_id(self, db: sqlite3.Connection, artifact_id: int | None) -> Artifact | None:
        if artifact_id is None:
            return None
        row = db.execute("SELECT * FROM artifacts WHERE id=?", (artifact_id,)).fetchone()
        return _artifact(row) if row else None

    # --- deployments -------------------------------------------------------------------------
    def set_deployment(self, route: str, mode: str, *, artifact: Artifact | None, actor: str,
                       event: str, detail: dict | None = None) -> Deployment:
        """Record the route's new mode and its event in one transaction."""
        now = self._clock()
        with self._tx() as db:
            prev = db.execute("SELECT mode FROM deployments WHERE route=?", (route,)).fetchone()
            db.execute(
                "INSERT INTO deployments (route, mode, artifact_id, previous_mode, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(route) DO UPDATE SET mode=excluded.mode, "
                "artifact_id=excluded.artifact_id, previous_mode=excluded.previous_mode, "
                "updated_at=excluded.updated_at",
                (route, mode, artifact.id if artifact else None, prev[0] if prev else None, now),
            )
            self._event(db, route, event, actor, now, detail or {})
        return self.deployment(route)  # type: ignore[return-value]

    def deployment(self, route: str) -> Deployment | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM deployments WHERE route=?", (route,)).fetchone()
            if row is None:
                return None
            return Deployment(row[0], row[1], self._artifact_by_id(self._conn, row[2]), row[3], row[4])

    def deployments(self) -> list[Deployment]:
        with self._lock:
            routes = [r[0] for r in self._conn.execute("SELECT route FROM deployments ORDER BY route")]
        return [d for d in (self.deployment(r) for r in routes) if d is not None]

    # --- events ------------------------------------------------------------------------------
    def record_event(self, route: str, kind: str, *, actor: str, detail: dict | None = None) -> None:
        with self._tx() as db:
            self._event(db, route, kind, actor, self._clock(), detail or {})

    def history(self, route: str | None = None, limit: int = 100) -> list[Event]:
        sql = "SELECT * FROM events" + (" WHERE route=?" if route else "") + " ORDER BY id DESC LIMIT ?"
        args = (route, limit) if route else (limit,)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [Event(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in reversed(rows)]

    @staticmethod
    def _event(db: sqlite3.Connection, route: str, kind: str, actor: str, at: float, detail: dict) -> None:
        db.execute("INSERT INTO events (route, kind, actor, at, detail) VALUES (?, ?, ?, ?, ?)",
                   (route, kind, actor, at, json.dumps(detail, sort_keys=True, default=str)))


def _artifact(row: tuple) -> Artifact:
    return Artifact(row[0], Path(row[1]), row[2], row[3], row[4], row[5], json.loads(row[6]), row[7])
