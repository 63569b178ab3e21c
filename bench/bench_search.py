"""Search speed and recall@k: Flat against the `auto` approximate index (not a test).

    python bench/bench_search.py [--n 200000] [--d 576] [--k 1024] [--queries 300] [--datastore DIR] [--quick]
    python bench/bench_search.py --sizes 2e5,5e5,1e6 [--real runs/sotu/datastore] [--quick]

With ``--sizes``: the auto index's recall target as N grows. For each size, a
datastore of real keys (``--real``) repeated with Gaussian jitter of about a
nearest-neighbour distance beyond the first pass (as bench_scaling.py makes them);
the auto IVF index (forced above Flat's 200k limit) chooses nprobe for its recall
target at build time; then recall@k against exact search and queries/s on
``--queries`` other keys. Writes bench/results/recall_target.json (sizes measured
before are kept; ``--quick``: recall_target_quick.json, 20k and 50k keys, k=64).

Synthetic keys (default) are float16 draws from a mixture of Gaussians in a 64-dim
subspace plus isotropic noise: LM hidden states are clustered and of low intrinsic
dimension, and uniform noise would make any IVF index look hopeless. Pass
``--datastore`` to measure real keys instead. Prints one JSON line and writes it to
bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import provenance

from mlpmem.index import RERANK_FACTOR, IndexConfig, KnnIndex, build_index
from mlpmem.files import CONFIG, save_npy, write_json
from mlpmem.manifest import write_manifest


def write_datastore(folder: Path, n: int, d: int, make_keys, config: dict, shard_rows: int = 65536, seed: int = 0) -> Path:
    """A datastore of ``n`` keys, ``make_keys(start, m, rng)`` giving each shard's float16 keys; random values."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    write_json(folder / CONFIG, {"synthetic": True, "n": n, "d": d, "seed": seed, **config})
    shards = []
    for s, start in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - start)
        keys = make_keys(start, m, rng)
        values = rng.integers(0, 49152, m).astype(np.int32)
        shards.append(
            {
                "start": start,
                "end": start + m,
                "arrays": {
                    "keys": save_npy(folder / f"keys-{s:05d}.npy", keys),
                    "values": save_npy(folder / f"values-{s:05d}.npy", values),
                },
            }
        )
    write_manifest(
        folder,
        "datastore",
        {
            "model_id": "synthetic",
            "tokenizer_hash": "none",
            "layer": -1,
            "site": "synthetic",
            "d": d,
            "vocab_size": 49152,
            "n_rows": n,
            "split": "train",
            "shards": shards,
        },
    )
    return folder


def synthetic_datastore(folder: Path, n: int, d: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, d)).astype(np.float32) / 8
    centers = rng.normal(size=(512, 64)).astype(np.float32) * 2

    def make_keys(start, m, rng):
        z = centers[rng.integers(0, len(centers), m)] + rng.normal(size=(m, 64)).astype(np.float32)
        return (z @ basis + 0.15 * rng.normal(size=(m, d)).astype(np.float32)).astype(np.float16)

    return write_datastore(folder, n, d, make_keys, {"keys": "gaussian mixture"}, seed=seed)


def jittered_datastore(folder: Path, n: int, real: np.ndarray, sigma: float) -> Path:
    """``n`` keys: the real ones, then copies with N(0, sigma^2) jitter per coordinate."""

    def make_keys(start, m, rng):
        rows = np.arange(start, start + m) % len(real)
        keys = real[rows].astype(np.float32)
        extra = np.arange(start, start + m) >= len(real)  # the first pass over the real keys stays exact
        keys[extra] += sigma * rng.normal(size=(int(extra.sum()), real.shape[1])).astype(np.float32)
        return keys.astype(np.float16)

    return write_datastore(folder, n, real.shape[1], make_keys, {"keys": "real keys, jittered beyond the first pass", "sigma": sigma})


