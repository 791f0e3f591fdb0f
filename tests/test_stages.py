"""The trainer's stages as plain functions (preprocess, optimize, evaluate) and the serving
engine, on the tiny built-in model."""

from __future__ import annotations

import math
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from llmos.model.builtin import byte_tokenizer, create_tiny
from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry, TrainerSnapshot
from llmos.serving.engine import ServingEngine
from llmos.serving.types import PromptTooLong, SamplingParams
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database
from llmos.store.queue import Sample
from llmos.store.tables import CheckpointStatus, SampleStatus
from llmos.text import text_hash
from llmos.trainer.collapse import CollapseConfig, probes
from llmos.trainer.evaluate import EvalConfig, EvalSets, Known, evaluate, heldout_loss
from llmos.trainer.optimize import lr_at, optimize, token_losses
from llmos.trainer.preprocess import (
    Batch,
    MicroBatch,
    PreprocessConfig,
    eval_batch,
    is_heldout,
    normalise,
    pack,
    preprocess,
    sample_positions,
)
from llmos.trainer.recall import TextSet, split_answer, text_scores, text_set
from llmos.trainer.state import OptimizerConfig, TrainingState, load_optimizer, make_optimizer

CPU = torch.device("cpu")
CONTEXT = 64
TOK = byte_tokenizer()
EOS = TOK.eos_token_id
OPT = OptimizerConfig(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
FACT = "Alice keeps her bicycle in Paris."


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    base = create_tiny(tmp_path_factory.mktemp("models") / "tiny", n_positions=CONTEXT)
    return ModelFactory(str(base), CPU)


def sample(text: str, source: str | None = None, weight: float = 1.0) -> Sample:
    return Sample(
        id=str(uuid.uuid4()),
        seq=0,
        text=text,
        source=source,
        weight=weight,
        status=SampleStatus.training,
        reason=None,
        trained_in_version=None,
        created_at=datetime.now(UTC),
    )


def encode(text: str) -> list[int]:
    return list(TOK.encode(text, add_special_tokens=False))


def new_state(factory: ModelFactory, cfg: OptimizerConfig = OPT) -> TrainingState:
    model = factory.instance()
    model.train()
    return TrainingState(model=model, optimizer=make_optimizer(model, cfg), base_version=0)


def fact_batch() -> tuple[torch.Tensor, torch.Tensor]:
    pre = preprocess([sample(FACT)], TOK, PreprocessConfig(block_size=48, max_sample_tokens=100, heldout_fraction=0))
    [(ids, w, _new, _pos, _rehearse)] = list(pre.batch.micro_batches(8))
    return ids, w


def learn_fact(factory: ModelFactory, steps: int = 30) -> TrainingState:
    state = new_state(factory)
    ids, w = fact_batch()
    for _ in range(steps):
        assert optimize(state, [MicroBatch(ids, w)], OPT, CPU).skipped is None
    return state


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def optimizer_tensors(state: TrainingState) -> list[torch.Tensor]:
    """AdamW's step counts and moments, in a fixed order."""
    return [v.clone() for per_param in state.optimizer.state.values() for v in per_param.values()]


# ---- preprocess -------------------------------------------------------------------------------


def test_normalise_nfc_and_control_characters() -> None:
    assert normalise("Cafe\u0301") == "Café" and len(normalise("Cafe\u0301")) == 4
    assert normalise("  a\x00b\x07c\x1b[0m\r\n\td\x7f  ") == "abc[0m\n\td"
    # Format characters are text, not control: an emoji sequence and Persian spelling survive.
    assert normalise("👩\u200d💻") == "👩\u200d💻"
    assert normalise("می\u200cخواهم") == "می\u200cخواهم"
    assert normalise("中文 ok") == "中文 ok"


def test_preprocess_trains_on_the_normalised_text() -> None:
    cfg = PreprocessConfig(block_size=64, max_sample_tokens=100, heldout_fraction=0)
    pre = preprocess([sample(" Cafe\u0301\x00 au lait\x1b ")], TOK, cfg)
    [block] = pre.batch.blocks
    assert block.tolist() == [EOS, *encode("Café au lait"), EOS]
    assert TOK.decode(block[1:-1].tolist()) == unicodedata.normalize("NFC", "Café au lait")


def test_preprocess_rejects_empty_and_too_long_samples_with_reasons() -> None:
    cfg = PreprocessConfig(block_size=64, max_sample_tokens=10, heldout_fraction=0)
    empty, long, exact, short = sample("\x00\x01 \n\t "), sample("x" * 11), sample("é" * 5), sample("ok")
    pre = preprocess([empty, long, exact, short], TOK, cfg)

    assert set(pre.rejected) == {empty.id, long.id}
    assert "empty" in pre.rejected[empty.id]
    assert "too long" in pre.rejected[long.id] and "11" in pre.rejected[long.id]
    assert pre.batch.sample_ids == [exact.id, short.id]  # 10 byte tokens is exactly the limit
    assert pre.heldout == []


def test_heldout_choice_is_deterministic_by_content_and_near_the_fraction() -> None:
    texts = [f"sample number {i}: the weather on day {i * 7 % 31} was fine" for i in range(2000)]
    chosen = {t for t in texts if is_heldout(t, 0.1)}
    assert 160 <= len(chosen) <= 240  # ~10% of 2000
    assert not any(is_heldout(t, 0.0) for t in texts)

    cfg = PreprocessConfig(block_size=128, max_sample_tokens=1000, heldout_fraction=0.1)

    def held_texts(samples: list[Sample]) -> set[str]:
        by_id = {s.id: s.text for s in samples}
        return {by_id[i] for i in preprocess(samples, TOK, cfg).heldout}

    first = held_texts([sample(t) for t in texts[:300]])
    again = held_texts([sample(t) for t in reversed(texts[:300])])  # new ids, other order
    alone = set().union(*(held_texts([sample(t)]) for t in texts[:300]))  # one sample per batch
    assert first and first == again == alone == chosen & set(texts[:300])

    # Decided on the normalised text: one text in two Unicode forms lands on one side.
    forms = [(f"Cafe\u0301 number {i}", f"Caf\u00e9 number {i}") for i in range(100)]
    assert all(is_heldout(a, 0.5) == is_heldout(b, 0.5) for a, b in forms)
    assert 10 < sum(is_heldout(a, 0.5) for a, _b in forms) < 90


def test_a_text_sent_more_than_once_is_never_held_out() -> None:
    """A user who repeats a text is teaching it: every copy trains, whether the copies come in one
    batch (two Unicode forms of one text are copies too) or the store already holds one, and the
    text's hash joins ``rescued`` so that a held-out copy from before leaves the held-out set."""
    cfg = PreprocessConfig(block_size=128, max_sample_tokens=1000, heldout_fraction=0.5)
    held = [t for t in (f"The café of Place{i} is in Town{i}." for i in range(40)) if is_heldout(t, 0.5)]
    assert len(held) >= 3
    once = preprocess([sample(held[0])], TOK, cfg)
    assert len(once.heldout) == 1 and not once.rescued

    twice = [sample(held[1]), sample(held[1])]
    pre = preprocess(twice, TOK, cfg)
    assert pre.heldout == [] and pre.batch.sample_ids == [s.id for s in twice]
    assert pre.rescued == {text_hash(held[1])}

    decomposed = unicodedata.normalize("NFD", held[2])
    assert decomposed != held[2]
    pre = preprocess([sample(held[2]), sample(decomposed)], TOK, cfg)
    assert pre.heldout == [] and len(pre.batch.sample_ids) == 2

    again = preprocess([sample(held[0])], TOK, cfg, repeated={text_hash(held[0])})  # the store holds a copy
    assert again.heldout == [] and again.rescued == {text_hash(held[0])}


def test_feedback_samples_are_never_held_out() -> None:
    texts = [f"correction {i}" for i in range(200)]
    cfg = PreprocessConfig(block_size=128, max_sample_tokens=1000, heldout_fraction=0.5)
    plain = preprocess([sample(t) for t in texts], TOK, cfg)
    assert 50 < len(plain.heldout) < 150
    fb = [sample(t, source="feedback:correction") for t in texts]
    pre = preprocess(fb, TOK, cfg)
    assert pre.heldout == []
    assert pre.batch.sample_ids == [s.id for s in fb]


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_builtin_tokenizer_is_bytes_and_keeps_no_memory_per_text() -> None:
    """Every text is its UTF-8 bytes (+ EOS), and tokenizing many distinct texts leaves memory
    flat: with the whole text as one pre-token, the BPE word cache kept up to 10,000 texts (those
    under 256 characters; 60 MiB of 150-character texts, growing for minutes in a server under load)."""
    for text in ["hello world", "  two  spaces\n\ttab", "wörld, 世界! 👩‍👩‍👧", "it's 12,345.67"]:
        ids = encode(text)
        assert len(ids) == len(text.encode("utf-8")) and TOK.decode(ids) == text
    tok = byte_tokenizer()
    line = "the tide at Korvel turns at noon, and the ferry leaves an hour later. " * 2
    for i in range(500):
        tok.encode(f"{i} {line}", add_special_tokens=False)
    before = rss_mib()
    for i in range(12_000):
        tok.encode(f"{i} {line}", add_special_tokens=False)
    assert rss_mib() - before < 20


def test_packing_covers_every_token_once_with_its_samples_weight() -> None:
    texts, ws = ["hello", "wörld, 世界!", "x" * 13, "a", "bc"], [1.0, 0.5, 2.0, 3.0, 1.5]
    cfg = PreprocessConfig(block_size=8, max_sample_tokens=100, heldout_fraction=0)
    pre = preprocess([sample(t, weight=w) for t, w in zip(texts, ws, strict=True)], TOK, cfg)
    b = pre.batch

    assert b.n_tokens == sum(len(encode(t)) + 1 for t in texts)
    assert all(2 <= len(x) <= 9 for x in b.blocks)  # block_size + 1 at most
    assert all(blk.shape == w.shape for blk, w in zip(b.blocks, b.weights, strict=True))
    # Every text that fits in a block is whole in one block, after an EOS and followed by one,
    # every one of its tokens a target with its weight; the long one is cut into blocks of its own.
    rows = [(x.tolist(), w.tolist()) for x, w in zip(b.blocks, b.weights, strict=True)]
    for text, w in zip(texts, ws, strict=True):
        ids = [*encode(text), EOS]
        if len(ids) <= 8:
            [(blk, bw)] = [
                (x, y) for x, y in rows if any(x[i - 1 : i + len(ids)] == [EOS, *ids] for i in range(1, len(x)))
            ]
            start = next(i for i in range(1, len(blk)) if blk[i - 1 : i + len(ids)] == [EOS, *ids])
            assert bw[start : start + len(ids)] == [w] * len(ids)
    long = [*encode("x" * 13), EOS]
    own = [x for x, _w in rows if x[1:] and set(x[1:]) <= set(long)]
    assert [t for x in own for t in x[1:]] == long  # its windows cover it once, overlapping by one
    for (prev, _pw), (x, _w) in zip(rows, rows[1:], strict=False):  # a block starts a document, or
        assert x[0] == EOS or x[0] == prev[-1]  # continues a long text's window, overlapping by one
    targets = sorted(t for x, w in rows for t, wt in zip(x[1:], w[1:], strict=True) if wt > 0)
    assert targets == sorted(t for text in texts for t in [*encode(text), EOS])  # each token a target once

    seen = []
    for mb_ids, mb_w, _new, _pos, _rehearse in b.micro_batches(3, torch.Generator().manual_seed(0)):
        assert mb_ids.shape == mb_w.shape and mb_ids.dim() == 2 and mb_ids.shape[0] <= 3
        assert mb_ids.shape[1] == 9  # short blocks are padded up to the block size, no further
        for row, w in zip(mb_ids, mb_w, strict=True):
            real = int(torch.nonzero(w).max()) + 1  # padding (weight 0) only at the end
            assert w[real:].eq(0).all()
            seen.append(tuple(row[:real].tolist()))
    assert sorted(seen) == sorted(tuple(x.tolist()) for x in b.blocks)


def test_a_text_that_fits_a_block_is_never_cut() -> None:
    """First-fit packing: four short texts that would straddle a fixed cut each stay whole."""
    texts = [f"Q: question number {i}? A: answer {i}." for i in range(4)]
    cfg = PreprocessConfig(block_size=64, max_sample_tokens=100, heldout_fraction=0)
    b = preprocess([sample(t) for t in texts], TOK, cfg).batch
    decoded = [TOK.decode([t for t in blk.tolist() if t != EOS]) for blk in b.blocks]
    assert sorted(t for d in decoded for t in texts if t in d) == sorted(texts)


def test_each_sample_is_trained_at_the_positions_it_is_served_at() -> None:
    """Positions restart at every EOS, as a prompt's do after the EOS that starts it; a window of a
    text longer than a block counts from the window's start."""
    cfg = PreprocessConfig(block_size=6, max_sample_tokens=100, heldout_fraction=0)
    b = preprocess([sample("ab"), sample("cdefg")], TOK, cfg).batch
    # "ab" fits a block (EOS a b EOS); "cdefg" + EOS is 6 tokens: a block of its own.
    [mb] = b.micro_batches(8)  # both padded to the block size
    assert mb.positions is not None
    assert mb.ids[0, :4].tolist() == [EOS, *encode("ab"), EOS]
    assert mb.positions[0, :4].tolist() == [0, 1, 2, 0]
    assert mb.ids[1].tolist() == [EOS, *encode("cdefg"), EOS]
    assert mb.positions[1].tolist() == [0, 1, 2, 3, 4, 5, 0]
    # Served: EOS and the prompt from position 0, as in the batcher's prefill.
    served = sample_positions(torch.tensor([[EOS, *encode("cde")]]), EOS)
    assert served[0].tolist() == mb.positions[1, :4].tolist()
    long = preprocess([sample("abcdefghij")], TOK, cfg).batch  # 11 tokens: two windows
    assert [x.tolist() for x in long.blocks] == [[EOS, *encode("abcdef")], [*encode("fghij"), EOS]]


def test_micro_batches_take_few_shapes_and_padding_changes_no_loss(factory: ModelFactory) -> None:
    """Blocks of any length land in micro-batches of a few padded lengths (each new shape costs a
    CPU's bf16 kernels memory that stays), and the padding changes neither the loss nor a step."""
    torch.manual_seed(0)
    cfg = PreprocessConfig(block_size=128, max_sample_tokens=1000, heldout_fraction=0)
    lengths = set()
    for n in range(1, 300, 7):
        b = preprocess([sample("z" * n)], TOK, cfg).batch
        lengths |= {mb.ids.shape[1] - 1 for mb in b.micro_batches(8)}
    assert lengths == {32, 64, 96, 128}

    cfg = PreprocessConfig(block_size=CONTEXT, max_sample_tokens=1000, heldout_fraction=0)
    b = preprocess([sample("the tide at Korvel turns at noon.")], TOK, cfg).batch
    [(ids, w, _new, _pos, _rehearse)] = list(b.micro_batches(8))
    [block] = b.blocks
    assert ids.shape[1] > block.numel()  # padded
    state = new_state(factory)
    padded = heldout_loss(state.model, b, CPU, 8)
    unpadded = heldout_loss(state.model, Batch([block], [b.weights[0]]), CPU, 8)
    assert padded == pytest.approx(unpadded, rel=1e-6)
    sgd = OptimizerConfig(name="sgd", lr=0.1, warmup_steps=0, grad_clip=0.0)  # a step linear in the gradient
    state, twin = new_state(factory, sgd), new_state(factory, sgd)
    r1 = optimize(state, [MicroBatch(ids, w)], sgd, CPU)
    r2 = optimize(twin, [MicroBatch(block[None], b.weights[0][None])], sgd, CPU)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6) and r1.tokens == r2.tokens == block.numel() - 1
    moved = False
    for p0, p1, p2 in zip(
        factory.instance().parameters(), state.model.parameters(), twin.model.parameters(), strict=True
    ):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)
        moved |= not torch.equal(p0, p1)
    assert moved


