"""Bytes per corpus token of each store configuration, with its recall, speed and kNN-LM perplexity (not a test).

    nice python bench/bench_store.py [--datastore runs/sotu/datastore] [--run runs/sotu] [--work runs/bench_store] [--quick]

Builds every store configuration over one datastore's real keys (into ``--work``;
the datastore and run folders are only read):

- flat: a float32 copy of the keys (Flat index) + the float16 keys
- keys: exact search over the float16 keys, no copy
- ivf-sq8+keys: the auto IVF index (SQ8 codes) re-ranked with the float16 keys
- ivfpq+keys: IVF with 64-byte PQ codes re-ranked with the float16 keys
- ivfpq: the same codes alone (distances from the codes, no keys kept)
- ivfopq: OPQ-rotated 64-byte PQ codes alone

For each: the bytes per token of every stored piece (from the index manifest),
what search reads, what the whole pipeline keeps (plus the kNN targets and any
extra feature array of the run), recall@1024 against exact search, queries/s at
k=1024, and (unless ``--no-ppl``) kNN-LM perplexity on the run's test split with
the run's tuned temperature and lambda. The test split's keys and LM log-probs are
extracted once (``mlpmem.datastore`` with ``lm_logprob``) into ``--work``.

Writes bench/results/store.json (``--quick``: store_quick.json, two configurations,
20k keys, no perplexity).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
from provenance import results_dir, start, write_result

from mlpmem.index import IndexConfig, KnnIndex, build_index, exact_search, recall_at_k
from mlpmem.datastore import Datastore


CONFIGS = {  # name: (index settings, pieces the pipeline keeps besides the index file and values)
    "flat": (dict(kind="flat"), ["keys"]),
    "keys": (dict(kind="keys"), ["keys"]),
    "ivf-sq8+keys": (dict(kind="auto", auto_flat_max_rows=0), ["keys"]),
    "ivfpq+keys": (dict(kind="ivfpq"), ["keys"]),
    "ivfpq": (dict(kind="ivfpq", rerank=False), []),
    "ivfopq": (dict(kind="ivfopq", rerank=False), []),
}


def subset_datastore(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` rows of a datastore (keys and values) as a datastore of its own (for --quick)."""
    from mlpmem.files import CONFIG, save_npy, write_json
    from mlpmem.manifest import read_manifest, write_manifest

    ds = Datastore(src)
    n = min(n, ds.n_rows)
    dst.mkdir(parents=True)
    write_json(dst / CONFIG, {"subset_of": str(src), "n": n})
    shard = {
        "start": 0,
        "end": n,
        "arrays": {
            "keys": save_npy(dst / "keys-00000.npy", ds.rows("keys", 0, n)),
            "values": save_npy(dst / "values-00000.npy", ds.rows("values", 0, n)),
        },
    }
    m = {
        k: v
        for k, v in read_manifest(src, "datastore").items()
        if k not in ("kind", "complete", "environment", "shards", "n_rows", "features")
    }
    write_manifest(dst, "datastore", {**m, "n_rows": n, "shards": [shard]})
    return dst


def test_split(run: Path, work: Path) -> Path:
    """Keys and LM log-probs of the run's test split, with the run's datastore settings."""
    from mlpmem.datastore import DatastoreConfig, build_datastore

    recipe = json.loads((run / "recipe.json").read_text())
    d = {k: v for k, v in recipe["datastore"].items() if k in DatastoreConfig.__dataclass_fields__}
    cfg = DatastoreConfig(**{**d, "split": "test", "lm_logprob": True, "extra_sites": []})
    return build_datastore(run / "corpus", work / "test", cfg, device="cpu")


def knn_lm_ppl(index: KnnIndex, values: np.ndarray, test: Datastore, k: int, temperature: float, lam: float) -> tuple[float, float]:
    """(kNN-LM, LM alone) perplexity over the test rows: logaddexp(log(1-lam) + lp_LM, log lam + log p_kNN)."""
    from mlpmem.targets import knn_target_logprob

    lp_lm = test.load("lm_logprob").astype(np.float64)
    targets = test.values()
    lp_knn = np.empty(len(targets))
    for s in range(0, len(targets), 512):
        xq = test.rows("keys", s, s + 512).astype(np.float32)
        d, ids = index.search(xq, k)
        nv = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)
        lp_knn[s : s + len(xq)] = knn_target_logprob(d, nv, targets[s : s + len(xq)], temperature)
    mix = np.logaddexp(math.log(1 - lam) + lp_lm, math.log(lam) + lp_knn)
    return float(np.exp(-mix.mean())), float(np.exp(-lp_lm.mean()))


