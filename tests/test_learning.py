"""Learning that lasts: the promotion gate against forgetting, LoRA end to end, the seed's
optimizers with exact resume, feedback as a signal, and the learning metrics."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import LiveServer, admin_headers, make_settings, settled, wait_for
from safetensors import safe_open

from llmos.daemon import Daemon
from llmos.model.builtin import create_tiny
from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database
from llmos.store.queue import NewSample
from llmos.store.tables import CheckpointStatus
from llmos.trainer.evaluate import heldout_loss
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


def test_feedback_weights_and_preference_pairs(tmp_path: Path) -> None:
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client() as c:
        c.post("/v1/admin/trainer/pause", headers=admin_headers())
        g = greedy(c, "Q: how do I reset it? A:")
        gid = g["generation_id"]
        assert c.post("/v1/feedback", json={"generation_id": gid, "rating": -1.0}).status_code == 202
        assert srv.daemon.generations.preference_pairs() == []  # a bad rating alone teaches nothing yet
        fb = c.post("/v1/feedback", json={"generation_id": gid, "correction": " hold the button."}).json()
        pairs = srv.daemon.generations.preference_pairs()
        assert len(pairs) == 1
        assert pairs[0].chosen == " hold the button." and pairs[0].rejected == g["text"]
        assert pairs[0].prompt == "Q: how do I reset it? A:"
        # The correction trains as (prompt + correction), weighted above plain text.
        with srv.daemon.db.read() as s:
            from llmos.store.tables import FeedbackRow, SampleRow

            sample_id = s.get(FeedbackRow, fb["id"]).sample_id
            row = s.query(SampleRow).filter(SampleRow.id == sample_id).one()
            assert row.text == "Q: how do I reset it? A: hold the button."
            assert row.weight == 2.0
        # A positive rating makes (prompt + completion) a sample weighted by the rating.
        g2 = greedy(c, "Another prompt")
        c.post("/v1/feedback", json={"generation_id": g2["generation_id"], "rating": 0.5})
        with srv.daemon.db.read() as s:
            rated = s.query(SampleRow).filter(SampleRow.source == "feedback:rating").one()
            assert rated.weight == 0.5 and rated.text == "Another prompt" + g2["text"]


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model first trained (fully) on sentences of the same shape about other places, saved
    as a Hugging Face directory: LoRA adapts a pretrained base; on random weights it can barely learn."""
    import random

    from llmos.model.builtin import byte_tokenizer

    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4))).title()

    texts = [f"The capital of {word()} is {word()}, number {i}." for i in range(400)]
    base = create_tiny(tmp_path_factory.mktemp("models") / "tiny")
    tok = byte_tokenizer()
    factory = ModelFactory(str(base), CPU)
    model = factory.instance().train()
    cfg = OptimizerConfig(lr=3e-3, warmup_steps=10)
    state = TrainingState(model, make_optimizer(model, cfg), 0)
    batch = eval_batch(texts, tok, PreprocessConfig(128, 8192, 0.0))
    for epoch in range(6):
        for mb in batch.micro_batches(8, torch.Generator().manual_seed(epoch)):
            optimize(state, [mb], cfg, CPU)
    out = tmp_path_factory.mktemp("models") / "pretrained"
    model.save_pretrained(out)  # type: ignore[operator]
    tok.save_pretrained(out)
    return out


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
    from llmos.daemon import Daemon

    with pytest.raises(ValueError, match="line 2"):
        Daemon(make_settings(tmp_path / "data2", **{"eval.anchor_file": bad}))


def test_a_marked_state_comes_back_exactly(factory: ModelFactory) -> None:
    """The early stop goes back to its best pass: weights, optimizer moments, step and last loss,
    as they were, so that training on from there is training on from that pass."""
    opt = OptimizerConfig(name="adamw", lr=3e-3, warmup_steps=2)
    micro = _stream_batches()
    torch.manual_seed(0)
    state = TrainingState(model=factory.instance().train(), optimizer=None, base_version=0)  # type: ignore[arg-type]
    state.optimizer = make_optimizer(state.model, opt)
    for i in range(5):
        optimize(state, [micro[i % len(micro)]], opt, CPU)
    mark = state.mark()
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in state.optimizer.state_dict()["state"].items()}
    last_loss = state.last_loss
    optimize(state, [micro[5 % len(micro)]], opt, CPU)  # step 6, taken from the marked state
    from_mark = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    for i in range(6, 12):
        optimize(state, [micro[i % len(micro)]], opt, CPU)
    assert any(not torch.equal(p, from_mark[n]) for n, p in state.model.named_parameters())

    state.restore(mark)
    assert state.step == 5 and state.last_loss == last_loss
    restored = state.optimizer.state_dict()["state"]
    assert restored.keys() == moments.keys()
    for k, v in moments.items():
        for n, t in v.items():
            assert torch.equal(restored[k][n], t), (k, n)  # exp_avg, exp_avg_sq, step
    optimize(state, [micro[5 % len(micro)]], opt, CPU)  # step 6 again: the same weights as the first time
    for n, p in state.model.named_parameters():
        assert torch.equal(p, from_mark[n]), n


