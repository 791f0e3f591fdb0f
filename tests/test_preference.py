"""Preferences: feedback becomes preferences, the DPO and KTO losses are TRL's to the last digit,
preferences train against the served version, and the gate refuses a version that lowers the
preference accuracy on held-out pairs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import LiveServer, admin_headers, make_settings

from llmos.daemon import Daemon
from llmos.model.builtin import create_tiny
from llmos.serving.types import SamplingParams
from llmos.store.queue import NewSample
from llmos.store.tables import SampleStatus
from llmos.trainer.preference import (
    dpo_loss,
    kto_loss,
    preference_accuracy,
    preference_set,
    sequence_logps,
)
from llmos.trainer.recall import TextSet

CPU = torch.device("cpu")


# ---- the losses, against TRL's trainers on the same model and batch -----------------------------


@pytest.fixture
def models(tmp_path: Path) -> Iterator[tuple[Path, torch.nn.Module, torch.nn.Module]]:
    """A policy and its reference, fresh for each test: a TRL trainer adapts the models it is given."""
    from transformers import AutoModelForCausalLM

    path = create_tiny(tmp_path / "tiny")
    policy, ref = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    with torch.no_grad():  # two random models far apart, the reference the further from uniform: the
        for p, r in zip(policy.parameters(), ref.parameters(), strict=True):  # KTO reference point
            p.add_(torch.randn_like(p) * 0.02)  # (the policy's log-ratio on mismatched pairs) is > 0
            r.add_(torch.randn_like(r) * 0.08)
    yield path, policy, ref


def rows(batch: dict[str, torch.Tensor], prefix: str = "") -> TextSet:
    """TRL's collated rows as llmos's: its completion mask marks the answer."""
    ids, att, comp = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"]
    return TextSet(ids, att[:, 1:].bool(), comp[:, 1:].bool())


def test_dpo_loss_is_trls(models: tuple[Path, torch.nn.Module, torch.nn.Module], tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path, policy, ref = models
    data = Dataset.from_list(
        [
            {"prompt": "Q: how do I reset it? A:", "chosen": " hold the button.", "rejected": " no idea"},
            {"prompt": "Hi", "chosen": " there, friend", "rejected": " xx"},
            {"prompt": "The capital of Zorbia", "chosen": " is Quellton.", "rejected": " is Paris."},
        ]
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, report_to=[], beta=0.1, use_cpu=True
    )
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path)
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])  # chosen rows, then rejected
    theirs = float(trainer._compute_loss(policy, batch, return_outputs=False))
    with torch.no_grad():
        logps, ref_logps = (sequence_logps(m, rows(batch), CPU, 4) for m in (policy, ref))
    ours = float(dpo_loss(logps[:3], logps[3:], ref_logps[:3], ref_logps[3:], beta=0.1).mean())
    assert ours == pytest.approx(theirs, rel=1e-3)  # float sums in another order: ~1e-5 apart
    # ... and close enough to tell a slip: another beta, or the pairs the other way round.
    assert float(dpo_loss(logps[:3], logps[3:], ref_logps[:3], ref_logps[3:], beta=0.11).mean()) != pytest.approx(
        theirs, rel=1e-3
    )
    assert float(dpo_loss(logps[3:], logps[:3], ref_logps[3:], ref_logps[:3], beta=0.1).mean()) != pytest.approx(
        theirs, rel=1e-3
    )


def test_kto_loss_is_trls(models: tuple[Path, torch.nn.Module, torch.nn.Module], tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    path, policy, ref = models
    data = Dataset.from_list(
        [
            {"prompt": "Q: how do I reset it? A:", "completion": " hold the button.", "label": True},
            {"prompt": "Hi", "completion": " xx", "label": False},
            {"prompt": "The capital of Zorbia", "completion": " is Quellton.", "label": True},
            {"prompt": "Say", "completion": " nothing at all", "label": False},
        ]
    )
    args = KTOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], beta=0.1, use_cpu=True
    )
    trainer = KTOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path)
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    theirs = float(trainer._compute_loss(policy, batch, return_outputs=False))
    with torch.no_grad():
        logps, ref_logps = (sequence_logps(m, rows(batch), CPU, 4) for m in (policy, ref))
        kl, ref_kl = (sequence_logps(m, rows(batch, "KL_"), CPU, 4) for m in (policy, ref))
    labels = torch.as_tensor(batch["label"], dtype=torch.bool)
    ours = float(kto_loss(logps, ref_logps, labels, kl, ref_kl, beta=0.1).mean())
    assert ours == pytest.approx(theirs, rel=1e-3)  # float sums in another order: ~1e-4 apart
    # ... and close enough to tell a slip: without the KL reference point, or the labels swapped.
    assert float(kto_loss(logps, ref_logps, labels, None, None, beta=0.1).mean()) != pytest.approx(theirs, rel=1e-3)
    assert float(kto_loss(logps, ref_logps, ~labels, kl, ref_kl, beta=0.1).mean()) != pytest.approx(theirs, rel=1e-3)


# ---- feedback becomes preferences ----------------------------------------------------------------


def test_feedback_makes_preferences_and_texts(tmp_path: Path) -> None:
    """A correction teaches its text and a pair (correction over completion); a thumbs up teaches
    the completion and marks it desirable; a thumbs down only marks it undesirable."""
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client() as c:
        c.post("/v1/admin/trainer/pause", headers=admin_headers())
        d = srv.daemon

        def generate(prompt: str) -> dict:
            r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 8})
            assert r.status_code == 200, r.text
            return r.json()

        g = generate("Q: how do I reset it? A:")
        assert c.post("/v1/feedback", json={"generation_id": g["generation_id"], "rating": -1.0}).status_code == 202
        [down] = d.preferences.for_generation(g["generation_id"])
        assert (down.chosen, down.rejected, down.status) == (None, g["text"], SampleStatus.queued)
        fb = c.post("/v1/feedback", json={"generation_id": g["generation_id"], "correction": " hold the button."})
        pair = d.preferences.for_generation(g["generation_id"])[1]
        assert pair.paired and (pair.chosen, pair.rejected) == (" hold the button.", g["text"])
        assert pair.prompt == "Q: how do I reset it? A:"
        sample = d.queue.get(fb.json()["sample_id"])
        assert sample is not None and sample.text == "Q: how do I reset it? A: hold the button."
        assert sample.weight == 2.0 and sample.prompt_chars == len("Q: how do I reset it? A:")

        g2 = generate("Another prompt")
        rated = c.post("/v1/feedback", json={"generation_id": g2["generation_id"], "rating": 0.5}).json()
        [up] = d.preferences.for_generation(g2["generation_id"])
        assert (up.chosen, up.rejected) == (g2["text"], None)
        text = d.queue.get(rated["sample_id"])
        assert text is not None and text.weight == 0.5 and text.text == "Another prompt" + g2["text"]
        # "The answer was right" as a correction: no preference between two equal texts.
        g3 = generate("Third")
        c.post("/v1/feedback", json={"generation_id": g3["generation_id"], "correction": g3["text"]})
        assert d.preferences.for_generation(g3["generation_id"]) == []


# ---- preferences train, and the gate reads their accuracy ----------------------------------------


def thread_daemon(data: Path, **overrides: object) -> Daemon:
    settings = make_settings(data, **{"runtime.trainer": "thread", "runtime.torch_threads": 1, **overrides})
    daemon = Daemon(settings)
    daemon.start(run_trainer=False)
    return daemon


def drain(d: Daemon) -> None:
    while d.trainer.cycle():
        pass


PAIRS = [
    ("Q: Which port does the service use? A:", " port 8443.", " port 80."),
    ("Q: Who approves refunds? A:", " the billing team.", " nobody."),
    ("Q: Where are the logs? A:", " in /var/log/app.", " in the cloud."),
    ("Q: How long is the warranty? A:", " two years.", " forever."),
]


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_preferences_train_against_the_served_version(tmp_path: Path, loss: str) -> None:
    """Pairs posted as corrections train with the preference loss (and their texts with the
    language-model loss): every pair ends trained in the new version, whose accuracy on them is
    complete, and whose greedy answer to each prompt is the correction."""
    d = thread_daemon(tmp_path / "data", **{"feedback.preference": loss, "train.heldout_fraction": 0.0})
    try:
        gids = []
        for prompt, chosen, rejected in PAIRS:  # a served answer, rated down and corrected
            gids.append(d.generations.record(prompt, rejected, 0, {}, len(prompt), len(rejected)))
            d.feedback(gids[-1], -1.0, None)
            d.feedback(gids[-1], None, chosen)
        drain(d)
        served = d.engine.current()
        assert served.version > 0
        prefs = [p for gid in gids for p in d.preferences.for_generation(gid)]
        assert len(prefs) == 2 * len(PAIRS)  # a thumbs down and a pair each
        pairs = [p for p in prefs if p.paired]
        trains = prefs if loss == "kto" else pairs  # DPO trains pairs; a lone thumbs down waits for KTO
        assert {p.status for p in trains} == {SampleStatus.trained}
        assert {p.trained_in_version for p in trains} == {served.version}
        assert {p.status for p in prefs if p not in trains} <= {SampleStatus.queued}
        ps = preference_set(pairs, d.factory.tokenizer, 256)
        assert preference_accuracy(served.model, ps, CPU, 8) == 1.0
        for prompt, chosen, _rejected in PAIRS:
            got = d.engine.generate(prompt, SamplingParams(max_new_tokens=len(chosen.encode()))).text
            assert got == chosen, (prompt, got)
        metrics = d.registry.get(served.version).metrics
        assert metrics["preferences"] == len(trains)
    finally:
        d.stop()


def test_the_gate_refuses_a_version_that_lowers_preference_accuracy(tmp_path: Path) -> None:
    """Held-out pairs the served model gets right; then a batch of texts that teach the rejected
    answers, with replay off (replay would keep the chosen answers, trained before, and the batch
    would learn little). The candidate prefers the rejected answers: its preference accuracy on
    the held-out pairs falls, and the gate refuses it, though every loss check passes (the texts
    are learned, the held-out and anchor sets are empty)."""
    d = thread_daemon(tmp_path / "data", **{"train.heldout_fraction": 0.0, "replay.enabled": False})
    try:
        d.ingest([NewSample(prompt + chosen) for prompt, chosen, _r in PAIRS for _ in range(4)])
        drain(d)
        held = []
        for prompt, chosen, rejected in PAIRS:  # the pairs, held out: the gate's measure
            gid = d.generations.record(prompt, rejected, 0, {}, len(prompt), len(rejected))
            d.generations.add_feedback(gid, None, chosen, None)
            held += d.preferences.for_generation(gid)
        d.preferences.claim(len(held), pairs_only=True)
        d.preferences.mark_heldout([p.id for p in held])
        active = d.engine.current().version

        ids = d.ingest([NewSample(prompt + rejected) for prompt, _c, rejected in PAIRS for _ in range(4)])
        drain(d)
        assert d.engine.current().version == active
        statuses = {d.queue.get(i).status for i in ids}  # type: ignore[union-attr]
        assert statuses == {SampleStatus.rejected}
        reason = d.queue.get(ids[0]).reason  # type: ignore[union-attr]
        assert reason is not None and reason.startswith("gate: preference accuracy "), reason
        assert "< active 1.000 - eval.preference_tolerance 0.0 on 4 held-out pair(s)" in reason, reason
    finally:
        d.stop()