def markdown(store: dict, curve: dict | None = None) -> str:
    """The BENCHMARKS.md section for results/store.json and results/recall_target.json (for bench/make_benchmarks.py)."""
    c = store["configs"]
    lines = [
        "## 8. Stores: bytes per token, recall target, compressed codes",
        "",
        "```",
        "nice python bench/bench_store.py                     # stores over runs/sotu (real keys)",
        "nice python bench/bench_search.py --sizes 2e5,5e5,1e6  # the auto index's recall target as N grows",
        "nice python bench/bench_search.py --sizes 3e6 --threads 1  # added to the same file",
        "```",
        "",
        f"Every store over the same {store['n']:,} real keys (SmolLM2-135M, d={store['d']}, the SOTU run's datastore), "
        f"k={store['k']}, {store['queries']} held-out keys as queries, FAISS on {store['threads']} thread(s) of the shared machine. "
        f"kNN-LM test perplexity on the run's test split with its tuned T={store['knn_temperature']:g} and lambda={store['knn_lambda']:.3f} "
        f"(LM alone {store.get('base_test_ppl', float('nan')):.3f}). Bytes per corpus token: what search reads (index + values, + keys when it re-ranks or streams them), "
        f"and what the store keeps (index, values, and the keys unless it searches the codes alone) with the kNN targets ({store['targets_bytes_per_token']:.0f} B: top-128 int32 ids + float16 probs) that training needs. Not counted: the extra feature array of offline training (h29.output, 1152 B), which online training does not store.",
        "",
        "| store | index | nprobe (target 0.9) | recall@1024 | queries/s | build s | B/token: index | search reads | kept + targets | kNN-LM test ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in c.items():
        lines.append(
            f"| {name} | {r['factory']} | {r['nprobe'] or '-'} | {r['recall@1024']:.3f} | {r['qps']:.0f} | {r['build_s']:.0f} | "
            f"{r['bytes_per_token']['index']:.0f} | {r['search_bytes_per_token']:.0f} | {r['with_targets_bytes_per_token']:.0f} | "
            f"{r.get('knn_lm_test_ppl', float('nan')):.3f} |"
        )
    if curve and curve.get("sizes"):
        lines += [
            "",
            f"The auto index as N grows ({curve['keys']}; jitter sigma {curve['jitter_sigma']:.3f} per coordinate, "
            f"k={curve['k']}, {curve['queries']} held-out queries, {curve['threads']} thread):",
            "",
            "| keys | index | nprobe chosen | vectors scanned / query | recall@k at build | recall@k held out | ms / query | build s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, r in sorted(curve["sizes"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {int(n):,} | {r['factory']} | {r['nprobe']} | {r['scanned_per_query']:,} | {r['build_recall@k']:.3f} | "
                f"{r['recall@' + str(curve['k'])]:.3f} | {r['ms_per_query']:.1f} | {r['build_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datastore", type=Path, default=Path("runs/sotu/datastore"))
    p.add_argument("--run", type=Path, default=Path("runs/sotu"), help="run folder: targets, tuned kNN settings, corpus for perplexity")
    p.add_argument("--work", type=Path, default=Path("runs/bench_store"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch/FAISS threads (a loaded 2-core machine ran FAISS 10x slower on 2)")
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--force", action="store_true", help="rebuild the indexes in --work")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    started = start()
    out = results_dir() / ("store_quick.json" if args.quick else "store.json")
    work = args.work.with_name(args.work.name + "_quick") if args.quick else args.work
    if args.force and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ds_dir = args.datastore
    if args.quick:
        args.configs, args.no_ppl, args.queries = "keys,ivfpq", True, 50
        ds_dir = work / "ds" if (work / "ds").exists() else subset_datastore(args.datastore, work / "ds", 20_000)
    ds = Datastore(ds_dir)
    values = ds.values()
    targets_m = json.loads((args.run / "targets" / "manifest.json").read_text())
    targets_bpt = sum(r["bytes"] for s in targets_m["shards"] for r in s["arrays"].values()) / targets_m["n_rows"]
    knn = json.loads((args.run / "knn.json").read_text())
    test = None if args.no_ppl else Datastore(test_split(args.run, work))  # the LM on torch's default threads
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(7)  # queries apart from the index's own recall probe (seed + 1)
    qids = np.sort(rng.choice(ds.n_rows, size=args.queries, replace=False))
    xq = ds.gather("keys", qids).astype(np.float32)
    k = min(args.k, ds.n_rows - 2)
    _, exact = exact_search(ds, xq, k + 1)
    exact = np.array([e[e != q][:k] for e, q in zip(exact, qids)])

    res = {
        "datastore": str(args.datastore),
        "n": ds.n_rows,
        "d": ds.d,
        "k": k,
        "queries": args.queries,
        "threads": args.threads,
        "targets_bytes_per_token": round(targets_bpt, 1),
        "knn_temperature": knn["temperature"],
        "knn_lambda": knn["lambda"],
        "configs": {},
    }
    for name in args.configs.split(","):
        settings, kept = CONFIGS[name]
        t = time.perf_counter()
        folder = build_index(ds_dir, work / name, IndexConfig(recall_k=k, recall_sample=args.queries, **settings))
        build_s = time.perf_counter() - t
        index = KnnIndex.open(folder, ds)
        m = index.manifest
        index.search(xq[:4], k, exclude=qids[:4])  # page in
        t = time.perf_counter()
        _, ids = index.search(xq, k, exclude=qids)
        qps = len(qids) / (time.perf_counter() - t)
        b = m["bytes_per_token"]
        kept_bpt = b["index"] + b["datastore.values"] + sum(b[f"datastore.{x}"] for x in kept)
        row = {
            "factory": m["factory"],
            "nprobe": m["nprobe"],
            "rerank": m["rerank"],
            "recall_target": m["recall_target"],
            "build_recall@k": m["recall_at_k"],
            f"recall@{k}": round(recall_at_k(ids, exact), 4),
            "qps": round(qps, 1),
            "build_s": round(build_s, 1),
            "bytes_per_token": b,
            "search_bytes_per_token": m["search_bytes_per_token"],
            "kept_bytes_per_token": round(kept_bpt, 1),  # index + values + the keys if this store keeps them
            "with_targets_bytes_per_token": round(kept_bpt + targets_bpt, 1),
        }
        if test is not None:
            t = time.perf_counter()
            row["knn_lm_test_ppl"], res["base_test_ppl"] = knn_lm_ppl(index, values, test, args.k, knn["temperature"], knn["lambda"])
            row["ppl_s"] = round(time.perf_counter() - t, 1)
        res["configs"][name] = row
        print(name, json.dumps(row), flush=True)
        write_result(out, res, started, indent=1)  # after every configuration: a stopped run keeps what it measured
    print(json.dumps(res))


if __name__ == "__main__":
    main()
