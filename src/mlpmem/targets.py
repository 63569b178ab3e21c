"""Stage 4: the retriever's behaviour as sparse training targets for the memory.

For every datastore row i: search k_i (row i itself removed by id), weight the
neighbours by softmax(-d / T), add the weights up per next token, keep the top-M
tokens and renormalise. The maths is in three pure functions (``knn_weights``,
``knn_distribution``, ``knn_target_logprob``) tested against a naive reference;
``build_targets`` runs them over the datastore into shards aligned 1:1 with the
datastore's shards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpmem.errors import MlpmemError
from mlpmem.files import MANIFEST, check_disk_space, save_npy, sha256_file
from mlpmem.folders import prepare_out
from mlpmem.manifest import clear_progress, finished_shards, save_shard_record, write_manifest
from mlpmem.datastore import Datastore, ShardedArrays

log = logging.getLogger(__name__)


def knn_weights(sq_dists: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(-d / T) over each row: [q, k] -> [q, k] float64; +inf (missing) hits get 0.

    A row with no finite distance gets all-zero weights (not NaN).
    """
    logits = -np.asarray(sq_dists, dtype=np.float64) / float(temperature)
    top = np.max(logits, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # all-missing rows: avoid inf - inf
    w = np.exp(logits - top)  # exp(-inf) = 0 for missing hits
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def sum_per_token(vals: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's weights summed per token, without a [q, V] array.

    vals int [q, k], w float [q, k] -> (sv, agg), both [q, k]: sv each row's tokens in
    ascending order; agg[r, j] the total weight of token sv[r, j] at the first slot of its
    run of equal tokens, 0 at the other slots (so each token's total appears once).
    """
    q, k = w.shape
    order = np.argsort(vals, axis=1, kind="stable")
    sv = np.take_along_axis(vals, order, 1)
    sw = np.take_along_axis(w, order, 1)
    starts = np.ones((q, k), dtype=bool)
    starts[:, 1:] = sv[:, 1:] != sv[:, :-1]
    flat_starts = np.flatnonzero(starts)  # every row starts a run, so runs never span rows
    agg = np.zeros(q * k, dtype=np.result_type(w.dtype, np.float64))
    agg[flat_starts] = np.add.reduceat(sw.reshape(-1), flat_starts)
    return sv, agg.reshape(q, k)


def knn_distribution(
    sq_dists: np.ndarray, neighbour_values: np.ndarray, temperature: float, top_m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """p_kNN per row, cut to its top-M tokens and renormalised.

    sq_dists: [q, k] squared L2 (+inf for a missing hit); neighbour_values: [q, k] next-token
    ids (negative for a missing hit). Returns ids int32 [q, M], probs float32 [q, M] (sorted
    by prob descending, ties by token id; padded with id 0 / prob 0; each row sums to 1 unless
    it had no neighbour at all), mass_removed float32 [q] (p_kNN mass outside the top M),
    support_size int64 [q] (tokens with nonzero p_kNN).
    """
    vals = np.asarray(neighbour_values, dtype=np.int64)
    w = knn_weights(sq_dists, temperature)
    w[vals < 0] = 0.0
    q, k = w.shape
    sv, agg = sum_per_token(vals, w)
    support = (agg > 0).sum(axis=1)
    # top M by (prob desc, token asc): lexsort-free, as slots are already in token order
    m = min(top_m, k)
    if m < k:
        part = np.argpartition(-agg, m - 1, axis=1)[:, :m]
        part.sort(axis=1)  # back to token order, so the stable sort below breaks ties by token
    else:
        part = np.broadcast_to(np.arange(k), (q, k))
    top_p = np.take_along_axis(agg, part, 1)
    top_v = np.take_along_axis(sv, part, 1)
    rank = np.argsort(-top_p, axis=1, kind="stable")
    top_p = np.take_along_axis(top_p, rank, 1)
    top_v = np.where(top_p > 0, np.take_along_axis(top_v, rank, 1), 0)
    total = agg.sum(axis=1)
    kept = top_p.sum(axis=1)
    probs = np.divide(top_p, kept[:, None], out=np.zeros_like(top_p), where=kept[:, None] > 0)
    removed = np.where(total > 0, np.clip(total - kept, 0.0, None), 0.0)
    if m < top_m:  # fewer neighbours than M: pad the columns
        probs = np.pad(probs, ((0, 0), (0, top_m - m)))
        top_v = np.pad(top_v, ((0, 0), (0, top_m - m)))
    return top_v.astype(np.int32), probs.astype(np.float32), removed.astype(np.float32), support


def knn_target_logprob(
    sq_dists: np.ndarray, neighbour_values: np.ndarray, targets: np.ndarray, temperature: float | np.ndarray
) -> np.ndarray:
    """log p_kNN(target) without the top-M cut: [q] float64 (-inf where no neighbour has it).

    sq_dists, neighbour_values: [q, k] as for ``knn_distribution``; targets: [q] token ids.
    temperature may be a 1-D array [t] of temperatures: the result is then [t, q]. No sort and
    no grouping, O(q k) per temperature, so a temperature grid over the same neighbours is cheap.
    """
    temps = np.atleast_1d(np.asarray(temperature, dtype=np.float64))
    vals = np.asarray(neighbour_values)
    valid = (vals >= 0) & np.isfinite(sq_dists)
    match = valid & (vals == np.asarray(targets).reshape(-1, 1))
    d = np.where(valid, np.asarray(sq_dists, dtype=np.float64), 0.0)
    logits = -d[None] / temps[:, None, None]  # [t, q, k]
    top = np.max(np.where(valid, logits, -np.inf), axis=2, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(logits - top)
    with np.errstate(divide="ignore"):  # log 0 = -inf is the answer for an absent target
        out = np.log(np.sum(e * match, axis=2)) - np.log(np.sum(e * valid, axis=2))
    return out if np.ndim(temperature) else out[0]


@dataclass
class TargetsConfig:
    """How to turn neighbours into targets.

    temperature: T in softmax(-d / T); it depends on the key scale of each model: choose it
    on validation data (the kNN-LM perplexity minimum), never copy it (SPEC: T=2 was best for
    SmolLM2-135M, whose squared distances run from ~12 to ~27; the paper's 16 was for GPT-2 XL).
    top_m: 128 tokens per row. With k=1024 neighbours the support is at most 1024 tokens but
    the mass is concentrated; 128 keeps the cut mass small (recorded in the manifest as
    mass_removed; check it) at 512 bytes per row (uint16 id + float16 prob; 768 with int32 ids
    for vocabularies over 65,536), under half the float16 key itself for d=576.
    batch_size: queries searched together; bounds memory ([batch, k] dists/ids/weights).
    """

    k: int = 1024
    temperature: float = 2.0
    top_m: int = 128
    batch_size: int = 512

    def problems(self) -> list[str]:
        from mlpmem.typed_config import positive

        return positive(self, "k", "temperature", "top_m", "batch_size")


def _shard_files(s: int) -> dict[str, str]:
    return {"ids": f"ids-{s:05d}.npy", "probs": f"probs-{s:05d}.npy"}


def _targets_for_rows(
    ds: Datastore, index, values: np.ndarray, start: int, end: int, cfg: TargetsConfig, exclude_self: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Targets for rows start..end-1 of ``ds`` (the queries): ids int32 [n, M], probs float32 [n, M], stat sums."""
    n = end - start
    ids = np.empty((n, cfg.top_m), dtype=np.int32)
    probs = np.empty((n, cfg.top_m), dtype=np.float32)
    stats = {"support": 0.0, "removed": 0.0, "removed_max": 0.0, "self_found": 0.0}
    for b in range(start, end, cfg.batch_size):
        e = min(b + cfg.batch_size, end)
        keys = ds.rows("keys", b, e).astype(np.float32)
        d, nb, found = index.search(keys, cfg.k, exclude=np.arange(b, e) if exclude_self else None, return_found=True)
        nv = np.where(nb >= 0, values[np.maximum(nb, 0)], -1)  # missing hits carry no token
        bi, bp, removed, support = knn_distribution(d, nv, cfg.temperature, cfg.top_m)
        ids[b - start : e - start], probs[b - start : e - start] = bi, bp
        stats["support"] += float(support.sum())
        stats["removed"] += float(removed.astype(np.float64).sum())
        stats["removed_max"] = max(stats["removed_max"], float(removed.max()))
        stats["self_found"] += float(found.sum())
    return ids, probs, stats


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest integer type that holds every token id: uint16 for vocabularies up to 65,536.

    Ids are a third of a target row's bytes at int32 (M x 4 of M x 6); SmolLM2's 49,152 and
    GPT-2's 50,257 tokens fit in 16 bits, which takes a row from 768 to 512 bytes at M = 128.
    Padding is id 0 with probability 0, so no negative id is ever stored.
    """
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _save_shard(out_dir: Path, s: int, ids: np.ndarray, probs: np.ndarray, vocab_size: int) -> dict:
    """Write one shard's arrays: ids in :func:`id_dtype`; probs are renormalised in float32 before the float16 cast."""
    files = _shard_files(s)
    return {
        "ids": save_npy(out_dir / files["ids"], ids.astype(id_dtype(vocab_size))),
        "probs": save_npy(out_dir / files["probs"], probs.astype(np.float16)),
    }


def build_targets(
    datastore_dir: Path,
    index_dir: Path,
    out_dir: Path,
    cfg: TargetsConfig = TargetsConfig(),
    overwrite: bool = False,
    queries_dir: Path | None = None,
) -> Path:
    """kNN targets for every datastore row into ``out_dir``; resumes an interrupted run.

    Writes shards aligned with the datastore's (same start/end) with arrays ids [n, M] (uint16 when the vocabulary fits, else int32)
    and probs float16 [n, M], then a manifest of kind "targets". With ``queries_dir`` (a
    datastore of another split, e.g. valid) the targets are for *its* rows, searched in the
    index of ``datastore_dir``; nothing is excluded, since those rows are not in the index.

    Launched as several processes (torchrun, accelerate launch), each computes every
    size-th shard (``dist.my_items``); the shards and their files are the same for any
    number of processes, each finished shard has its own progress record, so a run
    stopped with N processes resumes with M. Rank 0 alone claims the folder and writes
    the manifest, after every shard exists.
    """
    from mlpmem import dist
    from mlpmem.typed_config import validate
    from mlpmem.index import KnnIndex

    validate(cfg, "targets")
    datastore_dir, index_dir, out_dir = Path(datastore_dir).resolve(), Path(index_dir).resolve(), Path(out_dir)
    index_ds = Datastore(datastore_dir)
    index = KnnIndex.open(index_dir, datastore=index_ds)
    ds = Datastore(Path(queries_dir).resolve()) if queries_dir is not None else index_ds
    if queries_dir is not None:
        ds.check_model(index_ds.model_id, index_ds.tokenizer_hash, index_ds.layer, index_ds.site)
    exclude_self = queries_dir is None
    n = index_ds.n_rows
    if cfg.k < 1 or cfg.k > n - 1:
        raise MlpmemError(
            f"k={cfg.k} neighbours asked for, but the datastore has N={n} rows and each row's own key is excluded, so at most {n - 1} are left",
            f"use k <= {n - 1} (--k), or build the datastore from a larger corpus",
        )
    config = {"datastore": str(datastore_dir), "index": str(index_dir), "queries": str(ds.folder.resolve()), **asdict(cfg)}
    if ds.removed_for("keys", out_dir, overwrite):
        raise MlpmemError(
            f"the keys of the datastore in {ds.folder} were removed, and they are the queries of the targets",
            "build the targets before removing the keys, or build the datastore again",
        )
    w = dist.init("cpu")  # FAISS search runs on the host; the group only carries small records
    # rank 0 claims and locks the folder; the others wait for its answer (or its refusal)
    state = dist.on_main(prepare_out, out_dir, config, overwrite, kind="targets")
    if state == "done":
        log.info("targets in %s are already built", out_dir)
        return out_dir

    shards = ds.manifest["shards"]
    mine = dist.my_items(len(shards), w)
    done = finished_shards(out_dir, mine, "targets")
    todo = [s for s in mine if s not in done]
    rows_todo = sum(shards[s]["end"] - shards[s]["start"] for s in todo)
    check_disk_space(out_dir, rows_todo * cfg.top_m * (id_dtype(ds.vocab_size).itemsize + 2), "kNN targets")
    values = index_ds.values()
    from tqdm.auto import tqdm

    rows_mine = sum(shards[s]["end"] - shards[s]["start"] for s in mine)
    with tqdm(total=rows_mine, initial=rows_mine - rows_todo, unit="query", unit_scale=True, desc="kNN targets", disable=not w.main) as bar:
        for s in todo:
            start, end = shards[s]["start"], shards[s]["end"]
            t = time.perf_counter()
            ids, probs, stats = _targets_for_rows(ds, index, values, start, end, cfg, exclude_self)
            stats["seconds"] = time.perf_counter() - t
            # the record after the files: a recorded shard is always whole
            save_shard_record(
                out_dir, s, {"start": start, "end": end, "arrays": _save_shard(out_dir, s, ids, probs, ds.vocab_size), "stats": stats}
            )
            bar.update(end - start)
    dist.barrier()  # every shard is written (by some rank) before rank 0 reads them all
    dist.on_main(_write_targets_manifest, out_dir, ds, index, datastore_dir, index_dir, cfg, exclude_self, len(shards), w.size)
    return out_dir


def _write_targets_manifest(
    out_dir: Path,
    ds: Datastore,
    index,
    datastore_dir: Path,
    index_dir: Path,
    cfg: TargetsConfig,
    exclude_self: bool,
    n_shards: int,
    processes: int,
) -> None:
    done = finished_shards(out_dir, list(range(n_shards)), "targets")  # every file the manifest will list is there and whole
    missing = [s for s in range(n_shards) if s not in done]
    if missing:
        raise MlpmemError(
            f"shards {missing[:5]} of the targets in {out_dir} are missing or damaged after every process finished",
            "run the same command again: it redoes only those shards",
        )
    n = ds.n_rows
    total = {name: sum(done[s]["stats"][name] for s in range(n_shards)) for name in ("support", "removed", "self_found", "seconds")}
    stats = {
        "mean_support_size": total["support"] / n,
        "mean_mass_removed": total["removed"] / n,
        "max_mass_removed": max(done[s]["stats"]["removed_max"] for s in range(n_shards)),
        "self_found_rate": total["self_found"] / n,
        "queries_per_s": n / total["seconds"],  # per process, over every run that wrote a shard
    }
    write_manifest(
        out_dir,
        "targets",
        {
            "n_rows": n,
            "k": cfg.k,
            "temperature": cfg.temperature,
            "top_m": cfg.top_m,
            "datastore": str(ds.folder.resolve()),
            "datastore_manifest_sha256": sha256_file(ds.folder.resolve() / MANIFEST),
            "index_datastore": str(datastore_dir),
            "self_excluded": exclude_self,
            "index": str(index_dir),
            "index_factory": index.manifest["factory"],
            "index_recall_at_k": index.manifest["recall_at_k"],
            "model_id": ds.model_id,
            "tokenizer_hash": ds.tokenizer_hash,
            "layer": ds.layer,
            "site": ds.site,
            "vocab_size": ds.vocab_size,
            "stats": stats,
            "faiss_threads": index.threads or _torch_threads(),
            "processes": processes,
            "shards": [{"start": done[s]["start"], "end": done[s]["end"], "arrays": done[s]["arrays"]} for s in range(n_shards)],
        },
    )
    clear_progress(out_dir)
    log.info(
        "kNN targets for %d rows: support %.1f tokens, top-%d cut %.4f of the mass (max %.4f), self found %.3f",
        n,
        stats["mean_support_size"],
        cfg.top_m,
        stats["mean_mass_removed"],
        stats["max_mass_removed"],
        stats["self_found_rate"],
    )


class Targets(ShardedArrays):
    """Sparse kNN targets: arrays ``ids`` [N, M] (uint16 or int32: :func:`id_dtype`; older folders
    int32) and ``probs`` float16 [N, M], row-aligned with a datastore."""

    REQUIRED = ("ids", "probs")

    def __init__(self, folder: Path, verify: bool = False) -> None:
        super().__init__(folder, "targets", verify=verify)
        m = self.manifest
        self.k = int(m["k"])
        self.temperature = float(m["temperature"])
        self.top_m = int(m["top_m"])
        self.model_id = str(m["model_id"])
        self.tokenizer_hash = str(m["tokenizer_hash"])

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """As :meth:`ShardedArrays.gather`; token ids come back as int32 whatever their stored width."""
        out = super().gather(name, ids)
        return out.astype(np.int32, copy=False) if name == "ids" else out

    @property
    def ids(self) -> list[np.ndarray]:
        """The ``ids`` shards (memory maps), in row order."""
        return self.shards("ids")

    @property
    def probs(self) -> list[np.ndarray]:
        """The ``probs`` shards (memory maps), in row order."""
        return self.shards("probs")

    def check_aligned(self, datastore: Datastore) -> None:
        """Refuse a datastore other than the one these targets were built from."""
        fix = "pass the datastore these targets were built from, or build targets for this datastore"
        if sha256_file(datastore.folder / MANIFEST) != self.manifest["datastore_manifest_sha256"]:
            raise MlpmemError(
                f"the targets in {self.folder} were built from another datastore than {datastore.folder} (its manifest hash differs)", fix
            )
        if datastore.n_rows != self.n_rows or not (
            np.array_equal(datastore.starts, self.starts) and np.array_equal(datastore.ends, self.ends)
        ):
            raise MlpmemError(
                f"the targets in {self.folder} ({self.n_rows} rows) are not aligned row for row with the datastore in {datastore.folder} ({datastore.n_rows} rows)",
                fix,
            )
        for name in ("ids", "probs"):
            if name not in self.names:
                raise MlpmemError(
                    f"the targets in {self.folder} have no {name!r} array", f"delete {self.folder} and build the targets again"
                )


def _torch_threads() -> int:
    """FAISS searched with torch's thread count (index.faiss_threads): record what ran."""
    import torch

    return torch.get_num_threads()