def recall_target_curve(args) -> None:
    import torch

    from mlpmem.index import exact_search, recall_at_k
    from mlpmem.datastore import Datastore

    torch.set_num_threads(args.threads)
    started = provenance.start()
    out = args.out.with_name("recall_target_quick.json" if args.quick else "recall_target.json")
    res = json.loads(out.read_text()) if out.exists() else {"sizes": {}}
    real_ds = Datastore(args.real)
    real = real_ds.load("keys")
    probe = real[np.random.default_rng(3).choice(len(real), 300, replace=False)].astype(np.float32)
    d2, _ = exact_search(real_ds, probe, 2)
    sigma = float(np.median(np.sqrt(d2[:, 1])) / np.sqrt(real.shape[1]))  # a nearest-neighbour distance, per coordinate
    res.update(
        {
            "real": str(args.real),
            "real_rows": len(real),
            "d": real.shape[1],
            "k": args.k,
            "queries": args.queries,
            "threads": args.threads,
            "jitter_sigma": sigma,
            "keys": "real keys repeated with jitter (synthetic beyond the first pass)",
        }
    )
    for n in [int(float(x)) for x in args.sizes.split(",")]:
        if str(n) in res["sizes"] and not args.force:
            continue
        ds_dir = args.work / f"jitter-{n}"
        if ds_dir.exists():
            shutil.rmtree(ds_dir)
        jittered_datastore(ds_dir, n, real, sigma)
        t = time.perf_counter()
        ix_dir = build_index(
            ds_dir, args.work / f"auto-{n}", IndexConfig(auto_flat_max_rows=0, recall_k=args.k, recall_sample=args.queries), overwrite=True
        )
        build_s = time.perf_counter() - t
        index = KnnIndex.open(ix_dir)
        m = index.manifest
        qids = np.sort(np.random.default_rng(7).choice(n, size=args.queries, replace=False))  # not the build's probe
        xq = index.datastore.gather("keys", qids).astype(np.float32)
        _, exact = exact_search(index.datastore, xq, args.k + 1)
        exact = np.array([e[e != q][: args.k] for e, q in zip(exact, qids)])
        qps, _, ids = timed_search(index, xq, qids, args.k)
        row = {
            "factory": m["factory"],
            "nlist": m["nlist"],
            "nprobe": m["nprobe"],
            "scanned_per_query": int(m["nprobe"] * n / m["nlist"]),
            "recall_target": m["recall_target"],
            "build_recall@k": round(m["recall_at_k"], 4),
            f"recall@{args.k}": round(recall_at_k(ids, exact), 4),
            "qps": round(qps, 1),
            "ms_per_query": round(1000 / qps, 2),
            "build_s": round(build_s, 1),
            "recall_s": m["recall_seconds"],
            "nprobe_tried": m["nprobe_tried"],
            "index_bytes_per_token": m["bytes_per_token"]["index"],
        }
        res["sizes"][str(n)] = row
        print(n, json.dumps(row), flush=True)
        provenance.write_result(out, res, started, indent=1)
        shutil.rmtree(ds_dir)  # GBs at 1M+; the index folder is kept (small)
        shutil.rmtree(args.work / f"auto-{n}")


def timed_search(index: KnnIndex, xq: np.ndarray, qids: np.ndarray, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    index.search(xq[:8], k, exclude=qids[:8])  # warm up (page in the memory maps)
    t = time.perf_counter()
    d, i = index.search(xq, k, exclude=qids)
    return xq.shape[0] / (time.perf_counter() - t), d, i


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(a[a >= 0], e).size / e.shape[0] for a, e in zip(approx, exact)]))


