"""The checkpoint registry: the only writer of checkpoints.

Layout under ``<data_dir>/checkpoints``::

    v000001/
      model.safetensors      weights (tied tensors handled by safetensors' save_model)
      trainer.safetensors    optimizer tensors and the torch RNG state
      trainer.json           step, samples seen, optimizer param groups, non-tensor state
      manifest.json          sha256 of every file above; written last, so its presence means complete

Each is written to a temporary directory, fsync'd, renamed into place, then recorded in the
store's checkpoint index. Version 0 is the base model itself and has no directory, and so has a
version the gate refused: it is recorded in the index (its metrics and the gate's reason) and
never written, since nothing may serve or resume from it. Nothing on the load path unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model

from llmos.store.checkpoints import CheckpointIndex, CheckpointRecord
from llmos.store.lease import LeaseLost
from llmos.store.lineage import TextKind
from llmos.store.tables import CheckpointStatus

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
MANIFEST = "manifest.json"
BASE_PATH = "base"
_DIR_RE = re.compile(r"^v(\d{6,})$")


class UnknownVersion(LookupError):
    pass


class RejectedVersion(ValueError):
    pass


class CorruptCheckpoint(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainerSnapshot:
    """What a checkpoint holds besides the weights: enough to resume training exactly."""

    step: int
    samples_seen: int
    optimizer: dict[str, Any] | None  # torch optimizer state_dict
    rng: torch.Tensor | None
    prequential_loss: float | None = None
    last_loss: float | None = None


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = tensor
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


class Registry:
    def __init__(self, root: Path, index: CheckpointIndex, keep_last: int = 5) -> None:
        self.root = root
        self.index = index
        self.keep_last = keep_last
        self._lock = threading.Lock()  # one publish / prune / rollback at a time in this process
        self._corrupt: dict[int, str] = {}  # version -> why its files fail verify(); never served

    # ---- start-up -------------------------------------------------------------------------
    def open(self, remove_leftovers: bool = True) -> None:
        """Create the layout, register version 0, remove leftovers of interrupted writes (only
        where no other process may be writing: ``remove_leftovers``) and check every version's
        files. Several processes may open one registry at once (replicas starting together)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.index.get(0, include_pruned=True) is None:
            self.index.add_unless_there(CheckpointRecord(0, None, CheckpointStatus.promoted, BASE_PATH, 0, 0, {}))
        if self.index.active_version() is None:
            self.index.activate_unless_set(0)
        if remove_leftovers:
            self.remove_leftovers()
        for rec in self.index.list():  # an incomplete or tampered checkpoint is listed as corrupt
            if not rec.path or rec.status is CheckpointStatus.rejected:
                continue  # no files to check (or, from an older llmos, files nothing will read)
            try:
                self.verify(rec.version)
            except CorruptCheckpoint:
                pass

    def remove_leftovers(self) -> None:
        """Delete what writes that never reached the index left: the writer's own job (a trainer
        that holds the store's trainer lease, or a single box before its trainer starts), since a
        write in progress looks the same until it is recorded."""
        known = {r.version for r in self.index.list() if r.path}
        for child in self.root.iterdir():
            m = _DIR_RE.match(child.name)
            if child.name.startswith(".tmp-") or (m and int(m.group(1)) not in known):
                # A write that never reached the index: never served, never listed.
                shutil.rmtree(child, ignore_errors=True)

    # ---- writing --------------------------------------------------------------------------
    def publish(
        self,
        weights: torch.nn.Module | Callable[[Path], None],
        snapshot: TrainerSnapshot,
        parent: int,
        status: CheckpointStatus,
        metrics: dict[str, Any],
        fence: int | None = None,
        texts: Mapping[str, TextKind] | None = None,
    ) -> CheckpointRecord:
        """Write a version and record it, with the ``texts`` that trained it; a trainer's
        (``fence``: its lease's token) only while it holds the trainer lease (LeaseLost otherwise:
        the files go again, nothing names them)."""
        with self._lock:
            on_disk = [int(m.group(1)) for c in self.root.iterdir() if (m := _DIR_RE.match(c.name))]
            version = max([self.index.max_version() or 0, *on_disk]) + 1
            final = self.root / version_dir_name(version)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                if isinstance(weights, torch.nn.Module):
                    save_model(weights, str(tmp / MODEL_FILE))
                else:
                    weights(tmp / MODEL_FILE)  # e.g. a LoRA adapter only
                tensors: dict[str, torch.Tensor] = {}
                meta: dict[str, Any] = {
                    "step": snapshot.step,
                    "samples_seen": snapshot.samples_seen,
                    "prequential_loss": snapshot.prequential_loss,
                    "last_loss": snapshot.last_loss,
                }
                if snapshot.optimizer is not None:
                    opt_tensors, opt_meta = _split_optimizer(snapshot.optimizer)
                    tensors.update(opt_tensors)
                    meta["optimizer"] = opt_meta
                if snapshot.rng is not None:
                    tensors["rng.torch"] = snapshot.rng
                save_file(tensors, str(tmp / TRAINER_FILE))
                (tmp / TRAINER_JSON).write_text(json.dumps(meta), encoding="utf-8")
                files = [MODEL_FILE, TRAINER_FILE, TRAINER_JSON]
                for name in files:
                    _fsync_file(tmp / name)
                manifest = {"version": version, "files": {name: _sha256(tmp / name) for name in files}}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
                _fsync_file(tmp / MANIFEST)
                _fsync_dir(tmp)
                os.rename(tmp, final)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            rec = CheckpointRecord(
                version=version,
                parent_version=parent,
                status=status,
                path=version_dir_name(version),
                step=snapshot.step,
                samples_seen=snapshot.samples_seen,
                metrics=metrics,
            )
            try:
                self.index.add(rec, fence, texts)
            except LeaseLost:
                shutil.rmtree(final, ignore_errors=True)
                raise
            return self.index.get(version) or rec

    def record_refused(
        self,
        parent: int,
        step: int,
        samples_seen: int,
        metrics: dict[str, Any],
        fence: int | None = None,
        texts: Mapping[str, TextKind] | None = None,
    ) -> CheckpointRecord:
        """A version the gate refused: a row in the index with its metrics and lineage, and no files."""
        with self._lock:
            on_disk = [int(m.group(1)) for c in self.root.iterdir() if (m := _DIR_RE.match(c.name))]
            version = max([self.index.max_version() or 0, *on_disk]) + 1
            rec = CheckpointRecord(version, parent, CheckpointStatus.rejected, "", step, samples_seen, metrics)
            self.index.add(rec, fence, texts)
            return self.index.get(version) or rec

    def promote(self, version: int, expected_active: int, fence: int | None = None) -> bool:
        """Make a candidate the active version, unless the active version moved meanwhile, or (for
        a trainer: ``fence``, its lease's token) the trainer no longer holds the trainer lease."""
        return self.index.activate(version, expected=expected_active, promote=True, fence=fence)

    def reject(self, version: int) -> None:
        self.index.set_status(version, CheckpointStatus.rejected)

    def rollback(self, version: int) -> CheckpointRecord:
        # A prune must not delete this version just after it became active (the fuzz test found
        # it: a 500 and a dead trainer). In this process the lock keeps them apart; against a
        # trainer in another process, the index's transactions do (activate refuses a pruned
        # version, prune keeps the active one).
        with self._lock:
            rec = self.index.get(version)
            if rec is None:
                raise UnknownVersion(version)
            if rec.status is CheckpointStatus.rejected:
                raise RejectedVersion(version)
            try:
                self.verify(version)
            except CorruptCheckpoint:
                if self.index.get(version) is None:
                    raise UnknownVersion(version) from None  # pruned meanwhile: its files went
                raise
            if not self.index.activate(version, promote=rec.status is CheckpointStatus.candidate):
                raise UnknownVersion(version)  # pruned since the get() above, by another process
            return rec

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep_last`` checkpoints, version 0 and the active one; list
        the newest ``keep_last`` refused versions besides (they count apart: a run of refusals
        never pushes out a version an admin could roll back to)."""
        with self._lock:
            gone = self.index.prune(self.keep_last)
            for rec in gone:
                if rec.path:
                    shutil.rmtree(self.root / rec.path, ignore_errors=True)
            self.remove_erased()
            return [rec.version for rec in gone]

    def remove_erased(self) -> list[int]:
        """Delete the files of erased versions (trained on a forgotten text): those still here."""
        removed = []
        for rec in self.index.erased():
            path = self.root / rec.path if rec.path else None
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)  # (the trainer's prune may remove it at the same time)
                removed.append(rec.version)
        return removed

    # ---- reading --------------------------------------------------------------------------
    def get(self, version: int) -> CheckpointRecord:
        rec = self.index.get(version)
        if rec is None:
            raise UnknownVersion(version)
        return rec

    def list(self) -> list[CheckpointRecord]:
        """Live checkpoints, newest first; those whose files failed verification carry ``corrupt``."""
        corrupt = dict(self._corrupt)
        return [replace(r, corrupt=corrupt[r.version]) if r.version in corrupt else r for r in self.index.list()]

    def corrupt_versions(self) -> dict[int, str]:
        """Versions found corrupt (at open or on a later load), with the reason."""
        return dict(self._corrupt)

    def active_version(self) -> int:
        v = self.index.active_version()
        return 0 if v is None else v

    def lineage(self, version: int) -> set[int]:
        """The version and all its ancestors."""
        parents = self.index.parents()
        out: set[int] = set()
        v: int | None = version
        while v is not None and v not in out:
            out.add(v)
            v = parents.get(v)
        return out

    def verify(self, version: int, names: tuple[str, ...] | None = None) -> None:
        """Check every file (or the ``names`` listed) against the manifest; raise CorruptCheckpoint
        if anything is off. Loading checks what it loads: serving the weights (a third of an AdamW
        checkpoint's bytes), the trainer the rest; startup and rollback check everything."""
        if version == 0:
            return
        try:
            self._check_files(version, names)
        except CorruptCheckpoint as exc:
            self._corrupt[version] = str(exc)
            raise
        if names is None:
            self._corrupt.pop(version, None)

    def _check_files(self, version: int, names: tuple[str, ...] | None) -> None:
        d = self.root / version_dir_name(version)
        try:
            manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"version {version}: no readable manifest ({exc})") from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise CorruptCheckpoint(f"version {version}: the manifest does not list {MODEL_FILE}")
        for name, digest in files.items():
            if names is not None and name not in names:
                continue
            p = d / name
            if not p.is_file() or _sha256(p) != digest:
                raise CorruptCheckpoint(f"version {version}: {name} is missing or does not match its checksum")

    def weights_path(self, version: int) -> Path | None:
        """The weights file of a version (verified), or None for version 0 (the base weights)."""
        if version == 0:
            self.get(0)
            return None
        rec = self.get(version)
        self.verify(version, (MODEL_FILE,))
        return self.root / rec.path / MODEL_FILE

    def trainer_snapshot(self, version: int) -> TrainerSnapshot:
        """Optimizer state and counters saved with a version (empty for version 0)."""
        if version == 0:
            return TrainerSnapshot(step=0, samples_seen=0, optimizer=None, rng=None)
        rec = self.get(version)
        self.verify(version, (TRAINER_FILE, TRAINER_JSON))
        d = self.root / rec.path
        meta = json.loads((d / TRAINER_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(d / TRAINER_FILE))
        optimizer = _join_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
        return TrainerSnapshot(
            step=int(meta["step"]),
            samples_seen=int(meta["samples_seen"]),
            optimizer=optimizer,
            rng=tensors.get("rng.torch"),
            prequential_loss=meta.get("prequential_loss"),
            last_loss=meta.get("last_loss"),
        )
