"""Change notices between processes on one PostgreSQL store: a writer NOTIFYs a channel in its
transaction (delivered when it commits, never when it rolls back), a listener LISTENs on a
connection of its own. A notice can be missed (a listener's connection drops, a notice sent
meanwhile is lost), so listeners keep polling as the fallback. SQLite has none of this: there the
poll alone serves.

ACTIVE_CHANNEL: the active version changed (a promotion, a rollback); API replicas listen."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from llmos.store.db import Database

log = logging.getLogger(__name__)

ACTIVE_CHANNEL = "llmos_active_version"
RETRY_S = 1.0  # a lost listening connection is opened again after this (the poll serves meanwhile)
WAIT_S = 1.0  # how long a listener waits for a notice before it looks at ``stop`` again


def notify(s: Session, db: Database, channel: str, payload: str) -> None:
    """In the caller's transaction: notify ``channel`` once it commits (PostgreSQL; nothing on SQLite)."""
    if not db.is_sqlite:
        s.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})


def listen(db: Database, channel: str, notified: Callable[[], None], stop: threading.Event) -> None:
    """Until ``stop`` is set: call ``notified()`` for each notice on ``channel``, and once after
    each (re)connection, for what was committed while nobody listened. Blocks: run it in a thread.
    On SQLite it returns at once."""
    if db.is_sqlite:
        return
    import psycopg  # the PostgreSQL driver (llmos/store/db.py picks it): not needed on SQLite
    from psycopg import sql

    url = make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)
    failing = False  # say once that listening failed, and once that it works again
    while not stop.is_set():
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                if failing:
                    log.info("listening on %s again", channel)
                failing = False
                notified()
                while not stop.is_set():
                    for _notice in conn.notifies(timeout=WAIT_S):
                        notified()
        except psycopg.Error as exc:
            if not failing:
                log.warning("cannot listen on %s (polling meanwhile): %s", channel, exc)
            failing = True
            stop.wait(RETRY_S)
