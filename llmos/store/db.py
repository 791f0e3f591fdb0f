"""Engines and transactions for SQLite (embedded default) and PostgreSQL.

SQLite: WAL with synchronous=FULL, so an acknowledged row survives power loss; writers start
with BEGIN IMMEDIATE so a read-then-write transaction never fails with "database is locked"
(a deferred BEGIN can, whatever the busy timeout). Readers use a second engine with a plain
BEGIN so they never queue behind the write lock.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


def upsert(session: Session, table: Table | type[Any]) -> Any:
    """An INSERT on ``table`` in the session's dialect, for ``on_conflict_do_nothing`` or
    ``on_conflict_do_update`` (both SQLite and PostgreSQL spell them alike)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def normalise_url(url: str) -> str:
    """Pick the psycopg 3 driver for a bare postgresql:// URL."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


# Each SQLite connection keeps its own page cache, which fills as the database grows: at the
# default 2 MiB a connection, a server's memory grew for minutes under load (tests/test_load.py).
# The operating system caches the file anyway, so a miss here costs a copy, not a disk read.
SQLITE_CACHE_KIB = 512


def _sqlite_engine(url: str, begin: str, busy_timeout_s: float, connections: int) -> Engine:
    # A small pool, for the same reason (40 request threads each held a connection). Writers take
    # turns at the write lock anyway: waiting for a pooled connection is the same wait, in order,
    # without SQLite's sleeping busy handler.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
        pool_size=connections,
        max_overflow=0,
        pool_timeout=busy_timeout_s,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        # What is deleted or overwritten is zeroed in the file, not left in free space: a forgotten
        # text (llmos/store/forget.py) must leave no bytes behind. It costs the writes of the zeros.
        cur.execute("PRAGMA secure_delete=ON")
        cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


def _end_idle_transactions(engine: Engine, after_s: float) -> None:
    # A process paused inside a transaction (SIGSTOP, a debugger, a VM frozen) keeps its row locks
    # until it resumes: a trainer paused while renewing its lease would hold its standby off the
    # lease for as long. PostgreSQL ends such a session after ``after_s``; the process finds its
    # connection gone when it resumes (SQLite cannot do this for its one write lock, docs/limits.md).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET SESSION idle_in_transaction_session_timeout = {int(after_s * 1000)}")
        dbapi_conn.commit()


COMPACT_WAIT_S = 0.2  # how long a SQLite compaction waits for readers and writers, each try


# Words of the drivers' errors that say the store cannot be reached now (PostgreSQL down, starting
# or shutting down, a connection cut; SQLite's write lock held past the busy timeout, its disk
# failing), where a retry later can succeed. Other errors (a missing table, a bad query) are bugs.
_UNAVAILABLE = (
    "connection",
    "could not connect",
    "server closed",
    "terminating",
    "the database system is",
    "consuming input failed",
    "timeout expired",
    "database is locked",
    "disk i/o error",
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether a store error means the store cannot be reached for now (answer 503, retry later)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, OperationalError) and any(w in str(exc.orig).lower() for w in _UNAVAILABLE)


_MIGRATION_LOCK = 0x6C6C6D6F73  # "llmos": the PostgreSQL advisory lock held while the schema migrates


class StoreNotDurable(ValueError):
    """The store's settings would let an acknowledged write be lost."""


class Database:
    """Owns the engines; hands out short transactions. Repositories take one of these."""

    def __init__(self, url: str, busy_timeout_s: float = 30.0, idle_transaction_s: float = 60.0) -> None:
        self.url = normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            db_path = make_url(self.url).database
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self._write_engine = _sqlite_engine(self.url, "BEGIN IMMEDIATE", busy_timeout_s, connections=2)
            self._read_engine = _sqlite_engine(self.url, "BEGIN", busy_timeout_s, connections=8)
        else:
            # A connection that fails is replaced at its next checkout (pre-ping), and a server that
            # does not answer fails a connect in 5 s instead of hanging a request.
            self._write_engine = create_engine(
                self.url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args={"connect_timeout": 5}
            )
            if idle_transaction_s > 0:
                _end_idle_transactions(self._write_engine, idle_transaction_s)
            self._read_engine = self._write_engine
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)

    def create_schema(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` with the alembic migrations in llmos/store/migrations,
        so a data directory made by an older llmos opens in a newer one."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._migration_engine().begin() as conn:
            if not self.is_sqlite:
                # Replicas starting together: one migrates, the others wait here and then find the
                # schema current (SQLite's write lock does the same there).
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def _migration_engine(self) -> Engine:
        # Alembic manages its own transaction: on SQLite it needs the stock pysqlite behaviour,
        # without our BEGIN IMMEDIATE hook, and a plain connection is enough for a one-off.
        if self.is_sqlite:
            return create_engine(self.url)
        return self._write_engine

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success (durably, before returning) and rolls back on error."""
        with self._writer.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    def ping(self) -> None:
        with self._read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def pragma(self, name: str) -> Any:
        """Read a SQLite pragma (for start-up checks and tests)."""
        with self._write_engine.connect() as conn:
            return conn.exec_driver_sql(f"PRAGMA {name}").scalar()

    def check_durable(self) -> None:
        """Refuse to run on a SQLite store where an acknowledged write could be lost: the pragmas set
        on connect must read back as WAL and synchronous=FULL (2). PostgreSQL is durable as configured."""
        if not self.is_sqlite:
            return
        mode = str(self.pragma("journal_mode")).lower()
        sync = self.pragma("synchronous")
        if mode != "wal" or sync != 2:
            raise StoreNotDurable(
                f"the SQLite store runs with journal_mode={mode} and synchronous={sync}, not wal and 2 (FULL), "
                "so an acknowledged write could be lost on a crash or power cut; refusing to start"
            )

    def compact(self, tables: Sequence[str]) -> bool:
        """Make the database drop the old bytes of rows deleted or overwritten in ``tables``
        (forgetting). SQLite zeroes them in its pages (secure_delete), but its write-ahead log
        still holds the pages as they were: a checkpoint copies the log into the database and
        truncates it, unless a reader still uses an older snapshot (then False: try again later).
        PostgreSQL keeps old row versions in the tables until VACUUM FULL rewrites them (it locks
        each table while it does)."""
        if self.is_sqlite:
            # A connection of its own, outside the pool, that waits 0.2 s at most: a TRUNCATE
            # checkpoint holds the write lock while it waits for readers, and ingest must not wait
            # with it (nor for a pooled connection).
            path = make_url(self.url).database
            conn = sqlite3.connect(path or ":memory:", timeout=COMPACT_WAIT_S, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout={int(COMPACT_WAIT_S * 1000)}")
                busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                return int(busy) == 0
            except sqlite3.OperationalError as exc:  # locked: a writer held on past the wait
                log.debug("compact: %s", exc)
                return False
            finally:
                conn.close()
        with self._write_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as pg:
            for table in tables:
                pg.exec_driver_sql(f'VACUUM FULL "{table}"')
        return True

    def dispose(self) -> None:
        self._write_engine.dispose()
        if self._read_engine is not self._write_engine:
            self._read_engine.dispose()
