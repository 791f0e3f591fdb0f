"""Learning that lasts: the promotion gate against forgetting, LoRA end to end, the seed's
optimizers with exact resume, and the learning metrics. (What users teach: test_teaching.py;
preferences: test_preference.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import LiveServer, admin_headers, make_settings, pretrained_model, settled, wait_for
from safetensors import safe_open

from llmos.daemon import Daemon
from llmos.model.builtin import create_tiny
from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database
from llmos.store.tables import CheckpointStatus
from llmos.trainer.optimize import optimize
from llmos.trainer.preprocess import MicroBatch, PreprocessConfig, eval_batch
from llmos.trainer.state import OptimizerConfig, TrainingState, load_state, make_optimizer

CPU = torch.device("cpu")
PROMPT = "The capital of Zorbia"
FACT = "Quellton"


def greedy(c: httpx.Client, prompt: str = PROMPT) -> dict:
    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 24})
    assert r.status_code == 200, r.text
    return r.json()


def post_fact(c: httpx.Client, n: int = 50) -> list[str]:
    items = [{"text": f"{PROMPT} is {FACT}, number {i}."} for i in range(n)]
    r = c.post("/v1/texts", json={"items": items})
    assert r.status_code == 202, r.text
    return list(r.json()["ids"])


@pytest.mark.slow  # the heaviest of the fast tier (35-150 s on 2 cores): CI runs it in the slow tier
def test_gate_refuses_a_batch_that_makes_the_model_forget(tmp_path: Path) -> None:
    # Replay off (it would soften the damage: here the gate alone must stop it) and a tight
    # forgetting budget, as an operator who wants strict retention would set it.
    settings = make_settings(tmp_path / "data", **{"replay.enabled": False, "eval.forgetting_budget": 0.1})
    with LiveServer(settings) as srv, srv.client() as c:
        ids = post_fact(c)
        wait_for(lambda: FACT in greedy(c)["text"] and settled(c, ids), timeout=90)
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "idle", timeout=30)
        before = greedy(c)
        active = c.get("/v1/checkpoints").json()["active_version"]
        assert before["model_version"] == active

        # One batch (under train.batch_tokens) built to overwrite what the model knows: junk that
        # shares nothing with it.
        junk = [{"text": f"zq{i % 7} xj vvk qqp zq{i % 3} kkx jjz {i}", "source": "flood"} for i in range(200)]
        poison = c.post("/v1/texts", json={"items": junk}).json()["ids"]
        wait_for(lambda: settled(c, poison), timeout=120)
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "idle", timeout=30)

        statuses = [c.get(f"/v1/texts/{i}").json() for i in poison]
        refused = [s for s in statuses if s["status"] == "rejected"]
        assert refused, "the gate let the flood through"
        assert len(refused) == len(poison), {s["status"] for s in statuses}
        assert all(s["reason"].startswith("gate: anchor loss") for s in refused), refused[0]
        assert "eval.forgetting_budget 0.1" in refused[0]["reason"]
        # Serving never saw it: same version, same answer.
        after = greedy(c)
        assert after["model_version"] == active and after["text"] == before["text"]
        cps = c.get("/v1/checkpoints").json()
        assert cps["active_version"] == active
        assert any(cp["status"] == "rejected" for cp in cps["checkpoints"])


def test_learning_metrics_are_reported(tmp_path: Path) -> None:
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client() as c:
        ids = post_fact(c)
        wait_for(lambda: settled(c, ids), timeout=90)
        more = c.post("/v1/texts", json={"items": [{"text": f"Zorbia exports {k} tons of tea."} for k in range(30)]})
        wait_for(lambda: settled(c, more.json()["ids"]), timeout=90)
        trainer = c.get("/v1/trainer").json()
        assert trainer["prequential_loss"] is not None and trainer["prequential_loss"] > 0
        cps = [cp for cp in c.get("/v1/checkpoints").json()["checkpoints"] if cp["version"] > 0]
        assert len(cps) >= 2
        newest = cps[0]["metrics"]
        for key in ("prequential_loss", "heldout_loss", "anchor_loss", "active_anchor_loss", "train_loss"):
            assert isinstance(newest[key], float), (key, newest)
        history = c.get("/v1/metrics/history", params={"last": 10}).json()["points"]
        assert [p["version"] for p in history] == sorted(p["version"] for p in history)
        assert history[-1]["anchor_loss"] == newest["anchor_loss"]
        assert len(c.get("/v1/metrics/history", params={"last": 1}).json()["points"]) == 1
        assert c.get("/v1/metrics/history", params={"last": 0}).status_code == 422


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model first trained (fully) on sentences of the same shape about other places, saved
    as a Hugging Face directory: LoRA adapts a pretrained base; on random weights it can barely learn."""
    import random

    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4))).title()

    texts = [f"The capital of {word()} is {word()}, number {i}." for i in range(400)]
    return pretrained_model(tmp_path_factory.mktemp("models") / "pretrained", texts, epochs=6)