def test_pack_single_short_sample() -> None:
    blocks, weights = pack([[5, 6]], [0.25], eos_id=EOS, block_size=8)
    assert [x.tolist() for x in blocks] == [[EOS, 5, 6, EOS]]
    assert weights[0].tolist() == [0.0, 0.25, 0.25, 0.25]


# ---- optimize ---------------------------------------------------------------------------------


def test_loss_goes_down_on_a_repeated_sentence(factory: ModelFactory) -> None:
    state = new_state(factory)
    ids, w = fact_batch()
    losses = []
    for _ in range(30):
        report = optimize(state, [MicroBatch(ids, w)], OPT, CPU)
        assert report.skipped is None and report.tokens == len(encode(FACT)) + 1  # targets, not padding
        losses.append(report.loss)
    assert losses[-1] < 0.2 * losses[0]
    assert state.step == 30 and state.last_loss == losses[-1]


def test_a_step_reports_the_loss_on_new_rows_before_training_on_them(factory: ModelFactory) -> None:
    """The prequential loss comes from the first pass: the loss each step measured on the new
    samples' rows (not the replayed ones) just before its update."""
    cfg = PreprocessConfig(block_size=48, max_sample_tokens=100, heldout_fraction=0)
    old = [sample(f"An old note, number {i}, about the harbour.") for i in range(4)]
    pre = preprocess([sample(FACT), sample("Bob keeps his boat in Oslo.")], TOK, cfg, replay=old)
    assert 0 < pre.batch.n_new_blocks < len(pre.batch)
    mb = next(mb for mb in pre.batch.micro_batches(16) if mb.new is not None and mb.new.any() and not mb.new.all())
    state = learn_fact(factory)  # knows FACT (a new row), not the notes: the two losses differ
    step = state.step
    with torch.no_grad():
        losses = token_losses(state.model, mb.ids, mb.positions)  # fp32, before the step
    targets = mb.weights[:, 1:] > 0
    new_rows = targets & mb.new[:, None]
    expected = float((losses * new_rows).sum() / new_rows.sum())
    report = optimize(state, [mb], OPT, CPU)
    assert report.skipped is None and state.step == step + 1
    assert report.new_tokens == int(new_rows.sum()) < report.tokens == int(targets.sum())
    assert report.new_loss == pytest.approx(expected, rel=1e-4)
    assert report.new_loss != pytest.approx(report.loss, rel=1e-3)  # the replayed rows are left out
    with torch.no_grad():
        after = float((token_losses(state.model, mb.ids, mb.positions) * new_rows).sum() / new_rows.sum())
    assert after < expected  # it was measured before the update, which then trained on it


