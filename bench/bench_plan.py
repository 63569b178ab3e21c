"""`mlpmem plan` against a finished run: estimated and real seconds and disk per stage (not a test).

    python bench/bench_plan.py [--run runs/sotu] [--throughputs FILE] [--json bench/results/plan.json] [--quick]

Plans the run's own recipe (``RUN/recipe.json``; the corpus sizes come from its built
corpus), calibrating on this machine unless --throughputs is given, and compares with
the run's ``report.json`` (``seconds_this_run``, so the run must have gone through
every stage in one invocation) and the bytes its stage folders hold. The machine is
shared: the calibration and the run may have met different loads, which the ratio
column shows rather than hides.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from provenance import results_dir, start, write_result

FOLDERS = {
    "datastore (train) and scored valid split": ("datastore", "valid"),
    "kNN targets": ("targets", "valid_targets"),
    "index": ("index",),
    "memory training": ("train",),
}


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/sotu")
    ap.add_argument("--throughputs", default=None)
    ap.add_argument("--json", default=None, help="default: bench/results/plan.json (--quick: plan_quick.json)")
    ap.add_argument("--quick", action="store_true", help="a smoke run on a small --run: writes plan_quick.json")
    a = ap.parse_args()
    started = start()
    from mlpmem.pipeline import load_recipe
    from mlpmem.plan import plan, read_throughputs

    run = Path(a.run)
    data = json.loads((run / "recipe.json").read_text())
    data = {k: v for k, v in data.items() if k != "device"}  # the device the run recorded is a resolved one
    # recipe.json holds every stage's resolved config: the datastore's model and dtype are top-level keys of a recipe
    for section in ("corpus", "datastore"):
        data[section] = {k: v for k, v in data[section].items() if k != "model"}
    data["dtype"] = data["datastore"].pop("dtype", "float32")
    data["targets"] = {k: v for k, v in data["targets"].items() if k not in ("k", "temperature")}  # the knn section's, in a recipe
    recipe = load_recipe(data, out=str(run), check_paths=False)
    p = plan(recipe, throughputs=read_throughputs(Path(a.throughputs)) if a.throughputs else None)
    real = json.loads((run / "report.json").read_text())["seconds_this_run"]
    slow = [st["stage"] for st in p["stages"] if st["seconds"] > 10]
    done_before = [name for name in slow if (real.get(name) or 0.0) < 1.0]
    if done_before:
        raise SystemExit(
            f"{run}: its report gives ~0 s to {len(done_before)} stages (done before the run that wrote it: {done_before[0]}, ...), "
            f"so there is nothing to compare the plan with; measure a run made from scratch: mlpmem run sotu --out {run}_plan --overwrite"
        )
    rows = []
    for st in p["stages"]:
        secs = real.get(st["stage"])
        disk = sum(du(run / f) for f in FOLDERS.get(st["stage"], ()))
        rows.append(
            {
                "stage": st["stage"],
                "plan_seconds": st["seconds"],
                "real_seconds": secs,
                "seconds_ratio": st["seconds"] / secs if secs else None,
                "plan_disk_bytes": st["disk_bytes"],
                "real_disk_bytes": disk or None,
                "disk_ratio": st["disk_bytes"] / disk if disk else None,
            }
        )
    out = {
        "run": str(run),
        "model": p["model"],
        "tokens": p["tokens"],
        "throughputs": p["throughputs"],
        "stages": rows,
        "note": "real = the run's report.json seconds_this_run and the bytes in its stage folders; plan = mlpmem plan calibrated now",
    }
    write_result(a.json or results_dir() / ("plan_quick.json" if a.quick else "plan.json"), out, started)
    for r in rows:
        print(
            f"{r['stage'][:45]:<45} plan {r['plan_seconds']:8.0f} s  real {r['real_seconds'] or 0:8.0f} s  "
            f"ratio {r['seconds_ratio'] or 0:5.2f}   disk ratio {r['disk_ratio'] or 0:5.2f}"
        )


if __name__ == "__main__":
    main()
