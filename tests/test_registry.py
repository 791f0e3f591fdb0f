"""The checkpoint registry with the real store: layout on disk, publish, load back, resume,
verify, rollback, lineage and pruning."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmos.model.builtin import create_tiny
from llmos.model.loader import ModelFactory
from llmos.registry.registry import (
    MANIFEST,
    MODEL_FILE,
    TRAINER_FILE,
    TRAINER_JSON,
    CorruptCheckpoint,
    Registry,
    RejectedVersion,
    TrainerSnapshot,
    UnknownVersion,
)
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database
from llmos.store.tables import CheckpointStatus
from llmos.trainer.optimize import optimize
from llmos.trainer.preprocess import MicroBatch
from llmos.trainer.process import ApiServing
from llmos.trainer.state import OptimizerConfig, TrainingState, load_state, make_optimizer

CPU = torch.device("cpu")
OPT = OptimizerConfig(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=3, grad_clip=1.0)
NO_STATE = TrainerSnapshot(step=0, samples_seen=0, optimizer=None, rng=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    base = create_tiny(tmp_path_factory.mktemp("models") / "tiny", n_positions=64)
    return ModelFactory(str(base), CPU)


@pytest.fixture
def registry(db: Database, tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "checkpoints", CheckpointIndex(db), keep_last=2)
    reg.open()
    return reg


def batch(factory: ModelFactory) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch (2, 17) of real text, every target weighted 1."""
    eos = factory.tokenizer.eos_token_id
    text = factory.tokenizer.encode("The registry keeps every version.", add_special_tokens=False)
    ids = torch.tensor([[eos, *text[:16]], [eos, *text[10:26]]])
    return ids, torch.ones_like(ids, dtype=torch.float32)


def trained_state(factory: ModelFactory, steps: int) -> TrainingState:
    model = factory.instance()
    model.train()
    state = TrainingState(model=model, optimizer=make_optimizer(model, OPT), base_version=0)
    ids, w = batch(factory)
    for _ in range(steps):
        assert optimize(state, [MicroBatch(ids, w)], OPT, CPU).skipped is None
    return state


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_open_registers_version_0_as_active(registry: Registry) -> None:
    assert registry.active_version() == 0
    [base] = registry.list()
    assert (base.version, base.parent_version, base.status) == (0, None, CheckpointStatus.promoted)
    assert registry.weights_path(0) is None  # version 0 is the base model itself
    registry.open()  # a second start changes nothing
    assert [r.version for r in registry.list()] == [0]


