"""Stage folders: resolved config + manifest, atomic writes, checked reads.

Every stage writes ``config.json`` (its resolved settings) and, last of all,
``manifest.json`` (what went in, what came out, sizes, hashes, versions). A
folder without ``manifest.json`` is unfinished: the stage that owns it may
resume it, nobody else may read it.

Safety rules for folders (RELIABILITY.md):

- A folder mlpmem creates gets a marker, ``.mlpmem`` (its kind). mlpmem
  writes into, and ``--overwrite`` deletes from, only folders that are empty,
  marked as its own, or (written before markers existed) hold nothing but
  files of its own; overwrite deletes only files it knows it wrote and
  refuses a folder that holds anything else (:func:`claim_out`, :func:`clear_out`).
- A stage folder is locked (``.mlpmem.lock``: pid, host) while a process
  writes it; a lock whose process is gone is taken over.
- A folder is "up to date" only if its config equals the full resolved
  config; settings added by later versions are listed with the value old
  folders used (``ADDED_SETTINGS``).
- Every file record holds its size, its sha256 and the sha256 of a few fixed
  64 KiB blocks: reads check the size and the sampled blocks, ``--verify``
  (``set_full_verify``) the full hash.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import fnmatch
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.stages import added_settings, folder_files, legacy_signs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "config.json"
MARKER = ".mlpmem"
LOCK = ".mlpmem.lock"
SAMPLE_BLOCK = 64 << 10

# files each kind of folder writes (besides the common ones below); --overwrite deletes these and nothing else.
# The stage registry is their one description (mlpmem.stages: each stage's files, FOLDERS for the rest).
STAGE_FILES: dict[str, tuple[str, ...]] = folder_files()
# the file that shows a folder of this kind was written by mlpmem before folders had markers
LEGACY_SIGN = legacy_signs()
COMMON_FILES = (
    CONFIG,
    MANIFEST,
    MARKER,
    LOCK,
    "progress.json",
    "progress-*.json",
    "*.partial",
)  # progress-N.json: one per finished shard (dist)

# settings added after a stage's first version, with the value a folder written before them used (mlpmem.stages)
ADDED_SETTINGS: dict[str, dict[str, Any]] = added_settings()

_FULL_VERIFY = False


def set_full_verify(on: bool) -> None:
    """Hash every file in full when a stage is read (``--verify``); the default checks sizes and sampled blocks."""
    global _FULL_VERIFY
    _FULL_VERIFY = bool(on)


def package_version() -> str:
    from mlpmem._version import __version__

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


# ---------------------------------------------------------------- file records and their checks


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


# ---------------------------------------------------------------- per-shard progress of a sharded stage

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


# ---------------------------------------------------------------- manifests


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


# ---------------------------------------------------------------- owning, clearing and locking folders


def marked_kind(folder: Path) -> str | None:
    """The kind in a folder's marker, or its manifest's kind for a folder written before markers, or None."""
    for name in (MARKER, MANIFEST):
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("kind"), str):
            return data["kind"]
    return None


def _known(name: str, kind: str | None, listed: set[str]) -> bool:
    patterns = COMMON_FILES + (STAGE_FILES.get(kind, ()) if kind else tuple(p for ps in STAGE_FILES.values() for p in ps))
    return name in listed or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listed_files(folder: Path) -> set[str]:
    """Top-level names of the files a folder's manifest or progress file lists."""
    names = set()
    for name in (MANIFEST, "progress.json", *(p.name for p in Path(folder).glob("progress-*.json"))):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        names |= {r["file"].split("/")[0] for r in file_records(data)}
    return names


def unknown_files(folder: Path, kind: str | None) -> list[str]:
    """Entries of ``folder`` that a ``kind`` stage does not write (None: no stage writes), sorted."""
    listed = _listed_files(folder)
    return sorted(p.name for p in Path(folder).iterdir() if not _known(p.name, kind, listed))


