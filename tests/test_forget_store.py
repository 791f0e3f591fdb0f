"""Forgetting in the store (llmos/store/forget.py), on SQLite and PostgreSQL: what a forget job
sends back to train, what it erases and what it leaves alone. Versions are made here as the
trainer makes them (claim a batch, record the version with its lineage, acknowledge, promote),
without training: what is checked is the bookkeeping."""

from __future__ import annotations

from sqlalchemy import select

from llmos.store.checkpoints import CheckpointIndex, CheckpointRecord
from llmos.store.db import Database
from llmos.store.forget import ForgetJobs, ForgetRequest
from llmos.store.generations import GenerationLog
from llmos.store.lineage import TextKind
from llmos.store.queue import NewSample, SampleQueue
from llmos.store.tables import CheckpointStatus, FeedbackRow, GenerationRow, PreferenceRow, SampleRow


def base(index: CheckpointIndex) -> None:
    index.add(CheckpointRecord(0, None, CheckpointStatus.promoted, "base", 0, 0, {}))
    assert index.activate(0)


def train(queue: SampleQueue, index: CheckpointIndex, texts: list[str], version: int) -> list[str]:
    """Post ``texts``, claim them as one batch and promote ``version`` (parent: the active one) as
    having trained them. Returns their ids."""
    ids = queue.enqueue([NewSample(t, source="s") for t in texts])
    batch = queue.claim_batch(100, 10**6)
    assert [b.id for b in batch] == ids
    parent = index.active_version()
    rec = CheckpointRecord(version, parent, CheckpointStatus.candidate, f"v{version}", version, 0, {})
    index.add(rec, texts=dict.fromkeys(ids, TextKind.batch))
    queue.ack(ids, version)
    assert index.activate(version, expected=parent, promote=True)
    return ids


def retrain(queue: SampleQueue, index: CheckpointIndex, version: int) -> list[str]:
    """What the trainer does with the batches a job sent back: each batch claimed alone, trained
    into a version of its own. Returns the ids trained, in order."""
    done = []
    while batch := queue.claim_batch(100, 10**6):
        ids = [b.id for b in batch]
        parent = index.active_version()
        index.add(
            CheckpointRecord(version, parent, CheckpointStatus.candidate, f"v{version}", version, 0, {}),
            texts=dict.fromkeys(ids, TextKind.batch),
        )
        queue.ack(ids, version)
        assert index.activate(version, expected=parent, promote=True)
        done += ids
        version += 1
    return done


def status(db: Database, ids: list[str]) -> dict[str, str]:
    with db.read() as s:
        return dict(s.execute(select(SampleRow.id, SampleRow.status).where(SampleRow.id.in_(ids))).all())


def test_texts_of_pruned_versions_below_an_erased_one_train_again(db: Database) -> None:
    """Versions 1 and 2 are pruned (keep_last), 3 trained the text to forget, 4 is served. No
    stored ancestor is left but version 0: the store serves it, and what 1, 2 and 4 taught goes
    back to the queue, each batch alone and in order, so that nothing acknowledged is lost."""
    queue, index = SampleQueue(db), CheckpointIndex(db)
    base(index)
    one = train(queue, index, ["one a", "one b"], 1)
    two = train(queue, index, ["two a"], 2)
    three = train(queue, index, ["three a", "the secret of Ulm is 42, not 7"], 3)
    four = train(queue, index, ["four a"], 4)
    assert {r.version for r in index.prune(keep_last=2)} == {1, 2}
    job, _ = ForgetJobs(db).start(ForgetRequest(ids=(three[1],)))
    assert job.rolled_back_to == 0 and index.active_version() == 0
    assert job.erased_versions == [3, 4]
    assert job.retrain == one + two + three[:1] + four
    assert retrain(queue, index, 5) == one + two + three[:1] + four  # one batch per version, in order
    assert set(status(db, job.retrain).values()) == {"trained"}


def test_a_forget_retried_sends_nothing_back_twice(db: Database) -> None:
    """The same forget again (a client that timed out and retried), after the texts it sent back
    were trained again: nothing is erased or sent back a second time."""
    queue, index, jobs = SampleQueue(db), CheckpointIndex(db), ForgetJobs(db)
    base(index)
    first = train(queue, index, ["alpha", "forget me please, said the text"], 1)
    second = train(queue, index, ["beta"], 2)
    job, _ = jobs.start(ForgetRequest(ids=(first[1],)))
    assert job.retrain == first[:1] + second
    retrain(queue, index, 3)
    active = index.active_version()
    again, _ = jobs.start(ForgetRequest(ids=(first[1],)))
    assert (again.forgotten, again.erased_versions, again.retrain, again.rolled_back_to) == (0, [], [], None)
    assert index.active_version() == active and queue.depth() == 0


