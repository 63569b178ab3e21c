"""Throughput, peak memory and disk of every pipeline stage, each run as its own CLI command (not a test).

    python bench/bench_pipeline.py [--train-tokens 20000] [--quick]

Runs the public `mlpmem` verbs one after another on the built-in State of the
Union corpus: corpus, datastore (recompute and KV-cache modes), index (exact
Flat and an IVF + SQ8 index with exact re-rank, forced even at this size),
kNN targets through each index, and one epoch of memory training. Every stage
is its own process, so its peak resident memory is its own (``os.wait4``
returns the child's rusage). Bytes per corpus token are the sizes of the
files each stage wrote. Writes bench/results/pipeline.json and pipeline.png
(``--quick``: pipeline_quick.*).

Extraction against a plain forward pass of the same model is timed side by
side by bench/bench_extract.py (extract.json); queries/s against datastore size
by bench/bench_search.py and bench/bench_scaling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import results_dir, start, write_result


def run_stage(name: str, argv: list[str], log) -> dict:
    """Run one CLI command; its wall time and its own peak RSS (not its siblings')."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"stage {name} failed (exit {proc.returncode}); see the log")
    return {"stage": name, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def folder_bytes(folder: Path, suffixes=(".npy", ".faiss", ".index", ".safetensors")) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (p.suffix in suffixes or not suffixes))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    stages = res["stages"]
    ax1.barh([s["stage"] for s in stages], [s["peak_rss_mb"] / 1024 for s in stages], color="tab:blue")
    ax1.invert_yaxis()
    ax1.set_xlabel("peak resident memory (GiB)")
    ax1.set_title(f"Peak memory per stage ({res['n_train_tokens']} training tokens)")
    art = res["bytes_per_token"]
    ax2.barh(list(art), list(art.values()), color="tab:orange")
    ax2.invert_yaxis()
    ax2.set_xlabel("bytes per training token")
    ax2.set_title("Disk per corpus token, by artefact")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("mlpmem pipeline stages, SmolLM2-135M (d=576)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-tokens", type=int, default=20000)
    p.add_argument("--work", type=Path, default=Path("runs/bench_pipeline"))
    p.add_argument("--quick", action="store_true", help="3k training tokens")
    args = p.parse_args()
    started = start()
    if args.quick:
        args.train_tokens, args.work = 3000, args.work.with_name(args.work.name + "_quick")
    out = results_dir() / ("pipeline_quick.json" if args.quick else "pipeline.json")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    w = args.work
    exe = str(Path(sys.executable).with_name("mlpmem"))
    stages = []
    with open(w / "log.txt", "w") as log:

        def stage(name, *argv):
            stages.append(run_stage(name, [exe, *argv], log))
            print(json.dumps(stages[-1]), flush=True)

        stage(
            "corpus",
            "corpus",
            "--source",
            "builtin:sotu",
            "--out",
            str(w / "corpus"),
            "--train-tokens",
            str(args.train_tokens),
            "--valid-tokens",
            "2000",
            "--test-tokens",
            "2000",
        )
        # the memory reads the last layer's output (init lm_copy), stored next to the kNN keys as in `mlpmem run`
        stage("datastore (recompute)", "datastore", "--corpus", str(w / "corpus"), "--out", str(w / "ds"), "--extra-sites=-1:output")
        stage("datastore (KV cache)", "datastore", "--corpus", str(w / "corpus"), "--out", str(w / "ds_cache"), "--mode", "cache")
        stage(
            "datastore valid",
            "datastore",
            "--corpus",
            str(w / "corpus"),
            "--out",
            str(w / "valid"),
            "--split",
            "valid",
            "--extra-sites=-1:output",
            "--lm-logprob",
        )
        stage("index (Flat)", "index", "--datastore", str(w / "ds"), "--out", str(w / "index_flat"), "--kind", "flat")
        stage(
            "index (IVF,SQ8)",
            "index",
            "--datastore",
            str(w / "ds"),
            "--out",
            str(w / "index_ivf"),
            "--kind",
            "auto",
            "--auto-flat-max-rows",
            "0",
        )
        stage("targets (Flat)", "targets", "--datastore", str(w / "ds"), "--index", str(w / "index_flat"), "--out", str(w / "targets"))
        stage(
            "targets (IVF,SQ8)", "targets", "--datastore", str(w / "ds"), "--index", str(w / "index_ivf"), "--out", str(w / "targets_ivf")
        )
        stage(
            "valid targets",
            "targets",
            "--datastore",
            str(w / "ds"),
            "--index",
            str(w / "index_flat"),
            "--queries",
            str(w / "valid"),
            "--out",
            str(w / "valid_targets"),
        )
        stage(
            "train (1 epoch)",
            "train",
            "--datastore",
            str(w / "ds"),
            "--targets",
            str(w / "targets"),
            "--valid",
            str(w / "valid"),
            "--valid-targets",
            str(w / "valid_targets"),
            "--out",
            str(w / "train"),
            "--init",
            "lm_copy",
            "--epochs",
            "1",
        )
    n = manifest(w / "ds")["n_rows"]
    by = {s["stage"]: s for s in stages}
    for name, folder in (("datastore (recompute)", "ds"), ("datastore (KV cache)", "ds_cache")):
        by[name]["tokens_per_s"] = manifest(w / folder)["extract_tokens_per_s"]
    for name, idx in (("targets (Flat)", "index_flat"), ("targets (IVF,SQ8)", "index_ivf")):
        tg, ix = manifest(w / ("targets" if idx == "index_flat" else "targets_ivf")), manifest(w / idx)
        by[name].update(
            {
                "queries_per_s": tg["stats"]["queries_per_s"],
                "index_factory": ix["factory"],
                "nprobe": ix.get("nprobe"),
                f"index_recall_at_{ix['k']}": ix["recall_at_k"],
            }
        )
    by["train (1 epoch)"]["tokens_per_s"] = manifest(w / "train")["tokens_per_s"]
    ds = manifest(w / "ds")
    sizes = {}
    for s in ds["shards"]:
        for name, rec in s["arrays"].items():
            sizes[name] = sizes.get(name, 0) + rec["bytes"]
    tg = manifest(w / "targets")
    for s in tg["shards"]:
        for name, rec in s["arrays"].items():
            sizes[f"targets {name}"] = sizes.get(f"targets {name}", 0) + rec["bytes"]
    sizes["index Flat"], sizes["index IVF,SQ8"] = folder_bytes(w / "index_flat"), folder_bytes(w / "index_ivf")
    res = {
        "n_train_tokens": n,
        "model": ds["model_id"],
        "d": ds["d"],
        "threads": os.cpu_count(),
        "stages": stages,
        "bytes_per_token": {k: v / n for k, v in sizes.items()},
        "memory_weights_bytes": folder_bytes(w / "train" / "memory"),
    }  # a fixed size, whatever the corpus
    write_result(out, res, started, indent=1)
    plot(res, out.with_suffix(".png"))
    print(json.dumps(res["bytes_per_token"]))


if __name__ == "__main__":
    main()
