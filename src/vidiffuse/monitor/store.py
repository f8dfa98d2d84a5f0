"""Where drift observations and canary runs live: two tables in the service's SQLite file (WAL).

The worker writes (one row per generated video, one per canary run); the API process reads at scrape
time. WAL lets readers and a writer work at once, and a busy timeout makes concurrent writers wait for
each other instead of failing, so several processes can share the file. Embeddings are stored as
float16 blobs: ~1 KB a row, and the rounding (~1e-3 relative) is far below what a drift test can see.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS monitor_observations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    job_id TEXT,
    model_version TEXT NOT NULL,
    prompt_embedding BLOB NOT NULL,
    ood_score REAL,
    ood INTEGER,
    output_embedding BLOB NOT NULL,
    output_attributes TEXT NOT NULL,
    temporal TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS monitor_observations_by_version ON monitor_observations(model_version, id);
CREATE TABLE IF NOT EXISTS monitor_reference (
    observation_id INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS canary_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    status TEXT NOT NULL,
    passed INTEGER NOT NULL,
    model_name TEXT,
    model_version TEXT,
    reference TEXT,
    reference_version TEXT,
    n INTEGER,
    worst_psnr_db REAL,
    all_exact INTEGER,
    max_embedding_distance REAL,
    details TEXT NOT NULL
);
"""
_COLUMNS = ("id, created, job_id, model_version, prompt_embedding, ood_score, ood, output_embedding, "
            "output_attributes, temporal")


@dataclass
class Observations:
    """A window of observations, oldest first, as arrays."""

    ids: np.ndarray  # (n,) int64
    model_versions: list[str]
    prompt_embeddings: np.ndarray  # (n, D_text) float32
    ood_scores: np.ndarray  # (n,) float64, NaN where the model has no OOD reference
    ood: np.ndarray  # (n,) float64: 1.0 out of distribution, 0.0 in, NaN unknown
    output_embeddings: np.ndarray  # (n, D_video) float32
    # attribute -> (n,) class names the video encoder reads, None where missing
    attributes: dict[str, list[str | None]] = field(default_factory=dict)
    temporal: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (n,) float64, NaN where missing

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index) -> Observations:
        """The rows at `index` (integer positions), e.g. to resample windows in a simulation."""
        index = np.asarray(index, dtype=np.int64)
        return Observations(self.ids[index], [self.model_versions[i] for i in index], self.prompt_embeddings[index],
                            self.ood_scores[index], self.ood[index], self.output_embeddings[index],
                            {k: [v[i] for i in index] for k, v in self.attributes.items()},
                            {k: v[index] for k, v in self.temporal.items()})

    @classmethod
    def concat(cls, parts: Sequence[Observations]) -> Observations:
        keys = lambda name: sorted({k for p in parts for k in getattr(p, name)})
        return cls(np.concatenate([p.ids for p in parts]), [v for p in parts for v in p.model_versions],
                   np.concatenate([p.prompt_embeddings for p in parts]), np.concatenate([p.ood_scores for p in parts]),
                   np.concatenate([p.ood for p in parts]), np.concatenate([p.output_embeddings for p in parts]),
                   {k: [v for p in parts for v in p.attributes.get(k, [None] * len(p))] for k in keys("attributes")},
                   {k: np.concatenate([p.temporal.get(k, np.full(len(p), np.nan)) for p in parts])
                    for k in keys("temporal")})


def _blob(vector) -> bytes:
    v = np.asarray(vector, dtype=np.float32).ravel()
    if v.size == 0 or not np.isfinite(v).all():
        raise ConfigError("an embedding must be a non-empty vector of finite numbers")
    return v.astype(np.float16).tobytes()


def _stack(blobs: Sequence[bytes]) -> np.ndarray:
    if not blobs:
        return np.zeros((0, 0), np.float32)
    sizes = {len(b) for b in blobs}
    if len(sizes) > 1:  # a window across models with different encoders: the caller reports it incomparable
        return np.full((len(blobs), 0), np.nan, np.float32)
    return np.frombuffer(b"".join(blobs), np.float16).reshape(len(blobs), -1).astype(np.float32)


