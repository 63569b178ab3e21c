"""Stage folders: who may write into them, what ``--overwrite`` may delete, locks, and whether a folder is up to date.

Safety rules for folders (docs/reliability.md):

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
"""

from __future__ import annotations

import atexit
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from mlpmem.errors import MlpmemError
from mlpmem.files import CONFIG, MANIFEST, file_records, read_json, to_jsonable, write_json
from mlpmem.stages import added_settings, folder_files, legacy_signs

log = logging.getLogger(__name__)

MARKER = ".mlpmem"


LOCK = ".mlpmem.lock"


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


def package_version() -> str:
    from mlpmem._version import __version__

    return __version__


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