def dist_error(ds, xq: np.ndarray, d: np.ndarray, ids: np.ndarray) -> float:
    """Mean |returned distance - exact float64 distance| over the returned ids (what re-ranking fixes)."""
    ok = ids >= 0
    exact = ((ds.gather("keys", ids.clip(0)).astype(np.float64) - xq[:, None].astype(np.float64)) ** 2).sum(-1)
    return float(np.abs(d[ok] - exact[ok]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--nprobes", type=str, default="32,64,128", help="extra nprobe values to sweep on the auto index")
    p.add_argument("--datastore", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/search.json (--sizes: recall_target.json beside it)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k synthetic keys, k=64, 50 queries, writes search_quick.json")
    p.add_argument("--sizes", default=None, help="recall-target curve over these datastore sizes (e.g. 2e5,5e5,1e6)")
    p.add_argument(
        "--real", type=Path, default=Path("runs/sotu/datastore"), help="--sizes: datastore whose real keys seed the jittered ones"
    )
    p.add_argument("--work", type=Path, default=Path("runs/bench_recall_target"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="--sizes: remeasure sizes already in the results")
    args = p.parse_args()
    args.out = args.out or provenance.results_dir() / "search.json"
    if args.sizes:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        if args.quick:
            args.sizes, args.k, args.queries = "2e4,5e4", 64, 50
        args.queries = min(args.queries, 200) if not args.quick else args.queries
        return recall_target_curve(args)
    if args.quick:
        args.n, args.k, args.queries, args.nprobes = 20_000, 64, 50, "8"
        args.out = args.out.with_name("search_quick.json")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = provenance.start()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds_dir = args.datastore or synthetic_datastore(tmp / "ds", args.n, args.d)
        flat_dir = build_index(ds_dir, tmp / "flat", IndexConfig(kind="flat"))
        t = time.perf_counter()
        auto_dir = build_index(ds_dir, tmp / "auto", IndexConfig(kind="auto", auto_flat_max_rows=0, recall_k=args.k))
        auto_build_s = time.perf_counter() - t
        flat, auto = KnnIndex.open(flat_dir), KnnIndex.open(auto_dir)
        n = flat.n_rows
        qids = np.sort(np.random.default_rng(1).choice(n, size=args.queries, replace=False))
        xq = flat.datastore.gather("keys", qids).astype(np.float32)

        flat_qps, flat_d, exact = timed_search(flat, xq, qids, args.k)
        res = {
            "n": n,
            "d": flat.d,
            "k": args.k,
            "queries": args.queries,
            "synthetic": args.datastore is None,
            "flat_qps": round(flat_qps, 2),
            "auto_factory": auto.manifest["factory"],
            "auto_nprobe": auto.nprobe,
            "auto_build_s": round(auto_build_s, 1),
            "auto_manifest_recall": auto.manifest["recall_at_k"],
            "sweep": [],
        }
        sweep = sorted({auto.nprobe, *map(int, args.nprobes.split(","))})
        for nprobe in sweep:
            for rerank, factor in ((True, 2.0), (True, 1.25), (False, 1.0)):
                auto.nprobe, auto.rerank, auto.rerank_factor = nprobe, rerank, factor
                auto.set_nprobe(nprobe)
                qps, d, i = timed_search(auto, xq, qids, args.k)
                row = {
                    "nprobe": nprobe,
                    "rerank": rerank,
                    "rerank_factor": factor,
                    "scanned_per_query": int(nprobe * n / auto.manifest["nlist"]),
                    "qps": round(qps, 2),
                    "speedup_vs_flat": round(qps / flat_qps, 2),
                    f"recall@{args.k}": round(recall(i, exact), 4),
                    "mean_abs_dist_error_of_returned_ids": round(dist_error(flat.datastore, xq, d, i), 5),
                }
                res["sweep"].append(row)
                print(json.dumps(row), flush=True)
        auto_row = next(r for r in res["sweep"] if r["nprobe"] == res["auto_nprobe"] and r["rerank_factor"] == RERANK_FACTOR)
        res["auto_qps"], res[f"auto_recall@{args.k}"] = auto_row["qps"], auto_row[f"recall@{args.k}"]
    print(json.dumps(res))
    provenance.write_result(args.out, res, started, indent=None)


if __name__ == "__main__":
    main()