class MonitorStore:
    """Drift observations and canary runs in the SQLite file at `db_path` (created if missing).

    Cheap to construct (the worker makes one per job). Each process opens its own connection;
    `max_observations` bounds the table: past it, old rows are pruned, except pinned reference rows
    and the first `keep_first` rows of each model version (the default drift reference).
    """

    def __init__(self, db_path: str | os.PathLike, max_observations: int = 50_000, keep_first: int = 1000,
                 timeout: float = 30.0):
        self.path = Path(db_path)
        self.max_observations, self.keep_first, self.timeout = int(max_observations), int(keep_first), float(timeout)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        with self._connection() as db:
            db.executescript(_SCHEMA)

    # ------------------------------------------------------------ connection

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, one user at a time (a forked child opens its own)."""
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across a process crash
                self._conn, self._pid = conn, os.getpid()
            yield self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead of one
        # failing when its read lock cannot be upgraded
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ------------------------------------------------------------ observations

    def add_observation(self, prompt_embedding, output_embedding, temporal: dict[str, float],
                        attributes: dict[str, str] | None = None, model_version: str = "unversioned",
                        ood_score: float | None = None, ood: bool | None = None, job_id: str | None = None,
                        created: float | None = None) -> int:
        """Store one generation's statistics; returns the row id."""
        temporal = {str(k): float(v) for k, v in temporal.items() if v is not None and np.isfinite(v)}
        attributes = {str(k): str(v) for k, v in (attributes or {}).items()}
        row = (time.time() if created is None else float(created), job_id, str(model_version), _blob(prompt_embedding),
               None if ood_score is None else float(ood_score), None if ood is None else int(bool(ood)),
               _blob(output_embedding), json.dumps(attributes, sort_keys=True), json.dumps(temporal, sort_keys=True))
        with self._transaction() as db:
            rowid = db.execute("INSERT INTO monitor_observations (created, job_id, model_version, prompt_embedding, "
                               "ood_score, ood, output_embedding, output_attributes, temporal) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row).lastrowid
        # checking the size every few hundred rows keeps the insert cheap
        if rowid % 500 == 0 and self.count() > self.max_observations:
            self.prune(self.max_observations, self.keep_first)
        return int(rowid)

    def count(self, model_version: str | None = None) -> int:
        with self._connection() as db:
            if model_version is None:
                return db.execute("SELECT COUNT(*) FROM monitor_observations").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM monitor_observations WHERE model_version = ?",
                              (model_version,)).fetchone()[0]

    def latest_model_version(self) -> str | None:
        with self._connection() as db:
            row = db.execute("SELECT model_version FROM monitor_observations ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def _read(self, where: str, params: Sequence, order: str, limit: int | None) -> Observations:
        sql = f"SELECT {_COLUMNS} FROM monitor_observations WHERE {where} ORDER BY id {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._connection() as db:
            rows = db.execute(sql, tuple(params)).fetchall()
        if order == "DESC":
            rows.reverse()
        attributes = [json.loads(r[8]) for r in rows]
        temporal = [json.loads(r[9]) for r in rows]
        names = sorted({k for t in temporal for k in t})
        return Observations(
            ids=np.array([r[0] for r in rows], np.int64),
            model_versions=[r[3] for r in rows],
            prompt_embeddings=_stack([r[4] for r in rows]),
            ood_scores=np.array([np.nan if r[5] is None else r[5] for r in rows], np.float64),
            ood=np.array([np.nan if r[6] is None else float(r[6]) for r in rows], np.float64),
            output_embeddings=_stack([r[7] for r in rows]),
            attributes={k: [a.get(k) for a in attributes] for k in sorted({k for a in attributes for k in a})},
            temporal={k: np.array([t.get(k, np.nan) for t in temporal], np.float64) for k in names},
        )

    def first(self, n: int, model_version: str | None = None) -> Observations:
        """The oldest `n` observations (of one model version, if given)."""
        where, params = ("model_version = ?", [model_version]) if model_version is not None else ("1", [])
        return self._read(where, params, "ASC", n)

    def last(self, n: int, model_version: str | None = None, after_id: int = 0) -> Observations:
        """The newest `n` observations with an id above `after_id` (of one model version, if given)."""
        where, params = "id > ?", [int(after_id)]
        if model_version is not None:
            where, params = where + " AND model_version = ?", params + [model_version]
        return self._read(where, params, "DESC", n)

    # ------------------------------------------------------------ pinned reference

    def pin_reference(self, n: int | None = 200, ids: Sequence[int] | None = None) -> int:
        """Make a fixed set of observations the drift reference: the given `ids`, else the newest `n`.

        Replaces any earlier pinned set; returns how many rows are pinned. Use it after a deliberate
        change (a new model, a new kind of user) to declare today's traffic the new normal.
        """
        with self._transaction() as db:
            if ids is None:
                if n is None or n < 1:
                    raise ConfigError(f"pin at least one observation, got n={n}")
                newest = db.execute("SELECT id FROM monitor_observations ORDER BY id DESC LIMIT ?", (int(n),))
                ids = [r[0] for r in newest]
            ids = sorted({int(i) for i in ids})
            known = {r[0] for r in db.execute(
                f"SELECT id FROM monitor_observations WHERE id IN ({','.join('?' * len(ids))})", ids)} if ids else set()
            missing = [i for i in ids if i not in known]
            if missing or not ids:
                raise ConfigError(f"cannot pin: no observations with ids {missing[:5] if missing else '(none given)'}")
            db.execute("DELETE FROM monitor_reference")
            db.executemany("INSERT INTO monitor_reference (observation_id) VALUES (?)", [(i,) for i in ids])
        return len(ids)

    def unpin_reference(self) -> None:
        """Back to the default reference: the first observations of the current model version."""
        with self._transaction() as db:
            db.execute("DELETE FROM monitor_reference")

    def pinned(self) -> Observations | None:
        with self._connection() as db:
            if db.execute("SELECT 1 FROM monitor_reference LIMIT 1").fetchone() is None:
                return None
        return self._read("id IN (SELECT observation_id FROM monitor_reference)", [], "ASC", None)

    def prune(self, keep_last: int, keep_first: int = 1000) -> int:
        """Delete observations other than the newest `keep_last`, the first `keep_first` of each model
        version and the pinned reference; returns how many went."""
        with self._transaction() as db:
            deleted = db.execute(
                """DELETE FROM monitor_observations WHERE id NOT IN (
                       SELECT id FROM monitor_observations ORDER BY id DESC LIMIT ?)
                   AND id NOT IN (SELECT observation_id FROM monitor_reference)
                   AND id NOT IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER (
                       PARTITION BY model_version ORDER BY id) AS k FROM monitor_observations) WHERE k <= ?)""",
                (int(keep_last), int(keep_first))).rowcount
        return deleted

    # ------------------------------------------------------------ canary runs

    def add_canary_run(self, run: dict) -> int:
        """Store one canary result (the dict `run_canary` returns)."""
        psnr = run.get("worst_psnr_db")
        row = (float(run["started"]), float(run["finished"]), str(run["status"]), int(bool(run["passed"])),
               run.get("model_name"), run.get("model_version"), run.get("reference"), run.get("reference_version"),
               run.get("n"), psnr, None if run.get("all_exact") is None else int(bool(run["all_exact"])),
               run.get("max_embedding_distance"), json.dumps(run, default=str))
        with self._transaction() as db:
            return int(db.execute(
                "INSERT INTO canary_runs (started, finished, status, passed, model_name, model_version, reference, "
                "reference_version, n, worst_psnr_db, all_exact, max_embedding_distance, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row).lastrowid)

    def canary_runs(self, limit: int = 20) -> list[dict]:
        """The newest canary runs first, each the dict `run_canary` returned."""
        with self._connection() as db:
            rows = db.execute("SELECT details FROM canary_runs ORDER BY id DESC LIMIT ?", (int(limit),)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def last_canary_run(self) -> dict | None:
        runs = self.canary_runs(1)
        return runs[0] if runs else None

    def canary_counts(self) -> dict[str, int]:
        """Canary runs so far, by status."""
        with self._connection() as db:
            return dict(db.execute("SELECT status, COUNT(*) FROM canary_runs GROUP BY status").fetchall())
