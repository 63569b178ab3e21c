"""Where a benchmark result came from: the commit, the command, the machine and its load (not a test).

Every bench script writes its JSON through ``write_result(path, data, started)``, which adds

    "provenance": {"commit", "dirty", "command", "cwd", "machine", "load_average", "started", "finished",
                   "seconds", "versions", "environment"}

so that BENCHMARKS.md can say which commit and date each table was measured at, and
``bench/reproduce.py`` can skip a step whose result is already from the current commit.
``started = start()`` is taken at the top of a script (the load average before the work);
without it, the time this module was imported stands in.

``results_dir()`` is bench/results, or the folder named by ``MLPMEM_BENCH_RESULTS``
(``reproduce.py --quick`` points it at a temporary folder, so smoke runs never
overwrite measured results).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_ENV = "MLPMEM_BENCH_RESULTS"
# environment variables that change what a run measures (threads, the model cache and its stand-in, offline mode)
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MLPMEM_CACHE", RESULTS_ENV, "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES")
PACKAGES = ("torch", "transformers", "faiss-cpu", "numpy", "lm_eval", "peft")


def results_dir() -> Path:
    """Where results go: ``$MLPMEM_BENCH_RESULTS`` when set, else bench/results."""
    return Path(os.environ.get(RESULTS_ENV) or ROOT / "bench" / "results")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def start() -> dict:
    """The moment a measurement starts: its timestamp and the machine's load average (1, 5, 15 min)."""
    return {"started": _now(), "load_average": _load(), "t0": time.time()}


_IMPORTED = start()


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


# what a benchmark writes (results, the generated documents): a change there does not change what is measured
GENERATED = (":(exclude)bench/results", ":(exclude)*.md")


def commit() -> tuple[str | None, bool | None]:
    """The checkout's commit and whether tracked files other than results and documents differ from it
    (untracked files do not count)."""
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *GENERATED)
    return head, (bool(status) if status is not None else None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    out = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
    }
    torch = sys.modules.get("torch")  # only when the script imported it: never pay for the import here
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["mlpmem"] = metadata.version("mlpmem")
    except metadata.PackageNotFoundError:
        pass
    return out


def provenance(started: dict | None = None) -> dict:
    """Everything needed to say where a result came from; ``started`` is ``start()``'s record (default: import time)."""
    s = started or _IMPORTED
    head, dirty = commit()
    return {
        "commit": head,
        "dirty": dirty,
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "machine": machine(),
        "load_average": {"start": s["load_average"], "end": _load()},
        "started": s["started"],
        "finished": _now(),
        "seconds": round(time.time() - s["t0"], 1),
        "versions": versions(),
        "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


def _plain(obj):
    """numpy scalars and paths as JSON values (what json.dumps cannot take on its own)."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_result(path: str | Path, data: dict, started: dict | None = None, **dump) -> Path:
    """Write ``data`` as JSON at ``path`` with its ``provenance`` (atomically: a reader never sees half a file).
    ``data`` read from an earlier result and extended keeps that result's provenance in ``provenance_earlier``.
    ``dump``: json.dumps options (default indent=2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance(started)
    out = {**data, "provenance": prov}
    old = data.get("provenance")
    if old and old.get("started") != prov["started"]:  # results added to an earlier file: keep where those came from
        out["provenance_earlier"] = [*data.get("provenance_earlier", []), old]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, **{"indent": 2, "default": _plain, **dump}) + "\n")
    tmp.replace(path)
    return path


def command_of(data: dict | None) -> str | None:
    """The command that measured a result, as a reader would type it (``python bench/...``), or None."""
    argv = ((data or {}).get("provenance") or {}).get("command")
    if not argv:
        return None
    root = str(Path(__file__).resolve().parents[1]) + "/"  # paths inside the checkout, as a reader in it types them
    return " ".join(["python", *(shlex.quote(a.replace(root, "")) for a in argv[1:])])


def measured(data: dict | None) -> str:
    """One line for a report: the commit and date a result was measured at."""
    p = (data or {}).get("provenance")
    if not p:
        return "measured before provenance was recorded"
    c = (p.get("commit") or "unknown commit")[:10] + (" (uncommitted changes)" if p.get("dirty") else "")
    return f"measured at commit {c} on {p.get('finished', '?')[:10]}"
