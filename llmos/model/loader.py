"""Resolve the base model and make model instances from it, on the configured device.

Checkpoints hold weights only (safetensors); the architecture and tokenizer always come from
the base model directory, loaded with ``from_pretrained``. Nothing here unpickles.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
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


def copy_weights(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Load a whole-model weights file into ``model``, tensor by tensor in place, with the checks of
    safetensors' ``load_model(strict=True)``: every tensor of the file names one of the model's,
    with its shape, and together they cover all of them (a tied pair is one). load_model's pass
    over the module tree is what this saves: on the built-in model a load took 3.0-3.2 against
    3.6-4.1 ms of CPU (two rounds), time that a generation in flight spends waiting for the
    interpreter lock."""
    targets = model.state_dict()
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = list(f.keys())
        unexpected = [n for n in names if n not in targets]
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names if n in targets}
        wrong = [
            f"{n} {shape} (the model's: {tuple(targets[n].shape)})"
            for n, shape in shapes.items()
            if shape != tuple(targets[n].shape)
        ]
        covered = {targets[n].data_ptr() for n in shapes}
        missing = [n for n, t in targets.items() if t.data_ptr() not in covered]
        found = (("Missing key(s)", missing), ("Unexpected key(s)", unexpected), ("size mismatch for", wrong))
        problems = [f"{what} {', '.join(keys[:3])}" for what, keys in found if keys]
        if problems:  # found before anything is copied: the model is unchanged
            raise RuntimeError(f"{path} does not fit the model: {'; '.join(problems)}")
        with torch.no_grad():
            for n in names:
                targets[n].copy_(f.get_tensor(n))


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: int
    dropout: float
    targets: list[str] | str


class ModelFactory:
    """Holds the base model once and makes independent copies with a checkpoint's weights.

    In LoRA mode the template is the base wrapped by peft with a zero-initialised adapter (so it
    computes exactly the base model), only adapter weights train, and a checkpoint's weights file
    holds the adapter alone.
    """

    def __init__(
        self, base: str, device: torch.device, lora: LoraSpec | None = None, attention: str | None = None
    ) -> None:
        hf_logging.disable_progress_bar()
        self.base = base
        self.device = device
        self.lora = lora
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {base} has no EOS token; llmos packs samples with EOS between them")
        kernels = {"attn_implementation": attention} if attention else {}  # None: the model's default
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kernels)
        self.config = model.config
        if lora is not None:
            # A fixed seed for the adapter's initialisation (without touching the caller's RNG):
            # the same config gives the same version 0 and the same training, run after run.
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                warnings.simplefilter("ignore")  # peft notes that GPT-2's Conv1D needs fan_in_fan_out
                model = get_peft_model(
                    model,  # type: ignore[arg-type]
                    LoraConfig(
                        r=lora.rank,
                        lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout,
                        target_modules=lora.targets,
                        task_type="CAUSAL_LM",
                    ),
                )
        self._template = model.to(device)
        self._template.eval()

    @property
    def context_length(self) -> int:
        for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def base_model(self) -> torch.nn.Module:
        """The base model (version 0's weights), shared and in eval mode: to read, never to train
        or load weights into (the gate compares a candidate's answers with it)."""
        return self._template

    def instance(self, weights: Path | None = None) -> torch.nn.Module:
        """A fresh model: the base weights, or those in ``weights`` (a safetensors file)."""
        model = copy.deepcopy(self._template)
        if weights is not None:
            self.load_weights(model, weights)
        model.eval()
        return model

    def load_weights(self, model: torch.nn.Module, path: Path) -> None:
        if self.lora is not None:
            result = set_peft_model_state_dict(model, load_file(str(path), device=str(self.device)))
            unexpected = list(getattr(result, "unexpected_keys", []))
            if unexpected:
                raise ValueError(f"{path} holds weights this adapter does not have: {unexpected[:3]}")
        else:
            copy_weights(model, path, self.device)

    def save_weights(self, model: torch.nn.Module, path: Path) -> None:
        """Write what a checkpoint holds: every weight, or in LoRA mode the adapter only."""
        if self.lora is not None:
            state = get_peft_model_state_dict(model)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
        else:
            save_model(model, str(path))  # handles GPT-2's tied embedding / lm_head
