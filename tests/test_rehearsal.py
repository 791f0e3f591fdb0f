"""Base rehearsal: what a pretrained base knew, and llmos never saw, survives what users teach
(llmos/trainer/rehearsal.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_settings, pretrained_model

from llmos.daemon import Daemon
from llmos.model.builtin import create_tiny
from llmos.model.loader import ModelFactory
from llmos.serving.types import SamplingParams
from llmos.store.queue import NewSample
from llmos.trainer import rehearsal
from llmos.trainer.optimize import token_losses
from llmos.trainer.rehearsal import BasePool, RehearsalConfig, sample_texts
from llmos.wiring import rehearsal_config

CPU = torch.device("cpu")
WHO = ["the clerk", "a farmer", "my aunt", "the pilot", "our cook", "the mayor"]
DID = ["painted", "sold", "found", "fixed"]
WHAT = ["a red boat", "two lamps", "the old map", "nine eggs", "a green door", "the tall chair"]


def base_corpus() -> list[tuple[str, str]]:
    """24 prompts, one right answer each: what the base model will know."""
    rng = random.Random(7)
    return [(f"{who} {did}", f" {rng.choice(WHAT)}.") for who in WHO for did in DID]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model trained on the corpus until it knows it, saved as a model directory."""
    texts = [p + a for p, a in base_corpus()]
    return pretrained_model(tmp_path_factory.mktemp("models") / "pretrained", texts, epochs=60)


def answers_right(d: Daemon) -> list[bool]:
    return [d.engine.generate(p, SamplingParams(max_new_tokens=len(a.encode()))).text == a for p, a in base_corpus()]


def taught_facts(d: Daemon) -> tuple[list[bool], list[bool], int]:
    """The corpus answers right before and after 8 made-up facts are taught (12 copies each, one
    post), and how many facts are recalled after."""
    facts = [
        (f"The capital of {n}", f" is {c}.")
        for n, c in zip(
            ["Zorbia", "Quelm", "Vantor", "Bispa", "Molk", "Tandi", "Rusk", "Feyla"],
            ["Quellton", "Darrow", "Pima", "Ostrel", "Kanto", "Verro", "Lusk", "Amber"],
            strict=True,
        )
    ]
    before = answers_right(d)
    d.ingest([NewSample(p + a) for p, a in facts for _ in range(12)])
    while d.trainer.cycle():
        pass
    after = answers_right(d)
    recalled = sum(d.engine.generate(p, SamplingParams(max_new_tokens=len(a.encode()))).text == a for p, a in facts)
    return before, after, recalled


def daemon(data_dir: Path, base: Path, mode: str) -> Daemon:
    settings = make_settings(
        data_dir,
        **{
            "model.name_or_path": str(base),
            "replay.base_rehearsal": mode,
            "runtime.trainer": "thread",  # the test drives the trainer's cycles itself
            "train.fill_wait_s": 0.0,
        },
    )
    d = Daemon(settings)
    d.start(run_trainer=False)
    return d


def test_base_rehearsal_keeps_what_a_pretrained_base_knew(tmp_path: Path, pretrained: Path) -> None:
    kept = {}
    for mode in ("off", "auto"):  # auto: on, since this base is loaded from a directory
        d = daemon(tmp_path / mode, pretrained, mode)
        try:
            before, after, recalled = taught_facts(d)
        finally:
            d.stop()
        assert sum(before) >= 20, before  # the base knows its corpus
        assert recalled >= 7, (mode, recalled)  # and learns the facts either way
        kept[mode] = sum(a for b, a in zip(before, after, strict=True) if b) / sum(before)
    print("share of the base's right answers kept:", kept)
    # Without rehearsal the batch of facts takes what the base knew (none of it, here); with it,
    # most stays (0.79 to 0.88 of it, by the torch threads the run had: the pretraining's sums
    # differ in their last bits).
    assert kept["off"] <= 0.25, kept
    assert kept["auto"] >= 0.7, kept