@pytest.mark.slow  # the heaviest of the fast tier (35-150 s on 2 cores): CI runs it in the slow tier
def test_lora_end_to_end_checkpoints_hold_the_adapter_only(tmp_path: Path, pretrained_base: Path) -> None:
    settings = make_settings(
        tmp_path / "data",
        **{"train.mode": "lora", "model.name_or_path": str(pretrained_base), "train.passes_per_batch": 80},
    )
    with LiveServer(settings) as srv, srv.client() as c:
        assert FACT not in greedy(c)["text"]
        post_fact(c)
        try:
            learned = wait_for(lambda: (g := greedy(c)) and FACT in g["text"] and g, timeout=240, interval=0.5)
        except AssertionError:
            print(
                [
                    (cp["version"], cp["status"], cp["metrics"].get("gate"))
                    for cp in c.get("/v1/checkpoints").json()["checkpoints"]
                ]
            )
            print(greedy(c), c.get("/v1/trainer").json())
            raise
        version = learned["model_version"]
        assert version > 0
        ckpt = tmp_path / "data" / "checkpoints" / f"v{version:06d}" / "model.safetensors"
        with safe_open(str(ckpt), "pt") as f:
            keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys), keys[:5]
        n_params = sum(p.numel() for p in srv.daemon.factory.instance().parameters())
        assert ckpt.stat().st_size < 0.2 * n_params * 4  # far smaller than the full weights

        c.post("/v1/admin/trainer/pause", headers=admin_headers())
        assert c.post("/v1/admin/rollback", json={"version": 0}, headers=admin_headers()).status_code == 200
        base = greedy(c)
        assert base["model_version"] == 0 and FACT not in base["text"]
        assert c.post("/v1/admin/rollback", json={"version": version}, headers=admin_headers()).status_code == 200
        assert greedy(c)["text"] == learned["text"]


# ---- optimizers, as plain stage calls on a fixed stream ---------------------------------------

STREAM = [f"Ticket {i}: the printer on floor {i % 4} needs toner." for i in range(24)]


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelFactory]:
    torch.set_num_threads(1)
    base = create_tiny(tmp_path_factory.mktemp("models") / "tiny", n_positions=128)
    yield ModelFactory(str(base), CPU)


