"""Stages 7-8: perplexity and tokens/s of the LM alone, LM + kNN-LM and LM + memory.

Scoring keeps, per position, the LM's log-prob of the true next token, the k
nearest neighbours (squared distances and their next tokens) and the memory's
log-prob of the true token. Perplexity under any temperature or lambda is then
cheap array maths, so tuning on valid never reruns the model. Throughput comes
from the timed online pass over the test split: each method pays for the LM
forward plus its own extra work, measured batch by batch in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mlpmem.corpus import Corpus
from mlpmem.datastore import iter_batches
from mlpmem.errors import MlpmemError
from mlpmem.interpolate import (
    fit_lambda_em,
    interpolate_logprobs,
    interpolate_many,
    lambda_curve,
    paired_ppl_change,
    perplexity,
    plot_lambda_curves,
)
from mlpmem.modeling.read_site import ReadSite
from mlpmem.datastore import Datastore

log = logging.getLogger(__name__)

TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class KnnConfig:
    k: int = 1024
    temperature: float | None = None  # None: the T that minimises kNN-LM perplexity on valid
    temperatures: list[float] = field(default_factory=lambda: list(TEMPERATURES))
    lambda_: float | None = None  # None: fitted on valid by EM
    batch_size: int = 8


@dataclass
class Scored:
    """Per-position scores of one split. Shapes: [N] or [N, k]."""

    labels: np.ndarray
    lm_logprob: np.ndarray
    knn_dists: np.ndarray | None = None
    knn_values: np.ndarray | None = None
    memory_logprob: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    def knn_logprob(self, temperature: float) -> np.ndarray:
        from mlpmem.targets import knn_target_logprob

        return np.asarray(knn_target_logprob(self.knn_dists, self.knn_values, self.labels, temperature), dtype=np.float64)


def _memory_logprob(memory, h, labels):
    import torch

    dev = next(memory.parameters()).device  # hidden states and labels come to the memory, wherever they were made
    with torch.inference_mode():
        logits = memory(h.to(dev).float())
        return (logits.gather(-1, labels.to(dev)[:, None]) - torch.logsumexp(logits, -1, keepdim=True))[:, 0].float().cpu()


def search_neighbours(index, keys: np.ndarray, k: int, values: np.ndarray, exclude=None):
    """keys [q, d] -> (squared distances float32 [q, k], the neighbours' next tokens int32 [q, k], -1 for a missing hit).
    The one search of kNN-LM scoring: the evaluator's and the model component's (retrieval.KNNRetriever)."""
    dists, ids = index.search(np.ascontiguousarray(keys, dtype=np.float32), k, exclude)
    nv = np.where(ids >= 0, values[np.clip(ids, 0, None)], -1).astype(np.int32)
    return dists.astype(np.float32), nv


def score_stored(ds: Datastore, index=None, train_values=None, k: int = 1024, memory=None, memory_meta=None, block: int = 1024) -> Scored:
    """Score a split from a datastore built on it with ``lm_logprob`` (no LM forward)."""
    import torch
    from tqdm.auto import tqdm

    if "lm_logprob" not in ds.names:
        raise MlpmemError(f"the datastore in {ds.folder} has no lm_logprob", "build it with lm_logprob enabled (valid/test splits)")
    labels = ds.load("values")
    sc = Scored(labels=labels, lm_logprob=ds.load("lm_logprob").astype(np.float64))
    if index is not None:
        dl, vl = [], []
        for start, keys in tqdm(list(ds.iter_blocks("keys", block)), desc=f"kNN search ({ds.manifest['split']})", unit="blk", leave=False):
            d, v = search_neighbours(index, keys, k, train_values)
            dl.append(d), vl.append(v)
        sc.knn_dists, sc.knn_values = np.concatenate(dl), np.concatenate(vl)
    if memory is not None:
        from mlpmem.memory import MemoryInput

        name = MemoryInput.from_meta(memory_meta).array_in(ds.layer, ds.site)  # what the memory reads, as its meta records it
        lps = [
            _memory_logprob(memory, torch.from_numpy(np.array(h)), torch.from_numpy(labels[s : s + len(h)].astype(np.int64)))
            for s, h in ds.iter_blocks(name, block)
        ]
        sc.memory_logprob = torch.cat(lps).double().numpy()
    return sc


SCORE_BLOCK = 64  # windows per unit of work: processes split a split's windows in blocks of this many


def score_online(
    model,
    tokens: np.ndarray,
    context: int,
    stride: int,
    key_site: ReadSite | None,
    index=None,
    train_values=None,
    k: int = 1024,
    memory=None,
    memory_site: ReadSite | None = None,
    batch_size: int = 8,
    desc: str = "scoring",
    prefix: tuple[int, ...] = (),
) -> Scored:
    """Run the LM over ``tokens`` with hooks and time each method batch by batch.

    ``key_site`` None: the LM alone (no kNN search). ``prefix``: token ids in front of every window
    (e.g. ``(bos,)`` for Gemma; see :class:`mlpmem.datastore.Extractor`): it must be the one the
    datastore was built with when there is an index or a memory.

    Under torchrun / accelerate launch each process scores every N-th block of
    windows and every process gets the whole split's scores back, in row order;
    ``seconds`` then add up all processes' work (tokens/s is per process).
    """
    import torch
    from tqdm.auto import tqdm

    from mlpmem import dist
    from mlpmem.corpus import windows

    sites = {"keys": key_site} if key_site is not None else {}
    if memory is not None:
        sites["memory_input"] = memory_site
    W = windows(len(tokens), context - len(prefix), stride)  # Extractor.windows
    w = dist.world()
    size = max(1, min(SCORE_BLOCK, -(-len(W) // w.size)))  # a short split still gives every process work
    blocks = [(a, min(a + size, len(W))) for a in range(0, len(W), size)]
    mine = dist.my_items(len(blocks), w)
    done: dict[int, dict] = {}
    secs = {"lm": 0.0, "knn": 0.0, "memory": 0.0}
    bar = tqdm(total=len(tokens) - 1, desc=desc, unit="tok", dynamic_ncols=True, disable=not w.main)
    for i in mine:
        parts: dict[str, list] = {"labels": [], "lm": [], "d": [], "v": [], "mem": []}
        for b in iter_batches(model, tokens, context, stride, sites, batch_size, want_logprob=True, window_range=blocks[i], prefix=prefix):
            secs["lm"] += b.seconds
            labels = torch.from_numpy(b.labels.astype(np.int64))
            parts["labels"].append(b.labels)
            parts["lm"].append(b.lm_logprob.double().cpu().numpy())
            if index is not None:
                t0 = time.perf_counter()
                d, v = search_neighbours(index, b.features["keys"].float().cpu().numpy(), k, train_values)
                secs["knn"] += time.perf_counter() - t0
                parts["d"].append(d), parts["v"].append(v)
            if memory is not None:
                t0 = time.perf_counter()
                parts["mem"].append(_memory_logprob(memory, b.features["memory_input"], labels).double().numpy())
                secs["memory"] += time.perf_counter() - t0
            bar.update((b.row_end - b.row_start) * w.size)  # the others advance at the same pace
        done[i] = parts
    bar.close()
    if w.size > 1:  # every process gets every block
        for part in dist.all_gather_objects(done):
            done.update(part)
        secs = dict(zip(secs, dist.all_sum(list(secs.values())).tolist()))
    ordered = [done[i] for i in range(len(blocks))]
    cat = lambda key: np.concatenate([x for p in ordered for x in p[key]]) if any(p[key] for p in ordered) else None  # noqa: E731
    return Scored(cat("labels"), cat("lm"), cat("d"), cat("v"), cat("mem"), secs)


def tune_knn(valid: Scored, temperatures=TEMPERATURES) -> dict:
    """The temperature (and its EM-fitted lambda) that minimise kNN-LM perplexity on ``valid``."""
    rows = []
    for T in temperatures:
        lp = valid.knn_logprob(T)
        lam = fit_lambda_em(valid.lm_logprob, lp)
        rows.append({"temperature": float(T), "lambda": float(lam), "ppl": perplexity(interpolate_logprobs(valid.lm_logprob, lp, lam))})
        log.info("T=%g: lambda=%.3f valid ppl %.3f", T, lam, rows[-1]["ppl"])
    best = min(rows, key=lambda r: r["ppl"])
    if best["temperature"] in (min(temperatures), max(temperatures)):
        log.warning("best kNN temperature %g is at the edge of the grid %s", best["temperature"], list(temperatures))
    return {"temperature": best["temperature"], "lambda": best["lambda"], "valid_ppl": best["ppl"], "grid": rows}


def summarize(
    test: Scored, temperature: float | None, lam_knn: float | None, lam_mem: float | None, w_both: list[float] | None = None
) -> dict:
    """Perplexities and tokens/s of every method scored in ``test``."""
    n = test.n
    # every method over the same positions: a shorter array would compare perplexities of different tokens
    for name in ("lm_logprob", "knn_dists", "knn_values", "memory_logprob"):
        arr = getattr(test, name)
        if arr is not None and len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} positions, the labels {n}: methods scored over different tokens")
    lps = {"base": test.lm_logprob}  # per-token log-probs of each method, over the same positions
    tps = {"base": n / test.seconds["lm"]} if test.seconds else {}
    knn_lp = mem_lp = None
    if test.knn_dists is not None:
        knn_lp = test.knn_logprob(temperature)
        lps["knn_lm"] = interpolate_logprobs(test.lm_logprob, knn_lp, lam_knn)
        if test.seconds:
            tps["knn_lm"] = n / (test.seconds["lm"] + test.seconds["knn"])
    if test.memory_logprob is not None:
        mem_lp = test.memory_logprob
        lps["mlp_memory"] = interpolate_logprobs(test.lm_logprob, mem_lp, lam_mem)
        if np.isfinite(mem_lp).all():  # a pruned head gives tokens outside it no mass: alone, it has no perplexity
            lps["memory_alone"] = mem_lp
        if test.seconds:
            tps["mlp_memory"] = n / (test.seconds["lm"] + test.seconds["memory"])
    if knn_lp is not None and mem_lp is not None and w_both is not None:
        # all three, with weights (LM, memory, kNN) fitted jointly on valid
        lps["knn_lm+mlp_memory"] = interpolate_many([test.lm_logprob, mem_lp, knn_lp], w_both)
        if test.seconds:
            tps["knn_lm+mlp_memory"] = n / (test.seconds["lm"] + test.seconds["knn"] + test.seconds["memory"])
    ppl = {name: perplexity(lp) for name, lp in lps.items()}
    # 95% paired bootstrap intervals of each method's perplexity change against the LM alone, over 256-position blocks
    vs_base = {name: paired_ppl_change(lp, test.lm_logprob) for name, lp in lps.items() if name != "base"}
    return {"n_tokens": n, "ppl": ppl, "tokens_per_s": tps, "vs_base": vs_base}


def tune_knn_for(cfg: KnnConfig, valid: Scored) -> dict:
    """Temperature and lambda for kNN-LM: given in ``cfg`` or tuned on ``valid``."""
    if cfg.temperature is None:
        result = tune_knn(valid, cfg.temperatures)
    else:
        result = {"temperature": cfg.temperature, "lambda": fit_lambda_em(valid.lm_logprob, valid.knn_logprob(cfg.temperature))}
    if cfg.lambda_ is not None:
        result["lambda"] = cfg.lambda_
    return result


def tune_knn_cached(path: Path | None, cfg: KnnConfig, score_valid: Callable[[], Scored], inputs: dict[str, Path]) -> dict:
    """The one kNN-LM tuning (``mlpmem knnlm`` and ``mlpmem run``): T and lambda on valid (:func:`tune_knn_for`).

    ``score_valid()`` scores the valid split (kNN only). With a ``path``, the result is cached there and reused
    while its inputs are unchanged: ``inputs`` are the stage folders the scores depend on, keyed by the hash of
    their whole manifest (which lists every file's hash).
    """
    from mlpmem import dist
    from mlpmem.files import MANIFEST, read_json, sha256_file, to_jsonable, write_json

    if path is None:
        return tune_knn_for(cfg, score_valid())
    key = {"config": to_jsonable(cfg), **{name: sha256_file(Path(folder) / MANIFEST) for name, folder in inputs.items()}}
    cached = read_json(path) if path.exists() else None
    if isinstance(cached, dict) and cached.get("key") == key:
        return cached
    result = tune_knn_for(cfg, score_valid())
    result["key"] = key
    dist.on_main(write_json, path, result)  # every process scored and tuned the same; one writes
    return result


def run_knnlm(
    corpus_dir: Path,
    datastore_dir: Path,
    index_dir: Path,
    out_dir: Path,
    cfg: KnnConfig,
    split: str = "test",
    model: str | None = None,
    model_bundle=None,
    device: str = "auto",
    dtype: str = "float32",
) -> dict:
    """The kNN-LM baseline: tune T and lambda on valid, then score ``split`` (LM alone vs LM + kNN-LM).

    ``device`` and ``dtype`` (see models.resolve_device) are where and in which precision the LM
    runs when no ``model_bundle`` is given; both are recorded in knnlm.json.
    """
    from mlpmem.index import KnnIndex
    from mlpmem.files import write_json
    from mlpmem.models import dtype_name, load_model, model_label, resolve_device, tokenizer_hash

    from mlpmem import dist

    out_dir = Path(out_dir)
    dist.init(device)
    device = dist.local_device(device)
    dev, dt = resolve_device(device, dtype) if model_bundle is None else (None, None)  # before anything is read or written
    corpus = Corpus(corpus_dir)
    ds = Datastore(datastore_dir)
    if cfg.k > ds.n_rows:  # before the model is loaded
        raise MlpmemError(f"k={cfg.k} is larger than the datastore ({ds.n_rows} rows)", f"use k <= {ds.n_rows}, or a larger corpus")
    model, tok, model_id = model_bundle or load_model(model or ds.model_id, dtype_name(dt), dev)
    ds.check_model(model_id, tokenizer_hash(tok))
    corpus.check_tokenizer(tokenizer_hash(tok), model_id)
    index = KnnIndex.open(index_dir, ds)
    values = ds.values()
    ctx, stride = ds.manifest["context"], ds.manifest["stride"]
    key = ReadSite(ds.layer, ds.site)
    pre = tuple(ds.manifest.get("prefix", []))  # windows scored as the datastore's were extracted (datastore.bos)
    tuned = tune_knn_cached(
        None,
        cfg,
        lambda: score_online(
            model,
            corpus.tokens("valid"),
            ctx,
            stride,
            key,
            index,
            values,
            cfg.k,
            batch_size=cfg.batch_size,
            desc="scoring valid",
            prefix=pre,
        ),
        {},
    )
    test = score_online(
        model, corpus.tokens(split), ctx, stride, key, index, values, cfg.k, batch_size=cfg.batch_size, desc=f"scoring {split}", prefix=pre
    )
    result = summarize(test, tuned["temperature"], tuned["lambda"], None)
    result.update(
        {
            "split": split,
            "knn_temperature": tuned["temperature"],
            "lambda": {"knn_lm": tuned["lambda"]},
            "tuning": tuned,
            "k": cfg.k,
            "n_datastore": ds.n_rows,
            "model": model_label(model_id),
            "model_id": model_id,
            "device": str(model.device),
            "dtype": dtype_name(model.dtype),
            "processes": dist.world().size,
        }
    )
    name = "kNN-LM (T=%g)" % tuned["temperature"]

    def write() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "knnlm.json", result)
        plot_lambda_curves(
            {name: lambda_curve(test.lm_logprob, test.knn_logprob(tuned["temperature"]))},
            out_dir / "lambda_knnlm.png",
            f"kNN-LM on {split}: perplexity vs lambda",
            chosen={name: tuned["lambda"]},
        )

    dist.on_main(write)
    log.info(
        "%s: base ppl %.3f, kNN-LM ppl %.3f (T=%g, lambda=%.3f)",
        split,
        result["ppl"]["base"],
        result["ppl"]["knn_lm"],
        tuned["temperature"],
        tuned["lambda"],
    )
    return result