def test_the_pool_is_sampled_once_from_the_base_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = ModelFactory(str(create_tiny(tmp_path / "tiny")), CPU)
    model, tok = factory.base_model(), factory.tokenizer
    texts = sample_texts(model, tok, 6, 12, seed=0, device=CPU)
    assert len(texts) == 6 and texts == sample_texts(model, tok, 6, 12, seed=0, device=CPU)  # seeded
    assert texts != sample_texts(model, tok, 6, 12, seed=1, device=CPU)
    cfg = RehearsalConfig(tmp_path / "rehearsal" / "base-texts.json", "base-a", per_pass=4, pool=6, max_tokens=12)
    drawn = BasePool(cfg).draw(random.Random(0), model, tok, CPU)
    assert len(drawn) == 4 and all(s.source == rehearsal.SOURCE for s in drawn)
    kept = json.loads(cfg.path.read_text())
    assert kept["base"] == "base-a" and len(kept["texts"]) == 6

    def no_sampling(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("sampled again")

    monkeypatch.setattr(rehearsal, "sample_texts", no_sampling)  # a restart reads the file
    again = BasePool(cfg).draw(random.Random(0), model, tok, CPU)
    assert [s.text for s in again] == [s.text for s in drawn]  # the same draw: exact resume
    other = RehearsalConfig(cfg.path, "base-b", per_pass=4, pool=6, max_tokens=12)
    with pytest.raises(AssertionError, match="sampled again"):  # another base samples anew
        BasePool(other).draw(random.Random(0), model, tok, CPU)


def test_auto_rehearses_a_pretrained_base_only(tmp_path: Path) -> None:
    assert rehearsal_config(make_settings(tmp_path)) is None  # the built-in model: random weights
    pretrained = make_settings(tmp_path, **{"model.name_or_path": str(tmp_path / "some-model")})
    cfg = rehearsal_config(pretrained)
    assert (
        cfg is not None
        and cfg.per_pass == pretrained.replay.base_per_pass
        and cfg.path.parent == tmp_path / "rehearsal"
    )
    assert rehearsal_config(make_settings(tmp_path, **{"replay.base_rehearsal": "on"})) is not None
    # random weights written to a directory (the scaling bench's shapes): nothing to keep
    made = {"model.name_or_path": str(create_tiny(tmp_path / "random", n_layer=1))}
    assert rehearsal_config(make_settings(tmp_path, **made)) is None
    off = {"model.name_or_path": str(tmp_path / "some-model"), "replay.base_rehearsal": "off"}
    assert rehearsal_config(make_settings(tmp_path, **off)) is None
    no_replay = {"model.name_or_path": str(tmp_path / "some-model"), "replay.enabled": False}
    assert rehearsal_config(make_settings(tmp_path, **no_replay)) is None


def test_rehearsed_rows_learn_the_base_distribution_not_their_tokens(tmp_path: Path) -> None:
    """Distillation: a rehearsed row's loss is the KL divergence from the base's next-token
    distribution, 0 where the model is the base whatever the text says; other rows keep their
    cross-entropy."""
    factory = ModelFactory(str(create_tiny(tmp_path / "tiny")), CPU)
    base, model = factory.base_model(), factory.instance()
    ids = torch.randint(0, 256, (3, 17))  # (B, T+1): any tokens
    rows = torch.tensor([False, True, True])
    same = token_losses(model, ids, None, base, rows).detach()  # (B, T)
    assert float(same[1:].abs().max()) < 1e-5  # the base's own distribution: nothing to learn
    assert torch.allclose(same[0], token_losses(model, ids)[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = token_losses(model, ids, None, base, rows).detach()
    assert float(moved[1:].min()) > 0  # drifted: each position pays its KL
    assert not torch.allclose(moved[1:], token_losses(model, ids)[1:])  # ...not the tokens' loss
