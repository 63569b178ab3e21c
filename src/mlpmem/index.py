"""Stage 3: a FAISS L2 index over the datastore keys, and exact-where-it-matters search.

``build_index`` writes ``index.faiss`` plus a manifest that records what the
index was built from and how good it is (recall@k measured against exact
search). ``KnnIndex`` searches it with the two rules that earlier kNN-LM code
got wrong: the query's own row is removed *by id* (never "drop the first
hit"), and approximate distances are replaced by exact ones recomputed from the
float16 keys (re-ranking) before anyone turns them into probabilities.

Stores, from largest to smallest (bytes per corpus token at d=576, recorded in the
index manifest as ``bytes_per_token``): ``flat`` (a float32 copy of the keys, 2304
B), ``keys`` (exact search over the datastore's float16 keys, no copy), ``auto``
above 200k keys (IVF-SQ8 codes, 576 B, re-ranked with the keys), ``ivfpq`` /
``ivfopq`` / ``mlpmemory`` (64-byte PQ codes; with ``rerank: false`` search reads
only the codes, so the datastore's keys can go once the targets are built).
``index.device`` builds and searches with FAISS on GPUs (see ``resolve_placement``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.files import MANIFEST, check_file, file_record, sha256_file
from mlpmem.folders import prepare_out
from mlpmem.manifest import read_manifest, write_manifest
from mlpmem.datastore import Datastore

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
# faiss GPU search returns at most this many neighbours per query
GPU_MAX_K = 2048
# auto used to scan a fixed 16k vectors per query (nprobe * N / nlist = 16k): recall@1024 fell
# to 0.84 at 3M keys (bench/bench_scaling.py). It now chooses nprobe for a recall target.
# Re-rank this many times k approximate candidates. In bench/bench_search.py (synthetic keys,
# d=576, N=200k, IVF2048,SQ8), 1.25k and 2k gave the same recall (SQ8 rarely moves a key
# across the k-th boundary) and 2k was ~1.5-2x slower: gathering the candidates' float16 keys
# from the memory map (~4-6 ms/query for 1.25k rows of d=576 on 2 cores) is what re-ranking costs.
RERANK_FACTOR = 1.25
# keep the memory for one re-rank batch (gathered float32 keys and their differences) bounded
RERANK_BUDGET_BYTES = 256 << 20
# recall@k the auto and PQ indexes hold by default as N grows (IndexConfig.recall_target)
AUTO_RECALL_TARGET = 0.9
# PQ code size of the ivfpq presets: the official MLPMemory / kNN-LM code's 64 bytes per vector
PQ_BYTES = 64
# named indexes: factory string and nprobe (ivfpq and ivfopq are sized to N in resolve_factory)
PRESETS: dict[str, tuple[str, int]] = {
    # the official MLPMemory (and kNN-LM) code: 4096 lists, 64-byte PQ codes, nprobe 32; that code
    # keeps no full keys, which here is --no-rerank (re-ranking stays the default where keys exist).
    # "np": no polysemous training, which FAISS' factory does for PQ by default and which only
    # serves Hamming filtering: it took 3 minutes for 12k keys of d=32 on 2 busy cores
    "mlpmemory": ("IVF4096,PQ64np", 32),
}
DEVICES = ("cpu", "cuda", "cuda:N", "all", "all-shards")


@dataclass
class IndexConfig:
    """How to index the keys.

    kind: "auto", "flat" (a float32 copy of the keys), "keys" (exact search over the
    datastore's float16 keys: no copy), "ivfpq" / "ivfopq" (IVF lists sized to N, 64-byte
    PQ codes, with OPQ), "mlpmemory" (the official code's IVF4096,PQ64 at nprobe 32), or a
    FAISS factory string ("IVF1024,SQ8", "IVF4096,PQ64", ...).
    rerank: None = re-rank exactly when the index is approximate (needs the datastore's
    keys at search time); false = distances from the codes (PQ distances are approximate:
    SPEC trap, about 1.3 kNN-LM perplexity points).
    recall_target: choose nprobe at build time as the smallest that reaches this recall@k
    (recall_k, against exact search, on recall_sample keys). None = 0.9 for auto, ivfpq and
    ivfopq, and the fixed nprobe for mlpmemory and factory strings.
    device: where FAISS builds and searches: cpu, cuda (this process's GPU), cuda:N, all
    (every GPU, a replica on each: throughput) or all-shards (the vectors split over every
    GPU: size). Needs the GPU FAISS package (``pip install 'mlpmem[gpu]'``). Where it runs,
    not what it makes: recorded in the manifest, not in config.json.
    gpu: older spelling of device: true = cuda (None, false: follow device).
    keep_keys: false = once the index, the kNN targets and the memory are built, `mlpmem run`
    deletes the datastore's float16 keys (d*2 bytes per token, the largest file left). Only
    for an index that searches without them (rerank: false, or kind flat); a stage that needs
    them later (new targets, a new index) then asks for the datastore to be rebuilt. What is
    kept, not what the index is: not in config.json.
    """

    kind: str = "auto"
    nprobe: int = 32
    rerank: bool | None = None
    # Flat costs N*d flops per query: bench/bench_search.py (d=576, k=1024, 2 busy cores) got
    # 90-130 queries/s at N=200k but 4.8/s at 600k. The auto IVF with exact re-ranking got
    # 70-150/s at 200k (recall@1024 0.99) and 97/s at 600k (recall 1.0, synthetic keys): nearly
    # flat in N, as it scans ~16k keys and re-ranks 1.25k whatever N. So 200k rows is the
    # crossover: below it Flat is as fast and exact; above it IVF wins by a growing factor.
    auto_flat_max_rows: int = 200_000
    # ~64+ training points per list for nlist up to 2048 (faiss warns below 39 per list);
    # k-means on 128k x 576 takes about a minute on 2 cores
    train_sample: int = 131_072
    recall_sample: int = 500
    recall_k: int = 1024
    gpu: bool | None = None
    seed: int = 0
    recall_target: float | None = None
    device: str = "cpu"
    keep_keys: bool = True

    def problems(self) -> list[str]:
        from mlpmem.typed_config import in_range, need, positive

        return (
            need(
                isinstance(self.kind, str) and self.kind.strip() != "",
                "kind",
                "must be auto, flat, keys, ivfpq, ivfopq, mlpmemory or a FAISS factory string",
            )
            + positive(self, "nprobe", "train_sample", "recall_sample", "recall_k")
            + positive(self, "auto_flat_max_rows", zero=True)
            + in_range(self, "recall_target", 0.0, 1.0, allow_none=True)
            + need(_device_ok(self.device), "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
            + need(
                self.keep_keys or (self.kind != "keys" and (self.rerank is False or self.kind == "flat")),
                "keep_keys",
                "false needs an index that searches without the keys: set rerank: false (distances from the codes) or kind: flat",
            )
        )


def _faiss():
    import faiss

    return faiss


@contextlib.contextmanager
def faiss_threads(n: int | None = None) -> Iterator[int]:
    """Run a block with FAISS on ``n`` OpenMP threads (default: torch's intra-op count), then restore.

    FAISS and torch share one OpenMP runtime in the usual wheels, so setting FAISS's
    count for the whole process would also change torch's, and with it the order of
    torch's float reductions: numbers would depend on whether FAISS ran before.
    Yields the count used, for manifests.
    """
    import torch

    faiss = _faiss()
    n = int(n or torch.get_num_threads())
    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    if old_faiss != n:
        faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        if faiss.omp_get_max_threads() != old_faiss:
            faiss.omp_set_num_threads(old_faiss)
        if torch.get_num_threads() != old_torch:
            torch.set_num_threads(old_torch)


def _device_ok(device) -> bool:
    return isinstance(device, str) and (
        device in ("cpu", "cuda", "all", "all-shards") or (device.startswith("cuda:") and device[5:].isdigit())
    )


@dataclass(frozen=True)
class Placement:
    """Where FAISS runs: ``gpus`` empty = the CPU; several GPUs hold replicas, or ``shard`` the vectors."""

    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    shard: bool = False

    @property
    def gpu(self) -> bool:
        return bool(self.gpus)


GPU_EXTRA_FIX = (
    "pip install 'mlpmem[gpu]' (FAISS for CUDA 12; uninstall faiss-cpu first, as both provide the faiss module), "
    "or set index.device: cpu (--device cpu)"
)


def resolve_placement(device: str = "cpu", gpu: bool | None = None, faiss=None, local_rank: int | None = None) -> Placement:
    """Turn ``index.device`` into the GPUs FAISS uses; refuse what this FAISS build or machine cannot do.

    cpu: no GPU. cuda: one GPU, this process's (LOCAL_RANK, so each rank of a torchrun
    run searches on its own). cuda:N: GPU N. all: every GPU, a replica on each (queries
    split: throughput). all-shards: every GPU, the vectors split over them (size).
    ``gpu=True`` (the older flag) means cuda.
    """
    if not _device_ok(device):
        raise MlpmemError(f"index device {device!r} is not one of {', '.join(DEVICES)}", "use cpu, cuda, cuda:N, all or all-shards")
    if gpu and device == "cpu":
        device = "cuda"
    if device == "cpu":
        return Placement()
    faiss = faiss or _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        raise MlpmemError(
            f"index device {device!r} needs FAISS with GPU support, but the installed faiss {getattr(faiss, '__version__', '')} is a CPU-only build",
            GPU_EXTRA_FIX,
        )
    n = int(faiss.get_num_gpus())
    if n == 0:
        raise MlpmemError(
            f"index device {device!r} asks for a GPU, but FAISS sees none (CUDA_VISIBLE_DEVICES, driver?)",
            "run on a machine with a GPU, or set index.device: cpu",
        )
    if device in ("all", "all-shards"):
        return Placement(device, tuple(range(n)), shard=device == "all-shards")
    if device == "cuda":
        from mlpmem import dist

        g = (dist.world().local_rank if local_rank is None else local_rank) % n
    else:
        g = int(device[5:])
        if g >= n:
            raise MlpmemError(
                f"index device {device!r}, but FAISS sees {n} GPU(s) (cuda:0..cuda:{n - 1})", f"use cuda:0..cuda:{n - 1}, cuda or all"
            )
    return Placement(f"cuda:{g}", (g,))


def to_placement(index, where: Placement, faiss=None):
    """A CPU index copied to the GPU(s) of ``where`` (unchanged for the CPU); FAISS refusals become MlpmemError."""
    if not where.gpu:
        return index
    faiss = faiss or _faiss()
    try:
        if len(where.gpus) == 1:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, where.gpus[0], index)
            index.mlpmem_resources = res  # the resources must live as long as the index
            return index
        co = faiss.GpuMultipleClonerOptions()
        co.shard = where.shard
        return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=len(where.gpus))
    except RuntimeError as e:  # e.g. a PQ sub-vector size that GPU IVF-PQ does not support
        raise MlpmemError(
            f"FAISS could not put this index on {where.device} ({str(e).strip().splitlines()[-1][:200]})",
            "choose a code size that FAISS GPU supports (e.g. d/m of 1-4, 6, 8, 10, 12, 16, 20, 24, 28 or 32 for IVF-PQ), or index.device: cpu",
        )


def auto_nlist(n_rows: int) -> int:
    """~4 sqrt(N) lists (a power of two), lists of ~sqrt(N)/4 vectors; at least 39 keys per list (FAISS' k-means)."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n_rows)))
    return max(1, min(nlist, 2 ** int(math.log2(max(1, n_rows // 39)))))


def pq_size(d: int, max_bytes: int = PQ_BYTES) -> int:
    """Bytes of an 8-bit PQ code for d-dim keys: the largest divisor of d up to ``max_bytes`` (64 for d=576, 768, 1024, ...)."""
    return max(m for m in range(1, min(d, max_bytes) + 1) if d % m == 0)


def resolve_factory(cfg: IndexConfig, n_rows: int, d: int) -> tuple[str, int | None, int | None]:
    """Turn ``cfg.kind`` into (factory string, nlist, nprobe) for ``n_rows`` keys of size ``d``.

    factory "Keys" is the exact search over the datastore's float16 keys (no FAISS file).
    nprobe is the starting point when a recall target is held (see ``recall_target``).
    """
    if cfg.kind == "keys":
        return "Keys", None, None
    if cfg.kind == "flat" or (cfg.kind == "auto" and n_rows <= cfg.auto_flat_max_rows):
        return "Flat", None, None
    if cfg.kind in ("auto", "ivfpq", "ivfopq"):
        nlist = auto_nlist(n_rows)
        # where the search for the nprobe that holds the recall target starts: a scan of 2k vectors
        # (below k, recall@k cannot be reached at all; SPEC: 0.6 at a 6k scan on real keys)
        nprobe = max(1, math.ceil(2 * cfg.recall_k * nlist / n_rows))
        m = pq_size(d)
        codes = {"auto": "SQ8", "ivfpq": f"PQ{m}np", "ivfopq": f"PQ{m}np"}[cfg.kind]  # np: see PRESETS
        return ("" if cfg.kind != "ivfopq" else f"OPQ{m},") + f"IVF{nlist},{codes}", nlist, min(nprobe, nlist)
    kind, nprobe = PRESETS.get(cfg.kind, (cfg.kind, cfg.nprobe))
    faiss = _faiss()
    try:
        index = faiss.index_factory(d, kind)
    except RuntimeError as e:
        raise MlpmemError(
            f"{kind!r} is not a FAISS index factory string for d={d} ({str(e).strip().splitlines()[-1]})",
            "use auto, flat, keys, ivfpq, ivfopq, mlpmemory, or a factory string such as IVF1024,SQ8",
        )
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:  # not an inverted-file index (Flat, HNSW, ...): nprobe does not apply
        return kind, None, None
    return kind, nlist, min(nprobe, nlist)


def recall_target(cfg: IndexConfig) -> float | None:
    """The recall@k that nprobe is chosen to hold: the setting, else 0.9 for the kinds sized to N."""
    if cfg.recall_target is not None:
        return float(cfg.recall_target)
    return AUTO_RECALL_TARGET if cfg.kind in ("auto", "ivfpq", "ivfopq") else None


def _set_nprobe(index, nprobe: int | None) -> None:
    if nprobe is None:
        return
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    except RuntimeError:  # a GPU IVF index is not a CPU IndexIVF
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def _is_exact(index) -> bool:
    import faiss

    return isinstance(index, KeysFlat) or isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _f32(block: np.ndarray) -> np.ndarray:
    """float16 rows -> a new float32 array (torch converts about 4x faster than numpy's astype, 2 cores)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # a read-only memory map: torch warns about writes, and this only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(block)).float().numpy()


def exact_search(
    ds: Datastore, queries: np.ndarray, k: int, block_rows: int = 65536, where: Placement = Placement()
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest keys by streaming the datastore: ([q, k] sq dists, [q, k] ids).

    Used to measure recall and by the ``keys`` index; one pass over the keys, whatever their number.
    """
    faiss = _faiss()
    with faiss_threads():
        return _exact_search(faiss, ds, queries, k, block_rows, where)


def _exact_search(faiss, ds: Datastore, queries: np.ndarray, k: int, block_rows: int, where: Placement) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(queries.shape[0], k)
    res = faiss.StandardGpuResources() if where.gpu else None
    for start, block in ds.iter_blocks("keys", block_rows):
        kb = min(k, block.shape[0])
        if res is not None:  # brute force on the GPU, one block of keys at a time
            d, i = faiss.knn_gpu(res, queries, _f32(block), kb, device=where.gpus[0])
        else:
            d, i = faiss.knn(queries, _f32(block), kb)
        pad = k - d.shape[1]
        if pad:  # a block smaller than k: pad so the heap sees k columns
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d, dtype=np.float32), np.where(i >= 0, i + start, -1).astype(np.int64))
    heap.finalize()
    return heap.D, heap.I


class KeysFlat:
    """Exact search over the datastore's float16 keys: Flat without a float32 copy on disk.

    Keys that fit ``resident_bytes`` as float32 are converted once, on the first search,
    into an in-memory Flat index (the RAM a Flat index file would take when loaded, and
    its speed); larger ones are streamed block by block for every batch of queries.
    """

    is_trained = True
    RESIDENT_BYTES = 2 << 30

    def __init__(self, ds: Datastore, where: Placement = Placement(), resident_bytes: int | None = None) -> None:
        self.ds, self.where = ds, where
        self.d, self.ntotal = ds.d, ds.n_rows
        self.resident_bytes = self.RESIDENT_BYTES if resident_bytes is None else resident_bytes
        self._flat = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self._flat is None and self.ntotal * self.d * 4 <= self.resident_bytes:
            flat = faiss.IndexFlatL2(self.d)
            for _, block in self.ds.iter_blocks("keys", 65536):
                flat.add(_f32(block))
            self._flat = to_placement(flat, Placement(self.where.device, self.where.gpus[:1])) if self.where.gpu else flat
        if self._flat is not None:
            return self._flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return _exact_search(faiss, self.ds, queries, k, 65536, self.where)


@dataclass
class RecallProbe:
    """Datastore keys used as queries (self excluded) and their exact k nearest neighbours."""

    qids: np.ndarray
    queries: np.ndarray
    exact: np.ndarray
    k: int

    @classmethod
    def sample(cls, ds: Datastore, cfg: IndexConfig, where: Placement = Placement()) -> "RecallProbe":
        k = min(cfg.recall_k, ds.n_rows - 1)
        rng = np.random.default_rng(cfg.seed + 1)  # another stream than the training sample
        qids = np.sort(rng.choice(ds.n_rows, size=min(cfg.recall_sample, ds.n_rows), replace=False))
        xq = _f32(ds.gather("keys", qids))
        _, exact = exact_search(ds, xq, k + 1, where=where)
        exact = _drop_excluded(exact, np.zeros_like(exact, dtype=np.float32), qids, k)[1]
        return cls(qids, xq, exact, k)

    def recall(self, index: "KnnIndex") -> float:
        """Mean |approx ∩ exact| / k."""
        _, approx = index.search(self.queries, self.k, exclude=self.qids)
        return recall_at_k(approx, self.exact)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / k, for id arrays [q, k] (-1 = no hit, never counted)."""
    k = exact.shape[1]
    hits = [np.intersect1d(a[a >= 0], e).size for a, e in zip(approx, exact)]  # a few hundred rows: a loop is fine
    return float(np.mean(hits) / k)


# Codes-only IVF-PQ at 200k SOTU keys (bench/recipes/sotu200k_codes.yaml) reached recall@1024 0.763 at
# nprobe 84, 0.771 at 168 and 0.772 at 336, at 1.0, 1.6 and 2.6 ms per query: past the plateau, scanning
# more lists costs search time for no recall. An unreachable target settles this close to the best.
SHORT_OF_BEST = 0.01


def choose_nprobe(measure, start: int, nlist: int, target: float, max_nprobe: int | None = None) -> tuple[int, float, list[list[float]]]:
    """The smallest nprobe (within ~12%) whose recall ``measure(nprobe)`` reaches ``target``.

    Doubles from ``start`` until the target is reached, every list is scanned, or recall stops
    growing (a doubling gains < 0.002: the codes, not the scan, limit it); then bisects down.
    When the target is out of reach, the smallest nprobe tried whose recall is within
    SHORT_OF_BEST of the best.
    Returns (nprobe, its recall, [[nprobe, recall, seconds per query], ...] as tried).
    """
    top = min(nlist, max_nprobe or nlist)
    tried: dict[int, tuple[float, float]] = {}

    def at(p: int) -> float:
        if p not in tried:
            tried[p] = measure(p)
        return tried[p][0]

    lo, p = None, max(1, min(start, top))
    while at(p) < target and p < top:
        if lo is not None and at(p) - at(lo) < 0.002:
            break  # plateau
        lo, p = p, min(2 * p, top)
    if at(p) >= target and lo is not None:
        hi = p
        while hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if at(mid) >= target else (mid, hi)
        p = hi
    if at(p) >= target:
        best = p
    else:  # out of reach (the codes limit recall): the cheapest scan within SHORT_OF_BEST of the best recall tried
        best_recall = max(r for r, _ in tried.values())
        best = min(q for q, (r, _) in tried.items() if r >= best_recall - SHORT_OF_BEST)
    return best, tried[best][0], [[q, round(r, 4), round(t, 6)] for q, (r, t) in sorted(tried.items())]


def store_bytes(ds: Datastore, index_bytes: int, needs_keys: bool) -> tuple[dict[str, float], float]:
    """Bytes per corpus token of every stored piece (the index file and each datastore array), and of what search reads."""
    per = {"index": index_bytes / ds.n_rows}
    for shard in ds.manifest["shards"]:
        for name, rec in shard["arrays"].items():
            per[f"datastore.{name}"] = per.get(f"datastore.{name}", 0.0) + rec["bytes"] / ds.n_rows
    search = per["index"] + per.get("datastore.values", 0.0) + (per.get("datastore.keys", 0.0) if needs_keys else 0.0)
    return {k: round(v, 2) for k, v in per.items()}, round(search, 2)


def remove_keys(datastore_dir: Path, index_dir: Path) -> int:
    """Delete the datastore's keys files, which an index built with ``rerank: false`` never reads; returns the bytes freed.

    The manifest keeps listing them: a datastore whose keys are all gone reads as
    having had them removed (``Datastore.absent``), and a stage that needs them says so.
    """
    datastore_dir = Path(datastore_dir)
    m = read_manifest(Path(index_dir), "index")
    if m.get("search_needs_keys", True):
        raise MlpmemError(
            f"the index in {index_dir} ({m.get('factory')}) re-ranks with the datastore's keys, so they cannot be removed",
            "keep the keys (index.keep_keys: true), or build the index with rerank: false",
        )
    files = [
        datastore_dir / s["arrays"]["keys"]["file"] for s in read_manifest(datastore_dir, "datastore")["shards"] if "keys" in s["arrays"]
    ]
    freed = sum(p.stat().st_size for p in files if p.exists())
    for p in files:
        p.unlink(missing_ok=True)
    return freed


def build_index(datastore_dir: Path, out_dir: Path, cfg: IndexConfig = IndexConfig(), overwrite: bool = False) -> Path:
    """Index the keys of ``datastore_dir`` into ``out_dir`` (``index.faiss`` + manifest).

    The index is trained on ``train_sample`` keys and filled block by block from the
    datastore's memory maps: only the sample and one block are in memory at once.
    """
    from mlpmem.typed_config import validate

    validate(cfg, "index")
    faiss = _faiss()
    datastore_dir, out_dir = Path(datastore_dir).resolve(), Path(out_dir)
    ds = Datastore(datastore_dir)  # refuses a missing or unfinished datastore
    n = ds.n_rows
    if n < 2:
        raise MlpmemError(f"the datastore in {datastore_dir} has {n} row(s)", "build the datastore from a larger corpus")
    if ds.removed_for("keys", out_dir, overwrite):
        raise MlpmemError(f"the keys of the datastore in {datastore_dir} were removed: nothing to index", "build the datastore again")
    factory, nlist, nprobe = resolve_factory(cfg, n, ds.d)
    target = recall_target(cfg) if nlist is not None else None
    if nlist is not None and nlist * 39 > n:
        raise MlpmemError(
            f"index {factory!r} has {nlist} lists but the datastore has only {n} keys (FAISS needs at least 39 per list to train)",
            f"use kind=auto, ivfpq, keys or flat (lists sized to the data), or fewer lists (IVF{max(1, 2 ** int(math.log2(max(1, n // 64))))},SQ8)",
        )
    if target is None and nlist is not None and nprobe * n / nlist < 4 * cfg.recall_k:
        log.warning(
            "%s with nprobe %d scans about %d keys per query for k=%d: expect low recall (raise nprobe, or set recall_target)",
            factory,
            nprobe,
            nprobe * n // nlist,
            cfg.recall_k,
        )
    where = resolve_placement(cfg.device, cfg.gpu)  # an absent GPU FAISS is refused before the folder is claimed
    config = {
        "datastore": str(datastore_dir),
        **{k: v for k, v in asdict(cfg).items() if k not in ("device", "keep_keys")},
    }  # where and what is kept, not what
    if prepare_out(out_dir, config, overwrite, kind="index") == "done":
        log.info("index in %s is already built", out_dir)
        return out_dir

    with faiss_threads() as threads:
        t0 = time.perf_counter()
        index, train_rows = (None, 0) if factory == "Keys" else _train_and_fill(faiss, ds, factory, nlist, cfg, where)
        build_s = time.perf_counter() - t0
        rerank = (not (index is None or _is_exact(index))) if cfg.rerank is None else bool(cfg.rerank)
        search_index = KeysFlat(ds, where) if index is None else to_placement(index, where)
        knn = KnnIndex(out_dir, search_index, {"nprobe": nprobe, "rerank": rerank, "n_rows": n, "d": ds.d}, ds, where)
        knn.threads = threads
        t1 = time.perf_counter()
        if knn.approximate:
            probe = RecallProbe.sample(ds, cfg, where)
            k = probe.k

            def measure(p: int) -> tuple[float, float]:
                knn.set_nprobe(p)
                t = time.perf_counter()
                r = probe.recall(knn)
                return r, (time.perf_counter() - t) / len(probe.qids)

            if target is not None:
                nprobe, recall, tried = choose_nprobe(measure, nprobe, nlist, target, GPU_MAX_K if where.gpu else None)
                if recall < target:
                    log.warning(
                        "%s reaches recall@%d %.3f at best (nprobe %d), below the target %.2f: the codes limit it (re-rank with the keys, or larger codes)",
                        factory,
                        k,
                        recall,
                        nprobe,
                        target,
                    )
            else:
                recall, secs = measure(nprobe)
                tried = [[nprobe, round(recall, 4), round(secs, 6)]]
            knn.set_nprobe(nprobe)
        else:
            recall, k, tried = 1.0, min(cfg.recall_k, n - 1), []  # Flat *is* the exact search
        recall_s = time.perf_counter() - t1
        index_file = None
        if index is not None:
            _set_nprobe(index, nprobe)
            partial = out_dir / (INDEX_FILE + ".partial")
            faiss.write_index(index, str(partial))
            os.replace(partial, out_dir / INDEX_FILE)
            index_file = file_record(out_dir, out_dir / INDEX_FILE)
    needs_keys = rerank or index is None
    per_token, search_per_token = store_bytes(ds, index_file["bytes"] if index_file else 0, needs_keys)
    write_manifest(
        out_dir,
        "index",
        {
            "datastore": str(datastore_dir),
            "datastore_manifest_sha256": sha256_file(datastore_dir / MANIFEST),
            "model_id": ds.model_id,
            "tokenizer_hash": ds.tokenizer_hash,
            "layer": ds.layer,
            "site": ds.site,
            "d": ds.d,
            "n_rows": n,
            "factory": factory,
            "nlist": nlist,
            "nprobe": nprobe,
            "rerank": rerank,
            "train_rows": train_rows,
            "recall_at_k": recall,
            "k": k,
            "recall_target": target,
            "nprobe_tried": tried,  # [nprobe, recall, s/query]
            "search_needs_keys": needs_keys,
            "bytes_per_token": per_token,
            "search_bytes_per_token": search_per_token,
            "build_seconds": round(build_s, 3),
            "recall_seconds": round(recall_s, 3),
            "faiss_threads": threads,
            "device": cfg.device if not cfg.gpu else "cuda",
            "gpus": len(where.gpus),  # where it ran (not in config.json)
            "index_file": index_file,
        },
    )
    log.info(
        "index %s over %d keys: recall@%d %.3f at nprobe %s (rerank %s; search reads %.0f B/token), built in %.1f s",
        factory,
        n,
        k,
        recall,
        nprobe,
        rerank,
        search_per_token,
        build_s,
    )
    return out_dir


def _train_and_fill(faiss, ds: Datastore, factory: str, nlist: int | None, cfg: IndexConfig, where: Placement):
    """A CPU index of ``factory`` trained on a sample of the keys and filled block by block (on one GPU of ``where`` if any)."""
    n = ds.n_rows
    index = faiss.index_factory(ds.d, factory, faiss.METRIC_L2)
    if nlist is not None:  # k-means draws its own subsample with a fixed seed: make it ours
        faiss.extract_index_ivf(index).cp.seed = cfg.seed
    # one GPU builds (the index must fit it); search may use all of them (replicas or shards)
    work = to_placement(index, Placement(where.device, where.gpus[:1])) if where.gpu else index
    train_rows = 0
    if not work.is_trained:
        rng = np.random.default_rng(cfg.seed)
        # at least 39 keys per list, below which FAISS' k-means gives poor lists (and warns)
        train_rows = min(n, max(cfg.train_sample, 39 * (nlist or 0)))
        sample = _f32(ds.gather("keys", np.sort(rng.choice(n, size=train_rows, replace=False))))
        log.info("training %s on %d keys", factory, train_rows)
        work.train(sample)
        del sample
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="key", unit_scale=True, desc="index keys") as bar:
        for _, block in ds.iter_blocks("keys", 65536):
            work.add(_f32(block))
            bar.update(block.shape[0])
    return (faiss.index_gpu_to_cpu(work) if where.gpu else work), train_rows


def _drop_excluded(ids: np.ndarray, dists: np.ndarray, exclude: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove ``exclude[i]`` from row i by id wherever it ranks (else the last hit); keep k.

    ids, dists: [q, c] sorted ascending, c >= k (+1 if excluding). Returns (dists [q,k], ids [q,k], found [q]).
    """
    if exclude is None:
        return dists[:, :k], ids[:, :k], np.zeros(ids.shape[0], dtype=bool)
    hit = (ids == exclude[:, None]) & (exclude[:, None] >= 0)
    hit &= np.cumsum(hit, axis=1) == 1  # only its first occurrence
    found = hit.any(axis=1)
    hit[~found, -1] = True  # not among the candidates: the surplus last hit goes instead
    keep = np.argsort(hit, axis=1, kind="stable")[:, :k]  # stable: the kept hits stay in order
    return np.take_along_axis(dists, keep, 1), np.take_along_axis(ids, keep, 1), found


class KnnIndex:
    """A built index, opened for search; re-ranks with exact keys when approximate."""

    def __init__(self, folder: Path, index, manifest: dict[str, Any], datastore: Datastore | None, where: Placement | bool = False) -> None:
        self.folder = Path(folder)
        self.index = index
        self.manifest = manifest
        self.n_rows = int(manifest["n_rows"])
        self.d = int(manifest["d"])
        self.nprobe: int | None = manifest.get("nprobe")
        self.rerank = bool(manifest["rerank"])
        # re-rank this many times k candidates; see RERANK_FACTOR
        self.rerank_factor = RERANK_FACTOR
        self.approximate = not _is_exact(index)
        self.datastore = datastore
        self.where = where if isinstance(where, Placement) else Placement("cuda:0", (0,)) if where else Placement()
        self.gpu = self.where.gpu
        # FAISS's OpenMP threads while searching; None follows torch's count (see faiss_threads)
        self.threads: int | None = None
        _set_nprobe(index, self.nprobe)

    def set_nprobe(self, nprobe: int | None) -> None:
        self.nprobe = nprobe
        _set_nprobe(self.index, nprobe)

    @classmethod
    def open(
        cls,
        index_dir: Path,
        datastore: Datastore | Path | None = None,
        verify: bool = False,
        gpu: bool | None = None,
        device: str | None = None,
    ) -> "KnnIndex":
        """Open a finished index; ``datastore`` defaults to the one it was built from.

        device: where to search (see ``resolve_placement``); None = where it was built, or the
        CPU (with a warning) when this machine cannot, since the file is a CPU index.
        """
        faiss = _faiss()
        index_dir = Path(index_dir)
        m = read_manifest(index_dir, "index")
        fix = f"delete {index_dir} and run `mlpmem index` again"
        index = None
        if m["index_file"] is not None:
            path = check_file(index_dir, m["index_file"], verify, fix)
            try:
                index = faiss.read_index(str(path))
            except (RuntimeError, MemoryError) as e:  # faiss reports a bad file as RuntimeError
                raise MlpmemError(f"{path} is not a readable FAISS index ({str(e).strip().splitlines()[0][:200]})", fix)
            if index.ntotal != m["n_rows"] or index.d != m["d"]:
                raise MlpmemError(
                    f"{path} holds {index.ntotal} vectors of size {index.d}, its manifest says {m['n_rows']} of size {m['d']}", fix
                )
        if datastore is None:
            datastore = Path(m["datastore"])
        if not isinstance(datastore, Datastore):
            datastore = Datastore(datastore)
        if sha256_file(datastore.folder / MANIFEST) != m["datastore_manifest_sha256"]:
            raise MlpmemError(
                f"the index in {index_dir} was built from another datastore than {datastore.folder} (its manifest hash differs)",
                f"pass the datastore the index was built from ({m['datastore']}), or rebuild the index",
            )
        if device is None and not gpu and m.get("device", "cpu") != "cpu":
            try:
                where = resolve_placement(m["device"])
            except MlpmemError as e:
                log.warning("searching %s on the CPU: %s", index_dir, e.problem)
                where = Placement()
        else:
            where = resolve_placement(device or "cpu", gpu)
        index = KeysFlat(datastore, where) if index is None else to_placement(index, where)
        return cls(index_dir, index, m, datastore, where)

    def check_model(self, model_id: str, tokenizer_hash: str) -> None:
        """Refuse an index over keys from another model or tokenizer than the one in use."""
        if tokenizer_hash != self.manifest["tokenizer_hash"] or model_id != self.manifest["model_id"]:
            raise MlpmemError(
                f"the index in {self.folder} was built over keys of {self.manifest['model_id']!r}, not {model_id!r} (or its tokenizer differs)",
                "use the model the datastore was built with, or build a new datastore and index with this model",
            )

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None, batch_size: int | None = None, return_found: bool = False
    ):
        """k nearest keys by squared L2, ascending.

        queries: [q, d] float32. exclude: [q] row id to remove from row i's results (-1: none).
        Returns sq_dists float32 [q, k] and ids int64 [q, k] (missing hits: id -1, dist +inf);
        with ``return_found`` also found bool [q]: the excluded id was among the candidates.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise MlpmemError(
                f"queries must have shape [q, {self.d}], got {list(queries.shape)}", "pass keys from the same layer as the datastore"
            )
        extra = 0 if exclude is None else 1
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
            if exclude.shape[0] != queries.shape[0]:
                raise MlpmemError(
                    f"exclude has {exclude.shape[0]} entries for {queries.shape[0]} queries", "pass one row id (or -1) per query"
                )
        if k < 1 or k > self.n_rows - extra:
            raise MlpmemError(
                f"k={k} neighbours asked for, but the datastore has {self.n_rows} rows" + (" (one is the query itself)" if extra else ""),
                f"use k <= {self.n_rows - extra}, or build a larger datastore",
            )
        # candidates: k (+ the excluded one); with re-ranking more, so that exact distances can reorder them
        cand = min(math.ceil(self.rerank_factor * k) + extra if self.rerank else k + extra, self.n_rows)
        if self.gpu:
            cand = min(cand, GPU_MAX_K)
            if cand < k + extra:
                raise MlpmemError(
                    f"k={k} is above what FAISS GPU search returns ({GPU_MAX_K - extra})",
                    "use a smaller k, or search on the CPU (index.device: cpu)",
                )
        if batch_size is None:
            # re-ranking gathers [batch, cand, d] keys; keep that within the budget
            batch_size = max(1, RERANK_BUDGET_BYTES // (cand * self.d * 8)) if self.rerank else 1024
        out_d = np.empty((queries.shape[0], k), dtype=np.float32)
        out_i = np.empty((queries.shape[0], k), dtype=np.int64)
        found = np.zeros(queries.shape[0], dtype=bool)
        for s in range(0, queries.shape[0], batch_size):
            xq = queries[s : s + batch_size]
            with faiss_threads(self.threads):
                d, i = self.index.search(xq, cand)
            d = np.where(i < 0, np.inf, d).astype(np.float32)
            if self.rerank:
                d = self._exact_dists(xq, i)
            if self.rerank or self.gpu:  # re-ranked (or unsorted GPU output): sort, missing hits last
                order = np.argsort(d, axis=1, kind="stable")
                d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
            ex = None if exclude is None else exclude[s : s + batch_size]
            out_d[s : s + len(xq)], out_i[s : s + len(xq)], found[s : s + len(xq)] = _drop_excluded(i, d, ex, k)
        return (out_d, out_i, found) if return_found else (out_d, out_i)

    def _exact_dists(self, xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Squared L2 from each query to its candidates' exact float16 keys: [q, c] (inf for id -1)."""
        if self.datastore is None:
            raise MlpmemError("re-ranking needs the datastore's keys but none was given", "open the index with its datastore")
        import torch

        # torch converts float16 -> float32 about 4x faster than numpy's astype (measured, 2 cores)
        keys = torch.from_numpy(self.datastore.gather("keys", np.maximum(ids, 0))).float().numpy()  # [q, c, d]
        # the direct difference, not |x|^2 + |q|^2 - 2xq, which loses digits at the distances that matter
        keys -= xq[:, None, :]
        d = np.einsum("qcd,qcd->qc", keys, keys)
        return np.where(ids < 0, np.inf, d).astype(np.float32)