def test_processes_opening_one_empty_store_together_all_start_on_version_0(db_url: str, tmp_path: Path) -> None:
    # Two API replicas and a trainer started at once on an empty PostgreSQL store: each found no
    # active version, and all but the first then failed to start on a duplicate key (the clean-clone
    # CI run of session 17). Each opener here has its own engine, as each process has.
    openers = 12
    dbs = [Database(db_url) for _ in range(openers)]
    dbs[0].create_schema()
    start = threading.Barrier(openers)
    failures: list[BaseException] = []

    def open_one(db: Database) -> None:
        reg = Registry(tmp_path / "checkpoints", CheckpointIndex(db))
        start.wait()
        try:
            reg.open(remove_leftovers=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=open_one, args=(d,)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failures == []
        index = CheckpointIndex(dbs[0])
        assert index.active_version() == 0
        assert [r.version for r in index.list()] == [0]
    finally:
        for d in dbs:
            d.dispose()


def test_open_removes_leftovers_of_interrupted_writes(
    registry: Registry, factory: ModelFactory, db: Database, tmp_path: Path
) -> None:
    kept = registry.publish(factory.instance(), NO_STATE, parent=0, status=CheckpointStatus.candidate, metrics={})
    root = registry.root
    (root / ".tmp-abc123").mkdir()
    (root / ".tmp-abc123" / MODEL_FILE).write_bytes(b"half a file")
    (root / "v000007").mkdir()  # renamed into place, but the process died before registering it
    (root / "v000007" / MANIFEST).write_text("{}")
    (root / "notes").mkdir()  # not ours to touch

    # An API replica (or a standby trainer) opening the registry while a trainer writes must not
    # take a write in progress for a leftover: it leaves them all.
    Registry(tmp_path / "checkpoints", CheckpointIndex(db)).open(remove_leftovers=False)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-abc123", "notes", "v000001", "v000007"]

    restarted = Registry(tmp_path / "checkpoints", CheckpointIndex(db))
    restarted.open()

    assert sorted(p.name for p in root.iterdir()) == ["notes", "v000001"]
    restarted.verify(kept.version)
    # The number the dead write used is free again: nothing ever served or listed it.
    again = restarted.publish(factory.instance(), NO_STATE, parent=1, status=CheckpointStatus.candidate, metrics={})
    assert again.version == 2


def test_publish_writes_a_complete_checkpoint_and_registers_it(registry: Registry, factory: ModelFactory) -> None:
    state = trained_state(factory, steps=2)
    metrics = {"heldout_loss": 4.5, "gate": "ok", "samples": 3}
    rec = registry.publish(state.model, state.snapshot(), parent=0, status=CheckpointStatus.candidate, metrics=metrics)

    assert (rec.version, rec.parent_version, rec.status) == (1, 0, CheckpointStatus.candidate)
    assert (rec.step, rec.metrics) == (2, metrics)
    assert rec.created_at is not None
    d = registry.root / rec.path
    assert sorted(p.name for p in d.iterdir()) == sorted([MODEL_FILE, TRAINER_FILE, TRAINER_JSON, MANIFEST])
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["version"] == 1
    assert sorted(manifest["files"]) == sorted([MODEL_FILE, TRAINER_FILE, TRAINER_JSON])
    assert json.loads((d / TRAINER_JSON).read_text())["step"] == 2
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")]

    rejected = registry.publish(state.model, state.snapshot(), parent=1, status=CheckpointStatus.rejected, metrics={})
    assert (rejected.version, rejected.parent_version, rejected.status) == (2, 1, CheckpointStatus.rejected)
    assert [r.version for r in registry.list()] == [2, 1, 0]
    assert registry.get(1) == rec
    assert registry.active_version() == 0  # publishing does not serve anything


def test_weights_load_back_identically(registry: Registry, factory: ModelFactory) -> None:
    state = trained_state(factory, steps=3)
    rec = registry.publish(state.model, state.snapshot(), parent=0, status=CheckpointStatus.candidate, metrics={})

    path = registry.weights_path(rec.version)
    assert path is not None
    loaded = factory.instance(path)
    saved, base, back = weights(state.model), weights(factory.instance()), weights(loaded)
    assert saved.keys() == back.keys()
    for name in saved:
        assert torch.equal(saved[name], back[name]), name
    assert any(not torch.equal(saved[n], base[n]) for n in saved)  # training changed something
    # The tied embedding / output matrix is still one tensor, so further training keeps them equal.
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_a_weights_file_that_does_not_fit_the_model_is_refused_before_anything_is_copied(
    registry: Registry, factory: ModelFactory, tmp_path: Path
) -> None:
    """A swap loads into a model in place: a file with a tensor of another shape, a missing one or
    one the model does not have is an error that names it."""
    state = trained_state(factory, steps=1)
    rec = registry.publish(state.model, state.snapshot(), parent=0, status=CheckpointStatus.candidate, metrics={})
    good = registry.weights_path(rec.version)
    assert good is not None
    tensors = load_file(str(good))
    name = next(n for n in tensors if n.endswith("attn.c_attn.weight"))
    bad = {
        "shape": ({**tensors, name: tensors[name][:, :-1].contiguous()}, rf"size mismatch for {name} \(128, 383\)"),
        "missing": ({k: v for k, v in tensors.items() if k != name}, rf"Missing key\(s\) {name}$"),
        "extra": ({**tensors, "bogus.weight": torch.zeros(2)}, r"Unexpected key\(s\) bogus.weight$"),
    }
    for what, (content, message) in bad.items():
        model = factory.instance()
        before = weights(model)
        save_file(content, str(tmp_path / f"{what}.safetensors"))
        with pytest.raises(RuntimeError, match=message):
            factory.load_weights(model, tmp_path / f"{what}.safetensors")
        assert all(torch.equal(before[n], t) for n, t in weights(model).items()), what  # nothing copied


def test_optimizer_state_round_trips_and_resumes_identically(registry: Registry, factory: ModelFactory) -> None:
    torch.manual_seed(1234)
    state = trained_state(factory, steps=2)
    state.samples_seen = 5
    saved_opt = state.optimizer.state_dict()
    rec = registry.publish(state.model, state.snapshot(), parent=0, status=CheckpointStatus.candidate, metrics={})

    snap = registry.trainer_snapshot(rec.version)
    assert (snap.step, snap.samples_seen) == (2, 5)
    assert snap.optimizer is not None and snap.rng is not None
    assert torch.equal(snap.rng, torch.get_rng_state())
    assert snap.optimizer["state"].keys() == saved_opt["state"].keys()
    for idx, per_param in saved_opt["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(snap.optimizer["state"][idx][key]), torch.as_tensor(value)), (idx, key)

    # The original keeps training one more step; a resumed copy does the same from the checkpoint.
    ids, w = batch(factory)
    path = registry.weights_path(rec.version)
    resumed = load_state(rec.version, registry, factory.instance(path), OPT)
    assert (resumed.step, resumed.samples_seen, resumed.base_version) == (2, 5, 1)
    fresh_model = factory.instance(path)
    fresh_model.train()
    fresh = TrainingState(fresh_model, make_optimizer(fresh_model, OPT), base_version=1, step=2)

    for s in (state, resumed, fresh):
        assert optimize(s, [MicroBatch(ids, w)], OPT, CPU).skipped is None

    a, b, c = weights(state.model), weights(resumed.model), weights(fresh.model)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-6, atol=1e-7), name
    # Without the saved moments the same step lands elsewhere: the state is what made them agree.
    assert any(not torch.allclose(a[n], c[n], rtol=1e-4, atol=1e-6) for n in a)


def test_verify_catches_a_flipped_byte_and_a_missing_manifest(registry: Registry, factory: ModelFactory) -> None:
    model = factory.instance()
    one = registry.publish(model, NO_STATE, parent=0, status=CheckpointStatus.candidate, metrics={})
    two = registry.publish(model, NO_STATE, parent=0, status=CheckpointStatus.candidate, metrics={})
    registry.verify(one.version)
    registry.verify(two.version)

    f = registry.root / one.path / MODEL_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=MODEL_FILE):
        registry.verify(one.version)
    with pytest.raises(CorruptCheckpoint):
        registry.weights_path(one.version)  # so serving never loads it
    with pytest.raises(CorruptCheckpoint):
        registry.rollback(one.version)
    assert registry.active_version() == 0

    (registry.root / two.path / MANIFEST).unlink()
    with pytest.raises(CorruptCheckpoint, match="manifest"):
        registry.verify(two.version)


