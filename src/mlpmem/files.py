"""Checked files: atomic JSON and .npy writes, file records (size, sha256, sampled sha256) and their checks on read,
and disk-space checks before a stage writes.

Every file record holds its size, its sha256 and the sha256 of a few fixed 64 KiB blocks: reads check the size and
the sampled blocks, ``--verify`` (:func:`set_full_verify`) the full hash. The layer below stage folders
(:mod:`mlpmem.folders`) and their manifests (:mod:`mlpmem.manifest`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mlpmem.errors import MlpmemError

# the two files of every stage folder: its resolved settings, and (written last) what it holds
MANIFEST = "manifest.json"


CONFIG = "config.json"


SAMPLE_BLOCK = 64 << 10


_FULL_VERIFY = False


def set_full_verify(on: bool) -> None:
    """Hash every file in full when a stage is read (``--verify``); the default checks sizes and sampled blocks."""
    global _FULL_VERIFY
    _FULL_VERIFY = bool(on)


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
    try:
        tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MlpmemError(f"{path} does not exist", "check the path, or run the stage that writes it")
    except IsADirectoryError:
        raise MlpmemError(f"{path} is a folder, not a JSON file", "pass the JSON file")
    except PermissionError:
        raise MlpmemError(f"{path} cannot be read (permission denied)", "check the file's permissions")
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


def sample_sha256(path: Path, size: int | None = None) -> str:
    """sha256 of the size and of 64 KiB blocks at the start, a quarter, the middle, three quarters and the end.

    Cheap enough to check on every read, whatever the file's size; a file of at most
    five blocks is hashed whole.
    """
    size = Path(path).stat().st_size if size is None else size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 5 * SAMPLE_BLOCK:
            h.update(f.read())
        else:
            for off in (0, size // 4, size // 2, 3 * size // 4, size - SAMPLE_BLOCK):
                f.seek(off)
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def file_record(folder: Path, path: Path, **extra: Any) -> dict[str, Any]:
    """A manifest's record of a written file: name relative to ``folder``, size, sha256, sampled sha256."""
    path = Path(path)
    size = path.stat().st_size
    return {
        "file": path.relative_to(folder).as_posix(),
        **extra,
        "bytes": size,
        "sha256": sha256_file(path),
        "sample_sha256": sample_sha256(path, size),
    }


def save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Save an array atomically; return its file record for a manifest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves nothing behind
        raise
    return file_record(path.parent, path, shape=list(array.shape), dtype=str(array.dtype))


def check_file(folder: Path, record: dict[str, Any], verify: bool, fix: str) -> Path:
    """The path of a file a manifest lists, after checking it exists, its size, its sampled
    blocks and (if ``verify`` or ``set_full_verify``) its full hash."""
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise MlpmemError(f"{path} is missing although {Path(folder) / MANIFEST} lists it", fix)
    size = path.stat().st_size
    if size != record["bytes"]:
        raise MlpmemError(f"{path} is {size} bytes but its manifest says {record['bytes']} (truncated or overwritten)", fix)
    if "sample_sha256" in record and sample_sha256(path, size) != record["sample_sha256"]:
        raise MlpmemError(f"{path} does not match the hash of its sampled blocks in its manifest (corrupted)", fix)
    if (verify or _FULL_VERIFY) and sha256_file(path) != record["sha256"]:
        raise MlpmemError(f"{path} does not match the sha256 in its manifest (corrupted)", fix)
    return path


def file_records(data: Any) -> list[dict[str, Any]]:
    """Every file record (a dict with file, bytes and sha256) anywhere inside a manifest."""
    if isinstance(data, dict):
        if isinstance(data.get("file"), str) and "bytes" in data and "sha256" in data:
            return [data]
        return [r for v in data.values() for r in file_records(v)]
    if isinstance(data, list):
        return [r for v in data for r in file_records(v)]
    return []


def load_npy(folder: Path, record: dict[str, Any], verify: bool = False, mmap: bool = True) -> np.ndarray:
    """Open an array listed in a manifest, checking shape, dtype, size, sampled blocks (and hash if ``verify``)."""
    fix = f"delete {folder} and run the stage that writes it again"
    path = check_file(Path(folder), record, verify, fix)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise MlpmemError(f"{path} is not a readable .npy file ({e})", fix)
    if list(arr.shape) != list(record["shape"]) or str(arr.dtype) != record["dtype"]:
        raise MlpmemError(f"{path} holds {arr.dtype}{list(arr.shape)} but its manifest says {record['dtype']}{record['shape']}", fix)
    return arr


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_disk_space(
    folder: Path,
    need_bytes: int,
    what: str,
    smaller: str = "build a smaller corpus (`mlpmem corpus --train-tokens N`, or corpus.train_tokens in a recipe)",
) -> None:
    """Refuse to start writing what cannot fit (with a 5% + 64 MiB margin)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    total = need_bytes * 1.05 + (64 << 20)
    if total > free:
        raise MlpmemError(
            f"not enough disk space for the {what}: it needs about {human_bytes(need_bytes)} (plus a {human_bytes(total - need_bytes)} margin) and {probe} has {human_bytes(free)} free",
            f"free some space, choose an --out on a larger disk, or {smaller}",
        )


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
