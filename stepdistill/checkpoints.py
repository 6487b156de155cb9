"""The checkpoint store: atomic ``checkpoint-N`` folders with a size manifest, found, checked and pruned.

A checkpoint is written to ``checkpoint-N.partial`` and renamed when complete; its manifest
(``stepdistill_checkpoint.json``, written last) lists every file with its size, so a folder cut short
by a crash, or truncated later, is recognised and passed over by ``latest``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE, EMA_WEIGHTS, METHOD_STATE = "trainer_state.json", "ema.safetensors", "method.safetensors"
CHECKPOINT_MANIFEST = "stepdistill_checkpoint.json"  # written last: the names and sizes of a checkpoint's files


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


class DiskSpaceError(CheckpointError):
    """The output disk cannot hold the run's checkpoints."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of a run, oldest first (``.partial`` ones are not listed)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    return sorted(folders, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (no manifest, a file missing or of the wrong size), or None."""
    manifest = folder / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return f"it has no {CHECKPOINT_MANIFEST} (not written by stepdistill, or cut short)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"its {CHECKPOINT_MANIFEST} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def find_checkpoint(output_dir: str | Path, request: str, warn: bool = True) -> Path | None:
    """Resolve a resume request to a complete checkpoint folder, as diffusers' training scripts do.

    ``latest`` takes the newest complete checkpoint in ``output_dir``, warning (one line each, unless
    ``warn`` is false) about newer damaged ones it passes over, and is ``None`` when the run has no
    checkpoint yet (a fresh start). A bare name (``checkpoint-40``) is a folder in ``output_dir``; any
    other request a folder path; either must be complete. Raises :class:`CheckpointError` otherwise.
    """
    if request == "latest":
        folders = list_checkpoints(output_dir)
        for folder in reversed(folders):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            if warn:
                logger.warning(f"skipping damaged checkpoint {folder}: {problem}")
        if folders:
            raise CheckpointError(f"every checkpoint in {output_dir} is damaged")
        return None
    path = Path(output_dir) / request if len(Path(request).parts) == 1 else Path(request)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is damaged: {problem}; give an older checkpoint or 'latest' "
                              "(which passes over damaged ones)")
    return path


def write_manifest(folder: Path, step: int) -> None:
    """Write the manifest last: the name and size of every file, which :func:`checkpoint_problem` checks."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def prune(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints."""
    folders = list_checkpoints(output_dir)
    for old in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(old)


def require_disk_space(output_dir: str | Path, checkpoint_bytes: int) -> None:
    """Refuse a run whose disk cannot hold two checkpoints (one being written)."""
    needed, free = 2 * checkpoint_bytes, shutil.disk_usage(output_dir).free
    if free < needed:
        raise DiskSpaceError(f"{output_dir} has {free / 1e9:.2f} GB free but checkpoints need about "
                             f"{needed / 1e9:.2f} GB (two, while one is written)")