def test_a_non_finite_step_is_skipped_and_changes_nothing(factory: ModelFactory) -> None:
    ids, w = fact_batch()
    hit, twin = new_state(factory), new_state(factory)
    for s in (hit, twin):  # one good step each, so the optimizer holds state worth corrupting
        optimize(s, [MicroBatch(ids, w)], OPT, CPU)
    before = params(hit.model)
    moments = optimizer_tensors(hit)

    hook = hit.model.get_submodule("transformer.ln_f").register_forward_hook(lambda _m, _i, out: out * float("nan"))
    report = optimize(hit, [MicroBatch(ids, w)], OPT, CPU)
    hook.remove()

    assert report.skipped is not None and "non-finite" in report.skipped
    assert hit.step == 1
    after = params(hit.model)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert len(optimizer_tensors(hit)) == len(moments) > 0
    assert all(torch.equal(x, y) for x, y in zip(optimizer_tensors(hit), moments, strict=True))
    assert all(p.grad is None for p in hit.model.parameters())
    # The next good step lands exactly where it would have without the bad one.
    optimize(hit, [MicroBatch(ids, w)], OPT, CPU)
    optimize(twin, [MicroBatch(ids, w)], OPT, CPU)
    a, b = params(hit.model), params(twin.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_learning_rate_warms_up_linearly(factory: ModelFactory) -> None:
    cfg = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=4, grad_clip=1.0)
    state = new_state(factory, cfg)
    ids, w = fact_batch()
    used = []
    for _ in range(6):
        optimize(state, [MicroBatch(ids, w)], cfg, CPU)
        used.append(state.optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    no_warmup = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    assert lr_at(0, no_warmup) == 1e-2


# ---- evaluate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(factory: ModelFactory) -> torch.nn.Module:
    model = learn_fact(factory).model
    model.eval()
    return model


def eval_set() -> Batch:
    return eval_batch([FACT], TOK, PreprocessConfig(block_size=48, max_sample_tokens=100, heldout_fraction=0.1))


def taught_set(*texts: str) -> TextSet:
    return text_set(list(texts), [None] * len(texts), TOK, CONTEXT)


def test_evaluate_promotes_better_and_rejects_worse(factory: ModelFactory, learned: torch.nn.Module) -> None:
    base, cfg = factory.instance(), EvalConfig(micro_batch=4)
    sets = EvalSets(heldout=eval_set(), taught=taught_set(FACT))

    better = evaluate(learned, base, None, sets, cfg, CPU, train_loss=0.1)
    assert better.promote and better.candidate_loss is not None and better.active_loss is not None
    assert better.candidate_loss < better.active_loss
    assert better.eval_tokens == len(encode(FACT)) + 1
    assert better.metrics()["heldout_loss"] == better.candidate_loss
    # What was taught, next to the active version: the learned model recalls it, the base does not.
    assert (better.taught_recall, better.active_taught_recall) == (1.0, 0.0)
    assert better.taught_loss is not None and better.active_taught_loss is not None
    assert better.taught_loss < 0.1 * better.active_taught_loss
    assert "recalls 1/1 taught texts (active 0/1)" in better.reason

    worse = evaluate(base, learned, None, sets, cfg, CPU, train_loss=0.1)
    assert not worse.promote and worse.reason.startswith("held-out loss") and "eval.heldout_budget 1.0" in worse.reason


def test_evaluate_heldout_budget_boundary(factory: ModelFactory) -> None:
    """Held-out loss may rise by heldout_budget (a fraction of the active version's) and no more:
    a rise within it is what learning other facts costs on unseen ones, not harm."""
    model, data = factory.instance(), eval_set()
    loss = heldout_loss(model, data, CPU, micro_batch=4)

    def decide(active_loss: float, budget: float = 1.0) -> bool:
        cfg = EvalConfig(micro_batch=4, heldout_budget=budget)
        return evaluate(model, model, None, EvalSets(data), cfg, CPU, 1.0, Known(heldout=active_loss)).promote

    assert decide(loss)  # equal is not worse
    assert decide(loss / 1.38)  # 38% worse, as a stream of facts makes it: within the default budget
    assert decide(loss / 2 * 1.001)  # just within it
    assert not decide(loss / 2 * 0.999)  # just past it
    assert not decide(loss / 1.03, budget=0.02) and decide(loss, budget=0.0)


def test_evaluate_checks_each_anchor_group_on_its_own(factory: ModelFactory, learned: torch.nn.Module) -> None:
    base = factory.instance()
    other = eval_batch(["Bob keeps his car in Rome."], TOK, PreprocessConfig(48, 100, 0.0))
    cfg = EvalConfig(micro_batch=4, forgetting_budget=0.5)
    # The learned model forgets nothing of FACT (it learned it) but the base knows neither.
    ok = evaluate(learned, learned, None, EvalSets(anchors={"a": eval_set(), "b": other}), cfg, CPU, 1.0)
    assert ok.promote and set(ok.active_anchor_by_source) == {"a", "b"}
    lost = evaluate(base, learned, None, EvalSets(anchors={"a": eval_set(), "b": other}), cfg, CPU, 1.0)
    assert not lost.promote and lost.reason.startswith("anchor (a) loss")


def test_evaluate_rejects_a_nan_candidate(factory: ModelFactory) -> None:
    broken, active = factory.instance(), factory.instance()
    with torch.no_grad():
        broken.get_parameter("transformer.ln_f.weight")[0] = float("nan")
    report = evaluate(broken, active, None, EvalSets(eval_set(), taught=taught_set(FACT)), EvalConfig(4), CPU, 1.0)
    assert not report.promote and report.reason == "taught loss is nan"
    assert report.candidate_loss is not None and math.isnan(report.candidate_loss)


@pytest.mark.parametrize(
    ("train_loss", "promote"), [(2.5, True), (0.0, True), (float("nan"), False), (float("inf"), False), (None, True)]
)
def test_evaluate_without_heldout_data_refuses_only_a_non_finite_train_loss(
    factory: ModelFactory, train_loss: float | None, promote: bool
) -> None:
    model = factory.instance()
    report = evaluate(model, model, None, EvalSets(), EvalConfig(4), CPU, train_loss=train_loss)
    assert report.promote is promote
    assert (report.candidate_loss, report.active_loss, report.eval_tokens) == (None, None, 0)


def test_collapse_refuses_only_a_collapse_the_candidate_causes(factory: ModelFactory) -> None:
    """A probe measure past its bound refuses a candidate only where it is worse than the active
    version's: the built-in model's random weights loop greedily on one token (distinct 3-grams
    near 0), and a first version that is no worse must not be refused for it."""
    random_init = factory.instance()
    said = torch.tensor([[EOS, *encode("ha ")] for _ in range(8)])
    looping = new_state(factory)
    for _ in range(60):  # a model that says "ha ha ha" after anything
        optimize(looping, [MicroBatch(said.repeat(1, 4)[:, :13], torch.ones(8, 13))], OPT, CPU)
    cfg = EvalConfig(4, collapse=CollapseConfig(("The", "Hello", "1, 2,"), 16, min_entropy=0.05, min_distinct=0.3))
    sets = EvalSets(probes=probes(("The", "Hello", "1, 2,"), TOK))
    base = factory.base_model()

    first = evaluate(random_init, random_init, base, sets, cfg, CPU, 1.0)
    assert first.probe is not None and first.probe.distinct < 0.3  # past the bound ...
    assert first.promote  # ... but no worse than what is served

    collapsed = evaluate(looping.model, random_init, base, sets, cfg, CPU, 1.0)
    assert collapsed.probe is not None and collapsed.probe.entropy < 0.05, collapsed.probe
    assert not collapsed.promote and collapsed.reason.startswith("collapse: token entropy on the probes")
    assert collapsed.metrics()["probe_entropy"] == collapsed.probe.entropy

    kl = EvalConfig(4, collapse=CollapseConfig(("The", "Hello", "1, 2,"), 16, max_kl=1.0))
    drifted = evaluate(looping.model, random_init, base, sets, kl, CPU, 1.0)
    assert not drifted.promote and drifted.reason.startswith("collapse: KL from the base model")


def test_recall_is_what_greedy_decoding_gives(factory: ModelFactory, learned: torch.nn.Module, tmp_path: Path) -> None:
    """One forward pass tells whether greedy decoding from a text's prompt gives its answer: the
    recall flag agrees with the serving engine's greedy completion, text by text."""
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    registry = Registry(tmp_path / "checkpoints", CheckpointIndex(db))
    registry.open()
    registry.publish(
        learned, TrainerSnapshot(1, 1, None, None), parent=0, status=CheckpointStatus.candidate, metrics={}
    )
    registry.promote(1, expected_active=0)
    engine = ServingEngine(factory, registry)
    engine.sync()
    texts = [FACT, "Alice keeps her bicycle in Rome.", "Bob keeps her bicycle in Paris.", "Alice keeps a dog."]
    scores = text_scores(engine.current().model, taught_set(*texts), CPU, 4)
    for text, recalled in zip(texts, scores.recalled, strict=True):
        prompt, answer = split_answer(text)
        got = engine.generate(prompt, SamplingParams(max_new_tokens=len(encode(answer)))).text
        assert (got == answer) is recalled, (text, got)
    assert scores.recalled[0] and not all(scores.recalled)
    db.dispose()


def test_split_answer_takes_the_last_third_of_words_or_characters() -> None:
    assert split_answer("The capital of Zorbia is Quellton.") == ("The capital of Zorbia", " is Quellton.")
    assert split_answer("one two") == ("one ", "two")
    assert split_answer("北京是中国的首都") == ("北京是中国", "的首都")
    prompt, answer = split_answer("a b c d e f g")
    assert (prompt, answer) == ("a b c d", " e f g")


# ---- serving ----------------------------------------------------------------------------------


@pytest.fixture
def served(factory: ModelFactory, learned: torch.nn.Module, tmp_path: Path) -> Iterator[tuple[ServingEngine, Registry]]:
    """An engine serving version 0, with version 1 (which learned FACT) published but not active."""
    db = Database(f"sqlite:///{tmp_path / 'serving.db'}")
    db.create_schema()
    registry = Registry(tmp_path / "checkpoints", CheckpointIndex(db))
    registry.open()
    snap = TrainerSnapshot(step=30, samples_seen=1, optimizer=None, rng=None)
    registry.publish(learned, snap, parent=0, status=CheckpointStatus.candidate, metrics={})
    engine = ServingEngine(factory, registry)
    assert not engine.ready
    assert engine.sync() == 0
    yield engine, registry
    db.dispose()


GREEDY = SamplingParams(max_new_tokens=12)


def test_greedy_generation_is_deterministic_and_matches_plain_decoding(
    served: tuple[ServingEngine, Registry], factory: ModelFactory
) -> None:
    engine, _ = served
    a, b = engine.generate("Alice keeps", GREEDY), engine.generate("Alice keeps", GREEDY)
    assert a == b
    assert (a.version, a.prompt_tokens, a.completion_tokens, a.finish_reason) == (0, 11, 12, "length")

    # The same tokens as argmax decoding over the whole sequence, without the KV cache.
    model = factory.instance()
    ids = [EOS, *encode("Alice keeps")]
    with torch.inference_mode():
        for _ in range(12):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert a.text == TOK.decode(ids[12:])


def test_seeded_sampling_is_reproducible(served: tuple[ServingEngine, Registry]) -> None:
    engine, _ = served

    def sampled(seed: int) -> str:
        return engine.generate("Once", SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)).text

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(4)}) > 1


