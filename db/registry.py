"""The one place that makes the database engine and knows the storage layout.

Storage layout under ``data_dir`` (default ``./data``, or ``$STUDIO_DATA_DIR``)::

    studio.db                      SQLite database (unless $STUDIO_DB_URL points elsewhere)
    uploads/<sha[:2]>/<sha><ext>   uploaded inputs, stored once per content hash
    results/<job id>/              finished result files of a job (+ bundle zip)
    work/<job id>/                 resumable engine state while a job runs
    tmp/                           unused (temporary files live beside their targets)
    locks/                         per-device worker lock files

SQLite runs in WAL mode with a busy timeout; :meth:`Registry.write` opens its transaction
with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of one of them failing
with "database is locked" after reading. PostgreSQL works the same way by setting one URL
(write transactions serialise on an advisory lock, so read-then-write is just as safe).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine as SAEngine
from sqlmodel import Session, SQLModel, create_engine, select

from db.models import SCHEMA_VERSION, Meta

log = logging.getLogger(__name__)

#: Seconds a SQLite connection waits for the write lock before giving up
#: (``$STUDIO_DB_BUSY_TIMEOUT_S`` or the ``busy_timeout_s`` argument of :class:`Registry` override it).
SQLITE_BUSY_TIMEOUT_S = 60.0


#: PostgreSQL advisory lock keys: every write transaction, and schema creation/migration.
PG_WRITE_LOCK = 31415926
PG_SCHEMA_LOCK = 27182818


class SchemaError(RuntimeError):
    """The database was made by another (older or newer) version of the schema."""


#: Columns schema v2 added to v1 tables: who queued a job (NULL for older jobs: the shell's), when
#: its cancel was asked for (the recorded cancel latency), and why a worker is paused.
_V2_COLUMNS = {"jobs": ("submitted_by", "cancel_requested_at"), "workers": ("message",)}


def _v1_to_v2(conn) -> None:
    """v1 → v2: add the columns of :data:`_V2_COLUMNS` that are missing (NULL for existing rows)."""
    from sqlalchemy import inspect

    from db.models import SQLModel

    for table_name, columns in _V2_COLUMNS.items():
        have = {c["name"] for c in inspect(conn).get_columns(table_name)}
        table = SQLModel.metadata.tables[table_name]
        for name in columns:
            if name not in have:
                column_type = table.c[name].type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table_name} ADD COLUMN {name} {column_type}"))


#: from-version → function(connection) that upgrades the schema by one version.
MIGRATIONS: dict[int, object] = {1: _v1_to_v2}


def _busy_timeout_s(value: float | None) -> float:
    if value is not None:
        return float(value)
    raw = os.environ.get("STUDIO_DB_BUSY_TIMEOUT_S", "").strip()
    try:
        return float(raw) if raw else SQLITE_BUSY_TIMEOUT_S
    except ValueError:
        raise ValueError(f"STUDIO_DB_BUSY_TIMEOUT_S={raw!r}: expected seconds") from None


def _make_engine(url: str, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> SAEngine:
    if url.startswith("sqlite"):
        eng = create_engine(
            url,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        )

        @event.listens_for(eng, "connect")
        def _on_connect(dbapi_conn, _record):
            # Let SQLAlchemy (not the sqlite3 module) decide when transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(eng, "begin")
        def _on_begin(conn):
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return eng
    return create_engine(url, pool_pre_ping=True)


def _redact(url: str) -> str:
    """The URL without its password, for log lines and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class Registry:
    """Database engine + storage layout of one 3DMM Studio installation.

    Args:
        url: SQLAlchemy URL. Precedence: this argument, ``$STUDIO_DB_URL``,
            ``sqlite:///<data_dir>/studio.db``.
        data_dir: root of uploads/results/work. Precedence: this argument,
            ``$STUDIO_DATA_DIR``, ``./data``.
        create: create the tables of a new, empty database (otherwise a missing schema
            is an error).
        busy_timeout_s: seconds a SQLite write waits for the lock (default
            ``$STUDIO_DB_BUSY_TIMEOUT_S`` or :data:`SQLITE_BUSY_TIMEOUT_S`).

    Opening a registry whose schema is current only reads: it never waits for the write
    lock, so ``python -m engine jobs`` and the dashboard work while a writer holds it.

    Raises:
        SchemaError: the database holds another schema version that cannot be migrated.
    """

    def __init__(self, url: str | None = None, data_dir: str | Path | None = None, *, create: bool = True,
                 busy_timeout_s: float | None = None):
        self.data_dir = Path(data_dir or os.environ.get("STUDIO_DATA_DIR") or "data").expanduser().resolve()
        self.uploads_dir = self.data_dir / "uploads"
        self.results_dir = self.data_dir / "results"
        self.work_dir = self.data_dir / "work"
        self.tmp_dir = self.data_dir / "tmp"
        self.locks_dir = self.data_dir / "locks"
        for d in (self.data_dir, self.uploads_dir, self.results_dir, self.work_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.url = url or os.environ.get("STUDIO_DB_URL") or f"sqlite:///{self.data_dir / 'studio.db'}"
        self.busy_timeout_s = _busy_timeout_s(busy_timeout_s)
        self.engine = _make_engine(self.url, self.busy_timeout_s)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_engine = (
            self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        )
        self._ensure_schema(create=create)

    def __repr__(self) -> str:
        return f"Registry(url={_redact(self.url)!r}, data_dir='{self.data_dir}')"

    # -- sessions ---------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (rolled back at the end; use :meth:`write` to change anything)."""
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
            finally:
                s.rollback()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: takes the write lock up front (``BEGIN IMMEDIATE`` on SQLite, a
        transaction-scoped advisory lock on PostgreSQL), commits on normal exit, rolls back on
        an exception. Keep it short: other writers wait for it."""
        with Session(self._write_engine, expire_on_commit=False) as s:
            try:
                if self.engine.dialect.name == "postgresql":
                    # The same discipline as SQLite's BEGIN IMMEDIATE: one writer at a time, so a
                    # read-then-write transaction never acts on a row another writer just changed.
                    s.connection().execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITE_LOCK})
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- layout -------------------------------------------------------------------------------

    def result_dir(self, job_id: int) -> Path:
        """Where a job's result files live: ``results/<job id>/``."""
        return self.results_dir / str(int(job_id))

    def state_dir(self, job_id: int) -> Path:
        """Where a running job keeps its resumable engine state: ``work/<job id>/``."""
        return self.work_dir / str(int(job_id))

    # -- schema -------------------------------------------------------------------------------

    def _schema_is_current(self) -> bool:
        """Read-only look: every table there and the recorded version is this code's."""
        with self.session() as s:
            tables = set(inspect(s.connection()).get_table_names())
            if "meta" not in tables or not set(SQLModel.metadata.tables) <= tables:
                return False
            row = s.get(Meta, "schema_version")
            return row is not None and row.value == str(SCHEMA_VERSION)

    def _ensure_schema(self, *, create: bool) -> None:
        if self._schema_is_current():  # the usual case: no write lock taken
            return
        with self.write() as s:
            conn = s.connection()
            if not self.is_sqlite:
                # One process at a time creates/migrates (PostgreSQL: transaction-scoped lock).
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_SCHEMA_LOCK})
            tables = set(inspect(conn).get_table_names())
            if "meta" not in tables:
                if tables & {"jobs", "videos"}:
                    raise SchemaError(
                        f"database {_redact(self.url)} has 3DMM Studio-like tables but no schema "
                        f"version (expected version {SCHEMA_VERSION}); it was made by an unreleased "
                        "version: move it away and let the registry create a new one"
                    )
                if not create:
                    raise SchemaError(f"database {_redact(self.url)} has no 3DMM Studio schema")
                SQLModel.metadata.create_all(conn)
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                log.info("created registry schema v%d in %s", SCHEMA_VERSION, _redact(self.url))
                return
            row = s.get(Meta, "schema_version")
            found = int(row.value) if row is not None and row.value.isdigit() else None
            if found == SCHEMA_VERSION:
                SQLModel.metadata.create_all(conn)  # tables added without a version bump (none yet)
                return
            if found is None:
                raise SchemaError(f"database {_redact(self.url)}: unreadable schema version {row!r}")
            if found > SCHEMA_VERSION:
                raise SchemaError(
                    f"database {_redact(self.url)} has schema version {found}, newer than this code's "
                    f"{SCHEMA_VERSION}: upgrade 3DMM Studio (or point STUDIO_DB_URL at another database)"
                )
            version = found
            while version < SCHEMA_VERSION:
                step = MIGRATIONS.get(version)
                if step is None:
                    raise SchemaError(
                        f"database {_redact(self.url)} has schema version {found}; this code needs "
                        f"{SCHEMA_VERSION} and has no migration from {version}: export the results you "
                        "need and start a new database"
                    )
                step(conn)
                version += 1
                log.warning("migrated registry schema from v%d to v%d", version - 1, version)
            row.value = str(SCHEMA_VERSION)
            s.add(row)

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self.session() as s:
            row = s.exec(select(Meta).where(Meta.key == "schema_version")).one()
            return int(row.value)