def test_each_load_checks_the_files_it_reads(registry: Registry, factory: ModelFactory) -> None:
    """Serving reads the weights alone (a swap hashes a third of an AdamW checkpoint); the trainer
    reads the optimizer state too and is refused a damaged one; a full check lists the version."""
    state = trained_state(factory, 2)
    rec = registry.publish(state.model, state.snapshot(), parent=0, status=CheckpointStatus.candidate, metrics={})
    f = registry.root / rec.path / TRAINER_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert registry.weights_path(rec.version) == registry.root / rec.path / MODEL_FILE
    assert rec.version not in registry.corrupt_versions()
    with pytest.raises(CorruptCheckpoint, match=TRAINER_FILE):
        registry.trainer_snapshot(rec.version)
    assert TRAINER_FILE in registry.corrupt_versions()[rec.version]
    with pytest.raises(CorruptCheckpoint, match=TRAINER_FILE):
        registry.verify(rec.version)


def test_rollback(registry: Registry, factory: ModelFactory) -> None:
    model = factory.instance()
    good = registry.publish(model, NO_STATE, parent=0, status=CheckpointStatus.candidate, metrics={})
    bad = registry.publish(model, NO_STATE, parent=1, status=CheckpointStatus.rejected, metrics={})

    with pytest.raises(UnknownVersion):
        registry.rollback(99)
    with pytest.raises(RejectedVersion):
        registry.rollback(bad.version)
    assert registry.active_version() == 0

    assert registry.rollback(good.version).version == good.version
    assert registry.active_version() == good.version
    assert registry.get(good.version).status is CheckpointStatus.promoted
    registry.rollback(0)
    assert registry.active_version() == 0


def test_lineage_follows_parents(registry: Registry, factory: ModelFactory) -> None:
    model = factory.instance()
    for parent in (0, 1, 1, 3):  # versions 1..4; 2 and 3 branch from 1
        registry.publish(model, NO_STATE, parent=parent, status=CheckpointStatus.candidate, metrics={})

    assert registry.lineage(0) == {0}
    assert registry.lineage(2) == {0, 1, 2}
    assert registry.lineage(4) == {0, 1, 3, 4}