def test_early_stop_keeps_the_best_pass_and_the_gate_judges_lone_posts(tmp_path: Path) -> None:
    """The early stop ends a batch before its forty passes and keeps the best pass on its half of
    the held-out texts; the gate judges on the other half, and the loss it records is that of the
    weights served. A lone post then reaches serving only through the gate."""
    pairs = [("a red boat", "on Monday"), ("two lamps", "at dawn"), ("the old map", "in May")]
    warm = [
        f"{who} {did} {what} {when}."
        for who in ("the clerk", "a farmer", "my aunt", "the pilot")
        for did in ("painted", "sold", "found", "fixed")
        for what, when in pairs
    ][:40] + [f"the mayor counted {n} eggs after lunch." for n in ("nine", "six", "ten", "two")]
    lone = [  # the same words, in pairs the warm-up never had
        "the pilot sold two lamps in May.",
        "my aunt fixed the old map on Monday.",
        "a farmer found a red boat at dawn.",
        "the clerk painted two lamps on Monday.",
    ]

    def run(patience: int) -> tuple[dict, list[str]]:
        # The trainer thread: the test reads the trainer's held-out halves.
        overrides = {"train.early_stop_patience": patience, "runtime.trainer": "thread"}
        settings = make_settings(tmp_path / f"data-{patience}", **overrides)
        with LiveServer(settings) as srv, srv.client() as c:
            ids = c.post("/v1/texts", json={"items": [{"text": t} for t in warm]}).json()["ids"]
            wait_for(lambda: settled(c, ids), timeout=120)
            first = next(cp for cp in c.get("/v1/checkpoints").json()["checkpoints"] if cp["version"] == 1)
            # With the early stop on, it and the gate watch disjoint halves of the held-out texts
            # (off, the gate reads them all), and the loss the gate recorded is that of the weights
            # that were kept and served, on its texts.
            d = srv.daemon
            stop_half, gate_half = d.trainer.recent_halves()
            assert gate_half and not {x.id for x in stop_half} & {x.id for x in gate_half}
            assert bool(stop_half) == (patience > 0)
            recent = eval_batch([x.text for x in gate_half], d.factory.tokenizer, PreprocessConfig(128, 8192, 0.0))
            served = heldout_loss(d.engine.current().model, recent, CPU, 8)
            assert first["metrics"]["heldout_loss"] == pytest.approx(served, rel=1e-5)
            verdicts = []
            for text in lone:
                before = c.get("/v1/trainer").json()["active_version"]
                sid = c.post("/v1/texts", json={"text": text}).json()["ids"][0]
                wait_for(lambda sid=sid: settled(c, [sid]), timeout=120)
                st = c.get(f"/v1/texts/{sid}").json()
                after = c.get("/v1/trainer").json()["active_version"]
                verdicts.append(st["status"])
                # Served only through the gate: trained in a newer version, or refused and not served.
                if st["status"] == "trained":
                    assert st["trained_in_version"] > before and after >= st["trained_in_version"], st
                else:
                    assert st["status"] == "rejected" and st["reason"].startswith("gate: held-out loss"), st
                    assert after == before
            return first, verdicts

    full, full_verdicts = run(0)
    stopped, stopped_verdicts = run(5)
    assert full["metrics"]["passes"] == 40
    assert stopped["metrics"]["passes"] < 40
    # Whether the kept pass generalises better than the last of forty is for the gate's half to say,
    # and here it does not: on these templated texts the early stop's half (3 texts, one of them
    # the hard "mayor" sentence) levels off near pass 20 while the gate's half keeps improving
    # (session 7: held-out loss 0.34 after 25 passes against 0.18 after 40). When both runs
    # watched the same texts, the kept pass looked better by construction: it was chosen on them.
    print(
        "gate's held-out loss, forty passes:",
        full["metrics"]["heldout_loss"],
        "early stop:",
        stopped["metrics"]["heldout_loss"],
    )
    # How many lone posts pass the gate depends on the CPU. With bf16 training (AVX512-BF16, earlier
    # sessions) this test asserted that the early stop served at least 2 of the 4, more than forty
    # passes did. With fp32 (an AVX2 machine, session 5) the gate refused all 4 either way
    # (held-out loss 0.70 -> 0.96-1.02), so the verdicts are checked against the gate, not counted.
    print("lone posts, forty passes:", full_verdicts, "early stop:", stopped_verdicts)


def test_the_early_stop_and_the_gate_read_disjoint_halves_of_the_recent_held_out_texts(tmp_path: Path) -> None:
    daemons: list[Daemon] = []

    def halves(heldout: list[str], **overrides: object) -> tuple[list[str], list[str]]:
        daemon = Daemon(make_settings(tmp_path / f"data-{len(daemons)}", **{"runtime.trainer": "thread", **overrides}))
        daemons.append(daemon)
        daemon.queue.mark_heldout(daemon.ingest([NewSample(t) for t in heldout]))
        stop, gate = daemon.trainer.recent_halves()
        return [s.text for s in stop], [s.text for s in gate]

    texts = [f"held-out text number {i}." for i in range(40)]
    try:
        stop, gate = halves(texts)
        assert stop and gate and not set(stop) & set(gate)
        assert sorted(stop + gate) == sorted(texts)  # under the cap (64 each): every text, once

        # The same text in another Unicode form (NFD) or with a control character is the same
        # eval text after normalisation: it lands in the same half.
        forms = ["café au lait number 1.", unicodedata.normalize("NFD", "café au lait number 1.") + "\x07"]
        with_forms = halves(texts + forms)
        assert [sum(t in forms for t in half) for half in with_forms] in ([0, 2], [2, 0])

        # At most eval.max_samples in each half: its most recent texts, oldest first.
        capped = halves(texts, **{"eval.max_samples": 5})
        assert capped == (stop[-5:], gate[-5:])

        # While one half is empty, the gate takes them all; with the early stop off, always.
        assert halves(gate) == ([], gate) and halves(stop) == ([], stop)
        assert halves(texts, **{"train.early_stop_patience": 0, "eval.max_samples": 30}) == ([], texts[-30:])
    finally:
        for daemon in daemons:
            daemon.stop()
