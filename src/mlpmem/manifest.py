"""Stage folders: resolved config + manifest, atomic writes, checked reads.

Every stage writes ``config.json`` (its resolved settings) and, last of all,
``manifest.json`` (what went in, what came out, sizes, hashes, versions). A
folder without ``manifest.json`` is unfinished: the stage that owns it may
resume it, nobody else may read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mlpmem.errors import MlpmemError

MANIFEST = "manifest.json"
CONFIG = "config.json"


def package_version() -> str:
    from mlpmem import __version__

    return __version__


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


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MlpmemError(f"{path} does not exist", "check the path, or run the stage that writes it")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlpmemError(f"{path} is not valid JSON ({e})", "delete the folder and run the stage again")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Save an array atomically; return its file record for a manifest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "shape": list(array.shape), "dtype": str(array.dtype), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def check_file(folder: Path, record: dict[str, Any], verify: bool, fix: str) -> Path:
    """The path of a file a manifest lists, after checking it exists, its size and (if ``verify``) its hash."""
    path = folder / record["file"]
    if not path.exists():
        raise MlpmemError(f"{path} is missing although {folder / MANIFEST} lists it", fix)
    if path.stat().st_size != record["bytes"]:
        raise MlpmemError(f"{path} is {path.stat().st_size} bytes but its manifest says {record['bytes']} (truncated or overwritten)", fix)
    if verify and sha256_file(path) != record["sha256"]:
        raise MlpmemError(f"{path} does not match the sha256 in its manifest (corrupted)", fix)
    return path


def load_npy(folder: Path, record: dict[str, Any], verify: bool = False, mmap: bool = True) -> np.ndarray:
    """Open an array listed in a manifest, checking shape, dtype, size (and hash if ``verify``)."""
    fix = f"delete {folder} and run the stage that writes it again"
    path = check_file(Path(folder), record, verify, fix)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise MlpmemError(f"{path} is not a readable .npy file ({e})", fix)
    if list(arr.shape) != list(record["shape"]) or str(arr.dtype) != record["dtype"]:
        raise MlpmemError(f"{path} holds {arr.dtype}{list(arr.shape)} but its manifest says {record['dtype']}{record['shape']}", fix)
    return arr


def write_manifest(folder: Path, kind: str, manifest: dict[str, Any]) -> None:
    """Mark a stage folder complete. Written last, so its presence means done."""
    data = {"kind": kind, "complete": True, "environment": environment(), **manifest}
    write_json(Path(folder) / MANIFEST, data)


def read_manifest(folder: Path, kind: str) -> dict[str, Any]:
    """Read a finished stage's manifest, refusing missing, unfinished or foreign folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MlpmemError(f"{folder} does not exist", f"run the `{kind}` stage first, or check the path")
    if not (folder / MANIFEST).exists():
        raise MlpmemError(f"{folder} holds no finished `{kind}` stage (no {MANIFEST}; it may have been interrupted)", f"run `mlpmem {kind}` again with the same --out to resume it")
    m = read_json(folder / MANIFEST)
    if m.get("kind") != kind:
        raise MlpmemError(f"{folder} holds a `{m.get('kind')}` stage, not a `{kind}` stage", "pass the folder written by the right stage")
    return m


def prepare_out(folder: Path, config: dict[str, Any], overwrite: bool = False) -> str:
    """Get a stage folder ready. Returns "done" (finished, same config), "resume" or "fresh".

    A finished folder made with a different config is never silently mixed with
    new data: the user must pick another folder or ask to overwrite.
    """
    folder = Path(folder)
    cfg = to_jsonable(config)
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    if folder.exists() and any(folder.iterdir()):
        old = folder / CONFIG
        if not old.exists():
            raise MlpmemError(f"{folder} exists and is not an mlpmem stage folder", "choose an empty or new --out folder")
        if not _same_config(read_json(old), cfg):
            raise MlpmemError(f"{folder} was written with a different configuration", "choose another --out folder, or pass --overwrite to replace it")
        return "done" if (folder / MANIFEST).exists() else "resume"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG, cfg)
    return "fresh"


def _same_config(old: Any, new: Any) -> bool:
    """Equal configs, except that keys only one side has are ignored: a folder written
    before a setting existed stays usable (the new setting's default is what it used)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(_same_config(old[k], new[k]) for k in old.keys() & new.keys())
    return old == new


def check_disk_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse to start writing what cannot fit (with a 5% + 64 MB margin)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes * 1.05 + (64 << 20) > free:
        raise MlpmemError(
            f"not enough disk space for the {what}: it needs about {need_bytes / 2**30:.2f} GiB and {probe} has {free / 2**30:.2f} GiB free",
            "free some space, choose an --out on a larger disk, or use a smaller corpus (--max-train-tokens)",
        )