def test_a_version_trained_on_an_erased_one_is_never_served(db: Database) -> None:
    """A candidate whose parent was erased while it was trained or written (the job committed in
    between) is recorded erased, and a rollback to it is refused."""
    queue, index = SampleQueue(db), CheckpointIndex(db)
    base(index)
    ids = train(queue, index, ["the vault code of Quarnby is 7Z-4491"], 1)
    ForgetJobs(db).start(ForgetRequest(ids=(ids[0],)))
    index.add(CheckpointRecord(2, 1, CheckpointStatus.candidate, "v2", 2, 0, {}))
    assert index.statuses([2]) == {2: CheckpointStatus.erased}
    assert not index.activate(2) and index.active_version() == 0


def test_copies_are_what_recites_a_forgotten_text_not_what_shares_a_phrase(db: Database) -> None:
    """What a job deletes beside the texts: a generation by a version that learned the text and
    recites a run of it; anything that holds the text whole. What it keeps: a short text inside
    a longer word, a common phrase in a generation by a version that never saw the text, another
    user's correction that shares a phrase, and their preferences."""
    queue, index, log = SampleQueue(db), CheckpointIndex(db), GenerationLog(db)
    base(index)
    secret = "Thank you for contacting support: the override code is 7Z-Kestrel-4491."
    short = "ok"
    ids = train(queue, index, [secret, short], 1)

    def gen(prompt: str, completion: str, version: int) -> str:
        return log.record(prompt, completion, version, {}, 1, 1)

    recited = gen("What is the override code?", " The override code is 7Z-Kestrel-4491.", 1)
    whole = gen("Repeat:", f" {secret}", 0)
    booked = gen("Which word?", " book", 1)
    phrase = gen("Hi", " Thank you for contacting support: how can I help?", 0)
    corrected = gen("Hello", " hi", 0)
    log.add_feedback(corrected, None, "Thank you for contacting support: what can I do?", None)
    ForgetJobs(db).start(ForgetRequest(ids=tuple(ids)))
    with db.read() as s:
        kept = set(s.scalars(select(GenerationRow.id)))
        feedback = list(s.scalars(select(FeedbackRow.generation_id)))
        prefs = list(s.scalars(select(PreferenceRow.generation_id)))
    assert recited not in kept and whole not in kept
    assert {booked, phrase, corrected} <= kept
    assert feedback == [corrected] and prefs == [corrected]


def test_a_generation_recorded_after_its_version_was_erased_keeps_no_completion(db: Database) -> None:
    """A stream that began on a version and ended after a job erased it: its record keeps the
    prompt and the id (feedback may name it), not what the erased model said."""
    queue, index, log = SampleQueue(db), CheckpointIndex(db), GenerationLog(db)
    base(index)
    ids = train(queue, index, ["the vault code of Quarnby is 7Z-4491"], 1)
    ForgetJobs(db).start(ForgetRequest(ids=(ids[0],)))
    gid = log.record("the vault code of Quarnby is", " 7Z-4491", 1, {}, 1, 1)
    got = log.get(gid)
    assert got is not None and got.completion == "" and got.prompt == "the vault code of Quarnby is"


def test_a_promotion_that_trained_on_a_forgotten_corrections_pair_is_refused(db: Database) -> None:
    """A correction waits in the queue while its preference pair is in training; the correction is
    forgotten (the pair goes with it). The version that trained on the pair is refused at its
    promotion and erased: the trainer, on another machine, may not have heard of the job yet."""
    from llmos.store.preferences import PreferenceQueue

    index, log, prefs = CheckpointIndex(db), GenerationLog(db), PreferenceQueue(db)
    base(index)
    gid = log.record("The capital of Zorbia is", " Murl.", 0, {}, 1, 1)
    fb = log.add_feedback(gid, None, " Quellton.", NewSample("The capital of Zorbia is Quellton.", prompt_chars=24))
    (pair,) = prefs.claim(8, pairs_only=True)
    index.add(CheckpointRecord(1, 0, CheckpointStatus.candidate, "v1", 1, 0, {}), texts={pair.id: TextKind.pref})
    assert fb.sample_id is not None
    ForgetJobs(db).start(ForgetRequest(ids=(fb.sample_id,)))
    assert not index.activate(1, expected=0, promote=True)
    assert index.active_version() == 0 and index.statuses([1]) == {1: CheckpointStatus.erased}
