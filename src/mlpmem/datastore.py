"""Stage 2: run the frozen LM over a split and store (hidden state -> next token).

Row i of a datastore is position i of the split's token stream: its key is
the hidden state that predicts token i+1, its value is token i+1, and the
corpus's ``doc_index`` gives the document. Arrays are written in shards of
whole windows, each shard atomically, so a killed run resumes at the first
missing shard and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from mlpmem.corpus import SPLITS, Corpus, windows
from mlpmem.errors import MlpmemError
from mlpmem.manifest import check_disk_space, prepare_out, read_json, save_npy, sha256_file, write_json, write_manifest
from mlpmem.models import DEFAULT_MODEL, SITES, Site, capture, load_model, logits_size, resolve_layer, run_captured, tokenizer_hash
from mlpmem.store import feature_name

log = logging.getLogger(__name__)


@dataclass
class DatastoreConfig:
    model: str = DEFAULT_MODEL
    split: str = "train"
    layer: int = -1  # decoder layer of the key; negative counts from the end
    site: str = "ffn_input"  # "ffn_input" (kNN-LM key) or "output"
    extra_sites: list[str] = field(default_factory=list)  # more hidden states to store, as "LAYER:SITE"
    lm_logprob: bool = False  # also store the LM's log-prob of each next token (for scoring splits)
    context: int = 512
    stride: int = 256
    batch_size: int = 8
    windows_per_shard: int = 64
    dtype: str = "float32"


def parse_site(text: str) -> tuple[int, str]:
    layer, _, site = text.partition(":")
    try:
        return int(layer), site or "output"
    except ValueError:
        raise MlpmemError(f"cannot read hidden-state site {text!r}", "write it as LAYER:SITE, e.g. -1:output or 12:ffn_input")


@dataclass
class Batch:
    row_start: int  # first datastore row in this batch
    row_end: int
    features: dict[str, "object"]  # name -> float tensor [row_end - row_start, d]
    lm_logprob: "object | None"  # float32 tensor [n] or None
    labels: np.ndarray  # int32 [n], the next tokens
    seconds: float  # wall time of the forward pass


def iter_batches(model, tokens: np.ndarray, context: int, stride: int, sites: dict[str, Site], batch_size: int,
                 want_logprob: bool, window_range: tuple[int, int] | None = None) -> Iterator[Batch]:
    """Run the LM over scoring windows and yield the kept positions' hidden states.

    Consecutive windows of equal length are batched; the kept rows of a batch
    are contiguous. Without ``want_logprob`` the forward stops after the deepest
    hooked layer (no later layers, no logits).
    """
    import torch

    W = windows(len(tokens), context, stride)
    lo, hi = window_range or (0, len(W))
    W = W[lo:hi]
    tok_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    i = 0
    while i < len(W):
        j = i + 1
        length = W[i, 1] - W[i, 0]
        while j < len(W) and j - i < batch_size and W[j, 1] - W[j, 0] == length:
            j += 1
        group = W[i:j]
        ids = torch.stack([tok_t[b:e] for b, e, _ in group])
        stops = np.minimum(group[:, 1], len(tokens) - 1)
        keep = int((group[:, 1] - group[:, 2]).max())  # kept positions lie in the last `keep` of each window
        t0 = time.perf_counter()
        with torch.inference_mode(), capture(model, list(sites.values()), stop_early=not want_logprob) as store:
            out = run_captured(model, input_ids=ids, use_cache=False, **({"logits_to_keep": keep} if want_logprob else {}))
        feats = {name: [] for name in sites}
        lps = []
        for w, (b, e, k) in enumerate(group):
            s, t = k - b, stops[w] - b  # local positions kept
            for name, site in sites.items():
                feats[name].append(store[site][w, s:t])
            if want_logprob:
                logits = out.logits[w, s - (e - b) + keep : t - (e - b) + keep].float()
                y = tok_t[k + 1 : stops[w] + 1]
                lps.append(torch.log_softmax(logits, -1).gather(-1, y[:, None])[:, 0])
        seconds = time.perf_counter() - t0
        row_start, row_end = int(group[0, 2]), int(stops[-1])
        yield Batch(row_start, row_end, {n: torch.cat(v) for n, v in feats.items()},
                    torch.cat(lps) if want_logprob else None, np.asarray(tokens[row_start + 1 : row_end + 1], dtype=np.int32), seconds)
        i = j


def _sites(model, cfg: DatastoreConfig) -> tuple[Site, dict[str, Site]]:
    if cfg.site not in SITES:
        raise MlpmemError(f"unknown site {cfg.site!r}", f"choose one of {SITES}")
    key = Site(resolve_layer(model, cfg.layer), cfg.site)
    sites = {"keys": key}
    for text in cfg.extra_sites:
        layer, site = parse_site(text)
        if site not in SITES:
            raise MlpmemError(f"unknown site {site!r} in {text!r}", f"choose one of {SITES}")
        s = Site(resolve_layer(model, layer), site)
        sites[feature_name(s.layer, s.site)] = s
    return key, sites


def build_datastore(corpus_dir: Path, out_dir: Path, cfg: DatastoreConfig, model_bundle=None, overwrite: bool = False) -> Path:
    """Extract keys/values for ``cfg.split`` of a corpus into ``out_dir`` (resumable).

    ``model_bundle`` is an optional already-loaded ``(model, tokenizer, model_id)``.
    """
    import torch
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if cfg.split not in SPLITS:
        raise MlpmemError(f"unknown split {cfg.split!r}", f"choose one of {SPLITS}")
    corpus = Corpus(corpus_dir)
    model, tok, model_id = model_bundle or load_model(cfg.model, cfg.dtype)
    corpus.check_tokenizer(tokenizer_hash(tok), model_id)
    key, sites = _sites(model, cfg)
    tokens = corpus.tokens(cfg.split)
    W = windows(len(tokens), cfg.context, cfg.stride)
    n_rows = len(tokens) - 1
    d = model.config.get_text_config().hidden_size
    check_disk_space(out_dir, n_rows * (2 * d * len(sites) + 4 + 4 * cfg.lm_logprob), "datastore")
    resolved = {"config": cfg, "corpus": str(Path(corpus_dir).resolve()), "corpus_manifest_sha256": sha256_file(Path(corpus_dir) / "manifest.json"), "model_id": model_id}
    if prepare_out(out_dir, resolved, overwrite) == "done":
        log.info("datastore in %s is up to date", out_dir)
        return out_dir
    progress_path = out_dir / "progress.json"
    done = read_json(progress_path)["shards"] if progress_path.exists() else {}
    shard_windows = [(a, min(a + cfg.windows_per_shard, len(W))) for a in range(0, len(W), cfg.windows_per_shard)]
    torch.manual_seed(0)
    bar = tqdm(total=n_rows, unit="tok", desc=f"datastore {cfg.split}", dynamic_ncols=True)
    bar.update(sum(s["end"] - s["start"] for s in done.values()))
    t0, new_rows = time.perf_counter(), 0
    for s, (a, b) in enumerate(shard_windows):
        if str(s) in done:
            continue
        start, end = int(W[a, 2]), int(min(W[b - 1, 1], len(tokens) - 1))
        arrays = {name: np.empty((end - start, d), np.float16) for name in sites}
        values = np.empty(end - start, np.int32)
        lp = np.empty(end - start, np.float32) if cfg.lm_logprob else None
        for batch in iter_batches(model, tokens, cfg.context, cfg.stride, sites, cfg.batch_size, cfg.lm_logprob, (a, b)):
            r0, r1 = batch.row_start - start, batch.row_end - start
            for name, h in batch.features.items():
                arrays[name][r0:r1] = h.to(torch.float16).numpy()
            values[r0:r1] = batch.labels
            if lp is not None:
                lp[r0:r1] = batch.lm_logprob.numpy()
            bar.update(r1 - r0)
            new_rows += r1 - r0
            bar.set_postfix(tok_s=f"{new_rows / (time.perf_counter() - t0):.0f}")
        records = {name: save_npy(out_dir / f"{name}-{s:05d}.npy", arr) for name, arr in arrays.items()}
        records["values"] = save_npy(out_dir / f"values-{s:05d}.npy", values)
        if lp is not None:
            records["lm_logprob"] = save_npy(out_dir / f"lm_logprob-{s:05d}.npy", lp)
        done[str(s)] = {"start": start, "end": end, "arrays": records}
        write_json(progress_path, {"shards": done})  # after the files: a listed shard is always whole
    bar.close()
    elapsed = time.perf_counter() - t0
    write_manifest(out_dir, "datastore", {
        "model_id": model_id, "tokenizer_hash": tokenizer_hash(tok), "layer": key.layer, "site": key.site,
        "features": {name: {"layer": s.layer, "site": s.site} for name, s in sites.items()},
        "d": d, "vocab_size": logits_size(model), "n_rows": n_rows, "split": cfg.split,
        "context": cfg.context, "stride": cfg.stride, "n_windows": len(W),
        "key_dtype": "float16", "value_dtype": "int32",
        "corpus": resolved["corpus"], "corpus_hash": corpus.manifest["corpus_hash"],
        "rows": "row i = position i of the split's token stream; value = token i+1; document = corpus doc_index[i]",
        "extract_tokens_per_s": new_rows / elapsed if new_rows else None,
        "shards": [done[str(s)] for s in range(len(shard_windows))],
    })
    progress_path.unlink()
    log.info("datastore: %d rows of d=%d at layer %d (%s) in %s", n_rows, d, key.layer, key.site, out_dir)
    return out_dir
