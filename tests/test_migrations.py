"""The schema lives in alembic migrations applied at start: a fresh store gets exactly the tables
the code maps, and a store made by an older llmos (revision 0001, the first daemon) opens in this
one with its data intact."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import make_settings
from sqlalchemy import create_engine, inspect, text

from llmos.store.db import Database
from llmos.store.queue import NewSample, SampleQueue
from llmos.store.tables import Base
from llmos.text import text_hash


def test_migrations_build_exactly_the_mapped_schema(db_url: str) -> None:
    db = Database(db_url)
    db.create_schema()
    engine = create_engine(db.url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], diff
    engine.dispose()
    db.create_schema()  # idempotent: a second start changes nothing
    db.dispose()


def test_a_data_directory_from_the_first_release_opens(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old = Database(f"sqlite:///{data / 'llmos.db'}")
    old.create_schema("0001")  # the schema the first llmos daemon wrote
    with old.write() as s:
        s.connection().exec_driver_sql(
            "INSERT INTO samples (id, text, weight, status, created_at) "
            "VALUES ('old-1', 'written by an older llmos', 1.0, 'queued', '2026-11-01 10:00:00')"
        )
    tables = set(inspect(create_engine(old.url)).get_table_names())
    assert "reservoir_slots" not in tables and "samples" in tables
    old.dispose()

    from llmos.daemon import Daemon

    daemon = Daemon(make_settings(data))  # migrates to head on open
    sample = daemon.queue.get("old-1")
    assert sample is not None and sample.text == "written by an older llmos"
    assert daemon.queue.depth() == 1
    with daemon.db.read() as s:
        assert s.connection().execute(text("SELECT version_num FROM alembic_version")).scalar() == "0007"
    assert sample.text_hash == text_hash("written by an older llmos")  # filled in for old rows
    daemon.replay_pool.offer(["old-1"])  # a table the old schema did not have
    daemon.stop()


def test_preference_pairs_of_release_0002_become_queued_preferences(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old = Database(f"sqlite:///{data / 'llmos.db'}")
    old.create_schema("0002")
    with old.write() as s:
        conn = s.connection()
        conn.exec_driver_sql(
            "INSERT INTO generations (id, prompt, completion, model_version, params, prompt_tokens, "
            "completion_tokens, created_at) VALUES ('g-1', 'Q: reset? A:', ' no idea', 0, '{}', 3, 2, "
            "'2026-11-01 10:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO preference_pairs (generation_id, prompt, chosen, rejected, created_at) "
            "VALUES ('g-1', 'Q: reset? A:', ' hold it.', ' no idea', '2026-11-01 10:00:01')"
        )
    old.dispose()

    from llmos.daemon import Daemon

    daemon = Daemon(make_settings(data))
    [pref] = daemon.preferences.for_generation("g-1")
    assert (pref.prompt, pref.chosen, pref.rejected, pref.status.value) == (
        "Q: reset? A:",
        " hold it.",
        " no idea",
        "queued",
    )
    daemon.stop()


def test_the_counts_of_release_0003_are_counted_once_from_its_samples(db_url: str) -> None:
    old = Database(db_url)
    old.create_schema("0003")  # before the store kept counts
    rows = [
        ("q1", "queued", None),
        ("q2", "queued", None),
        ("t1", "trained", None),
        ("h1", "heldout", None),
        ("r1", "rejected", "too long: 900 tokens > 64"),
        ("r2", "rejected", "gate: held-out loss 2.31 > 2.10"),
        ("r3", "rejected", "gate: held-out loss 2.40 > 2.10"),
        ("r4", "rejected", None),
    ]
    with old.write() as s:
        for sid, status, reason in rows:
            s.connection().execute(
                text(
                    "INSERT INTO samples (id, text, weight, status, reason, created_at) "
                    "VALUES (:id, :text, 1.0, :status, :reason, '2026-11-01 10:00:00')"
                ),
                {"id": sid, "text": f"text {sid}", "status": status, "reason": reason},
            )
    old.dispose()

    db = Database(db_url)
    db.create_schema()
    queue = SampleQueue(db)
    counts = queue.counts()
    assert counts.by_status == {"queued": 2, "trained": 1, "heldout": 1, "rejected": 4}
    assert counts.rejected_by_reason == {"too_long": 1, "gate": 2, "other": 1}
    queue.enqueue([NewSample("after the upgrade")])  # and kept from there on
    assert queue.depth() == 3
    db.dispose()