def _describe(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _legacy_ours(folder: Path, kind: str | None) -> bool:
    """Whether an unmarked folder (written before markers) shows that mlpmem wrote it: its kind's sign file, and for an
    export a config.json of an LM + memory (a Hugging Face model of someone else's holds the same kinds of files)."""
    sign = folder / LEGACY_SIGN.get(kind or "", CONFIG)
    if not sign.exists():
        return False
    if kind == "export":
        try:
            return json.loads(sign.read_text()).get("model_type") == "mlpmem"
        except (OSError, ValueError, AttributeError):
            return False
    return True


def _a(word: str) -> str:
    """The article before ``word`` (an `export`, a `corpus`)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def claim_out(folder: Path, kind: str | None) -> Path:
    """Make sure ``folder`` may receive a ``kind`` output; create and mark it if it is new or empty.

    Refuses a folder marked as (or holding a manifest of) another kind of stage, and a
    non-empty folder mlpmem did not write. A folder of the same kind written before
    markers existed (only files of that kind) is adopted. Call it before writing anything
    into a user-given output folder (``export_hf`` and every stage). ``kind=None`` (a caller
    that does not say its kind) accepts any mlpmem folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MlpmemError(f"{folder} is a file, not a folder", "choose a folder path for --out")
    entries = [p for p in folder.iterdir() if p.name != LOCK] if folder.is_dir() else []
    if entries:
        found = marked_kind(folder)
        if kind is not None and found is not None and found != kind:
            raise MlpmemError(
                f"{folder} holds {_a(found)} `{found}` stage written by mlpmem, and {_a(kind)} `{kind}` output would overwrite its files",
                "choose another --out folder",
            )
        if found is None and not (folder / MARKER).exists():
            foreign = unknown_files(folder, kind)
            if foreign or not _legacy_ours(folder, kind):
                raise MlpmemError(
                    f"{folder} exists, is not empty and was not written by mlpmem (it holds {_describe(foreign or [p.name for p in entries])})",
                    "choose an empty or new --out folder; mlpmem never writes into or deletes from folders it did not create",
                )
    _make_dirs(folder)
    if not (folder / MARKER).exists():
        write_json(folder / MARKER, {"kind": kind or "stage", "mlpmem": package_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return folder


def clear_out(folder: Path, kind: str | None) -> None:
    """``--overwrite``: delete the files a ``kind`` stage wrote into ``folder``, refusing if it holds any other file."""
    folder = Path(folder)
    claim_out(folder, kind)
    foreign = unknown_files(folder, kind)
    if foreign:
        raise MlpmemError(
            f"{folder} holds files mlpmem did not write ({_describe(foreign)}), so --overwrite will not delete it",
            "move those files elsewhere, or choose another --out folder",
        )
    for p in folder.iterdir():
        if p.name in (MARKER, LOCK):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.info("overwrite: cleared the %s stage in %s", kind or "", folder)


def _make_dirs(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MlpmemError(f"cannot create {folder}: a file is in the way", "choose another --out folder")
    except OSError as e:
        raise MlpmemError(f"cannot create {folder} ({e.strerror})", "choose an --out folder you can write to") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MlpmemError(f"cannot write into {folder} (read-only or permission denied)", "choose an --out folder you can write to")


_HELD: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(folder: Path) -> None:
    """Lock ``folder`` for this process (``.mlpmem.lock`` holds pid and host); re-entrant.

    A lock held by a live process is refused with a clear error; one whose process is
    gone (killed) is taken over, with a log line. Released by ``write_manifest``,
    ``release_lock`` or at exit.
    """
    folder = Path(folder)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                held, pid, host = {}, -1, me["host"]  # a lock being written, or garbage: look again
                time.sleep(0.05)
                if path.exists() and time.time() - path.stat().st_mtime < 2:
                    continue
            if (pid, host) == (me["pid"], me["host"]):
                _HELD.add(folder.resolve())
                return
            if host == me["host"] and not _pid_alive(pid):
                log.warning("taking over the lock of %s from process %s, which is gone", folder, pid if pid > 0 else "?")
                path.unlink(missing_ok=True)
                continue
            since = held.get("since", "?")
            raise MlpmemError(
                f"{folder} is being written by another mlpmem process (pid {pid} on {host}, since {since})",
                f"wait for it to finish or stop it; if no such process runs any more, delete {path}",
            )
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**me, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        _HELD.add(folder.resolve())
        return
    raise MlpmemError(f"cannot take the lock {path}", f"delete {path} if no mlpmem process writes {folder}")


def release_lock(folder: Path) -> None:
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        _HELD.discard(key)
        try:
            held = json.loads((folder / LOCK).read_text())
            if held.get("pid") == os.getpid():
                (folder / LOCK).unlink()
        except (OSError, ValueError):
            pass


@atexit.register
def release_all_locks() -> None:
    """Release every lock this process holds (at exit, and when a CLI command ends)."""
    for folder in list(_HELD):
        release_lock(folder)


def prepare_out(folder: Path, config: dict[str, Any], overwrite: bool = False, kind: str | None = None) -> str:
    """Get a stage folder ready. Returns "done" (finished, same config), "resume" or "fresh".

    The folder is claimed for ``kind`` (refused if it belongs to another stage or to the
    user) and locked for this process until the stage writes its manifest. A finished
    folder made with a different config is never silently mixed with new data: the user
    must pick another folder or ask to overwrite, which deletes only our files.
    """
    folder = Path(folder)
    cfg = to_jsonable(config)
    claim_out(folder, kind)
    acquire_lock(folder)
    try:
        if overwrite:
            clear_out(folder, kind)
        if (folder / CONFIG).exists():
            diff = config_differences(read_json(folder / CONFIG), cfg, kind)
            if diff and not any(p.name not in (CONFIG, MARKER, LOCK) for p in folder.iterdir()):
                write_json(folder / CONFIG, cfg)
                return "fresh"
            if diff:
                raise MlpmemError(
                    f"{folder} was written with a different configuration ({_describe(diff)})",
                    "choose another --out folder, or pass --overwrite to replace it",
                )
            if (folder / MANIFEST).exists():
                release_lock(folder)
                return "done"
            return "resume"
        write_json(folder / CONFIG, cfg)
        return "fresh"
    except BaseException:
        release_lock(folder)
        raise


def config_differences(old: Any, new: Any, kind: str | None = None, path: str = "") -> list[str]:
    """Settings in which two resolved configs differ, as ``key: old -> new`` (empty when equal).

    Keys only one side has differ too, except settings of ``ADDED_SETTINGS[kind]`` that an
    old folder lacks and whose new value is the one it used.
    """
    added = ADDED_SETTINGS.get(kind or "", {})
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys(), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                if not (p in added and new[k] == added[p]):
                    out.append(f"{p}: not set -> {new[k]!r}")
            elif k not in new:
                out.append(f"{p}: {old[k]!r} -> not set")
            else:
                out += config_differences(old[k], new[k], kind, p)
        return out
    return [] if old == new else [f"{path or 'config'}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _same_config(old: Any, new: Any, kind: str | None = None) -> bool:
    return not config_differences(old, new, kind)


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
