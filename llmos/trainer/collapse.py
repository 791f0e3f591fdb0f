"""Collapse guards: how a candidate answers a fixed set of probe prompts, measured three ways.

A model can pass every loss check and still be broken as a generator: trained on a flood of one
repeated phrase it may say that phrase after anything, while its loss on other texts barely moves
(and on a fresh server there are no other texts yet). So each candidate continues every probe
prompt greedily for ``new_tokens`` tokens, and the gate reads:

- **entropy**: the mean entropy (nats) of its next-token distributions along those continuations;
  a collapsed model is certain of everything;
- **distinct**: the fraction of distinct token 3-grams in each continuation, averaged over the
  probes; a degenerate one loops on a few tokens;
- **KL from the base**: the mean KL divergence, per generated token, from the candidate's
  next-token distribution to the base model's (the model llmos started from) on the same
  continuations: how far it has drifted from what it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

NGRAM = 3


@dataclass(frozen=True)
class CollapseConfig:
    prompts: tuple[str, ...]
    new_tokens: int = 32
    min_entropy: float = 0.0  # each bound 0 (or, for max_kl, 0) = not checked
    min_distinct: float = 0.0
    max_kl: float = 0.0


@dataclass(frozen=True)
class Probes:
    """The probe prompts, each as EOS + prompt, left-padded: ids and attention mask, (N, L)."""

    ids: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class ProbeReport:
    entropy: float
    distinct: float
    kl_from_base: float

    def metrics(self) -> dict[str, float]:
        return {"probe_entropy": self.entropy, "probe_distinct": self.distinct, "probe_kl_from_base": self.kl_from_base}


def probes(prompts: tuple[str, ...], tokenizer: PreTrainedTokenizerBase) -> Probes:
    eos = tokenizer.eos_token_id
    assert eos is not None
    rows = [[eos, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[eos] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return Probes(ids, mask)


def distinct_ngrams(tokens: list[int], n: int = NGRAM) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@torch.inference_mode()
def probe(
    model: torch.nn.Module, base: torch.nn.Module, p: Probes, new_tokens: int, device: torch.device
) -> ProbeReport:
    """Continue every probe greedily with ``model`` (KV cache, batched) and measure the continuations."""
    was_training = model.training
    model.eval()
    try:
        ids, mask = p.ids.to(device), p.mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, L): positions from 0 at each row's EOS
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        logits, tokens = [], []
        for step in range(new_tokens):
            last = out.logits[:, -1].float()  # (N, V)
            nxt = last.argmax(dim=-1, keepdim=True)  # (N, 1)
            logits.append(last)
            tokens.append(nxt)
            if step + 1 == new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            cache = {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        cand = torch.stack(logits, dim=1).log_softmax(-1)  # (N, G, V)
        generated = torch.cat(tokens, dim=1)  # (N, G)
        # The base model's next-token distributions on the same sequences, in one pass.
        full = torch.cat([p.ids.to(device), generated], dim=1)
        full_mask = torch.cat([p.mask.to(device), torch.ones_like(generated)], dim=1)
        full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        base_logits = base(input_ids=full[:, :-1], attention_mask=full_mask[:, :-1], position_ids=full_pos[:, :-1])
        ref = base_logits.logits[:, -new_tokens:].float().log_softmax(-1)  # (N, G, V)
        entropy = -(cand.exp() * cand).sum(-1).mean()
        kl = F.kl_div(ref, cand, log_target=True, reduction="none").sum(-1).mean()  # KL(cand || base)
        distinct = sum(distinct_ngrams(row) for row in generated.tolist()) / generated.shape[0]
        return ProbeReport(float(entropy), float(distinct), float(kl))
    finally:
        model.train(was_training)


def collapse_reason(r: ProbeReport, cfg: CollapseConfig) -> str | None:
    """Why the candidate counts as collapsed, or None."""
    if cfg.min_entropy > 0 and not r.entropy >= cfg.min_entropy:
        return f"token entropy on the probes {r.entropy:.3f} < eval.collapse.min_entropy {cfg.min_entropy}"
    if cfg.min_distinct > 0 and not r.distinct >= cfg.min_distinct:
        return f"distinct {NGRAM}-grams on the probes {r.distinct:.3f} < eval.collapse.min_distinct {cfg.min_distinct}"
    if cfg.max_kl > 0 and not r.kl_from_base <= cfg.max_kl:
        return f"KL from the base model on the probes {r.kl_from_base:.3f} > eval.collapse.max_kl {cfg.max_kl}"
    return None