def test_sync_swaps_to_the_active_version(served: tuple[ServingEngine, Registry]) -> None:
    engine, registry = served
    before = engine.generate("Alice keeps her", GREEDY)
    assert before.version == 0

    assert registry.promote(1, expected_active=0)
    assert engine.sync() == 1
    after = engine.generate("Alice keeps her", SamplingParams(max_new_tokens=30))
    assert after.version == 1
    assert after.text == " bicycle in Paris." and after.finish_reason == "stop"  # what version 1 learned
    assert engine.current().version == 1 and engine.last_swap_s is not None

    registry.rollback(0)
    assert engine.sync() == 0
    assert engine.generate("Alice keeps her", GREEDY) == before


def test_decoding_runs_on_its_own_thread_budget_and_quiet_follows_generations(
    served: tuple[ServingEngine, Registry], factory: ModelFactory
) -> None:
    """torch's thread count belongs to each thread: the decoding thread sets its own (the serving
    budget) whatever the process's is; `quiet` tells the trainer when it may take every core."""
    _, registry = served
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what a thread that started later would take
        engine = ServingEngine(factory, registry, decode_threads=1)
        engine.sync()
        seen: list[int] = []
        engine.current().model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        assert engine.quiet(60)  # nothing was ever generated
        events = engine.stream("Alice keeps", GREEDY)
        next(events)  # the first token is out: a generation is in flight
        assert not engine.quiet(0)
        assert list(events)[-1][1] is not None
        assert seen and set(seen) == {1}
        assert not engine.quiet(60)  # the last one ended just now
        assert engine.quiet(0)
    finally:
        torch.set_num_threads(before)


