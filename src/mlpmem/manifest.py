"""Stage manifests: what a finished stage wrote, and the per-shard progress of one still running.

Every stage writes ``config.json`` (its resolved settings) and, last of all,
``manifest.json`` (what went in, what came out, sizes, hashes, versions). A
folder without ``manifest.json`` is unfinished: the stage that owns it may
resume it, nobody else may read it. Folder rules are in :mod:`mlpmem.folders`,
file records and their checks in :mod:`mlpmem.files`.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.files import MANIFEST, check_file, file_records, load_npy, read_json, write_json
from mlpmem.folders import MARKER, _a, marked_kind, package_version, release_lock

log = logging.getLogger(__name__)


def environment() -> dict[str, str]:
    """Versions that change numbers: recorded in every manifest."""
    import torch

    env = {"mlpmem": package_version(), "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    for name in ("transformers", "faiss"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # optional at this stage
            pass
    return env


PROGRESS = "progress-{:05d}.json"  # one record per finished shard, written after its files: a recorded shard is whole


def save_shard_record(folder: Path, shard: int, record: dict[str, Any]) -> None:
    """Mark ``shard`` finished (its files already written); any process may write any shard's record."""
    write_json(Path(folder) / PROGRESS.format(shard), record)


def finished_shards(folder: Path, shards: list[int], what: str) -> dict[int, dict[str, Any]]:
    """The finished shards among ``shards``: their records, checked against their files (a damaged one is left out, to be redone).

    Reads the per-shard records, and the single ``progress.json`` that earlier versions wrote for all shards.
    """
    folder = Path(folder)
    legacy = folder / "progress.json"
    old = read_json(legacy).get("shards", {}) if legacy.exists() else {}
    done = {}
    for s in shards:
        path = folder / PROGRESS.format(s)
        rec = read_json(path) if path.exists() else old.get(str(s))
        if rec is None:
            continue
        try:
            for arr in rec["arrays"].values():
                load_npy(folder, arr)
        except MlpmemError as e:
            log.warning("redoing %s shard %d: %s", what, s, e.problem)
            continue
        done[s] = rec
    return done


def clear_progress(folder: Path) -> None:
    """Remove the progress records once the manifest lists the shards."""
    for path in [Path(folder) / "progress.json", *Path(folder).glob("progress-*.json")]:
        path.unlink(missing_ok=True)


def verify_stage(folder: Path, kind: str, full: bool = False) -> dict[str, Any]:
    """Check every file a finished stage's manifest lists (size and sampled blocks; all bytes with ``full``).

    Returns the manifest. Raises MlpmemError naming the first missing, truncated or corrupted file.
    """
    folder = Path(folder)
    m = read_manifest(folder, kind)
    fix = f"delete {folder} and run the `{kind}` stage again (or restore the file from a backup)"
    for record in file_records(m):
        check_file(folder, record, full, fix)
    return m


def write_manifest(folder: Path, kind: str, manifest: dict[str, Any]) -> None:
    """Mark a stage folder complete. Written last, so its presence means done; releases the folder's lock."""
    folder = Path(folder)
    data = {"kind": kind, "complete": True, "environment": environment(), **manifest}
    if marked_kind(folder) != kind:  # a folder claimed without its kind learns it now
        write_json(folder / MARKER, {"kind": kind, "mlpmem": package_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(folder / MANIFEST, data)
    release_lock(folder)


def read_manifest(folder: Path, kind: str) -> dict[str, Any]:
    """Read a finished stage's manifest, refusing missing, unfinished or foreign folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MlpmemError(
            f"{folder} does not exist" if not folder.exists() else f"{folder} is a file, not a stage folder",
            f"run the `{kind}` stage first, or check the path",
        )
    if not (folder / MANIFEST).exists():
        found = marked_kind(folder)
        if found is not None and found != kind:
            raise MlpmemError(
                f"{folder} holds an unfinished `{found}` stage, not {_a(kind)} `{kind}` stage", "pass the folder written by the right stage"
            )
        raise MlpmemError(
            f"{folder} holds no finished `{kind}` stage (no {MANIFEST}; it may have been interrupted)",
            f"run `mlpmem {kind}` again with the same --out to resume it",
        )
    m = read_json(folder / MANIFEST)
    if not isinstance(m, dict) or m.get("kind") != kind:
        raise MlpmemError(
            f"{folder} holds {_a(str(m.get('kind')) if isinstance(m, dict) else '?')} `{m.get('kind') if isinstance(m, dict) else '?'}` stage, not {_a(kind)} `{kind}` stage",
            "pass the folder written by the right stage",
        )
    return m