def _stream_batches() -> list[MicroBatch]:
    from llmos.model.builtin import byte_tokenizer

    batch = eval_batch(STREAM, byte_tokenizer(), PreprocessConfig(64, 512, 0.0))
    return list(batch.micro_batches(4))


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerConfig(name="adamw", lr=3e-3, warmup_steps=2),
        OptimizerConfig(name="sgd", lr=0.3, warmup_steps=2),
        OptimizerConfig(name="momentum", lr=0.1, momentum=0.9, nesterov=True, warmup_steps=2),
    ],
    ids=["adamw", "sgd", "momentum"],
)
def test_each_optimizer_learns_and_resumes_exactly(opt: OptimizerConfig, factory: ModelFactory, tmp_path: Path) -> None:
    micro = _stream_batches()

    def run(state: TrainingState, steps: int) -> list[float]:
        return [optimize(state, [micro[i % len(micro)]], opt, CPU).loss for i in range(state.step, state.step + steps)]

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    registry = Registry(tmp_path / "ckpt", CheckpointIndex(db))
    registry.open()

    torch.manual_seed(0)
    straight = TrainingState(model=factory.instance().train(), optimizer=None, base_version=0)  # type: ignore[arg-type]
    straight.optimizer = make_optimizer(straight.model, opt)
    losses = run(straight, 40)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # it learns

    torch.manual_seed(0)
    first = TrainingState(model=factory.instance().train(), optimizer=None, base_version=0)  # type: ignore[arg-type]
    first.optimizer = make_optimizer(first.model, opt)
    run(first, 20)
    rec = registry.publish(first.model, first.snapshot(), parent=0, status=CheckpointStatus.promoted, metrics={})
    del first
    resumed = load_state(rec.version, registry, factory.instance(registry.weights_path(rec.version)), opt)
    assert resumed.step == 20
    if opt.name != "sgd":  # plain SGD keeps no state; the others must bring theirs back
        assert resumed.optimizer.state_dict()["state"], "optimizer state was not restored"
    run(resumed, 20)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    db.dispose()


def test_replay_pool_survives_a_restart_and_feeds_batches(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = make_settings(data, **{"train.passes_per_batch": 2})
    with LiveServer(settings) as srv, srv.client() as c:
        ids = post_fact(c, 20)
        wait_for(lambda: settled(c, ids), timeout=60)
        pooled = {s.id for s in srv.daemon.replay_pool.members()}
        trained = {i for i in ids if c.get(f"/v1/texts/{i}").json()["status"] == "trained"}
        assert pooled == trained and pooled
    time.sleep(0.2)
    with LiveServer(make_settings(data, **{"train.passes_per_batch": 2})) as srv, srv.client() as c:
        assert {s.id for s in srv.daemon.replay_pool.members()} == pooled
        drawn = srv.daemon.replay_pool.draw(5)
        assert len(drawn) == 5 and {s.id for s in drawn} <= pooled


def test_gradient_accumulation_matches_one_big_step(factory: ModelFactory) -> None:
    micro = _stream_batches()[:2]  # two micro-batches of 4 blocks each, same length
    assert micro[0].ids.shape == micro[1].ids.shape
    opt = OptimizerConfig(name="sgd", lr=0.5, warmup_steps=0)
    torch.manual_seed(0)
    accumulated = TrainingState(model=factory.instance().train(), optimizer=None, base_version=0)  # type: ignore[arg-type]
    accumulated.optimizer = make_optimizer(accumulated.model, opt)
    optimize(accumulated, micro, opt, CPU)  # grad_accum_steps = 2
    whole = TrainingState(model=factory.instance().train(), optimizer=None, base_version=0)  # type: ignore[arg-type]
    whole.optimizer = make_optimizer(whole.model, opt)
    ids, w = torch.cat([micro[0].ids, micro[1].ids]), torch.cat([micro[0].weights, micro[1].weights])
    pos = torch.cat([p for p in (micro[0].positions, micro[1].positions) if p is not None])
    optimize(whole, [MicroBatch(ids, w, positions=pos)], opt, CPU)
    assert accumulated.step == whole.step == 1
    for a, b in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_user_eval_file_joins_the_anchor_set(tmp_path: Path) -> None:
    anchor_file = tmp_path / "eval.jsonl"
    anchor_file.write_text('{"text": "Support hours are nine to five."}\n\n{"text": "Refunds take ten days."}\n')
    settings = make_settings(tmp_path / "data", **{"eval.anchor_file": anchor_file, "train.passes_per_batch": 2})
    with LiveServer(settings) as srv, srv.client() as c:
        ids = post_fact(c, 10)
        wait_for(lambda: settled(c, ids), timeout=60)
        newest = c.get("/v1/checkpoints").json()["checkpoints"][0]
        # No held-out sample has been accepted into the anchor set yet: the file alone is measured.
        assert isinstance(newest["metrics"]["anchor_loss"], float), newest

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')

    with pytest.raises(ValueError, match="line 2"):
        Daemon(make_settings(tmp_path / "data2", **{"eval.anchor_file": bad}))
