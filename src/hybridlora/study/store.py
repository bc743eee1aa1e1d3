"""The study's results store: one SQLite database (``study.db``) in the study directory.

Tables: ``jobs`` (one row per cell: spec, status, claim), ``metrics`` (one row per job × benchmark),
``instances`` (one row per evaluated example), ``train_log`` (loss curve and LoRA-norm rows), ``meta``
(the current grid and config). Artifacts (adapters, logs, eval JSONL) live under ``runs/<job id>/``.

Guarantees:
* **Claims** — a runner takes a job inside ``BEGIN IMMEDIATE`` (one writer at a time), so two runners on the
  same study never run the same cell at once. A claim whose owner process is gone (same host, pid dead or
  reused) or whose heartbeat is older than ``STALE_AFTER_S`` is taken over.
* **Exactly once** — a job's metrics, instances and logs are inserted in the same transaction that marks it
  complete, and only if the caller still owns the claim. A crash at any moment leaves either no results or all
  of them; ``kill -9`` cannot corrupt the database (SQLite's journal, WAL mode).
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..threads import process_start_time
from .grid import Job

DB_NAME = "study.db"
STALE_AFTER_S = 600.0  # a claim with no heartbeat for this long is abandoned (owner on another host, say)
HEARTBEAT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, kind TEXT NOT NULL, model TEXT NOT NULL,
    placement TEXT NOT NULL, train_domain TEXT NOT NULL, seed INTEGER, spec TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'complete', 'failed')),
    owner TEXT, claimed_at REAL, heartbeat REAL, attempts INTEGER NOT NULL DEFAULT 0,
    finished_at REAL, error TEXT, trainable_params INTEGER, params_by_component TEXT, artifact_dir TEXT,
    wall_s REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL REFERENCES jobs(id), benchmark TEXT NOT NULL, n INTEGER NOT NULL, correct INTEGER,
    accuracy REAL, summary TEXT NOT NULL, PRIMARY KEY (job_id, benchmark)
);
CREATE TABLE IF NOT EXISTS instances (
    job_id TEXT NOT NULL REFERENCES jobs(id), benchmark TEXT NOT NULL, example_id TEXT NOT NULL,
    correct INTEGER, prediction TEXT, gold TEXT, PRIMARY KEY (job_id, benchmark, example_id)
);
CREATE TABLE IF NOT EXISTS train_log (
    job_id TEXT NOT NULL REFERENCES jobs(id), step INTEGER NOT NULL, event TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS train_log_job ON train_log(job_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(RuntimeError):
    """The study database cannot be used (not a study, corrupt, written by a newer version)."""


_LIVE_OWNERS: set[str] = set()  # runners alive in this process (two runners may share one process)


def make_owner() -> str:
    pid = os.getpid()
    owner = f"{socket.gethostname()}|{pid}|{process_start_time(pid) or '-'}|{uuid.uuid4().hex[:8]}"
    _LIVE_OWNERS.add(owner)
    return owner


def release_owner(owner: str) -> None:
    """The runner behind ``owner`` has stopped: a claim it still holds is abandoned."""
    _LIVE_OWNERS.discard(owner)


def owner_alive(owner: str, me: str) -> bool:
    """Whether the runner that wrote ``owner`` may still be working (False only when surely gone)."""
    if owner == me:
        return True
    try:
        host, pid_s, start, _ = owner.split("|")
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # cannot see it: rely on the heartbeat
    if pid == os.getpid():
        return owner in _LIVE_OWNERS  # another runner of this process, or a dead runner whose pid we reused
    now_start = process_start_time(pid)
    if now_start is None:
        if Path("/proc").is_dir():
            return False
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return start == "-" or now_start == start


class Store:
    def __init__(self, study_dir: str | Path, *, create: bool = True):
        self.path = Path(study_dir) / DB_NAME
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path.parent}: no {DB_NAME} here; is this a study directory made by "
                             "`hybridlora study`?")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable study database ({exc})") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---------------------------------------------------------------- grid
    def register(self, jobs: list[Job], config: dict | None = None, *, grid: list[str] | None = None) -> None:
        """Add the grid's jobs (existing rows, finished or not, are kept) and record them as the current grid
        (or record ``grid``, a list of job ids that includes them: a study with cells added by another config)."""
        with self.transaction() as db:
            for position, job in enumerate(jobs):
                db.execute("INSERT OR IGNORE INTO jobs (id, position, kind, model, placement, train_domain, seed, "
                           "spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (job.id, position, job.kind, job.model, job.placement, job.train_domain, job.seed,
                            json.dumps(job.spec, sort_keys=True)))
                db.execute("UPDATE jobs SET position = ? WHERE id = ?", (position, job.id))
            self._set(db, "grid", grid if grid is not None else [j.id for j in jobs])
            if config is not None:
                self._set(db, "config", config)

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            self._set(db, key, value)

    @staticmethod
    def _set(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def grid(self) -> list[str]:
        return self.get("grid", [])

    # ---------------------------------------------------------------- claims
    def claim(self, owner: str, skip: Iterable[str] = (), ids: Iterable[str] | None = None) -> Job | None:
        """Take the first unfinished job of ``ids`` (default: the grid) that nobody live holds; None if none."""
        wanted = list(ids) if ids is not None else self.grid()
        skip = set(skip)
        now = time.time()
        with self.transaction() as db:
            rows = {r[0]: r for r in db.execute(
                "SELECT id, status, owner, heartbeat, kind, model, placement, train_domain, seed, spec FROM jobs")}
            for jid in wanted:
                row = rows.get(jid)
                if row is None or jid in skip or row[1] == "complete":
                    continue
                if row[1] == "running" and owner_alive(row[2], owner) and now - (row[3] or 0) < STALE_AFTER_S:
                    continue
                db.execute("UPDATE jobs SET status = 'running', owner = ?, claimed_at = ?, heartbeat = ?, "
                           "attempts = attempts + 1, error = NULL WHERE id = ?", (owner, now, now, jid))
                _, _, _, _, kind, model, placement, domain, seed, spec = row
                return Job(jid, kind, model, placement, domain, seed, json.loads(spec))
        return None

    def claim_partners(self, owner: str, first: Job, rules: dict, skip: Iterable[str] = ()) -> list[Job]:
        """``first`` and, when ``rules[first.id]`` (a :func:`.jobs.group_rule`: group size and sharing key) is
        set, up to the group's size less one more unclaimed jobs with the same rule (fewer near the end of a run,
        or where other runners hold them)."""
        rule = rules.get(first.id)
        if rule is None:
            return [first]
        size, _ = rule
        partners = [jid for jid, r in rules.items() if r == rule and jid != first.id]
        group = [first]
        while len(group) < size and partners:
            job = self.claim(owner, skip=skip, ids=partners)
            if job is None:
                break
            group.append(job)
            partners.remove(job.id)
        return group

    def heartbeat(self, job_id: str, owner: str) -> None:
        self.db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND owner = ? AND status = 'running'",
                        (time.time(), job_id, owner))

    def fail(self, job_id: str, owner: str, error: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ? AND owner = ? "
                       "AND status = 'running'", (error, time.time(), job_id, owner))

    def complete(self, job_id: str, owner: str, result: dict) -> bool:
        """Record a finished job atomically; False (and nothing written) if the claim was lost meanwhile."""
        with self.transaction() as db:
            row = db.execute("SELECT status, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != "running" or row[1] != owner:
                return False
            for table in ("metrics", "instances", "train_log"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            for bench, summary in result["summaries"].items():
                db.execute("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                           (job_id, bench, summary["n"], summary.get("correct"),
                            summary["accuracy"] if isinstance(summary.get("accuracy"), (int, float)) else None,
                            json.dumps(summary, sort_keys=True, default=str)))
            db.executemany("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?)",
                           [(job_id, r["benchmark"], str(r["example_id"]),
                             None if r.get("correct") is None else int(bool(r["correct"])),
                             _text(r.get("prediction")), _text(r.get("gold"))) for r in result["records"]])
            db.executemany("INSERT INTO train_log VALUES (?, ?, ?, ?)",
                           [(job_id, row["step"], row["event"], json.dumps(row, sort_keys=True))
                            for row in result.get("train_log", [])])
            db.execute("UPDATE jobs SET status = 'complete', finished_at = ?, trainable_params = ?, "
                       "params_by_component = ?, artifact_dir = ?, wall_s = ? WHERE id = ?",
                       (time.time(), result.get("trainable_params"),
                        json.dumps(result.get("params_by_component") or {}), result.get("artifact_dir"),
                        result.get("wall_s"), job_id))
        return True

    # ---------------------------------------------------------------- reading
    def jobs(self, ids: Iterable[str] | None = None) -> list[dict]:
        wanted = list(ids) if ids is not None else self.grid()
        cols = ["id", "kind", "model", "placement", "train_domain", "seed", "status", "owner", "attempts",
                "error", "trainable_params", "params_by_component", "artifact_dir", "wall_s", "spec"]
        rows = {r[0]: dict(zip(cols, r)) for r in self.db.execute(f"SELECT {', '.join(cols)} FROM jobs")}
        return [rows[i] for i in wanted if i in rows]

    def counts(self, ids: Iterable[str] | None = None) -> dict[str, int]:
        out = {"pending": 0, "running": 0, "complete": 0, "failed": 0}
        for job in self.jobs(ids):
            out[job["status"]] += 1
        return out

    def instances(self, job_id: str) -> list[tuple[str, str, int | None]]:
        return list(self.db.execute("SELECT benchmark, example_id, correct FROM instances WHERE job_id = ? "
                                    "ORDER BY rowid", (job_id,)))

    def metrics(self, job_id: str) -> dict[str, dict]:
        return {b: json.loads(s) for b, s in self.db.execute(
            "SELECT benchmark, summary FROM metrics WHERE job_id = ?", (job_id,))}

    def train_log(self, job_id: str) -> list[dict]:
        return [json.loads(d) for (d,) in self.db.execute(
            "SELECT data FROM train_log WHERE job_id = ? ORDER BY rowid", (job_id,))]

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)

