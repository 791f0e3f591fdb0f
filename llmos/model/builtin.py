"""The embedded default model: a tiny GPT-2-style causal LM with a byte-level tokenizer.

Created once (random initialisation, fixed seed) and saved with ``save_pretrained``; from then on
it loads through the same ``from_pretrained`` path as any Hugging Face model directory.
The tokenizer's vocabulary is the 256 byte symbols plus EOS and has no merges, so any UTF-8 text
(Chinese included) round-trips exactly and no file is fetched from anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
TINY_SHAPE: dict[str, Any] = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 1024}
# No dropout: online learning sees each fact a few times and must pick it up quickly, and
# training then draws nothing from the global RNG (exact resume stays simple).
NO_DROPOUT: dict[str, Any] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# Written beside the weights create_tiny makes: they are random, so there is nothing the base knew
# to keep (base rehearsal's auto mode reads it). A model saved elsewhere after training lacks it.
RANDOM_WEIGHTS = "llmos-random-weights.json"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    vocab[EOS] = len(vocab)  # id 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # Split into words first: without merges the tokens are the same bytes either way, but the BPE
    # model caches each pre-token, and a whole text as one pre-token made that cache hold up to
    # 10,000 texts (memory grew for minutes under load).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def create_tiny(target: Path, seed: int = 0, **shape: int) -> Path:
    """Write the tiny model and tokenizer to ``target`` (atomically: temp dir, then rename)."""
    tokenizer = byte_tokenizer()
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        # GPT-2's own activation (tanh-approximated GELU) as one fused kernel instead of the
        # five-operation Python version: the same function; a training step ran 6-23% faster here.
        activation_function="gelu_pytorch_tanh",
        **NO_DROPOUT,
        **{**TINY_SHAPE, **shape},
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RANDOM_WEIGHTS).write_text(json.dumps({"seed": seed, "weights": "random, as initialised"}) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process starting on this data directory made it first (the same seed gives
            # the same weights): keep theirs.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def has_random_weights(name_or_path: str) -> bool:
    """Whether the model is llmos's own random initialisation: the built-in model, or a directory
    create_tiny wrote (the scaling bench's larger shapes) and nothing has trained since."""
    return name_or_path.startswith("builtin:") or (Path(name_or_path) / RANDOM_WEIGHTS).is_file()


def ensure_tiny(models_dir: Path, seed: int = 0) -> Path:
    target = models_dir / "builtin-tiny"
    if not (target / "config.json").exists():
        create_tiny(target, seed=seed)
    return target