def test_prune_keeps_base_active_and_newest(registry: Registry, factory: ModelFactory) -> None:
    model = factory.instance()
    for v in range(1, 6):  # a chain 0 <- 1 <- ... <- 5
        registry.publish(model, NO_STATE, parent=v - 1, status=CheckpointStatus.candidate, metrics={})
    registry.rollback(2)

    removed = registry.prune()  # keep_last=2

    assert sorted(removed) == [1, 3]
    assert [r.version for r in registry.list()] == [5, 4, 2, 0]
    assert sorted(p.name for p in registry.root.iterdir()) == ["v000002", "v000004", "v000005"]
    with pytest.raises(UnknownVersion):
        registry.rollback(3)
    with pytest.raises(UnknownVersion):
        registry.get(1)
    assert registry.lineage(5) == {0, 1, 2, 3, 4, 5}  # pruned rows still link the chain
    assert registry.active_version() == 2
    assert registry.prune() == []
    # New versions never reuse a pruned number.
    assert registry.publish(model, NO_STATE, parent=5, status=CheckpointStatus.candidate, metrics={}).version == 6


def test_refused_versions_cost_no_files_and_never_push_out_servable_ones(
    registry: Registry, factory: ModelFactory
) -> None:
    """A run of refusals (one per refused post) writes no weights and counts apart from
    registry.keep_last: the versions an admin could roll back to stay, and the newest refusals
    stay listed with their reasons."""
    model = factory.instance()
    for v in (1, 2, 3):
        registry.publish(model, NO_STATE, parent=v - 1, status=CheckpointStatus.candidate, metrics={})
    registry.rollback(3)
    refused = [registry.record_refused(3, 10, 5, {"gate": f"refusal {i}"}) for i in range(6)]
    assert [r.version for r in refused] == [4, 5, 6, 7, 8, 9]
    assert all(r.status is CheckpointStatus.rejected and r.path == "" for r in refused)
    assert sorted(p.name for p in registry.root.iterdir()) == ["v000001", "v000002", "v000003"]

    registry.prune()  # keep_last=2: two servable versions and two refusals, besides 0 and the active one
    listed = {r.version: r for r in registry.list()}
    assert sorted(listed) == [0, 2, 3, 8, 9]
    assert listed[9].metrics["gate"] == "refusal 5" and not listed[9].corrupt
    assert registry.rollback(2).version == 2  # still there to roll back to
    with pytest.raises(RejectedVersion):
        registry.rollback(9)
    assert registry.publish(model, NO_STATE, parent=2, status=CheckpointStatus.candidate, metrics={}).version == 10

    reopened = Registry(registry.root, registry.index, keep_last=2)
    reopened.open()  # a refused version has no files to find missing: it is not listed as corrupt
    assert not reopened.corrupt_versions()


def test_the_trainer_processs_gate_model_follows_the_active_version_in_place(
    registry: Registry, factory: ModelFactory
) -> None:
    """runtime.trainer = process: the trainer's view of serving (ApiServing) gives the gate the
    active version's weights, loading each newer one into the model it already holds."""
    serving = ApiServing(registry, factory, None, None)  # type: ignore[arg-type]  # no promotions announced
    base = serving.current()
    assert base.version == 0
    assert serving.current() is base  # nothing changed: nothing loaded
    held = base.model
    for steps in (2, 5):
        state = trained_state(factory, steps)
        rec = registry.publish(state.model, state.snapshot(), parent=0, status=CheckpointStatus.candidate, metrics={})
        assert registry.promote(rec.version, registry.active_version())
        now = serving.current()
        assert now.version == rec.version and now.model is held  # in place
        expected, got = weights(state.model), weights(now.model)
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    registry.rollback(0)  # the base weights: a fresh model
    back = serving.current()
    assert back.version == 0
    expected, got = weights(factory.instance()), weights(back.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_rollback_to_a_version_pruned_meanwhile_is_unknown_and_changes_nothing(
    registry: Registry, factory: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process (the trainer's) prunes the version between the rollback's lookup and its
    check of the files: the rollback answers "unknown version" (404), not "corrupt", and the
    active version stays."""
    model = factory.instance()
    old = registry.publish(model, NO_STATE, parent=0, status=CheckpointStatus.candidate, metrics={})
    for _ in range(2):
        registry.publish(model, NO_STATE, parent=0, status=CheckpointStatus.candidate, metrics={})
    other = Registry(registry.root, registry.index, keep_last=1)  # the other process's registry
    verify = registry.verify

    def verify_after_a_prune(version: int, names: tuple[str, ...] | None = None) -> None:
        assert old.version in other.prune()
        verify(version, names)

    monkeypatch.setattr(registry, "verify", verify_after_a_prune)
    with pytest.raises(UnknownVersion):
        registry.rollback(old.version)
    assert registry.active_version() == 0
    assert old.version not in [r.version for r in registry.list()]
