"""Resolve the base model and make model instances from it, on the configured device.

Checkpoints hold weights only (safetensors); the architecture and tokenizer always come from
the base model directory, loaded with ``from_pretrained``. Nothing here unpickles.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from llmos.model.builtin import ensure_tiny

BUILTIN_TINY = "builtin:tiny"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is '{name}' but no CUDA device is available")
    return dev


def resolve_base(name_or_path: str, data_dir: Path, seed: int = 0) -> str:
    """The local directory (or hub id) that from_pretrained loads the base model from."""
    if name_or_path == BUILTIN_TINY:
        return str(ensure_tiny(data_dir / "models", seed=seed))
    if name_or_path.startswith("builtin:"):
        raise ValueError(f"unknown built-in model '{name_or_path}' (there is only '{BUILTIN_TINY}')")
    return name_or_path


class ModelFactory:
    """Holds the base model once and makes independent copies with a checkpoint's weights."""

    def __init__(self, base: str, device: torch.device) -> None:
        hf_logging.disable_progress_bar()
        self.base = base
        self.device = device
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {base} has no EOS token; llmos packs samples with EOS between them")
        self._template: PreTrainedModel = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self._template.to(device)  # type: ignore[arg-type]  # transformers' wrapper hides nn.Module.to
        self._template.eval()

    @property
    def context_length(self) -> int:
        cfg = self._template.config
        for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def instance(self, weights: Path | None = None) -> PreTrainedModel:
        """A fresh model: the base weights, or those in ``weights`` (a safetensors file)."""
        model = copy.deepcopy(self._template)
        if weights is not None:
            load_model(model, str(weights), strict=True, device=str(self.device))
        model.eval()
        return model