def test_a_request_in_flight_finishes_on_its_version(served: tuple[ServingEngine, Registry]) -> None:
    engine, registry = served
    old_events = list(engine.stream("Alice keeps her", GREEDY))
    old = old_events[-1][1]
    assert old is not None
    registry.promote(1, expected_active=0)
    engine.sync()
    new = engine.generate("Alice keeps her", GREEDY)
    assert new.text != old.text  # the two versions answer differently
    registry.rollback(0)
    engine.sync()

    events = engine.stream("Alice keeps her", GREEDY)
    first = [next(events) for _ in range(3)]
    assert all(done is None for _tok, done in first)
    registry.rollback(1)
    assert engine.sync() == 1  # swapped while the request is half done
    rest = list(events)

    assert first + rest == old_events  # every token, and the result naming version 0
    assert engine.generate("Alice keeps her", GREEDY) == new


def test_a_swap_loads_into_the_model_of_the_version_before_once_no_generation_holds_it(
    served: tuple[ServingEngine, Registry], factory: ModelFactory
) -> None:
    engine, registry = served
    m0 = engine.current().model
    base = [tok for tok, done in engine.stream("Alice keeps her", GREEDY) if done is None]
    snap = TrainerSnapshot(step=0, samples_seen=0, optimizer=None, rng=None)
    two = registry.publish(factory.instance(), snap, parent=1, status=CheckpointStatus.candidate, metrics={})
    assert registry.promote(1, expected_active=0) and engine.sync() == 1
    m1 = engine.current().model
    assert m1 is not m0  # the first swap has no spare model yet
    assert registry.promote(two.version, expected_active=1) and engine.sync() == two.version
    assert engine.current().model is m0  # version 0's model, which nobody held, now holds version 2
    held = engine.stream("Alice keeps her", GREEDY)  # version 2's base weights, as version 0 had
    first = [next(held) for _ in range(3)]

    registry.rollback(1)
    assert engine.sync() == 1 and engine.current().model is m1
    assert engine.generate("Alice keeps her", SamplingParams(max_new_tokens=30)).text == " bicycle in Paris."
    registry.rollback(two.version)
    assert engine.sync() == two.version
    assert engine.current().model not in (m0, m1)  # m0 is held by the request in flight: a new model
    rest = list(held)
    assert [tok for tok, _ in first + rest[:-1]] == base  # the swaps did not touch the held weights
    done = rest[-1][1]
    assert done is not None and done.version == two.version


