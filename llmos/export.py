"""Export a stored version as a standard Hugging Face model directory.

The directory holds the base model's architecture with the version's weights (a LoRA adapter is
merged into the base first), saved with ``save_pretrained``, and the tokenizer. llmos starts
every sequence with the EOS token (training samples are packed with EOS between them, and
serving puts EOS before the prompt); so that ``tokenizer(prompt)`` gives exactly the ids llmos
served, the exported fast tokenizer prepends EOS itself. Greedy ``generate`` on those ids then
produces what llmos produced for that version.

It reads the data directory directly (the store and the checkpoint files; it writes nothing
there), so it works whether or not a server is running.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import processors

from llmos.model.loader import ModelFactory, resolve_base
from llmos.registry.registry import Registry
from llmos.settings import Settings
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database
from llmos.wiring import lora_spec

EXPORT_INFO = "llmos_export.json"


class ExportError(ValueError):
    pass


def _prepend_eos(tokenizer: Any) -> bool:
    """Make ``tokenizer(text)`` start with EOS, as llmos does. False when it cannot (slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    backend.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, eos_id)]
    )
    return True


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _as_created(root: Path) -> None:
    """Give the export the modes of files made with open() and directories made with mkdir, under
    the umask (0644 and 0755 with the usual 022): mkdtemp made the directory 0700 and the weights
    are written 0600, so that other users, a model server's own account among them, could not read
    them."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def export_version(settings: Settings, version: int, target: Path) -> dict[str, Any]:
    """Write ``version`` to ``target`` (a new or empty directory). Returns what llmos_export.json holds."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} exists and is not an empty directory")
    if settings.store.url is None and not (settings.data_dir / "llmos.db").exists():
        raise ExportError(f"no llmos data in {settings.data_dir} (no llmos.db); pass --data-dir")
    db = Database(settings.store_url, settings.store.busy_timeout_s, settings.store.idle_transaction_s)
    try:
        # No Registry.open(): that tidies the checkpoint directory, which a running server owns.
        registry = Registry(settings.data_dir / "checkpoints", CheckpointIndex(db), settings.registry.keep_last)
        record = registry.get(version)  # UnknownVersion
        weights = registry.weights_path(version)  # verified against the manifest: CorruptCheckpoint
        base = resolve_base(settings.model.name_or_path, settings.data_dir, settings.model.seed)
        factory = ModelFactory(base, torch.device("cpu"), lora_spec(settings))
        try:
            model: Any = factory.instance(weights)
        except (RuntimeError, ValueError) as exc:
            mode = "lora" if factory.lora is not None else "full"
            raise ExportError(
                f"the weights of version {version} do not fit the model as configured (train.mode={mode}): give "
                f"export the server's configuration (--config, LLMOS_* variables). {str(exc)[:300]}"
            ) from exc
        if factory.lora is not None:
            model = model.merge_and_unload()  # the adapter folded into the base weights
        tokenizer = factory.tokenizer
        eos_first = _prepend_eos(tokenizer)
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        info = {
            "llmos_version": version,
            "status": record.status.value,
            "parent_version": record.parent_version,
            "step": record.step,
            "samples_seen": record.samples_seen,
            "metrics": record.metrics,
            "base": base,
            "lora_merged": factory.lora is not None,
            "tokenizer_prepends_eos": eos_first,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".llmos-export-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
            _as_created(tmp)
            if target.exists():
                target.rmdir()  # empty, checked above
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info
    finally:
        db.dispose()
