"""One process against several (torchrun), stage by stage: speed-up and equality of the artefacts (not a test).

    python bench/bench_dist.py [--model smollm2-135m] [--train-tokens 16000] [--nproc 2] [--quick] [--out runs/bench_dist]

Each stage runs as the `mlpmem` command twice, side by side in one run: one
process with --nproc threads, then ``torchrun --nproc-per-node NPROC`` with one
thread per process (the same cores either way). Corpus and index are built
once and shared. Reports wall seconds per stage, the speed-up, and how far the
N-process artefacts are from the 1-process ones: datastore values (must be
equal) and keys (max |diff|), kNN target ids (share equal) and probabilities,
memory weights (max |diff|), knnlm perplexities. Writes bench/results/dist.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from provenance import results_dir, start, write_result

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, threads: int, *argv) -> float:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mlpmem", *map(str, argv)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "mlpmem",
            *map(str, argv),
        ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def arrays(folder: Path, prefix: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(folder.glob(f"{prefix}-*.npy"))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-tokens", type=int, default=16000)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4k tokens, k=64: checks that the script runs")
    ap.add_argument("--out", default="runs/bench_dist")
    ap.add_argument("--json", default=None, help="default: bench/results/dist.json (--quick: dist_quick.json)")
    a = ap.parse_args()
    started = start()
    tokens, k = (4000, 64) if a.quick else (a.train_tokens, 1024)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    n = a.nproc
    seconds: dict[str, dict[str, float]] = {}
    load_start = os.getloadavg()[1]  # other work on the machine skews the ratio (N processes take a bigger share of a busy machine)

    run(
        1,
        n,
        "corpus",
        "--source",
        "builtin:sotu",
        "--model",
        a.model,
        "--out",
        out / "corpus",
        "--train-tokens",
        tokens,
        "--valid-tokens",
        tokens // 8,
        "--test-tokens",
        tokens // 8,
    )
    common = ("--device", "cpu")
    for tag, (p, t) in {"1": (1, n), str(n): (n, 1)}.items():
        seconds.setdefault("datastore", {})[tag] = run(
            p, t, "datastore", "--corpus", out / "corpus", "--out", out / f"ds{tag}", "--model", a.model, "--windows-per-shard", 8, *common
        )
    run(1, n, "index", "--datastore", out / "ds1", "--out", out / "index", "--kind", "flat")
    for tag, (p, t) in {"1": (1, n), str(n): (n, 1)}.items():
        seconds.setdefault("targets", {})[tag] = run(
            p, t, "targets", "--datastore", out / "ds1", "--index", out / "index", "--out", out / f"tg{tag}", "--k", k, "--temperature", 4
        )
    # --init plain: the memory reads the stored keys (lm_copy, the default, reads the last layer's output, which this
    # keys-only datastore does not hold; online mode would time the LM's recomputation instead of the training)
    for tag, (p, t) in {"1": (1, n), str(n): (n, 1)}.items():
        seconds.setdefault("train", {})[tag] = run(
            p,
            t,
            "train",
            "--datastore",
            out / "ds1",
            "--targets",
            out / "tg1",
            "--out",
            out / f"train{tag}",
            "--epochs",
            1,
            "--batch-size",
            512,
            "--n-blocks",
            1,
            "--precision",
            "fp32",
            "--init",
            "plain",
            *common,
        )
    for tag, (p, t) in {"1": (1, n), str(n): (n, 1)}.items():
        seconds.setdefault("knnlm", {})[tag] = run(
            p,
            t,
            "knnlm",
            "--corpus",
            out / "corpus",
            "--datastore",
            out / "ds1",
            "--index",
            out / "index",
            "--out",
            out / f"knn{tag}",
            "--k",
            k,
            *common,
        )

    from safetensors.numpy import load_file

    ds1, dsn = out / "ds1", out / f"ds{n}"
    w1, wn = (load_file(str(out / f"train{t}" / "memory" / "model.safetensors")) for t in ("1", str(n)))
    k1, kn = (json.loads((out / f"knn{t}" / "knnlm.json").read_text()) for t in ("1", str(n)))
    equal = {
        "datastore_values_equal": bool(np.array_equal(arrays(ds1, "values"), arrays(dsn, "values"))),
        "datastore_keys_max_abs_diff": float(np.abs(arrays(ds1, "keys").astype(np.float32) - arrays(dsn, "keys").astype(np.float32)).max()),
        "datastore_files_identical": sorted(p.name for p in ds1.glob("*.npy")) == sorted(p.name for p in dsn.glob("*.npy"))
        and all((ds1 / p.name).read_bytes() == (dsn / p.name).read_bytes() for p in ds1.glob("*.npy")),
        "targets_ids_equal_share": float(np.mean(arrays(out / "tg1", "ids") == arrays(out / f"tg{n}", "ids"))),
        "targets_probs_max_abs_diff": float(
            np.abs(arrays(out / "tg1", "probs").astype(np.float32) - arrays(out / f"tg{n}", "probs").astype(np.float32)).max()
        ),
        "memory_weights_max_abs_diff": max(float(np.abs(w1[key] - wn[key]).max()) for key in w1),
        "knnlm_ppl": {"1": k1["ppl"], str(n): kn["ppl"]},
    }
    result = {
        "what": f"1 process x {n} threads vs {n} processes x 1 thread (torchrun, gloo), stage by stage",
        "model": k1["model"],
        "train_tokens": tokens,
        "k": k,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": seconds,
        "speedup": {s: v["1"] / v[str(n)] for s, v in seconds.items()},
        "artefacts": equal,
        "load_average_5min": [load_start, os.getloadavg()[1]],
        "conditions": f"5-minute load average {load_start:.1f} at the start and {os.getloadavg()[1]:.1f} at the end of the run"
        + (
            " (other work shared the cores: N processes then take a larger share of the machine than one, so the speed-ups overstate "
            "what they gain on an idle machine)"
            if max(load_start, os.getloadavg()[1]) > 1.5 * n
            else ""
        )
        + ".",
        "note": "wall seconds of the whole command, model loading included; the machine is shared, so compare ratios within this run",
    }
    write_result(a.json or results_dir() / ("dist_quick.json" if a.quick else "dist.json"), result, started)
    print(json.dumps({"speedup": result["speedup"], "artefacts": equal}, indent=2))


if __name__ == "__main__":
    main()