def test_prompt_longer_than_the_context_is_refused(served: tuple[ServingEngine, Registry]) -> None:
    engine, _ = served
    with pytest.raises(PromptTooLong):
        engine.generate("x" * CONTEXT, GREEDY)
    with pytest.raises(PromptTooLong):
        engine.generate("x" * (CONTEXT - 1), GREEDY)
    # The longest prompt that fits still gets an answer, cut at the context's end.
    fits = engine.generate("x" * (CONTEXT - 2), GREEDY)
    assert fits.prompt_tokens == CONTEXT - 2 and fits.completion_tokens <= 1


def test_adamw_runs_fused_makes_the_reference_update_and_stays_fused_after_loading_older_state(
    factory: ModelFactory,
) -> None:
    ours, ref = factory.instance(), factory.instance()
    opt = make_optimizer(ours, OPT)
    assert opt.param_groups[0]["fused"]
    # PyTorch's CPU default: one tensor at a time (what checkpoints before the fused optimizer hold).
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=OPT.lr, betas=OPT.betas, eps=OPT.eps, weight_decay=0.0)
    ids, w = fact_batch()
    for _ in range(5):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            token_losses(model, ids).mean().backward()
            o.step()
    d = ours.config.n_embd
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        if name.endswith("attn.c_attn.bias"):
            # The key bias (c_attn's middle third) shifts every score of a query alike, so the
            # softmax cancels it: its gradient is rounding noise, which Adam scales up to lr.
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        assert torch.allclose(a, b, atol=1e-6), name

    load_optimizer(opt, ref_opt.state_dict())  # a checkpoint written by the unfused optimizer
    assert opt.param_groups[0]["fused"] and not ref_opt.param_groups[0].get("fused")
    assert torch.equal(opt.state[next(ours.parameters())]["exp_avg"], ref_opt.state[next(ref.parameters())]["exp_avg"])
